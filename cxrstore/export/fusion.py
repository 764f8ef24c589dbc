"""Fusion: several models' vectors per row, each transformed, concatenated.

A :class:`Fusion` is a *plan*: which committed rows (a selection), which models, and per
model a view, an optional L2 normalisation and an optional PCA. It reads nothing until
asked: :meth:`Fusion.iter_batches` streams fused batches in row order (memory: one stored
chunk per model plus one batch), :meth:`Fusion.read` reads the fused vectors of given rows.
A plan is picklable and opens the store lazily in each process, so PyTorch ``DataLoader``
workers can share it.

Per model, in this order:

1. **view**: how the stored (flattened) vector is presented, one of
   :data:`cxrstore.store.views.VIEWS`: ``"flat"`` (the stored vector as is) or ``"mean"``
   (ELIXR's 32 x 768 tokens averaged to 768 values). A PCA records the view it was
   fitted on.
2. **normalize**: divide by the L2 norm (zero vectors stay zero).
3. **pca**: project with a stored PCA transform (:class:`PcaTransform`), fitted by
   :func:`fit_pca` with sklearn ``IncrementalPCA.partial_fit`` streamed over batches, on a
   named subset of rows, and saved in the store (``results/pca/<name>``) with its
   parameters, so the same transform applies to rows added later.

Rows missing one of the models are dropped (``missing="drop"``, reported in
:attr:`Fusion.report`) or refused (``missing="error"``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args

import numpy as np

from cxrstore import __version__
from cxrstore.errors import StoreError, UsageError
from cxrstore.store.results import load_result, save_result
from cxrstore.store.selection import DEFAULT_BATCH_ROWS, Where, select
from cxrstore.store.store import Store
from cxrstore.store.views import apply_view, check_view, model_view_dim, native_shape

logger = logging.getLogger(__name__)

Missing = Literal["drop", "error"]
MISSING_CHOICES: tuple[str, ...] = get_args(Missing)

#: PCA kinds saved with :func:`cxrstore.store.results.save_result`.
PCA_KIND = "pca"

#: What ``pca=`` accepts per model: a number of components (fit now), the name of a stored
#: PCA result, a loaded transform, or None (no PCA).
PcaSpec = Union[int, str, "PcaTransform", None]




# -- pure compute --------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Rows divided by their L2 norm (float32; all-zero rows stay zero).

    ``out`` (same shape, float32) receives the result when given.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UsageError(f"l2_normalize expects a 2-D array, got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    np.maximum(norms, np.float32(1e-12), out=norms)
    return np.divide(x, norms[:, None], out=out)


def rebatch(batches: Iterable[np.ndarray], min_rows: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of 2-D batches so that every batch has at least ``min_rows`` rows.

    Small batches are merged with the next; a small last batch is merged with the previous
    one. (``IncrementalPCA.partial_fit`` needs at least ``n_components`` rows a batch.)
    Memory: at most two batches.
    """
    held: np.ndarray | None = None
    pending: list[np.ndarray] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        if count >= min_rows:
            if held is not None:
                yield held
            held = np.concatenate(pending) if len(pending) > 1 else pending[0]
            pending, count = [], 0
    if pending:
        tail = np.concatenate(pending)
        held = tail if held is None else np.concatenate([held, tail])
    if held is not None:
        yield held


