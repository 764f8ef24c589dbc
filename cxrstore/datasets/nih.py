"""NIH ChestX-ray14 adapter (``--dataset nih-cxr14``).

Reads the dataset's own files where they normally sit under ``root``:

- the label file: ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (either
  revision, plain or gzipped; the 2020 revision is preferred when both are present),
  columns ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
  Patient Gender, View Position, OriginalImage[Width, Height],
  OriginalImagePixelSpacing[x, y]``: a header name with a comma inside brackets spans
  two columns (``OriginalImage[Width]``, ``OriginalImage[Height]``); the 2017 file's
  trailing comma is an empty column;
- the images, ``images/<8-digit patient>_<3-digit follow-up>.png`` (also the Kaggle
  layout ``images_001/images/...``);
- the official split lists ``train_val_list.txt`` and ``test_list.txt`` (optional; the
  ``split`` column is ``train_val``, ``test`` or empty);
- the Google 2019 expert relabels (optional): ``google2019_nih-chest-xray-labels.csv.gz``
  or ``four_findings_expert_labels/{test,validation}_labels.csv``, YES/NO columns
  ``Fracture, Pneumothorax, Airspace opacity, Nodule or mass``.

Labels follow the harmonised map (``schemas/labels-v1.json``): a finding listed in
``Finding Labels`` (pipe-separated) is 1, a finding not listed is 0 (NIH has no
uncertainty and no not-mentioned state); Opacity is the expert ``Airspace opacity``
where present, else the fallback chosen (default: any of Infiltration, Consolidation,
Pneumonia).

Canonical columns: ``image_id`` = ``Image Index`` (``00000001_000.png``),
``patient_id`` = the 8-digit patient id, ``study_id`` = the file stem (one visit per
image), ``view`` PA/AP, ``sex`` M/F, ``age`` in years, ``follow_up`` = ``Follow-up #``.
Everything not turned into a record is counted in :meth:`NihCxr14.report`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from cxrstore.datasets.base import (
    ScannedDataset,
    LABEL_POLICY_COLUMN,
    SPLIT_COLUMN,
    DatasetReport,
    ImageRecord,
    RecordError,
    find_file,
    read_header,
    read_table,
    register_dataset,
    resolve_under_root,
    take,
)
from cxrstore.datasets.labels import LabelMap, LabelPolicy, load_label_map, policy_id
from cxrstore.errors import ManifestError, UsageError

logger = logging.getLogger(__name__)

NAME = "nih-cxr14"
LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz")
EXPERT_FILES = (
    ("google2019_nih-chest-xray-labels.csv.gz",),
    ("google2019_nih-chest-xray-labels.csv",),
    ("four_findings_expert_labels/test_labels.csv", "four_findings_expert_labels/validation_labels.csv"),
)
SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
KNOWN_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width]", "OriginalImage[Height]", "OriginalImagePixelSpacing[x]", "OriginalImagePixelSpacing[y]",
)
EXPERT_EXTRA = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass", "Set Id")
_NAME_RE = re.compile(r"^(\d{8})_(\d{3})\.png$")
_SEX = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}
_EXPERT = {"YES": 1.0, "NO": 0.0}


def split_header(line: str) -> list[str]:
    """Column names of an NIH header: a name with a comma inside brackets spans two columns.

    ``OriginalImage[Width,Height]`` becomes ``OriginalImage[Width]`` and
    ``OriginalImage[Height]``; an empty trailing name (the 2017 file's trailing comma)
    becomes ``_empty<i>``.
    """
    tokens = next(csv.reader([line]))
    names: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if "[" in tok and "]" not in tok:
            parts = [tok]
            while i + 1 < len(tokens) and "]" not in parts[-1]:
                i += 1
                parts.append(tokens[i])
            base, first = parts[0].split("[", 1)
            subs = [first, *parts[1:]]
            subs[-1] = subs[-1].rstrip().rstrip("]")
            names.extend(f"{base.strip()}[{s.strip()}]" for s in subs)
        else:
            names.append(tok.strip() or f"_empty{len(names)}")
        i += 1
    return names


def _read_nih_csv(path: Path, role: str) -> pd.DataFrame:
    names = split_header(read_header(path, role=role))
    return read_table(path, role=role, names=names)


@register_dataset
class NihCxr14(ScannedDataset):
    """NIH ChestX-ray14 under ``root``, with harmonised labels.

    Parameters
    ----------
    root : str or Path
        The dataset folder (holding ``images/`` and ``Data_Entry_2017*.csv``).
    label_file : str or Path, optional
        The label file; default: found under ``root`` (2020 revision first).
    expert_labels : str or Path or False, optional
        The Google 2019 expert label file; default: found under ``root`` if present;
        ``False``: not used.
    views : str or sequence of str, optional
        View positions kept (default ``PA,AP``).
    opacity_fallback : str, optional
        Fallback for Opacity on images without the expert label: a name the label map
        lists (built-in: ``any-infiltration-consolidation-pneumonia`` (default), ``missing``).
    label_map : str or Path, optional
        A harmonised label map; default ``schemas/labels-v1.json``.
    check_images : bool
        Scan the image folders and yield only label rows whose image file exists
        (label rows without an image and images without a label row are reported).
        ``False``: yield every label row (a missing file then fails at ingest).
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        root: str | Path,
        *,
        label_file: str | Path | None = None,
        expert_labels: str | Path | bool | None = None,
        views: str | Sequence[str] | None = None,
        opacity_fallback: str | None = None,
        label_map: str | Path | None = None,
        check_images: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"root folder {self.root} does not exist or is not a folder")
        self.label_map: LabelMap = load_label_map(label_map)
        self.rules = self.label_map.for_dataset(NAME)
        if not self.rules:
            raise ManifestError(f"label map {self.label_map.source} defines no label for {NAME}")
        opacity = next((r for n, r in self.rules if n == "Opacity" and r["rule"] == "expert"), None)
        if opacity_fallback is not None and opacity is not None and opacity_fallback not in opacity["fallbacks"]:
            raise UsageError(
                f"NIH opacity fallback {opacity_fallback!r} is not valid; choose one of: {', '.join(opacity['fallbacks'])}"
            )
        self.opacity_fallback = opacity_fallback or (opacity["default_fallback"] if opacity else None)
        self.policy = LabelPolicy(views=views, opacity_fallback=self.opacity_fallback)  # type: ignore[arg-type]
        self.check_images = check_images
        self._report = DatasetReport(NAME)
        path = Path(label_file) if label_file is not None else find_file(self.root, LABEL_FILES)
        if path is None:
            raise ManifestError(
                f"{self.root}: no NIH label file found (looked for {', '.join(LABEL_FILES)}); name it with label_file= / --label-file"
            )
        self.label_file = path
        self._report.files["labels"] = str(path)
        self._expert_paths = self._find_expert(expert_labels)
        self._records = self._scan()

    # -- the contract ------------------------------------------------------------
    def label_policy(self) -> dict[str, Any]:
        """The policy that determines the labels (its id is stored per row)."""
        return {
            "adapter": NAME,
            "label_map": self.label_map.summary(),
            "label_file": self.label_file.name,
            "expert_labels": [p.name for p in self._expert_paths],
            "views": list(self.policy.views),
            "opacity_fallback": self.opacity_fallback,
            "uncertain": "not applicable (NIH ChestX-ray14 has no uncertain labels)",
            "not_mentioned": "negative (a finding not listed in Finding Labels is negative)",
        }

    def label_sources(self) -> dict[str, str]:
        return {n: _describe(r, self.opacity_fallback) for n, r in self.rules}

    # -- reading -----------------------------------------------------------------
    def _find_expert(self, expert: str | Path | bool | None) -> list[Path]:
        if expert is False:
            self._report.files["expert_labels"] = ""
            return []
        if expert is not None and expert is not True:
            p = Path(expert)
            if not p.is_file():
                raise ManifestError(f"{p}: expert label file not found")
            self._report.files["expert_labels"] = str(p)
            return [p]
        for group in EXPERT_FILES:
            paths = [self.root / g for g in group]
            if all(p.is_file() for p in paths):
                self._report.files["expert_labels"] = ", ".join(map(str, paths))
                return paths
        self._report.files["expert_labels"] = ""
        self._report.add(
            "missing_file",
            "optional Google 2019 expert label file not found (Opacity uses the fallback for every image)",
            [EXPERT_FILES[0][0]],
        )
        return []

    def _scan_images(self) -> dict[str, str]:
        """File name -> path relative to root, over ``images/`` and ``images_*/images/``."""
        folders = []
        if (self.root / "images").is_dir():
            folders.append("images")
        folders += sorted(
            f"{d.name}/images" for d in self.root.iterdir() if d.is_dir() and d.name.startswith("images_") and (d / "images").is_dir()
        )
        if not folders:
            raise ManifestError(
                f"{self.root}: no image folder found (expected {self.root / 'images'}, where the 12 archives unpack); "
                "pass check_images=False to list the label file's rows without checking their files"
            )
        found: dict[str, str] = {}
        dupes: list[str] = []
        for folder in folders:
            resolve_under_root(self.root, folder)  # the folder itself must lie inside the root
            with os.scandir(self.root / folder) as it:
                for entry in it:
                    if not entry.name.endswith(".png"):
                        continue
                    if entry.name in found:
                        dupes.append(f"{folder}/{entry.name}")
                        continue
                    found[entry.name] = f"{folder}/{entry.name}"
        self._report.add("duplicate_images", "image file names found in more than one image folder (the first kept)", dupes)
        self._report.counts["image_files"] = len(found)
        return found

    def _scan(self) -> list[ImageRecord | RecordError]:
        rep = self._report
        df = _read_nih_csv(self.label_file, "NIH label file")
        missing = [c for c in ("Image Index", "Finding Labels") if c not in df.columns]
        if missing:
            raise ManifestError(
                f"{self.label_file}: required column(s) {', '.join(missing)} not found; columns are: {', '.join(df.columns)}"
            )
        unknown = [c for c in df.columns if c not in KNOWN_COLUMNS and not (c.startswith("_empty") and (df[c] == "").all())]
        rep.add("unknown_columns", f"unknown columns in {self.label_file.name} (ignored)", unknown)
        rep.counts["label_rows"] = len(df)
        ids = df["Image Index"].str.strip()
        dup = ids.duplicated()
        rep.add("duplicate_ids", "Image Index values listed more than once (the first row kept)", ids[dup].tolist())
        df = df[~dup.to_numpy()].reset_index(drop=True)
        ids = ids[~dup.to_numpy()].reset_index(drop=True)
        n = len(df)

        # Findings: pipe-separated.
        raw = df["Finding Labels"].str.strip()
        sets = [frozenset(t.strip() for t in s.split("|") if t.strip()) for s in raw.tolist()]
        known = set(FINDINGS) | {NO_FINDING}
        bad = [f"{i}: {t}" for i, s in zip(ids.tolist(), sets) for t in s if t not in known]
        rep.add("unknown_findings", "Finding Labels values not among the 14 findings or 'No Finding' (ignored)", bad)
        empty = np.array([not s for s in sets])
        rep.add("empty_findings", "rows with an empty Finding Labels cell (their finding labels are missing)", ids[empty].tolist())

        expert = self._read_expert(set(ids.tolist()))
        columns: dict[str, list[float | None]] = {}
        for label, rule in self.rules:
            columns[label] = self._label_values(rule, ids.tolist(), sets, empty, expert)
        names = list(columns)
        label_rows = [dict(zip(names, vals)) for vals in zip(*columns.values())] if names else [{} for _ in range(n)]

        patient = _patients(df, ids, rep)
        follow = _follow_ups(df, ids)
        ages = _ages(df, ids, rep)
        sexes = [_SEX.get(s.strip().upper(), s.strip().upper()) for s in _col(df, "Patient Gender", n)]
        views = [v.strip().upper() for v in _col(df, "View Position", n)]
        split = self._splits(ids.tolist())
        images = self._scan_images() if self.check_images else None

        pid = policy_id(self.label_policy())
        keep_views = set(self.policy.views)
        excluded: dict[str, list[str]] = {}
        no_image: list[str] = []
        bad_names: list[str] = []
        out: list[ImageRecord | RecordError] = []
        root = self.root
        for i, image_id in enumerate(ids.tolist()):
            m = _NAME_RE.match(image_id)
            if not m:
                bad_names.append(image_id)
                out.append(RecordError(f"Image Index {image_id!r} is not a file name like 00000001_000.png", image_id, "", i + 1))
                continue
            if images is not None:
                rel = images.pop(image_id, None)
                if rel is None:
                    no_image.append(image_id)
                    continue
            else:
                rel = f"images/{image_id}"
            if views[i] not in keep_views:
                excluded.setdefault(views[i] or "(none)", []).append(image_id)
                continue
            out.append(
                ImageRecord(
                    image_id=image_id,
                    path=rel,
                    abs_path=Path(f"{root}/{rel}"),
                    dataset=NAME,
                    patient_id=patient[i],
                    study_id=image_id[:-4],
                    view=views[i],
                    sex=sexes[i],
                    age=ages[i],
                    labels=label_rows[i],
                    extra={SPLIT_COLUMN: split[i], LABEL_POLICY_COLUMN: pid},
                    line=i + 1,
                    follow_up=follow[i],
                )
            )
        rep.add("bad_image_index", "Image Index values that are not NIH file names (recorded as failures)", bad_names)
        rep.add("labels_without_image", "label rows whose image file is not under the image folders (not ingested)", no_image)
        if images:
            rep.add("images_without_labels",
                    "image files with no row in the label file (not ingested: their view is unknown)", sorted(images))
        for view, examples in sorted(excluded.items()):
            rep.add("view_excluded", f"images with view {view}, not among the views kept ({','.join(self.policy.views)})",
                    examples)
        rep.counts["records"] = sum(isinstance(r, ImageRecord) for r in out)
        rep.log(logger)
        return out

    def _read_expert(self, ids: set[str]) -> pd.DataFrame | None:
        if not self._expert_paths:
            return None
        frames = [_read_nih_csv(p, "expert label file") for p in self._expert_paths]
        df = pd.concat(frames, ignore_index=True)
        wanted = sorted({r["column"] for _, r in self.rules if r["rule"] == "expert"})
        missing = [c for c in ["Image Index", *wanted] if c not in df.columns]
        if missing:
            raise ManifestError(
                f"{self._expert_paths[0]}: expert label column(s) {', '.join(missing)} not found; columns are: {', '.join(df.columns)}"
            )
        known = set(KNOWN_COLUMNS) | set(EXPERT_EXTRA)
        self._report.add("unknown_columns", "unknown columns in the expert label file (ignored)",
                         [c for c in df.columns if c not in known and not c.startswith("_empty")])
        df["Image Index"] = df["Image Index"].str.strip()
        dup = df["Image Index"].duplicated()
        self._report.add("duplicate_ids", "images listed more than once in the expert label file (the first kept)",
                         df.loc[dup, "Image Index"].tolist())
        df = df[~dup.to_numpy()]
        self._report.counts["expert_rows"] = len(df)
        orphan = sorted(set(df["Image Index"]) - ids)
        self._report.add("expert_without_label_row", "expert-labelled images with no row in the NIH label file (ignored)", orphan)
        for c in wanted:
            vals = df[c].str.strip().str.upper()
            bad = ~vals.isin(list(_EXPERT)) & (vals != "")
            self._report.add("bad_value", f"expert column {c!r} values other than YES/NO/empty (taken as not expert-labelled)",
                             [f"{i}: {v}" for i, v in zip(df.loc[bad, "Image Index"], df.loc[bad, c])])
        return df.set_index("Image Index")

    def _label_values(self, rule: dict[str, Any], ids: list[str], sets: list[frozenset[str]], empty: np.ndarray,
                      expert: pd.DataFrame | None) -> list[float | None]:
        if rule["rule"] == "finding":
            f = rule["finding"]
            return [None if e else (1.0 if f in s else 0.0) for s, e in zip(sets, empty.tolist())]
        # expert, with a fallback
        fb_name = self.opacity_fallback if rule["column"] == "Airspace opacity" else rule["default_fallback"]
        fb = rule["fallbacks"].get(fb_name) or rule["fallbacks"][rule["default_fallback"]]
        if fb["rule"] == "any_finding":
            wanted = frozenset(fb["findings"])
            base: list[float | None] = [None if e else (1.0 if s & wanted else 0.0) for s, e in zip(sets, empty.tolist())]
        else:
            base = [None] * len(ids)
        if expert is None:
            return base
        values = expert[rule["column"]].str.strip().str.upper().map(_EXPERT)
        got = values.reindex(ids)
        out = [b if v is None or math.isnan(v) else float(v) for b, v in zip(base, got.tolist())]
        return out

    def _splits(self, ids: list[str]) -> list[str]:
        assigned: dict[str, str] = {}
        found_any = False
        conflicts: list[str] = []
        for split, fname in SPLIT_FILES.items():
            p = self.root / fname
            if not p.is_file():
                self._report.add("missing_file", "optional official split list not found (split column left empty)", [fname])
                self._report.files[f"split_{split}"] = ""
                continue
            found_any = True
            self._report.files[f"split_{split}"] = str(p)
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    name = line.strip()
                    if not name:
                        continue
                    if name in assigned and assigned[name] != split:
                        conflicts.append(name)
                    assigned.setdefault(name, split)
        self._report.add("split_conflict", "images listed in both train_val_list.txt and test_list.txt (the first kept)", conflicts)
        out = [assigned.get(i, "") for i in ids]
        if found_any:
            self._report.add("not_in_split", "label rows in neither split list (split column empty)",
                             [i for i, s in zip(ids, out) if not s])
            known = set(ids)
            self._report.add("split_without_label_row", "split-list entries with no row in the label file",
                             take((n for n in assigned if n not in known), 5), count=sum(1 for n in assigned if n not in known))
        return out


