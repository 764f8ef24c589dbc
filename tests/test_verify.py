"""verify: a sound store passes; one flipped byte is found and named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from cxrstore.store import format as fmt
from cxrstore.store.store import RowData, open_writer
from cxrstore.store.verify import verify

PROV = {"encoder": {"encoder": "fake", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [16], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


def _store(path: Path) -> None:
    rng = np.random.default_rng(0)
    with open_writer(path) as w:
        w.ensure_model("m", PROV, dim=16, chunk_rows=16)
        rows = [w.add_row(RowData(image_id=f"i{i}", patient_id=f"p{i}", labels={"A": float(i % 2)})) for i in range(100)]
        w.add_vectors("m", rows, rng.normal(size=(100, 16)).astype(np.float32))
        w.commit()


def test_sound_store_passes(tmp_path: Path) -> None:
    _store(tmp_path / "s")
    report = verify(str(tmp_path / "s"))
    assert report.ok, report.problems
    assert report.chunks_checked >= 7  # 100 rows / 16 per vector chunk, plus metadata


def test_one_flipped_byte_in_a_vector_chunk_is_named(tmp_path: Path) -> None:
    _store(tmp_path / "s")
    chunk = tmp_path / "s" / fmt.ZARR_DIR / "models" / "m" / "vectors" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    report = verify(str(tmp_path / "s"))
    assert not report.ok
    assert len(report.problems) == 1
    assert "models/m/vectors" in report.problems[0] and "(3, 0)" in report.problems[0]


def test_count_mismatch_is_found(tmp_path: Path) -> None:
    _store(tmp_path / "s")
    zarr.open_array(tmp_path / "s" / fmt.ZARR_DIR / "models/m/present", mode="r+")[5] = 0
    report = verify(str(tmp_path / "s"))
    assert any("99 present rows, the commit record says 100" in p for p in report.problems)
