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

Approximate mode (:func:`approximate_knn`, ``"ivf"``) partitions the rows into lists by
spherical k-means (FAISS) and multiplies each row only with the members of its nearest
lists, by the same kind of blocked products, streamed with the same bounded memory. How
many lists a row probes is calibrated on the exact neighbours of a sample so that recall
reaches a target (0.99 by default); measure the result independently with
:func:`sample_recall`, which computes the exact neighbours of a random sample of rows.
It pays off where the products dominate, i.e. for large ``n`` and moderate dimension: at
50,000 x 1024 (two cores, from a store) it computed 12 % of all pairs (the exact graph:
50 %) in 9.3 s against 12.3 s, at recall 0.998. At 24,576 dimensions its extra passes
over the stream cost more than the products save (20,000 rows: 23 % of the pairs, 60 s
against 40 s).
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
#: Approximate mode: recall@k the calibration of ``nprobe`` aims for, on this many rows,
#: and the most lists a row may probe (beyond, a flat exact graph costs little more).
TARGET_RECALL = 0.99
CALIBRATION_ROWS = 500
MAX_PROBE = 64
#: Approximate mode: most list members multiplied together. Smaller groups compute fewer
#: pairs that no row probes but cost one more pass over the stream each (50,000 x 1024
#: read from a store, two cores: 8.1-9.3 s with groups of 2,048 rows, 8.3 s with 4,096,
#: 8.9 s with 8,192; 12 %, 18 % and 28 % of all pairs; the exact graph took 12.6 s).
GROUP_ROWS = 2048


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
    B = block_rows if block_rows is not None else default_block_rows(_source_dim(source), memory_mb=memory_mb)
    if B < 1:
        raise UsageError(f"block_rows must be positive, got {B}")
    # one similarity block, reused: no page faults per product
    buf = np.empty(min(B, n) ** 2, dtype=np.float32) if gpu_res is None else None
    i0 = 0
    while i0 < n:
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
    target_recall: float = TARGET_RECALL,
    calibration_rows: int = CALIBRATION_ROWS,
    train_rows: int | None = None,
    block_rows: int | None = None,
    memory_mb: float = 512.0,
    group_rows: int | None = None,
    seed: int = 0,
) -> KnnGraph:
    """Approximate cosine kNN: exact products restricted to the probed lists of a partition.

    The vectors are partitioned into ``nlist`` lists by spherical k-means (FAISS, trained
    on a seeded sample). Every row is searched *exactly* (blocked matrix products, as
    :func:`exact_knn`) against the members of its ``nprobe`` nearest lists: a true
    neighbour is missed only when its list is not among them. That makes the recall of a
    given ``nprobe`` computable from the exact neighbours of a sample of rows and the
    list assignments alone, so ``nprobe`` is *calibrated*: the smallest one whose recall
    on ``calibration_rows`` seeded rows reaches ``target_recall`` (``nprobe = nlist`` is
    the exact graph). Measure the result independently with :func:`sample_recall`.

    Lists are ordered along a nearest-centroid chain and cut into groups of at most
    ``group_rows`` members; each group is multiplied by the rows that probe one of its
    lists (queued to a block's worth, so products stay large), which computes a superset
    of the probed pairs: the recall is at least the calibrated one. Memory stays bounded:
    about four blocks of vectors (the group, the next group gathered during the same
    pass, the block read, the queued queries; each at most ``block_rows`` rows, which
    defaults to three quarters of :func:`exact_knn`'s for the same ``memory_mb``), the
    k-means sample (at most two blocks) and ``n x nprobe_max`` list ranks. The stream is
    read once per group, plus three times (sample, ranks, first group) and twice for the
    calibration.

    Parameters
    ----------
    nlist : int, optional
        Lists; default ``sqrt(n)`` (each list then holds about ``sqrt(n)`` rows), fewer
        when the k-means sample (at most two blocks of rows) would have less than 39 rows
        a list.
    nprobe : int, optional
        Lists searched per row; default: calibrated to ``target_recall``.
    target_recall : float
        Recall@k the calibration aims for (on its sample).
    calibration_rows : int
        Rows whose exact neighbours calibrate ``nprobe`` (two passes over the stream).
    train_rows : int, optional
        K-means training sample; default ``40 nlist``, at most two blocks of rows.
    block_rows, memory_mb
        As :func:`exact_knn`.
    group_rows : int, optional
        List members multiplied at once (default ``GROUP_ROWS``, at most ``block_rows``).
    seed : int
        Seeds the training and calibration samples and k-means.
    """
    from cxrstore.analysis._topk import empty_lists, merge_rows_at

    _check_k(k, n)
    if method not in APPROX_METHODS:
        raise UsageError(f"approximate method {method!r} is not one of {', '.join(APPROX_METHODS)}")
    if not 0.0 < target_recall <= 1.0:
        raise UsageError(f"target_recall must be in (0, 1], got {target_recall}")
    t0 = time.perf_counter()
    dim = _source_dim(source)
    # four blocks of vectors (the group searched, the next one, the block read and its
    # selected rows) where exact_knn holds three
    B = int(block_rows or default_block_rows(dim, memory_mb=0.75 * memory_mb))
    if B < 1:
        raise UsageError(f"block_rows must be positive, got {B}")
    # the k-means sample is held whole: at most two blocks, 39 rows or more a list
    train_cap = min(n, 2 * B)
    nlist = int(nlist or max(1, min(round(math.sqrt(n)), train_cap // 39)))
    if not 1 <= nlist <= n:
        raise UsageError(f"nlist must be in 1..{n}, got {nlist}")
    if nprobe is not None and not 1 <= nprobe <= nlist:
        raise UsageError(f"nprobe must be in 1..{nlist}, got {nprobe}")
    rng = np.random.default_rng(seed)
    train_rows = int(min(train_cap, train_rows or 40 * nlist))
    sample = np.sort(rng.choice(n, size=train_rows, replace=False))
    kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=int(seed), spherical=True, verbose=False)
    kmeans.cp.min_points_per_centroid = 1  # FAISS would print a warning below 39 per list
    kmeans.train(_gather(source, sample, B))
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    # list ranks: each row's lists, nearest first (at most max_probe of them)
    max_probe = nprobe if nprobe is not None else min(nlist, MAX_PROBE)
    ranks = np.empty((n, max_probe), dtype=np.int32)
    pos = 0
    for x in source(0, B):
        s = normalise(x) @ centroids.T
        b = s.shape[0]
        top = np.argpartition(-s, max_probe - 1, axis=1)[:, :max_probe] if max_probe < nlist else np.tile(np.arange(nlist), (b, 1))
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        ranks[pos : pos + b] = np.take_along_axis(top, order, 1)
        pos += b
    if pos != n:
        raise ValueError(f"vector source yielded {pos} rows, expected {n}")
    assign = ranks[:, 0].copy()
    calibration: dict[str, Any] | None = None
    if nprobe is None:
        nprobe, calibration = _calibrate_nprobe(source, n, k, ranks, assign, target_recall, calibration_rows, seed + 1, B)
    probes = ranks[:, :nprobe]
    del ranks
    # members in an order where neighbouring lists follow each other; groups of at most
    # G members; while one group is searched, the next one is gathered from the same pass
    rank_of_list = np.empty(nlist, dtype=np.int64)
    rank_of_list[_chain(centroids)] = np.arange(nlist)
    perm = np.argsort(rank_of_list[assign], kind="stable").astype(np.int64)
    G = int(group_rows or min(B, GROUP_ROWS))
    if G < 1:
        raise UsageError(f"group_rows must be positive, got {G}")
    groups = [np.sort(perm[g0 : g0 + G]) for g0 in range(0, n, G)]
    D, I = empty_lists(n, k)
    flops = 0.0
    members = _gather(source, groups[0], B)
    rows_read = n
    for g, group in enumerate(groups):
        wanted = np.zeros(nlist, dtype=bool)
        wanted[assign[group]] = True
        following = groups[g + 1] if g + 1 < len(groups) else None
        parts: list[np.ndarray] = []
        queued: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, normalised rows)
        n_queued = 0
        q0 = 0
        for x in source(0, B):
            b = x.shape[0]
            rows_read += b
            who = np.flatnonzero(wanted[probes[q0 : q0 + b]].any(axis=1))
            if who.size:
                # queries are queued until a block's worth: one product of B x group rows,
                # not many thin ones (a thin product runs at half the rate or less)
                queued.append((who + q0, normalise(x[who])))
                n_queued += who.size
            if queued and (n_queued >= B or q0 + b == n):
                rows = np.concatenate([r for r, _ in queued])
                q = queued[0][1] if len(queued) == 1 else np.concatenate([v for _, v in queued])
                queued, n_queued = [], 0
                merge_rows_at(q @ members.T, group, D, I, rows)
                flops += 2.0 * rows.size * group.size * dim
                del q
            if following is not None:
                lo, hi = np.searchsorted(following, [q0, q0 + b])
                if hi > lo:
                    parts.append(normalise(x[following[lo:hi] - q0]))
            q0 += b
        if following is not None:
            members = np.concatenate(parts)
    seconds = time.perf_counter() - t0
    stats = {
        "method": method, "nlist": nlist, "nprobe": int(nprobe), "target_recall": float(target_recall),
        "calibration": calibration, "train_rows": train_rows, "dim": dim, "block_rows": B, "seconds": seconds,
        "device": "cpu", "gemm_flops": flops, "gflops_per_s": flops / seconds / 1e9 if seconds > 0 else float("nan"),
        "pairs_fraction": flops / (2.0 * n * n * dim), "passes": rows_read / n,
    }
    logger.info("approximate kNN: %d rows, nlist=%d, nprobe=%d, %.1f s", n, nlist, nprobe, seconds)
    return KnnGraph(indices=I, sims=D, stats=stats)


def _chain(centroids: np.ndarray) -> np.ndarray:
    """Lists in a greedy nearest-neighbour chain from list 0 (each next list is the most
    similar unvisited one), so that a group of consecutive lists covers one region."""
    sims = centroids @ centroids.T
    chain = np.empty(len(centroids), dtype=np.int64)
    seen = np.zeros(len(centroids), dtype=bool)
    cur = 0
    for i in range(len(centroids)):
        chain[i] = cur
        seen[cur] = True
        if i + 1 < len(centroids):
            cur = int(np.argmax(np.where(seen, -np.inf, sims[cur])))
    return chain


def _calibrate_nprobe(
    source: VectorSource, n: int, k: int, ranks: np.ndarray, assign: np.ndarray,
    target: float, rows: int, seed: int, block_rows: int,
) -> tuple[int, dict[str, Any]]:
    """The smallest ``nprobe`` whose recall@k on a seeded sample reaches ``target``.

    A sampled row finds a true neighbour iff the neighbour's list is among the row's
    first ``nprobe`` lists, so recall for every ``nprobe`` follows from one exact search.
    """
    m = int(min(rows, n))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    truth, _ = exact_knn_of(source, n, sample, k=k, block_rows=block_rows)
    width = ranks.shape[1]
    rank_of = np.full((m, k), width, dtype=np.int64)  # rank of each true neighbour's list
    for j in range(width):
        hit = ranks[sample, j][:, None] == assign[truth]
        rank_of[hit] = j
    found = np.bincount(rank_of.ravel(), minlength=width + 1)[:width].cumsum() / rank_of.size
    reached = np.flatnonzero(found >= target)
    nprobe = int(reached[0] + 1) if reached.size else width
    if not reached.size:
        logger.warning("approximate kNN: recall %.3f < %.3f with the widest nprobe %d", found[-1], target, width)
    record = {
        "sample": m, "seed": int(seed), "target_recall": float(target), "reached": bool(reached.size),
        "recall": float(found[nprobe - 1]),
        "recall_by_nprobe": [round(float(v), 4) for v in found[: min(width, nprobe + 4)]],
    }
    return nprobe, record


def _source_dim(source: VectorSource) -> int:
    """The dimension of the source's vectors (reads its first row)."""
    first = next(iter(source(0, 1)), None)
    if first is None:
        raise UsageError("the vector source yielded nothing")
    return int(first.shape[1])


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
