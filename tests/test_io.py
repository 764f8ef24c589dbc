"""Tests for cxrstore.io: reading DICOM/PNG/JPEG faithfully and the canonical preprocessing."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

import cxrstore.io.read as read_mod
from cxrstore.errors import ImageReadError, UsageError
from cxrstore.io import (
    DEFAULT_MAX_PIXELS,
    PreprocessConfig,
    RawImage,
    image_size,
    load_canonical,
    preprocess,
    read_image,
    rgb_to_gray,
    sniff_format,
    window_to_unit,
)

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr"
DCM2 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DCM1 = "Fake_MONOHR1.dcm"
REAL_SHAPES = {
    "00000001_000.png": (512, 512),
    "00027426_000.png": (512, 512),
    DCM2: (1024, 1024),
    DCM1: (1024, 1024),
    "16747_3_1.jpg": (885, 1036),
    "covid-19-pneumonia-58-prior.jpg": (2373, 2373),
    "h0001.png": (512, 512),
    "tb0005.png": (512, 512),
    "tb0007.png": (512, 512),
}
RGB_STORED = ["16747_3_1.jpg", "covid-19-pneumonia-58-prior.jpg", "h0001.png", "tb0005.png", "tb0007.png"]


@pytest.fixture
def real_dir() -> Path:
    if not REAL_DIR.is_dir():
        pytest.skip(f"shared real-CXR folder {REAL_DIR} is absent (it lives beside the checkout)")
    return REAL_DIR


# ----------------------------------------------------------------------------- helpers


def png_bytes(
    width: int, height: int, *, depth: int = 8, colour: int = 0, rows: bytes | None = None
) -> bytes:
    """A PNG built by hand: IHDR, one IDAT of `rows` (default: nothing), IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path, format="PNG")
    return path


