"""The ``elixr-v2`` encoder: Google's CXR Foundation (ELIXR v2.0) image embeddings.

Weights come from a local folder laid out like the Hugging Face repository
``google/cxr-foundation`` (gated; nothing is downloaded)::

    <weights>/elixr-c-v2-pooled/saved_model.pb    image encoder (EfficientNet-L2 based)
    <weights>/elixr-c-v2-pooled/variables/...
    <weights>/pax-elixr-b-text/saved_model.pb     Q-Former (image features -> 32 tokens)
    <weights>/pax-elixr-b-text/variables/...

Both are TensorFlow SavedModels (TensorFlow is the optional extra ``elixr``:
``pip install 'cxrstore[elixr]'``). ``tensorflow_text`` is imported before the
Q-Former loads when it is installed: the real Q-Former uses its ops and fails to load
with "Op type not registered" without it (a clear :class:`~cxrstore.errors.UsageError`
then says to install tensorflow-text).

Signatures (both ``serving_default``; checked when the encoder is built, and every
missing, unexpected or mis-shaped key is named):

* image encoder: input ``input_example``, string ``[1]``, one serialized
  ``tf.train.Example``; output ``feature_maps_0``, float32 ``[1, 8, 8, 1376]``. The
  exported signature takes one image per call.
* Q-Former: inputs ``image_feature`` float32 ``[1, 8, 8, 1376]``, ``ids`` int32
  ``[1, 1, 128]`` and ``paddings`` float32 ``[1, 1, 128]`` (zeros for both text inputs,
  as Google's own client does for images); outputs ``img_emb`` float32
  ``[1, 32, 768]`` and ``all_contrastive_img_emb`` float32 ``[1, 32, 128]`` (others,
  such as ``contrastive_txt_emb``, ``[1, 128]`` as Google's client indexes it, may be
  present and are not read).

Option ``output`` picks the stored Q-Former output: ``img_emb`` (default; the "32x768
general image embedding", dim 24,576, native shape ``(32, 768)``) or
``all_contrastive_img_emb`` (text-aligned; dim 4,096, native shape ``(32, 128)``). The
matrix is flattened row-major (token after token); the store's ``mean`` view gives the
token mean that Google's own classifiers use, its ``flat`` view the whole matrix.

Pipeline
--------
``prepare`` (worker processes, no TensorFlow): the canonical image (2-D float32 in
[0, 1]) becomes a serialized ``tf.train.Example`` with ``image/encoded`` = a grayscale
PNG and ``image/format`` = ``b"png"``, returned as a 1-D uint8 array of its bytes. The
PNG is **8-bit** when every pixel is exactly ``k / 255`` (the canonical image of an
8-bit source, ``k = round(255 x)``, checked exactly as :mod:`cxrstore.io.preprocess`
computes it), written as it is; otherwise **16-bit**, the image's range stretched
linearly to 0..65535 and rounded, i.e. when the source had more than 8 bits or was
area-downscaled: never through a lossy 8-bit conversion. This is what Google's own
``data_processing_lib`` (``png_to_tfexample``, ``dicom_to_tfexample``) feeds the model:
"don't rescale dynamic range for 8-bit images like CXR14", and
``_rescale_dynamic_range`` (a min-max ``np.interp`` to the full 16-bit range) for
everything else; Google's code truncates where this rounds (at most one 16-bit step).
The canonical image is already display-ready (modality LUT, first VOI window,
MONOCHROME1 inverted), as Google's DICOM path makes it before the stretch. (The
protobuf is written by :func:`cxrstore.importers.encode_example`, the PNG by Pillow.)

``forward`` (main process): per image, the image encoder, then the Q-Former on its
feature map. Pipelined as far as the one-image signature allows: a background thread
runs the image encoder of the next images while this thread runs the Q-Former of the
current one (TensorFlow releases the GIL while it computes). ``batch`` bounds the
images handled (and feature maps held) per chunk.

Provenance: :attr:`ElixrV2Encoder.config` records the output key, signature and key
names, the PNG bit-depth policy, the precision (float32 only: ``half`` is refused), and
the sha256 of each SavedModel folder (:func:`cxrstore.encoders.weights.weights_sha256`:
sorted relative paths and file digests); ``weights_sha256`` combines the two.

:func:`write_elixr_standin` writes two tiny SavedModels with exactly these signatures
(random weights, deterministic by seed) for tests and benchmarks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import logging
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
    register_encoder,
)
from cxrstore.encoders.weights import check_device, weights_sha256
from cxrstore.errors import UsageError

__all__ = [
    "FEATURE_SHAPE",
    "IMAGE_MODEL",
    "OUTPUTS",
    "QFORMER_MODEL",
    "ElixrV2Encoder",
    "elixr_weights_sha256",
    "find_elixr_folders",
    "import_tensorflow",
    "png_bit_depth",
    "prepare_elixr",
    "write_elixr_standin",
]

logger = logging.getLogger(__name__)

_NAME = "elixr-v2"
_VERSION = "2.0"
_EXTRA = "elixr"
REPOSITORY = "google/cxr-foundation"
IMAGE_MODEL = "elixr-c-v2-pooled"
QFORMER_MODEL = "pax-elixr-b-text"
SIGNATURE = "serving_default"

IMAGE_INPUT = "input_example"
IMAGE_OUTPUT = "feature_maps_0"
FEATURE_SHAPE: tuple[int, ...] = (1, 8, 8, 1376)
TEXT_SHAPE: tuple[int, ...] = (1, 1, 128)
#: Stored Q-Former outputs and their native (per-image) shapes.
OUTPUTS: dict[str, tuple[int, int]] = {"img_emb": (32, 768), "all_contrastive_img_emb": (32, 128)}

EXAMPLE_IMAGE_KEY = "image/encoded"
EXAMPLE_FORMAT_KEY = "image/format"
PNG_POLICY = (
    "grayscale PNG in tf.train.Example(image/encoded, image/format=png): 8-bit round(255 x) when every pixel is "
    "exactly k/255, else 16-bit with the range stretched to 0..65535 and rounded (Google's _rescale_dynamic_range)"
)
_OPTIONS = "weights, device, batch, half, output"


# -- TensorFlow --------------------------------------------------------------------------
def import_tensorflow() -> Any:
    """Import TensorFlow, or raise a UsageError naming the extra that installs it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise UsageError(
            f"encoder {_NAME!r} needs TensorFlow, which is not installed; "
            f"install the extra: pip install 'cxrstore[{_EXTRA}]'"
        ) from None
    return tf


