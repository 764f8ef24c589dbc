"""Clustering on the store: kNN graph, Leiden communities, UMAP, plots and tables.

Pure functions (arrays in, arrays out):

- :func:`connectivity_graph`: the symmetrised, weighted graph from a kNN graph, either
  UMAP's fuzzy union of neighbourhoods (``weights="connectivity"``, what scanpy
  clusters on) or the cosine similarities symmetrised by maximum (``"similarity"``);
- :func:`leiden`: igraph's Leiden (modularity or CPM objective, resolution, seeded);
- :func:`umap_embedding`: 2-D UMAP from the precomputed neighbours (no second search);
- :func:`cluster_table`, :func:`label_agreement`, :func:`plot_embedding`.

The store-level :func:`cluster` selects rows, builds (or reuses) the stored exact kNN
graph by streaming the vectors, clusters, embeds, draws and saves everything with its
parameters as results ``knn/<name>`` and ``cluster/<name>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cxrstore.analysis.knn import (
    TARGET_RECALL,
    KnnGraph,
    approximate_knn,
    exact_knn,
    normalise,
    sample_recall,
    selection_source,
)
from cxrstore.errors import UsageError
from cxrstore.store.results import Result, load_result, save_result
from cxrstore.store.selection import Selection, Where, select

logger = logging.getLogger(__name__)

Objective = Literal["modularity", "CPM"]
OBJECTIVES = ("modularity", "CPM")
Weights = Literal["connectivity", "similarity"]
WEIGHTS = ("connectivity", "similarity")
KnnMethod = Literal["exact", "ivf"]
KNN_METHODS = ("exact", "ivf")

#: Memory for the kNN graph's blocks by default. Larger blocks mean fewer passes over
#: the store and larger products: at 20,000 x 24,576 (two cores, vectors in memory) the
#: exact graph took 36.3 s with 512 MB (6.3 passes, 372 GFLOP/s) and 33.3 s with 1,024 MB
#: (3.4 passes, 411 GFLOP/s); from the store each pass also costs about 1 s a 2 GB.
KNN_MEMORY_MB = 1024.0
#: Dimensions of the seeded random projection handed to UMAP for laying out
#: disconnected components (neighbours always come from the kNN graph).
LAYOUT_DIMS = 32


def _choice(what: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise UsageError(f"{what} {value!r} is not one of {', '.join(valid)}")
    return value


def _umap() -> Any:
    """Import umap-learn without its parametric part, which cxrstore does not use.

    ``umap/__init__`` imports ``umap.parametric_umap``, which imports TensorFlow when it
    is installed (the ``elixr`` extra): 3.7 of the 5.7 s ``import umap`` took beside it.
    A ``None`` in ``sys.modules`` makes that import fail, which umap-learn handles (a
    ``ParametricUMAP`` stand-in that explains itself, and an ImportWarning, silenced
    here); the entry is removed afterwards, so ``import umap.parametric_umap`` still
    works later in the process.
    """
    if "umap.umap_" not in sys.modules:
        block = "umap.parametric_umap" not in sys.modules
        if block:
            sys.modules["umap.parametric_umap"] = None  # type: ignore[assignment]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=ImportWarning)
                import umap.umap_
        finally:
            if block and sys.modules.get("umap.parametric_umap", 0) is None:
                del sys.modules["umap.parametric_umap"]
    import umap

    return umap


# -- graphs -------------------------------------------------------------------------
def with_self(indices: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's convention: each row's own position first (distance 0), then its
    neighbours with cosine distance ``1 - sim`` (so ``k + 1`` columns)."""
    n = indices.shape[0]
    idx = np.concatenate([np.arange(n, dtype=np.int64)[:, None], indices.astype(np.int64)], axis=1)
    dist = np.concatenate([np.zeros((n, 1), np.float32), np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)], axis=1)
    return idx, dist


