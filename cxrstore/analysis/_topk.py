"""Running top-k lists updated from blocks of similarities (numba kernels).

A kNN graph keeps, per row, its ``k`` best similarities sorted in descending order
(``D``, float32) with their positions (``I``, int64), initialised to ``-inf`` / ``-1``.
Each block product ``s = q @ x.T`` (rows ``r0..``, columns ``c0..``) updates them:

- :func:`merge_rows`: every row of ``s`` into the lists of rows ``r0 + i``;
- :func:`merge_cols`: every column of ``s`` into the lists of rows ``c0 + j`` (the
  symmetric half, without transposing ``s``).

A value enters a list only when it beats the list's current k-th value, which after
the first blocks is true of a small fraction of the values: the kernels are one
streaming pass over ``s`` with a compare per value, in parallel (rows for
:func:`merge_rows`; column ranges for :func:`merge_cols`, each thread walking the rows
of ``s`` over its own columns so that reads stay contiguous). Every list is updated by
one thread in a fixed order, so results do not depend on the thread count; on equal
similarities the value seen first stays ahead.

This replaces FAISS's ``ResultHeap`` for the exact graph: the heap path needed a
transposed copy of every block for the symmetric half and left a full heap scan per
direction; measured by ``benchmarks/bench_cluster.py`` (``knn_fraction_of_matmul``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _insert(D: np.ndarray, I: np.ndarray, r: int, v: float, pos: int) -> None:
    k = D.shape[1]
    p = k - 1
    while p > 0 and D[r, p - 1] < v:
        D[r, p] = D[r, p - 1]
        I[r, p] = I[r, p - 1]
        p -= 1
    D[r, p] = v
    I[r, p] = pos


@numba.njit(parallel=True, cache=True, nogil=True)
def merge_rows(s: np.ndarray, D: np.ndarray, I: np.ndarray, r0: int, c0: int) -> None:
    """Merge each row ``i`` of ``s`` into the list of row ``r0 + i`` (positions ``c0 + j``)."""
    bi, bj = s.shape
    k = D.shape[1]
    for i in numba.prange(bi):
        r = r0 + i
        thr = D[r, k - 1]
        for j in range(bj):
            v = s[i, j]
            if v > thr:
                _insert(D, I, r, v, c0 + j)
                thr = D[r, k - 1]


@numba.njit(parallel=True, cache=True, nogil=True)
def merge_cols(s: np.ndarray, D: np.ndarray, I: np.ndarray, r0: int, c0: int, parts: int) -> None:
    """Merge each column ``j`` of ``s`` into the list of row ``c0 + j`` (positions ``r0 + i``).

    ``parts`` column ranges are processed in parallel; within one, rows of ``s`` are
    read in order so that a row of the list is updated in increasing ``i``.
    """
    bi, bj = s.shape
    k = D.shape[1]
    width = (bj + parts - 1) // parts
    for t in numba.prange(parts):
        lo = t * width
        hi = min(bj, lo + width)
        if lo >= hi:
            continue
        thr = np.empty(hi - lo, dtype=D.dtype)
        for j in range(lo, hi):
            thr[j - lo] = D[c0 + j, k - 1]
        for i in range(bi):
            for j in range(lo, hi):
                v = s[i, j]
                if v > thr[j - lo]:
                    _insert(D, I, c0 + j, v, r0 + i)
                    thr[j - lo] = D[c0 + j, k - 1]


def empty_lists(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I)`` for ``n`` rows: ``-inf`` similarities, ``-1`` positions."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


@numba.njit(parallel=True, cache=True, nogil=True)
def merge_rows_ids(vals: np.ndarray, ids: np.ndarray, D: np.ndarray, I: np.ndarray, r0: int) -> None:
    """Merge row ``i`` of ``vals`` (positions ``ids[i]``; ``-1`` ignored) into row ``r0 + i``."""
    bi, bj = vals.shape
    k = D.shape[1]
    for i in numba.prange(bi):
        r = r0 + i
        thr = D[r, k - 1]
        for j in range(bj):
            v = vals[i, j]
            if ids[i, j] >= 0 and v > thr:
                _insert(D, I, r, v, ids[i, j])
                thr = D[r, k - 1]


@numba.njit(cache=True, nogil=True)
def merge_rows_at(s: np.ndarray, cols: np.ndarray, D: np.ndarray, I: np.ndarray, rows: np.ndarray) -> None:
    """Merge row ``i`` of ``s`` (positions ``cols[j]``) into the list of row ``rows[i]``;
    a row's own position is skipped.

    Serial: the approximate graph calls it once per product (queued queries x one group
    of list members), hundreds of times per graph, where the merge is a small part of the
    product's time; a parallel region's barrier would stall whenever another process
    holds a core (measured: 2.7 s of barriers against 0.08 s of serial merging at 20,000 x
    1024 on a loaded machine).
    """
    bi, bj = s.shape
    k = D.shape[1]
    for i in range(bi):
        r = rows[i]
        thr = D[r, k - 1]
        for j in range(bj):
            v = s[i, j]
            if v > thr and cols[j] != r:
                _insert(D, I, r, v, cols[j])
                thr = D[r, k - 1]