def fit_incremental_pca(batches: Iterable[np.ndarray], n_components: int) -> Any:
    """Fit sklearn ``IncrementalPCA`` by ``partial_fit`` over a stream of batches.

    Parameters
    ----------
    batches : iterable of ndarray (b, dim)
        Streamed; memory stays at about two batches plus the model.
    n_components : int

    Returns
    -------
    sklearn.decomposition.IncrementalPCA
        Fitted; ``n_samples_seen_`` says how many rows.

    Raises
    ------
    UsageError
        If fewer rows than ``n_components`` were streamed.
    """
    from sklearn.decomposition import IncrementalPCA

    if n_components < 1:
        raise UsageError(f"PCA n_components must be positive, got {n_components}")
    ipca = IncrementalPCA(n_components=n_components)
    seen = 0
    for batch in rebatch(batches, n_components):
        if len(batch) < n_components:
            raise UsageError(f"PCA with {n_components} components needs at least {n_components} rows; the fit subset has {seen + len(batch)}")
        ipca.partial_fit(np.asarray(batch, dtype=np.float64))
        seen += len(batch)
    if seen == 0:
        raise UsageError(f"PCA with {n_components} components: the fit subset has no rows")
    return ipca


@dataclasses.dataclass(frozen=True, eq=False)
class PcaTransform:
    """A fitted PCA projection, as stored in ``STORE/results/pca/<name>``.

    ``transform(x) = (x - mean) @ components.T`` (no whitening), applied after the view
    and, when ``normalized`` is true, after L2 normalisation (as it was fitted).
    """

    name: str
    model: str
    n_components: int
    mean: np.ndarray
    components: np.ndarray
    normalized: bool
    view: str
    fitted_rows: int
    explained_variance_ratio: np.ndarray
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dim_in(self) -> int:
        return int(self.components.shape[1])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project ``(b, dim_in)`` vectors to ``(b, n_components)`` float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise UsageError(f"PCA {self.name!r} expects vectors of dimension {self.dim_in}, got shape {x.shape}")
        return ((x - self.mean) @ self.components.T).astype(np.float32, copy=False)


def _pca_from_sklearn(ipca: Any, *, name: str, model: str, normalized: bool, view: str, params: Mapping[str, Any]) -> PcaTransform:
    return PcaTransform(
        name=name,
        model=model,
        n_components=int(ipca.n_components_),
        mean=np.asarray(ipca.mean_, dtype=np.float32),
        components=np.asarray(ipca.components_, dtype=np.float32),
        normalized=normalized,
        view=view,
        fitted_rows=int(ipca.n_samples_seen_),
        explained_variance_ratio=np.asarray(ipca.explained_variance_ratio_, dtype=np.float64),
        params=dict(params),
    )


def _where_json(where: Where) -> Any:
    if where is None or isinstance(where, str):
        return where
    return {str(k): (list(v) if isinstance(v, (list, tuple, set, frozenset, np.ndarray)) else v) for k, v in where.items()}


def _as_store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _prepared_batches(store: Store, model: str, rows: np.ndarray, *, view: str, normalize: bool, batch_rows: int) -> Iterator[np.ndarray]:
    for _, x in select(store, rows=rows).iter_vectors(model, batch_rows=batch_rows, view=view):
        yield l2_normalize(x) if normalize else x


