"""The ``open-clip`` encoder: the image tower of an open_clip model from a local folder.

Weights come from a local folder laid out like an open_clip model on the Hugging Face
hub (``hf-hub:`` models such as ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``;
nothing is downloaded)::

    <weights>/open_clip_config.json            {"model_cfg": {...}, "preprocess_cfg": {...}}
    <weights>/open_clip_model.safetensors      (preferred when present, as open_clip does)
    <weights>/open_clip_pytorch_model.bin      (otherwise; read with torch.load(weights_only=True))

``weights`` may name the folder or the weights file (the config is then looked up beside
it). Only the ``visual.*`` tensors are read (the text tower, ``logit_scale`` ... are
ignored; a leading ``module.`` and a ``{"state_dict": ...}`` wrapper are removed as
open_clip's ``load_state_dict`` does) and they are loaded strictly: a missing, unexpected
or mis-shaped tensor is an error naming the file and the keys.

open_clip and timm cannot be imported beside this project's torch, so the towers are
re-implemented in :mod:`cxrstore.encoders.vit` with the published state-dict names and
computation:

- ``model_cfg.vision_cfg`` without ``timm_model_name``: open_clip's own
  ``VisionTransformer`` (``width``, ``layers``, ``head_width``, ``patch_size``,
  ``image_size``, ``mlp_ratio``, ``ls_init_value``, ``no_ln_pre``, ``pool_type``,
  ``final_ln_after_pool``, ``pos_embed_type``, ``norm_kwargs.eps``; ``quick_gelu`` at the
  top of ``model_cfg``). A ResNet (``layers`` a list), an attentional pooler, the custom
  attention blocks (``qk_norm``, ``scaled_cosine_attn`` ...) and ``act_kwargs`` are refused
  with an error naming the entry.
- ``timm_model_name`` of timm's plain ViT family ``vit_{tiny,small,base,large,huge}_
  patch{P}_{S}`` (an optional ``.tag`` is ignored): the width, depth and heads come from
  timm's table for the family (tiny 192/12/3, small 384/12/6, base 768/12/12, large
  1024/24/16, huge 1280/32/16), patch and input size from the name, each overridable by
  ``timm_model_kwargs`` (``img_size``, ``patch_size``, ``embed_dim``, ``depth``,
  ``num_heads``, ``mlp_ratio``, ``qkv_bias``) as open_clip passes them to
  ``timm.create_model``; plus open_clip's ``TimmModel`` head (``timm_pool``,
  ``timm_proj`` ``linear``/``mlp``/``none``/``""``, ``timm_proj_bias``). BiomedCLIP is
  ``vit_base_patch16_224``, ``timm_pool ""`` (the trunk's class token), ``timm_proj
  linear``: 768 -> 512. open_clip builds the timm trunk at the size its name says, so a
  ``vision_cfg.image_size`` different from it is refused.

Pipeline
--------
``prepare`` (worker processes): open_clip's inference transform (``image_transform_v2``)
works on 8-bit RGB PIL images, so the canonical image (2-D, [0, 1]) is rounded to 8 bits
(``round(255 x)``) and transformed as one 8-bit channel with PIL, exactly as torchvision
does on a PIL image: ``resize_mode`` ``shortest`` (default: ``Resize(size)`` of the
shortest side, the long side truncated as torchvision computes it, then
``CenterCrop``), ``squash`` or ``longest`` (``ResizeKeepRatio`` then ``CenterCropOrPad``
with ``fill_color``), with the config's ``interpolation`` (``bicubic`` default,
``bilinear``). It is returned as uint8 (a quarter of the bytes of float32 between
processes): converting a grayscale PIL image to RGB replicates it, so doing that on the
device gives the same values.

``forward`` (main process): ``/ 255`` (``ToTensor``), replicated to three channels,
``(x - mean) / std`` with ``preprocess_cfg``'s mean and std (OpenAI's CLIP values by
default), the image tower, then L2 normalisation unless ``normalize=False``. open_clip
users almost always normalise image features (``encode_image(x, normalize=True)``, the
CLIP forward, zero-shot classification and retrieval all do), so that is the default;
the choice is recorded in the provenance. Output float32 ``(n, embed_dim)``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from cxrstore.encoders.base import (
    EncoderConfig,
    canonical_input,
    check_batch,
    check_options,
    forward_in_chunks,
    register_encoder,
)
from cxrstore.encoders.weights import (
    check_device,
    check_half,
    import_torch,
    resolve_torch_device,
    weights_sha256,
)
from cxrstore.errors import UsageError

__all__ = [
    "BIOMEDCLIP_CONFIG",
    "CONFIG_FILE",
    "STANDIN_MODEL_CFG",
    "WEIGHTS_FILES",
    "OpenClipEncoder",
    "build_vision_tower",
    "find_openclip_files",
    "prepare_openclip",
    "read_openclip_config",
    "resolve_openclip_config",
    "write_openclip_standin",
]

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
_EXTRA = "openclip"
_NAME = "open-clip"
CONFIG_FILE = "open_clip_config.json"
#: Weights file names, in the order open_clip's hub loader prefers them.
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: BiomedCLIP's ``open_clip_config.json`` (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224).
BIOMEDCLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
}

# open_clip's CLIPVisionCfg fields (default values of those that change the computation).
_NATIVE_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
    "ls_init_value": None, "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "pool_type": "tok",
}
_REFUSED_IF_SET = ("attentional_pool", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                   "scale_attn", "scale_fc", "act_kwargs")
_TRAINING_ONLY = ("patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                  "timm_model_pretrained", "timm_drop", "timm_drop_path")
_TIMM_KEYS = ("timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_model_kwargs")
_KNOWN_VISION_KEYS = frozenset(_NATIVE_DEFAULTS) | frozenset(_REFUSED_IF_SET) | frozenset(_TRAINING_ONLY) | frozenset(
    _TIMM_KEYS) | {"block_type", "norm_kwargs"}

#: timm's plain ViT family: (embed_dim, depth, num_heads) by size name.
TIMM_VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_TIMM_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")
_TIMM_KWARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


# -- files and config --------------------------------------------------------------------
def find_openclip_files(weights: str | Path) -> tuple[Path, Path]:
    """Locate ``(open_clip_config.json, weights file)`` from the user's ``weights`` path.

    Raises
    ------
    UsageError
        If the path does not exist or the folder lacks the config or a weights file
        (the message lists the names looked for).
    """
    p = Path(weights).expanduser()
    if not p.exists():
        raise UsageError(f"open-clip weights path {p} does not exist")
    if p.is_file():
        folder, pt = p.parent, p
    else:
        folder = p
        found = [folder / n for n in WEIGHTS_FILES if (folder / n).is_file()]
        if not found:
            raise UsageError(
                f"open-clip weights folder {p} holds no weights file: expected {' or '.join(WEIGHTS_FILES)} "
                f"beside {CONFIG_FILE} (the layout of an open_clip model on the Hugging Face hub)"
            )
        pt = found[0]
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise UsageError(f"open-clip weights {p}: missing {cfg} (the model's {CONFIG_FILE} must lie beside the weights)")
    return cfg, pt


def read_openclip_config(path: str | Path) -> dict[str, Any]:
    """Read an ``open_clip_config.json`` and resolve its image tower and preprocessing.

    See :func:`resolve_openclip_config` for the result.

    Raises
    ------
    UsageError
        If the file is not JSON, lacks ``model_cfg``, or asks for something not supported.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read open_clip config {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise UsageError(f"{path}: not an open_clip config (expected a JSON object with 'model_cfg' and 'preprocess_cfg')")
    return resolve_openclip_config(data["model_cfg"], data.get("preprocess_cfg") or {}, where=str(path))


def resolve_openclip_config(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None,
                            *, where: str = "open_clip config") -> dict[str, Any]:
    """Resolve the image tower and preprocessing of an open_clip ``model_cfg``.

    Parameters
    ----------
    model_cfg : mapping
        ``{"embed_dim": ..., "vision_cfg": {...}, "quick_gelu": ...}`` (other entries,
        such as ``text_cfg``, are ignored).
    preprocess_cfg : mapping, optional
        ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``; unknown
        entries are ignored as open_clip does. ``size`` is always the tower's
        ``image_size`` (open_clip overrides it the same way).
    where : str
        Named in error messages (the config file).

    Returns
    -------
    dict
        ``tower`` (``native`` or ``timm``), ``arch`` (constructor arguments of the tower),
        ``dim`` (output width), ``model_cfg`` (``embed_dim``, ``quick_gelu`` and the
        ``vision_cfg`` as given), ``image_size`` ([h, w]), ``mean``, ``std``,
        ``interpolation``, ``resize_mode``, ``fill_color``.

    Raises
    ------
    UsageError
        On a missing or malformed entry, or an option this loader does not implement.
    """
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, Mapping):
        raise UsageError(f"{where}: model_cfg.vision_cfg is missing or not an object")
    unknown = sorted(set(vision) - _KNOWN_VISION_KEYS)
    if unknown:
        raise UsageError(f"{where}: vision_cfg entries not supported by this loader: {', '.join(unknown)}")
    try:
        embed_dim = _positive_int(model_cfg.get("embed_dim"), "model_cfg.embed_dim", where)
        image_size = _size2(vision.get("image_size", 224), "vision_cfg.image_size", where)
        if vision.get("timm_model_name"):
            tower, arch = "timm", _timm_arch(vision, embed_dim, image_size, where)
            dim = arch["embed_dim"] if arch["proj"] == "none" else embed_dim
        else:
            tower, arch = "native", _native_arch(vision, embed_dim, image_size, bool(model_cfg.get("quick_gelu", False)), where)
            dim = embed_dim
        pre = _preprocess(preprocess_cfg or {}, where)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{where}: bad entry in model_cfg ({exc})") from None
    return {
        "tower": tower,
        "arch": arch,
        "dim": dim,
        "model_cfg": {"embed_dim": embed_dim, "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                      "vision_cfg": json.loads(json.dumps(dict(vision)))},
        "image_size": list(image_size),
        **pre,
    }


def _positive_int(v: Any, name: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UsageError(f"{where}: {name} must be a positive integer, not {v!r}")
    return v


def _size2(v: Any, name: str, where: str) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (_positive_int(v[0], name, where), _positive_int(v[1], name, where))
    v = _positive_int(v, name, where)
    return (v, v)


def _native_arch(vision: Mapping[str, Any], embed_dim: int, image_size: tuple[int, int], quick_gelu: bool,
                 where: str) -> dict[str, Any]:
    cfg = {**_NATIVE_DEFAULTS, **{k: v for k, v in vision.items() if k in _NATIVE_DEFAULTS}}
    if isinstance(cfg["layers"], (list, tuple)):
        raise UsageError(f"{where}: vision_cfg.layers is a list (open_clip's ModifiedResNet); only vision transformers are supported")
    for key in _REFUSED_IF_SET:
        if vision.get(key):
            raise UsageError(f"{where}: vision_cfg.{key} = {vision[key]!r} is not supported by this loader")
    if vision.get("block_type") not in (None, "default"):
        raise UsageError(f"{where}: vision_cfg.block_type {vision['block_type']!r} is not supported (only the default block)")
    norm_kwargs = dict(vision.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", 1e-5))
    if norm_kwargs:
        raise UsageError(f"{where}: vision_cfg.norm_kwargs {sorted(norm_kwargs)} not supported (only eps)")
    if cfg["pool_type"] not in ("tok", "avg"):
        raise UsageError(f"{where}: vision_cfg.pool_type {cfg['pool_type']!r} not supported (tok or avg)")
    if cfg["pos_embed_type"] not in ("learnable", "sin_cos_2d"):
        raise UsageError(f"{where}: vision_cfg.pos_embed_type {cfg['pos_embed_type']!r} not supported")
    width = _positive_int(cfg["width"], "vision_cfg.width", where)
    head_width = _positive_int(cfg["head_width"], "vision_cfg.head_width", where)
    if width % head_width:
        raise UsageError(f"{where}: vision_cfg.width {width} is not a multiple of head_width {head_width}")
    return {
        "image_size": list(image_size),
        "patch_size": list(_size2(cfg["patch_size"], "vision_cfg.patch_size", where)),
        "width": width,
        "layers": _positive_int(cfg["layers"], "vision_cfg.layers", where),
        "heads": width // head_width,
        "mlp_ratio": float(cfg["mlp_ratio"]),
        "output_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "layer_scale": cfg["ls_init_value"] is not None,
        "no_ln_pre": bool(cfg["no_ln_pre"]),
        "pool_type": cfg["pool_type"],
        "final_ln_after_pool": bool(cfg["final_ln_after_pool"]),
        "eps": eps,
    }


def _timm_arch(vision: Mapping[str, Any], embed_dim: int, image_size: tuple[int, int], where: str) -> dict[str, Any]:
    name = str(vision["timm_model_name"])
    base = name.split(".", 1)[0]  # "vit_base_patch16_224.augreg_in21k" -> architecture name
    m = _TIMM_NAME.match(base)
    if not m:
        raise UsageError(
            f"{where}: timm_model_name {name!r} is not supported; this loader implements timm's plain ViT family "
            "vit_{tiny,small,base,large,huge}_patch<P>_<S> (e.g. BiomedCLIP's vit_base_patch16_224)"
        )
    width, depth, heads = TIMM_VIT_SIZES[m.group(1)]
    args: dict[str, Any] = {"img_size": int(m.group(3)), "patch_size": int(m.group(2)), "embed_dim": width,
                            "depth": depth, "num_heads": heads, "mlp_ratio": 4.0, "qkv_bias": True}
    kwargs = dict(vision.get("timm_model_kwargs") or {})
    bad = sorted(set(kwargs) - set(_TIMM_KWARGS))
    if bad:
        raise UsageError(f"{where}: vision_cfg.timm_model_kwargs {', '.join(bad)} not supported (only {', '.join(_TIMM_KWARGS)})")
    args.update(kwargs)
    img = _size2(args["img_size"], "timm_model_kwargs.img_size", where)
    if img != image_size:
        raise UsageError(
            f"{where}: the timm trunk {name!r} is built for {img[0]}x{img[1]} images but vision_cfg.image_size is "
            f"{image_size[0]}x{image_size[1]}; open_clip does not resize a timm trunk, so these must agree"
        )
    pool = str(vision.get("timm_pool", "avg") or "")
    proj = vision.get("timm_proj", "linear")
    proj = "" if proj is None else str(proj)
    if pool in ("abs_attn", "rot_attn"):
        raise UsageError(f"{where}: timm_pool {pool!r} (attention pooling) is not supported")
    if pool not in ("", "token", "avg", "max", "avgmax"):
        raise UsageError(f"{where}: timm_pool {pool!r} not supported ('', token, avg, max, avgmax)")
    if proj not in ("linear", "mlp", "none", ""):
        raise UsageError(f"{where}: timm_proj {proj!r} not supported (linear, mlp, none or '')")
    if not pool and proj in ("", "none"):
        raise UsageError(f"{where}: timm_pool '' with timm_proj {proj!r} outputs every token, not one vector; not supported")
    e = _positive_int(args["embed_dim"], "embed_dim", where)
    h = _positive_int(args["num_heads"], "num_heads", where)
    if e % h:
        raise UsageError(f"{where}: timm embed_dim {e} is not a multiple of num_heads {h}")
    return {
        "timm_model_name": name,
        "img_size": list(img),
        "patch_size": list(_size2(args["patch_size"], "patch_size", where)),
        "embed_dim": e,
        "depth": _positive_int(args["depth"], "depth", where),
        "num_heads": h,
        "mlp_ratio": float(args["mlp_ratio"]),
        "qkv_bias": bool(args["qkv_bias"]),
        "output_dim": embed_dim,
        "pool": pool,
        "proj": proj or "",
        "proj_bias": bool(vision.get("timm_proj_bias", False)),
        "eps": 1e-6,
    }


def _preprocess(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    def three(v: Any, name: str) -> list[float]:
        vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) != 3:
            raise UsageError(f"{where}: preprocess_cfg.{name} must have 3 values")
        return vals

    mode = cfg.get("mode", "RGB") or "RGB"
    if mode != "RGB":
        raise UsageError(f"{where}: preprocess_cfg.mode {mode!r} not supported (RGB)")
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation == "random":  # ignored at inference by open_clip: bicubic
        interpolation = "bicubic"
    if interpolation not in ("bicubic", "bilinear"):
        raise UsageError(f"{where}: preprocess_cfg.interpolation {interpolation!r} not supported (bicubic, bilinear)")
    resize_mode = cfg.get("resize_mode") or "shortest"
    if resize_mode not in ("shortest", "longest", "squash"):
        raise UsageError(f"{where}: preprocess_cfg.resize_mode {resize_mode!r} not supported (shortest, longest, squash)")
    fill = cfg.get("fill_color", 0)
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise UsageError(f"{where}: preprocess_cfg.fill_color must be an integer 0..255, not {fill!r}")
    return {
        "mean": three(cfg.get("mean") or OPENAI_MEAN, "mean"),
        "std": three(cfg.get("std") or OPENAI_STD, "std"),
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill_color": fill,
    }


def build_vision_tower(resolved: Mapping[str, Any]) -> Any:
    """The image tower (a ``torch.nn.Module``, random weights) of a resolved config.

    Parameters
    ----------
    resolved : mapping
        The result of :func:`resolve_openclip_config` (or :func:`read_openclip_config`).
    """
    import_torch(_EXTRA, _NAME)
    from cxrstore.encoders.vit import OpenClipVisionTransformer, TimmVisionTransformer

    a = dict(resolved["arch"])
    if resolved["tower"] == "native":
        return OpenClipVisionTransformer(**a)
    a.pop("timm_model_name")
    return TimmVisionTransformer(**{**a, "img_size": tuple(a["img_size"]), "patch_size": tuple(a["patch_size"])})


# -- worker side -------------------------------------------------------------------------
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _shortest_edge(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)`` output (h, w): short side ``size``, long side truncated."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _keep_ratio(h: int, w: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """open_clip's ``ResizeKeepRatio`` output (h, w) (no random scale or aspect)."""
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return (round(h * 1.0 / ratio), round(w * 1.0 / ratio))


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's ``center_crop`` (open_clip's ``center_crop_or_pad``) on a PIL image."""
    ch, cw = size
    w, h = img.size
    if cw > w or ch > h:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        padded = Image.new(img.mode, (w + max(cw - w, 0), h + max(ch - h, 0)), fill)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if (w, h) == (cw, ch):
            return img
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def _resize(img: Image.Image, hw: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    if (img.size[1], img.size[0]) == hw:  # torchvision returns the image unchanged
        return img
    return img.resize((hw[1], hw[0]), resample)


def prepare_openclip(
    image: np.ndarray,
    *,
    size: tuple[int, int] = (224, 224),
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> np.ndarray:
    """open_clip's inference transform of one canonical image, as one 8-bit channel.

    The image is rounded to 8 bits (``round(255 x)``) and transformed with PIL exactly
    as open_clip's ``image_transform_v2`` treats an 8-bit image (see the module docs).

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1].
    size : (int, int)
        Output height and width (the tower's ``image_size``).
    resize_mode : {"shortest", "longest", "squash"}
        ``preprocess_cfg.resize_mode``.
    interpolation : {"bicubic", "bilinear"}
        ``preprocess_cfg.interpolation``.
    fill_color : int
        Padding value of ``longest``.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``size``.

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity, or on an unknown mode.
    """
    x = canonical_input(image, "open-clip")
    if resize_mode not in ("shortest", "longest", "squash") or interpolation not in _RESAMPLE:
        raise UsageError(f"open-clip: unknown resize_mode {resize_mode!r} or interpolation {interpolation!r}")
    x8 = np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    img = Image.fromarray(x8)
    h, w = x8.shape
    size = (int(size[0]), int(size[1]))
    resample = _RESAMPLE[interpolation]
    if resize_mode == "squash":
        img = _resize(img, size, resample)
    elif resize_mode == "longest":
        img = _center_crop_or_pad(_resize(img, _keep_ratio(h, w, size, 1.0), resample), size, fill_color)
    else:
        if size[0] == size[1]:
            img = _resize(img, _shortest_edge(h, w, size[0]), resample)
        else:  # open_clip's ResizeKeepRatio(image_size): bicubic whatever the config says
            img = _resize(img, _keep_ratio(h, w, size, 0.0), Image.Resampling.BICUBIC)
        img = _center_crop_or_pad(img, size, 0)
    return np.asarray(img, dtype=np.uint8)


# -- weights -------------------------------------------------------------------------------
def _read_visual_tensors(path: Path) -> dict[str, Any]:
    """The ``visual.*`` tensors of an open_clip checkpoint, prefix removed."""
    torch = import_torch(_EXTRA, _NAME)
    out: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise UsageError(
                f"encoder {_NAME!r} needs the safetensors package; install the extra: pip install 'cxrstore[{_EXTRA}]'"
            ) from None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    name = key[7:] if key.startswith("module.") else key
                    if name.startswith("visual."):
                        out[name[7:]] = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"cannot read open-clip weights {path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(
                f"cannot read open-clip weights {path}: not a torch checkpoint loadable with weights_only=True ({exc})"
            ) from None
        if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
            ckpt = ckpt["state_dict"]
        if not isinstance(ckpt, Mapping):
            raise UsageError(f"open-clip weights {path} hold a {type(ckpt).__name__}, not a state dict")
        for key, value in ckpt.items():
            name = key[7:] if key.startswith("module.") else key
            if name.startswith("visual.") and isinstance(value, torch.Tensor):
                out[name[7:]] = value
    if not out:
        raise UsageError(f"open-clip weights {path} hold no visual.* tensor (is it an open_clip checkpoint?)")
    return out


def _check_keys(expected: Mapping[str, Any], tensors: Mapping[str, Any], path: Path, cfg: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): " + ", ".join(f"visual.{k}" for k in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(f"visual.{k}" for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): " + ", ".join(
            f"visual.{k} {tuple(tensors[k].shape)} != {tuple(expected[k])}" for k in wrong[:5]))
    raise UsageError(f"open-clip weights {path} do not match the image tower of {cfg}: " + "; ".join(parts))


# -- the encoder -------------------------------------------------------------------------
@register_encoder
class OpenClipEncoder:
    """Image embeddings of an open_clip model (BiomedCLIP: 512-d).

    Parameters
    ----------
    weights : str or Path
        Local open_clip model folder (``open_clip_config.json`` and
        ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), or the
        weights file itself.
    device : {"cpu", "cuda"}, default "cpu"
        Where the model runs; ``cuda`` (or ``cuda:N``) is refused when torch sees no GPU.
    batch : int, optional
        Most images per model call; a larger ``forward`` batch is split. Default: no split.
    half : bool, default False
        Run the tower in float16 (``cuda`` only; LayerNorms in float32 as open_clip's
        ``fp16`` precision does). Recorded in the provenance.
    normalize : bool, default True
        L2-normalise the image features (as ``encode_image(x, normalize=True)``).

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="open-clip"``, the weights file's sha256, and parameters: tower kind,
        file names, ``model_cfg`` (embed_dim, quick_gelu, vision_cfg), resolved
        architecture, image size, resize mode, interpolation, mean/std, normalisation,
        precision.
    dim : int
        ``embed_dim`` (512 for BiomedCLIP).
    native_shape : tuple of int
        ``(dim,)``.

    Raises
    ------
    UsageError
        On an unknown or bad option, torch missing (names the ``openclip`` extra), a bad
        folder layout or config, or weights that do not match the configured tower.
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch: int | None = None,
        half: bool = False,
        normalize: bool = True,
        **unknown: Any,
    ) -> None:
        check_options("open-clip", unknown, "weights, device, batch, half, normalize")
        if weights is None:
            raise UsageError(
                f"encoder {_NAME!r} needs weights=: a local open_clip model folder ({CONFIG_FILE} and "
                f"{' or '.join(WEIGHTS_FILES)}), e.g. a copy of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
            )
        self.device_name = check_device(device)
        self.half = check_half(half, self.device_name)
        check_batch("open-clip", batch)
        if not isinstance(normalize, bool):
            raise UsageError(f"{_NAME} option normalize must be True or False, not {normalize!r}")
        self.batch = batch
        self.normalize = normalize
        self._device: Any = resolve_torch_device(self.device_name, extra=_EXTRA, encoder=self.name)
        self.config_path, self.weights_path = find_openclip_files(weights)
        self.spec = read_openclip_config(self.config_path)
        self.dim: int = self.spec["dim"]
        self.native_shape: tuple[int, ...] = (self.dim,)
        self.input_size = (self.spec["image_size"][0], self.spec["image_size"][1])
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params={
                "tower": self.spec["tower"],
                "config_file": self.config_path.name,
                "weights_file": self.weights_path.name,
                "model_cfg": self.spec["model_cfg"],
                "architecture": self.spec["arch"],
                "image_size": list(self.input_size),
                "input_quantization": "uint8",
                "resize_mode": self.spec["resize_mode"],
                "interpolation": self.spec["interpolation"],
                "fill_color": self.spec["fill_color"],
                "grayscale_to_rgb": "replicate",
                "mean": self.spec["mean"],
                "std": self.spec["std"],
                "normalize": self.normalize,
                "output_norm": "l2" if self.normalize else "none",
                "precision": "float16" if self.half else "float32",
            },
            weights_sha256=weights_sha256(self.weights_path),
        )
        self._model: Any = None
        self._load()

    def __repr__(self) -> str:
        return (f"OpenClipEncoder(weights={str(self.weights_path)!r}, tower={self.spec['tower']!r}, "
                f"device={self.device_name!r}, half={self.half}, dim={self.dim})")

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        torch = import_torch(_EXTRA, self.name)
        model = build_vision_tower(self.spec)
        tensors = _read_visual_tensors(self.weights_path)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        _check_keys(expected, tensors, self.weights_path, self.config_path)
        model.load_state_dict(tensors, strict=True)
        model.eval()
        self._model = model.to(device=self._device, dtype=torch.float16 if self.half else torch.float32)
        self._mean = torch.tensor(self.spec["mean"], dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.spec["std"], dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("loaded open_clip %s image tower (%d parameters) from %s on %s",
                    self.spec["tower"], n_params, self.weights_path, self._device)

    # -- the contract ------------------------------------------------------------------
    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable: open_clip's resize and crop (one 8-bit channel)."""
        return functools.partial(
            prepare_openclip, size=self.input_size, resize_mode=self.spec["resize_mode"],
            interpolation=self.spec["interpolation"], fill_color=self.spec["fill_color"],
        )

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared images; returns ``(len(batch), dim)`` float32."""
        return forward_in_chunks(self._forward, batch, self.batch, self.dim)

    def _forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        torch = import_torch(_EXTRA, self.name)
        x = np.stack([np.asarray(b) for b in batch])
        if x.shape[1:] != self.input_size:
            raise UsageError(f"{_NAME} forward expects prepared images of shape {self.input_size}, got batch shape {x.shape}")
        t = torch.from_numpy(x)
        if self._device.type == "cuda":
            t = t.pin_memory().to(self._device, non_blocking=True)
        t = t.float().unsqueeze(1).expand(-1, 3, -1, -1) / 255.0  # ToTensor of the replicated RGB image
        t = ((t - self._mean) / self._std).to(torch.float16 if self.half else torch.float32)
        with torch.inference_mode():
            z = self._model(t).float()
            if self.normalize:
                z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])


# -- stand-in weights (tests, benchmarks) ------------------------------------------------
#: Small model configs in the real format for tests: a BiomedCLIP-like timm tower and a ViT-B-16-like native one.
STANDIN_MODEL_CFG: dict[str, dict[str, Any]] = {
    "timm": {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
            "timm_model_kwargs": {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2},
        },
        "text_cfg": dict(BIOMEDCLIP_CONFIG["model_cfg"]["text_cfg"]),
    },
    "native": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 77, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    },
}


def write_openclip_standin(
    folder: str | Path,
    *,
    kind: str = "timm",
    seed: int = 0,
    fmt: str = "safetensors",
    vision_cfg: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    quick_gelu: bool | None = None,
    preprocess_cfg: Mapping[str, Any] | None = None,
    text_tower: bool = True,
) -> Path:
    """Write a small open_clip model in the hub folder format (random weights).

    ``<folder>/open_clip_config.json`` (``model_cfg`` of :data:`STANDIN_MODEL_CFG`
    ``[kind]`` with ``vision_cfg`` entries, ``embed_dim`` and ``quick_gelu`` overridden
    when given; ``preprocess_cfg``, OpenAI's mean/std by default) and the weights under
    the published names (``visual.*``, plus a few text-tower tensors and ``logit_scale``
    as the real file has them, when ``text_tower``): ``open_clip_model.safetensors``
    (``fmt="safetensors"``) or ``open_clip_pytorch_model.bin`` (``fmt="bin"``,
    ``torch.save`` of the state dict). For tests and benchmarks; needs torch.

    Returns
    -------
    Path
        ``folder``.
    """
    if kind not in STANDIN_MODEL_CFG:
        raise UsageError(f"stand-in kind must be one of {', '.join(STANDIN_MODEL_CFG)}, not {kind!r}")
    if fmt not in ("safetensors", "bin"):
        raise UsageError(f"stand-in fmt must be 'safetensors' or 'bin', not {fmt!r}")
    torch = import_torch(_EXTRA, _NAME)
    model_cfg = json.loads(json.dumps(STANDIN_MODEL_CFG[kind]))
    model_cfg["vision_cfg"].update(vision_cfg or {})
    if embed_dim is not None:
        model_cfg["embed_dim"] = embed_dim
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    pre = dict(preprocess_cfg) if preprocess_cfg is not None else {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / CONFIG_FILE, "w", encoding="utf-8") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": pre}, fh, indent=2)
    resolved = resolve_openclip_config(model_cfg, pre, where=str(folder / CONFIG_FILE))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for k, v in build_vision_tower(resolved).state_dict().items():
        is_norm = re.search(r"(^|\.)(ln_\w+|norm\d?|fc_norm)\.weight$", k) is not None
        t = (1.0 + 0.1 * torch.randn(v.shape, generator=gen)) if is_norm else 0.05 * torch.randn(v.shape, generator=gen)
        tensors[f"visual.{k}"] = t.contiguous()
    if text_tower:
        if kind == "timm":  # an HF text tower (CustomTextCLIP): text.*
            tensors["text.transformer.embeddings.word_embeddings.weight"] = torch.randn((64, 16), generator=gen)
            tensors["text.proj.0.weight"] = torch.randn((16, 16), generator=gen)
        else:  # CLIP's own text tower: top-level names
            tensors["token_embedding.weight"] = torch.randn((64, 16), generator=gen)
            tensors["positional_embedding"] = torch.randn((77, 16), generator=gen)
            tensors["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn((48, 16), generator=gen)
            tensors["ln_final.weight"] = torch.ones(16)
            tensors["text_projection"] = torch.randn((16, resolved["model_cfg"]["embed_dim"]), generator=gen)
        tensors["logit_scale"] = torch.tensor(4.6052)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(folder / WEIGHTS_FILES[0]), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(folder / WEIGHTS_FILES[1]))
    return folder
