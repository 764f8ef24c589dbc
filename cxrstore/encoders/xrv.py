"""The ``torchxrayvision`` encoder: the 1024-d ``features2`` vector of torchxrayvision's DenseNet121.

torchxrayvision (Cohen et al.) publishes DenseNet121 classifiers of chest X-rays
(e.g. ``densenet121-res224-all``, 18 pathologies). Their penultimate activation,
``model.features2(x)``, is a widely used 1024-d image embedding. torchxrayvision
itself is not needed (nor importable beside recent torch: it needs torchvision): the
architecture is :mod:`cxrstore.encoders.densenet`, with the published state-dict
names, and nothing is ever downloaded.

Weights
-------
``weights`` names one local file, in any of three formats (detected from the
content, not the name):

``release``
    A file of torchxrayvision's GitHub releases, e.g.
    ``nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``:
    a pickled *whole model* (``torch.save(model)``), which torchxrayvision reads with
    ``torch.load`` and then ``.state_dict()``. Unpickling such a file with the
    standard unpickler can run arbitrary code, so it is read by a restricted
    unpickler instead: the classes of ``torchxrayvision.*``, ``torchvision.models.*``,
    ``torch.nn.modules.*`` and ``torch.nn.parallel.*`` (a ``DataParallel`` wrapper,
    whose ``module.`` key prefix is then dropped) become inert stand-in objects (no constructor, no
    method of the real class runs), their ``_parameters`` and ``_buffers`` are
    collected recursively into a state dict (the non-persistent buffers left out,
    as ``state_dict()`` does), and only the tensor-rebuilding functions
    (``_rebuild_tensor``, ``_rebuild_tensor_v2``, ``_rebuild_parameter``) of
    ``torch._utils``, ``collections.OrderedDict``, ``builtins.set`` / ``frozenset``,
    ``torch.Size``, the storage types (``torch.FloatStorage`` ...) and the
    historical no-op ``torch.nn.backends.thnn._get_thnn_function_backend`` are
    allowed besides. Any other global (``os.system``, ``builtins.eval`` ...) is
    refused before anything is called: a :class:`~cxrstore.errors.UsageError`
    names the global and the file. Both torch serialisation formats (the zip
    format of torch >= 1.6 and the older "legacy" format) are read; TorchScript
    archives are refused.
``state_dict``
    A torch file holding a state dict (``torch.save(model.state_dict())``, possibly
    under a ``state_dict`` / ``model_state_dict`` / ``model`` key), read with
    ``torch.load(weights_only=True)``.
``safetensors``
    A safetensors file of the state dict.

The architecture (growth rate, block configuration, stem width, bottleneck factor,
input channels, number of classes) is inferred from the tensor shapes, so DenseNet121
and a tiny stand-in load the same way. The tensors are then checked against the
architecture strictly: missing, unexpected and mis-shaped keys are named in the error
(only a missing BatchNorm ``num_batches_tracked``, which inference never reads and
old checkpoints lack, is tolerated). A ``op_threshs`` buffer (operating points) and a
``pathologies`` / ``targets`` list, when present, are recorded; they do not change
the vector.

Pipeline (torchxrayvision's published preprocessing)
-----------------------------------------------------
``prepare`` (worker processes) on the canonical image ``c`` (2-D, [0, 1]):

1. ``xrv.utils.normalize(img, maxval)`` = ``(2 * img / maxval - 1) * 1024`` in
   float32; the canonical image is already ``img / maxval``, so ``(2 c - 1) * 1024``.
2. ``xrv.datasets.XRayCenterCrop``: the central square of side ``min(h, w)``
   (``start = side // 2 - crop // 2``).
3. ``xrv.datasets.XRayResizer(224)``: ``skimage.transform.resize(img, (1, 224, 224),
   mode="constant", preserve_range=True)``, i.e. (scikit-image >= 0.19) a Gaussian
   anti-aliasing filter of sigma ``max(0, (s - 1) / 2)`` (``s`` the shrink factor)
   when shrinking, bilinear ``scipy.ndimage.zoom(..., order=1, grid_mode=True)``,
   both with zero padding (``grid-constant``), then clipped to the input's range.
   scikit-image is not required: :func:`skimage_resize` makes exactly those
   ``scipy.ndimage`` calls (measured against scikit-image 0.26 on the real test
   images and random ones, shrinking and enlarging: identical float32 output).
   Older torchxrayvision releases call ``resize`` without ``preserve_range``, which
   for a float32 input gives the same values. scikit-image before 0.19 (2021)
   resized through ``warp`` and may differ from this in the last digits.

The scaling to [-1024, 1024] happens in ``prepare``, before the crop and resize, as in
torchxrayvision: its resize pads with zeros *in the scaled range* (mid-grey), so doing
it in the same order gives the published values bit for bit. The prepared input is
float32 224x224 (200 KB; no quantisation, so 16-bit detail is kept).

``forward`` (main process): ``model.features2(x)`` on the ``(n, 1, 224, 224)`` batch:
``relu(features(x))``, global average pooling, flattened: float32 ``(n, 1024)``.
**No L2 normalisation** (torchxrayvision does not normalise ``features2``); the
vectors are non-negative (a ReLU precedes the pooling).
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import logging
import math
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

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
    "INPUT_SIZE",
    "XrvEncoder",
    "center_crop",
    "pickled_globals",
    "prepare_xrv",
    "read_xrv_weights",
    "save_release_pickle",
    "skimage_resize",
    "write_xrv_standin",
]

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
_EXTRA = "xrv"
_NAME = "torchxrayvision"
#: Side of the model input (``densenet121-res224-*``).
INPUT_SIZE = 224
#: ``xrv.utils.normalize`` maps [0, maxval] to [-SCALE, SCALE].
SCALE = 1024.0
#: The pathologies of ``densenet121-res224-all`` (``xrv.datasets.default_pathologies``).
DEFAULT_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)


# -- worker side -------------------------------------------------------------------------
def center_crop(image: np.ndarray) -> np.ndarray:
    """The central square of a 2-D image, as ``xrv.datasets.XRayCenterCrop``."""
    y, x = image.shape
    crop = min(y, x)
    startx = x // 2 - (crop // 2)
    starty = y // 2 - (crop // 2)
    return image[starty : starty + crop, startx : startx + crop]


def skimage_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``skimage.transform.resize(image, size, mode="constant", preserve_range=True)``, float32.

    The calls scikit-image (>= 0.19) makes for a float32 image with the default
    ``order=1``, ``cval=0``, ``clip=True`` and ``anti_aliasing=None`` (on when any
    side shrinks), written with ``scipy.ndimage`` so that scikit-image is not needed.

    Parameters
    ----------
    image : numpy.ndarray
        float32 array (any number of dimensions; ``size`` has as many).
    size : tuple of int
        Output shape.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``size``.
    """
    from scipy import ndimage as ndi

    image = np.asarray(image, dtype=np.float32)
    out_shape = tuple(int(s) for s in size)
    if len(out_shape) != image.ndim:
        raise UsageError(f"resize to {out_shape} needs a {len(out_shape)}-D image, got shape {image.shape}")
    factors = np.divide(image.shape, out_shape)
    cval = 0.0
    if any(o < i for o, i in zip(out_shape, image.shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        filtered = ndi.gaussian_filter(image, sigma, cval=cval, mode="grid-constant")
    else:
        filtered = image
    out = ndi.zoom(filtered, [1 / f for f in factors], order=1, mode="grid-constant", cval=cval, grid_mode=True)
    # skimage's _clip_warp_output: clip to the input's range, widened to cval when the
    # zero padding shows in the output
    lo, hi = float(np.min(image)), float(np.max(image))
    if not lo <= cval <= hi and float(np.min(out)) <= cval <= float(np.max(out)):
        lo, hi = min(lo, cval), max(hi, cval)
    np.clip(out, lo, hi, out=out)
    return out


def prepare_xrv(image: np.ndarray, *, size: int = INPUT_SIZE) -> np.ndarray:
    """One canonical image to torchxrayvision's model input (see the module docs).

    ``(2 c - 1) * 1024`` (``xrv.utils.normalize``), central square crop
    (``XRayCenterCrop``), resize to ``size`` x ``size`` (``XRayResizer``).

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1] (clipped to it).
    size : int
        Output side (224 for the published models).

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)`` in [-1024, 1024].

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity.
    """
    x = canonical_input(image, _NAME)  # float32, clipped to [0, 1]
    x = (np.float32(2.0) * x - np.float32(1.0)) * np.float32(SCALE)
    x = center_crop(x)
    if x.shape != (size, size):
        x = skimage_resize(x[None], (1, size, size))[0]
    return np.ascontiguousarray(x, dtype=np.float32)


# -- restricted unpickling of whole-model files ------------------------------------------
class _ModuleStub:
    """Inert stand-in for a pickled ``nn.Module``: keeps its pickled state, runs nothing."""

    _origin: ClassVar[str] = "?"
    dump_patches: ClassVar[bool] = False
    _pickled_state: Any = None  # replaced by BUILD (__setstate__); NEWOBJ skips __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pickled_state: Any = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        self._pickled_state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._origin}>"


#: Module prefixes whose classes are read as inert stand-ins.
_STUB_PREFIXES = ("torchxrayvision.", "torchvision.models.", "torch.nn.modules.", "torch.nn.parallel.")


def _no_op_backend() -> None:
    """Stands for ``torch.nn.backends.thnn._get_thnn_function_backend`` (old files)."""
    return None


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist (raised before it is called)."""

    def __init__(self, module: str, name: str) -> None:
        self.global_name = f"{module}.{name}"
        super().__init__(f"refused global {self.global_name}")


@functools.cache
def _stub_class(module: str, name: str) -> type:
    return type(name, (_ModuleStub,), {"_origin": f"{module}.{name}", "__module__": __name__})


def _safe_globals() -> dict[tuple[str, str], Any]:
    torch = import_torch(_EXTRA, _NAME)
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
        ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _no_op_backend,
    }
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
        allowed[("torch._utils", fn)] = getattr(torch._utils, fn)
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler that resolves only allowlisted globals (see the module docs).

    The pure-Python unpickler is used so that every opcode that names a global
    (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through :meth:`find_class`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise RefusedGlobalError(str(module), str(name))
        # Python 2 names in protocol < 3 pickles (torch saves protocol 2: `__builtin__.set`)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        hit = self._allowed.get((module, name))
        if hit is not None:
            return hit
        if module == "torch" and name.endswith("Storage") and name.isidentifier():
            torch = import_torch(_EXTRA, _NAME)
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                raise RefusedGlobalError(module, name) from None
        if module.startswith(_STUB_PREFIXES) and name.isidentifier() and not name.startswith("__"):
            return _stub_class(module, name)
        raise RefusedGlobalError(module, name)

    # torch's legacy loader sets ``persistent_load`` to a function that, for a pickled
    # module class, compares the class's saved source with the installed one (and may
    # write a patch file); classes are inert stand-ins here, so that check is skipped.
    def _get_persistent_load(self) -> Callable[[Any], Any]:
        return self.__dict__.get("_pers_load", self._no_persistent_load)

    def _set_persistent_load(self, fn: Callable[[Any], Any]) -> None:
        def load(saved_id: Any) -> Any:
            if isinstance(saved_id, tuple) and saved_id and saved_id[0] in ("module", b"module"):
                if len(saved_id) < 2 or not isinstance(saved_id[1], type) or not issubclass(saved_id[1], _ModuleStub):
                    raise pickle.UnpicklingError("a 'module' persistent id does not name a module class")
                return saved_id[1]
            return fn(saved_id)

        self.__dict__["_pers_load"] = load

    persistent_load = property(_get_persistent_load, _set_persistent_load)

    @staticmethod
    def _no_persistent_load(saved_id: Any) -> Any:
        raise pickle.UnpicklingError("unsupported persistent id in pickle")


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: Passed to ``torch.load(pickle_module=...)``: only ``Unpickler`` and ``load`` are used.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="cxrstore_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=_restricted_load,
    UnpicklingError=pickle.UnpicklingError,
)


def _collect_module_state(root: _ModuleStub, path: Path) -> OrderedDict[str, Any]:
    """``state_dict()`` of a stand-in module tree: parameters and persistent buffers."""
    torch = import_torch(_EXTRA, _NAME)
    out: OrderedDict[str, Any] = OrderedDict()

    def walk(mod: _ModuleStub, prefix: str, depth: int) -> None:
        if depth > 64:
            raise UsageError(f"{path}: pickled module tree is nested more than 64 deep")
        st = mod._pickled_state if isinstance(mod._pickled_state, dict) else {}
        skip = st.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            entries = st.get(kind) or {}
            if not isinstance(entries, Mapping):
                raise UsageError(f"{path}: {mod._origin} at {prefix or '<root>'} has a malformed {kind}")
            for name, value in entries.items():
                if value is None or (kind == "_buffers" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise UsageError(f"{path}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                out[f"{prefix}{name}"] = value.detach()
        children = st.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise UsageError(f"{path}: {mod._origin} at {prefix or '<root>'} has malformed _modules")
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, _ModuleStub):
                raise UsageError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}, not a module")
            walk(child, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return out


def _is_torchscript_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in names)


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError(
            f"encoder {_NAME!r} needs the safetensors package to read {path}; install the extra: pip install 'cxrstore[{_EXTRA}]'"
        ) from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"cannot read torchxrayvision weights {path}: not a readable safetensors file ({exc})") from None


def _torch_load(path: Path, *, restricted: bool) -> Any:
    torch = import_torch(_EXTRA, _NAME)
    with open(path, "rb") as fh:
        if restricted:
            return torch.load(fh, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE, mmap=False)
        return torch.load(fh, map_location="cpu", weights_only=True, mmap=False)


def _unwrap(obj: Any, path: Path) -> tuple[Any, str]:
    """The module or state dict inside what ``torch.load`` returned, and its format."""
    torch = import_torch(_EXTRA, _NAME)
    for _ in range(2):
        if isinstance(obj, _ModuleStub):
            return obj, "release"
        if isinstance(obj, Mapping):
            if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
                return obj, "state_dict"
            inner = next((obj[k] for k in ("state_dict", "model_state_dict", "model") if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise UsageError(
        f"torchxrayvision weights {path} hold a {type(obj).__name__}, neither a pickled model nor a state dict of tensors"
    )


def read_xrv_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and metadata of a torchxrayvision weights file (any of the three formats).

    Parameters
    ----------
    path : str or Path
        A release ``.pt`` file (pickled model), a torch state-dict file or a
        safetensors file.

    Returns
    -------
    (dict, dict)
        The state dict (name to CPU tensor; a leading ``module.`` of a
        ``DataParallel`` model removed) and metadata: ``format`` (``release``,
        ``state_dict`` or ``safetensors``), ``root_class`` (the pickled model's class,
        release files only), ``pathologies`` (list or None), ``op_threshs`` (list with
        None for NaN, or None).

    Raises
    ------
    UsageError
        If the file is missing, unreadable, a TorchScript archive, holds something
        else than a model or a state dict, or (release files) asks for a global
        outside the allowlist: the message names the global and the file.
    """
    import_torch(_EXTRA, _NAME)  # a clear error naming the extra when torch is missing
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"torchxrayvision weights file {p} does not exist")
    if not p.is_file():
        raise UsageError(f"torchxrayvision weights {p} is not a file; pass the .pt (or .safetensors) file itself")
    meta: dict[str, Any] = {"format": None, "root_class": None, "pathologies": None, "op_threshs": None}
    if _looks_like_safetensors(p):
        state: dict[str, Any] = _read_safetensors(p)
        meta["format"] = "safetensors"
    else:
        if _is_torchscript_zip(p):
            raise UsageError(f"{p} is a TorchScript archive; pass a torchxrayvision release file or a state dict")
        obj = _load_torch_object(p)
        obj, meta["format"] = _unwrap(obj, p)
        if isinstance(obj, _ModuleStub):
            meta["root_class"] = obj._origin
            st = obj._pickled_state if isinstance(obj._pickled_state, dict) else {}
            meta["pathologies"] = _string_list(st.get("pathologies", st.get("targets")))
            thr = (st.get("_buffers") or {}).get("op_threshs", st.get("op_threshs"))
            meta["op_threshs"] = _float_list(thr)
            state = dict(_collect_module_state(obj, p))
        else:
            state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "op_threshs" in state:
        meta["op_threshs"] = _float_list(state.pop("op_threshs"))
    return state, meta


def _load_torch_object(p: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; failing that, with the restricted unpickler."""
    try:
        return _torch_load(p, restricted=False)
    except Exception as exc:
        first = exc
    try:
        return _torch_load(p, restricted=True)
    except RefusedGlobalError as exc:
        raise UsageError(
            f"refusing to load {p}: its pickle asks for the global {exc.global_name}, which a torchxrayvision "
            "model file never needs (only torch tensors, OrderedDict and torchxrayvision/torchvision/torch.nn module "
            "classes are allowed); the file may be malicious: do not load it with torch.load either"
        ) from None
    except UsageError:
        raise
    except Exception as exc:
        why = first if not isinstance(first, pickle.UnpicklingError) else exc
        raise UsageError(
            f"cannot read torchxrayvision weights {p}: not a torch or safetensors file ({type(why).__name__}: {why})"
        ) from None


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _float_list(value: Any) -> list[float | None] | None:
    if value is None:
        return None
    try:
        vals = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return [None if math.isnan(v) else float(v) for v in vals.tolist()]


# -- the encoder -------------------------------------------------------------------------
@register_encoder
class XrvEncoder:
    """torchxrayvision DenseNet ``features2`` embeddings (1024-d for DenseNet121; not normalised).

    Parameters
    ----------
    weights : str or Path
        One local weights file: a torchxrayvision release ``.pt`` (pickled model, read
        by a restricted unpickler), a torch state-dict file or a safetensors file.
    device : {"cpu", "cuda"}, default "cpu"
        Where the model runs; ``cuda`` (or ``cuda:N``) is refused when torch sees no GPU.
    batch : int, optional
        Most images per model call; a larger ``forward`` batch is split. Default: no split.
    half : bool, default False
        Run the model in float16 (``cuda`` only); recorded in the provenance.

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="torchxrayvision"``, the weights file's sha256 and parameters:
        architecture sizes, input size, scaling, crop and resize, output, precision.
    dim : int
        Width of ``features2`` (1024 for DenseNet121).
    native_shape : tuple of int
        ``(dim,)``.
    pathologies, op_threshs : list or None
        Read from the weights when present (not used for the vector).

    Raises
    ------
    UsageError
        On an unknown option, torch missing (names the ``xrv`` extra), an unreadable or
        refused weights file, or tensors that do not match a DenseNet.
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch: int | None = None,
        half: bool = False,
        **unknown: Any,
    ) -> None:
        check_options(_NAME, unknown, "weights, device, batch, half")
        if weights is None:
            raise UsageError(
                f"encoder {_NAME!r} needs weights=: a local torchxrayvision weights file, e.g. the release file "
                "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt "
                "(densenet121-res224-all), a state-dict .pt or a .safetensors file"
            )
        self.device_name = check_device(device)
        self.half = check_half(half, self.device_name)
        check_batch(_NAME, batch)
        self.batch = batch
        self._device: Any = resolve_torch_device(self.device_name, extra=_EXTRA, encoder=self.name)
        self.weights_path = Path(weights).expanduser()
        state, meta = read_xrv_weights(self.weights_path)
        self.weights_format: str = meta["format"]
        self.pathologies: list[str] | None = meta["pathologies"]
        self.op_threshs: list[float | None] | None = meta["op_threshs"]
        self.arch = self._arch(state)
        self._model: Any = None
        self._load(state)
        self.dim: int = int(self._model.num_features)
        self.native_shape: tuple[int, ...] = (self.dim,)
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params={
                "weights_file": self.weights_path.name,
                "weights_format": self.weights_format,
                "architecture": "densenet",
                "growth_rate": self.arch["growth_rate"],
                "block_config": self.arch["block_config"],
                "num_init_features": self.arch["num_init_features"],
                "bn_size": self.arch["bn_size"],
                "in_channels": self.arch["in_channels"],
                "num_classes": self.arch["num_classes"],
                "input_size": [INPUT_SIZE, INPUT_SIZE],
                "input_scaling": [-SCALE, SCALE],
                "crop": "center-square",
                "resize": "skimage-resize-order1-constant-antialias",
                "output": "features2",
                "output_norm": "none",
                "precision": "float16" if self.half else "float32",
                "op_threshs": self.op_threshs,
            },
            weights_sha256=weights_sha256(self.weights_path),
        )

    def __repr__(self) -> str:
        return f"XrvEncoder(weights={str(self.weights_path)!r}, device={self.device_name!r}, half={self.half}, dim={self.dim})"

    # -- loading -----------------------------------------------------------------------
    def _arch(self, state: Mapping[str, Any]) -> dict[str, Any]:
        from cxrstore.encoders.densenet import arch_from_state_dict

        try:
            arch = arch_from_state_dict(state)
        except KeyError as exc:
            raise UsageError(
                f"torchxrayvision weights {self.weights_path} are not a DenseNet state dict: missing key {exc.args[0]} "
                f"(found {len(state)} tensors, e.g. {', '.join(sorted(state)[:4]) or 'none'})"
            ) from None
        except ValueError as exc:
            raise UsageError(f"torchxrayvision weights {self.weights_path}: {exc}") from None
        if arch["in_channels"] != 1:
            raise UsageError(
                f"torchxrayvision weights {self.weights_path} take {arch['in_channels']} input channels; "
                "torchxrayvision models take one (grayscale)"
            )
        return arch

    def _load(self, state: dict[str, Any]) -> None:
        torch = import_torch(_EXTRA, self.name)
        from cxrstore.encoders.densenet import DenseNet

        model = DenseNet(**self.arch)
        expected = model.state_dict()
        for k, v in expected.items():  # old checkpoints predate num_batches_tracked (never read in eval)
            if k.endswith(".num_batches_tracked") and k not in state:
                state[k] = torch.zeros_like(v)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        not_float = sorted(
            k for k in set(expected) & set(state)
            if expected[k].is_floating_point() and not state[k].is_floating_point()
        )
        if missing or unexpected or wrong or not_float:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
            if wrong:
                parts.append(
                    f"{len(wrong)} shape mismatch(es): "
                    + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong[:5])
                )
            if not_float:
                parts.append(f"{len(not_float)} non-float tensor(s): {', '.join(not_float[:5])}")
            raise UsageError(
                f"torchxrayvision weights {self.weights_path} do not match the DenseNet their shapes describe "
                f"(growth_rate={self.arch['growth_rate']}, block_config={self.arch['block_config']}): " + "; ".join(parts)
            )
        model.load_state_dict(state, strict=True)
        model.eval()
        dtype = torch.float16 if self.half else torch.float32
        self._model = model.to(device=self._device, dtype=dtype)
        self._dtype = dtype
        logger.info(
            "loaded torchxrayvision DenseNet (%d parameters, %s format) from %s on %s",
            sum(p.numel() for p in model.parameters()), self.weights_format, self.weights_path, self._device,
        )

    # -- the contract ------------------------------------------------------------------
    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable: scale, center-crop and resize to 224 (see the module docs)."""
        return functools.partial(prepare_xrv, size=INPUT_SIZE)

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared images; returns ``(len(batch), dim)`` float32 ``features2`` vectors."""
        return forward_in_chunks(self._forward, batch, self.batch, self.dim)

    def _forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        torch = import_torch(_EXTRA, self.name)
        x = np.stack([np.asarray(b, dtype=np.float32) for b in batch])
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE):
            raise UsageError(
                f"{_NAME} forward expects prepared images of shape ({INPUT_SIZE}, {INPUT_SIZE}), got batch shape {x.shape}"
            )
        t = torch.from_numpy(x)
        if self._device.type == "cuda":
            t = t.pin_memory().to(self._device, non_blocking=True)
        t = t.unsqueeze(1).to(self._dtype)
        with torch.inference_mode():
            z = self._model.features2(t).float()
        return z.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])


