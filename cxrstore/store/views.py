"""Views of stored vectors: the same stored array read flat or reduced, never stored twice.

Some models give a matrix per image: ELIXR v2's ``img_emb`` is 32 tokens x 768, stored
flattened to 24,576 values with its native shape ``[32, 768]`` in the model's
provenance. Google's own classifiers mean-pool the tokens; other studies use the flat
vector. A *view* picks one at read time:

``"flat"``
    The stored vector as it is (``dim`` values).
``"mean"``
    The mean over the first axis of the native shape: ``[32, 768]`` gives 768 values.
    Refused for a model whose native shape has one axis.

Views are pure functions of a ``(b, dim)`` batch and the native shape, applied batch by
batch while streaming (:meth:`cxrstore.store.selection.Selection.iter_vectors`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxrstore.errors import StoreError, UsageError

if TYPE_CHECKING:
    from cxrstore.store.store import Store

__all__ = ["VIEWS", "View", "apply_view", "check_view", "model_view_dim", "native_shape", "view_dim"]

View = Literal["flat", "mean"]
VIEWS: tuple[str, ...] = ("flat", "mean")


def check_view(view: str) -> str:
    """Validate a view name."""
    if view not in VIEWS:
        raise UsageError(f"unknown view {view!r}; choose one of: {', '.join(VIEWS)}")
    return view


def native_shape(store: Store, model: str) -> tuple[int, ...]:
    """The native shape recorded for ``model`` (``(dim,)`` when none was recorded).

    Raises
    ------
    StoreError
        If the recorded shape does not multiply to the stored dimension.
    """
    dim = store.commit.models[model].dim if model in store.commit.models else None
    if dim is None:
        store._check_model(model)  # raises the store's own "unknown model" error
        raise UsageError(f"unknown model {model!r}")
    raw = store.provenance(model).get("native_shape") or [dim]
    shape = tuple(int(s) for s in raw)
    if math.prod(shape) != dim:
        raise StoreError(f"{store.path}: model {model!r} records native shape {list(shape)} for {dim}-value vectors")
    return shape


def view_dim(view: str, dim: int, shape: tuple[int, ...], *, model: str = "") -> int:
    """Values per vector under ``view``.

    Raises
    ------
    UsageError
        For ``"mean"`` on a one-axis native shape (naming the model and its shape).
    """
    check_view(view)
    if view == "flat":
        return dim
    if len(shape) < 2:
        who = f"model {model!r}" if model else "this model"
        raise UsageError(
            f"view 'mean' averages over the first axis of a matrix embedding, but {who} has native shape "
            f"{list(shape)} (one axis); use view='flat'"
        )
    return math.prod(shape[1:])


def apply_view(vectors: np.ndarray, view: str, shape: tuple[int, ...], *, dtype: str = "float32") -> np.ndarray:
    """Map a ``(b, dim)`` batch of stored vectors to ``(b, view_dim)``.

    ``"mean"`` is computed in float32 (float64 when ``dtype`` is float64) and returned as
    ``dtype``.
    """
    check_view(view)
    if view == "flat":
        return vectors
    out_dim = view_dim(view, vectors.shape[1], shape)
    acc = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    x = np.asarray(vectors, dtype=acc).reshape(vectors.shape[0], shape[0], out_dim)
    return x.mean(axis=1).astype(dtype, copy=False)


def model_view_dim(store: Store, model: str, view: str) -> int:
    """Values per vector of ``model`` under ``view`` (refusals as :func:`view_dim`)."""
    check_view(view)
    shape = native_shape(store, model)
    return view_dim(view, store.commit.models[model].dim, shape, model=model)
