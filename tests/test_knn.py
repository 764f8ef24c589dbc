"""Exact and approximate cosine kNN graphs over streamed vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrstore.analysis import knn as knnmod
from cxrstore.analysis.knn import (
    approximate_knn,
    array_source,
    default_block_rows,
    exact_knn,
    exact_knn_of,
    recall,
    sample_recall,
    selection_source,
)
from cxrstore.errors import UsageError
from cxrstore.store.selection import Selection
from cxrstore.store.store import RowData, Store, open_writer

PROV = {
    "encoder": {"encoder": "toy", "version": "1", "params": {}, "weights_sha256": "0" * 64},
    "preprocess": {"max_side": 1024},
    "native_shape": [1],
}


def mixture(n: int, d: int, clusters: int, *, seed: int = 0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture: unit-variance centres, isotropic noise of total norm ``noise * sqrt(d)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    y = rng.integers(0, clusters, n)
    x = centres[y] + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), y


def make_store(path: Path, x: np.ndarray, *, chunk_rows: int, labels: dict[str, np.ndarray] | None = None, model: str = "toy") -> Store:
    """A store holding ``x`` as model ``model`` with ``chunk_rows`` rows per chunk."""
    n, d = x.shape
    labels = labels or {}
    with open_writer(path) as w:
        w.ensure_model(model, {**PROV, "native_shape": [d]}, dim=d, chunk_rows=chunk_rows)
        rows = [
            w.add_row(RowData(
                image_id=f"img{i}", patient_id=f"p{i // 3}", sex="FM"[i % 2], age=float(30 + i % 50),
                labels={name: (None if np.isnan(v[i]) else float(v[i])) for name, v in labels.items()},
            ))
            for i in range(n)
        ]
        w.add_vectors(model, rows, x)
        w.commit()
    return Store(path)


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 cosine similarities, self excluded, top k by full sort."""
    xn = x.astype(np.float64)
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


def assert_same_graph(indices: np.ndarray, sims: np.ndarray, x: np.ndarray) -> None:
    """``indices``/``sims`` are an exact kNN graph of ``x``: up to ties, the same as the
    brute-force reference (each neighbour's true similarity is the reported one, the
    reported similarities are the k largest, no self, no repeats)."""
    n, k = indices.shape
    _, ref_sims = brute_force(x, k)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    true = np.einsum("ij,ikj->ik", xn, xn[indices])
    np.testing.assert_allclose(sims, true, atol=2e-6)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-6)
    assert not (indices == np.arange(n)[:, None]).any(), "self must be excluded"
    assert all(len(set(r)) == k for r in indices.tolist()), "a neighbour is repeated"


@pytest.mark.parametrize("block_rows", [7, 64, 300, 5000])
def test_exact_equals_brute_force(block_rows: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24)).astype(np.float32) * rng.uniform(0.1, 10, (300, 1)).astype(np.float32)
    g = exact_knn(array_source(x), 300, k=10, block_rows=block_rows, device="cpu")
    ref_idx, _ = brute_force(x, 10)
    assert g.indices.shape == (300, 10) and g.indices.dtype == np.int64 and g.sims.dtype == np.float32
    assert_same_graph(g.indices, g.sims, x)
    assert (g.indices == ref_idx).mean() > 0.999  # random data: ties are (almost) absent
    assert (np.diff(g.sims, axis=1) <= 0).all(), "similarities sorted descending"
    assert g.stats["method"] == "exact" and g.stats["block_rows"] == block_rows


