"""The ``baseline`` encoder: training-free, deterministic hand-made image features.

It is the default encoder of the demo and of the tests, and the reference point
every foundation model has to beat: it needs no weights, runs in about a
millisecond per image on one CPU core and still carries real signal (on the
synthetic demo set a logistic regression on it detects each planted finding).

Pipeline
--------
``prepare`` (in worker processes, one canonical image at a time):

1. The canonical image (2-D, values in [0, 1], any size and aspect; cast to
   float32) is resized to ``work_size`` x ``work_size`` (default 256) by box
   averaging: exact block means when both sides are multiples of
   ``work_size``, PIL's BOX filter otherwise (which also enlarges small
   images). The aspect ratio is not kept: the image is stretched to the square.
2. Feature blocks are computed on that working image ``I`` and on its box
   pyramid ``I/2``, ``I/4``, ``I/8`` (2x2 block means) (``g`` = number of HOG
   orientation bins, ``h`` = number of histogram bins):

   ========================  ==============================================  ===========
   block                     content                                         size
   ========================  ==============================================  ===========
   ``grid_mean``             mean of ``I`` over 1x1, 2x2, 4x4 and 8x8 grids  85
   ``grid_std``              standard deviation over the same cells          85
   ``hog``                   magnitude-weighted histogram of unsigned        16 * g
                             gradient orientation (central differences
                             on ``I/2``),
                             ``g`` bins in each cell of a 4x4 grid, each
                             cell L2-normalised
   ``grad_energy``           mean gradient magnitude of ``I/2`` over an      64
                             8x8 grid
   ``laplacian_energy``      mean absolute 4-neighbour Laplacian (texture,   64
                             band-pass energy) over a 4x4 grid, at 4
                             scales: ``I``, ``I/2``, ``I/4``, ``I/8``
   ``histogram``             intensity histogram of ``I/2`` (``h`` bins on   5 * h
                             [0, 1], fractions) of the whole image and of
                             each 2x2 quadrant
   ``stats``                 5 %, 25 %, 50 %, 75 %, 95 % quantiles (from a   6
                             ``4h``-bin histogram of ``I/2``) and the
                             skewness of ``I`` (squashed by tanh(s/3))
   ========================  ==============================================  ===========

   With the defaults (``g = 8``, ``h = 16``) the dimension is
   ``85 + 85 + 128 + 64 + 64 + 80 + 6 = 512``.
3. Each block is divided by its L2 norm (plus 1e-6), so that every block
   weighs the same whatever its size and units, and the blocks are
   concatenated into a float32 vector.

``forward`` stacks prepared vectors and applies a fixed normalisation: the
signed square root ``sign(x) * sqrt(|x|)`` of every component ("power
normalisation") followed by L2 normalisation of each row, so vectors have unit
norm and cosine similarity is a dot product.

The same input gives bit-identical output: there is no randomness and the
reductions run in a fixed order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from cxrstore.encoders.base import EncoderConfig, check_options, register_encoder
from cxrstore.errors import UsageError

__all__ = ["BaselineEncoder", "prepare_baseline"]

_VERSION = "1"
_GRIDS = (1, 2, 4, 8)
_HOG_GRID = 4
_ENERGY_GRID = 8
_LAP_GRID = 4
_LAP_SCALES = 4
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_EPS = 1e-6


def _resize(x: np.ndarray, n: int) -> np.ndarray:
    """Box-resize a 2-D float32 image to ``(n, n)``.

    Exact block means (strided sums) when both sides are multiples of ``n``,
    otherwise PIL's BOX filter (area averaging; nearest-like when enlarging).
    """
    h, w = x.shape
    if h == n and w == n:
        return x
    if h % n == 0 and w % n == 0:
        fh, fw = h // n, w // n
        r = x[0::fh].copy() if fh > 1 else x.copy()
        for j in range(1, fh):
            r += x[j::fh]
        if fw > 1:
            c = r[:, 0::fw].copy()
            for j in range(1, fw):
                c += r[:, j::fw]
            r = c
        r *= np.float32(1.0 / (fh * fw))
        return r
    return np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((n, n), Image.Resampling.BOX), dtype=np.float32)


def _grid_sum(a: np.ndarray, grid: int) -> np.ndarray:
    """Sums of a square 2-D array over a ``grid`` x ``grid`` partition (float64)."""
    n = a.shape[0]
    c = n // grid
    return a.reshape(grid, c, n).sum(axis=1).reshape(grid, grid, c).sum(axis=2, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _cell_index(n: int, grid: int) -> np.ndarray:
    """Flat (n*n,) index of the ``grid`` x ``grid`` cell of every pixel."""
    c = (np.arange(n) * grid) // n
    return (c[:, None] * grid + c[None, :]).ravel().astype(np.intp)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.sqrt(np.dot(v, v)) + _EPS)


def prepare_baseline(image: np.ndarray, *, work_size: int = 256, hog_bins: int = 8, hist_bins: int = 16) -> np.ndarray:
    """Compute the baseline feature vector of one canonical image.

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1] (cast to float32).
    work_size, hog_bins, hist_bins : int
        See :class:`BaselineEncoder`.

    Returns
    -------
    numpy.ndarray
        1-D float32 vector of length :func:`_feature_dim` (512 by default),
        each block L2-normalised (see the module docstring).

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty or contains NaN or infinity.
    """
    x = np.asarray(image)
    if x.ndim != 2:
        raise UsageError(f"baseline encoder expects a 2-D grayscale image, got shape {x.shape}")
    if x.size == 0:
        raise UsageError(f"baseline encoder got an empty image of shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    n = work_size
    img = np.ascontiguousarray(_resize(x, n), dtype=np.float32)
    flat = img.ravel()
    if not np.isfinite(flat.sum(dtype=np.float64)):
        raise UsageError("baseline encoder got an image containing NaN or infinity")
    npix = n * n

    # --- grid means and standard deviations -----------------------------------
    g8 = _GRIDS[-1]
    sq = img * img
    s1 = _grid_sum(img, g8)
    s2 = _grid_sum(sq, g8)
    means, stds = [], []
    for g in _GRIDS:
        k = g8 // g
        a1 = s1.reshape(g, k, g, k).sum(axis=(1, 3))
        a2 = s2.reshape(g, k, g, k).sum(axis=(1, 3))
        cnt = float(npix // (g * g))
        m = a1 / cnt
        means.append(m.ravel())
        stds.append(np.sqrt(np.maximum(a2 / cnt - m * m, 0.0)).ravel())
    grid_mean = np.concatenate(means)
    grid_std = np.concatenate(stds)

    # --- box pyramid: I, I/2, I/4, I/8 ------------------------------------------
    levels = [img]
    for _ in range(_LAP_SCALES - 1):
        lv = levels[-1]
        levels.append((lv[0::2, 0::2] + lv[1::2, 0::2] + lv[0::2, 1::2] + lv[1::2, 1::2]) * np.float32(0.25))
    half = levels[1]
    nh = n // 2

    # --- gradients of I/2: HOG and energy ---------------------------------------
    p = np.pad(half, 1, mode="edge")
    gx = p[1:-1, 2:] - p[1:-1, :-2]
    gy = p[2:, 1:-1] - p[:-2, 1:-1]
    mag = np.sqrt(gx * gx + gy * gy)
    ang = np.arctan2(gy, gx)  # (-pi, pi]; unsigned orientation = ang mod pi
    b = (ang * np.float32(hog_bins / np.pi) + np.float32(hog_bins)).astype(np.intp).ravel()  # floor, in [0, 2g]
    b %= hog_bins
    idx = _cell_index(nh, _HOG_GRID) * hog_bins + b
    hog = np.bincount(idx, weights=mag.ravel(), minlength=_HOG_GRID * _HOG_GRID * hog_bins)
    hog = hog.reshape(_HOG_GRID * _HOG_GRID, hog_bins)
    hog = (hog / (np.sqrt((hog * hog).sum(axis=1, keepdims=True)) + _EPS)).ravel()
    grad_energy = _grid_sum(mag, _ENERGY_GRID).ravel() / float(mag.size // _ENERGY_GRID**2)

    # --- band-pass (Laplacian) energy at 4 scales, each over a 4x4 grid -------
    lap_energy = []
    for level in levels:
        q = np.pad(level, 1, mode="edge")
        lap = np.abs(np.float32(4.0) * level - q[:-2, 1:-1] - q[2:, 1:-1] - q[1:-1, :-2] - q[1:-1, 2:])
        lap_energy.append(_grid_sum(lap, _LAP_GRID).ravel() / float(lap.size // _LAP_GRID**2))

    # --- intensity histograms (of I/2) and global statistics ----------------------
    npx = nh * nh
    fine = 4 * hist_bins
    q = (half.ravel() * np.float32(fine)).astype(np.intp)
    np.clip(q, 0, fine - 1, out=q)
    hq = np.bincount(_cell_index(nh, 2) * fine + q, minlength=4 * fine).reshape(4, fine).astype(np.float64)
    hglob = hq.sum(axis=0)
    quad_hist = hq.reshape(4, hist_bins, 4).sum(axis=2) / float(npx // 4)
    glob_hist = hglob.reshape(hist_bins, 4).sum(axis=1) / float(npx)
    cdf = np.cumsum(hglob) / float(npx)
    edges = np.arange(1, fine + 1, dtype=np.float64) / fine
    quant = np.interp(_QUANTILES, np.concatenate(([0.0], cdf)), np.concatenate(([0.0], edges)))
    mu = float(grid_mean[0])
    sd = float(grid_std[0])
    m3 = float(np.dot(sq.ravel(), flat)) / npix  # E[x^3] of I
    skew = (m3 - 3.0 * mu * sd * sd - mu**3) / (sd**3 + _EPS)
    stats = np.concatenate((quant, [np.tanh(skew / 3.0)]))

    blocks = (
        grid_mean,
        grid_std,
        hog,
        grad_energy,
        np.concatenate(lap_energy),
        np.concatenate((glob_hist, quad_hist.ravel())),
        stats,
    )
    return np.concatenate([_unit(np.asarray(v, dtype=np.float64)) for v in blocks]).astype(np.float32)


def _feature_dim(hog_bins: int, hist_bins: int) -> int:
    return (
        2 * sum(g * g for g in _GRIDS)
        + _HOG_GRID**2 * hog_bins
        + _ENERGY_GRID**2
        + _LAP_SCALES * _LAP_GRID**2
        + 5 * hist_bins
        + 6
    )


def _check_int(name: str, value: Any, lo: int, hi: int, multiple: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"baseline option {name} must be an integer, not {value!r}")
    v = int(value)
    if not lo <= v <= hi or v % multiple:
        extra = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise UsageError(f"baseline option {name}={value!r} is invalid: must be in [{lo}, {hi}]{extra}")
    return v


@register_encoder
class BaselineEncoder:
    """Training-free multi-scale intensity, gradient and texture features.

    Parameters
    ----------
    work_size : int, default 256
        Side of the square working image; a multiple of 32 in [32, 1024].
    hog_bins : int, default 8
        Orientation bins of the gradient histograms, in [2, 36].
    hist_bins : int, default 16
        Intensity histogram bins, in [2, 64].

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="baseline"``, ``version="1"``, the parameters above plus the
        fixed grids, and ``weights_sha256=None``.
    dim : int
        Length of the output vectors (512 with the defaults).
    native_shape : tuple of int
        ``(dim,)``.

    Raises
    ------
    UsageError
        On an unknown option or a value out of range.
    """

    name: ClassVar[str] = "baseline"

    def __init__(self, *, work_size: int = 256, hog_bins: int = 8, hist_bins: int = 16, **unknown: Any) -> None:
        check_options(self.name, unknown, "work_size, hog_bins, hist_bins")
        self.work_size = _check_int("work_size", work_size, 32, 1024, multiple=32)
        self.hog_bins = _check_int("hog_bins", hog_bins, 2, 36)
        self.hist_bins = _check_int("hist_bins", hist_bins, 2, 64)
        self.dim = _feature_dim(self.hog_bins, self.hist_bins)
        self.native_shape: tuple[int, ...] = (self.dim,)
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params={
                "work_size": self.work_size,
                "resize": "box",
                "grids": list(_GRIDS),
                "hog_grid": _HOG_GRID,
                "hog_bins": self.hog_bins,
                "energy_grid": _ENERGY_GRID,
                "laplacian_grid": _LAP_GRID,
                "laplacian_scales": _LAP_SCALES,
                "hist_bins": self.hist_bins,
                "quantiles": list(_QUANTILES),
                "block_norm": "l2",
                "final_norm": "signed_sqrt+l2",
            },
            weights_sha256=None,
        )

    def __repr__(self) -> str:
        return (
            f"BaselineEncoder(work_size={self.work_size}, hog_bins={self.hog_bins}, "
            f"hist_bins={self.hist_bins}, dim={self.dim})"
        )

    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable computing the (block-normalised) features of one image."""
        return functools.partial(
            prepare_baseline, work_size=self.work_size, hog_bins=self.hog_bins, hist_bins=self.hist_bins
        )

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Stack prepared vectors and apply signed square root + L2 normalisation.

        Returns
        -------
        numpy.ndarray
            ``(len(batch), dim)`` float32, rows of unit norm.
        """
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = np.stack([np.asarray(v, dtype=np.float32) for v in batch])
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UsageError(
                f"baseline forward expects prepared vectors of length {self.dim}, got batch shape {x.shape}"
            )
        x = np.sign(x) * np.sqrt(np.abs(x))
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        return (x / (norms + np.float32(_EPS))).astype(np.float32)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])
