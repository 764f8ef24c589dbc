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
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cxrstore.analysis.knn import (
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

#: Dimensions of the seeded random projection handed to UMAP for laying out
#: disconnected components (neighbours always come from the kNN graph).
LAYOUT_DIMS = 32


def _choice(what: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise UsageError(f"{what} {value!r} is not one of {', '.join(valid)}")
    return value


def _umap() -> Any:
    """Import umap-learn without its ImportWarning about the optional TensorFlow
    (ParametricUMAP), which cxrstore does not use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ImportWarning)
        import umap
        import umap.umap_
    return umap


# -- graphs -------------------------------------------------------------------------
def with_self(indices: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's convention: each row's own position first (distance 0), then its
    neighbours with cosine distance ``1 - sim`` (so ``k + 1`` columns)."""
    n = indices.shape[0]
    idx = np.concatenate([np.arange(n, dtype=np.int64)[:, None], indices.astype(np.int64)], axis=1)
    dist = np.concatenate([np.zeros((n, 1), np.float32), np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)], axis=1)
    return idx, dist


def connectivity_graph(
    indices: np.ndarray, sims: np.ndarray, *, weights: Weights = "connectivity", seed: int = 0
) -> sp.csr_matrix:
    """The symmetrised, weighted graph of a kNN graph (self excluded), as CSR.

    ``"connectivity"``: UMAP's fuzzy simplicial set (per-row smooth-kNN membership
    strengths, combined by fuzzy union), the graph scanpy clusters on.
    ``"similarity"``: cosine similarity clipped at 0, symmetrised by maximum.
    """
    _choice("weights", weights, WEIGHTS)
    n, k = indices.shape
    if weights == "similarity":
        w = np.clip(sims.astype(np.float64), 0.0, None).ravel()
        g = sp.csr_matrix((w, (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
        g = g.maximum(g.T).tocsr()
    else:
        fuzzy_simplicial_set = _umap().umap_.fuzzy_simplicial_set
        idx, dist = with_self(indices, sims)
        g, _, _ = fuzzy_simplicial_set(
            np.empty((n, 1), np.float32), k + 1, np.random.RandomState(seed), "cosine", knn_indices=idx, knn_dists=dist
        )
        g = g.tocsr()
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
    """Weighted Newman modularity of ``labels`` on ``graph``."""
    return float(_igraph(graph).modularity(labels.tolist(), weights="weight", resolution=resolution))


def umap_embedding(
    indices: np.ndarray,
    sims: np.ndarray,
    layout_data: np.ndarray,
    *,
    seed: int | None = 0,
    min_dist: float = 0.5,
    n_epochs: int | None = None,
) -> np.ndarray:
    """2-D UMAP from a precomputed kNN graph (umap-learn's ``precomputed_knn``).

    Parameters
    ----------
    indices, sims : ndarray, shape (n, k)
        The kNN graph, self excluded (UMAP gets ``k + 1`` neighbours, self first, as
        ``umap-learn`` and scanpy count them).
    layout_data : ndarray, shape (n, m)
        Low-dimensional stand-in for the vectors (a random projection): UMAP only uses it
        to place disconnected components relative to each other.
    seed : int or None
        Seeded runs are reproducible and single-threaded (umap-learn's rule); ``None``
        runs in parallel and varies from run to run.
    min_dist : float
        UMAP's ``min_dist`` (scanpy's default 0.5).

    Returns
    -------
    ndarray of float32, shape (n, 2)
    """
    umap = _umap()
    k = indices.shape[1]
    idx, dist = with_self(indices, sims)
    reducer = umap.UMAP(
        n_neighbors=k + 1,
        n_components=2,
        metric="cosine",
        min_dist=min_dist,
        n_epochs=n_epochs,
        random_state=seed,
        n_jobs=1 if seed is not None else -1,
        precomputed_knn=(idx, dist, None),
        low_memory=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        coords = reducer.fit_transform(np.asarray(layout_data, dtype=np.float32))
    return np.asarray(coords, dtype=np.float32)


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
    memory_mb: float = 512.0,
    recall_sample: int = 1000,
    seed: int = 0,
    device: str = "auto",
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
        graph = approximate_knn(source, len(rows), k=k, seed=seed, block_rows=block_rows or 4096)
        rec = sample_recall(graph, source, sample=recall_sample, seed=seed, block_rows=block_rows or 4096)
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
    memory_mb: float = 512.0,
    recall_sample: int = 1000,
    device: str = "auto",
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
        kNN graph: exact streamed products, or FAISS IVF with its recall measured on
        ``recall_sample`` rows.
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
        memory_mb=memory_mb, recall_sample=recall_sample, seed=seed, device=device,
    )
    timings["knn"] = time.perf_counter() - t
    t = time.perf_counter()
    g = connectivity_graph(graph.indices, graph.sims, weights=weights, seed=seed)
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
        layout = _layout_data(sel, model, seed=seed)
        coords = umap_embedding(graph.indices, graph.sims, layout, seed=seed, min_dist=min_dist)
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
        "knn": {key: graph.stats.get(key) for key in ("method", "device", "seconds", "gflops_per_s", "block_rows", "passes", "recall_sample") if key in graph.stats},
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
