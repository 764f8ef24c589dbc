"""The study's five augmentation variants of the canonical image.

Each variant is a deterministic function of the canonical image (2-D float32 in [0, 1],
see :mod:`cxrstore.io.preprocess`), applied *before* the encoder's ``prepare`` step, so
every encoder sees the same augmented pixels. The encoder configuration (a model's
provenance) does not change: the variant is a property of the row (``variant`` column,
``source_row`` pointing at the original), and the parameters below are recorded in each
run summary (``store.runs[i]["augment"]``, from :func:`augment_record`).

Variants (policy version :data:`AUGMENT_VERSION`)
-------------------------------------------------
``brighter``
    ``clip(x + 0.1, 0, 1)``: a brightness offset of +10% of full scale.
``darker``
    ``clip(x - 0.1, 0, 1)``.
``contrast``
    ``clip(m + 1.5 * (x - m), 0, 1)`` with ``m`` the image's own mean: contrast
    stretched by 1.5 about the mean grey level.
``rot+45`` / ``rot-45``
    Rotation by +45 / -45 degrees about the image centre (positive = counter-clockwise,
    as displayed with row 0 at the top), same size as the input (corners cut off),
    bilinear interpolation (Pillow ``Image.rotate`` on the float32 image), the uncovered
    corners filled with 0 (black, like air outside the collimation).

All five are pure and deterministic: same input, same output bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cxrstore.errors import UsageError

#: Version of the variant definitions above; bumped whenever an output would change.
AUGMENT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Variant:
    """One augmentation variant: its name, kind and parameters."""

    name: str
    kind: str
    params: dict[str, Any]
    description: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params), "description": self.description}


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("brighter", "brightness", {"offset": 0.1}, "clip(x + 0.1, 0, 1)"),
        Variant("darker", "brightness", {"offset": -0.1}, "clip(x - 0.1, 0, 1)"),
        Variant("contrast", "contrast", {"factor": 1.5, "center": "image_mean"}, "clip(m + 1.5 (x - m), 0, 1), m = image mean"),
        Variant("rot+45", "rotation", {"degrees": 45.0, "resample": "bilinear", "fill": 0.0, "expand": False},
                "rotate +45 degrees (counter-clockwise) about the centre, same size, bilinear, corners 0"),
        Variant("rot-45", "rotation", {"degrees": -45.0, "resample": "bilinear", "fill": 0.0, "expand": False},
                "rotate -45 degrees (clockwise) about the centre, same size, bilinear, corners 0"),
    )
}
#: The variant names, in their canonical order.
VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)


def parse_variants(spec: str | Sequence[str] | bool | None) -> tuple[str, ...]:
    """Variant names from a user's choice.

    Parameters
    ----------
    spec : str, sequence of str, bool or None
        ``None``/``False``/``""``: none; ``True`` or ``"all"``: all five; otherwise a
        comma-separated string or a sequence of names (each once, canonical order kept).

    Raises
    ------
    UsageError
        Naming an unknown variant and listing the valid ones.
    """
    if spec is None or spec is False or spec == "":
        return ()
    if spec is True or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return VARIANT_NAMES
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown augmentation variant(s) {', '.join(map(repr, unknown))}; valid: all, {', '.join(VARIANT_NAMES)}")
    return tuple(n for n in VARIANT_NAMES if n in names)


def _brightness(image: np.ndarray, offset: float) -> np.ndarray:
    out = image + np.float32(offset)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    m = np.float32(image.mean(dtype=np.float64))
    out = (image - m) * np.float32(factor) + m
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))  # mode "F"
    rotated = im.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=0.0)
    out = np.asarray(rotated, dtype=np.float32).copy()
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_variant(image: np.ndarray, name: str) -> np.ndarray:
    """The variant ``name`` of a canonical image (2-D float32 in [0, 1]); a new array.

    Raises
    ------
    UsageError
        For an unknown variant name or an image that is not 2-D.
    """
    try:
        v = VARIANTS[name]
    except KeyError:
        raise UsageError(f"unknown augmentation variant {name!r}; valid: {', '.join(VARIANT_NAMES)}") from None
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise UsageError(f"augmentation expects a 2-D canonical image, got shape {image.shape}")
    if v.kind == "brightness":
        out = _brightness(image, v.params["offset"])
    elif v.kind == "contrast":
        out = _contrast(image, v.params["factor"])
    else:
        out = _rotate(image, v.params["degrees"])
    return np.ascontiguousarray(out, dtype=np.float32)


def augment_record(names: Sequence[str]) -> dict[str, Any]:
    """The parameters of the variants ``names``, as recorded in a run summary."""
    return {"version": AUGMENT_VERSION, "applied_to": "canonical image, before the encoder's prepare step",
            "variants": {n: VARIANTS[n].to_json() for n in names}}


def augmentation_summary(store: Any, *, model: str | None = None) -> dict[str, Any]:
    """How a store's augmented rows sit: rows per variant, and whether every variant shares
    its source row's patient group through the selection API (:meth:`Selection.groups`).

    Parameters
    ----------
    store : Store or str
        The store (or its folder).
    model : str, optional
        Only rows holding this model's vector.

    Returns
    -------
    dict
        ``{"rows", "variants": {name: rows}, "groups", "variant_rows",
        "variants_in_source_group": bool, "orphans": rows whose source is not selected}``.
    """
    from cxrstore.store.store import Store

    if not isinstance(store, Store):
        store = Store(store)
    sel = store.select(model=model)
    if len(sel) == 0:
        return {"rows": 0, "variants": {}, "groups": 0, "variant_rows": 0, "variants_in_source_group": True, "orphans": 0}
    groups = sel.groups()
    variant = store.column("variant", sel.rows).astype(str)
    source = store.column("source_row", sel.rows)
    names, counts = np.unique(variant, return_counts=True)
    pos = {int(r): i for i, r in enumerate(sel.rows)}
    is_variant = source >= 0
    same = True
    orphans = 0
    for i in np.flatnonzero(is_variant):
        j = pos.get(int(source[i]))
        if j is None:
            orphans += 1
        elif groups[j] != groups[i]:
            same = False
    return {
        "rows": len(sel),
        "variants": {str(n): int(c) for n, c in zip(names, counts)},
        "groups": int(np.unique(groups).size),
        "variant_rows": int(is_variant.sum()),
        "variants_in_source_group": same,
        "orphans": orphans,
    }
