"""Decode a DICOM, PNG or JPEG file to display-ready grayscale pixels.

Every image that enters cxrstore goes through :func:`read_image`, which returns a
:class:`RawImage`: a 2-D grayscale array in which brighter means more attenuating
(bone is white), at the bit depth the source really has. :mod:`cxrstore.io.preprocess`
turns that into the one canonical float image every encoder builds on.

Policy
------
Format detection
    By content only, never by file name: the PNG signature, the JPEG SOI marker
    ``FF D8 FF``, ``DICM`` at offset 128 (DICOM Part 10). A DICOM data set without the
    128-byte preamble is accepted only when its first bytes are a plausible group
    0002 or 0008 element *and* pydicom then finds Rows, Columns and Pixel Data in it.
    Anything else is refused with :class:`~cxrstore.errors.ImageReadError`.
Decompression bombs
    The width and height are read from the header (PNG ``IHDR``, JPEG ``SOFn``, DICOM
    Rows/Columns read with ``stop_before_pixels``) and the image is refused before any
    pixel is decoded when ``width * height > max_pixels``. Pillow's own global
    ``Image.MAX_IMAGE_PIXELS`` check is neither changed nor allowed to leak: its
    warning is captured and an over-limit error is turned into ``ImageReadError``.
PNG and JPEG
    8-bit grayscale stays ``uint8`` (``bits=8``); 16-bit grayscale PNG stays ``uint16``
    with all 16 bits (``bits=16``; never through ``convert('L')``). Colour images
    (RGB, RGBA, palette, grey+alpha) become grayscale: when all three channels are
    equal the first channel is taken exactly, otherwise ITU-R BT.601 luma
    ``0.299 R + 0.587 G + 0.114 B`` computed in floating point and rounded, 8 bits
    kept. Alpha is ignored. 16-bit colour PNG is refused (Pillow decodes it to 8 bits
    only), and so is CMYK JPEG (no radiograph is stored that way; the Adobe inversion
    conventions make a silent conversion unreliable). An EXIF orientation tag is
    applied so that the image is upright; ``source_shape`` is the stored shape.
DICOM
    Decoded with pydicom 3 (compressed transfer syntaxes through its plugins:
    pylibjpeg and Pillow for JPEG). Multi-frame data sets: only the **first frame**
    is decoded and returned. For MONOCHROME1/MONOCHROME2 the display pipeline is

    1. modality LUT: Modality LUT Sequence or Rescale Slope/Intercept
       (``pydicom.pixels.apply_modality_lut``); an identity rescale (1, 0) counts as
       none;
    2. VOI: the first item of the VOI LUT Sequence (``pydicom.pixels.apply_voi``;
       float input from a rescale is rounded to integers first, as the LUT indexes
       integers), else the **first** Window Center/Width pair of multi-valued
       windows, applied by :func:`window_to_unit` (the DICOM LINEAR, LINEAR_EXACT and
       SIGMOID formulas, as ``pydicom.pixels.apply_windowing``, vectorised in
       float32 and fine on float input), else none;
    3. scaling to the output range: the VOI output (a window's full range, a VOI
       LUT's ``[0, 2**depth - 1]``) goes linearly to ``[0, 255]`` (``uint8``,
       ``bits=8``) when the data are 8-bit (Bits Stored <= 8, no modality
       transform, no wider VOI LUT), else to ``[0, 65535]`` (``uint16``,
       ``bits=16``), rounded to the nearest integer. With no VOI, 8-bit unsigned
       data without a modality transform are kept as they are; anything else is
       min-max stretched over the image's own values;
    4. MONOCHROME1 is inverted (``max - value``), so the output always reads as
       MONOCHROME2. The Presentation LUT Shape is not applied on top (for
       MONOCHROME1 it only restates the inversion).

    An invalid window (e.g. width < 1) is logged as a warning and replaced by the
    min-max stretch; the step taken is listed in :attr:`RawImage.notes`.
    Colour DICOM (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its
    LUT) is made grayscale as for PNG; data stored in more than 8 bits are scaled
    from their Bits Stored range to 16 bits.

Warnings raised by Pillow or pydicom while a file is read are captured and logged
(INFO) rather than propagated; ``warnings.catch_warnings`` is process-global, so run
concurrent reads in processes rather than threads if other code depends on warning
filters at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Literal, Union

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    get_decoder,
    pixel_array,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrstore.errors import ImageReadError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageFormat",
    "RawImage",
    "image_size",
    "read_image",
    "rgb_to_gray",
    "sniff_format",
    "window_to_unit",
]

ImageFormat = Literal["dicom", "png", "jpeg"]
_Gray = tuple[np.ndarray, int, tuple[str, ...]]  # pixels, bits, notes
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

#: Largest ``width * height`` read by default: far above any radiograph
#: (about 4300 x 3500 = 15 Mpx), far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 120_000_000

#: Bytes :func:`sniff_format` needs to see to recognise every supported format.
SNIFF_BYTES = 132

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
_DICM_OFFSET = 128
_SUPPORTED = "supported are DICOM, PNG, JPEG"

# Exceptions Pillow and pydicom raise on corrupt, truncated or unsupported data.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
    InvalidDicomError,
)

# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}

# Explicit VRs as they appear in bytes 4:6 of an explicit-VR element.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)

_DECODER_HINTS = {
    "jpeg": "pip install pylibjpeg pylibjpeg-libjpeg",
    "jpeg2000": "pip install pylibjpeg pylibjpeg-openjpeg",
    "rle": "pip install pylibjpeg pylibjpeg-rle",
}


@dataclasses.dataclass(frozen=True, eq=False)
class RawImage:
    """A decoded image, grayscale and display-ready.

    Attributes
    ----------
    pixels : numpy.ndarray
        2-D array ``(rows, columns)``; brighter = more attenuating (MONOCHROME2
        sense). ``uint8`` when ``bits == 8``, ``uint16`` when ``bits == 16``;
        ``float32`` is accepted for images built by hand (min-max scaled by
        :func:`~cxrstore.io.preprocess.preprocess`).
    bits : int
        8 or 16: the significant bits of the values (16 for anything over 8).
    format : {"dicom", "png", "jpeg"}
        The format detected from the content.
    photometric : str
        How the source stored its samples: DICOM Photometric Interpretation
        (``"MONOCHROME1"``, ``"MONOCHROME2"``, ``"RGB"``...) or the Pillow mode
        (``"L"``, ``"I;16"``, ``"RGB"``, ``"P"``...).
    source_shape : tuple of int
        The stored shape before conversion, e.g. ``(rows, columns, 3)`` for RGB or
        ``(frames, rows, columns)`` for multi-frame DICOM.
    notes : tuple of str
        The conversion steps taken, e.g. ``("rescale", "window[0] center=40
        width=400", "invert MONOCHROME1")``.
    """

    pixels: np.ndarray
    bits: int
    format: ImageFormat
    photometric: str
    source_shape: tuple[int, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        px = self.pixels
        if not isinstance(px, np.ndarray) or px.ndim != 2:
            got = getattr(px, "shape", type(px).__name__)
            raise UsageError(f"RawImage.pixels must be a 2-D numpy array, got {got}")
        if px.dtype not in (np.uint8, np.uint16, np.float32):
            raise UsageError(f"RawImage.pixels dtype must be uint8, uint16 or float32, got {px.dtype}")
        if self.bits not in (8, 16):
            raise UsageError(f"RawImage.bits must be 8 or 16, got {self.bits!r}")
        if self.format not in ("dicom", "png", "jpeg"):
            raise UsageError(f"RawImage.format must be 'dicom', 'png' or 'jpeg', got {self.format!r}")


# --------------------------------------------------------------------------- sniffing


def sniff_format(header: bytes) -> ImageFormat | None:
    """Recognise an image format from the first bytes of a file.

    Parameters
    ----------
    header : bytes
        The start of the file; at least :data:`SNIFF_BYTES` (132) bytes when the file
        is that long, so that the DICOM ``DICM`` magic at offset 128 can be seen.

    Returns
    -------
    {"dicom", "png", "jpeg"} or None
        ``None`` when the bytes are none of the supported formats. ``"dicom"`` for a
        Part 10 file, or for a data set without preamble whose first element is a
        plausible group 0002/0008 element (confirm by reading it).
    """
    head = bytes(header[:SNIFF_BYTES])
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SOI):
        return "jpeg"
    if head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM":
        return "dicom"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return None


def _looks_like_bare_dicom(head: bytes) -> bool:
    """Whether `head` starts like a DICOM data set written without preamble."""
    if len(head) < 12:
        return False
    group, element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008) or element > 0x0100:
        # Big endian data sets start with group 0x0800 read little endian.
        group_be = struct.unpack_from(">H", head)[0]
        return group_be == 0x0008 and head[4:6] in _DICOM_VRS
    if head[4:6] in _DICOM_VRS:
        return True
    # Implicit VR little endian: a 4-byte length that a header element could have.
    (length,) = struct.unpack_from("<I", head, 4)
    return 0 < length <= 1024 and length % 2 == 0


# --------------------------------------------------------------------------- sources


def _label(source: Source) -> str | None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return None
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"source must be a path or bytes, got {type(source).__name__}")
    return os.fspath(source)


def _where(label: str | None) -> str:
    return label if label is not None else "in-memory bytes"


@contextlib.contextmanager
def _open_source(source: Source, label: str | None) -> Iterator[BinaryIO]:
    """Yield a seekable binary stream positioned at 0; map OS errors."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(source))
        return
    try:
        fp = open(source, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise ImageReadError("file not found", path=label) from None
    except IsADirectoryError:
        raise ImageReadError("is a directory, not an image file", path=label) from None
    except PermissionError:
        raise ImageReadError("permission denied: the file is not readable", path=label) from None
    except OSError as exc:
        raise ImageReadError(f"could not open file: {exc.strerror or exc}", path=label) from None
    with fp:
        yield fp


def _read_header(fp: BinaryIO, label: str | None) -> bytes:
    try:
        head = fp.read(SNIFF_BYTES)
        fp.seek(0)
    except OSError as exc:
        raise ImageReadError(f"could not read file: {exc.strerror or exc}", path=label) from None
    if not head:
        raise ImageReadError("file is empty (0 bytes)", path=label)
    return head


@contextlib.contextmanager
def _captured_warnings(label: str | None) -> Iterator[None]:
    """Turn library warnings into log records for the duration of a read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                logger.info("%s: %s: %s", _where(label), w.category.__name__, w.message)


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise UsageError(f"max_pixels must be a positive integer, got {max_pixels!r}")


def _refuse_bomb(rows: int, columns: int, max_pixels: int, label: str | None) -> None:
    if rows < 1 or columns < 1:
        raise ImageReadError(f"header gives an empty image size {columns}x{rows}", path=label)
    if rows * columns > max_pixels:
        raise ImageReadError(
            f"image of {columns}x{rows} = {rows * columns:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (max_pixels); refused before decoding as a possible "
            "decompression bomb",
            path=label,
        )


# --------------------------------------------------------------------------- public API


def image_size(source: Source) -> tuple[int, int]:
    """Height and width of an image, read from its header only.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        Path to a DICOM, PNG or JPEG file, or its content.

    Returns
    -------
    tuple of int
        ``(rows, columns)``, i.e. ``(height, width)`` in numpy order, as stored (before
        any EXIF orientation). For DICOM, the size of one frame.

    Raises
    ------
    ImageReadError
        If the file is missing, unreadable, empty, not a supported image or its
        header is corrupt.
    """
    label = _label(source)
    with _open_source(source, label) as fp:
        fmt = _sniff_stream(fp, label)
        if fmt == "dicom":
            return _dicom_size(_dicom_header(fp, label), label)
        return _pil_header(fp, fmt, label)[:2]


def read_image(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> RawImage:
    """Decode one DICOM, PNG or JPEG image to display-ready grayscale pixels.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        Path to the file, or its content. The format is detected from the content,
        never from the name.
    max_pixels : int, default DEFAULT_MAX_PIXELS
        Refuse, before decoding, images whose header claims more than this many
        pixels (``width * height``; per frame for DICOM).

    Returns
    -------
    RawImage
        2-D ``uint8`` (``bits=8``) or ``uint16`` (``bits=16``) pixels, brighter = more
        attenuating. See the module docstring for the exact policy per format;
        multi-frame DICOM gives its first frame.

    Raises
    ------
    ImageReadError
        Missing, unreadable, empty, truncated or corrupt file; content that is not
        DICOM, PNG or JPEG; an image over `max_pixels`; a DICOM whose transfer syntax
        has no decoder installed (the message names the package to install).
    UsageError
        If `max_pixels` is not a positive integer or `source` has the wrong type.
    """
    _check_max_pixels(max_pixels)
    label = _label(source)
    with _open_source(source, label) as fp:
        fmt = _sniff_stream(fp, label)
        if fmt == "dicom":
            return _read_dicom(fp, label, int(max_pixels))
        return _read_pil(fp, fmt, label, int(max_pixels))


def _sniff_stream(fp: BinaryIO, label: str | None) -> ImageFormat:
    head = _read_header(fp, label)
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageReadError(
            f"not an image: content starts with {head[:8]!r}, which is not a known "
            f"image signature; {_SUPPORTED} (detected by content, not by file name)",
            path=label,
        )
    return fmt


# --------------------------------------------------------------------------- PNG / JPEG


def _pil_header(fp: BinaryIO, fmt: ImageFormat, label: str | None) -> tuple[int, int, int, int]:
    """``(rows, columns, bit_depth, colour_type)`` from a PNG or JPEG header.

    For JPEG, ``bit_depth`` is the sample precision and ``colour_type`` the number of
    components.
    """
    try:
        if fmt == "png":
            return _png_header(fp, label)
        return _jpeg_header(fp, label)
    finally:
        fp.seek(0)


def _png_header(fp: BinaryIO, label: str | None) -> tuple[int, int, int, int]:
    data = fp.read(33)
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageReadError("corrupt PNG: missing or truncated IHDR header", path=label)
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return height, width, depth, colour


def _jpeg_header(fp: BinaryIO, label: str | None) -> tuple[int, int, int, int]:
    """Walk the JPEG markers up to the first start-of-frame segment."""
    fp.seek(2)
    while True:
        byte = fp.read(1)
        if byte != b"\xff":
            raise ImageReadError("corrupt JPEG: no frame header (SOF) before the data ends", path=label)
        marker = fp.read(1)
        while marker == b"\xff":  # fill bytes
            marker = fp.read(1)
        if not marker:
            raise ImageReadError("truncated JPEG: ends before its frame header (SOF)", path=label)
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):
            raise ImageReadError("corrupt JPEG: scan data before a frame header (SOF)", path=label)
        raw_len = fp.read(2)
        if len(raw_len) < 2:
            raise ImageReadError("truncated JPEG: ends inside a marker segment", path=label)
        (length,) = struct.unpack(">H", raw_len)
        if code in _JPEG_SOF:
            seg = fp.read(6)
            if len(seg) < 6:
                raise ImageReadError("truncated JPEG: ends inside its frame header", path=label)
            precision, height, width, components = struct.unpack(">BHHB", seg)
            return height, width, precision, components
        if length < 2:
            raise ImageReadError(f"corrupt JPEG: marker FF{code:02X} has length {length}", path=label)
        fp.seek(length - 2, io.SEEK_CUR)


def _read_pil(fp: BinaryIO, fmt: ImageFormat, label: str | None, max_pixels: int) -> RawImage:
    rows, columns, depth, colour = _pil_header(fp, fmt, label)
    _refuse_bomb(rows, columns, max_pixels, label)
    if fmt == "png" and depth == 16 and colour in (2, 4, 6):
        raise ImageReadError(
            "16-bit colour or grey+alpha PNG is not supported: Pillow decodes it to 8 bits "
            "only; save the image as 16-bit grayscale PNG (no alpha)",
            path=label,
        )
    name = fmt.upper()
    try:
        with _captured_warnings(label), Image.open(fp, formats=[name]) as im:
            im.load()
            orientation = _exif_orientation(im)
            pixels, bits, notes = _pil_to_gray(im, label)
            mode = im.mode
            source_shape = _pil_source_shape(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"refused by Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS): {exc}", path=label
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"corrupt or truncated {name} data: {exc}", path=label) from None
    if orientation not in (0, 1):
        pixels = _apply_orientation(pixels, orientation)
        notes += (f"exif orientation {orientation}",)
    return RawImage(pixels, bits, fmt, mode, source_shape, notes)


def _pil_source_shape(im: Image.Image) -> tuple[int, ...]:
    bands = len(im.getbands())
    return (im.height, im.width) if bands == 1 else (im.height, im.width, bands)


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip as ``PIL.ImageOps.exif_transpose`` does, on a numpy array."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr))


def _pil_to_gray(im: Image.Image, label: str | None) -> _Gray:
    """Grayscale pixels, significant bits and notes from a loaded Pillow image."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy(), 8, ()
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), 16, ()
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise ImageReadError("32-bit integer image with values outside 0..65535", path=label)
        return arr.astype(np.uint16), 16, ()
    if mode == "1":
        return np.asarray(im, dtype=np.uint8) * np.uint8(255), 8, ("1-bit to 0/255",)
    if mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.uint8).copy(), 8, ("alpha dropped",)
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGBA"))[..., :3]
        gray, note = rgb_to_gray(rgb)
        return gray, 8, ("palette expanded", note)
    if mode in ("RGB", "RGBA", "RGBX"):
        gray, note = rgb_to_gray(np.asarray(im)[..., :3])
        return gray, 8, (note,)
    if mode == "CMYK":
        raise ImageReadError(
            "CMYK JPEG is not supported (no radiograph is stored as CMYK); convert it to "
            "grayscale or RGB first",
            path=label,
        )
    raise ImageReadError(f"unsupported Pillow image mode {mode!r}", path=label)


def rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """Grayscale from an ``(..., 3)`` unsigned integer array, same dtype.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``uint8`` or ``uint16`` array whose last axis is R, G, B.

    Returns
    -------
    gray : numpy.ndarray
        The R channel exactly when all three channels are equal everywhere; else
        ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` computed in float and
        rounded to the nearest integer.
    note : str
        ``"equal rgb channels"`` or ``"rgb to bt.601 luma"``.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return np.ascontiguousarray(r), "equal rgb channels"
    ftype = np.float32 if rgb.dtype.itemsize == 1 else np.float64
    luma = r.astype(ftype) * ftype(0.299)
    luma += g.astype(ftype) * ftype(0.587)
    luma += b.astype(ftype) * ftype(0.114)
    np.rint(luma, out=luma)
    np.clip(luma, 0, np.iinfo(rgb.dtype).max, out=luma)
    return luma.astype(rgb.dtype), "rgb to bt.601 luma"


# --------------------------------------------------------------------------- DICOM


def _dicom_header(fp: BinaryIO, label: str | None) -> Dataset:
    """The data set without its pixel data; file position reset to 0."""
    try:
        with _captured_warnings(label):
            return pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"corrupt or truncated DICOM header: {exc}", path=label) from None
    finally:
        fp.seek(0)


def _dicom_size(ds: Dataset, label: str | None) -> tuple[int, int]:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(
            f"not an image: DICOM without Rows/Columns (SOP class {ds.get('SOPClassUID', 'unknown')}); "
            f"{_SUPPORTED} images",
            path=label,
        ) from None
    return rows, columns


def _read_dicom(fp: BinaryIO, label: str | None, max_pixels: int) -> RawImage:
    rows, columns = _dicom_size(_dicom_header(fp, label), label)
    _refuse_bomb(rows, columns, max_pixels, label)
    try:
        with _captured_warnings(label):
            ds = pydicom.dcmread(fp, force=True)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"corrupt or truncated DICOM: {exc}", path=label) from None
    if "PixelData" not in ds:
        raise ImageReadError("not an image: DICOM data set has no Pixel Data", path=label)
    tsyntax = _transfer_syntax(ds, label)
    arr, frames = _decode_first_frame(ds, tsyntax, label)
    pixels, bits, notes = _dicom_display(arr, ds, label)
    if frames > 1:
        notes = (f"first of {frames} frames",) + notes
    source_shape = ((frames,) if frames > 1 else ()) + tuple(arr.shape)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    return RawImage(pixels, bits, "dicom", photometric, source_shape, notes)


def _transfer_syntax(ds: Dataset, label: str | None) -> UID:
    """The transfer syntax, inferred from the encoding for data sets without meta."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        return UID(tsyntax)
    if ds["PixelData"].is_undefined_length:
        raise ImageReadError(
            "DICOM without file meta information holds compressed (encapsulated) pixel data; "
            "its codec cannot be known without a Transfer Syntax UID",
            path=label,
        )
    implicit, little = ds.original_encoding
    if implicit:
        tsyntax = ImplicitVRLittleEndian
    else:
        tsyntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    return UID(tsyntax)