def fit_pca(
    store: Store | str | os.PathLike[str],
    model: str,
    *,
    n_components: int,
    where: Where = None,
    rows: Sequence[int] | np.ndarray | None = None,
    normalize: bool = True,
    view: str = "flat",
    name: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> PcaTransform:
    """Fit a PCA of ``model``'s vectors on a subset, streamed, and save it in the store.

    Parameters
    ----------
    store : Store or path
    model : str
    n_components : int
    where : str or mapping, optional
        The fit subset (rows where ``model`` is present and the filter holds); all rows
        with the model when None.
    rows : sequence of int, optional
        Restrict the fit subset to these row numbers.
    normalize : bool
        L2-normalise each vector before fitting (and therefore before applying).
    view : str
        The view the PCA is fitted on (see :mod:`cxrstore.store.views`).
    name : str, optional
        The stored result's name; default ``"<model>-pca<n_components>"``.
    batch_rows : int
        Rows per ``partial_fit`` batch (at least ``n_components``; a short last batch is
        merged with the one before). Memory: about two batches.

    Returns
    -------
    PcaTransform
        Also written to ``STORE/results/pca/<name>/``: arrays ``mean``, ``components``,
        ``explained_variance``, ``explained_variance_ratio``, ``singular_values``,
        ``rows`` (the fitted row numbers); params ``model``, ``n_components``,
        ``where``, ``normalize``, ``view``, ``fitted_rows``, ``dim``, ``batch_rows``.
    """
    st = _as_store(store)
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise UsageError(f"n_components must be a positive integer, got {n_components!r}")
    sel = select(st, where=where, model=model, rows=rows)
    dim_in = model_view_dim(st, model, view)
    if n_components > dim_in:
        raise UsageError(f"n_components={n_components} exceeds the dimension {dim_in} of model {model!r}")
    if len(sel) < n_components:
        raise UsageError(
            f"PCA of {model!r} with {n_components} components needs at least {n_components} rows; "
            f"the fit subset (where={where!r}) has {len(sel)}"
        )
    batch_rows = max(int(batch_rows), int(n_components))
    ipca = fit_incremental_pca(_prepared_batches(st, model, sel.rows, view=view, normalize=normalize, batch_rows=batch_rows), int(n_components))
    name = name or f"{model}-pca{int(n_components)}"
    params = {
        "model": model,
        "n_components": int(n_components),
        "where": _where_json(where),
        "rows_given": rows is not None,
        "normalize": bool(normalize),
        "view": view,
        "fitted_rows": int(ipca.n_samples_seen_),
        "dim": int(dim_in),
        "batch_rows": batch_rows,
        "method": "sklearn.decomposition.IncrementalPCA.partial_fit",
    }
    summary = {
        "explained_variance_ratio_total": float(np.sum(ipca.explained_variance_ratio_)),
        "fitted_rows": int(ipca.n_samples_seen_),
    }
    save_result(
        st,
        PCA_KIND,
        name,
        params=params,
        summary=summary,
        arrays={
            "mean": np.asarray(ipca.mean_, dtype=np.float64),
            "components": np.asarray(ipca.components_, dtype=np.float64),
            "explained_variance": np.asarray(ipca.explained_variance_, dtype=np.float64),
            "explained_variance_ratio": np.asarray(ipca.explained_variance_ratio_, dtype=np.float64),
            "singular_values": np.asarray(ipca.singular_values_, dtype=np.float64),
            "rows": sel.rows,
        },
    )
    logger.info("fitted PCA %s of %s on %d rows (%.3f of the variance)", name, model, ipca.n_samples_seen_, summary["explained_variance_ratio_total"])
    return _pca_from_sklearn(ipca, name=name, model=model, normalized=bool(normalize), view=view, params=params)


def load_pca(store: Store | str | os.PathLike[str], name: str) -> PcaTransform:
    """Load a PCA transform saved by :func:`fit_pca` (``STORE/results/pca/<name>``)."""
    res = load_result(store, PCA_KIND, name)
    p = res.params
    return PcaTransform(
        name=name,
        model=str(p["model"]),
        n_components=int(p["n_components"]),
        mean=res.array("mean").astype(np.float32),
        components=res.array("components").astype(np.float32),
        normalized=bool(p["normalize"]),
        view=str(p.get("view", "flat")),
        fitted_rows=int(p["fitted_rows"]),
        explained_variance_ratio=res.array("explained_variance_ratio"),
        params=dict(p),
    )


# -- the fusion plan -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ModelBlock:
    """One model's place in the fused vector: columns ``start:stop``."""

    model: str
    view: str
    normalize: bool
    pca: PcaTransform | None
    dim_in: int
    native_shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def dim(self) -> int:
        return self.stop - self.start

    def transform(self, raw: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Stored vectors ``(b, stored dim)`` to this block's ``(b, dim)`` float32 (into ``out`` if given)."""
        x = apply_view(np.asarray(raw, dtype=np.float32), self.view, self.native_shape)
        if self.normalize and self.pca is None:
            return l2_normalize(x, out=out)
        if self.normalize:
            x = l2_normalize(x)
        if self.pca is not None:
            x = self.pca.transform(x)
        x = np.asarray(x, dtype=np.float32)
        if out is not None:
            out[...] = x
            return out
        return x

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "view": self.view,
            "normalize": self.normalize,
            "pca": None if self.pca is None else {"name": self.pca.name, "n_components": self.pca.n_components, "fitted_rows": self.pca.fitted_rows, "where": self.pca.params.get("where")},
            "dim_in": self.dim_in,
            "dim": self.dim,
            "start": self.start,
            "stop": self.stop,
        }


@dataclasses.dataclass
class MissingReport:
    """Rows of the selection without one of the models, and what was done about them."""

    selected: int
    kept: int
    policy: str
    missing: dict[str, np.ndarray]
    image_ids: dict[str, np.ndarray]

    @property
    def dropped(self) -> int:
        return self.selected - self.kept

    def to_json(self, *, limit: int = 20) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "kept": self.kept,
            "dropped": self.dropped,
            "policy": self.policy,
            "missing": {
                m: {"count": int(r.size), "rows": r[:limit].tolist(), "image_ids": [str(i) for i in self.image_ids[m][:limit]]}
                for m, r in self.missing.items()
            },
        }


