"""Selections: the store as queries.

A :class:`Selection` is a sorted set of committed row numbers of one store, optionally
tied to a model (then only rows where that model's vector is committed are kept).
Everything downstream (search, classify, cluster, export) takes a selection and reads
its vectors with :meth:`Selection.iter_vectors`, a batch of consecutive chunks per read:
memory stays bounded by about two batches (or two stored chunks), whatever the store's
size.

Metadata (a few columns per row) is read whole for filtering: 377,000 rows of metadata
take tens of MB, where their vectors take tens of GB.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import pandas as pd

from cxrstore.errors import UsageError

if TYPE_CHECKING:
    from cxrstore.store.store import Store

#: A metadata filter: a pandas query string (``"sex == 'F' and age >= 40"``), a mapping of
#: column to a value (equality) or to a list of values (membership), or ``None`` (all rows).
Where = Union[str, Mapping[str, Any], None]

DEFAULT_BATCH_ROWS = 4096


class Selection:
    """Rows of a store chosen by a filter, read as metadata or streamed as vectors.

    Do not build directly; use :meth:`Store.select` / :func:`select`.
    """

    def __init__(self, store: Store, rows: np.ndarray, model: str | None) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.model = model

    def __len__(self) -> int:
        return int(self.rows.size)

    def __repr__(self) -> str:
        return f"Selection({len(self)} rows of {self.store.path}, model={self.model!r})"

    def metadata(self) -> pd.DataFrame:
        """Metadata and labels of the selected rows (index: row number)."""
        return self.store.metadata(self.rows)

    def labels(self) -> pd.DataFrame:
        """Labels of the selected rows: 1.0, 0.0 or NaN (index: row number)."""
        values = self.store.label_matrix(self.rows)
        return pd.DataFrame(values, columns=list(self.store.labels), index=pd.Index(self.rows, name="row"))

    def groups(self) -> np.ndarray:
        """Group id of each selected row, for grouped cross-validation and sampling.

        The row's ``patient_id``; a row without one is its own group (its source row's
        image id for an augmented variant, so a variant never leaves its source's group).
        """
        patients = np.array([str(p) for p in self.store.column("patient_id", self.rows)], dtype=object)
        missing = patients == ""
        if missing.any():
            source = self.store.column("source_row", self.rows[missing])
            own = np.where(source >= 0, source, self.rows[missing])
            patients[missing] = np.array([f"row:{r}" for r in own], dtype=object)
        return patients

    def subset(self, rows: Sequence[int] | np.ndarray) -> Selection:
        """A selection of some of these rows (row numbers, not positions)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        missing = np.setdiff1d(rows, self.rows)
        if missing.size:
            raise UsageError(f"rows {missing[:5].tolist()} are not in this selection")
        return Selection(self.store, rows, self.model)

    def _model(self, model: str | None) -> str:
        model = model or self.model
        if model is None:
            raise UsageError("no model given: pass model= to select() or to this call")
        self.store._check_model(model)
        if model != self.model:
            present = self.store.present(model, self.rows)
            if not present.all():
                raise UsageError(
                    f"{int((~present).sum())} selected rows have no {model!r} vector; select with model={model!r}"
                )
        return model

    def iter_vectors(
        self,
        model: str | None = None,
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        dtype: str = "float32",
        view: Literal["flat", "mean"] = "flat",
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(rows, vectors)`` batches in row order.

        Parameters
        ----------
        model : str, optional
            Model to read; defaults to the selection's model.
        batch_rows : int
            Largest batch yielded. Memory used is about two batches (or two stored chunks,
            whichever is larger).
        dtype : str
            dtype of the yielded vectors (float16 storage is upcast by default).
        view : {"flat", "mean"}
            ``"flat"``: the stored vectors. ``"mean"``: the mean over the first axis of
            the model's native shape (``[32, 768]`` gives 768 values), computed per
            batch; refused for a model with a one-axis native shape. See
            :mod:`cxrstore.store.views`.

        Yields
        ------
        rows : ndarray of int64, shape (b,)
        vectors : ndarray, shape (b, dim) (``(b, view dim)`` for ``"mean"``)
        """
        from cxrstore.store.views import apply_view, model_view_dim, native_shape

        name = self._model(model)
        if batch_rows < 1:
            raise UsageError(f"batch_rows must be positive, got {batch_rows}")
        model_view_dim(self.store, name, view)  # validates the view for this model
        shape = native_shape(self.store, name) if view != "flat" else ()
        arr = self.store.vectors_array(name)
        chunk = arr.chunks[0]
        rows = self.rows
        if rows.size == 0:
            return
        chunk_ids = rows // chunk
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [rows.size]])
        # one read spans consecutive chunks up to a batch (or one chunk): zarr reads chunk
        # by chunk either way, but each call has a fixed cost (24,576-d, 32-row chunks:
        # 1.0 GB/s a chunk a call, 1.8 GB/s a batch a call)
        span_cap = max(batch_rows, chunk)
        pending_rows: list[np.ndarray] = []
        pending_vecs: list[np.ndarray] = []
        pending = 0

        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        i = 0
        while i < starts.size:
            lo = int(rows[starts[i]])
            j = i
            while j + 1 < starts.size and int(rows[ends[j + 1] - 1]) + 1 - lo <= span_cap:
                j += 1
            seg = rows[starts[i] : ends[j]]
            hi = int(seg[-1]) + 1
            i = j + 1
            block = np.asarray(arr[lo:hi])
            vecs = block if hi - lo == seg.size else block[seg - lo]
            vecs = vecs.astype(dtype, copy=False)
            start = 0
            while start < seg.size:
                take = min(seg.size - start, batch_rows - pending)
                pending_rows.append(seg[start : start + take])
                pending_vecs.append(vecs[start : start + take])
                pending += take
                start += take
                if pending == batch_rows:
                    yield joined(pending_rows), apply_view(joined(pending_vecs), view, shape, dtype=dtype)
                    pending_rows, pending_vecs, pending = [], [], 0
        if pending:
            yield joined(pending_rows), apply_view(joined(pending_vecs), view, shape, dtype=dtype)

    def vectors(
        self, model: str | None = None, *, dtype: str = "float32", view: Literal["flat", "mean"] = "flat"
    ) -> np.ndarray:
        """All selected vectors in one array (``len(self) x dim``): for small selections.

        ``view="mean"`` gives the mean over the first axis of the native shape (see
        :meth:`iter_vectors`).
        """
        from cxrstore.store.views import model_view_dim

        name = self._model(model)
        dim = model_view_dim(self.store, name, view)
        out = np.empty((len(self), dim), dtype=dtype)
        pos = 0
        for _, vecs in self.iter_vectors(name, dtype=dtype, view=view):
            out[pos : pos + len(vecs)] = vecs
            pos += len(vecs)
        return out


def select(
    store: Store,
    *,
    where: Where = None,
    model: str | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
) -> Selection:
    """Choose committed rows of ``store``.

    Parameters
    ----------
    store : Store
    where : str, mapping or None
        A pandas query over metadata columns and labels (label columns hold 1.0, 0.0 or
        NaN; quote names with spaces in backticks), or a mapping of column to a value or
        a list of values.
    model : str, optional
        Keep only rows where this model's vector is committed; the selection then reads
        this model's vectors by default.
    rows : sequence of int, optional
        Start from these row numbers instead of all rows.

    Returns
    -------
    Selection
    """
    n = store.n_rows
    if rows is None:
        chosen = np.arange(n, dtype=np.int64)
    else:
        chosen = np.unique(np.asarray(rows, dtype=np.int64))
        if chosen.size and (chosen[0] < 0 or chosen[-1] >= n):
            raise UsageError(f"row numbers must lie in [0, {n}) for store {store.path}")
    if model is not None:
        chosen = chosen[store.present(model, chosen)]
    if where is not None and chosen.size:
        chosen = chosen[_where_mask(store, chosen, where)]
    return Selection(store, chosen, model)


def _where_mask(store: Store, rows: np.ndarray, where: Where) -> np.ndarray:
    if isinstance(where, str):
        meta = store.metadata(rows)
        try:
            result = meta.eval(where, engine="python")
        except Exception as exc:  # pandas raises many types for a bad expression
            raise UsageError(
                f"bad filter {where!r}: {exc}. Columns: {', '.join(meta.columns)} "
                "(quote names with spaces in backticks)"
            ) from None
        if not isinstance(result, pd.Series) or result.dtype != bool:
            raise UsageError(f"filter {where!r} must give True/False per row, e.g. \"sex == 'F' and age >= 40\"")
        return result.to_numpy()
    if isinstance(where, Mapping):
        mask = np.ones(rows.size, dtype=bool)
        labels = list(store.labels)
        for key, value in where.items():
            if key in labels:
                values: np.ndarray = store.label_matrix(rows)[:, labels.index(key)]
            elif key in store.columns:
                values = store.column(key, rows)
            else:
                raise UsageError(f"unknown filter column {key!r}; columns: {', '.join(store.columns + store.labels)}")
            if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
                mask &= np.isin(values, list(value))
            else:
                mask &= values == value
        return mask
    raise UsageError(f"where must be a query string or a mapping, not {type(where).__name__}")
