"""NIH ChestX-ray14 adapter: fake trees with the real file names and conventions, and the real label file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.info import info as info_cmd
from cli.ingest import ingest as ingest_cmd
from cxrstore.datasets.base import DatasetReport, get_dataset
from cxrstore.datasets.labels import load_label_map, policy_id
from cxrstore.datasets.nih import NihCxr14, split_header
from cxrstore.errors import ManifestError, UsageError
from cxrstore.ingest import ingest_dataset
from cxrstore.store.store import Store

METADATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metadata"

HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
HEADER_2017 = HEADER_2020 + ","  # the 2017 file ends each line with a comma

# (image, findings, follow-up, patient, age, sex, view)
ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
    ("00000001_002.png", "Cardiomegaly|Effusion", 2, 1, 58, "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, 80, "M", "PA"),
    ("00000003_000.png", "Atelectasis|Effusion|Infiltration", 0, 3, 74, "F", "AP"),
    ("00000003_001.png", "Edema|Pneumonia", 1, 3, 75, "F", "AP"),
    ("00000003_002.png", "Consolidation", 2, 3, 75, "F", "AP"),
    ("00000004_000.png", "Atelectasis|Pleural_Thickening|Hernia", 0, 4, 414, "F", "PA"),  # an implausible age
    ("00000004_001.png", "Mass|Nodule|Bogus_Finding", 1, 4, 40, "F", "PA"),
    ("00000005_000.png", "Effusion", 0, 5, 33, "M", "PA"),  # listed, but no image file
]
EXPERT = {  # image -> (Fracture, Pneumothorax, Airspace opacity, Nodule or mass)
    "00000001_000.png": ("NO", "NO", "YES", "NO"),  # expert opacity where the findings say nothing
    "00000003_000.png": ("NO", "NO", "NO", "NO"),  # expert says no opacity although Infiltration is listed
    "00000004_001.png": ("YES", "NO", "NO", "YES"),
}
TEST_LIST = ["00000003_000.png", "00000003_001.png", "00000003_002.png"]


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)


def _write(path: Path, text: str, gz: bool) -> None:
    if gz:
        with gzip.open(path, "wt", newline="") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def make_nih_tree(root: Path, *, revision: str = "2020", expert: bool = True, splits: bool = True,
                  extra_image: bool = True, unknown_column: bool = False) -> Path:
    """A fake NIH tree: images/, the label file, the expert file, the split lists."""
    root.mkdir(parents=True, exist_ok=True)
    header = HEADER_2020 if revision == "2020" else HEADER_2017
    if unknown_column:
        header = header.rstrip(",") + ",Comment"
    lines = [header]
    for name, findings, fu, pid, age, sex, view in ROWS:
        line = f"{name},{findings},{fu},{pid},{age},{sex},{view},2500,2048,0.168,0.168"
        if unknown_column:
            line += ",hello"
        elif revision == "2017":
            line += ","
        lines.append(line)
    text = "\n".join(lines) + "\n"
    if revision == "2020":
        _write(root / "Data_Entry_2017_v2020.csv.gz", text, gz=True)
    else:
        _write(root / "Data_Entry_2017.csv", text, gz=False)
    for i, (name, *_rest) in enumerate(ROWS):
        if name != "00000005_000.png":
            _png(root / "images" / name, i)
    if extra_image:
        _png(root / "images" / "00000099_000.png", 99)  # an image with no label row
    if expert:
        head = HEADER_2020 + ",Fracture,Pneumothorax,Airspace opacity,Nodule or mass,Set Id"
        out = [head]
        for name, findings, fu, pid, age, sex, view in ROWS:
            if name in EXPERT:
                out.append(f"{name},{findings},{fu},{pid},{age},{sex},{view},2500,2048,0.168,0.168,{','.join(EXPERT[name])},test")
        _write(root / "google2019_nih-chest-xray-labels.csv.gz", "\n".join(out) + "\n", gz=True)
    if splits:
        names = [r[0] for r in ROWS]
        (root / "test_list.txt").write_text("\n".join(TEST_LIST) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in TEST_LIST) + "\n")
    return root


@pytest.fixture(scope="module")
def nih_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nih_tree(tmp_path_factory.mktemp("nih"))


@pytest.fixture(scope="module")
def real_metadata() -> Path:
    """../shared/data/metadata: the real NIH label files (absent on a user's machine)."""
    if not (METADATA / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip(f"{METADATA} is absent (the real NIH label files ship beside the repository for development only)")
    return METADATA


def _by_id(adapter: NihCxr14) -> dict:
    return {r.image_id: r for r in adapter.records()}


def test_header_with_commas_inside_brackets() -> None:
    names = split_header(HEADER_2020)
    assert names[7:] == ["OriginalImage[Width]", "OriginalImage[Height]", "OriginalImagePixelSpacing[x]",
                         "OriginalImagePixelSpacing[y]"]
    assert len(names) == 11
    names17 = split_header(HEADER_2017)
    assert len(names17) == 12 and names17[-1].startswith("_empty")


@pytest.mark.parametrize("revision", ["2020", "2017"])
def test_harmonised_labels_and_canonical_columns(tmp_path: Path, revision: str) -> None:
    root = make_nih_tree(tmp_path / "nih", revision=revision)
    adapter = NihCxr14(root)
    recs = _by_id(adapter)
    assert len(recs) == 9  # 10 label rows, one without image; the extra image has no label row
    r = recs["00000003_000.png"]
    assert (r.patient_id, r.study_id, r.view, r.sex, r.age, r.follow_up) == ("00000003", "00000003_000", "AP", "F", 74.0, 0)
    assert r.path == "images/00000003_000.png" and r.abs_path == root / "images" / "00000003_000.png"
    assert r.labels["Atelectasis"] == 1.0 and r.labels["Effusion"] == 1.0 and r.labels["Edema"] == 0.0
    assert r.labels["Infiltration"] == 1.0
    assert r.labels["Opacity"] == 0.0  # the expert label wins over the fallback (Infiltration listed)
    assert recs["00000001_000.png"].labels["Opacity"] == 1.0  # expert YES, no finding listed
    assert recs["00000003_001.png"].labels["Opacity"] == 1.0  # fallback: Pneumonia listed
    assert recs["00000003_002.png"].labels["Opacity"] == 1.0  # fallback: Consolidation listed
    assert recs["00000001_001.png"].labels["Opacity"] == 0.0  # fallback: none listed
    assert recs["00000003_001.png"].labels["Edema"] == 1.0
    assert recs["00000002_000.png"].labels["No Finding"] == 1.0 and recs["00000002_000.png"].labels["Effusion"] == 0.0
    assert recs["00000004_000.png"].labels["Pleural Thickening"] == 1.0 and recs["00000004_000.png"].age is None
    assert recs["00000004_001.png"].labels["Fracture"] == 1.0 and recs["00000004_001.png"].labels["Nodule or Mass (expert)"] == 1.0
    assert recs["00000001_001.png"].labels["Fracture"] is None  # no expert label, no fallback
    assert recs["00000001_001.png"].follow_up == 1
    assert recs["00000003_002.png"].extra["split"] == "test" and recs["00000001_000.png"].extra["split"] == "train_val"
    assert len({r.extra["label_policy"] for r in recs.values()}) == 1
    rep = adapter.report()
    assert rep.issue("labels_without_image").examples == ["00000005_000.png"]
    assert rep.issue("images_without_labels").examples == ["00000099_000.png"]
    assert rep.issue("unknown_findings").count == 1 and "Bogus_Finding" in rep.issue("unknown_findings").examples[0]
    assert rep.issue("implausible_age").count == 1
    assert rep.issue("unknown_columns") is None  # the 2017 trailing empty column is not "unknown"
    assert rep.counts["label_rows"] == 10 and rep.counts["records"] == 9


def test_opacity_fallback_is_switchable_and_recorded(nih_tree: Path) -> None:
    default = NihCxr14(nih_tree)
    off = NihCxr14(nih_tree, opacity_fallback="missing")
    a, b = _by_id(default), _by_id(off)
    assert a["00000003_001.png"].labels["Opacity"] == 1.0 and b["00000003_001.png"].labels["Opacity"] is None
    assert b["00000001_000.png"].labels["Opacity"] == 1.0  # the expert label stays
    assert b["00000003_000.png"].labels["Opacity"] == 0.0
    assert default.policies()["opacity_fallback"] == "any-infiltration-consolidation-pneumonia"
    assert off.policies()["opacity_fallback"] == "missing"
    assert default.policies()["label_policy_id"] != off.policies()["label_policy_id"]
    assert b["00000001_000.png"].extra["label_policy"] == off.policies()["label_policy_id"]
    with pytest.raises(UsageError, match="any-infiltration-consolidation-pneumonia"):
        NihCxr14(nih_tree, opacity_fallback="nope")
    # no expert file: every image takes the fallback, and the missing file is reported
    no_expert = NihCxr14(nih_tree, expert_labels=False)
    assert _by_id(no_expert)["00000001_000.png"].labels["Opacity"] == 0.0
    assert no_expert.policies()["expert_labels"] == []


def test_views_policy_and_reports(tmp_path: Path) -> None:
    root = make_nih_tree(tmp_path / "nih", expert=False, splits=False, unknown_column=True)
    only_pa = NihCxr14(root, views="PA")
    recs = _by_id(only_pa)
    assert all(r.view == "PA" for r in recs.values()) and len(recs) == 6
    rep = only_pa.report()
    assert rep.issue("view_excluded").count == 3 and "00000003_000.png" in rep.issue("view_excluded").examples
    kinds = {i.kind for i in rep.issues}
    assert {"missing_file", "unknown_columns", "labels_without_image", "images_without_labels"} <= kinds
    assert rep.issue("unknown_columns").examples == ["Comment"]
    assert rep.count("missing_file") == 3  # the expert file and both split lists
    assert all(r.extra["split"] == "" for r in recs.values())
    js = rep.to_json()
    assert json.loads(json.dumps(js)) == js and js["issues"][0]["count"] >= 1


def test_missing_and_malformed_label_files(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ManifestError, match="no NIH label file found"):
        NihCxr14(root)
    (root / "Data_Entry_2017.csv").write_text("Image Index,Patient ID\n00000001_000.png,1\n")
    with pytest.raises(ManifestError, match="Finding Labels"):
        NihCxr14(root, check_images=False)
    (root / "Data_Entry_2017.csv").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ManifestError, match="not a readable CSV|cannot be read"):
        NihCxr14(root, check_images=False)
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Effusion,extra,fields\n")
    with pytest.raises(ManifestError):
        NihCxr14(root, check_images=False)
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Effusion\n")
    with pytest.raises(ManifestError, match="no image folder"):
        NihCxr14(root)
    no_view = NihCxr14(root, check_images=False)
    assert len(no_view) == 0 and no_view.report().issue("view_excluded").examples == ["00000001_000.png"]
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,View Position\n00000001_000.png,Effusion,PA\n")
    assert len(NihCxr14(root, check_images=False)) == 1


def test_registered_and_ingested_with_policies_tied_to_rows(tmp_path: Path, nih_tree: Path) -> None:
    adapter = get_dataset("nih-cxr14", root=nih_tree)
    assert isinstance(adapter.report(), DatasetReport)
    store = tmp_path / "s"
    report = ingest_dataset(store, dataset="nih-cxr14", dataset_options={"root": nih_tree}, workers=0)
    assert report.added == 9 and report.failed == 0
    assert report.dataset_report is not None and report.dataset_report["counts"]["records"] == 9
    s = Store(store)
    meta = s.metadata()
    pid = adapter.policies()["label_policy_id"]
    assert (meta["label_policy"] == pid).all()
    run = s.runs[-1]
    assert run["policies"]["label_policy_id"] == pid and run["policies"]["opacity_fallback"].startswith("any-")
    assert run["dataset_report"]["issues"] and run["generations"][0] <= s.generation <= run["generations"][1]
    assert set(meta["generation"]) <= set(range(run["generations"][0], run["generations"][1] + 1))
    row = meta.set_index("image_id").loc["00000003_000.png"]
    assert row["Opacity"] == 0.0 and row["Atelectasis"] == 1.0 and row["follow_up"] == "0000" and row["split"] == "test"
    # a second model under another opacity policy: existing rows keep their labels, the conflict is reported
    again = ingest_dataset(store, dataset="nih-cxr14", dataset_options={"root": nih_tree, "opacity_fallback": "missing"},
                           model="second", workers=0)
    assert again.filled == 9 and again.label_policy_conflicts == 9
    s = Store(store)
    assert (s.metadata()["label_policy"] == pid).all()


def test_cli_dataset_options_and_info_shows_policies(tmp_path: Path, nih_tree: Path) -> None:
    runner = CliRunner()
    store = tmp_path / "s"
    res = runner.invoke(ingest_cmd, [str(store), "--dataset", "nih-cxr14", "--root", str(nih_tree), "--workers", "0",
                                     "--nih-opacity-fallback", "missing", "--views", "PA", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["added"] == 6 and out["dataset_report"]["dataset"] == "nih-cxr14"
    res = runner.invoke(info_cmd, [str(store), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (pol,) = data["label_policies"]
    assert pol["rows"] == 6 and pol["policies"]["opacity_fallback"] == "missing" and pol["policies"]["views"] == ["PA"]
    assert pol["label_policy"] == policy_id({k: v for k, v in pol["policies"].items()
                                             if k in NihCxr14(nih_tree, opacity_fallback="missing", views="PA").label_policy()})
    res = runner.invoke(info_cmd, [str(store)])
    assert "label policy lp-" in res.output and "opacity_fallback" in res.output and "missing" in res.output
    res = runner.invoke(ingest_cmd, [str(store), "--dataset", "nih-cxr14", "--root", str(nih_tree), "--workers", "0"])
    assert res.exit_code == 0 and "images_without_labels" in res.output and "00000099_000.png" in res.output
    res = runner.invoke(ingest_cmd, [str(store), "--dataset", "nih-cxr14", "--root", str(nih_tree), "--uncertain", "positive"])
    assert res.exit_code == 2 and "--uncertain applies to --dataset mimic-cxr-jpg" in res.output
    res = runner.invoke(ingest_cmd, [str(store), "--dataset", "nih-cxr14"])
    assert res.exit_code == 2 and "--root is required" in res.output


def test_custom_label_map(tmp_path: Path, nih_tree: Path) -> None:
    doc = json.loads(json.dumps(load_label_map().doc))
    doc["labels"] = [e for e in doc["labels"] if e["name"] in ("Effusion", "Opacity")]
    doc["labels"][0]["sources"]["nih-cxr14"]["finding"] = "Cardiomegaly"  # a deliberately odd mapping
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    recs = _by_id(NihCxr14(nih_tree, label_map=path))
    assert set(recs["00000001_000.png"].labels) == {"Effusion", "Opacity"}
    assert recs["00000001_000.png"].labels["Effusion"] == 1.0
    doc["labels"][0]["sources"]["nih-cxr14"]["rule"] = "bogus"
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="labels.schema.json"):
        NihCxr14(nih_tree, label_map=path)


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_label_file_counts(real_metadata: Path) -> None:
    """All 112,120 rows of the real file through the adapter; positives counted independently."""
    adapter = NihCxr14(real_metadata, label_file=real_metadata / "Data_Entry_2017_v2020.csv.gz",
                       expert_labels=real_metadata / "google2019_nih-chest-xray-labels.csv.gz", check_images=False)
    recs = list(adapter.records())
    assert len(recs) == 112_120
    with gzip.open(real_metadata / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        lines = fh.read().splitlines()[1:]
    expected = {"Atelectasis": 0, "Edema": 0, "Effusion": 0}
    for line in lines:
        findings = line.split(",")[1].split("|")
        for name in expected:
            expected[name] += name in findings
    got = {name: sum(r.labels[name] == 1.0 for r in recs) for name in expected}
    assert got == expected
    assert expected["Effusion"] > 10_000  # the file's own counts, not an empty match
    # Opacity: the expert label where present
    with gzip.open(real_metadata / "google2019_nih-chest-xray-labels.csv.gz", "rt") as fh:
        head, *rows = fh.read().splitlines()
    col = head.split(",").index("Airspace opacity")  # a plain split: bracketed names span two fields, like the data
    expert = {r.split(",")[0]: r.split(",")[col] for r in rows}
    by_id = {r.image_id: r for r in recs}
    for image_id, value in list(expert.items())[:500]:
        assert by_id[image_id].labels["Opacity"] == (1.0 if value == "YES" else 0.0)
    assert sum(v == "YES" for v in expert.values()) > 1000