class Fusion:
    """A planned fusion of several models over committed rows. Build with :func:`fuse`.

    Attributes
    ----------
    store_path : Path
    rows : ndarray of int64
        The fused rows (sorted store row numbers), after dropping rows missing a model.
    blocks : list of ModelBlock
    report : MissingReport
    generation : int
        The store generation the plan was made on (later commits are not read).
    """

    def __init__(self, store: Store, rows: np.ndarray, blocks: list[ModelBlock], report: MissingReport, where: Where) -> None:
        self.store_path = Path(store.path)
        self.generation = store.generation
        self.rows = np.asarray(rows, dtype=np.int64)
        self.blocks = blocks
        self.report = report
        self.where = where
        self._store: Store | None = store
        self._pid = os.getpid()

    # pickling: the store handle stays behind; each process opens its own
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def store(self) -> Store:
        """The store, opened lazily in this process (DataLoader workers open their own)."""
        if self._store is None or self._pid != os.getpid():
            self._store = Store(self.store_path)
            self._pid = os.getpid()
            if self._store.generation < self.generation:
                raise StoreError(f"{self.store_path}: store generation {self._store.generation} is older than the plan's {self.generation}")
        return self._store

    def __len__(self) -> int:
        return int(self.rows.size)

    def __repr__(self) -> str:
        return f"Fusion({len(self)} rows x {self.dim} of {self.store_path}, models={self.models})"

    @property
    def models(self) -> list[str]:
        return [b.model for b in self.blocks]

    @property
    def dim(self) -> int:
        return self.blocks[-1].stop if self.blocks else 0

    def column_names(self) -> list[str]:
        """``"<model>:<i>"`` for each fused column."""
        return [f"{b.model}:{i}" for b in self.blocks for i in range(b.dim)]

    def chunk_rows(self) -> int:
        """Store rows per work unit aligned with every model's chunks (for sharding)."""
        sizes = [int(self.store.vectors_array(b.model).chunks[0]) for b in self.blocks]
        unit = math.lcm(*sizes) if sizes else DEFAULT_BATCH_ROWS
        return unit if unit <= 1 << 16 else max(sizes)

    def _fuse(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        if len(self.blocks) == 1:
            return np.ascontiguousarray(self.blocks[0].transform(parts[0]))
        out = np.empty((n, self.dim), dtype=np.float32)
        for block, raw in zip(self.blocks, parts):
            block.transform(raw, out=out[:, block.start : block.stop])
        return out

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Fused vectors of ``rows`` (sorted store row numbers of this plan), ``(len, dim)``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if np.any(np.diff(rows) <= 0):
            raise UsageError("rows must be sorted and unique")
        sel = select(self.store, rows=rows)
        parts = [np.concatenate([v for _, v in sel.iter_vectors(b.model, batch_rows=rows.size)]) for b in self.blocks]
        return self._fuse(parts, rows.size)

    def iter_batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(rows, fused)`` in row order, ``fused`` of shape ``(b, dim)`` float32.

        Memory: about two batches (or two stored chunks) per model, whatever the selection's size.
        """
        if batch_rows < 1:
            raise UsageError(f"batch_rows must be positive, got {batch_rows}")
        if self.rows.size == 0:
            return
        sel = select(self.store, rows=self.rows)
        streams = [sel.iter_vectors(b.model, batch_rows=batch_rows) for b in self.blocks]
        for items in zip(*streams):
            rows = items[0][0]
            for r, _ in items[1:]:
                if not np.array_equal(r, rows):  # cannot happen: same rows, same batch size
                    raise StoreError("internal error: model streams are not aligned")
            yield rows, self._fuse([v for _, v in items], rows.size)

    def to_array(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> np.ndarray:
        """All fused vectors in memory (for small selections)."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        pos = 0
        for _, x in self.iter_batches(batch_rows):
            out[pos : pos + len(x)] = x
            pos += len(x)
        return out

    def params(self) -> dict[str, Any]:
        """The fusion's parameters (JSON-serialisable): written with every export."""
        return {
            "store": str(self.store_path),
            "store_generation": self.generation,
            "models": self.models,
            "where": _where_json(self.where),
            "missing": self.report.policy,
            "n_rows": len(self),
            "dim": self.dim,
            "blocks": [b.to_json() for b in self.blocks],
            "cxrstore_version": __version__,
        }

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)