def _import_tensorflow_text(tf: Any) -> str | None:
    """Import tensorflow_text (registers the ops the real Q-Former uses); its version or None."""
    try:
        import tensorflow_text
    except ImportError as exc:
        logger.debug("tensorflow_text is not importable (%s); stand-in Q-Formers load without it", exc)
        return None
    except tf.errors.OpError as exc:  # a build that does not match TensorFlow fails in load_op_library
        logger.warning("tensorflow_text failed to load its ops (%s: %s)", type(exc).__name__, exc)
        return None
    return str(getattr(tensorflow_text, "__version__", "unknown"))


def _tf_device(tf: Any, device: str) -> str:
    """The TensorFlow device string for ``device``; ``cuda`` refused when TF sees no GPU."""
    device = check_device(device)
    if not device.startswith("cuda"):
        return "/CPU:0"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        build = tf.sysconfig.get_build_info().get("cuda_version")
        why = "this TensorFlow build has no CUDA support" if not build else f"TensorFlow (CUDA {build}) sees no GPU"
        raise UsageError(f"--device {device} requested for {_NAME!r} but {why}; use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= len(gpus):
        raise UsageError(f"--device {device}: TensorFlow sees only {len(gpus)} GPU(s)")
    for gpu in gpus:
        # share the GPU with torch / FAISS rather than taking all its memory; once TensorFlow
        # has initialised the GPU the setting cannot change (RuntimeError): keep it as it is
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)
    return f"/GPU:{index}"


# -- files -------------------------------------------------------------------------------
def _savedmodel_missing(folder: Path) -> list[str]:
    """What a SavedModel folder lacks (paths relative to its parent)."""
    name = folder.name
    if not folder.is_dir():
        return [f"{name}/"]
    missing = []
    if not (folder / "saved_model.pb").is_file():
        missing.append(f"{name}/saved_model.pb")
    variables = folder / "variables"
    if not variables.is_dir():
        missing.append(f"{name}/variables/")
    else:
        if not (variables / "variables.index").is_file():
            missing.append(f"{name}/variables/variables.index")
        if not any(variables.glob("variables.data-*")):
            missing.append(f"{name}/variables/variables.data-*")
    return missing


