"""The encoder contract and registry.

An encoder turns canonical images (see :mod:`cxrstore.io.preprocess`: 2-D float32
arrays in [0, 1], grayscale, display-ready, longest side at most ``max_side``)
into fixed-length float32 vectors. Work is split in two so that ingest can
overlap decoding with the model:

``prepare(image)``
    Runs in worker processes, one image at a time, on the CPU: resizing,
    normalisation, anything that does not need the model. Must be picklable
    (a module-level function of the encoder's config) and return a numpy array.
``forward(batch)``
    Runs in the main process on a list of prepared arrays and returns an
    ``(n, dim)`` float32 array. This is where a real model runs (on GPU).

An encoder is described by a frozen, JSON-round-tripping :class:`EncoderConfig`;
that configuration, the weights' sha256 and the native output shape are stored
with every model in the store (its provenance), and appending vectors made with a
different configuration is refused.

Adding an encoder is one new module with a class decorated by
:func:`register_encoder`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from cxrstore.errors import UsageError


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What identifies an encoder's output: same config, same vectors.

    Attributes
    ----------
    encoder : str
        Registered encoder name, e.g. ``"baseline"``.
    version : str
        Version of the encoder's algorithm or weights release.
    params : dict
        Encoder-specific parameters (input size, normalisation, output key...).
        Values must be JSON-serialisable.
    weights_sha256 : str or None
        sha256 of the weights file(s); ``None`` for training-free encoders.
    """

    encoder: str
    version: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "version": self.version,
            "params": json.loads(json.dumps(self.params, sort_keys=True)),
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncoderConfig:
        return cls(
            encoder=data["encoder"],
            version=data["version"],
            params=dict(data.get("params", {})),
            weights_sha256=data.get("weights_sha256"),
        )

    def diff(self, other: EncoderConfig) -> list[str]:
        """Names of the fields (``params.x`` for parameters) that differ."""
        a, b = self.to_json(), other.to_json()
        out = [k for k in ("encoder", "version", "weights_sha256") if a[k] != b[k]]
        keys = sorted(set(a["params"]) | set(b["params"]))
        out += [f"params.{k}" for k in keys if a["params"].get(k) != b["params"].get(k)]
        return out


@runtime_checkable
class Encoder(Protocol):
    """What ingest needs from an encoder."""

    name: ClassVar[str]
    config: EncoderConfig
    dim: int
    native_shape: tuple[int, ...]

    def preparer(self) -> Callable[[np.ndarray], np.ndarray]:
        """A picklable callable mapping one canonical image to the model input."""
        ...

    def forward(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Encode prepared inputs; returns ``(len(batch), dim)`` float32."""
        ...


_REGISTRY: dict[str, type] = {}


def register_encoder(cls: type) -> type:
    """Class decorator: make an encoder available by its ``name``.

    Raises
    ------
    UsageError
        If another encoder already registered that name.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"encoder class {cls.__qualname__} has no string `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise UsageError(f"encoder name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls
    return cls


def available_encoders() -> list[str]:
    """Names of every registered encoder, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_encoder(name: str, **options: Any) -> Encoder:
    """Instantiate a registered encoder.

    Parameters
    ----------
    name : str
        Registered name (see :func:`available_encoders`).
    **options
        Passed to the encoder's constructor (e.g. ``weights=`` for real models).
    """
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return cls(**options)


def encoder_from_config(config: EncoderConfig | dict[str, Any], **options: Any) -> Encoder:
    """Rebuild the encoder that a stored configuration describes.

    The recorded ``params`` that the encoder's constructor takes are passed with
    ``options`` (e.g. ``weights=`` for a model whose weights live elsewhere on this
    machine); params that describe the algorithm beyond the constructor's options are
    checked instead: the rebuilt encoder's configuration must equal the recorded one.

    Raises
    ------
    UsageError
        If the encoder is unknown, or cannot be rebuilt with the recorded configuration
        (the message names the fields that differ).
    """
    recorded = config if isinstance(config, EncoderConfig) else EncoderConfig.from_json(config)
    _load_builtin()
    cls = _REGISTRY.get(recorded.encoder)
    if cls is None:
        raise UsageError(f"unknown encoder {recorded.encoder!r}; available: {', '.join(sorted(_REGISTRY))}")
    sig = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    accepted = {n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}
    params = {k: v for k, v in recorded.params.items() if k in accepted or (takes_any and not accepted)}
    encoder = cls(**{**params, **options})
    differ = encoder.config.diff(recorded)
    if differ:
        raise UsageError(
            f"cannot rebuild encoder {recorded.encoder!r} with the recorded configuration "
            f"({', '.join(differ)} differ); pass the matching encoder options (e.g. weights)"
        )
    return encoder


# -- checks every encoder makes ----------------------------------------------------------
def canonical_input(image: Any, encoder: str) -> np.ndarray:
    """A canonical image checked and read as float32 in [0, 1] (for ``prepare`` steps).

    Raises
    ------
    UsageError
        If the image is not 2-D, is empty, or holds NaN or infinity (naming ``encoder``).
    """
    x = np.asarray(image)
    if x.ndim != 2 or x.size == 0:
        raise UsageError(f"{encoder} expects a non-empty 2-D grayscale image, got shape {x.shape}")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise UsageError(f"{encoder} got an image containing NaN or infinity")
    return np.clip(x, np.float32(0.0), np.float32(1.0))


def check_options(encoder: str, unknown: dict[str, Any], allowed: str) -> None:
    """Refuse options an encoder's constructor does not take, listing those it does."""
    if unknown:
        raise UsageError(f"unknown option(s) for encoder {encoder!r}: {', '.join(sorted(unknown))}; allowed: {allowed}")


def check_batch(encoder: str, batch: Any) -> int | None:
    """``batch`` (images per model call) as given, refused unless None or a positive int."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UsageError(f"{encoder} option batch must be a positive integer, not {batch!r}")
    return batch


def forward_in_chunks(run: Callable[[Sequence[np.ndarray]], np.ndarray], batch: Sequence[np.ndarray], step: int | None, dim: int) -> np.ndarray:
    """``run`` on slices of at most ``step`` prepared inputs (all at once when None), stacked."""
    if len(batch) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    step = step or len(batch)
    return np.concatenate([run(batch[i : i + step]) for i in range(0, len(batch), step)])


def _load_builtin() -> None:
    # Importing the modules runs their @register_encoder decorators; the real models'
    # modules import torch only when an encoder is built.
    from cxrstore.encoders import (  # noqa: F401
        baseline,
        elixr,
        hf_vision,
        medimageinsight,
        openclip,
        xrv,
    )
