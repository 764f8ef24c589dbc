"""Views of matrix embeddings: flat or token-mean, read from one stored array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrstore.errors import UsageError
from cxrstore.importers import import_vectors
from cxrstore.store.store import Store
from cxrstore.store.views import apply_view, model_view_dim, native_shape, view_dim

N = 37


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("views")
    mp = pytest.MonkeyPatch()
    mp.setenv("CXRSTORE_CACHE", str(root / "cache"))
    ids = [f"im{i:03d}" for i in range(N)]
    (root / "m.csv").write_text("image_id,path\n" + "".join(f"{i},{i}.png\n" for i in ids))
    rng = np.random.default_rng(0)
    mats = rng.standard_normal((N, 32, 24)).astype(np.float32)
    flat = rng.standard_normal((N, 64)).astype(np.float32)
    np.savez(root / "mat.npz", **{i: m for i, m in zip(ids, mats)})
    np.savez(root / "flat.npz", **{i: v for i, v in zip(ids, flat)})
    import_vectors(root / "s", root / "mat.npz", model="tokens", manifest=root / "m.csv")
    import_vectors(root / "s", root / "flat.npz", model="flat", dim=64, manifest=root / "m.csv", dtype="float16")
    mp.undo()
    return root / "s", mats, flat


def test_mean_view_streams_token_means(store: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, mats, _ = store
    st = Store(path)
    sel = st.select(model="tokens")
    assert native_shape(st, "tokens") == (32, 24) and model_view_dim(st, "tokens", "mean") == 24
    flat = sel.vectors()
    assert flat.shape == (N, 32 * 24)
    np.testing.assert_array_equal(flat, mats.reshape(N, -1))
    mean = sel.vectors(view="mean")
    assert mean.shape == (N, 24) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, mats.mean(axis=1), rtol=1e-6, atol=1e-6)
    rows, parts = [], []
    for r, v in sel.iter_vectors(batch_rows=5, view="mean"):
        assert v.shape == (len(r), 24) and len(r) <= 5
        rows.append(r)
        parts.append(v)
    np.testing.assert_array_equal(np.concatenate(rows), sel.rows)
    np.testing.assert_array_equal(np.concatenate(parts), mean)
    sub = st.select(model="tokens", rows=[3, 10, 11])
    np.testing.assert_allclose(sub.vectors(view="mean"), mats[[3, 10, 11]].mean(axis=1), rtol=1e-6, atol=1e-6)
    m64 = sel.vectors(view="mean", dtype="float64")
    assert m64.dtype == np.float64
    np.testing.assert_allclose(m64, mats.astype(np.float64).mean(axis=1), rtol=1e-6, atol=1e-6)


def test_mean_refused_for_one_axis_models(store: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, flat = store
    sel = Store(path).select(model="flat")
    with pytest.raises(UsageError, match=r"model 'flat' has native shape \[64\]"):
        sel.vectors(view="mean")
    with pytest.raises(UsageError, match=r"model 'flat' has native shape \[64\]"):
        next(sel.iter_vectors(view="mean"))
    with pytest.raises(UsageError, match="choose one of: flat, mean"):
        sel.vectors(view="median")  # type: ignore[arg-type]
    np.testing.assert_allclose(sel.vectors(view="flat"), flat.astype(np.float16).astype(np.float32))


def test_pure_functions() -> None:
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(apply_view(x, "mean", (3, 2)), [[2, 3], [8, 9]])
    assert apply_view(x, "flat", (6,)) is x
    assert view_dim("mean", 6, (3, 2)) == 2 and view_dim("flat", 6, (3, 2)) == 6
    with pytest.raises(UsageError, match="one axis"):
        view_dim("mean", 6, (6,))


def test_demo_precomputed_round_trip(tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrstore.datasets.csv_manifest import CsvManifest
    from cxrstore.encoders.base import get_encoder
    from cxrstore.importers import demo_precomputed
    from cxrstore.ingest import ingest

    monkeypatch.setenv("CXRSTORE_CACHE", str(tmp_path / "cache"))
    ingest(tmp_path / "s", CsvManifest(small_demo / "manifest.csv", root=small_demo).records(), encoder=get_encoder("baseline"), workers=0)
    out = demo_precomputed(tmp_path / "s", work_dir=tmp_path / "w")
    assert out["identical"] and out["native_shape"] == [8, 64] and out["mean_dim"] == 64
    assert out["report"]["filled"] == Store(tmp_path / "s").n_rows and out["report"]["failed"] == 0
