"""Ingest: end to end, resumable, idempotent, bad input recorded and skipped."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import ManifestError, ProvenanceError
from cxrstore.ingest import ingest
from cxrstore.schemas import validate
from cxrstore.store.store import Store
from cxrstore.store.verify import verify


def _ingest(store: Path, root: Path, manifest: Path | None = None, **kw):
    adapter = CsvManifest(manifest or root / "manifest.csv", root=root, dataset_name="demo")
    kw.setdefault("workers", 0)
    return ingest(store, adapter.records(), encoder=get_encoder("baseline"), **kw)


def test_ingest_demo_end_to_end(tmp_path: Path, small_demo: Path) -> None:
    manifest = pd.read_csv(small_demo / "manifest.csv", dtype=str, keep_default_na=False)
    report = _ingest(tmp_path / "s", small_demo)
    assert report.added == len(manifest) and report.failed == 0 and report.skipped == 0
    assert validate(report.to_json(), "ingest-report") == []
    store = Store(tmp_path / "s")
    meta = store.metadata()
    assert meta["image_id"].tolist() == manifest["image_id"].tolist()
    assert meta["patient_id"].tolist() == manifest["patient_id"].tolist()
    assert set(store.labels) == {"Atelectasis", "Edema", "Effusion", "Opacity"}
    expected = manifest["Effusion"].replace("", np.nan).astype(float).to_numpy()
    np.testing.assert_array_equal(meta["Effusion"].to_numpy(), expected)
    assert (meta["dataset"] == "demo").all()
    assert meta["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    prov = store.provenance("baseline")
    assert prov["encoder"]["encoder"] == "baseline" and prov["preprocess"]["max_side"] == 1024
    assert validate(prov, "model-provenance-v1") == []
    vecs = store.select(model="baseline").vectors()
    assert vecs.shape == (len(manifest), get_encoder("baseline").dim) and np.isfinite(vecs).all()
    assert verify(store).ok


def test_rerun_skips_everything_and_workers_give_same_vectors(tmp_path: Path, small_demo: Path) -> None:
    first = _ingest(tmp_path / "a", small_demo, commit_every=7)
    again = _ingest(tmp_path / "a", small_demo)
    assert again.added == 0 and again.skipped == first.added and again.failed == 0
    assert Store(tmp_path / "a").n_rows == first.added
    _ingest(tmp_path / "b", small_demo, workers=2, batch_size=5)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    np.testing.assert_array_equal(a.select(model="baseline").vectors(), b.select(model="baseline").vectors())
    assert a.metadata()["image_id"].tolist() == b.metadata()["image_id"].tolist()


def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path: Path, small_demo: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(small_demo, root)
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    good = len(rows)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    png = next((root / "images").rglob("*.png")).read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    outside = tmp_path / "outside.png"
    outside.write_bytes(png)
    (root / "link.png").symlink_to(outside)
    template = dict(rows[0])
    for name, path in [("empty", "empty.png"), ("text", "text.png"), ("trunc", "truncated.png"), ("missing", "nope.png"),
                       ("dotdot", "../outside.png"), ("abs", str(outside)), ("link", "link.png")]:
        rows.append({**template, "image_id": f"bad-{name}", "path": path})
    rows.append({**template, "image_id": "bad-label", "Effusion": "maybe"})
    rows.append(dict(rows[1]))  # a duplicated image id
    with open(root / "bad.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(template))
        writer.writeheader()
        writer.writerows(rows)
    report = _ingest(tmp_path / "s", root, root / "bad.csv")
    assert report.added == good and report.failed == 9
    reasons = {f["image_id"]: f["reason"] for f in report.failures}
    assert "empty" in reasons["bad-empty"].lower()
    assert "not an image" in reasons["bad-text"]
    assert "truncated" in reasons["bad-trunc"]
    assert "not found" in reasons["bad-missing"]
    assert "outside the root" in reasons["bad-dotdot"] and "outside the root" in reasons["bad-link"]
    assert "absolute path" in reasons["bad-abs"]
    assert "'maybe'" in reasons["bad-label"]
    assert any("duplicate" in f["reason"] for f in report.failures)
    store = Store(tmp_path / "s")
    assert store.n_rows == good
    fails = store.failures()
    assert len(fails) == 9 and set(fails["model"]) == {"baseline"}
    assert not any(i.startswith("bad-") for i in store.column("image_id"))


def test_second_encoder_config_refused_and_new_model_fills_rows(tmp_path: Path, small_demo: Path) -> None:
    _ingest(tmp_path / "s", small_demo)
    adapter = CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo")
    with pytest.raises(ProvenanceError, match="work_size"):
        ingest(tmp_path / "s", adapter.records(), encoder=get_encoder("baseline", work_size=128), workers=0)
    report = ingest(tmp_path / "s", adapter.records(), encoder=get_encoder("baseline", work_size=128), model="baseline128", workers=0)
    store = Store(tmp_path / "s")
    assert report.added == 0 and report.filled == store.n_rows
    assert store.select(model="baseline128").rows.tolist() == list(range(store.n_rows))


def test_changed_file_under_same_id_is_refused(tmp_path: Path, small_demo: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(small_demo, root)
    _ingest(tmp_path / "s", root)
    first = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False).iloc[0]
    target = root / first["path"]
    other = sorted((root / "images").rglob("*.png"))[-1]
    target.write_bytes(other.read_bytes())
    adapter = CsvManifest(root / "manifest.csv", root=root)
    report = ingest(tmp_path / "s", adapter.records(), encoder=get_encoder("baseline", work_size=128), model="b128", workers=0)
    assert report.failed == 1 and "sha256 differs" in report.failures[0]["reason"]


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,file\na,b.png\n")
    with pytest.raises(ManifestError, match="required column.*image_id, path.*--id-column"):
        CsvManifest(tmp_path / "m.csv", root=tmp_path)
    adapter = CsvManifest(tmp_path / "m.csv", root=tmp_path, id_column="id", path_column="file")
    assert [r.image_id for r in adapter.records()] == ["a"]
    with pytest.raises(ManifestError, match="not found"):
        CsvManifest(tmp_path / "none.csv", root=tmp_path)
    (tmp_path / "l.csv").write_text("image_id,path,A,B,site\nx,x.png,1,,north\n")
    adapter = CsvManifest(tmp_path / "l.csv", root=tmp_path, labels=["A", "B"])
    rec = next(adapter.records())
    assert rec.labels == {"A": 1.0, "B": None} and rec.extra == {"site": "north"}
