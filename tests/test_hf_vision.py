"""hf-vision: a RAD-DINO stand-in (tiny Dinov2Model) through the real transformers loader.

Reference computations use transformers itself: its PIL image processor
(``BitImageProcessorPil`` / ``ViTImageProcessorPil``) and ``AutoModel`` on the same
8-bit images. Pixels must be equal exactly; vectors within ``atol 1e-5`` (float32 on
the CPU; the only difference allowed is float summation order).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra hf) is not installed")
pytest.importorskip("safetensors", reason="safetensors (extra hf) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (extra hf) is not installed")

from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BitImageProcessorPil, ViTImageProcessorPil

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import available_encoders, encoder_from_config, get_encoder
from cxrstore.encoders.hf_vision import (
    PROCESSOR_DEFAULTS,
    RESAMPLE_NAMES,
    prepare_hf,
    read_image_processing,
    write_hf_standin,
)
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest
from cxrstore.store.store import Store
from tests.encoder_checks import (
    check_other_weights_refused,
    check_reencoding_matches_store,
    check_torch_encoder_options,
    write_manifest,
)

ATOL = 1e-5
#: The keys and values of RAD-DINO's preprocessor_config.json (BitImageProcessor at 518).
RAD_DINO_PROCESSOR = {
    "crop_size": {"height": 518, "width": 518},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5307, 0.5307, 0.5307],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.2583, 0.2583, 0.2583],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 518},
}



@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_standin(tmp_path_factory.mktemp("hf") / "rad-dino", seed=1)


def _canonical(real_cxr: Path, names: list[str]) -> list[np.ndarray]:
    from cxrstore.io import load_canonical

    return [load_canonical(real_cxr / n) for n in names]


def _as_8bit(images: list[np.ndarray], mode: str = "L") -> list[Image.Image]:
    """The 8-bit images a user would hand to the processor (PIL, grayscale or converted to RGB)."""
    return [Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)).convert(mode) for x in images]


def _reference(folder: Path, images: list[np.ndarray], pooling: str = "cls", processor_cls: type = BitImageProcessorPil) -> np.ndarray:
    """transformers' own computation: its PIL image processor, AutoModel, the pooled token."""
    proc = processor_cls.from_pretrained(str(folder))
    # without do_convert_rgb (ViT's default) the user converts to RGB, as from a JPEG
    mode = "L" if proc.do_convert_rgb else "RGB"
    pixels = proc(images=_as_8bit(images, mode), return_tensors="pt")["pixel_values"]
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    if pooling == "pooler":
        return out.pooler_output.numpy()
    h = out.last_hidden_state
    return (h[:, 0] if pooling == "cls" else h[:, 1:].mean(1)).numpy()


def _files(real_cxr: Path) -> list[str]:
    return sorted(p.name for p in real_cxr.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, standin: Path, real_cxr: Path) -> tuple[Path, list[str]]:
    files = _files(real_cxr)
    work = tmp_path_factory.mktemp("hf-store")
    manifest = write_manifest(work / "manifest.csv", files)
    enc = get_encoder("hf-vision", weights=standin, batch=4)
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=enc, workers=0, batch_size=5)
    assert report.failed == 0, report.failures
    assert report.added == len(files)
    return work / "store", files