def find_elixr_folders(weights: str | Path) -> tuple[Path, Path]:
    """Locate ``(image encoder folder, Q-Former folder)`` under the user's ``weights``.

    Raises
    ------
    UsageError
        If the path does not exist or is not laid out like ``google/cxr-foundation``;
        the message lists everything missing.
    """
    root = Path(weights).expanduser()
    if not root.exists():
        raise UsageError(f"ELIXR weights path {root} does not exist")
    if not root.is_dir():
        raise UsageError(
            f"ELIXR weights {root} is a file; pass the folder laid out like {REPOSITORY} "
            f"(holding {IMAGE_MODEL}/ and {QFORMER_MODEL}/)"
        )
    image, qformer = root / IMAGE_MODEL, root / QFORMER_MODEL
    missing = _savedmodel_missing(image) + _savedmodel_missing(qformer)
    if missing:
        hint = ""
        if root.name in (IMAGE_MODEL, QFORMER_MODEL):
            hint = f"; {root} looks like one of the two models: pass its parent folder"
        raise UsageError(
            f"ELIXR weights folder {root} is not laid out like {REPOSITORY}: missing {', '.join(missing)} "
            f"(each of {IMAGE_MODEL}/ and {QFORMER_MODEL}/ is a TensorFlow SavedModel with saved_model.pb "
            f"and variables/){hint}"
        )
    return image, qformer


def elixr_weights_sha256(image_folder: Path, qformer_folder: Path) -> tuple[str, str, str]:
    """``(combined, image encoder, Q-Former)`` sha256 digests of the two SavedModels.

    Each folder's digest is :func:`~cxrstore.encoders.weights.weights_sha256` (sorted
    relative paths and file digests, cached); the combined digest is the sha256 of
    ``"elixr-c-v2-pooled\\t<digest>\\npax-elixr-b-text\\t<digest>\\n"``.
    """
    image_sha = weights_sha256(image_folder)
    qformer_sha = weights_sha256(qformer_folder)
    combined = hashlib.sha256(f"{IMAGE_MODEL}\t{image_sha}\n{QFORMER_MODEL}\t{qformer_sha}\n".encode()).hexdigest()
    return combined, image_sha, qformer_sha


# -- worker side -------------------------------------------------------------------------
def png_bit_depth(png: bytes) -> int:
    """The bit depth of a PNG (its IHDR field), e.g. 8 or 16.

    Raises
    ------
    UsageError
        If ``png`` is not a PNG.
    """
    if len(png) < 26 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise UsageError("not a PNG (no PNG signature and IHDR chunk)")
    return png[24]


