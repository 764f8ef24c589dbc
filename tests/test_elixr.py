"""ELIXR v2.0 (CXR Foundation): a SavedModel stand-in in the real layout, real files end to end."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tensorflow (extra elixr) is not installed")

from PIL import Image

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import available_encoders, encoder_from_config, get_encoder
from cxrstore.encoders.elixr import (
    FEATURE_SHAPE,
    IMAGE_MODEL,
    QFORMER_MODEL,
    import_tensorflow,
    png_bit_depth,
    prepare_elixr,
    write_elixr_standin,
)
from cxrstore.encoders.weights import weights_sha256
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest
from cxrstore.io.preprocess import load_canonical
from cxrstore.io.read import read_image
from cxrstore.store.store import Store
from tests.encoder_checks import check_other_weights_refused, write_manifest

REAL_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"



@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_elixr_standin(tmp_path_factory.mktemp("elixr") / "cxr-foundation", seed=1)


@pytest.fixture(scope="module")
def encoder(standin: Path):
    return get_encoder("elixr-v2", weights=standin)


def _expected_sha(folder: Path) -> str:
    """The combined digest, computed here from the files (independently of the encoder)."""
    def one(sub: Path) -> str:
        lines = "".join(
            f"{f.relative_to(sub).as_posix()}\t{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
            for f in sorted(sub.rglob("*"), key=lambda p: p.relative_to(sub).as_posix())
            if f.is_file()
        )
        return hashlib.sha256(lines.encode()).hexdigest()

    text = f"{IMAGE_MODEL}\t{one(folder / IMAGE_MODEL)}\n{QFORMER_MODEL}\t{one(folder / QFORMER_MODEL)}\n"
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, standin: Path, real_cxr: Path) -> tuple[Path, list[str]]:
    """All real files into one store: model elixr-v2 (img_emb) and elixr-v2-contrastive."""
    files = sorted(p.name for p in real_cxr.iterdir() if p.is_file())
    work = tmp_path_factory.mktemp("elixr-store")
    manifest = write_manifest(work / "manifest.csv", files)
    enc = get_encoder("elixr-v2", weights=standin, batch=3)
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=enc, workers=0, batch_size=4)
    assert report.failed == 0, report.failures
    assert report.added == len(files)
    con = get_encoder("elixr-v2", weights=standin, output="all_contrastive_img_emb")
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=con,
                    model="elixr-v2-contrastive", workers=0, batch_size=5)
    assert report.failed == 0, report.failures
    assert report.filled == len(files) and report.added == 0
    return work / "store", files


def _example(prepared: np.ndarray) -> dict:
    """tf.io.parse_single_example of a prepared input (TensorFlow's own parser)."""
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/format": tf.io.FixedLenFeature([], tf.string)}
    parsed = tf.io.parse_single_example(tf.constant(prepared.tobytes()), spec)
    return {k: v.numpy() for k, v in parsed.items()}


def _decode(png: bytes, dtype) -> np.ndarray:
    return tf.io.decode_png(png, channels=1, dtype=dtype).numpy()[..., 0]


# -- registry, layout, signatures ------------------------------------------------------
def test_registered_and_prepare_never_imports_tensorflow() -> None:
    assert "elixr-v2" in available_encoders()
    code = (
        "import sys, numpy as np\n"
        "from cxrstore.encoders.base import available_encoders\n"
        "from cxrstore.encoders.elixr import prepare_elixr\n"
        "assert 'elixr-v2' in available_encoders()\n"
        "out = prepare_elixr(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))\n"
        "assert out.dtype == np.uint8 and out.ndim == 1\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_text')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_standin_has_the_real_layout_and_signatures(standin: Path) -> None:
    for name in (IMAGE_MODEL, QFORMER_MODEL):
        assert (standin / name / "saved_model.pb").is_file()
        assert (standin / name / "variables" / "variables.index").is_file()
        assert list((standin / name / "variables").glob("variables.data-*"))
    image = tf.saved_model.load(str(standin / IMAGE_MODEL)).signatures["serving_default"]
    _, inputs = image.structured_input_signature
    assert set(inputs) == {"input_example"}
    assert inputs["input_example"].dtype == tf.string and inputs["input_example"].shape.as_list() == [1]
    assert {k: (v.dtype, v.shape.as_list()) for k, v in image.structured_outputs.items()} == {
        "feature_maps_0": (tf.float32, [1, 8, 8, 1376])
    }
    qformer = tf.saved_model.load(str(standin / QFORMER_MODEL)).signatures["serving_default"]
    _, inputs = qformer.structured_input_signature
    assert {k: (v.dtype, v.shape.as_list()) for k, v in inputs.items()} == {
        "image_feature": (tf.float32, [1, 8, 8, 1376]),
        "ids": (tf.int32, [1, 1, 128]),
        "paddings": (tf.float32, [1, 1, 128]),
    }
    assert {k: (v.dtype, v.shape.as_list()) for k, v in qformer.structured_outputs.items()} == {
        "img_emb": (tf.float32, [1, 32, 768]),
        "all_contrastive_img_emb": (tf.float32, [1, 32, 128]),
        "contrastive_txt_emb": (tf.float32, [1, 128]),
    }
    # the text inputs are wired: a prompt changes the text embedding
    feats = tf.zeros(FEATURE_SHAPE)
    ids = np.zeros((1, 1, 128), np.int32)
    pads = np.ones((1, 1, 128), np.float32)
    a = qformer(image_feature=feats, ids=tf.constant(ids), paddings=tf.constant(pads))["contrastive_txt_emb"].numpy()
    ids[0, 0, :3], pads[0, 0, :3] = (101, 7592, 102), 0.0
    b = qformer(image_feature=feats, ids=tf.constant(ids), paddings=tf.constant(pads))["contrastive_txt_emb"].numpy()
    assert not np.allclose(a, b)


def test_wrong_output_key_is_refused_naming_it(tmp_path: Path) -> None:
    bad = write_elixr_standin(tmp_path / "bad-key", seed=2, image_output_key="feature_maps")
    with pytest.raises(UsageError) as err:
        get_encoder("elixr-v2", weights=bad)
    msg = str(err.value)
    assert "missing output(s) feature_maps_0 (it has: feature_maps)" in msg
    assert str(bad / IMAGE_MODEL) in msg


def test_wrong_output_shape_is_refused_naming_it(tmp_path: Path) -> None:
    bad = write_elixr_standin(tmp_path / "bad-shape", seed=2, query_tokens=16)
    with pytest.raises(UsageError) as err:
        get_encoder("elixr-v2", weights=bad)
    msg = str(err.value)
    assert "output 'img_emb' is float32 [1, 16, 768], expected float32 [1, 32, 768]" in msg
    assert "output 'all_contrastive_img_emb' is float32 [1, 16, 128]" in msg
    assert str(bad / QFORMER_MODEL) in msg


def test_wrong_input_signature_is_refused_naming_it(tmp_path: Path, standin: Path) -> None:
    import shutil

    class Other(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="serialized")])
        def serve(self, serialized):
            return {"feature_maps_0": tf.zeros(FEATURE_SHAPE)}

    repo = tmp_path / "repo"
    shutil.copytree(standin, repo)
    shutil.rmtree(repo / IMAGE_MODEL)
    module = Other()
    tf.saved_model.save(module, str(repo / IMAGE_MODEL), signatures={"serving_default": module.serve.get_concrete_function()})
    with pytest.raises(UsageError, match="missing input.s. input_example .it has: serialized.; unexpected input.s. serialized"):
        get_encoder("elixr-v2", weights=repo)
    tf.saved_model.save(module, str(repo / IMAGE_MODEL), signatures={"other": module.serve.get_concrete_function()})
    with pytest.raises(UsageError, match="no signature 'serving_default' .it has: other."):
        get_encoder("elixr-v2", weights=repo)


def test_layout_errors_list_what_is_missing(tmp_path: Path, standin: Path) -> None:
    import shutil

    with pytest.raises(UsageError, match="does not exist"):
        get_encoder("elixr-v2", weights=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="needs weights="):
        get_encoder("elixr-v2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"missing elixr-c-v2-pooled/, pax-elixr-b-text/"):
        get_encoder("elixr-v2", weights=tmp_path / "empty")
    repo = tmp_path / "partial"
    shutil.copytree(standin, repo)
    (repo / QFORMER_MODEL / "saved_model.pb").unlink()
    for f in (repo / IMAGE_MODEL / "variables").glob("variables.data-*"):
        f.unlink()
    with pytest.raises(UsageError) as err:
        get_encoder("elixr-v2", weights=repo)
    assert "missing elixr-c-v2-pooled/variables/variables.data-*, pax-elixr-b-text/saved_model.pb" in str(err.value)
    with pytest.raises(UsageError, match="pass its parent folder"):
        get_encoder("elixr-v2", weights=standin / IMAGE_MODEL)
    with pytest.raises(UsageError, match="is a file"):
        get_encoder("elixr-v2", weights=standin / IMAGE_MODEL / "saved_model.pb")
    # a corrupt graph is a clear error naming the folder
    shutil.copytree(standin, tmp_path / "corrupt")
    (tmp_path / "corrupt" / IMAGE_MODEL / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(UsageError, match=f"cannot load TensorFlow SavedModel .*{IMAGE_MODEL}"):
        get_encoder("elixr-v2", weights=tmp_path / "corrupt")


def test_options_validated(standin: Path) -> None:
    with pytest.raises(UsageError, match="allowed: weights, device, batch, half, output"):
        get_encoder("elixr-v2", weights=standin, colour=True)
    with pytest.raises(UsageError, match="float32 only.*drop --half"):
        get_encoder("elixr-v2", weights=standin, half=True)
    with pytest.raises(UsageError, match="batch must be a positive integer"):
        get_encoder("elixr-v2", weights=standin, batch=0)
    with pytest.raises(UsageError, match="output must be one of: img_emb, all_contrastive_img_emb"):
        get_encoder("elixr-v2", weights=standin, output="contrastive_txt_emb")
    with pytest.raises(UsageError, match="unknown device"):
        get_encoder("elixr-v2", weights=standin, device="tpu")
    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(UsageError, match="use --device cpu"):
            get_encoder("elixr-v2", weights=standin, device="cuda")


def test_missing_tensorflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(UsageError, match=r"needs TensorFlow.*pip install 'cxrstore\[elixr\]'"):
        import_tensorflow()


def test_qformer_ops_not_registered_says_install_tensorflow_text(standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = tf.saved_model.load

    def load(path, *args, **kwargs):
        if Path(path).name == QFORMER_MODEL:  # what the real Q-Former does without tensorflow_text
            raise tf.errors.NotFoundError(None, None, "Op type not registered 'CaseFoldUTF8' in binary running here.")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tf.saved_model, "load", load)
    monkeypatch.setitem(sys.modules, "tensorflow_text", None)
    with pytest.raises(UsageError) as err:
        get_encoder("elixr-v2", weights=standin)
    msg = str(err.value)
    assert "Op type not registered 'CaseFoldUTF8'" in msg and "tensorflow-text" in msg and QFORMER_MODEL in msg


def test_tensorflow_text_is_imported_before_the_qformer_loads(standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorflow_text", reason="tensorflow-text (extra elixr) is not installed")
    seen = []
    real_load = tf.saved_model.load

    def load(path, *args, **kwargs):
        seen.append((Path(path).name, "tensorflow_text" in sys.modules))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tf.saved_model, "load", load)
    monkeypatch.delitem(sys.modules, "tensorflow_text")
    get_encoder("elixr-v2", weights=standin)
    assert seen[-1] == (QFORMER_MODEL, True)


# -- prepare: the tf.Example and its PNG -----------------------------------------------
def test_16bit_images_differing_below_the_eighth_bit_stay_different(encoder) -> None:
    """THE 16-bit test: the low byte survives prepare, TensorFlow's decoding, and the model."""
    rng = np.random.default_rng(7)
    a16 = rng.integers(0, 65536, (96, 80), dtype=np.uint16)
    b16 = (a16 & 0xFF00) | ((a16.astype(np.int32) + 1 + rng.integers(0, 200, a16.shape)) & 0xFF).astype(np.uint16)
    for u in (a16, b16):  # both span the full range, so the 16-bit stretch leaves them as they are
        u[0, 0], u[-1, -1] = 0, 65535
    assert ((a16 >> 8) == (b16 >> 8)).all() and (a16 != b16).mean() > 0.99  # same top byte everywhere
    xa, xb = (np.divide(u, np.float32(65535), dtype=np.float32) for u in (a16, b16))  # as preprocess does
    pa, pb = prepare_elixr(xa), prepare_elixr(xb)
    assert pa.tobytes() != pb.tobytes()
    for prepared, pixels in ((pa, a16), (pb, b16)):
        ex = _example(prepared)
        assert ex["image/format"] == b"png"
        assert png_bit_depth(ex["image/encoded"]) == 16
        np.testing.assert_array_equal(_decode(ex["image/encoded"], tf.uint16), pixels)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ex["image/encoded"]))), pixels)
    va, vb = encoder.forward([pa, pb])
    assert not np.array_equal(va, vb)


def test_8bit_representable_image_gives_an_8bit_png() -> None:
    rng = np.random.default_rng(8)
    u8 = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    u8[0, 0], u8[0, 1] = 0, 255
    ex = _example(prepare_elixr(np.divide(u8, np.float32(255), dtype=np.float32)))
    assert ex["image/format"] == b"png" and png_bit_depth(ex["image/encoded"]) == 8
    np.testing.assert_array_equal(_decode(ex["image/encoded"], tf.uint8), u8)
    # a 16-bit image holding only 8-bit content (k * 257) is exactly k / 255: an 8-bit PNG, lossless
    ex16 = _example(prepare_elixr(np.divide(u8.astype(np.uint16) * 257, np.float32(65535), dtype=np.float32)))
    assert png_bit_depth(ex16["image/encoded"]) == 8
    np.testing.assert_array_equal(_decode(ex16["image/encoded"], tf.uint8), u8)
    # one pixel off the 8-bit grid makes the whole image 16-bit
    x = np.divide(u8, np.float32(255), dtype=np.float32)
    x[3, 4] = np.float32(1000 / 65535)
    ex = _example(prepare_elixr(x))
    assert png_bit_depth(ex["image/encoded"]) == 16
    assert _decode(ex["image/encoded"], tf.uint16)[3, 4] == 1000


def test_prepare_refuses_bad_images_and_pickles(encoder) -> None:
    with pytest.raises(UsageError, match="2-D"):
        prepare_elixr(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        prepare_elixr(np.full((8, 8), np.nan, np.float32))
    prep = pickle.loads(pickle.dumps(encoder.preparer()))
    x = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    assert prep(x).tobytes() == prepare_elixr(x).tobytes()
    with pytest.raises(UsageError, match="prepared inputs from its preparer"):
        encoder.forward([np.zeros((4, 4), np.float32)])


def test_real_dicom_paths_16bit_and_8bit(real_cxr: Path, tmp_path: Path) -> None:
    """A 12-bit DICOM (the real RSNA file's pixels stored in 12 bits with a window) goes 16-bit.

    ../shared/data/real-cxr holds no DICOM deeper than 8 bits (both are JPEG Baseline), so
    the 16-bit DICOM is made from the real one: its pixels times 16, stored uncompressed in
    12 bits, with a Window Center/Width as real 12-bit radiographs carry.
    """
    import pydicom

    ds = pydicom.dcmread(real_cxr / REAL_DICOM)
    ds.set_pixel_data(ds.pixel_array.astype(np.uint16) * 16, photometric_interpretation="MONOCHROME2", bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2000, 3500
    path = tmp_path / "deep.dcm"
    ds.save_as(path)
    raw = read_image(path)
    assert raw.bits == 16
    x = load_canonical(path)
    ex = _example(prepare_elixr(x))
    assert png_bit_depth(ex["image/encoded"]) == 16
    np.testing.assert_array_equal(_decode(ex["image/encoded"], tf.uint16), raw.pixels)
    # the real 8-bit DICOM as it is: an 8-bit PNG of exactly its display pixels
    raw8 = read_image(real_cxr / REAL_DICOM)
    assert raw8.bits == 8
    ex8 = _example(prepare_elixr(load_canonical(real_cxr / REAL_DICOM)))
    assert png_bit_depth(ex8["image/encoded"]) == 8
    np.testing.assert_array_equal(_decode(ex8["image/encoded"], tf.uint8), raw8.pixels)
    # an 8-bit JPEG area-downscaled to 1024 has values between the 8-bit steps: 16-bit, not re-quantised
    big = load_canonical(real_cxr / "covid-19-pneumonia-58-prior.jpg")
    exb = _example(prepare_elixr(big))
    assert big.shape == (1024, 1024) and png_bit_depth(exb["image/encoded"]) == 16
    b64 = big.astype(np.float64)
    stretched = np.rint((b64 - b64.min()) * (65535 / (b64.max() - b64.min())))  # Google's full-range stretch
    np.testing.assert_array_equal(_decode(exb["image/encoded"], tf.uint16), stretched)


def test_16bit_range_is_stretched_as_googles_data_processing_lib() -> None:
    """A 16-bit image that uses part of the range reaches the model stretched to 0..65535, as
    Google's ``_rescale_dynamic_range`` does (``np.interp`` to the full range); 8-bit content is not."""
    rng = np.random.default_rng(9)
    u = rng.integers(3000, 20000, (40, 30)).astype(np.float64)
    u[0, 0], u[-1, -1] = 3000, 20000
    x = np.divide(u, 65535, dtype=np.float64).astype(np.float32)
    got = _decode(_example(prepare_elixr(x))["image/encoded"], tf.uint16).astype(np.int64)
    google = np.interp(u, (u.min(), u.max()), (0, 65535))
    assert got.min() == 0 and got.max() == 65535
    assert np.abs(got - google).max() <= 1  # rounding here, truncation there
    u8 = rng.integers(40, 200, (40, 30), dtype=np.uint8)
    ex8 = _example(prepare_elixr(np.divide(u8, np.float32(255), dtype=np.float32)))
    np.testing.assert_array_equal(_decode(ex8["image/encoded"], tf.uint8), u8)  # not stretched


# -- the store ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ingest_real_files_end_to_end(ingested: tuple[Path, list[str]], standin: Path) -> None:
    store_path, files = ingested
    store = Store(store_path)
    sel = store.select(model="elixr-v2")
    flat = sel.vectors()
    assert flat.shape == (len(files), 24_576) and flat.dtype == np.float32
    assert np.isfinite(flat).all()
    assert len({v.tobytes() for v in flat}) == len(files)  # the MONOCHROME1 twin is inverted: differs too
    mean = sel.vectors(view="mean")
    assert mean.shape == (len(files), 768)
    np.testing.assert_allclose(mean, flat.reshape(len(files), 32, 768).mean(axis=1), rtol=1e-5, atol=1e-6)
    prov = store.provenance("elixr-v2")
    assert prov["native_shape"] == [32, 768]
    assert prov["encoder"]["weights_sha256"] == _expected_sha(standin)
    params = prov["encoder"]["params"]
    assert params["output"] == "img_emb" and params["precision"] == "float32"
    assert params["image_model_sha256"] == weights_sha256(standin / IMAGE_MODEL)
    assert params["qformer_model_sha256"] == weights_sha256(standin / QFORMER_MODEL)
    assert params["signature"] == "serving_default" and params["image_input"] == "input_example"
    assert params["image_output"] == "feature_maps_0" and params["qformer_inputs"] == ["image_feature", "ids", "paddings"]
    assert "16-bit" in params["png_policy"] and "8-bit" in params["png_policy"]


@pytest.mark.slow
def test_contrastive_output_is_a_second_model_of_the_same_store(ingested: tuple[Path, list[str]], standin: Path) -> None:
    store_path, files = ingested
    store = Store(store_path)
    assert store.n_rows == len(files)
    sel = store.select(model="elixr-v2-contrastive")
    flat = sel.vectors()
    assert flat.shape == (len(files), 4_096)
    # the stand-in's contrastive tokens are unit vectors (as it builds them), 32 per image
    np.testing.assert_allclose(np.linalg.norm(flat.reshape(-1, 32, 128), axis=2), 1.0, atol=1e-5)
    assert sel.vectors(view="mean").shape == (len(files), 128)
    prov = store.provenance("elixr-v2-contrastive")
    assert prov["native_shape"] == [32, 128] and prov["encoder"]["params"]["output"] == "all_contrastive_img_emb"
    assert prov["encoder"]["weights_sha256"] == store.provenance("elixr-v2")["encoder"]["weights_sha256"]
    # the recorded configuration rebuilds the same encoder (output included)
    rebuilt = encoder_from_config(prov["encoder"], weights=standin)
    assert rebuilt.output == "all_contrastive_img_emb" and rebuilt.dim == 4_096


@pytest.mark.slow
def test_deterministic_batch_independent_and_pipeline_neutral(
    ingested: tuple[Path, list[str]], encoder, real_cxr: Path
) -> None:
    store_path, files = ingested
    store = Store(store_path)
    ids = store.column("image_id").tolist()
    stored = store.select(model="elixr-v2").vectors()
    names = [files[0], REAL_DICOM, "covid-19-pneumonia-58-prior.jpg"]
    images = [load_canonical(real_cxr / n) for n in names]
    again = encoder.encode(images)  # another instance, no chunking, pipelined
    single = np.concatenate([encoder.encode([im]) for im in images])
    for i, n in enumerate(names):
        np.testing.assert_allclose(again[i], stored[ids.index(Path(n).stem)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(single, again, rtol=1e-6, atol=1e-6)
    encoder.pipelined = False
    try:
        sequential = encoder.encode(images)
    finally:
        encoder.pipelined = True
    np.testing.assert_allclose(sequential, again, rtol=1e-6, atol=1e-6)
    assert encoder.forward([]).shape == (0, 24_576)


@pytest.mark.slow
def test_different_weights_refused_into_same_model(ingested: tuple[Path, list[str]], tmp_path: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    enc = get_encoder("elixr-v2", weights=write_elixr_standin(tmp_path / "other", seed=9))
    assert enc.config.weights_sha256 != Store(store_path).provenance("elixr-v2")["encoder"]["weights_sha256"]
    check_other_weights_refused(store_path, real_cxr, files[0], enc)


@pytest.mark.slow
def test_cli_ingest_with_weights_and_info_shows_provenance(standin: Path, real_cxr: Path, tmp_path: Path) -> None:
    """`cxrstore ingest --encoder elixr-v2 --weights DIR` (a worker process prepares), then `cxrstore info`."""
    from click.testing import CliRunner

    from cli.main import cli
    from tests.encoder_checks import ingest_then_info

    files = ("00000001_000.png", "Fake_MONOHR1.dcm", "16747_3_1.jpg")
    entry, _ = ingest_then_info(real_cxr, tmp_path, "elixr-v2", standin, files=files, workers=1)
    prov = entry["provenance"]
    assert prov["encoder"]["weights_sha256"] == _expected_sha(standin)
    assert entry["dim"] == 24_576 and prov["native_shape"] == [32, 768]
    manifest = tmp_path / "m.csv"
    runner = CliRunner()
    # the contrastive output as a second model of the same store, through the generic option
    res = runner.invoke(cli, ["ingest", str(tmp_path / "s"), "--manifest", str(manifest), "--root", str(real_cxr),
                              "--encoder", "elixr-v2", "--weights", str(standin), "--model", "elixr-contrastive",
                              "--encoder-option", "output=all_contrastive_img_emb", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["filled"] == 3
    models = json.loads(runner.invoke(cli, ["info", str(tmp_path / "s"), "--json"]).output)["models"]
    assert models["elixr-contrastive"]["dim"] == 4_096
    assert models["elixr-contrastive"]["provenance"]["native_shape"] == [32, 128]
    assert models["elixr-contrastive"]["provenance"]["encoder"]["params"]["output"] == "all_contrastive_img_emb"
    res = runner.invoke(cli, ["ingest", str(tmp_path / "s"), "--manifest", str(manifest), "--root", str(real_cxr),
                              "--encoder", "elixr-v2", "--weights", str(standin), "--half", "--workers", "0"])
    assert res.exit_code != 0 and "float32 only" in res.output
