"""``verify``: check a store's integrity, chunk by chunk.

Checks, over committed rows only:

- the format marker, version and commit record (against ``schemas/store-v1.schema.json``);
- every array exists with a shape that covers the committed rows and, for vectors, the
  model's dimension;
- every chunk decodes and its crc32c checksum matches (one flipped byte anywhere in a
  stored chunk is found and named by array path and chunk index);
- presence stamps are at most the committed generation and their count matches the commit
  record; present vectors are finite;
- (image id, variant) keys are unique.

Memory stays bounded: one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from cxrstore.errors import StoreError
from cxrstore.store import format as fmt
from cxrstore.store.store import Store

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyReport:
    """Problems found (empty when the store is sound) and what was checked."""

    store: str
    problems: list[str] = dataclasses.field(default_factory=list)
    arrays_checked: int = 0
    chunks_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "problems": list(self.problems),
            "arrays_checked": self.arrays_checked,
            "chunks_checked": self.chunks_checked,
        }


def _chunk_slices(arr: zarr.Array, n_rows: int) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Chunk coordinates and slices covering rows [0, n_rows) of ``arr``."""
    shape = (min(n_rows, arr.shape[0]),) + tuple(arr.shape[1:])
    ranges = [range(0, max(s, 0), c) for s, c in zip(shape, arr.chunks)]
    for starts in itertools.product(*ranges):
        coords = tuple(s // c for s, c in zip(starts, arr.chunks))
        yield coords, tuple(slice(s, min(s + c, dim)) for s, c, dim in zip(starts, arr.chunks, shape))


def verify(store: Store | str) -> VerifyReport:
    """Check the integrity of ``store``; returns a report listing every problem found."""
    from cxrstore.schemas import validate

    if not isinstance(store, Store):
        store = Store(store)
    report = VerifyReport(store=str(store.path))
    commit = store.commit
    n = commit.n_rows
    attrs = zarr.open_group(store=store._zstore, mode="r").attrs.asdict()
    for problem in validate(attrs, "store-v1"):
        report.problems.append(f"root attributes: {problem}")

    def check_array(key: str, rows: int, *, width: int | None = None) -> np.ndarray | None:
        """Read every chunk of ``key`` over ``rows`` rows; returns the values of a 1-D array."""
        try:
            arr = zarr.open_array(store=store._zstore, path=key, mode="r")
        except (FileNotFoundError, KeyError):
            report.problems.append(f"{key}: array missing")
            return None
        report.arrays_checked += 1
        if arr.shape[0] < rows:
            report.problems.append(f"{key}: {arr.shape[0]} rows on disk, the commit record says {rows}")
            return None
        if width is not None and (arr.ndim != 2 or arr.shape[1] != width):
            report.problems.append(f"{key}: shape {arr.shape}, expected {width} columns")
            return None
        keep = [] if arr.ndim == 1 else None
        for coords, sl in _chunk_slices(arr, rows):
            report.chunks_checked += 1
            try:
                values = np.asarray(arr[sl])
            except (ValueError, RuntimeError, OSError) as exc:
                chunk_key = "c/" + "/".join(map(str, coords))
                report.problems.append(f"{key}: chunk {coords} (file {key}/{chunk_key}) is corrupt: {exc}")
                keep = None
                continue
            if keep is not None:
                keep.append(values)
            if key.endswith("/vectors"):
                check_vectors(key, sl[0].start, values)
        if keep is None:
            return None
        return np.concatenate(keep) if keep else np.zeros(0)

    present_now: dict[str, np.ndarray] = {}

    def check_vectors(key: str, start: int, values: np.ndarray) -> None:
        model = key.split("/")[1]
        stamps = present_now.get(model)
        if stamps is None:
            return
        mask = (stamps[start : start + len(values)] > 0) & (stamps[start : start + len(values)] <= commit.generation)
        bad = ~np.isfinite(values[mask]).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(mask)[bad][:5] + start
            report.problems.append(f"{key}: non-finite vectors at rows {rows.tolist()}")

    for name in fmt.STR_COLUMNS + tuple(fmt.NUMERIC_COLUMNS) + commit.columns:
        values = check_array(f"rows/{name}", n)
        if name == "image_id" and values is not None:
            variants = check_array("rows/variant", n)
            if variants is not None:
                keys = set(zip(values.tolist(), variants.tolist()))
                if len(keys) != n:
                    report.problems.append(f"rows: {n - len(keys)} duplicated (image_id, variant) keys")
        if name == "generation" and values is not None and n and values.max() > commit.generation:
            report.problems.append("rows/generation: rows stamped with an uncommitted generation")
    if commit.labels:
        check_array("labels", n, width=None)
    for model, entry in commit.models.items():
        stamps = check_array(f"models/{model}/present", n)
        if stamps is not None:
            if (stamps > commit.generation).any():
                report.problems.append(f"models/{model}/present: stamps above the committed generation {commit.generation}")
            count = int(((stamps > 0) & (stamps <= commit.generation)).sum())
            if count != entry.n_present:
                report.problems.append(f"models/{model}: {count} present rows, the commit record says {entry.n_present}")
            present_now[model] = stamps
        check_array(f"models/{model}/vectors", n, width=entry.dim)
        try:
            prov = store.provenance(model)
        except (KeyError, StoreError):
            report.problems.append(f"models/{model}: provenance missing")
        else:
            if int(prov.get("dim", -1)) != entry.dim:
                report.problems.append(f"models/{model}: provenance dim {prov.get('dim')} != {entry.dim}")
    for name in fmt.FAILURE_COLUMNS + ("generation",):
        check_array(f"failures/{name}", commit.n_failures)
    logger.info("verified %s: %d problems", store.path, len(report.problems))
    return report