def _per_model(value: Any, models: Sequence[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in models]
        if unknown:
            raise UsageError(f"{what} names model(s) {unknown} that are not among the fused models {list(models)}")
        return {m: value.get(m, None) for m in models}
    return {m: value for m in models}


def _parse_models(models: str | Sequence[str]) -> list[str]:
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    models = list(models)
    if not models:
        raise UsageError("no models given: name at least one model, e.g. models=['baseline']")
    if len(set(models)) != len(models):
        raise UsageError(f"models are repeated: {models}")
    return models


def fuse(
    store: Store | str | os.PathLike[str],
    models: str | Sequence[str],
    *,
    where: Where = None,
    rows: Sequence[int] | np.ndarray | None = None,
    normalize: bool | Mapping[str, bool] = True,
    pca: PcaSpec | Mapping[str, PcaSpec] = None,
    pca_fit_where: Where = None,
    pca_name: str | None = None,
    view: str | Mapping[str, str] = "flat",
    missing: Missing = "drop",
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Fusion:
    """Plan the fusion of ``models`` over the rows chosen by ``where``.

    Parameters
    ----------
    store : Store or path
    models : str or sequence of str
        Models to concatenate, in this order (``"a,b"`` accepted).
    where : str or mapping, optional
        Row filter (see :func:`cxrstore.store.selection.select`).
    rows : sequence of int, optional
        Start from these row numbers.
    normalize : bool or mapping model -> bool
        L2-normalise each model's vectors (before PCA).
    pca : int, str, PcaTransform, None, or a mapping model -> one of these
        An int fits a PCA with that many components now (streamed, see :func:`fit_pca`)
        on ``pca_fit_where`` and saves it in the store; a str loads a stored PCA by name;
        None: no PCA.
    pca_fit_where : str or mapping, optional
        The subset a new PCA is fitted on: rows of the store where the model is present
        and this filter holds. None: the fused rows themselves.
    pca_name : str, optional
        Name to save a new PCA under (with several models, ``"<pca_name>-<model>"``);
        default ``"<model>-pca<n>"``.
    view : str or mapping model -> str
        ``"flat"`` or ``"mean"`` (see :mod:`cxrstore.store.views`).
    missing : {"drop", "error"}
        What to do with selected rows that lack a model's vector: drop them (reported in
        :attr:`Fusion.report`), or raise :class:`UsageError` naming how many and which.
    batch_rows : int
        Batch size of a PCA fit.

    Returns
    -------
    Fusion
    """
    st = _as_store(store)
    models = _parse_models(models)
    if missing not in MISSING_CHOICES:
        raise UsageError(f"missing={missing!r} is not valid; choose one of {', '.join(MISSING_CHOICES)}")
    for m in models:
        st._check_model(m)
    sel = select(st, where=where, rows=rows)
    keep = np.ones(len(sel), dtype=bool)
    missing_rows: dict[str, np.ndarray] = {}
    for m in models:
        present = st.present(m, sel.rows) if len(sel) else np.zeros(0, bool)
        missing_rows[m] = sel.rows[~present]
        keep &= present
    ids = {m: (st.column("image_id", r) if r.size else np.zeros(0, object)) for m, r in missing_rows.items()}
    report = MissingReport(selected=len(sel), kept=int(keep.sum()), policy=missing, missing=missing_rows, image_ids=ids)
    if missing == "error" and report.dropped:
        detail = "; ".join(
            f"{m}: {r.size} rows (e.g. {', '.join(str(i) for i in ids[m][:5])})" for m, r in missing_rows.items() if r.size
        )
        raise UsageError(f"{report.dropped} of {report.selected} selected rows lack a model's vector ({detail}); use missing='drop' to drop them")
    if report.dropped:
        logger.warning("fusion drops %d of %d rows missing a model: %s", report.dropped, report.selected,
                       ", ".join(f"{m} {r.size}" for m, r in missing_rows.items() if r.size))
    fused_rows = sel.rows[keep]
    norms = _per_model(normalize, models, "normalize")
    views = _per_model(view, models, "view")
    pcas = _per_model(pca, models, "pca")
    blocks: list[ModelBlock] = []
    start = 0
    for m in models:
        v = views[m] if views[m] is not None else "flat"
        shape = native_shape(st, m)
        dim_in = model_view_dim(st, m, check_view(v))
        norm = True if norms[m] is None else bool(norms[m])
        spec = pcas[m]
        transform: PcaTransform | None
        if spec is None:
            transform = None
        elif isinstance(spec, PcaTransform):
            transform = spec
        elif isinstance(spec, str):
            transform = load_pca(st, spec)
        elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            name = pca_name if (pca_name and len(models) == 1) else (f"{pca_name}-{m}" if pca_name else None)
            fit_rows = fused_rows if pca_fit_where is None else None
            transform = fit_pca(st, m, n_components=int(spec), where=pca_fit_where, rows=fit_rows, normalize=norm, view=v, name=name, batch_rows=batch_rows)
        else:
            raise UsageError(f"pca for {m!r} must be a number of components, a stored PCA name or None, not {spec!r}")
        if transform is not None:
            if transform.model != m:
                raise UsageError(f"PCA {transform.name!r} was fitted on model {transform.model!r}, not {m!r}")
            if transform.dim_in != dim_in or transform.view != v:
                raise UsageError(f"PCA {transform.name!r} expects view {transform.view!r} of dimension {transform.dim_in}; {m!r} has view {v!r} of dimension {dim_in}")
            if transform.normalized != norm:
                raise UsageError(
                    f"PCA {transform.name!r} was fitted with normalize={transform.normalized}; fuse {m!r} with normalize={transform.normalized} too"
                )
        out_dim = transform.n_components if transform is not None else dim_in
        blocks.append(ModelBlock(model=m, view=v, normalize=norm, pca=transform, dim_in=dim_in, native_shape=shape, start=start, stop=start + out_dim))
        start += out_dim
    return Fusion(st, fused_rows, blocks, report, where)
