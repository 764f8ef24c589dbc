"""The store format: commits, snapshots, rollback, locking, provenance, selections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from cxrstore.errors import ProvenanceError, StoreError, StoreFormatError, StoreLockedError, UsageError
from cxrstore.schemas import validate
from cxrstore.store import format as fmt
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "fake", "version": "1", "params": {"a": 1}, "weights_sha256": None},
        "native_shape": [8], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


def _rows(n: int, start: int = 0) -> list[RowData]:
    return [
        RowData(
            image_id=f"img{i:04d}",
            path=f"p/{i}.png",
            sha256=f"{i:064x}",
            dataset="toy",
            patient_id=f"pt{i // 3}",
            sex="F" if i % 2 else "M",
            age=float(20 + i % 50),
            labels={"Effusion": float(i % 2), "Edema": None if i % 5 == 0 else float(i % 3 == 0)},
        )
        for i in range(start, start + n)
    ]


def _vecs(rows: list[int], dim: int = 8) -> np.ndarray:
    r = np.asarray(rows, dtype=np.float32)[:, None]
    return np.hstack([r + j / 10 for j in range(dim)]).astype(np.float32)


def _make(path: Path, n: int = 50, *, chunk_rows: int | None = None, commit_every: int = 50) -> None:
    with open_writer(path) as w:
        w.ensure_model("m", PROV, dim=8, chunk_rows=chunk_rows)
        for batch_start in range(0, n, commit_every):
            rows = [w.add_row(r) for r in _rows(min(commit_every, n - batch_start), batch_start)]
            w.add_vectors("m", rows, _vecs(rows))
            w.commit()


def test_round_trip_metadata_labels_vectors(tmp_path: Path) -> None:
    _make(tmp_path / "s", 50)
    store = Store(tmp_path / "s")
    assert store.n_rows == 50 and store.models == ["m"]
    meta = store.metadata()
    assert meta["image_id"].tolist() == [f"img{i:04d}" for i in range(50)]
    assert meta.loc[7, "sex"] == "F" and meta.loc[8, "sex"] == "M"
    assert meta.loc[3, "age"] == pytest.approx(23.0)
    assert meta.loc[3, "Effusion"] == 1.0 and meta.loc[4, "Effusion"] == 0.0
    assert math.isnan(meta.loc[5, "Edema"]) and meta.loc[3, "Edema"] == 1.0
    vecs = store.select(model="m").vectors()
    np.testing.assert_array_equal(vecs, _vecs(list(range(50))))
    assert store.commit.models["m"].n_present == 50


def test_uncommitted_rows_are_invisible_and_discarded(tmp_path: Path) -> None:
    _make(tmp_path / "s", 20)
    with open_writer(tmp_path / "s") as w:
        rows = [w.add_row(r) for r in _rows(10, 20)]
        w.add_vectors("m", rows, _vecs(rows))
        reader = Store(tmp_path / "s")
        assert reader.n_rows == 20
        # leave without commit
    after = Store(tmp_path / "s")
    assert after.n_rows == 20
    assert len(after.select(model="m")) == 20


def test_reader_snapshot_until_refresh(tmp_path: Path) -> None:
    _make(tmp_path / "s", 20)
    reader = Store(tmp_path / "s")
    with open_writer(tmp_path / "s") as w:
        rows = [w.add_row(r) for r in _rows(5, 20)]
        w.add_vectors("m", rows, _vecs(rows))
        w.commit()
    assert reader.n_rows == 20
    assert len(reader.select(model="m").vectors()) == 20
    reader.refresh()
    assert reader.n_rows == 25


def test_crash_leftovers_are_rolled_back(tmp_path: Path) -> None:
    """Simulate a writer killed after writing chunks but before its commit record."""
    _make(tmp_path / "s", 20)
    with open_writer(tmp_path / "s") as w:
        w.ensure_model("m2", PROV, dim=8)
        w.add_vectors("m2", [0, 1], _vecs([0, 1]))
        w.commit()
    zdir = tmp_path / "s" / fmt.ZARR_DIR
    root = zarr.open_group(zdir, mode="r+")
    pres = root["models/m/present"]
    pres.resize((30,))
    pres[20:30] = np.full(10, 99, dtype=np.int32)  # stamps of an uncommitted generation
    root["models/m2/present"][10] = 99  # an uncommitted fill-in of an existing row
    root.require_group("models/half")  # a model created by a crashed writer
    (zdir / "rows" / "x.partial").write_bytes(b"junk")
    reader = Store(tmp_path / "s")
    assert not reader.present("m2")[10]  # stamp 99 > generation: invisible
    assert reader.present("m2").sum() == 2
    with open_writer(tmp_path / "s") as w:
        for name in ("m", "m2"):
            stamps = np.asarray(zarr.open_array(zdir / f"models/{name}/present", mode="r")[:])
            assert stamps.max() <= w.store.generation
    assert not (zdir / "models" / "half").exists()
    assert not (zdir / "rows" / "x.partial").exists()


def test_committed_vectors_are_never_overwritten(tmp_path: Path) -> None:
    _make(tmp_path / "s", 10)
    with open_writer(tmp_path / "s") as w:
        with pytest.raises(UsageError, match="never overwritten"):
            w.add_vectors("m", [4], _vecs([5]))


def test_second_writer_is_refused(tmp_path: Path) -> None:
    _make(tmp_path / "s", 5)
    with open_writer(tmp_path / "s"):
        with pytest.raises(StoreLockedError, match="another process is writing"):
            open_writer(tmp_path / "s")
    with open_writer(tmp_path / "s"):  # released after the first one closed
        pass


def test_duplicate_row_key_refused(tmp_path: Path) -> None:
    _make(tmp_path / "s", 5)
    with open_writer(tmp_path / "s") as w:
        with pytest.raises(UsageError, match="already exists"):
            w.add_row(_rows(1, 2)[0])
        w.add_row(RowData(image_id="img0002", variant="rot+45"))  # another variant is another row


def test_provenance_mismatch_names_the_difference(tmp_path: Path) -> None:
    _make(tmp_path / "s", 5)
    other = json.loads(json.dumps(PROV))
    other["encoder"]["params"]["a"] = 2
    other["created_at"] = "later"
    with open_writer(tmp_path / "s") as w:
        with pytest.raises(ProvenanceError, match=r"encoder\.params\.a"):
            w.ensure_model("m", other, dim=8)
        with pytest.raises(ProvenanceError, match="dim"):
            w.ensure_model("m", PROV, dim=9)
        w.ensure_model("m", {**PROV, "created_at": "later", "cxrstore_version": "9"}, dim=8)  # same config


def test_nan_vectors_refused(tmp_path: Path) -> None:
    with open_writer(tmp_path / "s") as w:
        w.ensure_model("m", PROV, dim=8)
        rows = [w.add_row(r) for r in _rows(2)]
        bad = _vecs(rows)
        bad[1, 3] = np.nan
        with pytest.raises(UsageError, match="NaN"):
            w.add_vectors("m", rows, bad)


def test_model_added_later_fills_existing_rows(tmp_path: Path) -> None:
    _make(tmp_path / "s", 40, chunk_rows=16)
    with open_writer(tmp_path / "s") as w:
        w.ensure_model("m2", {**PROV, "native_shape": [4]}, dim=4, dtype="float16", chunk_rows=16)
        w.add_vectors("m2", [3, 17, 18, 39], np.ones((4, 4), np.float32) * np.arange(4)[:, None])
        w.commit()
    store = Store(tmp_path / "s")
    sel = store.select(model="m2")
    assert sel.rows.tolist() == [3, 17, 18, 39]
    np.testing.assert_array_equal(sel.vectors()[:, 0], [0, 1, 2, 3])
    assert store.vectors_array("m2").dtype == np.float16
    assert len(store.select(model="m")) == 40


def test_iter_vectors_streams_chunk_by_chunk(tmp_path: Path) -> None:
    _make(tmp_path / "s", 200, chunk_rows=16, commit_every=64)
    store = Store(tmp_path / "s")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(200, size=77, replace=False))
    sel = store.select(model="m", rows=rows)
    batches = list(sel.iter_vectors(batch_rows=10))
    assert all(len(r) <= 10 for r, _ in batches)
    got_rows = np.concatenate([r for r, _ in batches])
    got = np.concatenate([v for _, v in batches])
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got, _vecs(rows.tolist()))


def test_where_filters(tmp_path: Path) -> None:
    _make(tmp_path / "s", 30)
    store = Store(tmp_path / "s")
    sel = store.select(where="sex == 'F' and age >= 40", model="m")
    meta = store.metadata()
    expected = meta.index[(meta["sex"] == "F") & (meta["age"] >= 40)].to_numpy()
    np.testing.assert_array_equal(sel.rows, expected)
    assert 0 < len(sel) < 30
    by_dict = store.select(where={"patient_id": ["pt1", "pt2"], "Effusion": 1.0})
    assert by_dict.rows.tolist() == [3, 5, 7]
    with pytest.raises(UsageError, match="unknown filter column"):
        store.select(where={"nope": 1})
    with pytest.raises(UsageError, match="bad filter"):
        store.select(where="no_such_column > 3")


def test_unknown_version_and_non_store_refused(tmp_path: Path) -> None:
    _make(tmp_path / "s", 3)
    root = zarr.open_group(tmp_path / "s" / fmt.ZARR_DIR, mode="r+")
    info = dict(root.attrs[fmt.ATTR_FORMAT])
    info["format_version"] = 99
    root.attrs[fmt.ATTR_FORMAT] = info
    with pytest.raises(StoreFormatError, match="version 99 is not supported"):
        Store(tmp_path / "s")
    with pytest.raises(StoreError, match="not a cxrstore store"):
        Store(tmp_path / "empty")


def test_root_attributes_match_schema(tmp_path: Path) -> None:
    _make(tmp_path / "s", 10)
    attrs = zarr.open_group(tmp_path / "s" / fmt.ZARR_DIR, mode="r").attrs.asdict()
    assert validate(attrs, "store-v1") == []
    assert validate(Store(tmp_path / "s").provenance("m") | {}, "model-provenance-v1") == []
    broken = json.loads(json.dumps(attrs))
    broken[fmt.ATTR_COMMIT]["n_rows"] = -1
    assert any("n_rows" in p for p in validate(broken, "store-v1"))


def test_vector_chunks_are_a_few_mib() -> None:
    assert fmt.vector_chunk_rows(24576, 4) == 32
    assert fmt.vector_chunk_rows(1024, 4) == 1024
    assert fmt.vector_chunk_rows(8, 4) == 8192


def test_groups_follow_patients_and_sources(tmp_path: Path) -> None:
    with open_writer(tmp_path / "s") as w:
        w.add_row(RowData(image_id="a", patient_id="p1"))
        w.add_row(RowData(image_id="b", patient_id=""))
        w.add_row(RowData(image_id="b", variant="rot+45", source_row=1, patient_id=""))
        w.add_row(RowData(image_id="c", patient_id="p1"))
        w.commit()
    groups = Store(tmp_path / "s").select().groups()
    assert groups.tolist() == ["p1", "row:1", "row:1", "p1"]
