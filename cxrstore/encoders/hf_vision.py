"""The ``hf-vision`` encoder: a Hugging Face ``transformers`` vision backbone (e.g. RAD-DINO).

Weights come from a local folder in the layout ``save_pretrained`` writes (a copy of a
Hugging Face model repository such as ``microsoft/rad-dino``; nothing is downloaded)::

    <weights>/config.json                 model_type, architectures, hidden_size ...
    <weights>/preprocessor_config.json    the image processor: resize, crop, mean, std ...
    <weights>/model.safetensors           or model.safetensors.index.json + its shards,
                                          or pytorch_model.bin (read with weights_only=True)

The model is built by ``transformers.AutoModel.from_pretrained(folder,
local_files_only=True, trust_remote_code=False)``: a model whose ``model_type`` is not
built into ``transformers`` (one that needs ``trust_remote_code``) is refused, as is a
model that does not take ``pixel_values``. Every tensor must match: a missing,
unexpected or mis-shaped tensor is an error naming the folder and the keys (except
missing ``pooler.*`` tensors when the pooler is not used: ``pooling`` ``cls`` or ``mean``).

RAD-DINO (``microsoft/rad-dino``, MIT) is a ``Dinov2Model`` (ViT-B/14, 12 layers,
``hidden_size`` 768, ``image_size`` 518) whose ``preprocessor_config.json`` names a
``BitImageProcessor``: ``size = {"shortest_edge": 518}``, ``resample = 3`` (bicubic),
``crop_size = 518 x 518``, ``rescale_factor = 1/255`` and a grey mean / std (about
0.5307 / 0.2583, the same value for the three channels; quoted from memory, not
verified in source: the values are always read from the file, never hard-coded).

Pipeline
--------
The normalisation is **read from** ``preprocessor_config.json`` (keys ``do_resize``,
``size``, ``resample``, ``do_center_crop``, ``crop_size``, ``do_rescale``,
``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``; a key that is
absent or ``null`` takes the processor class's default, as in ``transformers``). It
mirrors the PIL ("slow") image processor of ``transformers``
(``BitImageProcessorPil`` in transformers 5, ``BitImageProcessor`` in 4.x), supported
for ``BitImageProcessor``, ``CLIPImageProcessor`` and ``ViTImageProcessor`` (and their
``Fast`` / ``Pil`` spellings), which all run the same generic steps:

``prepare`` (worker processes; PIL and numpy only, no ``transformers``): the canonical
image (2-D, [0, 1]) is rounded to 8 bits (``round(255 x)``: an 8-bit source image comes
back exactly, as the processor would get it from PIL), resized with PIL and the
configured filter (``shortest_edge``: the short side becomes ``S`` and the long side
``int(S * long / short)``, aspect kept; ``height``/``width``: squashed), then
centre-cropped (zero-padded where the image is smaller than the crop, as
``transformers`` does). A grayscale image replicated to RGB (``do_convert_rgb``) goes
through PIL's per-band resampling identically in every band, so one uint8 channel is
returned: a third of the bytes between processes.

``forward`` (main process): replicate to the model's ``num_channels``, ``x *
rescale_factor`` (computed in float64 then rounded to float32, as ``transformers``
does), ``(x - mean) / std`` per channel in float32, then the model, then the pooling:

``cls`` (default)
    ``last_hidden_state[:, 0]``: the CLS token (what RAD-DINO's card calls the image
    embedding; for a ``Dinov2Model`` it equals ``pooler_output``).
``pooler``
    ``pooler_output`` (e.g. ViT's dense + tanh head); refused when the model has none.
``mean``
    the mean of the patch tokens (after the CLS token and any register / distillation
    tokens).

Output float32 ``(n, hidden_size)``, **not** L2-normalised (the backbone's raw
features; normalise downstream if you need unit vectors). The tests check the pixels
against ``transformers``' own PIL image processor (exactly equal) and the vectors
against ``processor`` + ``AutoModel`` run directly (``atol 1e-5``, float32 on the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
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
    "POOLINGS",
    "HfVisionEncoder",
    "ImageProcessing",
    "find_hf_files",
    "prepare_hf",
    "read_image_processing",
    "write_hf_standin",
]

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
_EXTRA = "hf"
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
POOLINGS: tuple[str, ...] = ("cls", "pooler", "mean")

#: Weight layouts, in the order ``transformers`` prefers them (safetensors first).
_WEIGHT_LAYOUTS: tuple[tuple[str, str | None], ...] = (
    ("model.safetensors", None),
    ("model.safetensors.index.json", "safetensors"),
    ("pytorch_model.bin", None),
    ("pytorch_model.bin.index.json", "bin"),
)

#: PIL filters by the integer ``resample`` of a preprocessor config.
RESAMPLE_NAMES: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_SHORTEST_EDGE_CROP = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "default_to_square": False,
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "do_convert_rgb": True,
}
#: Class defaults of the supported (generic resize / crop / rescale / normalise) processors,
#: as in transformers' ``BitImageProcessorPil``, ``CLIPImageProcessorPil``, ``ViTImageProcessorPil``.
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "BitImageProcessor": dict(_SHORTEST_EDGE_CROP),
    "CLIPImageProcessor": dict(_SHORTEST_EDGE_CROP),
    "ViTImageProcessor": {
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "default_to_square": True,
        "do_center_crop": False, "crop_size": None, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": None,
    },
}
#: Keys that would ask for a step this mirror does not implement, with the value that means "off".
_UNSUPPORTED_KEYS: dict[str, Any] = {"do_pad": False, "crop_pct": None, "do_reduce_labels": False}

#: Model types whose ``last_hidden_state`` starts with a CLS token, and how many tokens
#: precede the patch tokens (CLS, DeiT's distillation token; ``dinov2_with_registers`` adds
#: ``config.num_register_tokens``). Other model types support only ``pooling="pooler"``.
_PREFIX_TOKENS: dict[str, int] = {
    "dinov2": 1, "dinov2_with_registers": 1, "vit": 1, "vit_msn": 1, "deit": 2, "beit": 1, "data2vec-vision": 1,
}


# -- files ------------------------------------------------------------------------------
def find_hf_files(weights: str | Path) -> tuple[Path, Path, list[Path]]:
    """Locate ``(config.json, preprocessor_config.json, weight files)`` in a model folder.

    Parameters
    ----------
    weights : str or Path
        A folder written by ``save_pretrained`` (e.g. a copy of ``microsoft/rad-dino``).

    Returns
    -------
    tuple
        The two JSON files and the weight files ``transformers`` will read: one
        ``model.safetensors`` or ``pytorch_model.bin``, or a shard index followed by its
        shards (in sorted order).

    Raises
    ------
    UsageError
        If the folder does not exist, is a file, or lacks a file (all missing files are
        named), or a shard index is unreadable or names a shard that is absent.
    """
    p = Path(weights).expanduser()
    if not p.exists():
        raise UsageError(f"hf-vision weights folder {p} does not exist")
    if not p.is_dir():
        raise UsageError(
            f"hf-vision weights must be a model folder (config.json, {PROCESSOR_FILE}, model.safetensors); "
            f"{p} is a file: pass its folder"
        )
    cfg, proc = p / CONFIG_FILE, p / PROCESSOR_FILE
    missing = [str(x) for x in (cfg, proc) if not x.is_file()]
    files: list[Path] = []
    for name, kind in _WEIGHT_LAYOUTS:
        if (p / name).is_file():
            files = [p / name] + (_shards(p / name) if kind else [])
            break
    else:
        missing.append(f"{p / 'model.safetensors'} (or model.safetensors.index.json, pytorch_model.bin)")
    if missing:
        raise UsageError(
            f"hf-vision weights folder {p} is not a Hugging Face model folder: missing {', '.join(missing)}; "
            "copy the model repository (e.g. microsoft/rad-dino) there, as save_pretrained writes it"
        )
    return cfg, proc, files


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = _read_json(index)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"{index}: not a shard index (no 'weight_map' of tensor name to file)") from None
    absent = [n for n in names if not (index.parent / n).is_file()]
    if absent:
        raise UsageError(f"{index} names shard(s) that are missing from {index.parent}: {', '.join(absent)}")
    return [index.parent / n for n in names]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def files_sha256(files: Sequence[Path]) -> str:
    """sha256 identifying the weight files: the file's own digest when there is one file.

    Several files (a shard index and its shards): the sha256 of the lines
    ``<file name>\\t<sha256 of the file>\\n`` in the given order, as
    :func:`cxrstore.encoders.weights.weights_sha256` does for a folder.
    """
    if len(files) == 1:
        return weights_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\t{weights_sha256(f)}\n".encode())
    return h.hexdigest()


# -- the image processor -----------------------------------------------------------------
class ImageProcessing:
    """The steps of a ``preprocessor_config.json``, resolved against its class defaults.

    Attributes
    ----------
    processor_type : str
        ``image_processor_type`` without a ``Fast`` / ``Pil`` suffix.
    do_resize, do_center_crop, do_rescale, do_normalize : bool
    size : dict
        ``{"shortest_edge": S}`` or ``{"height": H, "width": W}``.
    resample : int
        PIL filter code (see :data:`RESAMPLE_NAMES`).
    crop_size : dict or None
        ``{"height": H, "width": W}``.
    rescale_factor : float
    image_mean, image_std : list of float
    do_convert_rgb : bool or None
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        raw_type = data.get("image_processor_type") or data.get("feature_extractor_type")
        if not isinstance(raw_type, str):
            raise UsageError(f"{path}: no image_processor_type; expected one of {', '.join(PROCESSOR_DEFAULTS)}")
        base = raw_type.removesuffix("Fast").removesuffix("Pil").replace("FeatureExtractor", "ImageProcessor")
        if base not in PROCESSOR_DEFAULTS:
            raise UsageError(
                f"{path}: image_processor_type {raw_type!r} is not supported by hf-vision; supported: "
                f"{', '.join(PROCESSOR_DEFAULTS)} (the generic resize / centre crop / rescale / normalise processors)"
            )
        self.processor_type = base
        d = {k: (data[k] if data.get(k) is not None else v) for k, v in PROCESSOR_DEFAULTS[base].items()}
        for key, off in _UNSUPPORTED_KEYS.items():
            if data.get(key) not in (None, off):
                raise UsageError(f"{path}: {key}={data[key]!r} is not supported by hf-vision (only {key}={off!r})")
        try:
            self.do_resize = bool(d["do_resize"])
            self.size = _size_dict(d["size"], bool(d["default_to_square"]), path, "size")
            self.resample = int(d["resample"])
            self.do_center_crop = bool(d["do_center_crop"])
            self.crop_size = _size_dict(d["crop_size"], True, path, "crop_size") if self.do_center_crop else None
            self.do_rescale = bool(d["do_rescale"])
            self.rescale_factor = float(d["rescale_factor"])
            self.do_normalize = bool(d["do_normalize"])
            self.image_mean = _floats(d["image_mean"], path, "image_mean")
            self.image_std = _floats(d["image_std"], path, "image_std")
            self.do_convert_rgb = None if d["do_convert_rgb"] is None else bool(d["do_convert_rgb"])
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"{path}: bad entry ({exc})") from None
        if self.resample not in RESAMPLE_NAMES:
            raise UsageError(f"{path}: resample={self.resample} is not a PIL filter (0-5)")
        if self.crop_size is not None and set(self.crop_size) != {"height", "width"}:
            raise UsageError(f"{path}: crop_size must have height and width, got {self.crop_size}")
        if not (self.do_center_crop or (self.do_resize and "height" in self.size)):
            raise UsageError(
                f"{path}: this processor gives inputs whose size depends on the image (no centre crop and no "
                "height/width resize); hf-vision needs a fixed input size"
            )
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise UsageError(f"{path}: image_std must not contain 0")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every prepared image."""
        if self.crop_size is not None:
            return self.crop_size["height"], self.crop_size["width"]
        return self.size["height"], self.size["width"]

    def params(self) -> dict[str, Any]:
        """The processing as recorded in the encoder's configuration."""
        return {
            "image_processor_type": self.processor_type,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": RESAMPLE_NAMES[self.resample],
            "do_center_crop": self.do_center_crop,
            "crop_size": dict(self.crop_size) if self.crop_size else None,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def _size_dict(value: Any, default_to_square: bool, path: Path, key: str) -> dict[str, int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"height": int(value), "width": int(value)} if default_to_square else {"shortest_edge": int(value)}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": int(value[0]), "width": int(value[1])}
    if not isinstance(value, dict):
        raise UsageError(f"{path}: {key} must be a dict (shortest_edge, or height and width), got {value!r}")
    keys = {k for k, v in value.items() if v is not None}
    if keys not in ({"shortest_edge"}, {"height", "width"}):
        raise UsageError(
            f"{path}: {key}={value} is not supported by hf-vision (only {{'shortest_edge': S}} or "
            "{'height': H, 'width': W})"
        )
    out = {k: int(value[k]) for k in sorted(keys)}
    if any(v < 1 for v in out.values()):
        raise UsageError(f"{path}: {key} values must be positive, got {value}")
    return out


def _floats(value: Any, path: Path, key: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    if not isinstance(value, (list, tuple)) or not value:
        raise UsageError(f"{path}: {key} must be a number or a list of numbers, got {value!r}")
    return [float(v) for v in value]


def read_image_processing(path: str | Path) -> ImageProcessing:
    """Read a ``preprocessor_config.json`` (see :class:`ImageProcessing`).

    Raises
    ------
    UsageError
        If the file is unreadable, names an unsupported processor, or asks for a step
        that is not mirrored (padding, ``crop_pct``, ``longest_edge`` sizes ...).
    """
    path = Path(path)
    return ImageProcessing(path, _read_json(path))


# -- worker side -------------------------------------------------------------------------
def _resized_shape(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)`` or a squash."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    s = size["shortest_edge"]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    return (new_long, s) if w <= h else (s, new_long)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' numpy ``center_crop``: zero-padded where the image is smaller."""
    h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return x[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw), dtype=x.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp : tp + h, lp : lp + w] = x
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def prepare_hf(
    image: np.ndarray,
    *,
    do_resize: bool = True,
    size: dict[str, int] | None = None,
    resample: int = 3,
    crop_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize and crop one canonical image as transformers' PIL image processor does.

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1].
    do_resize : bool
        Resize at all.
    size : dict
        ``{"shortest_edge": S}`` (aspect kept; long side ``int(S * long / short)``) or
        ``{"height": H, "width": W}`` (squash).
    resample : int
        PIL filter code (3: bicubic).
    crop_size : (int, int) or None
        Centre crop (height, width), zero-padded where the image is smaller; None: no crop.

    Returns
    -------
    numpy.ndarray
        uint8, one channel (a grayscale image is the same in every RGB band).

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity.
    """
    x = canonical_input(image, "hf-vision")
    x8 = np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    if do_resize:
        h, w = _resized_shape(*x8.shape, size or {"shortest_edge": 224})
        if (h, w) != x8.shape:
            x8 = np.asarray(Image.fromarray(x8).resize((w, h), resample=Image.Resampling(resample)), dtype=np.uint8)
    if crop_size is not None:
        x8 = _center_crop(x8, *crop_size)
    return np.ascontiguousarray(x8)


# -- the encoder -------------------------------------------------------------------------
@register_encoder
class HfVisionEncoder:
    """Features of a Hugging Face vision backbone (e.g. RAD-DINO's 768-d CLS token).

    Parameters
    ----------
    weights : str or Path
        Local model folder (``config.json``, ``preprocessor_config.json``, weights; see
        the module docs).
    device : {"cpu", "cuda"}, default "cpu"
        Where the model runs; ``cuda`` (or ``cuda:N``) is refused when torch sees no GPU.
    batch : int, optional
        Most images per model call; a larger ``forward`` batch is split. Default: no split.
    half : bool, default False
        Run the model in float16 (``cuda`` only); recorded in the provenance.
    pooling : {"cls", "pooler", "mean"}, default "cls"
        Which vector of the model's output is stored (see the module docs).

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="hf-vision"``, the weight files' sha256, and parameters: model type,
        architectures, sizes, pooling, the image processing, precision.
    dim : int
        ``hidden_size`` (768 for RAD-DINO).
    native_shape : tuple of int
        ``(dim,)``.

    Raises
    ------
    UsageError
        On an unknown option, transformers or torch missing (names the ``hf`` extra), a
        bad folder, a model that needs remote code or does not take images, or weights
        that do not match ``config.json``.
    """

    name: ClassVar[str] = "hf-vision"

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch: int | None = None,
        half: bool = False,
        pooling: str = "cls",
        **unknown: Any,
    ) -> None:
        check_options("hf-vision", unknown, "weights, device, batch, half, pooling")
        if weights is None:
            raise UsageError(
                "encoder 'hf-vision' needs weights=: a local Hugging Face model folder (config.json, "
                f"{PROCESSOR_FILE}, model.safetensors), e.g. a copy of microsoft/rad-dino"
            )
        self.device_name = check_device(device)
        self.half = check_half(half, self.device_name)
        check_batch("hf-vision", batch)
        self.batch = batch
        if pooling not in POOLINGS:
            raise UsageError(f"hf-vision option pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.pooling = pooling
        _import_transformers()
        self._device: Any = resolve_torch_device(self.device_name, extra=_EXTRA, encoder=self.name)
        self.config_path, self.processor_path, self.weight_files = find_hf_files(weights)
        self.folder = self.config_path.parent
        self.model_config = _read_json(self.config_path)
        self.model_type = _check_model_type(self.config_path, self.model_config)
        self.processing = read_image_processing(self.processor_path)
        self._model: Any = None
        self._load()
        self.dim = _feature_dim(self.config_path, self._model.config)
        self.native_shape: tuple[int, ...] = (self.dim,)
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params=self._params(),
            weights_sha256=files_sha256(self.weight_files),
        )

    def __repr__(self) -> str:
        return (
            f"HfVisionEncoder(weights={str(self.folder)!r}, model_type={self.model_type!r}, "
            f"pooling={self.pooling!r}, device={self.device_name!r}, half={self.half}, dim={self.dim})"
        )

    def _params(self) -> dict[str, Any]:
        cfg = self._model.config
        return {
            "model_type": self.model_type,
            "architectures": list(self.model_config.get("architectures") or [type(self._model).__name__]),
            "hidden_size": self.dim,
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "patch_size": getattr(cfg, "patch_size", None),
            "image_size": getattr(cfg, "image_size", None),
            "num_channels": self._channels,
            "weights_files": [f.name for f in self.weight_files],
            "pooling": self.pooling,
            **self.processing.params(),
            "input_quantization": "uint8",
            "grayscale_to_rgb": "replicate",
            "input_size": list(self.processing.output_size),
            "output_norm": "none",
            "precision": "float16" if self.half else "float32",
        }

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        torch = import_torch(_EXTRA, self.name)
        from transformers import AutoModel

        safetensors = self.weight_files[0].name.startswith("model.safetensors")
        try:
            with _quiet_transformers():
                model, info = AutoModel.from_pretrained(
                    str(self.folder),
                    local_files_only=True,
                    trust_remote_code=False,
                    use_safetensors=safetensors,
                    weights_only=True,
                    dtype=torch.float32,
                    ignore_mismatched_sizes=True,  # reported below, with the other key problems
                    output_loading_info=True,
                )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise UsageError(f"cannot load the hf-vision model in {self.folder}: {exc}") from None
        if self.pooling != "pooler":  # a checkpoint saved without its (unused) pooling head is fine
            info["missing_keys"] = {k for k in info.get("missing_keys") or () if not k.startswith("pooler.")}
        _check_loading_info(self.folder, info)
        if getattr(model, "main_input_name", None) != "pixel_values":
            raise UsageError(
                f"{self.config_path}: {type(model).__name__} does not take images (its input is "
                f"{getattr(model, 'main_input_name', None)!r}); hf-vision needs a vision backbone"
            )
        self._channels = int(getattr(model.config, "num_channels", 3) or 3)
        p = self.processing
        if p.do_normalize and not (len(p.image_mean) == len(p.image_std) == self._channels):
            raise UsageError(
                f"{self.processor_path}: image_mean and image_std need {self._channels} values "
                f"(the model's num_channels), got {len(p.image_mean)} and {len(p.image_std)}"
            )
        if self.pooling != "pooler" and self.model_type not in _PREFIX_TOKENS:
            raise UsageError(
                f"pooling {self.pooling!r} needs a model with a CLS token; model_type {self.model_type!r} is not one "
                f"hf-vision knows (known: {', '.join(sorted(_PREFIX_TOKENS))}); use pooling 'pooler'"
            )
        if self.pooling == "pooler" and getattr(model, "pooler", ...) is None:
            raise UsageError(
                f"{self.config_path}: this {type(model).__name__} was built without a pooler (no pooler_output); "
                "use pooling 'cls' or 'mean'"
            )
        self._prefix = _PREFIX_TOKENS.get(self.model_type, 1) + int(getattr(model.config, "num_register_tokens", 0) or 0)
        model.eval()
        model.requires_grad_(False)
        dtype = torch.float16 if self.half else torch.float32
        self._model = model.to(device=self._device, dtype=dtype)
        self._mean = torch.tensor(p.image_mean, dtype=torch.float32, device=self._device).view(1, -1, 1, 1)
        self._std = torch.tensor(p.image_std, dtype=torch.float32, device=self._device).view(1, -1, 1, 1)
        n_params = sum(t.numel() for t in model.parameters())
        logger.info("loaded %s (%d parameters) from %s on %s", type(model).__name__, n_params, self.folder, self._device)

    # -- the contract ------------------------------------------------------------------
    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable: 8-bit resize and centre crop (one uint8 channel)."""
        p = self.processing
        return functools.partial(
            prepare_hf,
            do_resize=p.do_resize,
            size=dict(p.size),
            resample=p.resample,
            crop_size=p.output_size if p.crop_size is not None else None,
        )

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared images; returns ``(len(batch), dim)`` float32 (not normalised)."""
        return forward_in_chunks(self._forward, batch, self.batch, self.dim)

    def pixel_values(self, batch: Sequence[np.ndarray]) -> Any:
        """The model input (a float32 tensor on the device) of prepared images."""
        torch = import_torch(_EXTRA, self.name)
        x = np.stack([np.asarray(b) for b in batch])
        size = self.processing.output_size
        if x.shape[1:] != size or x.dtype != np.uint8:
            raise UsageError(
                f"hf-vision forward expects prepared uint8 images of shape {size}, got batch {x.shape} {x.dtype}"
            )
        t = torch.from_numpy(x)
        if self._device.type == "cuda":
            t = t.pin_memory().to(self._device, non_blocking=True)
        t = t.unsqueeze(1).expand(-1, self._channels, -1, -1)
        p = self.processing
        if p.do_rescale:  # as transformers: float64 product, then float32
            t = (t.double() * p.rescale_factor).float()
        else:
            t = t.float()
        if p.do_normalize:
            t = (t - self._mean) / self._std
        return t

    def _forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        torch = import_torch(_EXTRA, self.name)
        t = self.pixel_values(batch).to(next(self._model.parameters()).dtype)
        with torch.inference_mode():
            out = self._model(pixel_values=t)
            z = self._pool(out)
        return z.float().cpu().numpy().astype(np.float32, copy=False)

    def _pool(self, out: Any) -> Any:
        if self.pooling == "pooler":
            z = getattr(out, "pooler_output", None)
            if z is None:
                raise UsageError(f"{type(self._model).__name__} has no pooler_output; use pooling 'cls' or 'mean'")
            return z.reshape(z.shape[0], -1)
        h = out.last_hidden_state
        if h.ndim != 3:
            raise UsageError(
                f"{type(self._model).__name__} returns feature maps of shape {tuple(h.shape)}, not tokens; "
                "use pooling 'pooler'"
            )
        return h[:, 0] if self.pooling == "cls" else h[:, self._prefix :].mean(dim=1)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])


def _import_transformers() -> Any:
    import_torch(_EXTRA, HfVisionEncoder.name)
    try:
        import transformers
    except ImportError:
        raise UsageError(
            "encoder 'hf-vision' needs the transformers package, which is not installed; "
            f"install the extra: pip install 'cxrstore[{_EXTRA}]'"
        ) from None
    return transformers


def _feature_dim(path: Path, cfg: Any) -> int:
    """The pooled feature size: ``hidden_size``, or the last of ``hidden_sizes`` (CNN backbones)."""
    size = getattr(cfg, "hidden_size", None)
    if size is None and getattr(cfg, "hidden_sizes", None):
        size = cfg.hidden_sizes[-1]
    if not isinstance(size, int) or size < 1:
        raise UsageError(f"{path}: no hidden_size (or hidden_sizes) to size the output vector")
    return size


def _check_model_type(path: Path, cfg: dict[str, Any]) -> str:
    """The config's ``model_type``, which must be built into transformers (no remote code)."""
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UsageError(f"{path}: no model_type; not a transformers model config")
    if model_type not in CONFIG_MAPPING:
        remote = " and asks for its own code (auto_map)" if cfg.get("auto_map") else ""
        raise UsageError(
            f"{path}: model_type {model_type!r} is not built into transformers{remote}; hf-vision never runs a "
            "repository's code (trust_remote_code), so only built-in architectures can be loaded"
        )
    return model_type


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not match the architecture, naming the keys."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    wrong = sorted(info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ())
    if not (missing or unexpected or wrong or errors):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
        )
    if wrong:
        parts.append(
            f"{len(wrong)} shape mismatch(es): "
            + ", ".join(f"{k} {tuple(a)} != {tuple(b)}" for k, a, b in wrong[:5])
        )
    parts += [str(e) for e in errors[:3]]
    raise UsageError(f"hf-vision weights in {folder} do not match {folder / CONFIG_FILE}: " + "; ".join(parts))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars while loading (ingest reports its own progress); restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- stand-in weights (tests, benchmarks) ------------------------------------------------
def write_hf_standin(
    folder: str | Path,
    *,
    seed: int = 0,
    image_size: int = 56,
    patch_size: int = 14,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    processor: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny RAD-DINO stand-in: a ``Dinov2Model`` and a ``BitImageProcessor`` config.

    The model (``save_pretrained``: ``config.json`` and ``model.safetensors``) has
    RAD-DINO's architecture at a reduced size and random weights from ``seed``;
    ``preprocessor_config.json`` has the keys of RAD-DINO's file with the sizes scaled
    to ``image_size`` (``shortest_edge`` and the crop) and a grey mean / std.
    ``processor`` overrides entries of that file. Needs torch and transformers.

    Returns
    -------
    Path
        ``folder``.
    """
    torch = import_torch(_EXTRA, HfVisionEncoder.name)
    _import_transformers()
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
        image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-6, layerscale_value=1.0,
        architectures=["Dinov2Model"],
    )
    gen = torch.Generator().manual_seed(seed)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith(("layernorm.weight", "norm1.weight", "norm2.weight", "lambda1", "lambda2")):
                t.copy_(1.0 + 0.1 * noise)
            else:
                t.copy_(0.05 * noise if t.ndim > 1 else 0.02 * noise)
    with _quiet_transformers():
        model.save_pretrained(str(folder), safe_serialization=True)
    pre = {
        "crop_size": {"height": image_size, "width": image_size},
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
        "size": {"shortest_edge": image_size},
        **(processor or {}),
    }
    with open(folder / PROCESSOR_FILE, "w", encoding="utf-8") as fh:
        json.dump(pre, fh, indent=2, sort_keys=True)
    return folder
