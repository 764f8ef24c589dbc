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


class _GatedEncoder:
    """Wraps the baseline encoder; ``forward`` of batch ``b`` waits (up to ``wait`` s) until
    the main thread has prepared an image of batch ``b + 1``: only a pipelined ingest,
    which gathers the next batch while the model computes, can let that happen."""

    name = "baseline"

    def __init__(self, batch_size: int, n_images: int, wait: float) -> None:
        self.inner = get_encoder("baseline")
        self.config, self.dim, self.native_shape = self.inner.config, self.inner.dim, self.inner.native_shape
        self.batch_size, self.n_images, self.wait = batch_size, n_images, wait
        self.prepared = 0
        self.calls = 0
        self.overlapped: list[bool] = []
        self.threads: set[str] = set()
        import threading

        self._cond = threading.Condition()
        self._threading = threading

    def preparer(self):
        prep = self.inner.preparer()

        def counted(image: np.ndarray) -> np.ndarray:
            with self._cond:
                self.prepared += 1
                self._cond.notify_all()
            return prep(image)

        return counted

    def forward(self, batch):
        self.threads.add(self._threading.current_thread().name)
        b = self.calls
        self.calls += 1
        target = (b + 1) * self.batch_size + 1
        if target <= self.n_images:
            with self._cond:
                self.overlapped.append(self._cond.wait_for(lambda: self.prepared >= target, timeout=self.wait))
        return self.inner.forward(batch)


def test_forward_runs_beside_decoding_and_stores_the_same_rows(tmp_path: Path, small_demo: Path) -> None:
    n = len(pd.read_csv(small_demo / "manifest.csv"))
    adapter = CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo")
    piped = _GatedEncoder(4, n, wait=30.0)
    ingest(tmp_path / "p", adapter.records(), encoder=piped, batch_size=4, workers=0, commit_every=6)
    assert piped.overlapped and all(piped.overlapped)  # the next batch was gathered while forward ran
    assert piped.threads == {"cxrstore-forward_0"}
    serial = _GatedEncoder(4, n, wait=0.05)
    ingest(tmp_path / "s", adapter.records(), encoder=serial, batch_size=4, workers=0, commit_every=6, forward_depth=0)
    assert serial.overlapped and not any(serial.overlapped)  # in turn: nothing gathered while forward ran
    p, s = Store(tmp_path / "p"), Store(tmp_path / "s")
    assert p.metadata()["image_id"].tolist() == s.metadata()["image_id"].tolist()
    np.testing.assert_array_equal(p.select(model="baseline").vectors(), s.select(model="baseline").vectors())
    assert verify(p).ok


def test_forward_errors_surface_and_nothing_half_written_is_visible(tmp_path: Path, small_demo: Path) -> None:
    class Failing(_GatedEncoder):
        def forward(self, batch):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("model crashed")
            return self.inner.forward(batch)

    adapter = CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo")
    with pytest.raises(RuntimeError, match="model crashed"):
        ingest(tmp_path / "f", adapter.records(), encoder=Failing(4, 0, 0.0), batch_size=4, workers=0, commit_every=4)
    store = Store(tmp_path / "f")
    assert store.n_rows % 4 == 0 and store.n_rows <= 8  # only whole committed batches before the crash
    assert verify(store).ok
    resumed = _ingest(tmp_path / "f", small_demo)
    assert resumed.skipped == store.n_rows and verify(Store(tmp_path / "f")).ok
