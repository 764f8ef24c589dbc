"""MIMIC-CXR-JPG adapter (``--dataset mimic-cxr-jpg``).

Reads the dataset's own files where they normally sit under ``root`` (the
``mimic-cxr-jpg/2.0.0`` folder), plain or gzipped:

- ``mimic-cxr-2.0.0-metadata.csv.gz`` (required): ``dicom_id, subject_id, study_id,
  PerformedProcedureStepDescription, ViewPosition, Rows, Columns, StudyDate, StudyTime,
  ...``: one row per image;
- ``mimic-cxr-2.0.0-chexpert.csv.gz`` or ``mimic-cxr-2.0.0-negbio.csv.gz`` (required,
  chosen by the ``labeller`` policy): ``subject_id, study_id`` and 14 label columns with
  1.0 positive, 0.0 negative, -1.0 uncertain, empty not mentioned. Labels belong to the
  study: every image of a study shares them;
- ``mimic-cxr-2.0.0-split.csv.gz`` (optional): ``dicom_id, study_id, subject_id, split``
  (``train``, ``validate``, ``test``), stored in the ``split`` column;
- MIMIC-IV's ``patients`` table (optional: ``patients=`` or ``patients.csv[.gz]`` under
  ``root``): ``subject_id, gender, anchor_age, anchor_year``. Sex is ``gender``; age at
  the study is ``anchor_age + (year of StudyDate - anchor_year)`` (both dates are
  shifted consistently per patient in MIMIC).

Images: ``files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.jpg``.
Canonical columns: ``image_id`` = dicom_id, ``patient_id`` = subject_id, ``study_id``,
``view`` = ViewPosition, ``follow_up`` = the study's rank among the subject's studies
ordered by StudyDate and StudyTime (0 = first). Labels and their policies: see
:mod:`cxrstore.datasets.labels`. Everything not turned into a record is counted in
:meth:`MimicCxrJpg.report`.
"""

from __future__ import annotations

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
    read_table,
    register_dataset,
    resolve_under_root,
)
from cxrstore.datasets.labels import LabelMap, LabelPolicy, load_label_map, policy_id
from cxrstore.errors import ManifestError, UsageError

logger = logging.getLogger(__name__)

