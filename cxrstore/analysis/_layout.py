"""UMAP's layout optimisation, parallel and bit-reproducible for a seed (numba kernels).

umap-learn optimises a seeded layout in one thread: its parallel path is Hogwild SGD
(threads read and write each other's points at will) and so varies from run to run.
:func:`optimize_layout` runs the same stochastic gradient descent (the math of
``umap.layouts._optimize_layout_euclidean_single_epoch``, umap-learn 0.5: attraction
``-2ab d^(2(b-1)) / (1 + a d^(2b))``, repulsion ``2 gamma b / ((0.001 + d^2)(1 + a d^(2b)))``,
each coordinate's gradient clipped to [-4, 4], ``negative_sample_rate`` negative samples
per positive sample, edges sampled every ``epochs_per_sample`` epochs, learning rate
``initial_alpha * (1 - epoch / n_epochs)`` updated after each epoch; the powers of the
squared distance are taken in single precision, the coordinates' own, and ``d^(2b)`` as
``d^(2(b-1)) d^2``) in an order that does not depend on the threads:

- The edges (CSR of the symmetric fuzzy graph, each undirected pair once per direction)
  are split into chunks of :data:`CHUNK_VERTICES` consecutive head vertices; the chunks
  are fixed by the graph alone, never by the thread count. Each epoch the chunks run in
  parallel (``numba.prange``, scheduled one chunk at a time so that a thread slowed by
  other work takes fewer), the edges of a chunk in CSR order.
- Each epoch starts from a snapshot ``prev`` of the embedding. An edge ``(j, k)`` moves
  only its head ``j`` (read from and written to the embedding: only ``j``'s chunk
  touches it); the tail ``k`` and the negative samples are read from ``prev``. Each
  undirected pair appears as ``(j, k)`` and ``(k, j)``, so both ends still move, each
  in its own chunk. umap-learn's fit (``move_other=True``) moves both ends on each of
  the two directed edges, i.e. every end twice per sample; the attraction step is
  therefore applied with weight :data:`ATTRACTION_MOVES` (2) so that the balance of
  attraction and repulsion is umap-learn's.
- Negative samples come from a splitmix64 stream keyed by ``(key, epoch, chunk)`` (the
  high 32 bits of each draw scaled to ``[0, n)``), so which thread runs a chunk, and
  when, does not matter.

The result is a function of the inputs and the key alone: bit-identical whatever
``numba.set_num_threads`` says (tested in ``tests/test_umap_layout.py``).
"""

from __future__ import annotations

import numba
import numpy as np

#: Head vertices per chunk (the unit of parallel work; independent of the thread count).
CHUNK_VERTICES = 256
#: Attraction steps per sampled directed edge (umap-learn's fit moves both ends of
#: both directed copies of each pair, i.e. each end twice).
ATTRACTION_MOVES = 2.0

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser (Steele, Lea & Flood 2014)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def chunk_key(key: np.uint64, epoch: np.int64, chunk: np.int64) -> np.uint64:
    """The RNG state of one chunk in one epoch: a hash of ``(key, epoch, chunk)``."""
    h = _mix(key + _GOLDEN)
    h = _mix(h ^ (np.uint64(epoch) * _GOLDEN))
    return _mix(h ^ (np.uint64(chunk) * _M2 + _GOLDEN))


@numba.njit(cache=True, nogil=True, inline="always")
def _clip(v: float) -> float:
    if v > 4.0:
        return 4.0
    if v < -4.0:
        return -4.0
    return v


@numba.njit(fastmath=True, cache=True, nogil=True)
def _chunk_epoch(
    emb: np.ndarray,
    prev: np.ndarray,
    indptr: np.ndarray,
    tail: np.ndarray,
    v0: int,
    v1: int,
    epochs_per_sample: np.ndarray,
    epochs_per_negative_sample: np.ndarray,
    epoch_of_next_sample: np.ndarray,
    epoch_of_next_negative_sample: np.ndarray,
    a: float,
    b: float,
    gamma: float,
    alpha: float,
    n: int,
    state: np.uint64,
    moves: float,
) -> None:
    """One epoch of the edges whose head is in ``v0..v1`` (umap-learn's single epoch,
    ``move_other=False``, tails and negative samples read from ``prev``)."""
    n_vertices = emb.shape[0]
    dim = emb.shape[1]
    nv = np.uint64(n_vertices)
    # single-precision powers (the coordinates are float32): powf costs about half of pow
    bf = np.float32(b)
    b1f = np.float32(b - 1.0)
    for j in range(v0, v1):
        for i in range(indptr[j], indptr[j + 1]):
            if epoch_of_next_sample[i] > n:
                continue
            k = tail[i]
            dist_squared = np.float32(0.0)
            for d in range(dim):
                diff = emb[j, d] - prev[k, d]
                dist_squared += diff * diff
            if dist_squared > 0.0:
                # d^(b-1) once: d^b = d^(b-1) * d
                p = pow(dist_squared, b1f)
                grad_coeff = -2.0 * a * b * p
                grad_coeff /= a * p * dist_squared + 1.0
            else:
                grad_coeff = 0.0
            for d in range(dim):
                grad_d = _clip(grad_coeff * (emb[j, d] - prev[k, d]))
                emb[j, d] += moves * grad_d * alpha
            epoch_of_next_sample[i] += epochs_per_sample[i]

            n_neg_samples = int((n - epoch_of_next_negative_sample[i]) / epochs_per_negative_sample[i])
            for _ in range(n_neg_samples):
                state += _GOLDEN
                # the high 32 bits scaled to [0, n) (Lemire's reduction, no division)
                k = np.int64(((_mix(state) >> np.uint64(32)) * nv) >> np.uint64(32))
                if k == j:
                    continue
                dist_squared = np.float32(0.0)
                for d in range(dim):
                    diff = emb[j, d] - prev[k, d]
                    dist_squared += diff * diff
                if dist_squared > 0.0:
                    grad_coeff = 2.0 * gamma * b
                    grad_coeff /= (0.001 + dist_squared) * (a * pow(dist_squared, bf) + 1.0)
                    for d in range(dim):
                        emb[j, d] += _clip(grad_coeff * (emb[j, d] - prev[k, d])) * alpha
            epoch_of_next_negative_sample[i] += n_neg_samples * epochs_per_negative_sample[i]