def test_exact_default_blocks_and_duplicates() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x[1] = x[0] * 3.0  # a duplicate direction: each is the other's nearest neighbour, sim 1
    g = exact_knn(array_source(x), 200, k=5)
    assert g.indices[0, 0] == 1 and g.indices[1, 0] == 0
    assert g.sims[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert_same_graph(g.indices, g.sims, x)


def test_default_block_rows_respects_memory() -> None:
    for dim in (64, 1024, 24576):
        b = default_block_rows(dim, memory_mb=512)
        assert 64 <= b <= 8192 and b % 64 == 0
        assert 4 * (3 * b * dim + b * b) <= 512 * 2**20 or b == 64
    assert default_block_rows(24576, memory_mb=512) < default_block_rows(1024, memory_mb=512)
    with pytest.raises(UsageError, match="memory_mb"):
        default_block_rows(16, memory_mb=0)


def test_bad_options() -> None:
    x = np.eye(5, dtype=np.float32)
    with pytest.raises(UsageError, match="k=5 needs more than 5 rows"):
        exact_knn(array_source(x), 5, k=5)
    with pytest.raises(UsageError, match="device 'tpu' is not one of auto, cpu, gpu"):
        exact_knn(array_source(x), 5, k=2, device="tpu")  # type: ignore[arg-type]
    if not knnmod._gpu_available():
        with pytest.raises(UsageError, match="no GPU"):
            exact_knn(array_source(x), 5, k=2, device="gpu")
    with pytest.raises(ValueError, match="expected 9"):
        exact_knn(array_source(np.ones((5, 3), np.float32)), 9, k=2)


def test_exact_knn_of_matches_rows_of_full_graph() -> None:
    x, _ = mixture(400, 20, 5, seed=3)
    full = exact_knn(array_source(x), 400, k=8, block_rows=50)
    rows = np.array([399, 0, 17, 200])
    idx, sims = exact_knn_of(array_source(x), 400, rows, k=8, block_rows=33)
    np.testing.assert_array_equal(idx, full.indices[rows])
    np.testing.assert_allclose(sims, full.sims[rows], atol=1e-6)


def test_approximate_recall_is_measured_against_exact() -> None:
    x, _ = mixture(3000, 32, 10, seed=4, noise=0.4)
    approx = approximate_knn(array_source(x), 3000, k=15, block_rows=256, seed=0)
    exact = exact_knn(array_source(x), 3000, k=15)
    true_recall = recall(approx.indices, exact.indices)
    rec = sample_recall(approx, array_source(x), sample=500, seed=1)
    assert rec["sample"] == 500
    assert 0.9 <= true_recall <= 1.0
    assert abs(rec["recall"] - true_recall) < 0.05
    assert not (approx.indices == np.arange(3000)[:, None]).any()
    assert approx.stats["pairs_fraction"] < 0.8
    # a deliberately weak partition (one list probed) loses recall, and the sample shows it
    weak = approximate_knn(array_source(x), 3000, k=15, nlist=64, nprobe=1, block_rows=256, seed=0)
    assert sample_recall(weak, array_source(x), sample=500)["recall"] < rec["recall"]


def test_approximate_with_every_list_probed_is_exact() -> None:
    """Probing all lists searches every pair: the exact graph, whatever the grouping."""
    x, _ = mixture(700, 24, 6, seed=11)
    g = approximate_knn(array_source(x), 700, k=9, nlist=12, nprobe=12, block_rows=96, seed=2)
    assert g.stats["nprobe"] == 12 and g.stats["calibration"] is None
    assert_same_graph(g.indices, g.sims, x)


def test_approximate_nprobe_is_calibrated_to_the_target_recall() -> None:
    x, _ = mixture(4000, 32, 12, seed=6, noise=0.45)
    exact = exact_knn(array_source(x), 4000, k=15)
    results = {}
    for target in (0.9, 0.99):
        g = approximate_knn(array_source(x), 4000, k=15, target_recall=target, calibration_rows=400, block_rows=512, seed=0)
        cal = g.stats["calibration"]
        curve = cal["recall_by_nprobe"]
        # the smallest nprobe reaching the target on the calibration sample
        assert cal["reached"] and cal["recall"] >= target and cal["sample"] == 400
        assert g.stats["nprobe"] == 1 or curve[g.stats["nprobe"] - 2] < target
        assert curve == sorted(curve)
        # the recall over all rows is at least about the calibrated one (groups compute a superset)
        results[target] = (g.stats["nprobe"], recall(g.indices, exact.indices))
        assert results[target][1] >= target - 0.02, results
        assert g.stats["pairs_fraction"] < 1.0
    assert results[0.9][0] < results[0.99][0]
    # seeded: the same graph again
    again = approximate_knn(array_source(x), 4000, k=15, target_recall=0.99, calibration_rows=400, block_rows=512, seed=0)
    g99 = approximate_knn(array_source(x), 4000, k=15, target_recall=0.99, calibration_rows=400, block_rows=512, seed=0)
    np.testing.assert_array_equal(again.indices, g99.indices)
    np.testing.assert_array_equal(again.sims, g99.sims)


def test_approximate_bad_parameters() -> None:
    x, _ = mixture(200, 8, 3, seed=1)
    with pytest.raises(UsageError, match="nprobe must be in 1..10"):
        approximate_knn(array_source(x), 200, k=5, nlist=10, nprobe=11)
    with pytest.raises(UsageError, match="target_recall must be in"):
        approximate_knn(array_source(x), 200, k=5, target_recall=1.5)


def test_store_stream_memory_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store of many small chunks: no array read or multiplied exceeds a block (two chunks
    here), though the stream is read many times."""
    chunk = 8
    x, _ = mixture(500, 12, 4, seed=5)
    store = make_store(tmp_path / "s", x, chunk_rows=chunk)
    assert store.vectors_array("toy").chunks[0] == chunk
    largest = {"read": 0, "batch": 0, "matrix": 0}
    array = store.vectors_array("toy")

    class Recording:
        """Wraps the zarr array: records the rows of every read."""

        chunks = array.chunks

        def __getitem__(self, key: slice) -> np.ndarray:
            out = np.asarray(array[key])
            largest["read"] = max(largest["read"], out.shape[0])
            return out

    monkeypatch.setattr(Store, "vectors_array", lambda self, model: Recording())
    original = Selection.iter_vectors

    def recording_iter(self: Selection, *args: object, **kwargs: object):
        for rows, vecs in original(self, *args, **kwargs):
            largest["batch"] = max(largest["batch"], vecs.shape[0])
            yield rows, vecs

    monkeypatch.setattr(Selection, "iter_vectors", recording_iter)
    real_normalise = knnmod.normalise

    def recording_normalise(v: np.ndarray) -> np.ndarray:
        largest["matrix"] = max(largest["matrix"], v.size)
        return real_normalise(v)

    monkeypatch.setattr(knnmod, "normalise", recording_normalise)
    sel = store.select(model="toy")
    g = exact_knn(selection_source(sel), len(sel), k=6, block_rows=2 * chunk)
    assert largest["read"] <= 2 * chunk, largest
    assert largest["batch"] <= 2 * chunk, largest
    assert largest["matrix"] <= 2 * chunk * 12, largest
    assert g.stats["passes"] > 10  # the stream was re-read, never held whole
    assert_same_graph(g.indices, g.sims, x)
    # the approximate graph: the k-means sample, the groups and the queued queries are
    # each at most two blocks
    largest.update(read=0, batch=0, matrix=0)
    a = approximate_knn(selection_source(sel), len(sel), k=6, nlist=8, block_rows=2 * chunk, calibration_rows=50)
    assert largest["read"] <= 2 * chunk, largest
    assert largest["batch"] <= 2 * chunk, largest
    assert largest["matrix"] <= 2 * 2 * chunk * 12, largest
    assert a.stats["passes"] > 10 and a.stats["train_rows"] <= 4 * chunk
    assert recall(a.indices, g.indices) >= 0.9


def test_gpu_block_logic_with_a_cpu_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's merging (both directions, self masked) checked with faiss.knn standing
    in for faiss.knn_gpu; the GPU itself is exercised only on a CUDA machine."""
    calls = []

    def fake_knn_gpu(res: object, xq: np.ndarray, xb: np.ndarray, k: int, metric: int = 1) -> tuple[np.ndarray, np.ndarray]:
        calls.append((xq.shape[0], xb.shape[0], k))
        return knnmod.faiss.knn(xq, xb, k, metric=metric)

    monkeypatch.setattr(knnmod, "_gpu_available", lambda: True)
    monkeypatch.setattr(knnmod.faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(knnmod.faiss, "knn_gpu", fake_knn_gpu, raising=False)
    x, _ = mixture(230, 16, 4, seed=8)
    g = exact_knn(array_source(x), 230, k=7, block_rows=50, device="auto")
    assert g.stats["device"] == "gpu" and calls
    assert_same_graph(g.indices, g.sims, x)


def _numpy_topk(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_kernels_equal_numpy_both_directions(threads: int) -> None:
    """merge_rows / merge_cols keep exactly the k largest per row and per column of a block
    stream, at any thread count (every list is updated by one thread, in order)."""
    import numba

    from cxrstore.analysis._topk import empty_lists, merge_cols, merge_rows

    rng = np.random.default_rng(threads)
    full = rng.standard_normal((90, 130)).astype(np.float32)
    k = 6
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        D, I = empty_lists(90 + 130, k)  # noqa: E741 rows 0..89 for rows of full, 90.. for its columns
        for c0 in range(0, 130, 40):  # column blocks of the stream
            block = np.ascontiguousarray(full[:, c0 : c0 + 40])
            merge_rows(block, D, I, 0, 90 + c0)
            merge_cols(block, D, I, 0, 90 + c0, 3)
    finally:
        numba.set_num_threads(before)
    want_d, want_i = _numpy_topk(full, k)
    np.testing.assert_array_equal(D[:90], want_d)
    np.testing.assert_array_equal(I[:90], want_i + 90)
    want_d, want_i = _numpy_topk(full.T, k)
    np.testing.assert_array_equal(D[90:], want_d)
    np.testing.assert_array_equal(I[90:], want_i)
