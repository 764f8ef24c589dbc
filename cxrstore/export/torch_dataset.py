"""A PyTorch dataset that streams fused vectors from the store, chunk by chunk.

:class:`FusedVectorDataset` is an ``IterableDataset``: the fused rows are cut into work
units aligned with the stored chunks of every model (so no chunk is read by two workers),
and the units are shared round-robin between ``DataLoader`` workers. Each worker opens
the store itself, lazily, on its first read; the dataset pickles as a path and a plan.

Each item is a dict of tensors: ``"x"`` (fused vector, float32), ``"row"`` (store row
number, int64), and optionally ``"labels"`` (float32, NaN for missing) and
``"covariates"`` (float32, NaN for missing). With ``batch_size=None`` (default) items are
single rows (use ``DataLoader(ds, batch_size=B)``); with ``batch_size=B`` the dataset
yields ready batches (use ``DataLoader(ds, batch_size=None)``, much faster for wide
vectors).

PyTorch is an optional dependency (``pip install 'cxrstore[mii]'`` or ``[dev]``); it is
imported by this module only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cxrstore.errors import CxrStoreError, UsageError
from cxrstore.export.clinical import JoinOn, join_clinical, read_clinical
from cxrstore.export.fusion import Fusion, Missing, PcaSpec, fuse
from cxrstore.store.selection import Where
from cxrstore.store.store import Store

logger = logging.getLogger(__name__)


class MissingDependencyError(CxrStoreError, ImportError):
    """An optional dependency is not installed."""


try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as _exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError(
        "cxrstore.export.torch_dataset needs PyTorch, which is not installed; "
        "install the extra: pip install 'cxrstore[mii]' (or 'cxrstore[dev]')"
    ) from _exc


class FusedVectorDataset(IterableDataset):
    """Stream fused vectors of a :class:`~cxrstore.export.fusion.Fusion` as tensors.

    Parameters
    ----------
    fusion : Fusion
        The plan (rows, models, transforms); see :func:`cxrstore.export.fusion.fuse`.
    labels : bool
        Yield ``"labels"``: the store's labels (1.0, 0.0, NaN) in ``label_names`` order.
    covariates : DataFrame, optional
        Numeric covariates indexed by store row number (e.g. from a clinical join); rows
        of the fusion absent from it get NaN. Yielded as ``"covariates"``.
    batch_size : int, optional
        Yield ready batches of this many rows instead of single rows.
    shuffle : bool
        Shuffle the order of work units and of rows inside each (a chunk-level shuffle,
        not a global one: reads stay sequential), reproducibly from ``seed`` and the
        epoch (:meth:`set_epoch`; with ``persistent_workers=True`` the workers keep the
        epoch they started with).
    seed : int
    unit_rows : int, optional
        Store rows per work unit (default: aligned with the models' chunks).
    """

    def __init__(
        self,
        fusion: Fusion,
        *,
        labels: bool = False,
        covariates: pd.DataFrame | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        unit_rows: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be positive or None, got {batch_size}")
        self.fusion = fusion
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        rows = fusion.rows
        unit = int(unit_rows) if unit_rows else fusion.chunk_rows()
        if unit < 1:
            raise UsageError(f"unit_rows must be positive, got {unit_rows}")
        if rows.size:
            bounds = np.flatnonzero(np.diff(rows // unit)) + 1
            self.units: list[np.ndarray] = [u for u in np.split(np.arange(rows.size), bounds)]
        else:
            self.units = []
        store = fusion.store
        self.label_names: list[str] = list(store.labels) if labels else []
        self._labels = store.label_matrix(rows) if labels else None
        self.covariate_names: list[str] = []
        self._cov: np.ndarray | None = None
        if covariates is not None:
            numeric = covariates.select_dtypes(include=["number", "bool"])
            dropped = [c for c in covariates.columns if c not in numeric.columns]
            if dropped:
                raise UsageError(f"covariates must be numeric; columns {dropped} are not (encode them first)")
            aligned = numeric.reindex(pd.Index(rows))
            self.covariate_names = [str(c) for c in numeric.columns]
            self._cov = aligned.to_numpy(dtype=np.float32, na_value=np.nan)
        # the parent's store handle is not inherited: each worker opens its own
        fusion._store = None

    @classmethod
    def from_store(
        cls,
        store: Store | str | os.PathLike[str],
        models: str | Sequence[str],
        *,
        where: Where = None,
        normalize: bool | Mapping[str, bool] = True,
        pca: PcaSpec | Mapping[str, PcaSpec] = None,
        view: str | Mapping[str, str] = "flat",
        missing: Missing = "drop",
        labels: bool = False,
        clinical: str | os.PathLike[str] | pd.DataFrame | None = None,
        join_on: JoinOn = "patient_id",
        covariates: Sequence[str] | None = None,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> FusedVectorDataset:
        """Plan a fusion (:func:`fuse`) and, optionally, a clinical join, then wrap them.

        ``covariates`` names numeric clinical columns to yield (all numeric clinical
        columns when ``clinical`` is given and ``covariates`` is None). Pass ``pca`` as
        stored PCA names to reuse a transform, or a number to fit one now.
        """
        fusion = fuse(store, models, where=where, normalize=normalize, pca=pca, view=view, missing=missing)
        cov = None
        if clinical is not None:
            table = read_clinical(clinical, key=join_on)
            meta = fusion.store.metadata(fusion.rows)
            joined, report = join_clinical(meta, table, on=join_on, columns=covariates)
            cov = joined if covariates is None else joined[[c if c in joined.columns else f"clinical_{c}" for c in covariates]]
            if covariates is None:
                cov = cov.select_dtypes(include=["number", "bool"])
            logger.info("clinical covariates: %d of %d rows matched", report.matched, report.rows)
        elif covariates is not None:
            raise UsageError("covariates need a clinical table (clinical=...)")
        return cls(fusion, labels=labels, covariates=cov, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        """Rows (per-row mode) or batches (``batch_size`` mode) over all workers."""
        if self.batch_size is None:
            return len(self.fusion)
        return sum(-(-u.size // self.batch_size) for u in self.units)

    @property
    def dim(self) -> int:
        return self.fusion.dim

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order (call before each epoch when ``shuffle``)."""
        self.epoch = int(epoch)

    def _my_units(self) -> list[np.ndarray]:
        units = list(self.units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        info = get_worker_info()
        if info is None:
            return units
        return units[info.id :: info.num_workers]

    def _pack(self, pos: np.ndarray, x: np.ndarray) -> dict[str, Any]:
        item: dict[str, Any] = {"x": torch.from_numpy(np.ascontiguousarray(x)), "row": torch.from_numpy(self.fusion.rows[pos])}
        if self._labels is not None:
            item["labels"] = torch.from_numpy(self._labels[pos])
        if self._cov is not None:
            item["covariates"] = torch.from_numpy(self._cov[pos])
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self.fusion.rows
        rng = np.random.default_rng([self.seed, self.epoch, 1]) if self.shuffle else None
        for unit in self._my_units():
            x = self.fusion.read(rows[unit])
            order = rng.permutation(unit.size) if rng is not None else np.arange(unit.size)
            if self.batch_size is None:
                labels = self._labels[unit] if self._labels is not None else None
                cov = self._cov[unit] if self._cov is not None else None
                rr = rows[unit]
                for i in order:
                    item: dict[str, Any] = {"x": torch.from_numpy(x[i]), "row": torch.tensor(rr[i])}
                    if labels is not None:
                        item["labels"] = torch.from_numpy(labels[i])
                    if cov is not None:
                        item["covariates"] = torch.from_numpy(cov[i])
                    yield item
            else:
                for start in range(0, unit.size, self.batch_size):
                    take = order[start : start + self.batch_size]
                    yield self._pack(unit[take], x[take])
