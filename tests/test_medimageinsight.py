"""MedImageInsight: a stand-in in the real folder layout, real files ingested end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra mii) is not installed")
pytest.importorskip("safetensors", reason="safetensors (extra mii) is not installed")

from PIL import Image
from safetensors.torch import load_file, save_file

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import available_encoders, get_encoder
from cxrstore.encoders.davit import DaViT
from cxrstore.encoders.medimageinsight import (
    REDUCED_ARCH,
    canonical_key,
    prepare_mii,
    read_mii_config,
    write_mii_standin,
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

WEIGHTS = "2024.09.27/vision_model/medimageinsigt-v1.0.0.pt"



@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mii_standin(tmp_path_factory.mktemp("mii") / "MedImageInsights", seed=1)


@pytest.fixture(scope="module")
def small_standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input 96x96: stages of 24, 12, 6, 3 tokens a side (windows of 12 padded)."""
    return write_mii_standin(tmp_path_factory.mktemp("mii-small") / "repo", arch={"image_size": [96, 96]}, seed=2)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, standin: Path, real_cxr: Path) -> tuple[Path, list[str]]:
    files = sorted(p.name for p in real_cxr.iterdir() if p.is_file())
    work = tmp_path_factory.mktemp("mii-store")
    manifest = write_manifest(work / "manifest.csv", files)
    enc = get_encoder("medimageinsight", weights=standin, batch=4)
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=enc, workers=0, batch_size=5)
    assert report.failed == 0, report.failures
    assert report.added == len(files)
    return work / "store", files


def test_registered_without_importing_torch_at_module_import() -> None:
    assert "medimageinsight" in available_encoders()


def test_standin_has_the_real_layout(standin: Path) -> None:
    assert (standin / "2024.09.27" / "config.yaml").is_file()
    tensors = load_file(str(standin / WEIGHTS))
    assert "image_projection" in tensors and "lang_projection" in tensors
    assert "image_encoder.blocks.2.1.channel_block.channel_attn.fn.qkv.weight" in tensors
    assert "image_encoder.convs.0.proj.weight" in tensors and "image_encoder.norms.weight" in tensors
    arch = read_mii_config(standin / "2024.09.27" / "config.yaml")
    assert arch["embed_dims"] == REDUCED_ARCH["embed_dims"] and arch["image_size"] == [480, 480]


@pytest.mark.slow
def test_ingest_real_files_end_to_end(ingested: tuple[Path, list[str]], standin: Path) -> None:
    store_path, files = ingested
    store = Store(store_path)
    vecs = store.select(model="medimageinsight").vectors()
    assert vecs.shape == (len(files), REDUCED_ARCH["dim_projection"]) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # distinct images give distinct vectors; the MONOCHROME1 twin is inverted, so it differs too
    assert len({v.tobytes() for v in vecs}) == len(files)
    prov = store.provenance("medimageinsight")
    sha = hashlib.sha256((standin / WEIGHTS).read_bytes()).hexdigest()
    assert prov["encoder"]["weights_sha256"] == sha
    params = prov["encoder"]["params"]
    assert params["input_size"] == [480, 480] and params["interpolation"] == "bicubic"
    assert params["mean"] == [0.485, 0.456, 0.406] and params["std"] == [0.229, 0.224, 0.225]
    assert params["embed_dims"] == REDUCED_ARCH["embed_dims"] and params["depths"] == REDUCED_ARCH["depths"]
    assert params["precision"] == "float32" and params["weights_file"] == "medimageinsigt-v1.0.0.pt"
    assert prov["native_shape"] == [REDUCED_ARCH["dim_projection"]]


