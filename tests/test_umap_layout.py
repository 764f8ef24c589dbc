"""The parallel, reproducible UMAP layout optimiser (cxrstore.analysis._layout) and
:func:`cxrstore.analysis.cluster.umap_embedding` built on it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import cxrstore.analysis._layout as layout
from cxrstore.analysis.cluster import _umap, umap_embedding, with_self
from cxrstore.analysis.knn import array_source, exact_knn
from tests.test_knn import mixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    """A clear 8-cluster mixture, 1,200 points in 32 dimensions (as tests/test_cluster.py)."""
    return mixture(1200, 32, 8, seed=11, noise=0.35)


@pytest.fixture(scope="module")
def planted_graph(planted):
    x, _ = planted
    return exact_knn(array_source(x), len(x), k=15)


def knn_accuracy(coords: np.ndarray, labels: np.ndarray) -> float:
    """5-fold accuracy of a 15-NN classifier of ``labels`` on ``coords``."""
    return float(cross_val_score(KNeighborsClassifier(15), coords, labels, cv=5).mean())


def run_in_subprocess_with_threads(threads: int, seed: int, n_epochs: int) -> np.ndarray:
    """The same layout computed in a fresh interpreter with ``NUMBA_NUM_THREADS=threads``."""
    code = (
        "import sys, numpy as np;"
        "from tests.test_knn import mixture;"
        "from cxrstore.analysis.knn import array_source, exact_knn;"
        "from cxrstore.analysis.cluster import umap_embedding;"
        "x, _ = mixture(1200, 32, 8, seed=11, noise=0.35);"
        "g = exact_knn(array_source(x), len(x), k=15);"
        f"c = umap_embedding(g.indices, g.sims, x, seed={seed}, n_epochs={n_epochs});"
        "sys.stdout.buffer.write(c.tobytes())"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype=np.float32).reshape(-1, 2)


def test_same_seed_is_bit_identical_whatever_the_thread_count(planted, planted_graph) -> None:
    x, _ = planted
    g = planted_graph
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = umap_embedding(g.indices, g.sims, x, seed=5, n_epochs=40)
        if numba.config.NUMBA_NUM_THREADS >= 2:
            numba.set_num_threads(2)
            many = [umap_embedding(g.indices, g.sims, x, seed=5, n_epochs=40)]
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            many.append(umap_embedding(g.indices, g.sims, x, seed=5, n_epochs=40))
        else:  # a one-core machine: numba's pool cannot grow in this process
            many = [run_in_subprocess_with_threads(2, seed=5, n_epochs=40)]
    finally:
        numba.set_num_threads(before)
    assert one.shape == (len(g.indices), 2) and one.dtype == np.float32 and np.isfinite(one).all()
    for other in many:
        np.testing.assert_array_equal(one, other)


def test_result_does_not_depend_on_thread_scheduling_of_chunks() -> None:
    """The kernel on its own: many small chunks, 1 thread against all of numba's."""
    rng = np.random.default_rng(0)
    n, deg = 700, 6
    tail = rng.integers(0, n, n * deg)
    head = np.repeat(np.arange(n), deg)
    keep = tail != head
    head, tail = head[keep], tail[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(head, minlength=n))])
    eps = rng.uniform(1.0, 4.0, tail.size)
    init = rng.uniform(0, 10, (n, 2)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        out = []
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            out.append(layout.optimize_layout(init.copy(), indptr, tail, eps, a=1.58, b=0.9, n_epochs=30, key=7, chunk_vertices=16))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out[0], out[1])
    assert not np.array_equal(out[0], init)  # it did move the points
    other_key = layout.optimize_layout(init.copy(), indptr, tail, eps, a=1.58, b=0.9, n_epochs=30, key=8, chunk_vertices=16)
    assert not np.array_equal(out[0], other_key)


def test_different_seeds_differ(planted, planted_graph) -> None:
    x, _ = planted
    g = planted_graph
    a = umap_embedding(g.indices, g.sims, x, seed=0, n_epochs=30)
    b = umap_embedding(g.indices, g.sims, x, seed=1, n_epochs=30)
    assert not np.array_equal(a, b)
    c = umap_embedding(g.indices, g.sims, x, seed=None, n_epochs=30)
    assert c.shape == a.shape and np.isfinite(c).all() and not np.array_equal(a, c)


def test_planted_clusters_stay_separated_and_broken_layouts_fail(planted, planted_graph, monkeypatch) -> None:
    x, y = planted
    g = planted_graph
    coords = umap_embedding(g.indices, g.sims, x, seed=0, n_epochs=100)
    assert knn_accuracy(coords, y) >= 0.95
    # the criterion rejects what a broken optimiser would give
    assert knn_accuracy(np.random.default_rng(0).uniform(0, 10, coords.shape), y) < 0.5
    monkeypatch.setattr(layout, "optimize_layout", functools.partial(layout.optimize_layout, attraction_moves=0.0))
    no_attraction = umap_embedding(g.indices, g.sims, x, seed=0, n_epochs=100)
    assert knn_accuracy(no_attraction, y) < 0.8


