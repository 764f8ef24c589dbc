"""Cosine k-nearest-neighbour graphs over vectors streamed block by block.

Pure compute: the functions here take a *vector source*, a callable
``source(start, batch_rows)`` that returns an iterable of float arrays covering
positions ``start .. n-1`` in order, each at most ``batch_rows`` rows. A store selection
is turned into one by :func:`selection_source`; an in-memory array by
:func:`array_source`. Nothing ever holds more than two blocks of vectors and one block
of similarities, whatever ``n`` is (plus the ``n x k`` result).

Exact mode (:func:`exact_knn`) computes every similarity by blocked matrix products and
keeps a running top-k per row (the sorted lists of :mod:`cxrstore.analysis._topk`, one
streaming pass over each product). Similarity is symmetric, so each pair of blocks is
multiplied once and the product updates the lists of both blocks' rows: half the
arithmetic of a plain ``IndexFlatIP`` search. On a machine with GPU FAISS the block
products run on the GPU instead.

Approximate mode (:func:`approximate_knn`) builds a FAISS IVF index (inner product on
normalised vectors) and reports nothing by itself: measure its recall with
:func:`sample_recall`, which computes the exact neighbours of a random sample of rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np

from cxrstore.errors import UsageError

if TYPE_CHECKING:
    from cxrstore.store.selection import Selection

logger = logging.getLogger(__name__)

#: ``source(start, batch_rows)`` -> iterable of (b, dim) arrays covering positions start..n-1.
VectorSource = Callable[[int, int], Iterable[np.ndarray]]

Device = Literal["auto", "cpu", "gpu"]
DEVICES = ("auto", "cpu", "gpu")
APPROX_METHODS = ("ivf",)


@dataclasses.dataclass(frozen=True)
class KnnGraph:
    """A k-nearest-neighbour graph over ``n`` positions (self excluded).

    Attributes
    ----------
    indices : ndarray of int64, shape (n, k)
        Positions (0 .. n-1) of each row's neighbours, most similar first.
    sims : ndarray of float32, shape (n, k)
        Cosine similarities, descending along each row.
    stats : dict
        How it was computed: method, block rows, seconds, FLOPs, device.
    """

    indices: np.ndarray
    sims: np.ndarray
    stats: dict[str, Any]

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def array_source(x: np.ndarray) -> VectorSource:
    """A vector source over an in-memory array (slices, no copies)."""

    def source(start: int, batch_rows: int) -> Iterator[np.ndarray]:
        for lo in range(start, x.shape[0], batch_rows):
            yield x[lo : lo + batch_rows]

    return source


def selection_source(selection: Selection, model: str | None = None) -> VectorSource:
    """A vector source streaming ``selection``'s vectors chunk by chunk from the store.

    Position ``p`` is ``selection.rows[p]``.
    """
    from cxrstore.store.selection import Selection

    name = selection._model(model)

    def source(start: int, batch_rows: int) -> Iterator[np.ndarray]:
        sub = Selection(selection.store, selection.rows[start:], name)
        for _, vecs in sub.iter_vectors(name, batch_rows=batch_rows):
            yield vecs

    return source


def default_block_rows(dim: int, *, memory_mb: float = 512.0) -> int:
    """Rows per block so that two vector blocks (and their reading buffer) and one
    block of similarities fit in ``memory_mb``: ``3*B*dim + B*B`` float32 values.

    Clamped to [64, 8192] and rounded down to a multiple of 64.
    """
    if dim < 1:
        raise UsageError(f"dim must be positive, got {dim}")
    if memory_mb <= 0:
        raise UsageError(f"memory_mb must be positive, got {memory_mb}")
    budget = memory_mb * 2**20
    # 4 B^2 + 12 dim B - budget = 0
    b = (-12 * dim + math.sqrt(144 * dim * dim + 16 * budget)) / 8
    return int(max(64, min(8192, int(b) // 64 * 64)))


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of the rows of ``x`` (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]  # no (n, d) temporary
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise UsageError(f"k={k} needs more than {k} rows; the selection has {n}")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise UsageError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "gpu" and not _gpu_available():
        raise UsageError("device 'gpu' asked for, but FAISS has no GPU here (install faiss-gpu on a CUDA machine) ; use 'cpu' or 'auto'")
    if device == "auto":
        return "gpu" if _gpu_available() else "cpu"
    return device


def exact_knn(
    source: VectorSource,
    n: int,
    *,
    k: int = 15,
    block_rows: int | None = None,
    memory_mb: float = 512.0,
    device: Device = "auto",
) -> KnnGraph:
    """Exact cosine kNN of every position against all others (itself excluded).

    Parameters
    ----------
    source : VectorSource
        Streams the ``n`` vectors (any float dtype; normalised here, block by block).
    n : int
        Number of vectors the source yields from position 0.
    k : int
        Neighbours per row (``k < n``).
    block_rows : int, optional
        Rows per block; default from ``memory_mb`` and the dimension
        (:func:`default_block_rows`). Peak memory is about
        ``3 * block_rows * dim + block_rows**2`` float32 values plus ``12 n k`` bytes.
    memory_mb : float
        Budget for the blocks when ``block_rows`` is not given.
    device : {"auto", "cpu", "gpu"}
        Where the block products run; ``auto`` uses GPU FAISS when there is one.

    Returns
    -------
    KnnGraph
    """
    import numba  # here, not at import time: importing numba costs every CLI start 0.13 s

    from cxrstore.analysis._topk import empty_lists, merge_cols, merge_rows

    _check_k(k, n)
    dev = _resolve_device(device)
    t0 = time.perf_counter()
    D, I = empty_lists(n, k)
    parts = max(1, numba.get_num_threads())
    gpu_res = faiss.StandardGpuResources() if dev == "gpu" else None
    flops = 0.0
    matmul_s = 0.0
    rows_read = 0
    dim = None
    B = block_rows
    buf: np.ndarray | None = None
    i0 = 0
    while i0 < n:
        if B is None:
            first = next(iter(source(0, 1)), None)
            if first is None:
                raise UsageError("the vector source yielded nothing")
            dim = int(first.shape[1])
            B = default_block_rows(dim, memory_mb=memory_mb)
        if B < 1:
            raise UsageError(f"block_rows must be positive, got {B}")
        if buf is None and gpu_res is None:
            buf = np.empty(min(B, n) ** 2, dtype=np.float32)  # one similarity block, reused: no page faults per product
        it = iter(source(i0, B))
        q_raw = next(it, None)
        if q_raw is None:
            raise ValueError(f"vector source ended at position {i0}, expected {n} rows")
        q = normalise(q_raw)
        del q_raw
        dim = q.shape[1]
        bi = q.shape[0]
        rows_read += bi
        # the diagonal block: self excluded
        tm = time.perf_counter()
        if gpu_res is not None:
            _gpu_pair(gpu_res, D, I, q, q, i0, i0, k, diagonal=True)
        else:
            s = _product(q, q, buf)
            np.fill_diagonal(s, -np.inf)
            matmul_s += time.perf_counter() - tm
            merge_rows(s, D, I, i0, i0)
        flops += 2.0 * bi * bi * dim
        j0 = i0 + bi
        for x_raw in it:
            x = normalise(x_raw)
            del x_raw
            bj = x.shape[0]
            if j0 + bj > n:
                raise ValueError(f"vector source yielded more than the {n} rows announced")
            rows_read += bj
            tm = time.perf_counter()
            if gpu_res is not None:
                _gpu_pair(gpu_res, D, I, q, x, i0, j0, k, diagonal=False)
            else:
                s = _product(q, x, buf)
                matmul_s += time.perf_counter() - tm
                merge_rows(s, D, I, i0, j0)
                merge_cols(s, D, I, i0, j0, parts)
            flops += 2.0 * bi * bj * dim
            j0 += bj
            del x
        if j0 != n:
            raise ValueError(f"vector source yielded {j0} rows, expected {n}")
        i0 += bi
        del q
    seconds = time.perf_counter() - t0
    stats = {
        "method": "exact",
        "device": dev,
        "block_rows": int(B or 0),
        "dim": int(dim or 0),
        "seconds": seconds,
        "gemm_flops": flops,
        "gemm_seconds": matmul_s,
        "gflops_per_s": flops / seconds / 1e9 if seconds > 0 else float("nan"),
        "rows_read": rows_read,
        "passes": rows_read / n,
    }
    logger.info("exact kNN: %d rows, k=%d, %.1f s (%.1f GFLOP/s)", n, k, seconds, stats["gflops_per_s"])
    return KnnGraph(indices=I, sims=D, stats=stats)


def _product(q: np.ndarray, x: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``q @ x.T`` written into the start of ``buf`` (1-D, at least ``len(q) * len(x)``)."""
    out = buf[: q.shape[0] * x.shape[0]].reshape(q.shape[0], x.shape[0])
    return np.matmul(q, x.T, out=out)


def _gpu_pair(res: Any, D: np.ndarray, I: np.ndarray, q: np.ndarray, x: np.ndarray, i0: int, j0: int, k: int, *, diagonal: bool) -> None:
    """One block pair on the GPU: top-k both ways with ``faiss.knn_gpu`` (not symmetric)."""
    from cxrstore.analysis._topk import merge_rows_ids

    metric = faiss.METRIC_INNER_PRODUCT
    if diagonal:
        kk = min(k + 1, q.shape[0])
        d, i = faiss.knn_gpu(res, q, q, kk, metric=metric)
        i = np.where(i == np.arange(q.shape[0])[:, None], -1, i)
        merge_rows_ids(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + i0, -1), D, I, i0)
        return
    kk = min(k, x.shape[0])
    d, i = faiss.knn_gpu(res, q, x, kk, metric=metric)
    merge_rows_ids(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + j0, -1), D, I, i0)
    kk = min(k, q.shape[0])
    d, i = faiss.knn_gpu(res, x, q, kk, metric=metric)
    merge_rows_ids(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + i0, -1), D, I, j0)


def approximate_knn(
    source: VectorSource,
    n: int,
    *,
    k: int = 15,
    method: Literal["ivf"] = "ivf",
    nlist: int | None = None,
    nprobe: int | None = None,
    train_rows: int | None = None,
    block_rows: int = 4096,
    seed: int = 0,
) -> KnnGraph:
    """Approximate cosine kNN with a FAISS IVF-Flat index (inner product, normalised).

    The index holds all ``n`` vectors in memory (``4 n dim`` bytes); the stream is read
    three times (training sample, adding, searching). Measure the recall with
    :func:`sample_recall`.

    Parameters
    ----------
    nlist : int, optional
        Inverted lists; default ``4 sqrt(n)`` (at most ``n // 39``).
    nprobe : int, optional
        Lists visited per query; default ``nlist // 8`` (at least 16).
    train_rows : int, optional
        Rows sampled (seeded) to train the coarse quantiser; default ``min(n, 50 nlist)``.
    """
    _check_k(k, n)
    if method not in APPROX_METHODS:
        raise UsageError(f"approximate method {method!r} is not one of {', '.join(APPROX_METHODS)}")
    t0 = time.perf_counter()
    nlist = int(nlist or max(1, min(int(4 * math.sqrt(n)), n // 39)))
    nprobe = int(nprobe or min(nlist, max(16, nlist // 8)))
    train_rows = int(min(n, train_rows or 50 * nlist))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=train_rows, replace=False))
    train = _gather(source, sample, block_rows)
    dim = train.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.train(train)
    del train
    for x in source(0, block_rows):
        index.add(normalise(x))
    index.nprobe = nprobe
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    pos = 0
    for x in source(0, block_rows):
        b = x.shape[0]
        d, i = index.search(normalise(x), k + 1)
        own = np.arange(pos, pos + b)[:, None]
        not_self = i != own
        # keep the first k entries that are not the row itself
        order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
        indices[pos : pos + b] = np.take_along_axis(i, order, axis=1)
        sims[pos : pos + b] = np.take_along_axis(d, order, axis=1)
        pos += b
    seconds = time.perf_counter() - t0
    stats = {"method": method, "nlist": nlist, "nprobe": nprobe, "train_rows": train_rows, "dim": int(dim), "seconds": seconds, "device": "cpu"}
    return KnnGraph(indices=indices, sims=sims, stats=stats)


def _gather(source: VectorSource, positions: np.ndarray, block_rows: int) -> np.ndarray:
    """Normalised vectors at sorted ``positions`` (one pass over the stream)."""
    out: list[np.ndarray] = []
    pos = 0
    for x in source(0, block_rows):
        b = x.shape[0]
        lo, hi = np.searchsorted(positions, [pos, pos + b])
        if hi > lo:
            out.append(normalise(x[positions[lo:hi] - pos]))
        pos += b
    return np.concatenate(out)


def exact_knn_of(
    source: VectorSource, n: int, positions: np.ndarray, *, k: int = 15, block_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbours (self excluded) of the rows at ``positions`` only: two passes.

    Returns ``(indices, sims)`` of shape ``(len(positions), k)``.
    """
    _check_k(k, n)
    positions = np.asarray(positions, dtype=np.int64)
    order = np.argsort(positions)
    queries = _gather(source, positions[order], block_rows)
    heap = faiss.ResultHeap(len(positions), k, keep_max=True)
    qpos = positions[order]
    allq = np.arange(qpos.size, dtype=np.int64)
    pos = 0
    for x in source(0, block_rows):
        x = normalise(x)
        s = queries @ x.T
        xpos = np.arange(pos, pos + x.shape[0], dtype=np.int64)
        mine = (qpos >= pos) & (qpos < pos + x.shape[0])
        s[np.flatnonzero(mine), qpos[mine] - pos] = -np.inf
        heap.add_result_subset(allq, s, xpos)
        pos += x.shape[0]
    heap.finalize()
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return heap.I[inv], heap.D[inv]


def sample_recall(
    graph: KnnGraph, source: VectorSource, *, sample: int = 1000, seed: int = 0, block_rows: int = 4096
) -> dict[str, Any]:
    """Recall@k of ``graph`` against exact neighbours on a seeded random sample of rows.

    Returns ``{"recall": float, "sample": int, "seed": int}``; recall is the mean fraction
    of each sampled row's exact k neighbours found in the graph's list.
    """
    n, k = graph.n, graph.k
    m = int(min(sample, n))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    exact, _ = exact_knn_of(source, n, rows, k=k, block_rows=block_rows)
    return {"recall": recall(graph.indices[rows], exact), "sample": m, "seed": int(seed)}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of ``|found_i & truth_i| / k`` (k = ``truth.shape[1]``)."""
    found = np.asarray(found)
    truth = np.asarray(truth)
    if found.shape[0] != truth.shape[0]:
        raise UsageError(f"recall needs the same rows: {found.shape[0]} vs {truth.shape[0]}")
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return float(hits / truth.size) if truth.size else float("nan")