# -- stand-in weights (tests, benchmarks) ------------------------------------------------
#: A tiny DenseNet for tests: the published stem, four blocks, 32-d ``features2``.
TINY_ARCH: dict[str, Any] = {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16, "bn_size": 2}


def _random_state(model: Any, seed: int) -> dict[str, Any]:
    torch = import_torch(_EXTRA, _NAME)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            t = torch.tensor(100, dtype=torch.int64)
        elif k.endswith("running_var"):
            t = 0.5 + torch.rand(v.shape, generator=gen)
        elif v.ndim == 1 and k.endswith("weight"):  # BatchNorm scale
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
        elif v.ndim == 4:  # convolutions: He-scaled
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            t = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            t = 0.05 * torch.randn(v.shape, generator=gen)
        out[k] = t.to(v.dtype).contiguous()
    return out


def _fake_xrv_modules() -> tuple[dict[str, types.ModuleType], dict[type, type]]:
    """Modules ``torchxrayvision`` and ``torchxrayvision.models`` with our classes under the published names."""
    from cxrstore.encoders import densenet as dn

    pkg = types.ModuleType("torchxrayvision")
    models = types.ModuleType("torchxrayvision.models")
    pkg.models = models  # type: ignore[attr-defined]
    mapping = {}
    for cls in (dn.DenseNet, dn._DenseBlock, dn._DenseLayer, dn._Transition):
        fake = type(cls.__name__, (cls,), {"__module__": "torchxrayvision.models", "__qualname__": cls.__name__})
        setattr(models, cls.__name__, fake)
        mapping[cls] = fake
    return {"torchxrayvision": pkg, "torchxrayvision.models": models}, mapping