def test_initialisation_and_edges_are_umap_learns(planted, planted_graph, monkeypatch) -> None:
    """umap.UMAP(precomputed_knn=...) hands its optimiser the same start, edges and
    sampling schedule as umap_embedding hands cxrstore's."""
    umap = _umap()
    x, _ = planted
    n = 400
    indices, sims = planted_graph.indices[:n] % n, planted_graph.sims[:n]
    theirs: dict = {}

    def capture_theirs(head_embedding, tail_embedding, head, tail, n_epochs, n_vertices, epochs_per_sample, a, b, *args, **kw):
        theirs.update(emb=head_embedding.copy(), head=head.copy(), tail=tail.copy(), eps=epochs_per_sample.copy(), a=a, b=b, n_epochs=n_epochs)
        return head_embedding

    monkeypatch.setattr(umap.umap_, "optimize_layout_euclidean", capture_theirs)
    idx, dist = with_self(indices, sims)
    reducer = umap.UMAP(n_neighbors=16, metric="cosine", min_dist=0.5, n_epochs=60, random_state=4, n_jobs=1, precomputed_knn=(idx, dist, None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")  # umap-learn: no search index given
        reducer.fit_transform(x[:n])
    ours: dict = {}

    def capture_ours(emb, indptr, tail, eps, *, a, b, n_epochs, key):
        ours.update(emb=emb.copy(), head=np.repeat(np.arange(n), np.diff(indptr)), tail=tail, eps=eps, a=a, b=b, n_epochs=n_epochs)
        return emb

    monkeypatch.setattr(layout, "optimize_layout", capture_ours)
    umap_embedding(indices, sims, x[:n], seed=4, n_epochs=60)
    np.testing.assert_array_equal(ours["emb"], theirs["emb"])
    order = np.lexsort((theirs["tail"], theirs["head"]))
    np.testing.assert_array_equal(ours["head"], theirs["head"][order])
    np.testing.assert_array_equal(ours["tail"], theirs["tail"][order])
    np.testing.assert_array_equal(ours["eps"], theirs["eps"][order])
    assert (ours["a"], ours["b"], ours["n_epochs"]) == (theirs["a"], theirs["b"], 60)


def two_blobs() -> np.ndarray:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((150, 8)) * 0.1 + np.eye(8)[0] * 5
    b = rng.standard_normal((150, 8)) * 0.1 - np.eye(8)[0] * 5
    return np.concatenate([a, b]).astype(np.float32)


class Recorder:
    """A layout-data callable that counts its calls."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.data


def test_disconnected_graph_reads_layout_data(monkeypatch) -> None:
    x = two_blobs()
    g = exact_knn(array_source(x), len(x), k=10)
    side = np.repeat([0, 1], 150)
    assert (side[g.indices] == side[:, None]).all()  # no edge between the blobs
    rec = Recorder(x)
    coords = umap_embedding(g.indices, g.sims, rec, seed=0, n_epochs=30)
    assert rec.calls == 1
    assert coords.shape == (300, 2) and np.isfinite(coords).all()
    assert knn_accuracy(coords, side) == 1.0


def test_connected_graph_does_not_read_layout_data() -> None:
    x, _ = mixture(400, 16, 1, seed=2)  # one Gaussian blob: one connected component
    g = exact_knn(array_source(x), len(x), k=15)
    rec = Recorder(x)
    coords = umap_embedding(g.indices, g.sims, rec, seed=0, n_epochs=20)
    assert rec.calls == 0 and coords.shape == (400, 2) and np.isfinite(coords).all()


def test_bad_input_is_refused() -> None:
    from cxrstore.errors import UsageError

    with pytest.raises(UsageError, match="same"):
        umap_embedding(np.zeros((10, 3), np.int64), np.zeros((10, 2), np.float32), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="float32"):
        layout.optimize_layout(np.zeros((3, 2)), np.array([0, 0, 0, 0]), np.zeros(0), np.zeros(0), a=1.0, b=1.0, n_epochs=1, key=0)


def test_umap_import_leaves_tensorflow_out() -> None:
    """umap-learn's package import pulls in TensorFlow for ParametricUMAP when it is
    installed (seconds per `cxrstore cluster`); cxrstore's import of it does not."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (extra elixr): nothing to keep out")
    code = (
        "import sys; from cxrstore.analysis.cluster import _umap; u = _umap();"
        "assert hasattr(u.umap_, 'fuzzy_simplicial_set');"
        "print('tensorflow' in sys.modules, 'umap.parametric_umap' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out


def test_a_given_fuzzy_graph_gives_the_same_layout(planted, planted_graph) -> None:
    """cluster() hands umap_embedding the connectivity graph Leiden used instead of
    building it again: the layout is the same, and the graph passed in is not modified."""
    from cxrstore.analysis.cluster import connectivity_graph

    x, _ = planted
    g = planted_graph
    conn = connectivity_graph(g.indices, g.sims, weights="connectivity")
    before = conn.copy()
    given = umap_embedding(g.indices, g.sims, x, seed=2, n_epochs=30, graph=conn)
    built = umap_embedding(g.indices, g.sims, x, seed=2, n_epochs=30)
    np.testing.assert_array_equal(given, built)
    assert (conn != before).nnz == 0