def make_dicom(
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    **elements: object,
) -> Dataset:
    """A valid, uncompressed single- or multi-frame DICOM data set in memory."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Test^Patient"
    samples = 3 if pixels.ndim == 3 and pixels.shape[-1] == 3 else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    frames = pixels.shape[0] if (pixels.ndim == 3 and samples == 1) else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = (pixels.shape[1], pixels.shape[2]) if frames > 1 else pixels.shape[:2]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save_dicom(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- real files


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_every_real_file_reads_2d_nonconstant(real_dir: Path, name: str) -> None:
    raw = read_image(real_dir / name)
    assert raw.pixels.ndim == 2
    assert raw.pixels.shape == REAL_SHAPES[name]
    assert raw.pixels.dtype == np.uint8 and raw.bits == 8
    assert int(raw.pixels.max()) > int(raw.pixels.min())
    assert image_size(real_dir / name) == REAL_SHAPES[name]
    expected_format = {"dcm": "dicom", "png": "png", "jpg": "jpeg"}[name.rsplit(".", 1)[1]]
    assert raw.format == expected_format


@pytest.mark.shared_data
def test_real_jpeg_baseline_dicom_decodes_like_pydicom(real_dir: Path) -> None:
    raw = read_image(real_dir / DCM2)
    ds = pydicom.dcmread(real_dir / DCM2)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    np.testing.assert_array_equal(raw.pixels, ds.pixel_array)
    assert raw.photometric == "MONOCHROME2"


@pytest.mark.shared_data
def test_monochrome1_twin_is_exact_inverse(real_dir: Path) -> None:
    mono2 = read_image(real_dir / DCM2)
    mono1 = read_image(real_dir / DCM1)
    assert mono1.photometric == "MONOCHROME1"
    assert not np.array_equal(mono1.pixels, mono2.pixels)
    np.testing.assert_array_equal(mono1.pixels, 255 - mono2.pixels)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", RGB_STORED)
def test_rgb_stored_real_files_equal_their_single_channel(real_dir: Path, name: str) -> None:
    with Image.open(real_dir / name) as im:
        rgb = np.asarray(im.convert("RGB"))
    raw = read_image(real_dir / name)
    assert raw.photometric == "RGB"
    assert raw.source_shape == rgb.shape
    np.testing.assert_array_equal(raw.pixels, rgb[..., 0])


@pytest.mark.shared_data
def test_real_content_sniffing_ignores_names(real_dir: Path, tmp_path: Path) -> None:
    png_as_jpg = tmp_path / "image.jpg"
    png_as_jpg.write_bytes((real_dir / "00000001_000.png").read_bytes())
    dcm_as_png = tmp_path / "scan.png"
    dcm_as_png.write_bytes((real_dir / DCM2).read_bytes())
    assert read_image(png_as_jpg).format == "png"
    original = read_image(real_dir / "00000001_000.png").pixels
    np.testing.assert_array_equal(read_image(png_as_jpg).pixels, original)
    from_dcm = read_image(dcm_as_png)
    assert from_dcm.format == "dicom"
    np.testing.assert_array_equal(from_dcm.pixels, read_image(real_dir / DCM2).pixels)


@pytest.mark.shared_data
def test_real_truncated_png_and_bytes_source(real_dir: Path, tmp_path: Path) -> None:
    data = (real_dir / "00027426_000.png").read_bytes()
    np.testing.assert_array_equal(read_image(data).pixels, read_image(real_dir / "00027426_000.png").pixels)
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png") as info:
        read_image(cut)
    assert "truncated" in str(info.value)


@pytest.mark.shared_data
def test_real_canonical_images(real_dir: Path) -> None:
    big = load_canonical(real_dir / "covid-19-pneumonia-58-prior.jpg", PreprocessConfig(max_side=1024))
    assert big.shape == (1024, 1024) and big.dtype == np.float32
    wide = load_canonical(real_dir / "16747_3_1.jpg", PreprocessConfig(max_side=512))
    assert wide.shape == (437, 512)  # 885 * 512 / 1036 = 437.4
    same = load_canonical(real_dir / DCM2)
    np.testing.assert_array_equal(same, read_image(real_dir / DCM2).pixels.astype(np.float32) / 255)


# ----------------------------------------------------------------------------- PNG / JPEG


def test_16bit_png_roundtrips_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    arr[0, :4] = [0, 1, 65534, 65535]
    raw = read_image(save_png(tmp_path / "deep.png", arr))
    assert raw.bits == 16 and raw.pixels.dtype == np.uint16
    np.testing.assert_array_equal(raw.pixels, arr)
    assert np.any(raw.pixels % 2 == 1)  # low bits survive


def test_preprocess_keeps_more_than_8_bits(tmp_path: Path) -> None:
    base = np.full((8, 8), 0x1200, dtype=np.uint16)
    other = base.copy()
    other[:, :] = 0x1201  # differs only in the low byte
    a = preprocess(read_image(save_png(tmp_path / "a.png", base)))
    b = preprocess(read_image(save_png(tmp_path / "b.png", other)))
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b - a, 1 / 65535, rtol=1e-3)


def test_8bit_png_and_bytes_source(tmp_path: Path) -> None:
    arr = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48).astype(np.uint8)
    path = save_png(tmp_path / "gray.png", arr)
    raw = read_image(path)
    assert (raw.bits, raw.format, raw.photometric, raw.source_shape) == (8, "png", "L", (64, 48))
    np.testing.assert_array_equal(raw.pixels, arr)
    np.testing.assert_array_equal(read_image(path.read_bytes()).pixels, arr)
    assert image_size(path) == (64, 48)


def test_rgb_with_equal_channels_is_the_channel_exactly(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, size=(20, 30), dtype=np.uint8)
    rgb = np.stack([gray, gray, gray], axis=-1)
    raw = read_image(save_png(tmp_path / "rgb.png", rgb))
    assert raw.pixels.ndim == 2 and raw.source_shape == (20, 30, 3)
    np.testing.assert_array_equal(raw.pixels, gray)
    assert raw.notes == ("equal rgb channels",)
    rgba = np.dstack([rgb, np.full((20, 30), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(save_png(tmp_path / "rgba.png", rgba)).pixels, gray)


def test_rgb_with_different_channels_uses_bt601_luma(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    raw = read_image(save_png(tmp_path / "colour.png", rgb))
    # 0.299*255=76.2, 0.587*255=149.7, 0.114*255=29.1, 2.99+11.74+3.42=18.15
    np.testing.assert_array_equal(raw.pixels, [[76, 150], [29, 18]])
    deep = rgb.astype(np.uint16) * 257
    gray, note = rgb_to_gray(deep)
    assert gray.dtype == np.uint16 and note == "rgb to bt.601 luma"
    assert gray[0, 0] == round(0.299 * 65535)


def test_palette_grey_alpha_and_bilevel_pngs(tmp_path: Path) -> None:
    gray = np.random.default_rng(2).integers(0, 256, size=(10, 12), dtype=np.uint8)
    pal = Image.fromarray(gray).convert("P")
    pal.info["transparency"] = 3
    pal.save(tmp_path / "pal.png", transparency=3)
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png").pixels, gray)
    Image.fromarray(np.dstack([gray, np.zeros_like(gray)])).save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").pixels, gray)
    Image.fromarray(gray > 127).save(tmp_path / "bw.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bw.png").pixels, np.where(gray > 127, 255, 0))


def test_16bit_colour_png_is_refused_clearly(tmp_path: Path) -> None:
    width, height = 3, 2
    rows = b"".join(b"\x00" + bytes(range(width * 6)) for _ in range(height))
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(width, height, depth=16, colour=2, rows=rows))
    with pytest.raises(ImageReadError, match="16-bit colour") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_jpeg_gray_rgb_and_cmyk(tmp_path: Path) -> None:
    gray = (np.add.outer(np.arange(32), np.arange(40)) * 3).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    raw = read_image(tmp_path / "g.jpg")
    assert (raw.format, raw.photometric, raw.pixels.shape) == ("jpeg", "L", (32, 40))
    assert np.abs(raw.pixels.astype(int) - gray).max() <= 4
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    with Image.open(tmp_path / "rgb.jpg") as im:
        decoded = np.asarray(im)
    raw_rgb = read_image(tmp_path / "rgb.jpg")
    assert raw_rgb.pixels.ndim == 2 and raw_rgb.photometric == "RGB"
    expected, _ = rgb_to_gray(decoded)
    np.testing.assert_array_equal(raw_rgb.pixels, expected)
    Image.fromarray(gray).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with pytest.raises(ImageReadError, match="CMYK"):
        read_image(tmp_path / "cmyk.jpg")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    arr = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9) * 4
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    with Image.open(path) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened))
    raw = read_image(path)
    np.testing.assert_array_equal(raw.pixels, expected)
    assert raw.source_shape == (6, 9)


# ----------------------------------------------------------------------------- sniffing and errors


def test_sniff_format() -> None:
    assert sniff_format(png_bytes(1, 1)) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"\x00" * 20) == "jpeg"
    assert sniff_format(b"\x00" * 128 + b"DICM" + b"\x02\x00") == "dicom"
    assert sniff_format(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100") == "dicom"
    assert sniff_format(b"hello, this is text\n" * 10) is None
    assert sniff_format(b"GIF89a" + b"\x00" * 200) is None
    assert sniff_format(b"") is None
    assert sniff_format(b"\x00" * 300) is None


def test_random_bytes_are_not_an_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(20):
        data = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
        path = tmp_path / f"r{i}.dcm"
        path.write_bytes(data)
        with pytest.raises(ImageReadError, match="not an image"):
            read_image(path)


def test_text_named_png_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("patient notes, not pixels\n")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "not an image" in message
    assert "DICOM, PNG, JPEG" in message
    assert info.value.path == str(path)


def test_png_with_jpg_name_reads(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(0, 256, size=(9, 7), dtype=np.uint8)
    path = tmp_path / "really_png.jpg"
    Image.fromarray(arr).save(path, format="PNG")
    raw = read_image(path)
    assert raw.format == "png"
    np.testing.assert_array_equal(raw.pixels, arr)


def test_dicom_with_png_name_reads(tmp_path: Path) -> None:
    pixels = np.arange(4 * 5, dtype=np.uint16).reshape(4, 5) * 100
    path = save_dicom(make_dicom(pixels), tmp_path / "scan.png")
    raw = read_image(path)
    assert raw.format == "dicom" and raw.pixels.shape == (4, 5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (None, "not found")],
)
def test_empty_and_missing_files(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageReadError, match=reason):
        image_size(path)


def test_directory_and_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageReadError, match="directory") as info:
        read_image(tmp_path)
    assert str(tmp_path) in str(info.value)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    path = save_png(tmp_path / "locked.png", np.zeros((2, 2), np.uint8))
    monkeypatch.setattr(read_mod, "open", denied, raising=False)
    with pytest.raises(ImageReadError, match="permission denied") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(5).integers(0, 256, size=(64, 64), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(noise).save(jpg, format="JPEG")
    dcm = io.BytesIO()
    make_dicom(noise.astype(np.uint16)).save_as(dcm, enforce_file_format=True)
    for name, data in [("t.png", png.getvalue()), ("t.jpg", jpg.getvalue()), ("t.dcm", dcm.getvalue())]:
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert str(path) in str(info.value)
    header_only = tmp_path / "header.png"
    header_only.write_bytes(png.getvalue()[:20])
    with pytest.raises(ImageReadError, match="IHDR"):
        read_image(header_only)


def test_unsupported_image_formats_are_refused(tmp_path: Path) -> None:
    arr = np.zeros((4, 4), np.uint8)
    for fmt in ("GIF", "TIFF", "BMP"):
        path = tmp_path / f"img.{fmt.lower()}"
        Image.fromarray(arr).save(path, format=fmt)
        with pytest.raises(ImageReadError, match="not an image"):
            read_image(path)


def test_usage_errors() -> None:
    with pytest.raises(UsageError):
        read_image(png_bytes(1, 1), max_pixels=0)
    with pytest.raises(UsageError):
        read_image(12345)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- decompression bombs


def test_png_bomb_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(30000, 30000))
    assert path.stat().st_size < 100
    assert image_size(path) == (30000, 30000)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="900,000,000 pixels") as info:
        read_image(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value) and "max_pixels" in str(info.value)


def test_max_pixels_is_honoured_for_each_format(tmp_path: Path) -> None:
    arr = np.zeros((40, 50), np.uint8)
    png = save_png(tmp_path / "a.png", arr)
    Image.fromarray(arr).save(tmp_path / "a.jpg")
    dcm = save_dicom(make_dicom(arr.astype(np.uint16)), tmp_path / "a.dcm")
    for path in (png, tmp_path / "a.jpg", dcm):
        assert read_image(path, max_pixels=2000).pixels.shape == (40, 50)
        with pytest.raises(ImageReadError, match="2,000 pixels") as info:
            read_image(path, max_pixels=1999)
        assert "2,000 pixels" in str(info.value) and "1,999" in str(info.value)


def test_pillow_limit_neither_warns_nor_leaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_png(tmp_path / "p.png", np.full((20, 20), 9, np.uint8))  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 > 300: Pillow would warn
    assert read_image(path).pixels.shape == (20, 20)  # warnings are errors in this suite
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 > 2 * 100: Pillow would raise
    with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
        read_image(path)


def test_dicom_bomb_refused_from_header(tmp_path: Path) -> None:
    ds = make_dicom(np.zeros((2, 2), np.uint16))
    ds.Rows, ds.Columns = 40000, 40000  # pixel data far too short: never decoded
    path = save_dicom(ds, tmp_path / "bomb.dcm")
    with pytest.raises(ImageReadError, match="1,600,000,000 pixels"):
        read_image(path)
    assert image_size(path) == (40000, 40000)


# ----------------------------------------------------------------------------- DICOM


def ct_like_dicom(photometric: str = "MONOCHROME2") -> tuple[Dataset, np.ndarray]:
    """12-bit data, rescale 2/-1024, two windows; returns the data set and stored values."""
    stored = np.array(
        [
            [0, 300, 412, 431],  # HU -1024, -424, -200, -162
            [432, 532, 632, 633],  # HU -160, 40, 240, 242
            [662, 1000, 2000, 4095],  # HU 300, 976, 2976, 7166
        ],
        dtype=np.uint16,
    )
    ds = make_dicom(
        stored,
        bits_stored=12,
        photometric=photometric,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[40, 400],
        WindowWidth=[400, 1500],
    )
    return ds, stored


def test_dicom_rescale_and_first_window(tmp_path: Path) -> None:
    ds, stored = ct_like_dicom()
    raw = read_image(save_dicom(ds, tmp_path / "ct.dcm"))
    px = raw.pixels.astype(np.int64)
    hu = stored.astype(np.int64) * 2 - 1024
    assert raw.bits == 16 and raw.pixels.dtype == np.uint16
    assert raw.photometric == "MONOCHROME2"
    # First window: center 40, width 400 (LINEAR): <= -160 -> black, > 239 -> white.
    assert np.all(px[hu <= -160] == 0)
    assert np.all(px[hu > 239] == 65535)
    inside = (hu > -160) & (hu <= 239)
    assert np.all((px[inside] > 0) & (px[inside] < 65535))
    # HU 40 is the window center: mid-grey.
    assert abs(px[1, 1] - 65535 / 2) < 65535 * 0.01
    # The second window (400/1500) would have left HU -200 and 300 in between.
    assert px[0, 2] == 0 and px[2, 0] == 65535
    assert any("window[0] center=40 width=400" in n for n in raw.notes)
    assert "rescale" in raw.notes


@pytest.mark.parametrize(
    ("function", "center", "width"),
    [("LINEAR", 40, 400), ("LINEAR", 100.5, 1), ("LINEAR_EXACT", -300, 1500), ("SIGMOID", 2048, 1000)],
)
def test_window_to_unit_matches_pydicom(function: str, center: float, width: float) -> None:
    from pydicom.pixels import apply_windowing

    stored = np.random.default_rng(10).integers(0, 4096, size=(64, 64), dtype=np.uint16)
    stored[0, :6] = [0, 100, 101, 4095, 1024, 1023]
    ds = make_dicom(stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=center, WindowWidth=width)
    ds.VOILUTFunction = function
    values = stored.astype(np.float64) - 1024
    expected = apply_windowing(values, ds)  # range [-1024, 3071]
    expected = (expected + 1024) / 4095
    ours = window_to_unit(values, center, width, function)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    assert 0 < float(ours.mean()) < 1


def test_window_to_unit_refuses_invalid_windows() -> None:
    with pytest.raises(ValueError, match="LINEAR"):
        window_to_unit(np.zeros(3), 0, 0.5)
    with pytest.raises(ValueError, match="unsupported"):
        window_to_unit(np.zeros(3), 0, 10, "GAMMA")


def test_dicom_monochrome1_built_is_inverse(tmp_path: Path) -> None:
    ds2, _ = ct_like_dicom("MONOCHROME2")
    ds1, _ = ct_like_dicom("MONOCHROME1")
    a = read_image(save_dicom(ds2, tmp_path / "m2.dcm")).pixels
    b = read_image(save_dicom(ds1, tmp_path / "m1.dcm")).pixels
    np.testing.assert_array_equal(b, 65535 - a)


def test_dicom_without_voi_is_min_max_stretched(tmp_path: Path) -> None:
    stored = np.array([[100, 200], [300, 4000]], dtype=np.uint16)
    raw = read_image(save_dicom(make_dicom(stored, bits_stored=12), tmp_path / "plain.dcm"))
    expected = np.rint((stored - 100) * (65535 / 3900)).astype(np.uint16)
    np.testing.assert_array_equal(raw.pixels, expected)
    assert raw.notes == ("no voi: min-max",)


def test_dicom_8bit_without_transforms_is_kept(tmp_path: Path) -> None:
    stored = np.array([[3, 200], [17, 90]], dtype=np.uint8)
    ds = make_dicom(stored, bits_stored=8, RescaleSlope=1, RescaleIntercept=0)
    raw = read_image(save_dicom(ds, tmp_path / "u8.dcm"))
    assert raw.bits == 8 and raw.pixels.dtype == np.uint8
    np.testing.assert_array_equal(raw.pixels, stored)


def test_dicom_voi_lut_after_float_rescale(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", [0, 1000, 40000, 65535])  # LUT Data
    ds = make_dicom(stored, RescaleSlope=1.0, RescaleIntercept=0.0, VOILUTSequence=[item])
    ds.RescaleSlope, ds.RescaleIntercept = "1.0", "1"  # float rescale: values 1..4
    raw = read_image(save_dicom(ds, tmp_path / "lut.dcm"))  # no float-input warning
    np.testing.assert_array_equal(raw.pixels, [[1000, 40000], [65535, 65535]])
    assert "voi lut[0]" in raw.notes


def test_dicom_invalid_window_falls_back_to_min_max_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = np.array([[0, 10], [20, 40]], dtype=np.uint16)
    ds = make_dicom(stored, WindowCenter=20, WindowWidth=0)
    raw = read_image(save_dicom(ds, tmp_path / "w0.dcm"))
    np.testing.assert_array_equal(raw.pixels, np.rint(stored * (65535 / 40)).astype(np.uint16))
    assert "invalid window: min-max" in raw.notes
    assert any("invalid VOI window" in r.getMessage() for r in caplog.records)


def test_dicom_multiframe_gives_first_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((3, 4), v, np.uint8) for v in (10, 20, 30)])
    frames[0, 0, 0] = 0
    raw = read_image(save_dicom(make_dicom(frames, bits_stored=8), tmp_path / "mf.dcm"))
    np.testing.assert_array_equal(raw.pixels, frames[0])
    assert raw.source_shape == (3, 3, 4)
    assert raw.notes[0] == "first of 3 frames"


def test_dicom_rgb_becomes_gray(tmp_path: Path) -> None:
    gray = np.random.default_rng(6).integers(0, 256, size=(5, 6), dtype=np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    raw = read_image(save_dicom(make_dicom(rgb, bits_stored=8, photometric="RGB"), tmp_path / "rgb.dcm"))
    assert raw.photometric == "RGB" and raw.source_shape == (5, 6, 3)
    np.testing.assert_array_equal(raw.pixels, gray)


def test_dicom_12bit_rgb_scaled_to_16_bits(tmp_path: Path) -> None:
    gray = np.array([[0, 1000], [2048, 4095]], dtype=np.uint16)
    ds = make_dicom(np.stack([gray] * 3, axis=-1), bits_stored=12, photometric="RGB")
    raw = read_image(save_dicom(ds, tmp_path / "rgb12.dcm"))
    assert raw.bits == 16 and raw.pixels.dtype == np.uint16
    np.testing.assert_array_equal(raw.pixels, np.rint(gray * (65535 / 4095)).astype(np.uint16))


def test_dicom_without_preamble_reads(tmp_path: Path) -> None:
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    ds = make_dicom(stored)
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    assert sniff_format(data) == "dicom"
    raw = read_image(data)
    np.testing.assert_array_equal(raw.pixels, np.rint(stored * (65535 / 4095)).astype(np.uint16))


def test_dicom_without_pixels_is_not_an_image(tmp_path: Path) -> None:
    ds = make_dicom(np.zeros((2, 2), np.uint16))
    del ds.PixelData
    path = save_dicom(ds, tmp_path / "sr.dcm")
    with pytest.raises(ImageReadError, match="no Pixel Data"):
        read_image(path)
    for keyword in ("Rows", "Columns"):
        delattr(ds, keyword)
    with pytest.raises(ImageReadError, match="Rows/Columns"):
        read_image(save_dicom(ds, tmp_path / "sr2.dcm"))


def test_dicom_missing_decoder_names_syntax_and_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dicom(np.arange(16, dtype=np.uint16).reshape(4, 4))
    ds.compress(RLELossless)
    path = save_dicom(ds, tmp_path / "rle.dcm")
    assert read_image(path).pixels.shape == (4, 4)

    class NoDecoder:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg and pylibjpeg-rle"]

    monkeypatch.setattr(read_mod, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "RLE Lossless" in message and "pylibjpeg-rle" in message and str(path) in message


def test_corrupt_compressed_dicom(tmp_path: Path) -> None:
    ds = make_dicom(np.arange(64, dtype=np.uint16).reshape(8, 8))
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([struct.pack("<I", 9) + b"\x00" * 60])  # 9 segments: invalid
    with pytest.raises(ImageReadError, match="decode DICOM pixel data"):
        read_image(save_dicom(ds, tmp_path / "bad.dcm"))


# ----------------------------------------------------------------------------- preprocess


def raw_of(pixels: np.ndarray, bits: int = 8) -> RawImage:
    return RawImage(pixels, bits, "png", "L", pixels.shape)


def test_preprocess_box_means_by_hand() -> None:
    arr = np.array([[0, 2, 4, 6], [2, 4, 6, 8], [10, 10, 0, 0], [10, 10, 0, 255]], dtype=np.uint8)
    out = preprocess(raw_of(arr), max_side=2)
    expected = np.array([[2, 6], [10, 255 / 4]]) / 255
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (2, 2)


def test_preprocess_range_size_and_aspect() -> None:
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 65536, size=(300, 170), dtype=np.uint16)
    out = preprocess(raw_of(arr, bits=16), max_side=100)
    assert out.dtype == np.float32 and out.ndim == 2 and out.flags.c_contiguous
    assert max(out.shape) == 100
    assert out.shape == (100, 57)  # 170 / 3 = 56.7
    assert abs(out.shape[1] - 170 * 100 / 300) <= 1
    assert 0.0 <= out.min() and out.max() <= 1.0
    # Area averaging keeps the mean.
    assert abs(float(out.mean()) - float(arr.mean()) / 65535) < 1e-3


def test_preprocess_never_upscales_and_is_exact_when_small() -> None:
    arr = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    out = preprocess(raw_of(arr), max_side=1024)
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, arr.astype(np.float32) / 255)
    big = np.random.default_rng(8).integers(0, 256, size=(1024, 1024), dtype=np.uint8)
    same = preprocess(raw_of(big), max_side=1024)
    np.testing.assert_array_equal(same, big.astype(np.float32) / 255)


def test_preprocess_float_input_min_max() -> None:
    arr = np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32)
    out = preprocess(RawImage(arr, 16, "dicom", "MONOCHROME2", (2, 2)))
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1]], atol=1e-7)
    assert arr[0, 0] == -2.0  # input untouched
    flat = preprocess(RawImage(np.full((3, 3), 5, np.float32), 16, "dicom", "MONOCHROME2", (3, 3)))
    assert np.all(flat == 0)
    with pytest.raises(UsageError, match="NaN"):
        preprocess(RawImage(np.array([[np.nan, 1]], np.float32), 16, "dicom", "MONOCHROME2", (1, 2)))


def test_preprocess_bits_select_divisor() -> None:
    arr = np.array([[255, 65535]], dtype=np.uint16)
    out = preprocess(raw_of(arr, bits=16))
    np.testing.assert_allclose(out, [[255 / 65535, 1.0]], rtol=1e-6)


def test_preprocess_rejects_bad_input() -> None:
    arr = np.zeros((2, 2), np.uint8)
    with pytest.raises(UsageError):
        preprocess(raw_of(arr), max_side=0)
    with pytest.raises(UsageError):
        preprocess(arr)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        RawImage(np.zeros((2, 2, 3), np.uint8), 8, "png", "RGB", (2, 2, 3))
    with pytest.raises(UsageError):
        RawImage(arr, 12, "png", "L", (2, 2))


def test_preprocess_config_json_roundtrip() -> None:
    config = PreprocessConfig(max_side=512)
    data = json.loads(json.dumps(config.to_json()))
    assert data["max_side"] == 512 and data["policy_version"] == 1
    assert PreprocessConfig.from_json(data) == config
    assert PreprocessConfig() != config
    with pytest.raises(UsageError, match="version"):
        PreprocessConfig.from_json({**data, "policy_version": 99})
    with pytest.raises(UsageError, match="unknown"):
        PreprocessConfig.from_json({**data, "size": 3})
    with pytest.raises(UsageError):
        PreprocessConfig(max_side=-1)


def test_load_canonical_equals_read_then_preprocess(tmp_path: Path) -> None:
    arr = np.random.default_rng(9).integers(0, 65536, size=(90, 40), dtype=np.uint16)
    path = save_png(tmp_path / "c.png", arr)
    out = load_canonical(path, PreprocessConfig(max_side=30))
    np.testing.assert_array_equal(out, preprocess(read_image(path), max_side=30))
    assert out.shape == (30, 13)
    assert load_canonical(path).shape == (90, 40)
    assert DEFAULT_MAX_PIXELS >= 50_000_000
