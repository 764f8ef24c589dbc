"""Balanced, seeded, patient-aware samples of a selection, for classification.

The reference study sampled, for each dataset and label, 1,000 images with the finding
and 1,000 without. :func:`balanced_sample` does the same over a :class:`Selection`:

- only original images are sampled (``variant == "original"``); augmented variants
  (rows whose ``source_row`` is a sampled original) can be attached for training folds
  (``augment="train"``), never sampled on their own;
- rows with the label missing (NaN) are never sampled;
- every sampled row carries its group (patient) from :meth:`Selection.groups`, and an
  attached variant carries its source's group and label, so grouped cross-validation
  keeps a patient and every copy of an image on one side of a split;
- the sample depends only on the selection, the label, ``n_per_class`` and ``seed``
  (``numpy.random.default_rng(seed)``): the same store, filter and seed give the same rows;
- when fewer than ``n_per_class`` positives (or negatives) exist, all of them are used,
  a warning is logged and the shortfall is recorded in the sample (``short``, ``notes``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxrstore.errors import UsageError
from cxrstore.store.format import ORIGINAL

if TYPE_CHECKING:
    from cxrstore.store.selection import Selection

logger = logging.getLogger(__name__)

Augment = Literal["none", "train"]
AUGMENT_CHOICES: tuple[str, ...] = ("none", "train")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A balanced sample of one label over a selection.

    Attributes
    ----------
    label : str
    rows : ndarray of int64, shape (n,)
        Sampled original rows (sorted by row number).
    y : ndarray of int8, shape (n,)
        1 with the finding, 0 without.
    groups : ndarray of str, shape (n,)
        Patient group of each sampled row.
    aug_rows : ndarray of int64, shape (m,)
        Augmented variants attached for training (empty unless ``augment="train"``).
    aug_source : ndarray of int64, shape (m,)
        For each variant, the *position* in ``rows`` of its source original.
    n_requested : int
        Requested rows per class.
    short : bool
        True when fewer than ``n_requested`` positives or negatives were available.
    notes : tuple of str
        Human-readable remarks (shortfalls).
    seed : int
    """

    label: str
    rows: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    aug_rows: np.ndarray
    aug_source: np.ndarray
    n_requested: int
    short: bool
    notes: tuple[str, ...]
    seed: int

    @property
    def n_positive(self) -> int:
        return int((self.y == 1).sum())

    @property
    def n_negative(self) -> int:
        return int((self.y == 0).sum())

    @property
    def aug_y(self) -> np.ndarray:
        """Labels of the attached variants (their source's label)."""
        return self.y[self.aug_source]

    @property
    def aug_groups(self) -> np.ndarray:
        """Groups of the attached variants (their source's group)."""
        return self.groups[self.aug_source]

    def __len__(self) -> int:
        return int(self.rows.size)


def balanced_sample(
    selection: Selection,
    label: str,
    *,
    n_per_class: int = 1000,
    seed: int = 0,
    augment: Augment = "none",
) -> Sample:
    """Draw ``n_per_class`` rows with ``label`` and ``n_per_class`` without.

    Parameters
    ----------
    selection : Selection
        Rows to sample from (originals are taken from it; variants too when
        ``augment="train"``).
    label : str
        A label of the store.
    n_per_class : int
        Rows per class (default 1,000, as in the study). With fewer available, all are
        used and a warning says so.
    seed : int
        Seed of ``numpy.random.default_rng``.
    augment : {"none", "train"}
        ``"train"`` attaches the augmented variants of the sampled originals (for
        training folds only).

    Returns
    -------
    Sample

    Raises
    ------
    UsageError
        Unknown label or augment value, ``n_per_class < 1``, or no positive or no
        negative row at all.
    """
    store = selection.store
    labels = list(store.labels)
    if label not in labels:
        raise UsageError(f"unknown label {label!r}; labels of this store: {', '.join(labels) or 'none'}")
    if augment not in AUGMENT_CHOICES:
        raise UsageError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, not {augment!r}")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise UsageError(f"n_per_class must be a positive integer, not {n_per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed!r}")

    rows = selection.rows
    variant = store.column("variant", rows).astype(str) if rows.size else np.array([], dtype=str)
    is_orig = variant == ORIGINAL
    values = store.label_matrix(rows)[:, labels.index(label)] if rows.size else np.array([], dtype=float)
    groups_all = selection.groups() if rows.size else np.array([], dtype=object)

    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    notes: list[str] = []
    short = False
    for cls, word in ((1, "with"), (0, "without")):
        pos = np.flatnonzero(is_orig & (values == cls))
        if pos.size == 0:
            raise UsageError(
                f"no original image {word} {label!r} in the selection ({rows.size} rows): cannot build a balanced sample"
            )
        if pos.size < n_per_class:
            short = True
            note = f"{label}: only {pos.size} images {word} the finding (asked for {n_per_class}); using all of them"
            notes.append(note)
            logger.warning(note)
            take = pos
        else:
            take = rng.choice(pos, size=n_per_class, replace=False)
        chosen.append(take)
    positions = np.sort(np.concatenate(chosen))
    out_rows = rows[positions]
    y = (values[positions] == 1).astype(np.int8)
    groups = np.asarray(groups_all[positions]).astype(str)

    aug_rows = np.empty(0, dtype=np.int64)
    aug_source = np.empty(0, dtype=np.int64)
    if augment == "train":
        cand = np.flatnonzero(~is_orig)
        if cand.size:
            src = store.column("source_row", rows[cand]).astype(np.int64)
            where = np.searchsorted(out_rows, src)
            where = np.clip(where, 0, max(out_rows.size - 1, 0))
            hit = out_rows[where] == src
            aug_rows = rows[cand][hit]
            aug_source = where[hit].astype(np.int64)
        if aug_rows.size == 0:
            note = f"{label}: augment='train' but the selection holds no augmented variant of the sampled images"
            notes.append(note)
            logger.warning(note)
    return Sample(
        label=label,
        rows=out_rows.astype(np.int64),
        y=y,
        groups=groups,
        aug_rows=aug_rows,
        aug_source=aug_source,
        n_requested=int(n_per_class),
        short=short,
        notes=tuple(notes),
        seed=int(seed),
    )