def _col(df: pd.DataFrame, name: str, n: int) -> list[str]:
    return df[name].tolist() if name in df.columns else [""] * n


def _patients(df: pd.DataFrame, ids: pd.Series, rep: DatasetReport) -> list[str]:
    from_name = [i[:8] if _NAME_RE.match(i) else "" for i in ids.tolist()]
    if "Patient ID" not in df.columns:
        return from_name
    out: list[str] = []
    mismatch: list[str] = []
    for image_id, raw, fallback in zip(ids.tolist(), df["Patient ID"].tolist(), from_name):
        raw = raw.strip()
        pid = f"{int(raw):08d}" if raw.isdigit() else (raw or fallback)
        if fallback and pid != fallback:
            mismatch.append(f"{image_id}: Patient ID {raw}")
        out.append(pid)
    rep.add("patient_id_mismatch", "Patient ID differs from the file name's patient number (Patient ID kept)", mismatch)
    return out


def _follow_ups(df: pd.DataFrame, ids: pd.Series) -> list[int | None]:
    raw = _col(df, "Follow-up #", len(df))
    out: list[int | None] = []
    for image_id, r in zip(ids.tolist(), raw):
        r = r.strip()
        if r.isdigit():
            out.append(int(r))
        else:
            m = _NAME_RE.match(image_id)
            out.append(int(m.group(2)) if m else None)
    return out