def _decoder_hint(tsyntax: UID) -> str:
    name = tsyntax.name.lower()
    if "2000" in name or "htj2k" in name:
        return _DECODER_HINTS["jpeg2000"]
    if "jpeg" in name:
        return _DECODER_HINTS["jpeg"]
    if "rle" in name:
        return _DECODER_HINTS["rle"]
    return "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


def _decode_first_frame(ds: Dataset, tsyntax: UID, label: str | None) -> tuple[np.ndarray, int]:
    """Decode frame 0; returns the array and the number of frames."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageReadError(
            f"DICOM transfer syntax {tsyntax.name} ({tsyntax}) is not supported by pydicom",
            path=label,
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise ImageReadError(
            f"no decoder installed for DICOM transfer syntax {tsyntax.name} ({tsyntax}): "
            f"{_decoder_hint(tsyntax)} (pydicom plugins: {missing})",
            path=label,
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        with _captured_warnings(label):
            arr = pixel_array(ds, index=0)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(
            f"could not decode DICOM pixel data ({tsyntax.name}): {exc}", path=label
        ) from None
    return arr, frames


def _dicom_display(arr: np.ndarray, ds: Dataset, label: str | None) -> _Gray:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ImageReadError(f"{photometric} pixel data has shape {arr.shape}", path=label)
            return _monochrome(arr, ds, photometric, label)
        if photometric == "PALETTE COLOR":
            with _captured_warnings(label):
                rgb = apply_color_lut(arr, ds)
            gray, note = rgb_to_gray(rgb)
            # The LUT entries, not the stored indices, set the depth.
            return _colour_output(gray, gray.dtype.itemsize * 8, ("palette lut", note))
    except ImageReadError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"could not apply the DICOM display transforms: {exc}", path=label) from None
    if arr.ndim == 3 and arr.shape[-1] == 3:
        gray, note = rgb_to_gray(arr)
        return _colour_output(gray, int(ds.get("BitsStored") or arr.dtype.itemsize * 8), (note,))
    raise ImageReadError(
        f"unsupported DICOM Photometric Interpretation {photometric!r} with pixel shape {arr.shape}",
        path=label,
    )


def _colour_output(gray: np.ndarray, stored: int, notes: tuple[str, ...]) -> _Gray:
    """8-bit gray as it is; deeper gray scaled from ``[0, 2**stored - 1]`` to 16 bits."""
    if gray.dtype == np.uint8:
        return gray, 8, notes
    if stored >= 16:
        return gray.astype(np.uint16), 16, notes
    return _scale(gray, 0.0, float(2**stored - 1), 16), 16, notes + (f"{stored}-bit to 16-bit",)


def _is_identity_rescale(ds: Dataset) -> bool:
    try:
        return float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    except (AttributeError, TypeError, ValueError):
        return False


def _has_modality(ds: Dataset) -> bool:
    if ds.get("ModalityLUTSequence"):
        return True
    return "RescaleSlope" in ds and "RescaleIntercept" in ds and not _is_identity_rescale(ds)


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _monochrome(arr: np.ndarray, ds: Dataset, photometric: str, label: str | None) -> _Gray:
    """Modality LUT, VOI, scaling to 8/16 bits and MONOCHROME1 inversion."""
    stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    notes: list[str] = []
    modality = _has_modality(ds)
    values = arr
    if modality:
        values = apply_modality_lut(arr, ds)
        notes.append("modality lut" if ds.get("ModalityLUTSequence") else "rescale")
    lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) if _has_voi_lut(ds) else 0
    out_bits = 8 if (stored <= 8 and not modality and lut_bits <= 8) else 16
    if lut_bits:
        ints = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
        out = _scale(apply_voi(ints, ds, index=0), 0.0, float(2**lut_bits - 1), out_bits)
        notes.append("voi lut[0]")
    elif (unit := _window_unit(values, ds, label)) is not None:
        out = _unit_to_int(unit[0], out_bits)
        notes.append(unit[1])
    elif out_bits == 8 and not signed:
        out = _scale(values, 0.0, float(2**stored - 1), out_bits)
        notes.append("no voi")
    else:
        out = _scale(values, float(np.min(values)), float(np.max(values)), out_bits)
        notes.append("invalid window: min-max" if _has_window(ds) else "no voi: min-max")
    if photometric == "MONOCHROME1":
        out = np.iinfo(out.dtype).max - out
        notes.append("invert MONOCHROME1")
    return out, out_bits, tuple(notes)


def _first(ds: Dataset, keyword: str) -> float:
    elem = ds[keyword]
    return float(elem.value[0] if elem.VM > 1 else elem.value)


def _window_unit(values: np.ndarray, ds: Dataset, label: str | None) -> tuple[np.ndarray, str] | None:
    """The first Window Center/Width applied, as float32 in [0, 1], and a note.

    ``None`` when there is no window, or when it is invalid (logged as a warning).
    """
    if not _has_window(ds):
        return None
    try:
        center, width = _first(ds, "WindowCenter"), _first(ds, "WindowWidth")
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        unit = window_to_unit(values, center, width, function)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
        logger.warning("%s: invalid VOI window (%s); using a min-max stretch instead", _where(label), exc)
        return None
    suffix = "" if function == "LINEAR" else f" {function.lower()}"
    return unit, f"window[0] center={center:g} width={width:g}{suffix}"


def window_to_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a DICOM VOI window, mapping to ``[0, 1]`` instead of the output range.

    The formulas of DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3, the same as
    ``pydicom.pixels.apply_windowing`` followed by a linear map of its output range
    to ``[0, 1]``, but vectorised in float32 (several times faster) and independent
    of the dtype of `values` (float values from a rescale are fine).

    Parameters
    ----------
    values : numpy.ndarray
        Modality (e.g. Hounsfield or rescaled) values.
    center, width : float
        Window Center and Window Width.
    function : {"LINEAR", "LINEAR_EXACT", "SIGMOID"}
        The VOI LUT Function.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of the shape of `values`: 0 at and below the window, 1
        above it.

    Raises
    ------
    ValueError
        For a width below 1 (LINEAR) or not positive (the others), or an unknown
        function.
    """
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width:g} < 1 is invalid for LINEAR windowing")
        center, width = center - 0.5, width - 1
        if width == 0:
            return (values > center).astype(np.float32)
    elif function in ("LINEAR_EXACT", "SIGMOID"):
        if width <= 0:
            raise ValueError(f"Window Width {width:g} <= 0 is invalid for {function} windowing")
    else:
        raise ValueError(
            f"unsupported VOI LUT Function {function!r}; valid are LINEAR, LINEAR_EXACT, SIGMOID"
        )
    out = values.astype(np.float32)
    out -= np.float32(center)
    if function == "SIGMOID":
        out *= np.float32(-4.0 / width)
        np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    out *= np.float32(1.0 / width)
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _unit_to_int(unit: np.ndarray, out_bits: int) -> np.ndarray:
    """Map float32 ``[0, 1]`` to the full ``uint8``/``uint16`` range, rounded."""
    dtype = np.uint8 if out_bits == 8 else np.uint16
    unit *= np.float32(np.iinfo(dtype).max)
    np.rint(unit, out=unit)
    return unit.astype(dtype)


def _scale(values: np.ndarray, lo: float, hi: float, out_bits: int) -> np.ndarray:
    """Map ``lo -> 0`` and ``hi -> 2**out_bits - 1`` linearly, clip, round."""
    dtype = np.uint8 if out_bits == 8 else np.uint16
    top = float(np.iinfo(dtype).max)
    if np.issubdtype(values.dtype, np.integer) and lo == 0.0 and hi == top:
        return values.astype(dtype)
    if hi == lo:
        return np.zeros(values.shape, dtype=dtype)
    out = values.astype(np.float64) if values.dtype == np.float64 else values.astype(np.float32)
    out -= lo
    out *= top / (hi - lo)
    np.clip(out, 0.0, top, out=out)
    np.rint(out, out=out)
    return out.astype(dtype)
