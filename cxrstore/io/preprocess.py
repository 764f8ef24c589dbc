"""The one uniform preprocessing step every encoder builds on.

:func:`preprocess` turns a :class:`~cxrstore.io.read.RawImage` into the *canonical
image*; encoders then do their own model-specific resizing and normalisation on it
(see :mod:`cxrstore.encoders.base`).

Policy (version :data:`POLICY_VERSION`)
---------------------------------------
1. Intensity: the pixels become ``float32`` in ``[0, 1]``: divided by 255 when
   ``raw.bits == 8`` and by 65535 when ``raw.bits == 16`` (whatever the dtype, so a
   16-bit image keeps its full precision); a ``float32`` image is min-max scaled over
   its own values (a constant image gives zeros; non-finite values are refused).
   No windowing, gamma, histogram equalisation or inversion happens here: the reader
   already made the image display-ready (MONOCHROME2 sense, VOI applied).
2. Size: when the longest side exceeds ``max_side``, the image is downscaled so that
   its longest side is exactly ``max_side`` and the other side is
   ``max(1, round(side * max_side / longest))`` (aspect ratio kept to within one
   pixel), by area averaging: Pillow's ``BOX`` filter on the ``float32`` ("F")
   image, with no ``reducing_gap`` approximation, so each output pixel is the exact
   area-weighted mean of the input pixels it covers (for an integer factor, the block
   mean). Images whose longest side is at most ``max_side`` are returned unresized:
   never upscaled.
3. The result is clipped to ``[0, 1]`` (guards against float rounding), C-contiguous,
   2-D ``float32``.

The parameters live in :class:`PreprocessConfig`, which round-trips through JSON so
that a store records exactly how its vectors' inputs were made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from cxrstore.errors import UsageError
from cxrstore.io.read import DEFAULT_MAX_PIXELS, RawImage, Source, read_image

__all__ = ["POLICY_VERSION", "PreprocessConfig", "load_canonical", "preprocess"]

#: Version of the policy in the module docstring; bumped whenever its output changes.
POLICY_VERSION = 1

_POLICY_NAME = "cxrstore.io.preprocess"


def _check_max_side(max_side: Any) -> int:
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise UsageError(f"max_side must be a positive integer, got {max_side!r}")
    return int(max_side)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of :func:`preprocess`; same config, same canonical image.

    Attributes
    ----------
    max_side : int, default 1024
        Longest side of the canonical image; larger images are area-downscaled,
        smaller ones left as they are.
    """

    max_side: int = 1024

    def __post_init__(self) -> None:
        _check_max_side(self.max_side)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict, including the policy name and version."""
        return {"policy": _POLICY_NAME, "policy_version": POLICY_VERSION, "max_side": int(self.max_side)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Rebuild a config written by :meth:`to_json`.

        Raises
        ------
        UsageError
            If `data` is not such a dict, has unknown keys, or was written under a
            different policy version (its canonical images would differ).
        """
        if not isinstance(data, dict):
            raise UsageError(f"preprocess config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"policy", "policy_version", "max_side"})
        if unknown:
            raise UsageError(
                f"unknown preprocess config keys {unknown}; valid are max_side, policy, policy_version"
            )
        version = data.get("policy_version", POLICY_VERSION)
        if data.get("policy", _POLICY_NAME) != _POLICY_NAME or version != POLICY_VERSION:
            raise UsageError(
                f"preprocess policy {data.get('policy')!r} version {version!r} is not the one this "
                f"cxrstore implements ({_POLICY_NAME!r} version {POLICY_VERSION})"
            )
        return cls(max_side=data.get("max_side", 1024))


def preprocess(raw: RawImage, *, max_side: int = 1024) -> np.ndarray:
    """Make the canonical image: float32 in [0, 1], longest side at most `max_side`.

    Parameters
    ----------
    raw : RawImage
        A decoded image, as returned by :func:`~cxrstore.io.read.read_image`.
    max_side : int, default 1024
        Longest side of the output; never upscaled.

    Returns
    -------
    numpy.ndarray
        2-D C-contiguous ``float32`` array with values in ``[0, 1]``; see the module
        docstring for the exact policy.

    Raises
    ------
    UsageError
        If `raw` is not a :class:`RawImage`, `max_side` is not a positive integer, or
        a float image holds non-finite values.
    """
    if not isinstance(raw, RawImage):
        raise UsageError(f"preprocess expects a RawImage, got {type(raw).__name__}")
    max_side = _check_max_side(max_side)
    image = _to_unit_float(raw)
    return _downscale(image, max_side)


def _to_unit_float(raw: RawImage) -> np.ndarray:
    px = raw.pixels
    if px.dtype == np.float32:
        return _minmax(px)
    full = 255.0 if raw.bits == 8 else 65535.0
    # One pass (convert and scale together): this runs on every image of an ingest.
    out = np.divide(px, np.float32(full), dtype=np.float32)
    if np.iinfo(px.dtype).max > full or np.iinfo(px.dtype).min < 0:
        np.clip(out, 0.0, 1.0, out=out)  # only a dtype wider than its bits can leave [0, 1]
    return out


def _minmax(px: np.ndarray) -> np.ndarray:
    if not np.isfinite(px).all():
        raise UsageError("float image holds NaN or infinite values")
    lo, hi = float(px.min()), float(px.max())
    if hi <= lo:
        return np.zeros(px.shape, dtype=np.float32)
    out = px.astype(np.float32)  # a copy: never scale the caller's array in place
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def target_size(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Output ``(rows, columns)`` of :func:`preprocess` for an input `shape`.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)`` of the input.
    max_side : int
        The longest side allowed.

    Returns
    -------
    tuple of int
        `shape` itself when its longest side is at most `max_side`; otherwise the
        longest side becomes `max_side` and the other ``max(1, round(side * scale))``.
    """
    rows, columns = int(shape[0]), int(shape[1])
    longest = max(rows, columns)
    if longest <= max_side:
        return rows, columns
    scale = max_side / longest
    if rows >= columns:
        return max_side, max(1, round(columns * scale))
    return max(1, round(rows * scale)), max_side


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    rows, columns = target_size(image.shape, max_side)
    if (rows, columns) == image.shape:
        return np.ascontiguousarray(image)
    resized = Image.fromarray(image).resize((columns, rows), Image.Resampling.BOX)  # mode "F"
    out = np.asarray(resized, dtype=np.float32).copy()
    np.clip(out, 0.0, 1.0, out=out)
    return out


def load_canonical(
    source: Source,
    config: PreprocessConfig | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a file and make its canonical image in one call.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        A DICOM, PNG or JPEG file or its content.
    config : PreprocessConfig, optional
        Preprocessing parameters; the default config when omitted.
    max_pixels : int, default DEFAULT_MAX_PIXELS
        Passed to :func:`~cxrstore.io.read.read_image`.

    Returns
    -------
    numpy.ndarray
        ``preprocess(read_image(source), max_side=config.max_side)``.

    Raises
    ------
    ImageReadError
        If the file cannot be read (see :func:`~cxrstore.io.read.read_image`).
    """
    if config is None:
        config = PreprocessConfig()
    elif not isinstance(config, PreprocessConfig):
        raise UsageError(f"config must be a PreprocessConfig, got {type(config).__name__}")
    return preprocess(read_image(source, max_pixels=max_pixels), max_side=config.max_side)
