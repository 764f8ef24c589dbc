"""The ``medimageinsight`` encoder: Microsoft's MedImageInsight image embedding (1024-d).

Weights come from a local folder laid out like the Hugging Face repository
``lion-ai/MedImageInsights`` (nothing is downloaded)::

    <weights>/2024.09.27/config.yaml
    <weights>/2024.09.27/vision_model/medimageinsigt-v1.0.0.pt   (sic; a safetensors file)

``weights`` may name the repository folder, the ``2024.09.27`` folder itself, or the
``.pt`` file (then ``config.yaml`` is looked up in its parent's parent).

The architecture sizes are read from ``config.yaml`` (``IMAGE_ENCODER.SPEC``,
``IMAGE_ENCODER.IMAGE_SIZE``, ``IMAGE_MEAN``, ``IMAGE_STD``,
``UNICL_MODEL.DIM_PROJECTION``); the image encoder is the DaViT of
:mod:`cxrstore.encoders.davit` (an equivalent of the published ``davit_v1.py``,
activation checkpointing off). Only the ``image_encoder.*`` tensors and
``image_projection`` are read from the weights file (the text encoder is never loaded)
and loaded with ``strict=True``: a missing, unexpected or mis-shaped tensor is an error
naming the file and the keys. Older key spellings handled by the published loader
(``visual.`` for ``image_encoder.``, ``vision_projection``, ``conv_embeds`` /
``main_blocks`` ...) are mapped the same way.

Pipeline
--------
``prepare`` (worker processes): the canonical image (2-D, [0, 1]) is rounded to 8 bits
and squashed to ``IMAGE_SIZE`` (480x480) with PIL's bicubic filter: exactly the
published transform applied to an 8-bit image (Microsoft's own client maps DICOM to 8
bits first). It is returned as one uint8 channel: scaling to [0, 1], replicating to
three channels and the ImageNet normalisation run on the device in ``forward``, which
gives the same values as doing them in the worker while moving a twelfth of the bytes
(230 KB an image instead of 2.7 MB) between processes.

``forward`` (main process): ``/ 255``, grayscale replicated to RGB, ``(x - mean) / std``
per channel, DaViT features (``embed_dims[-1]`` = 2048), ``@ image_projection`` (2048 x
1024), L2 normalisation in float32. Output float32 ``(n, 1024)``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
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

__all__ = ["RELEASE", "WEIGHTS_FILE", "MedImageInsightEncoder", "find_mii_files", "prepare_mii", "read_mii_config"]

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
RELEASE = "2024.09.27"
WEIGHTS_FILE = "vision_model/medimageinsigt-v1.0.0.pt"
CONFIG_FILE = "config.yaml"
_EXTRA = "mii"

# The published loader's key renames (UniCLModel._convert_old_weights, DaViT._try_remap_keys),
# applied to whole dotted components so that e.g. block "10.attn" is not mistaken for "0.attn".
_TOP_RENAMES = (
    ("visual.", "image_encoder."),
    ("text.", "lang_encoder."),
    ("vision_projection", "image_projection"),
    ("text_projection", "lang_projection"),
)
_DAVIT_RENAMES = (
    (r"\.conv_embeds\.", ".convs."),
    (r"\.main_blocks\.", ".blocks."),
    (r"\.0\.cpe\.0\.proj\.", ".spatial_block.conv1.fn.dw."),
    (r"\.0\.attn\.", ".spatial_block.window_attn.fn."),
    (r"\.0\.cpe\.1\.proj\.", ".spatial_block.conv2.fn.dw."),
    (r"\.0\.mlp\.", ".spatial_block.ffn.fn.net."),
    (r"\.1\.cpe\.0\.proj\.", ".channel_block.conv1.fn.dw."),
    (r"\.1\.attn\.", ".channel_block.channel_attn.fn."),
    (r"\.1\.cpe\.1\.proj\.", ".channel_block.conv2.fn.dw."),
    (r"\.1\.mlp\.", ".channel_block.ffn.fn.net."),
    (r"\.0\.norm1\.", ".spatial_block.window_attn.norm."),
    (r"\.0\.norm2\.", ".spatial_block.ffn.norm."),
    (r"\.1\.norm1\.", ".channel_block.channel_attn.norm."),
    (r"\.1\.norm2\.", ".channel_block.ffn.norm."),
)


def canonical_key(key: str) -> str:
    """Map a weights-file key to the published model's state-dict name."""
    for old, new in _TOP_RENAMES:
        if key == old or key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("image_encoder."):
        for pattern, new in _DAVIT_RENAMES:
            key = re.sub(pattern, new, key)
    return key