def _ages(df: pd.DataFrame, ids: pd.Series, rep: DatasetReport) -> list[float | None]:
    raw = _col(df, "Patient Age", len(df))
    out: list[float | None] = []
    bad: list[str] = []
    odd: list[str] = []
    for image_id, r in zip(ids.tolist(), raw):
        r = r.strip().upper().removesuffix("Y")
        if not r:
            out.append(None)
            continue
        try:
            age = float(r)
        except ValueError:
            bad.append(f"{image_id}: {r}")
            out.append(None)
            continue
        if not 0 <= age <= 120:
            odd.append(f"{image_id}: {r}")
            out.append(None)
            continue
        out.append(age)
    rep.add("bad_value", "Patient Age values that are not numbers (age left missing)", bad)
    rep.add("implausible_age", "Patient Age outside 0-120 years (age left missing)", odd)
    return out


def _describe(rule: dict[str, Any], opacity_fallback: str | None) -> str:
    if rule["rule"] == "finding":
        return f"Finding Labels contains {rule['finding']!r}"
    fb = opacity_fallback if rule["column"] == "Airspace opacity" else rule["default_fallback"]
    fbr = rule["fallbacks"].get(fb, {})
    what = f"any of {', '.join(fbr['findings'])}" if fbr.get("rule") == "any_finding" else "missing"
    return f"expert {rule['column']!r} (YES/NO) where present, else fallback {fb!r}: {what}"
