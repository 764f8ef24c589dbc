"""Backward compatibility: the store-v1 fixture, written once by cxrstore 0.1.0, reads back.

Never regenerate the fixture: a later format gets a new fixture beside this one, and
this test stays.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from cxrstore.store.store import Store
from cxrstore.store.verify import verify
from tests.fixtures.make_store_v1 import expected_vectors

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store-v1"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_store_v1_fixture_reads_back_unchanged() -> None:
    before = _tree_digest(FIXTURE)
    store = Store(FIXTURE)
    assert store.format_info["format_version"] == 1
    assert store.n_rows == 6 and store.generation == 2
    assert store.models == ["toy-a", "toy-b"]
    meta = store.metadata()
    assert meta["image_id"].tolist() == ["img-0", "img-1", "img-2", "img-3", "img-4", "img-0"]
    assert meta["variant"].tolist()[-1] == "rot+45" and meta["source_row"].tolist()[-1] == 0
    assert meta["sex"].tolist()[:5] == ["F", "M", "F", "M", "F"]
    assert meta["age"].tolist()[:5] == [30.0, 31.0, 32.0, 33.0, 34.0] and math.isnan(meta["age"].iloc[5])
    assert meta["site"].tolist() == ["north"] * 3 + ["south"] * 2 + [""]
    assert meta["Effusion"].tolist()[:5] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert math.isnan(meta.loc[3, "Edema"]) and meta.loc[2, "Edema"] == 1.0
    a = store.select(model="toy-a")
    assert a.rows.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(a.vectors(), expected_vectors("toy-a", a.rows))
    assert store.provenance("toy-a")["native_shape"] == [2, 3]
    b = store.select(model="toy-b")
    assert b.rows.tolist() == [1, 4]
    assert store.vectors_array("toy-b").dtype == np.float16
    np.testing.assert_array_equal(b.vectors(), expected_vectors("toy-b", b.rows))
    fails = store.failures()
    assert fails["image_id"].tolist() == ["img-bad"] and fails["reason"].tolist() == ["file is empty (0 bytes)"]
    assert verify(store).ok
    assert _tree_digest(FIXTURE) == before, "reading the fixture must not change it"