def connectivity_graph(indices: np.ndarray, sims: np.ndarray, *, weights: Weights = "connectivity") -> sp.csr_matrix:
    """The symmetrised, weighted graph of a kNN graph (self excluded), as CSR.

    ``"connectivity"``: UMAP's fuzzy simplicial set (per-row smooth-kNN membership
    strengths, combined by fuzzy union), the graph scanpy clusters on and the one
    :func:`umap_embedding` lays out (pass it there as ``graph`` to build it once).
    ``"similarity"``: cosine similarity clipped at 0, symmetrised by maximum.
    """
    _choice("weights", weights, WEIGHTS)
    n, k = indices.shape
    if weights == "similarity":
        w = np.clip(sims.astype(np.float64), 0.0, None).ravel()
        g = sp.csr_matrix((w, (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
        g = g.maximum(g.T).tocsr()
    else:
        g = _umap_graph(indices, sims).tocsr()
    g.setdiag(0)
    g.eliminate_zeros()
    return g


def _igraph(graph: sp.spmatrix) -> Any:
    import igraph

    upper = sp.triu(graph, k=1).tocoo()
    g = igraph.Graph(n=graph.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist(), directed=False)
    g.es["weight"] = upper.data.astype(float).tolist()
    return g


def leiden(
    graph: sp.spmatrix,
    *,
    objective: Objective = "modularity",
    resolution: float = 1.0,
    seed: int = 0,
    n_iterations: int = -1,
    beta: float = 0.01,
) -> np.ndarray:
    """Leiden communities of a symmetric weighted graph (igraph's ``community_leiden``).

    Parameters
    ----------
    graph : sparse matrix, shape (n, n)
        Symmetric weights (see :func:`connectivity_graph`).
    objective : {"modularity", "CPM"}
    resolution : float
        Higher gives more, smaller communities.
    seed : int
        Seeds igraph's random generator for this call only (the global one is restored).
    n_iterations : int
        Leiden iterations; negative runs until the partition is stable.

    Returns
    -------
    ndarray of int64, shape (n,)
        Community of each node, numbered 0, 1, ... by decreasing size.
    """
    import igraph

    _choice("objective", objective, OBJECTIVES)
    if resolution <= 0:
        raise UsageError(f"resolution must be positive, got {resolution}")
    g = _igraph(graph)
    igraph.set_random_number_generator(random.Random(seed))
    try:
        part = g.community_leiden(
            objective_function=objective, weights="weight", resolution=resolution, beta=beta, n_iterations=n_iterations
        )
    finally:
        igraph.set_random_number_generator(random)
    return _by_size(np.asarray(part.membership, dtype=np.int64))


def _by_size(labels: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.lexsort((uniq, -counts))]
    remap = np.empty(uniq.max() + 1 if uniq.size else 0, dtype=np.int64)
    remap[order] = np.arange(order.size)
    return remap[labels]


def modularity(graph: sp.spmatrix, labels: np.ndarray, *, resolution: float = 1.0) -> float:
    """Weighted Newman modularity of ``labels`` on the symmetric ``graph`` (igraph's
    definition, computed on the sparse matrix: building an igraph graph costs more).

    ``Q = sum_c [ W_c / 2m - resolution * (d_c / 2m)^2 ]``, with ``2m`` the total weight
    (each undirected edge counted from both ends), ``W_c`` the weight inside community
    ``c`` counted the same way, ``d_c`` its total degree; the diagonal is ignored.
    """
    g = sp.coo_matrix(graph)
    off = g.row != g.col
    row, col, w = g.row[off], g.col[off], g.data[off].astype(np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    two_m = w.sum()
    if two_m <= 0:
        return float("nan")
    inside = np.bincount(labels[row], weights=np.where(labels[row] == labels[col], w, 0.0), minlength=labels.max() + 1)
    degree = np.bincount(labels[row], weights=w, minlength=labels.max() + 1)
    return float(inside.sum() / two_m - resolution * np.sum((degree / two_m) ** 2))


def _umap_graph(indices: np.ndarray, sims: np.ndarray) -> sp.coo_matrix:
    """The fuzzy simplicial set ``umap.UMAP(metric="cosine", precomputed_knn=...)``
    builds: ``k + 1`` neighbours (self first), neighbours at cosine distance >= 2
    disconnected (umap-learn's ``disconnection_distance`` for cosine), fuzzy union."""
    umap = _umap()
    n, k = indices.shape
    idx, dist = with_self(indices, sims)
    far = dist >= 2.0
    idx[far] = -1
    dist[far] = np.inf
    graph, _, _ = umap.umap_.fuzzy_simplicial_set(
        np.empty((n, 1), np.float32), k + 1, np.random.RandomState(0), "cosine", knn_indices=idx, knn_dists=dist
    )
    return graph.tocoo()


def _umap_init(graph: sp.coo_matrix, layout_data: np.ndarray | Callable[[], np.ndarray], random_state: np.random.RandomState) -> np.ndarray:
    """umap-learn's spectral initialisation (``simplicial_set_embedding``, ``init="spectral"``),
    scaled to [0, 10]; ``layout_data`` is read (called, if callable) only when the graph
    has several connected components (``umap.spectral.multi_component_layout``)."""
    from scipy.sparse.csgraph import connected_components

    umap = _umap()
    from umap.spectral import spectral_layout

    n = graph.shape[0]
    data = None
    if connected_components(graph)[0] > 1:
        data = np.asarray(layout_data() if callable(layout_data) else layout_data, dtype=np.float32)
        if data.ndim != 2 or data.shape[0] != n:
            raise UsageError(f"layout data has shape {data.shape}, expected ({n}, m)")
    emb = spectral_layout(data, graph, 2, random_state, metric="cosine")
    emb = umap.umap_.noisy_scale_coords(emb, random_state, max_coord=10, noise=0.0001)
    lo, hi = np.min(emb, 0), np.max(emb, 0)
    return (10.0 * (emb - lo) / (hi - lo)).astype(np.float32, order="C")


def umap_embedding(
    indices: np.ndarray,
    sims: np.ndarray,
    layout_data: np.ndarray | Callable[[], np.ndarray],
    *,
    seed: int | None = 0,
    min_dist: float = 0.5,
    n_epochs: int | None = None,
    graph: sp.spmatrix | None = None,
) -> np.ndarray:
    """2-D UMAP from a precomputed kNN graph: umap-learn's graph and initialisation,
    cxrstore's parallel, reproducible layout optimiser.

    umap-learn computes the fuzzy simplicial set (as ``umap.UMAP(metric="cosine",
    precomputed_knn=...)`` does), ``a`` and ``b`` from ``min_dist`` (spread 1), the
    epochs per sample, and the spectral initialisation scaled to [0, 10] with a little
    noise, exactly as ``umap.umap_.simplicial_set_embedding`` does (same default
    ``n_epochs``: 500 up to 10,000 points, 200 above; same pruning of edges lighter than
    ``max / n_epochs``). The stochastic gradient descent is
    :func:`cxrstore.analysis._layout.optimize_layout`: umap-learn's epoch, run over fixed
    chunks of vertices in parallel, each chunk moving only its own vertices against a
    snapshot of the others, so the result is the same for a seed whatever the number of
    threads (umap-learn itself only reproduces a seed single-threaded).

    Parameters
    ----------
    indices, sims : ndarray, shape (n, k)
        The kNN graph, self excluded (UMAP gets ``k + 1`` neighbours, self first, as
        ``umap-learn`` and scanpy count them).
    layout_data : ndarray of shape (n, m), or a callable returning one
        Low-dimensional stand-in for the vectors (a random projection), only used to
        place disconnected components of the graph relative to each other; a callable is
        called only then (so a connected graph never reads it).
    seed : int or None
        Seed of the initialisation and of the negative samples; a seeded result is
        bit-identical across runs and thread counts. ``None`` draws a fresh seed (same
        parallel optimiser, different result each run).
    min_dist : float
        UMAP's ``min_dist`` (scanpy's default 0.5).
    n_epochs : int or None
        Epochs of the optimisation (``None``: umap-learn's default).
    graph : sparse matrix, optional
        The fuzzy graph of ``indices`` and ``sims`` if already built
        (``connectivity_graph(..., weights="connectivity")``); not modified.

    Returns
    -------
    ndarray of float32, shape (n, 2)
    """
    from cxrstore.analysis._layout import optimize_layout  # numba: imported on use only

    umap = _umap()
    indices = np.asarray(indices)
    sims = np.asarray(sims)
    if indices.ndim != 2 or sims.shape != indices.shape:
        raise UsageError(f"kNN indices {indices.shape} and similarities {sims.shape} must be the same (n, k) shape")
    n = indices.shape[0]
    if n < 2:
        return np.zeros((n, 2), np.float32)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    random_state = np.random.RandomState(seed)
    graph = _umap_graph(indices, sims) if graph is None else sp.coo_matrix(graph, copy=True)
    graph.sum_duplicates()
    default_epochs = 500 if n <= 10000 else 200
    epochs = default_epochs if n_epochs is None else int(n_epochs)
    # umap-learn prunes edges lighter than max / n_epochs (max / its default below 11 epochs)
    graph.data[graph.data < graph.data.max() / float(epochs if epochs > 10 else default_epochs)] = 0.0
    graph.eliminate_zeros()
    emb = _umap_init(graph, layout_data, random_state)
    # umap-learn's next draws (its optimiser's rng_state) key the negative-sample streams
    s = random_state.randint(np.iinfo(np.int32).min, np.iinfo(np.int32).max, 3).astype(np.int64) % 2**32
    key = int(s[0]) << 32 ^ int(s[1]) ^ int(s[2]) << 16
    csr = graph.tocsr()
    csr.sort_indices()
    a, b = umap.umap_.find_ab_params(1.0, min_dist)
    return optimize_layout(
        emb,
        csr.indptr,
        csr.indices,
        umap.umap_.make_epochs_per_sample(csr.data, epochs),
        a=float(a),
        b=float(b),
        n_epochs=epochs,
        key=key,
    )


# -- tables and plots -----------------------------------------------------------------
def cluster_table(clusters: np.ndarray, metadata: pd.DataFrame, labels: Sequence[str], groups: np.ndarray | None = None) -> pd.DataFrame:
    """One row per cluster (and a last row ``all``): size, patients, prevalence of each
    label among rows where it is known, mean age, female fraction among known sex.
    """
    df = pd.DataFrame({"cluster": np.asarray(clusters)})
    meta = metadata.reset_index(drop=True)
    df["patient"] = groups if groups is not None else meta.get("patient_id", pd.Series(np.arange(len(df)))).astype(str).to_numpy()
    df["age"] = pd.to_numeric(meta["age"], errors="coerce").to_numpy() if "age" in meta else np.nan
    sex = meta["sex"].astype(str).str.upper().to_numpy() if "sex" in meta else np.full(len(df), "")
    df["female"] = np.where(sex == "F", 1.0, np.where(sex == "M", 0.0, np.nan))
    for name in labels:
        df[name] = meta[name].to_numpy(dtype=float)

    def summarise(part: pd.DataFrame, key: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"cluster": key, "size": len(part), "patients": part["patient"].nunique()}
        for name in labels:
            row[f"prevalence_{name}"] = part[name].mean()  # NaN (missing) skipped
            row[f"known_{name}"] = int(part[name].notna().sum())
        row["mean_age"] = part["age"].mean()
        row["female_fraction"] = part["female"].mean()
        return row

    rows = [summarise(part, int(c)) for c, part in df.groupby("cluster", sort=True)]
    rows.append(summarise(df, "all"))
    return pd.DataFrame(rows)


def label_agreement(clusters: np.ndarray, label_values: pd.DataFrame) -> pd.DataFrame:
    """ARI and NMI between clusters and each label, over rows where the label is known."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out = []
    for name in label_values.columns:
        y = label_values[name].to_numpy(dtype=float)
        known = ~np.isnan(y)
        c = np.asarray(clusters)[known]
        if known.sum() >= 2:
            ari = adjusted_rand_score(y[known], c)
            nmi = normalized_mutual_info_score(y[known], c)
        else:
            ari = nmi = float("nan")
        out.append({"label": name, "known": int(known.sum()), "positive": int(np.nansum(y)), "ari": ari, "nmi": nmi})
    return pd.DataFrame(out, columns=["label", "known", "positive", "ari", "nmi"])


def plot_embedding(coords: np.ndarray, values: np.ndarray, *, title: str, kind: Literal["cluster", "label"] = "cluster") -> bytes:
    """A PNG scatter of ``coords`` coloured by cluster (categorical) or by a label
    (positive / negative / missing). Uses matplotlib's Agg canvas, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = coords.shape[0]
    size = float(np.clip(3000.0 / max(n, 1), 0.5, 20.0))
    if kind == "cluster":
        values = np.asarray(values)
        uniq = np.unique(values)
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        for c in uniq:
            m = values == c
            ax.scatter(coords[m, 0], coords[m, 1], s=size, color=cmap(int(c) % 20), label=str(c), linewidths=0)
        if uniq.size <= 20:
            ax.legend(markerscale=max(1.0, 6.0 / size**0.5), fontsize=7, loc="best", title="cluster")
    else:
        v = np.asarray(values, dtype=float)
        for mask, colour, name in ((np.isnan(v), "#cccccc", "missing"), (v == 0, "#4c72b0", "negative"), (v == 1, "#dd3333", "positive")):
            if mask.any():
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=colour, label=f"{name} ({int(mask.sum())})", linewidths=0)
        ax.legend(markerscale=max(1.0, 6.0 / size**0.5), fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- the store-level job ---------------------------------------------------------------
@dataclasses.dataclass
class ClusterReport:
    """What :func:`cluster` computed and where it stored it."""

    result: Result
    knn_result: Result
    rows: np.ndarray
    clusters: np.ndarray
    coords: np.ndarray | None
    table: pd.DataFrame
    agreement: pd.DataFrame
    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(df.to_json(orient="records"))

        return {
            **self.summary,
            "result": str(self.result.path),
            "knn_result": str(self.knn_result.path),
            "files": list(self.result.meta.get("files", [])),
            "clusters_table": records(self.table),
            "agreement": records(self.agreement),
        }


def _where_key(where: Where) -> Any:
    if where is None or isinstance(where, str):
        return where
    return {str(k): (sorted(v) if isinstance(v, (list, tuple, set, frozenset)) else v) for k, v in sorted(where.items())}


def _slug(where: Where) -> str:
    if where is None:
        return "all"
    text = json.dumps(_where_key(where), sort_keys=True, default=str)
    return "w" + hashlib.sha1(text.encode()).hexdigest()[:10]


def knn_result_name(model: str, k: int, method: str, where: Where) -> str:
    """Name of the stored kNN graph for these parameters (``knn/<name>``)."""
    return f"{model}-k{k}-{method}-{_slug(where)}"


def build_knn(
    selection: Selection,
    *,
    model: str,
    k: int = 15,
    method: KnnMethod = "exact",
    where: Where = None,
    reuse: bool = True,
    block_rows: int | None = None,
    memory_mb: float = KNN_MEMORY_MB,
    recall_sample: int = 1000,
    seed: int = 0,
    device: str = "auto",
    target_recall: float = TARGET_RECALL,
) -> tuple[KnnGraph, Result, bool]:
    """Build (or reuse) the stored kNN graph of ``selection``; returns ``(graph, result, reused)``.

    The graph is stored as result ``knn/<model>-k<k>-<method>-<where>`` with arrays
    ``rows`` (store row numbers), ``neighbors`` (store row numbers, ``n x k``) and
    ``sims`` (cosine, descending), and reused when the parameters and the selected rows
    are the same.
    """
    _choice("method", method, KNN_METHODS)
    rows = selection.rows
    store = selection.store
    name = knn_result_name(model, k, method, where)
    params = {"model": model, "k": int(k), "method": method, "where": _where_key(where), "n": int(rows.size), "metric": "cosine", "self": "excluded"}
    if method == "ivf":
        params["seed"] = int(seed)
        params["target_recall"] = float(target_recall)
    if reuse:
        try:
            old = load_result(store, "knn", name)
        except UsageError:
            old = None
        if old is not None and old.params == json.loads(json.dumps(params)) and np.array_equal(old.array("rows"), rows):
            neighbors = old.array("neighbors")
            graph = KnnGraph(indices=np.searchsorted(rows, neighbors), sims=old.array("sims"), stats={**old.summary, "reused": True})
            logger.info("reusing stored kNN graph %s", old.path)
            return graph, old, True
    source = selection_source(selection, model)
    if method == "exact":
        graph = exact_knn(source, len(rows), k=k, block_rows=block_rows, memory_mb=memory_mb, device=device)  # type: ignore[arg-type]
        summary = dict(graph.stats)
    else:
        graph = approximate_knn(source, len(rows), k=k, seed=seed, block_rows=block_rows, memory_mb=memory_mb, target_recall=target_recall)
        rec = sample_recall(graph, source, sample=recall_sample, seed=seed, block_rows=graph.stats["block_rows"])
        graph.stats["recall_sample"] = rec
        summary = dict(graph.stats)
    result = save_result(
        store, "knn", name, params=params, summary=summary,
        arrays={"rows": rows, "neighbors": rows[graph.indices], "sims": graph.sims},
    )
    return graph, result, False


def _layout_data(selection: Selection, model: str, *, seed: int, block_rows: int = 4096) -> np.ndarray:
    dim = selection.store.commit.models[selection._model(model)].dim
    proj = np.random.default_rng(seed).standard_normal((dim, LAYOUT_DIMS)).astype(np.float32)
    out = np.empty((len(selection), LAYOUT_DIMS), np.float32)
    pos = 0
    for _, vecs in selection.iter_vectors(model, batch_rows=block_rows):
        out[pos : pos + len(vecs)] = normalise(vecs) @ proj
        pos += len(vecs)
    return out


def cluster(
    store: Any,
    *,
    model: str,
    k: int = 15,
    where: Where = None,
    resolution: float = 1.0,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    objective: Objective = "modularity",
    weights: Weights = "connectivity",
    method: KnnMethod = "exact",
    embed: bool = True,
    min_dist: float = 0.5,
    reuse_graph: bool = True,
    block_rows: int | None = None,
    memory_mb: float = KNN_MEMORY_MB,
    recall_sample: int = 1000,
    device: str = "auto",
    target_recall: float = TARGET_RECALL,
    name: str | None = None,
) -> ClusterReport:
    """Cluster a store's selection: kNN graph, Leiden, UMAP, plots, tables; all saved.

    Parameters
    ----------
    store : Store or path
    model : str
        The model whose vectors are clustered.
    k : int
        Neighbours per row (self excluded).
    where : str or mapping, optional
        Metadata filter (see :func:`cxrstore.store.selection.select`).
    resolution : float
        Leiden resolution.
    seed : int
        Seeds Leiden, UMAP and the layout projection.
    labels : sequence of str, optional
        Labels to colour plots by and compare with (default: all the store's labels).
    objective : {"modularity", "CPM"}
    weights : {"connectivity", "similarity"}
        Edge weights of the Leiden graph (see :func:`connectivity_graph`).
    method : {"exact", "ivf"}
        kNN graph: exact streamed products, or the approximate graph of
        :func:`cxrstore.analysis.knn.approximate_knn` (rows searched exactly within their
        nearest k-means lists, how many calibrated to ``target_recall``), its recall
        measured on ``recall_sample`` other rows.
    embed : bool
        Compute UMAP and the plots.
    reuse_graph : bool
        Reuse a stored kNN graph with the same parameters and rows.
    block_rows, memory_mb, device
        Passed to :func:`cxrstore.analysis.knn.exact_knn`.
    name : str, optional
        Result name (default from the parameters).

    Returns
    -------
    ClusterReport
    """
    from cxrstore.store.store import Store

    st = store if isinstance(store, Store) else Store(store)
    _choice("objective", objective, OBJECTIVES)
    _choice("weights", weights, WEIGHTS)
    _choice("method", method, KNN_METHODS)
    if model not in st.models:
        raise UsageError(f"model {model!r} is not in {st.path}; models: {', '.join(st.models) or 'none'}")
    all_labels = list(st.labels)
    chosen = list(all_labels if labels is None else labels)
    bad = [x for x in chosen if x not in all_labels]
    if bad:
        raise UsageError(f"unknown label(s) {', '.join(map(repr, bad))}; labels: {', '.join(all_labels) or 'none'}")
    sel = select(st, where=where, model=model)
    n = len(sel)
    if n <= k:
        raise UsageError(f"the selection has {n} rows with a {model!r} vector; clustering with k={k} needs more than {k}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    graph, knn_res, reused = build_knn(
        sel, model=model, k=k, method=method, where=where, reuse=reuse_graph, block_rows=block_rows,
        memory_mb=memory_mb, recall_sample=recall_sample, seed=seed, device=device, target_recall=target_recall,
    )
    timings["knn"] = time.perf_counter() - t
    t = time.perf_counter()
    g = connectivity_graph(graph.indices, graph.sims, weights=weights)
    timings["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    clusters = leiden(g, objective=objective, resolution=resolution, seed=seed)
    timings["leiden"] = time.perf_counter() - t
    mod = modularity(g, clusters)
    meta = sel.metadata()
    groups = sel.groups()
    table = cluster_table(clusters, meta, chosen, groups=groups)
    agreement = label_agreement(clusters, meta[chosen]) if chosen else pd.DataFrame(columns=["label", "known", "positive", "ari", "nmi"])
    arrays: dict[str, np.ndarray] = {"rows": sel.rows, "clusters": clusters}
    files: dict[str, bytes] = {}
    coords = None
    if embed:
        t = time.perf_counter()
        # the layout projection reads every vector again: only when the graph is disconnected
        coords = umap_embedding(
            graph.indices, graph.sims, lambda: _layout_data(sel, model, seed=seed), seed=seed, min_dist=min_dist,
            graph=g if weights == "connectivity" else None,  # the fuzzy graph Leiden used: built once
        )
        timings["umap"] = time.perf_counter() - t
        arrays["umap"] = coords
        t = time.perf_counter()
        files["umap_cluster.png"] = plot_embedding(coords, clusters, title=f"{model}: Leiden clusters (k={k}, resolution={resolution})")
        for lab in chosen:
            files[f"umap_{_file_slug(lab)}.png"] = plot_embedding(coords, meta[lab].to_numpy(dtype=float), title=f"{model}: {lab}", kind="label")
        timings["plots"] = time.perf_counter() - t
    params = {
        "model": model, "k": int(k), "where": _where_key(where), "resolution": float(resolution), "seed": int(seed),
        "objective": objective, "weights": weights, "method": method, "labels": chosen, "embed": bool(embed),
        "min_dist": float(min_dist), "umap_layout_dims": LAYOUT_DIMS, "knn_result": f"knn/{knn_res.name}",
    }
    summary = {
        "rows": n,
        "clusters": int(clusters.max() + 1),
        "modularity": mod,
        "knn_reused": reused,
        "knn": {key: graph.stats.get(key) for key in ("method", "device", "seconds", "gflops_per_s", "block_rows", "passes", "recall_sample", "nlist", "nprobe", "pairs_fraction") if key in graph.stats},
        "seconds": timings,
        "agreement": {r["label"]: {"ari": r["ari"], "nmi": r["nmi"]} for r in agreement.to_dict("records")},
    }
    summary = _clean(summary)
    rname = name or f"{model}-k{k}-{objective}-r{resolution:g}-s{seed}-{method}-{_slug(where)}"
    result = save_result(st, "cluster", rname, params=params, summary=summary, arrays=arrays,
                         tables={"clusters": table, "agreement": agreement}, files=files)
    return ClusterReport(result=result, knn_result=knn_res, rows=sel.rows, clusters=clusters, coords=coords,
                         table=table, agreement=agreement, summary=summary)


def _file_slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _clean(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
