"""The PyTorch dataset: same vectors as a direct read, with 2 DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is optional (extras mii / dev)")

from torch.utils.data import DataLoader

from cxrstore.errors import UsageError
from cxrstore.export.fusion import fuse, l2_normalize
from cxrstore.export.torch_dataset import FusedVectorDataset
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "toy", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [12], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 rows, models `a` (12-d, chunks of 16 rows) and `b` (5-d, float16, chunks of 32), b missing on row % 7 == 3."""
    path = tmp_path_factory.mktemp("torchds") / "store"
    rng = np.random.default_rng(0)
    with open_writer(path) as w:
        w.ensure_model("a", PROV, dim=12, chunk_rows=16)
        w.ensure_model("b", {**PROV, "native_shape": [5]}, dim=5, dtype="float16", chunk_rows=32)
        rows = [w.add_row(RowData(image_id=f"i{i}", patient_id=f"p{i // 4}", sex="FM"[i % 2], age=float(i % 60),
                                  labels={"Effusion": float(i % 2), "Edema": None if i % 3 == 0 else 1.0})) for i in range(200)]
        w.add_vectors("a", rows, rng.standard_normal((200, 12)).astype(np.float32))
        some = [r for r in rows if r % 7 != 3]
        w.add_vectors("b", some, rng.standard_normal((len(some), 5)).astype(np.float16))
        w.commit()
    return path


def _direct(st: Store, rows: np.ndarray) -> np.ndarray:
    a = l2_normalize(st.select(rows=rows).vectors("a"))
    b = l2_normalize(st.select(rows=rows).vectors("b"))
    return np.hstack([a, b])


def test_two_workers_yield_the_direct_read(store: Path) -> None:
    st = Store(store)
    ds = FusedVectorDataset(fuse(store, ["a", "b"], where="sex == 'F'"), labels=True)
    assert len(ds.units) > 2  # several work units to share between the workers
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    rows, xs, labels = [], [], []
    for batch in loader:
        rows.append(batch["row"].numpy())
        xs.append(batch["x"].numpy())
        labels.append(batch["labels"].numpy())
    got_rows = np.concatenate(rows)
    order = np.argsort(got_rows)
    expected_rows = st.select(where="sex == 'F'", model="b").rows
    np.testing.assert_array_equal(got_rows[order], expected_rows)  # every row once, none twice
    np.testing.assert_allclose(np.concatenate(xs)[order], _direct(st, expected_rows), rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate(labels)[order], st.label_matrix(expected_rows))
    assert ds.label_names == list(st.labels) and ds.dim == 17


def test_batch_mode_shuffle_and_covariates(store: Path) -> None:
    st = Store(store)
    fusion = fuse(store, ["a", "b"])
    cov = pd.DataFrame({"lactate": np.arange(st.n_rows, dtype=float), "ventilated": np.arange(st.n_rows) % 2 == 0},
                       index=pd.Index(np.arange(st.n_rows)))
    cov = cov.drop(index=[1, 2])  # no clinical record for rows 1 and 2
    ds = FusedVectorDataset(fusion, covariates=cov, batch_size=10, shuffle=True, seed=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(ds) and all(b["x"].shape[0] <= 10 for b in batches)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    assert not np.all(np.diff(rows) > 0)  # shuffled
    order = np.argsort(rows)
    np.testing.assert_array_equal(rows[order], fusion.rows)
    np.testing.assert_allclose(torch.cat([b["x"] for b in batches]).numpy()[order], _direct(st, fusion.rows), rtol=1e-6)
    c = torch.cat([b["covariates"] for b in batches]).numpy()[order]
    assert ds.covariate_names == ["lactate", "ventilated"]
    lookup = dict(zip(fusion.rows.tolist(), c[:, 0].tolist()))
    assert np.isnan(lookup[1]) and np.isnan(lookup[2]) and lookup[4] == 4.0
    # the same seed and epoch give the same order; another epoch another
    again = torch.cat([b["row"] for b in DataLoader(ds, batch_size=None, num_workers=0)]).numpy()
    ds.set_epoch(1)
    other = torch.cat([b["row"] for b in DataLoader(ds, batch_size=None, num_workers=0)]).numpy()
    assert sorted(again) == sorted(rows) and not np.array_equal(again, other)


def test_from_store_with_clinical_covariates_and_pickling(store: Path, tmp_path: Path) -> None:
    clin = pd.DataFrame({"patient_id": [f"p{i}" for i in range(0, 50, 2)], "sofa": np.arange(25, dtype=float), "ward": "icu"})
    clin.to_csv(tmp_path / "clin.csv", index=False)
    ds = FusedVectorDataset.from_store(store, "a", clinical=tmp_path / "clin.csv", covariates=["sofa"])
    state = pickle.loads(pickle.dumps(ds))
    assert state.fusion._store is None  # the store is reopened lazily where it is used
    items = list(state)
    assert len(items) == len(ds) == 200 and items[0]["x"].shape == (12,)
    by_row = {int(it["row"]): float(it["covariates"][0]) for it in items}
    assert by_row[0] == 0.0 and by_row[8] == 1.0 and np.isnan(by_row[4])  # p1 has no record
    with pytest.raises(UsageError, match="covariates must be numeric"):
        FusedVectorDataset(fuse(store, "a"), covariates=clin.set_index(pd.Index(range(25))))
    with pytest.raises(UsageError, match="need a clinical table"):
        FusedVectorDataset.from_store(store, "a", covariates=["sofa"])