def write_xrv_standin(
    path: str | Path,
    *,
    growth_rate: int = TINY_ARCH["growth_rate"],
    block_config: Sequence[int] = tuple(TINY_ARCH["block_config"]),
    num_init_features: int = TINY_ARCH["num_init_features"],
    bn_size: int = TINY_ARCH["bn_size"],
    num_classes: int = 18,
    fmt: str = "release",
    legacy: bool = False,
    op_threshs: Sequence[float] | None = None,
    seed: int = 0,
) -> Path:
    """Write a torchxrayvision DenseNet stand-in (random weights, published key names).

    Parameters
    ----------
    path : str or Path
        The file to write.
    growth_rate, block_config, num_init_features, bn_size, num_classes : int
        The architecture (default: a tiny one, :data:`TINY_ARCH`; pass DenseNet121's
        sizes for a full-size file).
    fmt : {"release", "state_dict", "safetensors"}
        ``release``: a pickled whole model, as torchxrayvision's release files: the
        classes are pickled under their published path ``torchxrayvision.models.*``
        (fake ``torchxrayvision`` modules stand in ``sys.modules`` during the save and
        are removed after; the model carries ``pathologies`` and an ``op_threshs``
        buffer). ``state_dict``: ``torch.save(model.state_dict())``. ``safetensors``.
    legacy : bool
        Use torch's legacy (pre-1.6, non-zip) serialisation (``release``/``state_dict``).
    op_threshs : sequence of float, optional
        Operating points stored in the release model's ``op_threshs`` buffer.
    seed : int
        Seed of the random weights.

    Returns
    -------
    Path
        ``path``.
    """
    torch = import_torch(_EXTRA, _NAME)
    from cxrstore.encoders.densenet import DenseNet

    if fmt not in ("release", "state_dict", "safetensors"):
        raise UsageError(f"fmt must be 'release', 'state_dict' or 'safetensors', not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = DenseNet(growth_rate=growth_rate, block_config=tuple(block_config), num_init_features=num_init_features,
                     bn_size=bn_size, in_channels=1, num_classes=num_classes)
    state = _random_state(model, seed)
    model.load_state_dict(state)
    model.eval()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
        return path
    save_kw = {"_use_new_zipfile_serialization": not legacy}
    if fmt == "state_dict":
        torch.save(OrderedDict(state), path, **save_kw)
        return path
    model.register_buffer("op_threshs", None if op_threshs is None else torch.tensor(list(op_threshs), dtype=torch.float32))
    model.pathologies = list(DEFAULT_PATHOLOGIES[:num_classes]) + [f"class{i}" for i in range(18, num_classes)]
    save_release_pickle(model, path, legacy=legacy)
    return path