def encode_png(image: np.ndarray) -> bytes:
    """A grayscale PNG of a canonical image: 8-bit when exact, else 16-bit (see module docs)."""
    q8 = np.rint(image * np.float32(255.0)).astype(np.uint8)
    if np.array_equal(np.divide(q8, np.float32(255.0), dtype=np.float32), image):
        pixels = q8
    else:  # Google's _rescale_dynamic_range: min..max -> 0..65535 (rounded here, truncated there)
        x = image.astype(np.float64)
        lo, hi = float(x.min()), float(x.max())
        scaled = (x - lo) * (65535.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
        pixels = np.rint(scaled).astype(np.uint16)  # mode "I;16"
    buf = io.BytesIO()
    # lossless whatever the level; 1 keeps the workers fast
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def prepare_elixr(image: np.ndarray) -> np.ndarray:
    """Serialize one canonical image as the ``tf.train.Example`` the image encoder reads.

    Parameters
    ----------
    image : numpy.ndarray
        2-D canonical image, values in [0, 1].

    Returns
    -------
    numpy.ndarray
        1-D uint8 array: the bytes of a ``tf.train.Example`` with ``image/encoded`` (a
        grayscale PNG, 8- or 16-bit as the module docs say) and ``image/format`` =
        ``b"png"``.

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity.
    """
    from cxrstore.importers import encode_example

    x = canonical_input(image, _NAME)  # float32, clipped to [0, 1]
    example = encode_example({EXAMPLE_IMAGE_KEY: [encode_png(x)], EXAMPLE_FORMAT_KEY: [b"png"]})
    return np.frombuffer(example, dtype=np.uint8)


# -- signatures --------------------------------------------------------------------------
def _shape_text(shape: Any) -> str:
    dims = getattr(shape, "as_list", None)
    return str(dims() if dims is not None and shape.rank is not None else shape)


def _check_specs(kind: str, specs: dict[str, Any], expected: dict[str, tuple[Any, tuple[int, ...]]]) -> list[str]:
    """Problems of ``specs`` (name -> TensorSpec) against ``expected`` (name -> (dtype, shape))."""
    problems = []
    missing = [k for k in expected if k not in specs]
    if missing:
        problems.append(f"missing {kind}(s) {', '.join(missing)} (it has: {', '.join(sorted(specs)) or 'none'})")
    for name, (dtype, shape) in expected.items():
        spec = specs.get(name)
        if spec is None:
            continue
        if spec.dtype != dtype or not spec.shape.is_compatible_with(shape):
            problems.append(
                f"{kind} {name!r} is {spec.dtype.name} {_shape_text(spec.shape)}, expected {dtype.name} {list(shape)}"
            )
    return problems


def _signature(model: Any, folder: Path, inputs: dict[str, Any], outputs: dict[str, Any]) -> Any:
    """The checked ``serving_default`` concrete function of a loaded SavedModel."""
    signatures = getattr(model, "signatures", {})
    if SIGNATURE not in signatures:
        raise UsageError(
            f"SavedModel {folder} has no signature {SIGNATURE!r} (it has: {', '.join(sorted(signatures)) or 'none'})"
        )
    fn = signatures[SIGNATURE]
    _, in_specs = fn.structured_input_signature
    out_specs = fn.structured_outputs
    if not isinstance(out_specs, dict):
        out_specs = {}
    problems = _check_specs("input", dict(in_specs), inputs)
    unexpected = sorted(set(in_specs) - set(inputs))
    if unexpected:
        problems.append(f"unexpected input(s) {', '.join(unexpected)}")
    problems += _check_specs("output", out_specs, outputs)
    if problems:
        raise UsageError(
            f"signature {SIGNATURE!r} of SavedModel {folder} does not match ELIXR v2.0: " + "; ".join(problems)
        )
    return fn


def _load_savedmodel(tf: Any, folder: Path, device: str, text_version: str | None) -> Any:
    try:
        with tf.device(device):
            return tf.saved_model.load(str(folder))
    # what TensorFlow raises for a missing or corrupt file, an unknown op, a bad graph
    except (tf.errors.OpError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if "Op type not registered" in str(exc):
            if text_version is None:
                raise UsageError(
                    f"cannot load SavedModel {folder}: {first}. Its ops come from tensorflow-text, which is not "
                    f"installed: pip install 'cxrstore[{_EXTRA}]' (or pip install tensorflow-text matching "
                    f"TensorFlow {tf.__version__})"
                ) from None
            raise UsageError(
                f"cannot load SavedModel {folder}: {first} (tensorflow-text {text_version} is imported; "
                f"install the tensorflow-text release that matches TensorFlow {tf.__version__})"
            ) from None
        raise UsageError(f"cannot load TensorFlow SavedModel {folder}: {type(exc).__name__}: {first}") from None


# -- the encoder -------------------------------------------------------------------------
@register_encoder
class ElixrV2Encoder:
    """CXR Foundation ELIXR v2.0 embeddings (Q-Former ``img_emb`` 32x768 by default).

    Parameters
    ----------
    weights : str or Path
        Local folder laid out like ``google/cxr-foundation`` (see the module docs).
    device : {"cpu", "cuda"}, default "cpu"
        Where TensorFlow runs the models; ``cuda`` (or ``cuda:N``) is refused when
        TensorFlow sees no GPU.
    batch : int, optional
        Most images per pipelined chunk of ``forward`` (each image is still one model
        call). Default: the whole ``forward`` batch.
    half : bool, default False
        Refused when True: the ELIXR SavedModels run in float32.
    output : {"img_emb", "all_contrastive_img_emb"}, default "img_emb"
        The Q-Former output stored (dim 24,576 or 4,096).

    Attributes
    ----------
    config : EncoderConfig
        ``encoder="elixr-v2"``, the combined sha256 of both SavedModels, and parameters:
        output key, model folders and their sha256, signature and key names, feature
        and text-input shapes, PNG policy, precision.
    dim : int
        ``32 * 768`` or ``32 * 128``.
    native_shape : tuple of int
        ``(32, 768)`` or ``(32, 128)``.
    pipelined : bool
        Overlap the image encoder of the next images with the Q-Former (default True;
        the vectors are the same either way).

    Raises
    ------
    UsageError
        On an unknown option or value, TensorFlow missing (names the ``elixr`` extra),
        a bad weights layout (lists what is missing), or signatures that lack the
        expected keys, dtypes or shapes (names them).
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch: int | None = None,
        half: bool = False,
        output: str = "img_emb",
        **unknown: Any,
    ) -> None:
        check_options(_NAME, unknown, _OPTIONS)
        if weights is None:
            raise UsageError(
                f"encoder {_NAME!r} needs weights=: a local folder laid out like the Hugging Face repository "
                f"{REPOSITORY} ({IMAGE_MODEL}/ and {QFORMER_MODEL}/, TensorFlow SavedModels)"
            )
        self.device_name = check_device(device)
        if not isinstance(half, bool):
            raise UsageError(f"half must be True or False, not {half!r}")
        if half:
            raise UsageError(
                f"encoder {_NAME!r} runs in float32 only: the ELIXR SavedModels are exported in float32 "
                "and have no half-precision variant; drop --half"
            )
        check_batch(_NAME, batch)
        if output not in OUTPUTS:
            raise UsageError(f"{_NAME} option output must be one of: {', '.join(OUTPUTS)}; not {output!r}")
        self.batch = batch
        self.output = output
        self.native_shape: tuple[int, ...] = OUTPUTS[output]
        self.dim = int(np.prod(self.native_shape))
        tf = import_tensorflow()
        # refuse an unusable device before hashing and reading gigabytes of weights
        self._device = _tf_device(tf, self.device_name)
        self.image_folder, self.qformer_folder = find_elixr_folders(weights)
        self.weights_path = self.image_folder.parent
        combined, image_sha, qformer_sha = elixr_weights_sha256(self.image_folder, self.qformer_folder)
        self.config = EncoderConfig(
            encoder=self.name,
            version=_VERSION,
            params={
                "repository": REPOSITORY,
                "output": output,
                "image_model": IMAGE_MODEL,
                "image_model_sha256": image_sha,
                "qformer_model": QFORMER_MODEL,
                "qformer_model_sha256": qformer_sha,
                "signature": SIGNATURE,
                "image_input": IMAGE_INPUT,
                "image_output": IMAGE_OUTPUT,
                "image_feature_shape": list(FEATURE_SHAPE),
                "qformer_inputs": ["image_feature", "ids", "paddings"],
                "text_inputs": f"zeros: ids int32 {list(TEXT_SHAPE)}, paddings float32 {list(TEXT_SHAPE)}",
                "example_keys": [EXAMPLE_IMAGE_KEY, EXAMPLE_FORMAT_KEY],
                "png_policy": PNG_POLICY,
                "flatten": "row-major",
                "precision": "float32",
            },
            weights_sha256=combined,
        )
        self.pipelined = True
        self._load(tf)

    def __repr__(self) -> str:
        return (
            f"ElixrV2Encoder(weights={str(self.weights_path)!r}, device={self.device_name!r}, "
            f"output={self.output!r}, dim={self.dim})"
        )

    # -- loading -----------------------------------------------------------------------
    def _load(self, tf: Any) -> None:
        image_model = _load_savedmodel(tf, self.image_folder, self._device, None)
        self._image_fn = _signature(
            image_model,
            self.image_folder,
            {IMAGE_INPUT: (tf.string, (1,))},
            {IMAGE_OUTPUT: (tf.float32, FEATURE_SHAPE)},
        )
        text_version = _import_tensorflow_text(tf)
        qformer = _load_savedmodel(tf, self.qformer_folder, self._device, text_version)
        self._qformer_fn = _signature(
            qformer,
            self.qformer_folder,
            {"image_feature": (tf.float32, FEATURE_SHAPE), "ids": (tf.int32, TEXT_SHAPE), "paddings": (tf.float32, TEXT_SHAPE)},
            {k: (tf.float32, (1, *shape)) for k, shape in OUTPUTS.items()},
        )
        # keep the loaded objects alive: a concrete function does not own its variables
        self._models = (image_model, qformer)
        with tf.device(self._device):
            self._ids = tf.zeros(TEXT_SHAPE, dtype=tf.int32)
            self._paddings = tf.zeros(TEXT_SHAPE, dtype=tf.float32)
        logger.info("loaded ELIXR v2 (%s, %s) from %s on %s", IMAGE_MODEL, QFORMER_MODEL, self.weights_path, self._device)

    # -- the contract ------------------------------------------------------------------
    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable: canonical image -> serialized tf.Example bytes (uint8)."""
        return prepare_elixr

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared images; returns ``(len(batch), dim)`` float32 (flattened row-major)."""
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        step = self.batch or max(1, len(batch))
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            out[start : start + len(chunk)] = self._forward_chunk(chunk)
        return out

    def _image_features(self, prepared: np.ndarray) -> Any:
        """``feature_maps_0`` [1, 8, 8, 1376] of one prepared image (a tensor)."""
        import tensorflow as tf

        x = np.asarray(prepared)
        if x.dtype != np.uint8 or x.ndim != 1:
            raise UsageError(
                f"{_NAME} forward expects prepared inputs from its preparer (1-D uint8 tf.Example bytes), "
                f"got {x.dtype} of shape {x.shape}"
            )
        with tf.device(self._device):
            feats = self._image_fn(**{IMAGE_INPUT: tf.constant([x.tobytes()])})[IMAGE_OUTPUT]
        if tuple(feats.shape) != FEATURE_SHAPE:
            raise UsageError(
                f"{self.image_folder}: {IMAGE_OUTPUT} has shape {list(feats.shape)}, expected {list(FEATURE_SHAPE)}"
            )
        return feats

    def _embed(self, feats: Any) -> np.ndarray:
        """The chosen Q-Former output of one feature map, flattened."""
        import tensorflow as tf

        with tf.device(self._device):
            emb = self._qformer_fn(image_feature=feats, ids=self._ids, paddings=self._paddings)[self.output]
        if tuple(emb.shape) != (1, *self.native_shape):
            raise UsageError(
                f"{self.qformer_folder}: {self.output} has shape {list(emb.shape)}, expected {[1, *self.native_shape]}"
            )
        return emb.numpy().reshape(-1)

    def _forward_chunk(self, chunk: Sequence[np.ndarray]) -> np.ndarray:
        if not chunk:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not self.pipelined or len(chunk) < 2:
            return np.stack([self._embed(self._image_features(x)) for x in chunk])
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="elixr-image") as pool:
            futures = [pool.submit(self._image_features, x) for x in chunk]
            try:
                return np.stack([self._embed(f.result()) for f in futures])
            finally:
                for f in futures:
                    f.cancel()

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Convenience: ``forward([prepare(x) for x in images])``."""
        prep = self.preparer()
        return self.forward([prep(x) for x in images])


# -- stand-in weights (tests, benchmarks) ------------------------------------------------
def _standin_image_encoder(tf: Any, rng: np.random.Generator, output_key: str) -> Any:
    """A tiny image encoder with the real signature: parse, decode PNG, 8x8 patches -> 1376."""
    side, patch = 64, 8
    n = FEATURE_SHAPE[1]

    class StandinImageEncoder(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_proj = tf.Variable(rng.normal(0.0, 0.5, (patch * patch, FEATURE_SHAPE[3])).astype(np.float32))
            self.bias = tf.Variable(rng.normal(0.0, 0.5, (FEATURE_SHAPE[3],)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1], tf.string, name=IMAGE_INPUT)])
        def serve(self, input_example: Any) -> dict[str, Any]:
            parsed = tf.io.parse_single_example(
                input_example[0],
                {
                    EXAMPLE_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
                    EXAMPLE_FORMAT_KEY: tf.io.FixedLenFeature([], tf.string, default_value="png"),
                },
            )
            png = parsed[EXAMPLE_IMAGE_KEY]
            is16 = tf.equal(tf.strings.substr(png, 24, 1), b"\x10")  # IHDR bit depth
            img = tf.cond(
                is16,
                lambda: tf.cast(tf.io.decode_png(png, channels=1, dtype=tf.uint16), tf.float32) / 65535.0,
                lambda: tf.cast(tf.io.decode_png(png, channels=1, dtype=tf.uint8), tf.float32) / 255.0,
            )
            img = tf.image.resize(img[None], [side, side], method="area")  # [1, 64, 64, 1]
            blocks = tf.reshape(img, [1, n, patch, n, patch])
            blocks = tf.reshape(tf.transpose(blocks, [0, 1, 3, 2, 4]), [1, n, n, patch * patch])
            blocks = (blocks - 0.5) * 4.0
            return {output_key: tf.tanh(tf.einsum("bijp,pc->bijc", blocks, self.patch_proj) + self.bias)}

    return StandinImageEncoder()


def _standin_qformer(tf: Any, rng: np.random.Generator, tokens: int, width: int) -> Any:
    """A tiny Q-Former with the real signature: query attention pooling and projections."""
    channels = FEATURE_SHAPE[3]
    contrastive = OUTPUTS["all_contrastive_img_emb"][1]
    vocab = 512

    class StandinQFormer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.queries = tf.Variable(rng.normal(0.0, 1.0, (tokens, channels)).astype(np.float32))
            self.img_proj = tf.Variable(rng.normal(0.0, channels**-0.5, (channels, width)).astype(np.float32))
            self.con_proj = tf.Variable(rng.normal(0.0, width**-0.5, (width, contrastive)).astype(np.float32))
            self.tok_emb = tf.Variable(rng.normal(0.0, 1.0, (vocab, contrastive)).astype(np.float32))

        @tf.function(
            input_signature=[
                tf.TensorSpec(FEATURE_SHAPE, tf.float32, name="image_feature"),
                tf.TensorSpec(TEXT_SHAPE, tf.int32, name="ids"),
                tf.TensorSpec(TEXT_SHAPE, tf.float32, name="paddings"),
            ]
        )
        def serve(self, image_feature: Any, ids: Any, paddings: Any) -> dict[str, Any]:
            feats = tf.reshape(image_feature, [1, -1, channels])  # [1, 64, 1376]
            att = tf.nn.softmax(tf.einsum("qc,btc->bqt", self.queries, feats) * channels**-0.5, axis=-1)
            pooled = tf.einsum("bqt,btc->bqc", att, feats)
            img_emb = tf.tanh(tf.einsum("bqc,cw->bqw", pooled, self.img_proj))
            all_con = tf.math.l2_normalize(tf.einsum("bqw,wk->bqk", img_emb, self.con_proj), axis=-1)
            keep = 1.0 - paddings[:, 0, :]  # [1, 128]
            tok = tf.gather(self.tok_emb, tf.math.floormod(ids[:, 0, :], vocab))  # [1, 128, 128]
            txt = tf.reduce_sum(tok * keep[..., None], axis=1) / tf.maximum(tf.reduce_sum(keep, axis=1, keepdims=True), 1.0)
            return {
                "img_emb": img_emb,
                "all_contrastive_img_emb": all_con,
                "contrastive_txt_emb": tf.math.l2_normalize(txt, axis=-1),
            }

    return StandinQFormer()


def write_elixr_standin(
    folder: str | Path,
    seed: int = 0,
    *,
    image_output_key: str = IMAGE_OUTPUT,
    query_tokens: int = OUTPUTS["img_emb"][0],
    img_emb_width: int = OUTPUTS["img_emb"][1],
) -> Path:
    """Write an ELIXR v2.0 stand-in in the layout of ``google/cxr-foundation``.

    ``<folder>/elixr-c-v2-pooled/`` and ``<folder>/pax-elixr-b-text/``: two TensorFlow
    SavedModels with the real signature names, input and output keys, dtypes and
    shapes (see the module docs), holding small random weights drawn from ``seed``
    (same seed, same vectors). The image encoder really parses the Example and decodes
    its PNG (16-bit as uint16, 8-bit as uint8, scaled to [0, 1]), area-resizes to 64x64
    and projects each 8x8 block to 1376 channels; the Q-Former pools the 64 positions
    with 32 random queries and projects them to ``img_emb`` [1, 32, 768],
    ``all_contrastive_img_emb`` [1, 32, 128] (unit rows) and ``contrastive_txt_emb``
    [1, 128]. For tests and benchmarks; needs TensorFlow (not tensorflow-text).

    Parameters
    ----------
    folder : str or Path
        Created if absent.
    seed : int
        Seed of the random weights.
    image_output_key, query_tokens, img_emb_width
        Deviations from the real interface, only to test that the loader refuses them.

    Returns
    -------
    Path
        ``folder``.
    """
    tf = import_tensorflow()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, module in (
        (IMAGE_MODEL, _standin_image_encoder(tf, rng, image_output_key)),
        (QFORMER_MODEL, _standin_qformer(tf, rng, query_tokens, img_emb_width)),
    ):
        with tf.device("/CPU:0"):
            tf.saved_model.save(module, str(folder / name), signatures={SIGNATURE: module.serve.get_concrete_function()})
    return folder