@numba.njit(cache=True, nogil=True)
def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` as a plain loop (not a parallel region: see :func:`_optimize`)."""
    for i in range(src.shape[0]):
        for d in range(src.shape[1]):
            dst[i, d] = src[i, d]


@numba.njit(fastmath=True, cache=True, nogil=True, parallel=True)
def _optimize(
    emb: np.ndarray,
    indptr: np.ndarray,
    tail: np.ndarray,
    epochs_per_sample: np.ndarray,
    epochs_per_negative_sample: np.ndarray,
    epoch_of_next_sample: np.ndarray,
    epoch_of_next_negative_sample: np.ndarray,
    prev: np.ndarray,
    a: float,
    b: float,
    gamma: float,
    initial_alpha: float,
    n_epochs: int,
    key: np.uint64,
    chunk_vertices: int,
    moves: float,
) -> None:
    # The only parallel region is the loop over chunks, which optimize_layout schedules
    # dynamically one chunk at a time (numba.parallel_chunksize(1): a thread slowed by
    # other work then takes fewer chunks); which thread runs a chunk, and when, does
    # not change what it computes.
    n_vertices = emb.shape[0]
    n_chunks = (n_vertices + chunk_vertices - 1) // chunk_vertices
    alpha = initial_alpha
    for n in range(n_epochs):
        _copy_into(prev, emb)
        for c in numba.prange(n_chunks):
            v0 = c * chunk_vertices
            v1 = min(n_vertices, v0 + chunk_vertices)
            _chunk_epoch(
                emb,
                prev,
                indptr,
                tail,
                v0,
                v1,
                epochs_per_sample,
                epochs_per_negative_sample,
                epoch_of_next_sample,
                epoch_of_next_negative_sample,
                a,
                b,
                gamma,
                alpha,
                n,
                chunk_key(key, n, c),
                moves,
            )
        # umap-learn updates alpha after each epoch, so epochs 0 and 1 both use initial_alpha
        alpha = initial_alpha * (1.0 - float(n) / float(n_epochs))


def optimize_layout(
    embedding: np.ndarray,
    indptr: np.ndarray,
    tail: np.ndarray,
    epochs_per_sample: np.ndarray,
    *,
    a: float,
    b: float,
    n_epochs: int,
    key: int,
    gamma: float = 1.0,
    initial_alpha: float = 1.0,
    negative_sample_rate: float = 5.0,
    chunk_vertices: int = CHUNK_VERTICES,
    attraction_moves: float = ATTRACTION_MOVES,
) -> np.ndarray:
    """Optimise ``embedding`` (float32, n x dim) in place and return it.

    Parameters
    ----------
    embedding : ndarray of float32, shape (n, dim)
        Initial layout (umap-learn's: spectral, scaled to [0, 10]); C-contiguous.
    indptr, tail : ndarray
        CSR structure of the symmetric fuzzy graph (``indptr`` n + 1 offsets, ``tail`` the
        column of each edge); each row's edges are its head's.
    epochs_per_sample : ndarray of float64
        Per edge, as ``umap.umap_.make_epochs_per_sample`` gives (positive for every edge).
    a, b : float
        Curve parameters (``umap.umap_.find_ab_params``).
    n_epochs : int
    key : int
        Seed of the negative-sample streams (any int; reduced modulo 2**64).
    gamma, initial_alpha, negative_sample_rate : float
        umap-learn's ``repulsion_strength``, ``learning_rate``, ``negative_sample_rate``.
    chunk_vertices : int
        Head vertices per chunk. The result depends on it (not on the thread count).
    attraction_moves : float
        Weight of each attraction step (see :data:`ATTRACTION_MOVES`).
    """
    if embedding.dtype != np.float32 or not embedding.flags.c_contiguous or embedding.ndim != 2:
        raise ValueError("embedding must be a C-contiguous float32 (n, dim) array")
    n = embedding.shape[0]
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    tail = np.ascontiguousarray(tail, dtype=np.int64)
    eps = np.ascontiguousarray(epochs_per_sample, dtype=np.float64)
    if indptr.shape != (n + 1,) or tail.shape != eps.shape or indptr[-1] != tail.size:
        raise ValueError("indptr, tail and epochs_per_sample do not describe a CSR graph of the embedding's rows")
    if chunk_vertices < 1 or n_epochs < 0:
        raise ValueError("chunk_vertices must be positive and n_epochs non-negative")
    if n == 0 or n_epochs == 0:
        return embedding
    eps_neg = eps / float(negative_sample_rate)
    with numba.parallel_chunksize(1):
        _optimize(
            embedding, indptr, tail, eps, eps_neg, eps.copy(), eps_neg.copy(), embedding.copy(),
            float(a), float(b), float(gamma), float(initial_alpha), int(n_epochs),
            np.uint64(int(key) % 2**64), int(chunk_vertices), float(attraction_moves),
        )
    return embedding
