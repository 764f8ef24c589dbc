"""Results stored under the store: atomic, replaceable, round-tripping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstore.errors import StoreError, UsageError
from cxrstore.schemas import validate
from cxrstore.store.results import list_results, load_result, save_result
from cxrstore.store.store import RowData, open_writer


def _store(path: Path) -> Path:
    with open_writer(path) as w:
        w.add_row(RowData(image_id="a"))
        w.commit()
    return path


def test_round_trip_and_replace(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    arr = np.arange(12, dtype=np.int64).reshape(4, 3)
    table = pd.DataFrame({"label": ["Edema", "Effusion"], "auroc": [0.81, 0.9]})
    res = save_result(store, "cluster", "m-k15", params={"k": 15, "seed": np.int64(0)}, summary={"ari": 0.93},
                      arrays={"knn": arr}, tables={"sizes": table}, files={"plot.png": b"\x89PNG"})
    assert res.params == {"k": 15, "seed": 0} and res.meta["store_generation"] == 1
    again = load_result(store, "cluster", "m-k15")
    np.testing.assert_array_equal(again.array("knn"), arr)
    pd.testing.assert_frame_equal(again.table("sizes"), table)
    assert again.file("plot.png").read_bytes() == b"\x89PNG"
    assert validate(json.loads((again.path / "result.json").read_text()), "result") == []
    save_result(store, "cluster", "m-k15", params={"k": 30})
    replaced = load_result(store, "cluster", "m-k15")
    assert replaced.params == {"k": 30} and not (replaced.path / "knn.npy").exists()
    assert list_results(store) == [("cluster", "m-k15", replaced.meta["created_at"])]
    assert not [p for p in (store / "results").iterdir() if p.name.startswith(".")]


def test_errors_name_what_is_missing(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    with pytest.raises(UsageError, match="no result cluster/x"):
        load_result(store, "cluster", "x")
    with pytest.raises(UsageError, match="invalid result name"):
        save_result(store, "cluster", "../escape", params={})
    with pytest.raises(StoreError, match="not a cxrstore store"):
        save_result(tmp_path / "nostore", "cluster", "x", params={})
    res = save_result(store, "cluster", "x", params={})
    with pytest.raises(UsageError, match="has no array 'knn'"):
        res.array("knn")