# -- files and config --------------------------------------------------------------------
def find_mii_files(weights: str | Path) -> tuple[Path, Path]:
    """Locate ``(config.yaml, weights file)`` from the user's ``weights`` path.

    Raises
    ------
    UsageError
        If the path does not exist or the layout is not recognised; the message lists
        the paths looked at.
    """
    p = Path(weights).expanduser()
    if not p.exists():
        raise UsageError(f"MedImageInsight weights path {p} does not exist")
    if p.is_file():
        release = p.parent.parent
        cfg, pt = release / CONFIG_FILE, p
        looked = [cfg]
    else:
        candidates = [p / RELEASE, p]
        for release in candidates:
            if (release / CONFIG_FILE).is_file() or (release / WEIGHTS_FILE).exists():
                break
        else:
            release = candidates[0] if candidates[0].is_dir() else p
        cfg, pt = release / CONFIG_FILE, release / WEIGHTS_FILE
        looked = [cfg, pt]
    missing = [str(x) for x in looked if not x.is_file()]
    if missing:
        raise UsageError(
            f"MedImageInsight weights folder {p} is not laid out like lion-ai/MedImageInsights: "
            f"missing {', '.join(missing)} (expected {RELEASE}/{CONFIG_FILE} and {RELEASE}/{WEIGHTS_FILE})"
        )
    return cfg, pt


def read_mii_config(path: str | Path) -> dict[str, Any]:
    """Architecture and preprocessing from a MedImageInsight ``config.yaml``.

    Returns
    -------
    dict
        ``depths, patch_size, patch_stride, patch_padding, patch_prenorm, embed_dims,
        num_heads, num_groups, window_size`` (DaViT), ``image_size`` ([h, w]),
        ``mean``, ``std``, ``dim_projection``, ``interpolation``.

    Raises
    ------
    UsageError
        If the YAML cannot be read, a required entry is missing, or the config asks for
        something this loader does not implement (another image encoder than
        ``davit_v1``, mu-parametrisation).
    """
    import yaml

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read MedImageInsight config {path}: {exc}") from None
    try:
        enc = cfg["IMAGE_ENCODER"]
        spec = enc["SPEC"]
        if enc.get("NAME", "davit_v1") != "davit_v1":
            raise UsageError(f"{path}: IMAGE_ENCODER.NAME is {enc.get('NAME')!r}; only 'davit_v1' is supported")
        if not spec.get("STANDPARAM", True):
            raise UsageError(f"{path}: IMAGE_ENCODER.SPEC.STANDPARAM is false (muP); only the standard parametrisation is supported")
        size = enc.get("IMAGE_SIZE", [480, 480])
        if isinstance(size, int):
            size = [size, size]
        out = {
            "depths": [int(v) for v in spec["DEPTHS"]],
            "patch_size": [int(v) for v in spec["PATCH_SIZE"]],
            "patch_stride": [int(v) for v in spec["PATCH_STRIDE"]],
            "patch_padding": [int(v) for v in spec["PATCH_PADDING"]],
            "patch_prenorm": [bool(v) for v in spec["PATCH_PRENORM"]],
            "embed_dims": [int(v) for v in spec["DIM_EMBED"]],
            "num_heads": [int(v) for v in spec["NUM_HEADS"]],
            "num_groups": [int(v) for v in spec["NUM_GROUPS"]],
            "window_size": int(spec.get("WINDOW_SIZE", 7)),
            "image_size": [int(size[0]), int(size[1])],
            "mean": [float(v) for v in enc.get("IMAGE_MEAN", [0.485, 0.456, 0.406])],
            "std": [float(v) for v in enc.get("IMAGE_STD", [0.229, 0.224, 0.225])],
            "dim_projection": int(cfg["UNICL_MODEL"]["DIM_PROJECTION"]),
            "interpolation": str((cfg.get("AUG") or {}).get("INTERPOLATION", "bicubic")),
        }
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{path}: not a MedImageInsight config (missing or bad entry: {exc})") from None
    n = len(out["embed_dims"])
    per_stage = ("depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm", "num_heads", "num_groups")
    bad = [k for k in per_stage if len(out[k]) != n]
    if bad:
        raise UsageError(f"{path}: {', '.join(bad)} must have {n} values (one per stage, like DIM_EMBED)")
    if out["interpolation"] != "bicubic":
        raise UsageError(f"{path}: AUG.INTERPOLATION is {out['interpolation']!r}; only 'bicubic' is supported")
    if len(out["mean"]) != 3 or len(out["std"]) != 3:
        raise UsageError(f"{path}: IMAGE_MEAN and IMAGE_STD must have 3 values")
    return out


