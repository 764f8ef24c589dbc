"""MIMIC-CXR-JPG adapter: a fake tree with the real file names, columns and value conventions."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.info import info as info_cmd
from cli.ingest import ingest as ingest_cmd
from cxrstore.datasets.base import get_dataset
from cxrstore.datasets.labels import NOT_MENTIONED, UNCERTAIN
from cxrstore.datasets.mimic import LABEL_COLUMNS, MimicCxrJpg, image_path
from cxrstore.errors import ManifestError, UsageError
from cxrstore.ingest import ingest_dataset
from cxrstore.store.store import Store

META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
               "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
               "PatientOrientationCodeSequence_CodeMeaning")

# (dicom_id, subject, study, view, StudyDate, StudyTime)
IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "21800506", "213014.531"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "21800506", "213014.531"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "21800626", "165500.312"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000032", "53911762", "AP", "21800723", "080438.000"),
    ("fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818", "10000764", "57375967", "AP", "21321015", "073428.000"),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "10000764", "57375967", "", "21321015", "073428.000"),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10000898", "50771383", "PA", "21321015", "073428.000"),  # no label row
    ("8959e402-2175d68d-edba5a6c-520a4a3b-5b7ea2a9", "10000935", "51178377", "PA", "21871201", "120000.000"),  # no file
]
# chexpert rows: study -> 14 values in LABEL_COLUMNS order ("" = not mentioned)
CHEXPERT = {
    "50414267": ["", "", "", "", "", "", "", "", "1.0", "", "", "", "", ""],
    "53189527": ["1.0", "", "", "-1.0", "", "", "", "1.0", "", "0.0", "", "-1.0", "", "1.0"],
    "53911762": ["-1.0", "0.0", "", "1.0", "", "", "", "", "", "1.0", "", "", "0.0", ""],
    "57375967": ["0.0", "1.0", "", "", "", "", "", "-1.0", "", "-1.0", "", "", "", "1.0"],
    "59999999": ["1.0", "", "", "", "", "", "", "", "", "", "", "", "", ""],  # a study with no image
}
NEGBIO = {**CHEXPERT, "53189527": ["0.0", "", "", "1.0", "", "", "", "1.0", "", "1.0", "", "", "", "1.0"]}
HARMONISED = {"Atelectasis": "Atelectasis", "Edema": "Edema", "Effusion": "Pleural Effusion", "Opacity": "Lung Opacity"}


def _gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", newline="") as fh:
        fh.write("\n".join(lines) + "\n")


def _label_lines(rows: dict[str, list[str]], extra_column: bool = False) -> list[str]:
    subject = {s: sub for _, sub, s, *_ in IMAGES}
    head = "subject_id,study_id," + ",".join(LABEL_COLUMNS) + (",Mystery" if extra_column else "")
    return [head] + [f"{subject.get(s, '19999999')},{s}," + ",".join(v) + (",x" if extra_column else "") for s, v in rows.items()]


def make_mimic_tree(root: Path, *, split: bool = True, patients: bool = True, extra_column: bool = False,
                    bad_value: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = [META_HEADER] + [f"{d},{sub},{st},CHEST (PA AND LAT),{v},3056,2544,{date},{time},CHEST (PA AND LAT),"
                            f"postero-anterior,Erect" for d, sub, st, v, date, time in IMAGES]
    _gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    chex = {k: list(v) for k, v in CHEXPERT.items()}
    if bad_value:
        chex["53911762"][LABEL_COLUMNS.index("Edema")] = "2.0"
    _gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", _label_lines(chex, extra_column))
    _gz(root / "mimic-cxr-2.0.0-negbio.csv.gz", _label_lines(NEGBIO))
    if split:
        _gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id,study_id,subject_id,split"] +
            [f"{d},{st},{sub},{'test' if sub == '10000764' else 'train'}" for d, sub, st, *_ in IMAGES[:-2]])
    if patients:
        _gz(root / "patients.csv.gz", ["subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
                                       "10000032,F,52,2180,2014 - 2016,2180-09-09", "10000764,M,86,2132,2014 - 2016,"])
    rng = np.random.default_rng(0)
    for d, sub, st, *_ in IMAGES[:-1]:
        p = root / image_path(sub, st, d)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(p, format="JPEG")
    stray = root / image_path("10000032", "50414267", "00000000-stray")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(stray, format="JPEG")  # no metadata row
    return root


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mimic_tree(tmp_path_factory.mktemp("mimic"))


def _expected(raw: str, uncertain: str, not_mentioned: str) -> float | None:
    if raw in ("1.0",):
        return 1.0
    if raw == "0.0":
        return 0.0
    if raw == "-1.0":
        return {"exclude": None, "positive": 1.0, "negative": 0.0}[uncertain]
    return {"negative": 0.0, "missing": None}[not_mentioned]


@pytest.mark.parametrize(("labeller", "uncertain", "not_mentioned"),
                         list(itertools.product(["chexpert", "negbio"], UNCERTAIN, NOT_MENTIONED)))
def test_harmonised_labels_under_every_policy(mimic_tree: Path, labeller: str, uncertain: str, not_mentioned: str) -> None:
    adapter = MimicCxrJpg(mimic_tree, labeller=labeller, uncertain=uncertain, not_mentioned=not_mentioned)
    source = CHEXPERT if labeller == "chexpert" else NEGBIO
    recs = list(adapter.records())
    assert len(recs) == 5  # PA/AP images with a file: the lateral, the no-view and the missing file are not records
    checked = 0
    for rec in recs:
        if rec.study_id not in source:
            assert all(v is None for v in rec.labels.values())
            continue
        row = dict(zip(LABEL_COLUMNS, source[rec.study_id]))
        for harmonised, column in HARMONISED.items():
            assert rec.labels[harmonised] == _expected(row[column], uncertain, not_mentioned), (rec.study_id, harmonised)
            checked += 1
        assert rec.labels["Support Devices"] == _expected(row["Support Devices"], uncertain, not_mentioned)
    assert checked == 16
    pol = adapter.policies()
    assert (pol["labeller"], pol["uncertain"], pol["not_mentioned"], pol["views"]) == (labeller, uncertain, not_mentioned, ["PA", "AP"])
    assert pol["label_file"] == f"mimic-cxr-2.0.0-{labeller}.csv.gz"
    assert {r.extra["label_policy"] for r in recs} == {pol["label_policy_id"]}


def test_canonical_columns_follow_up_split_demographics(mimic_tree: Path) -> None:
    recs = {r.image_id: r for r in MimicCxrJpg(mimic_tree).records()}
    first = recs["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert first.path == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert first.abs_path.is_file()
    assert (first.patient_id, first.study_id, first.view, first.sex, first.age) == ("10000032", "50414267", "PA", "F", 52.0)
    assert first.follow_up == 0 and first.extra["split"] == "train"
    assert recs["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"].follow_up == 1
    assert recs["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"].follow_up == 2
    other = recs["fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818"]
    assert (other.sex, other.age, other.follow_up, other.extra["split"]) == ("M", 86.0, 0, "test")
    assert first.labels["No Finding"] == 1.0 and first.labels["Atelectasis"] == 0.0  # not mentioned -> negative


def test_every_dropped_or_odd_row_is_reported(tmp_path: Path) -> None:
    root = make_mimic_tree(tmp_path / "m", split=False, patients=False, extra_column=True, bad_value=True)
    adapter = MimicCxrJpg(root)
    rep = adapter.report()
    assert rep.issue("labels_without_image").examples == ["59999999"]
    assert rep.issue("images_without_labels").count == 1 and "096052b7" in rep.issue("images_without_labels").examples[0]
    assert rep.issue("metadata_without_file").count == 1 and "8959e402" in rep.issue("metadata_without_file").examples[0]
    assert rep.issue("files_without_metadata").examples == [image_path("10000032", "50414267", "00000000-stray")]
    assert rep.issue("unknown_columns").examples == ["Mystery"]
    assert rep.issue("bad_value").count == 1 and "2.0" in rep.issue("bad_value").examples[0]
    views = {i.message: i.count for i in rep.issues if i.kind == "view_excluded"}
    assert sum(views.values()) == 2 and any("LATERAL" in m for m in views) and any("(none)" in m for m in views)
    assert rep.count("missing_file") == 2  # split and patients files
    recs = {r.image_id: r for r in adapter.records()}
    assert recs["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"].labels["Edema"] is None  # the bad value
    assert all(r.sex == "" and r.age is None and r.extra["split"] == "" for r in recs.values())
    wide = MimicCxrJpg(root, views="PA,AP,LATERAL")
    assert len(wide) == len(adapter) + 1 and wide.policies()["views"] == ["PA", "AP", "LATERAL"]
    assert len(MimicCxrJpg(root, check_images=False)) == len(adapter) + 1  # the row without file is yielded
    for line in json.dumps(rep.to_json()).splitlines():
        assert line


def test_missing_and_malformed_files_and_bad_options(tmp_path: Path, mimic_tree: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    with pytest.raises(ManifestError, match="metadata file not found"):
        MimicCxrJpg(root)
    _gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", [META_HEADER])
    with pytest.raises(ManifestError, match="chexpert label file not found"):
        MimicCxrJpg(root)
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ManifestError, match="label file"):
        MimicCxrJpg(root, check_images=False)
    _gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["study,Atelectasis", "1,1.0"])
    with pytest.raises(ManifestError, match="subject_id, study_id not found"):
        MimicCxrJpg(root, check_images=False)
    with pytest.raises(UsageError, match="exclude, positive, negative"):
        MimicCxrJpg(mimic_tree, uncertain="maybe")
    with pytest.raises(UsageError, match="chexpert, negbio"):
        MimicCxrJpg(mimic_tree, labeller="radiologist")


def test_ingest_and_cli_with_policies(tmp_path: Path, mimic_tree: Path) -> None:
    assert isinstance(get_dataset("mimic-cxr-jpg", root=mimic_tree), MimicCxrJpg)
    store = tmp_path / "s"
    rep = ingest_dataset(store, dataset="mimic-cxr-jpg", dataset_options={"root": mimic_tree, "uncertain": "positive"},
                         workers=0)
    assert rep.added == 5 and rep.failed == 0
    meta = Store(store).metadata().set_index("image_id")
    row = meta.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"]
    assert row["Edema"] == 1.0 and row["Atelectasis"] == 1.0 and row["Effusion"] == 0.0 and row["follow_up"] == "0001"
    # the CLI, with another policy, into another store; info shows both policies' fields
    runner = CliRunner()
    s2 = tmp_path / "s2"
    res = runner.invoke(ingest_cmd, [str(s2), "--dataset", "mimic-cxr-jpg", "--root", str(mimic_tree), "--labeller", "negbio",
                                     "--uncertain", "negative", "--not-mentioned", "missing", "--views", "PA,AP",
                                     "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(info_cmd, [str(s2), "--json"])
    (pol,) = json.loads(res.output)["label_policies"]
    assert pol["rows"] == 5 and pol["policies"]["labeller"] == "negbio" and pol["policies"]["not_mentioned"] == "missing"
    meta2 = Store(s2).metadata().set_index("image_id")
    assert meta2.loc["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "Atelectasis"] == 0.0  # negbio's value
    assert np.isnan(meta2.loc["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "Atelectasis"])  # not mentioned -> missing
    res = runner.invoke(info_cmd, [str(s2)])
    assert "labeller" in res.output and "negbio" in res.output and "not_mentioned" in res.output
    res = runner.invoke(ingest_cmd, [str(s2), "--dataset", "mimic-cxr-jpg", "--root", str(mimic_tree), "--uncertain", "maybe"])
    assert res.exit_code == 2 and "maybe" in res.output
    res = runner.invoke(ingest_cmd, [str(s2), "--dataset", "mimic-cxr-jpg", "--root", str(mimic_tree),
                                     "--nih-opacity-fallback", "missing"])
    assert res.exit_code == 2 and "applies to --dataset nih-cxr14" in res.output


def test_label_map_covers_every_label_of_each_dataset(tmp_path: Path) -> None:
    from cxrstore.datasets.labels import STUDY_LABELS, load_label_map
    from cxrstore.datasets.nih import FINDINGS, NO_FINDING
    from cxrstore.schemas import validate

    lm = load_label_map()
    assert validate(dict(lm.doc), "labels") == []
    mimic = {r["column"] for _, r in lm.for_dataset("mimic-cxr-jpg")}
    assert mimic == set(LABEL_COLUMNS)
    nih = lm.for_dataset("nih-cxr14")
    findings = {r["finding"] for _, r in nih if r["rule"] == "finding"}
    expert = {r["column"] for _, r in nih if r["rule"] == "expert"}
    assert findings == {*FINDINGS, NO_FINDING}
    assert expert == {"Airspace opacity", "Fracture", "Pneumothorax", "Nodule or mass"}
    for name in STUDY_LABELS:
        entry = next(e for e in lm.doc["labels"] if e["name"] == name)
        assert set(entry["sources"]) == {"mimic-cxr-jpg", "nih-cxr14"} and entry.get("study") is True
    opacity = dict(lm.for_dataset("nih-cxr14"))["Opacity"]
    assert opacity["fallbacks"][opacity["default_fallback"]]["findings"] == ["Infiltration", "Consolidation", "Pneumonia"]
    bad = json.loads(json.dumps(lm.doc))
    bad["labels"].append(dict(bad["labels"][0]))
    assert validate(bad, "labels") == []  # the schema allows it; the loader refuses the duplicate
    (tmp_path / "m.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="more than once"):
        load_label_map(tmp_path / "m.json")