@pytest.mark.slow
def test_deterministic_and_batch_independent(ingested: tuple[Path, list[str]], standin: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    enc = get_encoder("medimageinsight", weights=standin)  # other instance, no micro-batching
    check_reencoding_matches_store(store_path, "medimageinsight", enc, real_cxr, files[:2], atol=2e-5)


@pytest.mark.slow
def test_different_weights_refused_into_same_model(ingested: tuple[Path, list[str]], tmp_path: Path, real_cxr: Path) -> None:
    store_path, files = ingested
    other = get_encoder("medimageinsight", weights=write_mii_standin(tmp_path / "other", seed=9))
    check_other_weights_refused(store_path, real_cxr, files[0], other)


def test_forward_matches_published_computation(small_standin: Path) -> None:
    """Explicit published attention, projection, and normalisation, step by step."""
    enc = get_encoder("medimageinsight", weights=small_standin)
    rng = np.random.default_rng(0)
    images = [rng.random((130, 100), dtype=np.float32), rng.random((96, 96), dtype=np.float32)]
    out = enc.encode(images)
    arch = read_mii_config(small_standin / "2024.09.27" / "config.yaml")
    ref = DaViT(
        depths=arch["depths"], patch_size=arch["patch_size"], patch_stride=arch["patch_stride"],
        patch_padding=arch["patch_padding"], patch_prenorm=arch["patch_prenorm"], embed_dims=arch["embed_dims"],
        num_heads=arch["num_heads"], num_groups=arch["num_groups"], window_size=arch["window_size"], use_sdpa=False,
    ).eval()
    tensors = load_file(str(small_standin / WEIGHTS))
    ref.load_state_dict({k[14:]: v for k, v in tensors.items() if k.startswith("image_encoder.")}, strict=True)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    x = []
    for im in images:
        im8 = Image.fromarray(np.rint(im * 255).astype(np.uint8))
        r = np.asarray(im8.resize((96, 96), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        x.append((np.repeat(r[None], 3, axis=0) - mean) / std)
    with torch.no_grad():
        feats = ref(torch.from_numpy(np.stack(x)))
        z = (feats @ tensors["image_projection"]).numpy()
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(out, z, atol=1e-5)
    assert out.shape == (2, REDUCED_ARCH["dim_projection"])


def test_prepare_matches_8bit_bicubic_pipeline() -> None:
    rng = np.random.default_rng(1)
    img8 = (rng.random((300, 200)) * 255).astype(np.uint8)
    ours = prepare_mii(img8.astype(np.float32) / 255, size=(480, 480))
    published = np.asarray(Image.fromarray(img8).resize((480, 480), Image.Resampling.BICUBIC))
    assert ours.shape == (480, 480) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, published)
    # a float image is rounded to 8 bits first, as the published 8-bit pipeline sees it
    np.testing.assert_array_equal(prepare_mii(img8.astype(np.float32) / 255 + 0.001, size=(480, 480)), published)
    with pytest.raises(UsageError, match="2-D"):
        prepare_mii(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        prepare_mii(np.full((8, 8), np.nan, np.float32), size=(4, 4))


def test_old_key_spellings_map_like_the_published_loader() -> None:
    assert canonical_key("visual.conv_embeds.0.proj.weight") == "image_encoder.convs.0.proj.weight"
    assert canonical_key("visual.main_blocks.2.10.0.attn.qkv.weight") == "image_encoder.blocks.2.10.spatial_block.window_attn.fn.qkv.weight"
    assert canonical_key("visual.main_blocks.0.0.1.cpe.1.proj.bias") == "image_encoder.blocks.0.0.channel_block.conv2.fn.dw.bias"
    assert canonical_key("vision_projection") == "image_projection"
    assert canonical_key("image_encoder.blocks.0.0.spatial_block.ffn.norm.weight") == "image_encoder.blocks.0.0.spatial_block.ffn.norm.weight"
    assert canonical_key("text.token_embedding.weight") == "lang_encoder.token_embedding.weight"


def test_old_key_file_loads(small_standin: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "old"
    shutil.copytree(small_standin, repo)
    tensors = load_file(str(repo / WEIGHTS))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("image_encoder.", "visual.").replace("image_projection", "vision_projection")
        k = k.replace(".convs.", ".conv_embeds.").replace(".blocks.", ".main_blocks.")
        k = k.replace(".spatial_block.window_attn.fn.", ".0.attn.").replace(".channel_block.ffn.norm.", ".1.norm2.")
        renamed[k] = v
    save_file(renamed, str(repo / WEIGHTS))
    rng = np.random.default_rng(3)
    img = [rng.random((64, 64), dtype=np.float32)]
    new = get_encoder("medimageinsight", weights=small_standin).encode(img)
    old = get_encoder("medimageinsight", weights=repo / "2024.09.27").encode(img)
    np.testing.assert_array_equal(new, old)


def test_missing_or_mismatched_weights_are_clear_errors(small_standin: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(UsageError, match=r"missing .*medimageinsigt-v1\.0\.0\.pt"):
        (tmp_path / "empty" / "2024.09.27").mkdir(parents=True)
        (tmp_path / "empty" / "2024.09.27" / "config.yaml").write_text("x: 1\n")
        get_encoder("medimageinsight", weights=tmp_path / "empty")
    with pytest.raises(UsageError, match="does not exist"):
        get_encoder("medimageinsight", weights=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="needs weights="):
        get_encoder("medimageinsight")
    repo = tmp_path / "bad"
    shutil.copytree(small_standin, repo)
    tensors = load_file(str(repo / WEIGHTS))
    del tensors["image_encoder.blocks.2.1.spatial_block.window_attn.fn.qkv.weight"]
    tensors["image_encoder.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(repo / WEIGHTS))
    with pytest.raises(UsageError) as err:
        get_encoder("medimageinsight", weights=repo)
    msg = str(err.value)
    assert str(repo / WEIGHTS) in msg
    assert "1 missing key(s): image_encoder.blocks.2.1.spatial_block.window_attn.fn.qkv.weight" in msg
    assert "1 unexpected key(s): image_encoder.extra.weight" in msg
    # a config at another width than the weights: shape mismatches named
    cfg = repo / "2024.09.27" / "config.yaml"
    shutil.copy(small_standin / WEIGHTS, repo / WEIGHTS)
    cfg.write_text(cfg.read_text().replace("- 64\n", "- 48\n"))
    with pytest.raises(UsageError, match=r"shape mismatch.*image_encoder\."):
        get_encoder("medimageinsight", weights=repo)
    # not safetensors at all (e.g. a pickled checkpoint) is refused, never unpickled
    (repo / WEIGHTS).write_bytes(b"\x80\x02}q\x00.")
    cfg.write_text((small_standin / "2024.09.27" / "config.yaml").read_text())
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        get_encoder("medimageinsight", weights=repo)


def test_options_validated(small_standin: Path) -> None:
    check_torch_encoder_options("medimageinsight", small_standin, "weights, device, batch, half")


def test_published_architecture_has_the_published_size() -> None:
    """The published config builds a 0.36B-parameter encoder (on the meta device: no memory)."""
    from cxrstore.encoders.medimageinsight import PUBLISHED_ARCH

    keys = ("depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm", "embed_dims", "num_heads", "num_groups", "window_size")
    with torch.device("meta"):
        model = DaViT(**{k: PUBLISHED_ARCH[k] for k in keys})
    assert sum(p.numel() for p in model.parameters()) == 360_636_416
    assert model.dim_out == 2048 and PUBLISHED_ARCH["dim_projection"] == 1024


def test_weights_path_may_name_the_file_or_the_release_folder(small_standin: Path) -> None:
    rng = np.random.default_rng(5)
    img = [rng.random((40, 50), dtype=np.float32)]
    a = get_encoder("medimageinsight", weights=small_standin).encode(img)
    b = get_encoder("medimageinsight", weights=small_standin / WEIGHTS).encode(img)
    c = get_encoder("medimageinsight", weights=small_standin / "2024.09.27").encode(img)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_ingest_dataset_by_name_with_encoder_options(small_standin: Path, real_cxr: Path, tmp_path: Path) -> None:
    """The Python twin of `cxrstore ingest --encoder medimageinsight --weights DIR`."""
    from cxrstore.ingest import ingest_dataset

    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path\na,00000001_000.png\nb,16747_3_1.jpg\n")
    report = ingest_dataset(
        tmp_path / "s", dataset="csv", encoder="medimageinsight",
        encoder_options={"weights": str(small_standin), "device": "cpu", "batch": 1},
        dataset_options={"manifest": manifest, "root": real_cxr}, workers=0,
    )
    assert report.added == 2 and report.failed == 0 and report.encoder == "medimageinsight"
    st = Store(tmp_path / "s")
    assert st.provenance("medimageinsight")["encoder"]["params"]["input_size"] == [96, 96]
    np.testing.assert_allclose(np.linalg.norm(st.select(model="medimageinsight").vectors(), axis=1), 1.0, atol=1e-5)


def test_cli_ingest_with_weights_and_info_shows_provenance(small_standin: Path, real_cxr: Path, tmp_path: Path) -> None:
    """`cxrstore ingest --encoder medimageinsight --weights DIR`, then `cxrstore info` shows the weights' sha256."""
    from cxrstore.encoders.weights import weights_sha256
    from tests.encoder_checks import ingest_then_info

    entry, _ = ingest_then_info(real_cxr, tmp_path, "medimageinsight", small_standin)
    prov = entry["provenance"]
    assert prov["encoder"]["weights_sha256"] == weights_sha256(small_standin / WEIGHTS)
    assert prov["native_shape"] == [entry["dim"]]