NAME = "mimic-cxr-jpg"
PREFIX = "mimic-cxr-2.0.0"
LABEL_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": 2}  # 2 = not mentioned
_DICOM_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.\-]*$")
_SEX = {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M"}


def _candidates(stem: str) -> tuple[str, str]:
    return (f"{stem}.csv.gz", f"{stem}.csv")


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg``."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


@register_dataset
class MimicCxrJpg(ScannedDataset):
    """MIMIC-CXR-JPG under ``root``, with harmonised labels under the chosen policies.

    Parameters
    ----------
    root : str or Path
        The dataset folder (holding ``files/`` and the ``mimic-cxr-2.0.0-*.csv.gz`` files).
    labeller : {"chexpert", "negbio"}
    uncertain : {"exclude", "positive", "negative"}
        What -1.0 means: missing (``exclude``), 1 or 0.
    not_mentioned : {"negative", "missing"}
        What an empty cell means.
    views : str or sequence of str, optional
        ViewPosition values kept (default ``PA,AP``).
    patients : str or Path, optional
        MIMIC-IV ``patients.csv[.gz]`` for sex and age; default: found under ``root`` if present.
    label_map : str or Path, optional
        A harmonised label map; default ``schemas/labels-v1.json``.
    check_images : bool
        Walk ``files/`` and yield only images whose file exists (metadata rows without a
        file and files without a metadata row are reported). ``False``: yield every
        metadata row (a missing file then fails at ingest).
    """

    name: ClassVar[str] = NAME

    def __init__(
        self,
        root: str | Path,
        *,
        labeller: str = "chexpert",
        uncertain: str = "exclude",
        not_mentioned: str = "negative",
        views: str | Sequence[str] | None = None,
        patients: str | Path | None = None,
        label_map: str | Path | None = None,
        check_images: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"root folder {self.root} does not exist or is not a folder")
        self.policy = LabelPolicy(labeller=labeller, uncertain=uncertain, not_mentioned=not_mentioned, views=views)  # type: ignore[arg-type]
        self.label_map: LabelMap = load_label_map(label_map)
        self.rules = self.label_map.for_dataset(NAME)
        if not self.rules:
            raise ManifestError(f"label map {self.label_map.source} defines no label for {NAME}")
        self.check_images = check_images
        self._report = DatasetReport(NAME)
        self.metadata_file = self._require(f"{PREFIX}-metadata", "metadata file")
        self.label_file = self._require(f"{PREFIX}-{labeller}", f"{labeller} label file")
        self.split_file = find_file(self.root, _candidates(f"{PREFIX}-split"))
        if patients is not None:
            self.patients_file: Path | None = Path(patients)
            if not self.patients_file.is_file():
                raise ManifestError(f"{patients}: MIMIC-IV patients file not found")
        else:
            self.patients_file = find_file(self.root, _candidates("patients"))
        self._report.files.update(
            metadata=str(self.metadata_file), labels=str(self.label_file),
            split=str(self.split_file or ""), patients=str(self.patients_file or ""),
        )
        if self.split_file is None:
            self._report.add("missing_file", "optional split file not found (split column left empty)", [f"{PREFIX}-split.csv.gz"])
        if self.patients_file is None:
            self._report.add("missing_file", "optional MIMIC-IV patients file not found (sex and age left empty)",
                             ["patients.csv.gz"])
        self._records = self._scan()

    def _require(self, stem: str, role: str) -> Path:
        p = find_file(self.root, _candidates(stem))
        if p is None:
            raise ManifestError(f"{self.root}: MIMIC-CXR-JPG {role} not found (looked for {' or '.join(_candidates(stem))})")
        return p

    # -- the contract ------------------------------------------------------------
    def label_policy(self) -> dict[str, Any]:
        """The policy that determines the labels (its id is stored per row)."""
        return {
            "adapter": NAME,
            "label_map": self.label_map.summary(),
            "labeller": self.policy.labeller,
            "label_file": self.label_file.name,
            "uncertain": self.policy.uncertain,
            "not_mentioned": self.policy.not_mentioned,
            "views": list(self.policy.views),
        }

    def label_sources(self) -> dict[str, str]:
        return {n: f"{self.policy.labeller} column {r['column']!r}" for n, r in self.rules}

    # -- reading -----------------------------------------------------------------
    def _labels_by_study(self) -> tuple[dict[str, int], dict[str, np.ndarray], set[str]]:
        """study_id -> row index, harmonised label -> float array (NaN missing), studies."""
        rep = self._report
        df = read_table(self.label_file, role=f"{self.policy.labeller} label file")
        missing = [c for c in ("subject_id", "study_id") if c not in df.columns]
        if missing:
            raise ManifestError(
                f"{self.label_file}: required column(s) {', '.join(missing)} not found; columns are: {', '.join(df.columns)}"
            )
        wanted = {r["column"] for _, r in self.rules}
        rep.add("unknown_columns", f"unknown columns in {self.label_file.name} (ignored)",
                [c for c in df.columns if c not in ("subject_id", "study_id", *LABEL_COLUMNS, *wanted)])
        absent = sorted(c for c in wanted if c not in df.columns)
        rep.add("missing_columns", f"label columns the label map uses, absent from {self.label_file.name} (labels missing)",
                absent)
        rep.counts["label_rows"] = len(df)
        studies = df["study_id"].str.strip()
        dup = studies.duplicated()
        rep.add("duplicate_ids", "studies listed more than once in the label file (the first row kept)", studies[dup].tolist())
        df = df[~dup.to_numpy()].reset_index(drop=True)
        studies = studies[~dup.to_numpy()].reset_index(drop=True)
        uncertain = {"exclude": np.nan, "positive": 1.0, "negative": 0.0}[self.policy.uncertain]
        not_mentioned = {"negative": 0.0, "missing": np.nan}[self.policy.not_mentioned]
        lut = np.array([0.0, 1.0, not_mentioned, uncertain, np.nan])  # codes 0, 1, 2 (empty), -1 -> 3, bad -> 4
        out: dict[str, np.ndarray] = {}
        for label, rule in self.rules:
            col = rule["column"]
            if col not in df.columns:
                out[label] = np.full(len(df), np.nan)
                continue
            raw = df[col].str.strip()
            codes = raw.map(_VALUES)
            bad = codes.isna().to_numpy()
            if bad.any():
                rep.add("bad_value", f"{col!r} values other than 1.0, 0.0, -1.0 or empty (taken as missing)",
                        [f"study {s}: {v!r}" for s, v in zip(studies[bad], raw[bad])])
            idx = codes.fillna(4).astype(int).to_numpy()
            idx = np.where(idx == -1, 3, idx)  # to_numpy may be a read-only view (copy-on-write)
            out[label] = lut[idx]
        index = {s: i for i, s in enumerate(studies.tolist())}
        return index, out, set(studies.tolist())

    def _scan_files(self) -> set[str] | None:
        if not self.check_images:
            return None
        files = self.root / "files"
        if not files.is_dir():
            raise ManifestError(
                f"{self.root}: no files/ folder (MIMIC-CXR-JPG images sit under files/pXX/pSUBJECT/sSTUDY/); "
                "pass check_images=False to list the metadata rows without checking their files"
            )
        resolve_under_root(self.root, "files")
        found: set[str] = set()
        for dirpath, _dirs, names in os.walk(files):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for n in names:
                if n.endswith(".jpg"):
                    found.add(f"{rel}/{n}")
        self._report.counts["image_files"] = len(found)
        return found

    def _scan(self) -> list[ImageRecord | RecordError]:
        rep = self._report
        meta = read_table(self.metadata_file, role="metadata file")
        missing = [c for c in ("dicom_id", "subject_id", "study_id") if c not in meta.columns]
        if missing:
            raise ManifestError(
                f"{self.metadata_file}: required column(s) {', '.join(missing)} not found; columns are: {', '.join(meta.columns)}"
            )
        rep.add("unknown_columns", f"unknown columns in {self.metadata_file.name} (ignored)",
                [c for c in meta.columns if c not in METADATA_COLUMNS])
        rep.counts["metadata_rows"] = len(meta)
        for c in ("dicom_id", "subject_id", "study_id"):
            meta[c] = meta[c].str.strip()
        dup = meta["dicom_id"].duplicated()
        rep.add("duplicate_ids", "dicom_id values listed more than once in the metadata file (the first row kept)",
                meta.loc[dup, "dicom_id"].tolist())
        meta = meta[~dup.to_numpy()].reset_index(drop=True)
        n = len(meta)
        index, labels, label_studies = self._labels_by_study()
        names = list(labels)

        # follow-up: rank of the study among the subject's studies by (StudyDate, StudyTime)
        date = pd.to_numeric(meta.get("StudyDate", pd.Series([""] * n)), errors="coerce")
        time_ = pd.to_numeric(meta.get("StudyTime", pd.Series([""] * n)), errors="coerce")
        when = pd.DataFrame({"subject": meta["subject_id"], "study": meta["study_id"], "t": date * 1e7 + time_.fillna(0)})
        first = when.groupby(["subject", "study"], sort=False)["t"].min().reset_index()
        first["rank"] = first.sort_values(["t", "study"]).groupby("subject").cumcount()
        first.loc[first["t"].isna(), "rank"] = -1
        rank = dict(zip(zip(first["subject"], first["study"]), first["rank"].astype(int)))
        undated = first.loc[first["t"].isna(), "study"].tolist()
        rep.add("missing_study_date", "studies with no StudyDate (follow_up left empty)", undated)

        split = self._splits(meta)
        sex, age = self._demographics(meta, date)
        files = self._scan_files()
        metadata_studies = set(meta["study_id"].tolist())
        orphans = sorted(label_studies - metadata_studies)
        rep.add("labels_without_image", "studies in the label file with no image in the metadata file", orphans)

        pid = policy_id(self.label_policy())
        keep = set(self.policy.views)
        views = [v.strip().upper() for v in meta.get("ViewPosition", pd.Series([""] * n)).tolist()]
        excluded: dict[str, list[str]] = {}
        no_labels: list[str] = []
        no_file: list[str] = []
        bad_ids: list[str] = []
        out: list[ImageRecord | RecordError] = []
        columns = [labels[nm] for nm in names]
        root = self.root
        for i, (dicom, subject, study) in enumerate(zip(meta["dicom_id"].tolist(), meta["subject_id"].tolist(),
                                                        meta["study_id"].tolist())):
            if not (_DICOM_RE.match(dicom) and subject.isdigit() and len(subject) >= 2 and study.isdigit()):
                bad_ids.append(f"{dicom}/{subject}/{study}")
                out.append(RecordError(f"malformed ids in the metadata file: dicom_id {dicom!r}, subject_id {subject!r}, "
                                       f"study_id {study!r}", dicom, "", i + 1))
                continue
            rel = image_path(subject, study, dicom)
            if files is not None:
                if rel not in files:
                    no_file.append(rel)
                    continue
                files.discard(rel)
            if views[i] not in keep:
                excluded.setdefault(views[i] or "(none)", []).append(dicom)
                continue
            j = index.get(study)
            if j is None:
                no_labels.append(f"{dicom} (study {study})")
                row_labels: dict[str, float | None] = {nm: None for nm in names}
            else:
                row_labels = {nm: (None if math.isnan(v) else float(v)) for nm, v in zip(names, (c[j] for c in columns))}
            r = rank.get((subject, study), -1)
            out.append(
                ImageRecord(
                    image_id=dicom,
                    path=rel,
                    abs_path=Path(f"{root}/{rel}"),
                    dataset=NAME,
                    patient_id=subject,
                    study_id=study,
                    view=views[i],
                    sex=sex[i],
                    age=age[i],
                    labels=row_labels,
                    extra={SPLIT_COLUMN: split[i], LABEL_POLICY_COLUMN: pid},
                    line=i + 1,
                    follow_up=None if r < 0 else r,
                )
            )
        rep.add("bad_ids", "metadata rows with malformed ids (recorded as failures)", bad_ids)
        rep.add("metadata_without_file", "metadata rows whose image file is not under files/ (not ingested)", no_file)
        if files:
            rep.add("files_without_metadata", "image files under files/ with no metadata row (not ingested)", sorted(files))
        rep.add("images_without_labels",
                "images whose study has no row in the label file (ingested with all labels missing)", no_labels)
        for view, examples in sorted(excluded.items()):
            rep.add("view_excluded", f"images with ViewPosition {view}, not among the views kept "
                    f"({','.join(self.policy.views)})", examples)
        rep.counts["records"] = sum(isinstance(r, ImageRecord) for r in out)
        rep.log(logger)
        return out

    def _splits(self, meta: pd.DataFrame) -> list[str]:
        n = len(meta)
        if self.split_file is None:
            return [""] * n
        df = read_table(self.split_file, role="split file")
        if "dicom_id" not in df.columns or "split" not in df.columns:
            raise ManifestError(f"{self.split_file}: columns dicom_id and split are required; columns are: {', '.join(df.columns)}")
        rep = self._report
        rep.counts["split_rows"] = len(df)
        ids = df["dicom_id"].str.strip()
        values = df["split"].str.strip()
        odd = ~values.isin(["train", "validate", "test"])
        rep.add("bad_value", "split values other than train, validate, test (kept as given)",
                [f"{i}: {v!r}" for i, v in zip(ids[odd], values[odd])])
        mapping = dict(zip(ids[~ids.duplicated()], values[~ids.duplicated()]))
        out = [mapping.get(d, "") for d in meta["dicom_id"].tolist()]
        rep.add("not_in_split", "images with no row in the split file (split column empty)",
                [d for d, s in zip(meta["dicom_id"].tolist(), out) if not s])
        return out

    def _demographics(self, meta: pd.DataFrame, date: pd.Series) -> tuple[list[str], list[float | None]]:
        n = len(meta)
        if self.patients_file is None:
            return [""] * n, [None] * n
        df = read_table(self.patients_file, role="MIMIC-IV patients file")
        need = [c for c in ("subject_id", "gender", "anchor_age", "anchor_year") if c not in df.columns]
        if need:
            raise ManifestError(
                f"{self.patients_file}: required column(s) {', '.join(need)} not found; columns are: {', '.join(df.columns)}"
            )
        df = df.drop_duplicates("subject_id")
        df = df.set_index(df["subject_id"].str.strip())
        self._report.counts["patients_rows"] = len(df)
        joined = df.reindex(meta["subject_id"])
        missing = joined["gender"].isna().to_numpy()
        self._report.add("no_demographics", "images whose subject is not in the patients file (sex and age empty)",
                         meta.loc[missing, "subject_id"].drop_duplicates().tolist())
        sex = [_SEX.get(str(g).strip().upper(), "") if isinstance(g, str) else "" for g in joined["gender"].tolist()]
        anchor_age = pd.to_numeric(joined["anchor_age"], errors="coerce").to_numpy()
        anchor_year = pd.to_numeric(joined["anchor_year"], errors="coerce").to_numpy()
        year = (date.to_numpy() // 10000).astype(float)
        ages = anchor_age + (year - anchor_year)
        age = [None if not np.isfinite(a) or a < 0 else float(a) for a in ages]
        return sex, age
