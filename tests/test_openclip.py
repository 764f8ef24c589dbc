"""open-clip: stand-ins in the real hub folder format, both tower kinds, real files ingested end to end."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra openclip) is not installed")
pytest.importorskip("safetensors", reason="safetensors (extra openclip) is not installed")

import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cxrstore.datasets.csv_manifest import CsvManifest  # noqa: E402
from cxrstore.encoders.base import available_encoders, encoder_from_config, get_encoder  # noqa: E402
from cxrstore.encoders.openclip import (  # noqa: E402
    BIOMEDCLIP_CONFIG,
    OPENAI_MEAN,
    OPENAI_STD,
    build_vision_tower,
    prepare_openclip,
    read_openclip_config,
    resolve_openclip_config,
    write_openclip_standin,
)
from cxrstore.errors import UsageError  # noqa: E402
from cxrstore.ingest import ingest  # noqa: E402
from cxrstore.store.store import Store  # noqa: E402
from tests.encoder_checks import (  # noqa: E402
    check_other_weights_refused,
    check_reencoding_matches_store,
    check_torch_encoder_options,
    write_manifest,
)

SAFE = "open_clip_model.safetensors"
BIN = "open_clip_pytorch_model.bin"
KINDS = ("timm", "native")
DIMS = {"timm": 16, "native": 24}



@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openclip")
    return {kind: write_openclip_standin(root / kind, kind=kind, seed=1) for kind in KINDS}


@pytest.fixture(scope="module", params=KINDS)
def ingested(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, standins: dict[str, Path],
             real_cxr: Path) -> tuple[str, Path, list[str]]:
    kind = request.param
    files = sorted(p.name for p in real_cxr.iterdir() if p.is_file())
    work = tmp_path_factory.mktemp(f"openclip-store-{kind}")
    manifest = write_manifest(work / "manifest.csv", files)
    enc = get_encoder("open-clip", weights=standins[kind], batch=4)
    report = ingest(work / "store", CsvManifest(manifest, root=real_cxr).records(), encoder=enc, workers=0, batch_size=5)
    assert report.failed == 0, report.failures
    assert report.added == len(files)
    return kind, work / "store", files


def _pixels(images: list[np.ndarray], mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> torch.Tensor:
    """Prepared uint8 images -> the normalised RGB tensor open_clip feeds its tower (ToTensor + Normalize)."""
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    x = x[:, None].repeat(1, 3, 1, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _attention(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
               heads: int) -> torch.Tensor:
    """Multi-head self-attention written out: softmax(q k^T / sqrt(d)) v, heads concatenated, output projection."""
    n, L, c = x.shape
    q, k, v = F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, L, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    return F.linear((a @ v).transpose(1, 2).reshape(n, L, c), w_out, b_out)


def _native_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, patch: int, quick_gelu: bool = False,
                      pool: str = "tok", final_ln_after_pool: bool = False) -> torch.Tensor:
    """open_clip's VisionTransformer.forward from the state dict, with torch.nn.functional only."""
    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def act(t: torch.Tensor) -> torch.Tensor:
        return t * torch.sigmoid(1.702 * t) if quick_gelu else F.gelu(t)

    t = F.conv2d(x, sd["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["class_embedding"].expand(t.shape[0], 1, -1)
    t = ln(torch.cat([cls, t], dim=1) + sd["positional_embedding"], "ln_pre")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}"
        ls1 = sd.get(f"{p}.ls_1.gamma", torch.ones(()))
        ls2 = sd.get(f"{p}.ls_2.gamma", torch.ones(()))
        t = t + ls1 * _attention(ln(t, f"{p}.ln_1"), sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"],
                                 sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"], heads)
        h = act(F.linear(ln(t, f"{p}.ln_2"), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"]))
        t = t + ls2 * F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
        i += 1

    def pooled(u: torch.Tensor) -> torch.Tensor:
        return u[:, 1:].mean(dim=1) if pool == "avg" else u[:, 0]

    out = ln(pooled(t), "ln_post") if final_ln_after_pool else pooled(ln(t, "ln_post"))
    return out @ sd["proj"]


def _timm_reference(sd: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, patch: int, pool: str = "token",
                    proj: str = "linear") -> torch.Tensor:
    """timm VisionTransformer + open_clip TimmModel head from the state dict, with torch.nn.functional only."""
    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)

    t = F.conv2d(x, sd["trunk.patch_embed.proj.weight"], sd["trunk.patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["trunk.cls_token"].expand(t.shape[0], -1, -1), t], dim=1) + sd["trunk.pos_embed"]
    i = 0
    while f"trunk.blocks.{i}.norm1.weight" in sd:
        p = f"trunk.blocks.{i}"
        t = t + _attention(ln(t, f"{p}.norm1"), sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"],
                           sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"], heads)
        h = F.gelu(F.linear(ln(t, f"{p}.norm2"), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
        t = t + F.linear(h, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        i += 1
    if "trunk.norm.weight" in sd:
        t = ln(t, "trunk.norm")
    z = t[:, 0] if pool == "token" else t[:, 1:].mean(dim=1)
    if "trunk.fc_norm.weight" in sd:
        z = ln(z, "trunk.fc_norm")
    if "trunk.head.weight" in sd:
        z = F.linear(z, sd["trunk.head.weight"], sd["trunk.head.bias"])
    if proj == "linear":
        z = F.linear(z, sd["head.proj.weight"], sd.get("head.proj.bias"))
    elif proj == "mlp":
        z = F.linear(F.gelu(F.linear(z, sd["head.mlp.fc1.weight"], sd["head.mlp.fc1.bias"])), sd["head.mlp.fc2.weight"],
                     sd.get("head.mlp.fc2.bias"))
    return z


def _visual(folder: Path) -> dict[str, torch.Tensor]:
    return {k[7:]: v for k, v in load_file(str(folder / SAFE)).items() if k.startswith("visual.")}


def _prepared(rng: np.random.Generator, n: int, size: int = 64) -> list[np.ndarray]:
    return [(rng.random((size, size)) * 255).astype(np.uint8) for _ in range(n)]


# -- registry and layout ------------------------------------------------------------------------
def test_registered_without_importing_torch_at_module_import() -> None:
    assert "open-clip" in available_encoders()
    code = "import sys, cxrstore.encoders.openclip; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_standins_have_the_real_layout(standins: dict[str, Path]) -> None:
    cfg = json.loads((standins["timm"] / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"
    assert cfg["model_cfg"]["vision_cfg"]["timm_pool"] == "" and cfg["model_cfg"]["vision_cfg"]["timm_proj"] == "linear"
    assert cfg["model_cfg"]["text_cfg"] == BIOMEDCLIP_CONFIG["model_cfg"]["text_cfg"]
    timm = load_file(str(standins["timm"] / SAFE))
    for key in ("visual.trunk.patch_embed.proj.weight", "visual.trunk.cls_token", "visual.trunk.pos_embed",
                "visual.trunk.blocks.1.attn.qkv.weight", "visual.trunk.blocks.0.mlp.fc2.bias", "visual.trunk.norm.weight",
                "visual.head.proj.weight", "text.proj.0.weight", "logit_scale"):
        assert key in timm, key
    assert "visual.head.proj.bias" not in timm and "visual.trunk.fc_norm.weight" not in timm
    native = load_file(str(standins["native"] / SAFE))
    for key in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                "visual.transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.bias",
                "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.ln_post.bias", "visual.proj",
                "token_embedding.weight", "positional_embedding", "text_projection"):
        assert key in native, key
    assert tuple(native["visual.proj"].shape) == (32, 24) and tuple(native["visual.positional_embedding"].shape) == (17, 32)
    assert tuple(timm["visual.trunk.pos_embed"].shape) == (1, 17, 32) and tuple(timm["visual.head.proj.weight"].shape) == (16, 32)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ingest_real_files_end_to_end(ingested: tuple[str, Path, list[str]], standins: dict[str, Path]) -> None:
    kind, store_path, files = ingested
    store = Store(store_path)
    vecs = store.select(model="open-clip").vectors()
    assert vecs.shape == (len(files), DIMS[kind]) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert len({v.tobytes() for v in vecs}) == len(files)
    prov = store.provenance("open-clip")
    assert prov["encoder"]["weights_sha256"] == hashlib.sha256((standins[kind] / SAFE).read_bytes()).hexdigest()
    params = prov["encoder"]["params"]
    assert params["tower"] == kind and params["weights_file"] == SAFE and params["config_file"] == "open_clip_config.json"
    assert params["image_size"] == [64, 64] and params["interpolation"] == "bicubic" and params["resize_mode"] == "shortest"
    np.testing.assert_allclose(params["mean"], OPENAI_MEAN)
    np.testing.assert_allclose(params["std"], OPENAI_STD)
    assert params["normalize"] is True and params["output_norm"] == "l2" and params["precision"] == "float32"
    assert params["model_cfg"]["embed_dim"] == DIMS[kind]
    written = json.loads((standins[kind] / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert params["model_cfg"]["vision_cfg"] == written
    assert prov["native_shape"] == [DIMS[kind]]


@pytest.mark.slow
def test_deterministic_and_batch_independent(ingested: tuple[str, Path, list[str]], standins: dict[str, Path],
                                             real_cxr: Path) -> None:
    kind, store_path, files = ingested
    enc = get_encoder("open-clip", weights=standins[kind])  # another instance, no micro-batching
    check_reencoding_matches_store(store_path, "open-clip", enc, real_cxr, files[:3], atol=2e-5)


@pytest.mark.slow
def test_different_weights_refused_into_same_model(ingested: tuple[str, Path, list[str]], tmp_path: Path,
                                                   real_cxr: Path) -> None:
    kind, store_path, files = ingested
    other = get_encoder("open-clip", weights=write_openclip_standin(tmp_path / "other", kind=kind, seed=9))
    check_other_weights_refused(store_path, real_cxr, files[0], other)


# -- independent checks of the computation ---------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "kwargs"),
    [
        ("default", {}),
        ("avg-pool, ln after pool, quick_gelu, layer scale", {"vision_cfg": {"pool_type": "avg", "final_ln_after_pool": True,
                                                                            "ls_init_value": 0.1}, "quick_gelu": True}),
    ],
)
def test_native_tower_matches_explicit_computation(tmp_path: Path, variant: str, kwargs: dict) -> None:
    folder = write_openclip_standin(tmp_path / "m", kind="native", seed=3, **kwargs)
    enc = get_encoder("open-clip", weights=folder, normalize=False)
    images = _prepared(np.random.default_rng(4), 3)
    out = enc.forward(images)
    vc = kwargs.get("vision_cfg", {})
    with torch.no_grad():
        ref = _native_reference(_visual(folder), _pixels(images, OPENAI_MEAN, OPENAI_STD), heads=2, patch=16,
                                quick_gelu=kwargs.get("quick_gelu", False), pool=vc.get("pool_type", "tok"),
                                final_ln_after_pool=vc.get("final_ln_after_pool", False)).numpy()
    assert out.shape == (3, 24)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    # the default output is the L2-normalised feature
    unit = get_encoder("open-clip", weights=folder).forward(images)
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_native_tower_matches_transformers_clip(standins: dict[str, Path]) -> None:
    """open_clip's names mapped onto transformers' CLIPVisionModelWithProjection give the same features."""
    pytest.importorskip("transformers", reason="transformers (extra hf) is not installed")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = _visual(standins["native"])
    hf_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
    hf = CLIPVisionModelWithProjection(hf_cfg).eval()
    mapped = {
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        "visual_projection.weight": sd["proj"].T.contiguous(),
    }
    for i in range(2):
        o, h = f"transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[f"{h}.self_attn.{name}.weight"] = sd[f"{o}.attn.in_proj_weight"][32 * j: 32 * (j + 1)]
            mapped[f"{h}.self_attn.{name}.bias"] = sd[f"{o}.attn.in_proj_bias"][32 * j: 32 * (j + 1)]
        pairs = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
        for hn, on in pairs:
            mapped[f"{h}.{hn}.weight"] = sd[f"{o}.{on}.weight"]
            mapped[f"{h}.{hn}.bias"] = sd[f"{o}.{on}.bias"]
    hf.load_state_dict(mapped, strict=True)
    images = _prepared(np.random.default_rng(5), 2)
    with torch.no_grad():
        ref = hf(pixel_values=_pixels(images, OPENAI_MEAN, OPENAI_STD)).image_embeds.numpy()
    out = get_encoder("open-clip", weights=standins["native"], normalize=False).forward(images)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("variant", "vision_cfg", "pool", "proj"),
    [
        ("biomedclip head", {}, "token", "linear"),
        ("avg pool, mlp head with bias", {"timm_pool": "avg", "timm_proj": "mlp", "timm_proj_bias": True}, "avg", "mlp"),
        ("trunk classifier as projection (fc_norm)", {"timm_pool": "avg", "timm_proj": ""}, "avg", ""),
    ],
)
def test_timm_tower_matches_explicit_computation(tmp_path: Path, variant: str, vision_cfg: dict, pool: str, proj: str) -> None:
    folder = write_openclip_standin(tmp_path / "m", kind="timm", seed=6, vision_cfg=vision_cfg)
    sd = _visual(folder)
    if proj == "":
        assert "trunk.fc_norm.weight" in sd and "trunk.norm.weight" not in sd and "trunk.head.bias" in sd
    enc = get_encoder("open-clip", weights=folder, normalize=False)
    images = _prepared(np.random.default_rng(7), 3)
    out = enc.forward(images)
    with torch.no_grad():
        ref = _timm_reference(sd, _pixels(images, OPENAI_MEAN, OPENAI_STD), heads=2, patch=16, pool=pool, proj=proj).numpy()
    assert out.shape == (3, 16)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_full_size_biomedclip_tower_has_the_published_size() -> None:
    """BiomedCLIP's config builds timm's vit_base_patch16_224 (86.6M with its 1000-class head) and a 768->512 head."""
    resolved = resolve_openclip_config(BIOMEDCLIP_CONFIG["model_cfg"], BIOMEDCLIP_CONFIG["preprocess_cfg"])
    a = resolved["arch"]
    assert (a["embed_dim"], a["depth"], a["num_heads"], a["patch_size"], a["img_size"]) == (768, 12, 12, [16, 16], [224, 224])
    assert resolved["dim"] == 512 and resolved["image_size"] == [224, 224]
    torch.manual_seed(0)
    tower = build_vision_tower(resolved).eval()
    d, p, tokens, hidden = 768, 16, (224 // 16) ** 2 + 1, 4 * 768
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    trunk = (3 * p * p * d + d) + d + tokens * d + 12 * block + 2 * d
    assert sum(v.numel() for v in tower.trunk.parameters()) == trunk
    assert trunk + (d * 1000 + 1000) == 86_567_656  # timm's published count for vit_base_patch16_224
    assert sum(v.numel() for v in tower.head.parameters()) == d * 512  # open_clip's head.proj, no bias
    names = set(tower.state_dict())
    assert {"trunk.blocks.11.attn.qkv.weight", "trunk.norm.bias", "head.proj.weight"} <= names
    assert "head.proj.bias" not in names and not any(n.startswith("trunk.head") for n in names)
    with torch.no_grad():
        out = tower(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512) and bool(torch.isfinite(out).all())


# -- preprocessing ---------------------------------------------------------------------------------
def test_prepare_is_open_clips_8bit_shortest_side_resize_and_center_crop() -> None:
    rng = np.random.default_rng(1)
    img8 = (rng.random((300, 200)) * 255).astype(np.uint8)
    ours = prepare_openclip(img8.astype(np.float32) / 255, size=(224, 224))
    # torchvision Resize(224) on a 200x300 (w x h) PIL image: 224 x int(224 * 300 / 200) = 224 x 336, then crop rows 56..280
    expected = np.asarray(Image.fromarray(img8).resize((224, 336), Image.Resampling.BICUBIC))[56:280, :]
    assert ours.shape == (224, 224) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)
    # the long side is truncated (int(353.5) = 353) and the crop offset rounds half to even (round(64.5) = 64)
    tall = (rng.random((101, 64)) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(tall).resize((224, 353), Image.Resampling.BICUBIC))[64:288, :]
    np.testing.assert_array_equal(prepare_openclip(tall.astype(np.float32) / 255, size=(224, 224)), expected)
    # a float image is rounded to 8 bits first
    np.testing.assert_array_equal(prepare_openclip(img8.astype(np.float32) / 255 + 0.001, size=(224, 224)),
                                  prepare_openclip(img8.astype(np.float32) / 255, size=(224, 224)))
    # an image already at the size is passed through
    same = (rng.random((64, 64)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(prepare_openclip(same.astype(np.float32) / 255, size=(64, 64)), same)
    with pytest.raises(UsageError, match="2-D"):
        prepare_openclip(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(UsageError, match="NaN"):
        prepare_openclip(np.full((8, 8), np.nan, np.float32))


def test_prepare_squash_longest_and_bilinear_modes() -> None:
    rng = np.random.default_rng(2)
    img8 = (rng.random((120, 60)) * 255).astype(np.uint8)
    x = img8.astype(np.float32) / 255
    squash = prepare_openclip(x, size=(64, 64), resize_mode="squash", interpolation="bilinear")
    np.testing.assert_array_equal(squash, np.asarray(Image.fromarray(img8).resize((64, 64), Image.Resampling.BILINEAR)))
    # longest: the long side to 64 (64 x 32), then padded left/right with fill_color to 64 x 64 (16 columns each side)
    longest = prepare_openclip(x, size=(64, 64), resize_mode="longest", fill_color=7)
    inner = np.asarray(Image.fromarray(img8).resize((32, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(longest[:, 16:48], inner)
    assert (longest[:, :16] == 7).all() and (longest[:, 48:] == 7).all()


def test_preprocess_cfg_is_read_and_recorded(tmp_path: Path) -> None:
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash",
           "size": 999, "unknown_key": 1}
    folder = write_openclip_standin(tmp_path / "m", kind="native", seed=2, preprocess_cfg=pre)
    enc = get_encoder("open-clip", weights=folder, normalize=False)
    p = enc.config.params
    assert (p["mean"], p["std"], p["interpolation"], p["resize_mode"]) == ([0.5] * 3, [0.25] * 3, "bilinear", "squash")
    assert p["image_size"] == [64, 64]  # open_clip sizes the transform by the tower, not preprocess_cfg.size
    images = _prepared(np.random.default_rng(8), 2)
    with torch.no_grad():
        ref = _native_reference(_visual(folder), _pixels(images, [0.5] * 3, [0.25] * 3), heads=2, patch=16).numpy()
    np.testing.assert_allclose(enc.forward(images), ref, atol=2e-5, rtol=1e-4)
    raw = np.random.default_rng(9).random((40, 90), dtype=np.float32)
    prep = pickle.loads(pickle.dumps(enc.preparer()))  # it runs in worker processes
    np.testing.assert_array_equal(prep(raw), prepare_openclip(raw, size=(64, 64), resize_mode="squash",
                                                                         interpolation="bilinear"))


# -- files, errors, options ------------------------------------------------------------------------
def test_bin_and_safetensors_and_file_paths_agree(tmp_path: Path) -> None:
    safe = write_openclip_standin(tmp_path / "safe", kind="timm", seed=4)
    pt = write_openclip_standin(tmp_path / "bin", kind="timm", seed=4, fmt="bin")
    assert (pt / BIN).is_file() and not (pt / SAFE).exists()
    img = [np.random.default_rng(5).random((70, 50), dtype=np.float32)]
    a = get_encoder("open-clip", weights=safe).encode(img)
    b = get_encoder("open-clip", weights=pt).encode(img)
    c = get_encoder("open-clip", weights=safe / SAFE).encode(img)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # with both files present, the safetensors file is the one read and hashed (open_clip prefers it)
    (safe / BIN).write_bytes((pt / BIN).read_bytes())
    enc = get_encoder("open-clip", weights=safe)
    assert enc.config.params["weights_file"] == SAFE
    assert enc.config.weights_sha256 == hashlib.sha256((safe / SAFE).read_bytes()).hexdigest()
    # a {"state_dict": ...} wrapper with DataParallel "module." names loads the same
    sd = torch.load(str(pt / BIN), weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, str(pt / BIN))
    np.testing.assert_array_equal(get_encoder("open-clip", weights=pt).encode(img), a)


def test_missing_unexpected_and_misshaped_keys_are_named(standins: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "bad"
    shutil.copytree(standins["timm"], repo)
    tensors = load_file(str(repo / SAFE))
    del tensors["visual.trunk.blocks.1.attn.qkv.weight"]
    tensors["visual.trunk.extra.weight"] = torch.zeros(2)
    tensors["visual.head.proj.weight"] = torch.zeros(16, 31)
    tensors["text.unrelated"] = torch.zeros(3)  # not the image tower: ignored
    save_file(tensors, str(repo / SAFE))
    with pytest.raises(UsageError) as err:
        get_encoder("open-clip", weights=repo)
    msg = str(err.value)
    assert str(repo / SAFE) in msg
    assert "1 missing key(s): visual.trunk.blocks.1.attn.qkv.weight" in msg
    assert "1 unexpected key(s): visual.trunk.extra.weight" in msg
    assert "visual.head.proj.weight (16, 31) != (16, 32)" in msg
    # a config whose tower is wider than the weights: the shape mismatches are named
    shutil.copy(standins["native"] / SAFE, repo / SAFE)
    cfg = json.loads((standins["native"] / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 48
    (repo / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"shape mismatch.*visual\.(class_embedding|conv1\.weight)"):
        get_encoder("open-clip", weights=repo)
    # only text tensors: no image tower at all
    save_file({"text.proj.0.weight": torch.zeros(2, 2)}, str(repo / SAFE))
    with pytest.raises(UsageError, match=r"no visual\.\* tensor"):
        get_encoder("open-clip", weights=repo)
    # not safetensors, and a pickle that weights_only refuses
    (repo / SAFE).write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        get_encoder("open-clip", weights=repo)
    (repo / SAFE).unlink()
    torch.save({"visual.proj": Image.new("L", (2, 2))}, str(repo / BIN))
    with pytest.raises(UsageError, match="weights_only=True"):
        get_encoder("open-clip", weights=repo)


def test_folder_layout_and_config_errors(standins: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    with pytest.raises(UsageError, match="does not exist"):
        get_encoder("open-clip", weights=tmp_path / "nowhere")
    with pytest.raises(UsageError, match="needs weights="):
        get_encoder("open-clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text("{}")
    with pytest.raises(UsageError, match="open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        get_encoder("open-clip", weights=empty)
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    shutil.copy(standins["timm"] / SAFE, nocfg / SAFE)
    with pytest.raises(UsageError, match="missing .*open_clip_config.json"):
        get_encoder("open-clip", weights=nocfg)
    (nocfg / "open_clip_config.json").write_text("not json")
    with pytest.raises(UsageError, match="cannot read open_clip config"):
        get_encoder("open-clip", weights=nocfg)

    def refused(model_cfg: dict, match: str) -> None:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        with pytest.raises(UsageError, match=match):
            read_openclip_config(path)

    vit = {"embed_dim": 8, "vision_cfg": {"width": 32, "layers": 1, "head_width": 16, "image_size": 32}}
    refused({**vit, "vision_cfg": {**vit["vision_cfg"], "layers": [3, 4, 6, 3]}}, "ModifiedResNet")
    refused({**vit, "vision_cfg": {**vit["vision_cfg"], "attentional_pool": True}}, "attentional_pool")
    refused({**vit, "vision_cfg": {**vit["vision_cfg"], "qk_norm": True}}, "qk_norm")
    refused({**vit, "vision_cfg": {**vit["vision_cfg"], "mystery": 1}}, "not supported by this loader: mystery")
    refused({**vit, "vision_cfg": {**vit["vision_cfg"], "head_width": 24}}, "not a multiple of head_width")
    refused({"vision_cfg": vit["vision_cfg"]}, "embed_dim must be a positive integer")
    timm = {"embed_dim": 8, "vision_cfg": {"timm_model_name": "convnext_tiny", "image_size": 224}}
    refused(timm, "timm's plain ViT family")
    refused({**timm, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "image_size": 256}}, "built for 224x224")
    refused({**timm, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "abs_attn"}}, "attention pooling")
    refused({**timm, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "", "timm_proj": "none"}},
            "every token")
    refused({**timm, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_kwargs": {"reg_tokens": 4}}},
            "reg_tokens")
    # a timm tag and an explicit img_size override resolve; the BiomedCLIP config itself resolves
    ok = resolve_openclip_config({"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_small_patch32_384.augreg_in21k",
                                                                  "image_size": 384}})
    assert (ok["arch"]["embed_dim"], ok["arch"]["depth"], ok["arch"]["num_heads"], ok["arch"]["patch_size"]) == (384, 12, 6, [32, 32])
    assert ok["arch"]["pool"] == "avg" and ok["arch"]["proj"] == "linear"  # CLIPVisionCfg defaults


def test_options_validated(standins: dict[str, Path]) -> None:
    w = standins["native"]
    check_torch_encoder_options("open-clip", w, "weights, device, batch, half, normalize")
    with pytest.raises(UsageError, match="normalize must be True or False"):
        get_encoder("open-clip", weights=w, normalize="yes")
    enc = get_encoder("open-clip", weights=w)
    with pytest.raises(UsageError, match=r"prepared images of shape \(64, 64\)"):
        enc.forward([np.zeros((32, 32), np.uint8)])
    assert enc.forward([]).shape == (0, 24)


def test_normalize_option_is_recorded_and_rebuilt(standins: dict[str, Path]) -> None:
    w = standins["timm"]
    images = _prepared(np.random.default_rng(11), 2)
    raw_enc = get_encoder("open-clip", weights=w, normalize=False)
    unit_enc = get_encoder("open-clip", weights=w)
    raw, unit = raw_enc.forward(images), unit_enc.forward(images)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert raw_enc.config.diff(unit_enc.config) == ["params.normalize", "params.output_norm"]
    rebuilt = encoder_from_config(raw_enc.config.to_json(), weights=w)
    assert rebuilt.config == raw_enc.config
    np.testing.assert_array_equal(rebuilt.forward(images), raw)


def test_ingest_dataset_by_name_with_encoder_options(standins: dict[str, Path], real_cxr: Path, tmp_path: Path) -> None:
    """The Python twin of `cxrstore ingest --encoder open-clip --weights DIR`."""
    from cxrstore.ingest import ingest_dataset

    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path\na,00000001_000.png\nb,16747_3_1.jpg\n")
    report = ingest_dataset(
        tmp_path / "s", dataset="csv", encoder="open-clip",
        encoder_options={"weights": str(standins["timm"]), "device": "cpu", "batch": 1},
        dataset_options={"manifest": manifest, "root": real_cxr}, workers=0,
    )
    assert report.added == 2 and report.failed == 0 and report.encoder == "open-clip"
    st = Store(tmp_path / "s")
    assert st.provenance("open-clip")["encoder"]["params"]["tower"] == "timm"
    np.testing.assert_allclose(np.linalg.norm(st.select(model="open-clip").vectors(), axis=1), 1.0, atol=1e-5)


def test_cli_ingest_with_weights_and_info_shows_provenance(standins: dict[str, Path], real_cxr: Path, tmp_path: Path) -> None:
    """`cxrstore ingest --encoder open-clip --weights DIR`, then `cxrstore info` shows the weights' sha256."""
    from cxrstore.encoders.weights import weights_sha256
    from tests.encoder_checks import ingest_then_info

    entry, _ = ingest_then_info(real_cxr, tmp_path, "open-clip", standins["native"])
    prov = entry["provenance"]
    assert prov["encoder"]["weights_sha256"] == weights_sha256(standins["native"] / SAFE)
    assert prov["encoder"]["params"]["tower"] == "native"
    assert prov["native_shape"] == [entry["dim"]] == [24]