# -- worker side -------------------------------------------------------------------------
def prepare_mii(image: np.ndarray, *, size: tuple[int, int] = (480, 480)) -> np.ndarray:
    """Squash one canonical image to ``size`` (h, w) as the published pipeline does.

    The image is rounded to 8 bits (``round(255 x)``) and resized with PIL's bicubic
    filter (mode ``L``), exactly as the published transform (``T.Resize((480, 480),
    BICUBIC)`` on an 8-bit PIL image) treats an 8-bit image. The result stays uint8 (a
    quarter of the bytes of float32 between processes); ``forward`` divides by 255 as
    ``ToTensor`` does.

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1].
    size : (int, int)
        Output height and width.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``size``.

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity.
    """
    x = canonical_input(image, "medimageinsight")
    # As published: an 8-bit image and PIL's bicubic resize (which clamps to [0, 255]
    # after each of its two separable passes); / 255 follows in forward.
    x8 = np.rint(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    h, w = size
    img = Image.fromarray(x8)
    if x8.shape != (h, w):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


# -- the encoder -------------------------------------------------------------------------
@register_encoder
class MedImageInsightEncoder:
    """MedImageInsight image embeddings (L2-normalised, 1024-d for the published model).

    Parameters
    ----------
    weights : str or Path
        Local folder laid out like ``lion-ai/MedImageInsights`` (see the module docs).
    device : {"cpu", "cuda"}, default "cpu"
        Where the model runs; ``cuda`` (or ``cuda:N``) is refused when torch sees no GPU.
    batch : int, optional
        Most images per model call; a larger ``forward`` batch is split. Default: no split.
    half : bool, default False
        Run the model in float16 (``cuda`` only). Recorded in the provenance: vectors
        made in half precision are a different configuration.

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="medimageinsight"``, the weights file's sha256, and parameters:
        release, weights file, architecture sizes, input size, interpolation,
        normalisation, projection size, precision.
    dim : int
        ``DIM_PROJECTION`` (1024).
    native_shape : tuple of int
        ``(dim,)``.

    Raises
    ------
    UsageError
        On an unknown option, torch missing (names the ``mii`` extra), a bad weights
        layout, or weights that do not match the configured architecture.
    """

    name: ClassVar[str] = "medimageinsight"

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch: int | None = None,
        half: bool = False,
        **unknown: Any,
    ) -> None:
        check_options("medimageinsight", unknown, "weights, device, batch, half")
        if weights is None:
            raise UsageError(
                "encoder 'medimageinsight' needs weights=: a local folder laid out like the Hugging Face "
                f"repository lion-ai/MedImageInsights ({RELEASE}/{CONFIG_FILE}, {RELEASE}/{WEIGHTS_FILE})"
            )
        self.device_name = check_device(device)
        self.half = check_half(half, self.device_name)
        check_batch("medimageinsight", batch)
        self.batch = batch
        # refuse an unusable device (resolve_torch_device imports torch, naming the extra if missing) before hashing and reading gigabytes of weights
        self._device: Any = resolve_torch_device(self.device_name, extra=_EXTRA, encoder=self.name)
        self.config_path, self.weights_path = find_mii_files(weights)
        self.arch = read_mii_config(self.config_path)
        self.dim = self.arch["dim_projection"]
        self.native_shape: tuple[int, ...] = (self.dim,)
        self.input_size = (self.arch["image_size"][0], self.arch["image_size"][1])
        sha = weights_sha256(self.weights_path)
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params={
                "release": self.config_path.parent.name,
                "weights_file": self.weights_path.name,
                "architecture": "davit_v1",
                "depths": self.arch["depths"],
                "embed_dims": self.arch["embed_dims"],
                "num_heads": self.arch["num_heads"],
                "num_groups": self.arch["num_groups"],
                "window_size": self.arch["window_size"],
                "patch_size": self.arch["patch_size"],
                "patch_stride": self.arch["patch_stride"],
                "patch_padding": self.arch["patch_padding"],
                "patch_prenorm": self.arch["patch_prenorm"],
                "pooled_dim": self.arch["embed_dims"][-1],
                "dim_projection": self.dim,
                "input_size": list(self.input_size),
                "input_quantization": "uint8",
                "resize": "squash",
                "interpolation": "bicubic",
                "grayscale_to_rgb": "replicate",
                "mean": self.arch["mean"],
                "std": self.arch["std"],
                "output_norm": "l2",
                "precision": "float16" if self.half else "float32",
            },
            weights_sha256=sha,
        )
        self._model: Any = None
        self._proj: Any = None
        self._load()

    def __repr__(self) -> str:
        return f"MedImageInsightEncoder(weights={str(self.weights_path)!r}, device={self.device_name!r}, half={self.half}, dim={self.dim})"

    # -- loading -----------------------------------------------------------------------
    def _read_tensors(self) -> dict[str, Any]:
        """The image encoder's tensors and the image projection, by published name."""
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise UsageError(
                "encoder 'medimageinsight' needs the safetensors package; install the extra: pip install 'cxrstore[mii]'"
            ) from None
        out: dict[str, Any] = {}
        try:
            with safe_open(str(self.weights_path), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    name = canonical_key(key)
                    if name.startswith("image_encoder.") or name == "image_projection":
                        out[name] = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(
                f"cannot read MedImageInsight weights {self.weights_path}: not a readable safetensors file ({exc})"
            ) from None
        return out

    def _load(self) -> None:
        torch = import_torch(_EXTRA, self.name)
        from cxrstore.encoders.davit import DaViT

        a = self.arch
        model = DaViT(
            depths=a["depths"],
            patch_size=a["patch_size"],
            patch_stride=a["patch_stride"],
            patch_padding=a["patch_padding"],
            patch_prenorm=a["patch_prenorm"],
            embed_dims=a["embed_dims"],
            num_heads=a["num_heads"],
            num_groups=a["num_groups"],
            window_size=a["window_size"],
        )
        tensors = self._read_tensors()
        expected = {f"image_encoder.{k}": v.shape for k, v in model.state_dict().items()}
        expected["image_projection"] = torch.Size([model.dim_out, self.dim])
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k]))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
            if wrong:
                parts.append(
                    f"{len(wrong)} shape mismatch(es): "
                    + ", ".join(f"{k} {tuple(tensors[k].shape)} != {tuple(expected[k])}" for k in wrong[:5])
                )
            raise UsageError(
                f"MedImageInsight weights {self.weights_path} do not match the architecture of {self.config_path}: "
                + "; ".join(parts)
            )
        proj = tensors.pop("image_projection")
        state = {k[len("image_encoder."):]: v for k, v in tensors.items()}
        model.load_state_dict(state, strict=True)
        model.eval()
        dtype = torch.float16 if self.half else torch.float32
        self._model = model.to(device=self._device, dtype=dtype)
        self._proj = proj.to(device=self._device, dtype=dtype)
        self._mean = torch.tensor(a["mean"], dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(a["std"], dtype=torch.float32, device=self._device).view(1, 3, 1, 1)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("loaded MedImageInsight image encoder (%d parameters) from %s on %s", n_params, self.weights_path, self._device)

    # -- the contract ------------------------------------------------------------------
    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable: bicubic squash to the input size (one channel)."""
        return functools.partial(prepare_mii, size=self.input_size)

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared images; returns ``(len(batch), dim)`` float32 unit vectors."""
        return forward_in_chunks(self._forward, batch, self.batch, self.dim)

    def _forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        torch = import_torch(_EXTRA, self.name)
        x = np.stack([np.asarray(b) for b in batch])
        if x.shape[1:] != self.input_size:
            raise UsageError(
                f"medimageinsight forward expects prepared images of shape {self.input_size}, got batch shape {x.shape}"
            )
        t = torch.from_numpy(x)
        if self._device.type == "cuda":
            t = t.pin_memory().to(self._device, non_blocking=True)
        t = t.float().unsqueeze(1) / 255.0  # as ToTensor: float(x) / 255
        t = ((t - self._mean) / self._std).to(self._proj.dtype)
        with torch.inference_mode():
            z = (self._model(t) @ self._proj).float()
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])