def save_release_pickle(model: Any, path: str | Path, *, legacy: bool = False) -> Path:
    """``torch.save(model)`` with the classes pickled as ``torchxrayvision.models.*``.

    The :mod:`~cxrstore.encoders.densenet` classes of ``model`` are swapped for
    subclasses named ``torchxrayvision.models.{DenseNet, _DenseBlock, _DenseLayer,
    _Transition}``, fake ``torchxrayvision`` modules stand in ``sys.modules`` during
    the save (so that pickle records the published class paths), and everything is
    put back afterwards: the model keeps its classes and ``sys.modules`` its entries.
    ``legacy`` uses torch's pre-1.6 (non-zip) format. For stand-ins in tests and
    benchmarks.
    """
    torch = import_torch(_EXTRA, _NAME)
    fakes, mapping = _fake_xrv_modules()
    swapped = []
    for mod in model.modules():
        fake = mapping.get(type(mod))
        if fake is not None:
            swapped.append((mod, type(mod)))
            mod.__class__ = fake
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        with warnings.catch_warnings():
            # the legacy format stores each module class's source; the fake classes have none
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        for mod, cls in swapped:
            mod.__class__ = cls
    return Path(path)


def _pickle_bytes_of(path: Path) -> bytes:
    """The main pickle of a torch file (zip: ``*/data.pkl``; legacy: the whole file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            return zf.read(name)
    except zipfile.BadZipFile:
        return path.read_bytes()


def pickled_globals(path: str | Path) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in a torch file's pickle(s), in order.

    Reads the opcodes only (``pickletools``); nothing is unpickled. Useful to inspect a
    release file before loading it.
    """
    import pickletools

    data = _pickle_bytes_of(Path(path))
    found: list[str] = []
    buf = io.BytesIO(data)
    while buf.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(buf):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings.append(str(arg))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:
            break
    return found