def test_registered_and_module_imports_without_transformers() -> None:
    assert "hf-vision" in available_encoders()
    code = (
        "import sys, cxrstore.encoders.hf_vision as m; "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_standin_has_rad_dino_layout(standin: Path) -> None:
    assert sorted(p.name for p in standin.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    cfg = json.loads((standin / "config.json").read_text())
    assert cfg["model_type"] == "dinov2" and cfg["architectures"] == ["Dinov2Model"]
    assert cfg["patch_size"] == 14 and cfg["image_size"] == 56 and cfg["hidden_size"] == 32
    pre = json.loads((standin / "preprocessor_config.json").read_text())
    assert set(pre) == set(RAD_DINO_PROCESSOR)
    assert pre["size"] == {"shortest_edge": 56} and pre["crop_size"] == {"height": 56, "width": 56}
    tensors = load_file(str(standin / "model.safetensors"))
    assert "embeddings.cls_token" in tensors and "layernorm.weight" in tensors
    # the on-disk names of a transformers 4.x Dinov2Model checkpoint (RAD-DINO's), whatever transformers wrote it
    assert "encoder.layer.0.attention.attention.query.weight" in tensors
    assert "encoder.layer.0.layer_scale1.lambda1" in tensors


@pytest.mark.slow
def test_ingest_real_files_end_to_end_equals_transformers(ingested: tuple[Path, list[str]], standin: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    store = Store(store_path)
    vecs = store.select(model="hf-vision").vectors()
    ids = store.column("image_id").tolist()
    assert vecs.shape == (len(files), 32) and vecs.dtype == np.float32
    # not normalised: the raw CLS features
    assert not np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    assert len({v.tobytes() for v in vecs}) == len(files)
    ref = _reference(standin, _canonical(real_cxr, files))
    order = [ids.index(Path(n).stem) for n in files]
    np.testing.assert_allclose(vecs[order], ref, atol=ATOL, rtol=1e-5)
    prov = store.provenance("hf-vision")
    assert prov["encoder"]["weights_sha256"] == hashlib.sha256((standin / "model.safetensors").read_bytes()).hexdigest()
    params = prov["encoder"]["params"]
    assert params["model_type"] == "dinov2" and params["architectures"] == ["Dinov2Model"]
    assert params["hidden_size"] == 32 and params["pooling"] == "cls" and params["precision"] == "float32"
    assert params["image_processor_type"] == "BitImageProcessor" and params["resample"] == "bicubic"
    assert params["size"] == {"shortest_edge": 56} and params["crop_size"] == {"height": 56, "width": 56}
    assert params["image_mean"] == [0.5307] * 3 and params["image_std"] == [0.2583] * 3
    assert params["rescale_factor"] == pytest.approx(1 / 255) and params["output_norm"] == "none"
    assert prov["native_shape"] == [32]


@pytest.mark.slow
def test_pixels_equal_transformers_pil_processor_on_real_images_at_518(real_cxr: Path, tmp_path: Path) -> None:
    """RAD-DINO's own processor settings on the real files: every pixel value identical."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PROCESSOR))
    proc = read_image_processing(tmp_path / "preprocessor_config.json")
    images = _canonical(real_cxr, _files(real_cxr))
    theirs = BitImageProcessorPil(**{k: v for k, v in RAD_DINO_PROCESSOR.items() if k != "image_processor_type"})
    expected = theirs(images=_as_8bit(images), return_tensors="np")["pixel_values"]
    ours = np.stack([prepare_hf(x, size=proc.size, resample=proc.resample, crop_size=proc.output_size) for x in images])
    assert ours.shape == (len(images), 518, 518) and ours.dtype == np.uint8
    mean = np.asarray(proc.image_mean, np.float32)[:, None, None]
    std = np.asarray(proc.image_std, np.float32)[:, None, None]
    pixels = ((ours[:, None].astype(np.float64) * proc.rescale_factor).astype(np.float32) - mean) / std
    np.testing.assert_array_equal(pixels, expected)


def test_encoder_pixel_values_equal_processor_including_padding_and_squash(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images = [rng.random(s, dtype=np.float32) for s in ((130, 97), (40, 200), (21, 30), (56, 56))]
    # crop bigger than the resized image (zero padding), bilinear
    pad = write_hf_standin(tmp_path / "pad", processor={"crop_size": {"height": 56, "width": 56},
                                                        "size": {"shortest_edge": 42}, "resample": 2})
    # a ViT-style squash without crop
    vit = {"image_processor_type": "ViTImageProcessor", "size": {"height": 56, "width": 56}, "do_center_crop": False}
    squash = write_hf_standin(tmp_path / "squash", processor=vit)
    for folder, cls in ((pad, BitImageProcessorPil), (squash, ViTImageProcessorPil)):
        enc = get_encoder("hf-vision", weights=folder)
        prep = enc.preparer()
        ours = enc.pixel_values([prep(x) for x in images]).numpy()
        theirs = cls.from_pretrained(str(folder))(images=_as_8bit(images), return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(ours, theirs)
    assert (get_encoder("hf-vision", weights=pad).pixel_values([prepare_hf(images[2], size={"shortest_edge": 42},
            crop_size=(56, 56))]).numpy()[0, 0, 0, 0]) == pytest.approx(-0.5307 / 0.2583, rel=1e-6)  # a padded zero


def test_processor_defaults_match_transformers_classes(tmp_path: Path) -> None:
    """A key absent from preprocessor_config.json takes the class default, as in transformers."""
    classes = {"BitImageProcessor": BitImageProcessorPil, "ViTImageProcessor": ViTImageProcessorPil,
               "CLIPImageProcessor": transformers.CLIPImageProcessorPil}
    assert set(classes) == set(PROCESSOR_DEFAULTS)
    for name, cls in classes.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"image_processor_type": name}))
        ours = read_image_processing(path)
        theirs = cls()
        assert ours.do_resize == theirs.do_resize and ours.do_rescale == theirs.do_rescale
        assert ours.do_normalize == theirs.do_normalize and ours.do_center_crop == bool(theirs.do_center_crop)
        assert ours.size == {k: v for k, v in dict(theirs.size).items() if v is not None}
        assert ours.resample == int(theirs.resample) and ours.rescale_factor == pytest.approx(theirs.rescale_factor)
        np.testing.assert_allclose(ours.image_mean, theirs.image_mean)
        np.testing.assert_allclose(ours.image_std, theirs.image_std)
        if ours.do_center_crop:
            assert ours.crop_size == {k: v for k, v in dict(theirs.crop_size).items() if v is not None}
    assert RESAMPLE_NAMES[3] == "bicubic" and int(Image.Resampling.BICUBIC) == 3


def test_normalisation_read_from_preprocessor_config(standin: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-mean"
    shutil.copytree(standin, other)
    pre = json.loads((other / "preprocessor_config.json").read_text())
    pre["image_mean"] = [0.4, 0.4, 0.4]
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    rng = np.random.default_rng(7)
    images = [rng.random((80, 70), dtype=np.float32), rng.random((50, 90), dtype=np.float32)]
    a = get_encoder("hf-vision", weights=standin)
    b = get_encoder("hf-vision", weights=other)
    va, vb = a.encode(images), b.encode(images)
    assert np.abs(va - vb).max() > 1e-3
    np.testing.assert_allclose(vb, _reference(other, images), atol=ATOL, rtol=1e-5)
    assert a.config.diff(b.config) == ["params.image_mean"]
    assert b.config.params["image_mean"] == [0.4, 0.4, 0.4]


def test_pooling_options_match_transformers(standin: Path) -> None:
    rng = np.random.default_rng(8)
    images = [rng.random((64, 64), dtype=np.float32), rng.random((90, 60), dtype=np.float32)]
    cls = get_encoder("hf-vision", weights=standin).encode(images)
    pooler = get_encoder("hf-vision", weights=standin, pooling="pooler")
    mean = get_encoder("hf-vision", weights=standin, pooling="mean")
    np.testing.assert_array_equal(pooler.encode(images), cls)  # Dinov2Model's pooler_output is its CLS token
    np.testing.assert_allclose(mean.encode(images), _reference(standin, images, "mean"), atol=ATOL, rtol=1e-5)
    assert np.abs(mean.encode(images) - cls).max() > 1e-3
    assert mean.config.diff(pooler.config) == ["params.pooling"]


def test_vit_pooler_and_squash(tmp_path: Path) -> None:
    """A ViTModel (dense + tanh pooler) with a ViTImageProcessor (bilinear squash, no crop)."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=32, patch_size=8)).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    rng = np.random.default_rng(9)
    images = [rng.random((70, 50), dtype=np.float32), rng.random((20, 45), dtype=np.float32)]
    enc = get_encoder("hf-vision", weights=folder, pooling="pooler")
    out = enc.encode(images)
    assert out.shape == (2, 24) and enc.config.params["resample"] == "bilinear"
    np.testing.assert_allclose(out, _reference(folder, images, "pooler", ViTImageProcessorPil), atol=ATOL, rtol=1e-5)
    cls = get_encoder("hf-vision", weights=folder).encode(images)
    np.testing.assert_allclose(cls, _reference(folder, images, "cls", ViTImageProcessorPil), atol=ATOL, rtol=1e-5)
    assert np.abs(out - cls).max() > 1e-3
    # a checkpoint saved without its pooling head: CLS works (same tensors), the pooler is refused by key
    headless = tmp_path / "headless"
    shutil.copytree(folder, headless)
    tensors = load_file(str(headless / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("pooler.")}, str(headless / "model.safetensors"),
              metadata={"format": "pt"})
    np.testing.assert_array_equal(get_encoder("hf-vision", weights=headless).encode(images), cls)
    with pytest.raises(UsageError, match=r"missing key\(s\): pooler\.dense\."):
        get_encoder("hf-vision", weights=headless, pooling="pooler")


def test_pytorch_bin_and_sharded_weights_load(standin: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    images = [rng.random((60, 60), dtype=np.float32)]
    base = get_encoder("hf-vision", weights=standin)
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(standin / name, binary / name)
    torch.save(load_file(str(standin / "model.safetensors")), binary / "pytorch_model.bin")
    enc = get_encoder("hf-vision", weights=binary)
    np.testing.assert_array_equal(enc.encode(images), base.encode(images))
    assert enc.config.params["weights_files"] == ["pytorch_model.bin"]
    assert enc.config.weights_sha256 == hashlib.sha256((binary / "pytorch_model.bin").read_bytes()).hexdigest()
    assert enc.config.diff(base.config) == ["weights_sha256", "params.weights_files"]
    sharded = tmp_path / "sharded"
    model = AutoModel.from_pretrained(str(standin), local_files_only=True)
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    shutil.copy(standin / "preprocessor_config.json", sharded)
    files = get_encoder("hf-vision", weights=sharded).config.params["weights_files"]
    assert files[0] == "model.safetensors.index.json" and len(files) > 2
    np.testing.assert_array_equal(get_encoder("hf-vision", weights=sharded).encode(images), base.encode(images))


@pytest.mark.slow
def test_deterministic_and_batch_independent(ingested: tuple[Path, list[str]], standin: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    enc = get_encoder("hf-vision", weights=standin)  # another instance, no micro-batching
    again = check_reencoding_matches_store(store_path, "hf-vision", enc, real_cxr, files[:3], atol=ATOL)
    np.testing.assert_array_equal(enc.encode(_canonical(real_cxr, files[:3])), again)


@pytest.mark.slow
def test_different_weights_refused_into_same_model(ingested: tuple[Path, list[str]], tmp_path: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    other = get_encoder("hf-vision", weights=write_hf_standin(tmp_path / "other", seed=9))
    check_other_weights_refused(store_path, real_cxr, files[0], other)


def test_missing_files_are_named(standin: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError) as err:
        get_encoder("hf-vision", weights=empty)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        assert str(empty / name) in str(err.value)
    partial = tmp_path / "partial"
    shutil.copytree(standin, partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(UsageError, match=r"missing .*partial/preprocessor_config\.json"):
        get_encoder("hf-vision", weights=partial)
    with pytest.raises(UsageError, match="does not exist"):
        get_encoder("hf-vision", weights=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="pass its folder"):
        get_encoder("hf-vision", weights=standin / "model.safetensors")
    with pytest.raises(UsageError, match="needs weights="):
        get_encoder("hf-vision")
    index = tmp_path / "index"
    shutil.copytree(standin, index)
    (index / "model.safetensors").unlink()
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(UsageError, match="model-00001.safetensors"):
        get_encoder("hf-vision", weights=index)


def test_mismatched_weights_name_the_keys(standin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(standin, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    dropped = "encoder.layer.1.attention.attention.query.weight"  # as on disk; transformers 5 renames it on load
    assert dropped in tensors
    del tensors[dropped]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["layernorm.weight"] = torch.ones(40)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError) as err:
        get_encoder("hf-vision", weights=bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "1 missing key(s): encoder.layer.1.attention." in msg and "1 unexpected key(s): extra.weight" in msg
    assert "layernorm.weight (40,) != (32,)" in msg


def test_remote_code_and_non_vision_models_refused(standin: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    shutil.copytree(standin, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="my_xray_vit", auto_map={"AutoModel": "modeling_xray.XrayModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="trust_remote_code"):
        get_encoder("hf-vision", weights=remote)
    from transformers import BertConfig, BertModel

    text = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(text))
    shutil.copy(standin / "preprocessor_config.json", text)
    with pytest.raises(UsageError, match="does not take images"):
        get_encoder("hf-vision", weights=text)
    unsupported = tmp_path / "pad"
    shutil.copytree(standin, unsupported)
    (unsupported / "preprocessor_config.json").write_text(json.dumps({**RAD_DINO_PROCESSOR, "do_pad": True}))
    with pytest.raises(UsageError, match="do_pad"):
        get_encoder("hf-vision", weights=unsupported)
    (unsupported / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "DPTImageProcessor"}))
    with pytest.raises(UsageError, match="DPTImageProcessor"):
        get_encoder("hf-vision", weights=unsupported)


def test_options_validated(standin: Path) -> None:
    check_torch_encoder_options("hf-vision", standin, "weights, device, batch, half, pooling")
    with pytest.raises(UsageError, match="pooling must be one of cls, pooler, mean"):
        get_encoder("hf-vision", weights=standin, pooling="max")
    with pytest.raises(UsageError, match="2-D"):
        prepare_hf(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        prepare_hf(np.full((8, 8), np.nan, np.float32))


def test_preparer_is_picklable_and_rebuilds_from_config(standin: Path, tmp_path: Path) -> None:
    import pickle

    enc = get_encoder("hf-vision", weights=standin, pooling="mean")
    prep = pickle.loads(pickle.dumps(enc.preparer()))
    x = np.random.default_rng(11).random((77, 66), dtype=np.float32)
    np.testing.assert_array_equal(prep(x), enc.preparer()(x))
    again = encoder_from_config(enc.config.to_json(), weights=standin)
    assert again.pooling == "mean" and again.config == enc.config
    other = write_hf_standin(tmp_path / "other", seed=5)
    with pytest.raises(UsageError, match="weights_sha256"):
        encoder_from_config(enc.config.to_json(), weights=other)


def test_cli_ingest_with_weights_and_info_shows_provenance(standin: Path, real_cxr: Path, tmp_path: Path) -> None:
    """`cxrstore ingest --encoder hf-vision --weights DIR`, then `cxrstore info` shows the weights' sha256."""
    from tests.encoder_checks import ingest_then_info

    entry, _ = ingest_then_info(real_cxr, tmp_path, "hf-vision", standin)
    prov = entry["provenance"]
    assert prov["encoder"]["weights_sha256"] == hashlib.sha256((standin / "model.safetensors").read_bytes()).hexdigest()
    assert prov["encoder"]["params"]["model_type"] == "dinov2" and prov["encoder"]["params"]["pooling"] == "cls"
    assert prov["native_shape"] == [entry["dim"]] == [32]
    vecs = Store(tmp_path / "s").select(model="hf-vision").vectors()
    np.testing.assert_allclose(vecs, _reference(standin, _canonical(real_cxr, ["00000001_000.png", "Fake_MONOHR1.dcm"])),
                               atol=ATOL, rtol=1e-5)


def test_backbone_without_cls_token_offers_only_its_pooler(tmp_path: Path) -> None:
    """A Swin transformer (no CLS token; average-pooled pooler_output), ViTImageProcessor at 32 x 32."""
    from transformers import SwinConfig, SwinModel

    folder = tmp_path / "swin"
    torch.manual_seed(1)
    SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                         window_size=4)).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "do_convert_rgb": True}))
    with pytest.raises(UsageError, match="needs a model with a CLS token"):
        get_encoder("hf-vision", weights=folder)
    enc = get_encoder("hf-vision", weights=folder, pooling="pooler")
    images = [np.random.default_rng(12).random((48, 40), dtype=np.float32)]
    out = enc.encode(images)
    assert out.shape == (1, 16) and enc.dim == 16 and enc.config.params["model_type"] == "swin"
    np.testing.assert_allclose(out, _reference(folder, images, "pooler", ViTImageProcessorPil), atol=ATOL, rtol=1e-5)