# -- stand-in weights (tests, benchmarks) ------------------------------------------------
#: The published architecture (``2024.09.27/config.yaml``).
PUBLISHED_ARCH: dict[str, Any] = {
    "depths": [1, 1, 9, 1],
    "patch_size": [7, 3, 3, 3],
    "patch_stride": [4, 2, 2, 2],
    "patch_padding": [3, 1, 1, 1],
    "patch_prenorm": [False, True, True, True],
    "embed_dims": [256, 512, 1024, 2048],
    "num_heads": [8, 16, 32, 64],
    "num_groups": [8, 16, 32, 64],
    "window_size": 12,
    "image_size": [480, 480],
    "dim_projection": 1024,
}

#: A reduced architecture for tests on the CPU (same code paths, stage count and window).
REDUCED_ARCH: dict[str, Any] = {
    **PUBLISHED_ARCH,
    "depths": [1, 1, 2, 1],
    "embed_dims": [8, 16, 32, 64],
    "num_heads": [2, 2, 4, 4],
    "num_groups": [2, 2, 4, 4],
    "dim_projection": 32,
}


def write_mii_standin(folder: str | Path, *, arch: dict[str, Any] | None = None, seed: int = 0, text_encoder: bool = True) -> Path:
    """Write a MedImageInsight stand-in in the layout of ``lion-ai/MedImageInsights``.

    ``<folder>/2024.09.27/config.yaml`` (the published config's structure with the
    sizes of ``arch``) and ``<folder>/2024.09.27/vision_model/medimageinsigt-v1.0.0.pt``
    (safetensors; random weights under the published tensor names, plus a few
    ``lang_encoder.*`` tensors, ``lang_projection`` and ``logit_scale`` as in the real
    file when ``text_encoder``). For tests and benchmarks; needs torch and safetensors.

    Returns
    -------
    Path
        ``folder``.
    """
    import yaml

    torch = import_torch(_EXTRA, "medimageinsight")
    from safetensors.torch import save_file

    from cxrstore.encoders.davit import DaViT

    a = {**REDUCED_ARCH, **(arch or {})}
    folder = Path(folder)
    release = folder / RELEASE
    (release / "vision_model").mkdir(parents=True, exist_ok=True)
    config = {
        "VERBOSE": True,
        "IMAGE_ENCODER": {
            "NAME": "davit_v1",
            "NUM_CLASSES": 0,
            "IMAGE_SIZE": list(a["image_size"]),
            "LOAD_PRETRAINED": True,
            "PRETRAINED": "",
            "PRETRAINED_LAYERS": "*",
            "IMAGE_MEAN": [0.485, 0.456, 0.406],
            "IMAGE_STD": [0.229, 0.224, 0.225],
            "SPEC": {
                "DROP_RATE": 0.1,
                "DROP_PATH_RATE": 0.2,
                "PATCH_SIZE": list(a["patch_size"]),
                "PATCH_STRIDE": list(a["patch_stride"]),
                "PATCH_PADDING": list(a["patch_padding"]),
                "PATCH_PRENORM": list(a["patch_prenorm"]),
                "DIM_EMBED": list(a["embed_dims"]),
                "NUM_HEADS": list(a["num_heads"]),
                "NUM_GROUPS": list(a["num_groups"]),
                "DEPTHS": list(a["depths"]),
                "WINDOW_SIZE": a["window_size"],
                "ENABLE_CHECKPOINT": True,
            },
        },
        "LANG_ENCODER": {"NAME": "transformer", "TOKENIZER": "clip", "CONTEXT_LENGTH": 77, "WIDTH": 16, "HEADS": 2, "LAYERS": 1},
        "UNICL_MODEL": {"DIM_PROJECTION": a["dim_projection"], "GATHER_TENSORS": True, "LOAD_PRETRAINED": True, "PRETRAINED": "", "PRETRAINED_LAYERS": "*"},
        "AUG": {"INTERPOLATION": "bicubic"},
    }
    with open(release / CONFIG_FILE, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    gen = torch.Generator().manual_seed(seed)
    model = DaViT(
        depths=a["depths"], patch_size=a["patch_size"], patch_stride=a["patch_stride"], patch_padding=a["patch_padding"],
        patch_prenorm=a["patch_prenorm"], embed_dims=a["embed_dims"], num_heads=a["num_heads"], num_groups=a["num_groups"],
        window_size=a["window_size"],
    )
    tensors: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if k.endswith(("norm.weight", "norms.weight")):
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
        else:
            t = 0.05 * torch.randn(v.shape, generator=gen)
        tensors[f"image_encoder.{k}"] = t.contiguous()
    tensors["image_projection"] = (torch.randn((a["embed_dims"][-1], a["dim_projection"]), generator=gen) * 0.05).contiguous()
    if text_encoder:
        tensors["lang_encoder.token_embedding.weight"] = torch.randn((64, 16), generator=gen)
        tensors["lang_projection"] = torch.randn((16, a["dim_projection"]), generator=gen)
        tensors["logit_scale"] = torch.ones(())
    save_file(tensors, str(release / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder
