"""Similar-image and similar-patient retrieval on a model's FAISS index.

:class:`Retriever` opens a store, the model's index (refusing a stale one, see
:mod:`cxrstore.index`) and the store's metadata once, then answers batches of queries:

- stored images (``image_ids``): the query image itself is never returned; the other
  images of its patient are excluded unless ``exclude_same_patient=False``;
- a patient (``patient_id``): each of the patient's images is a query; a candidate row's
  score is its best similarity to any of them (``hits`` counts how many retrieved it);
  the patient's own images are excluded by default;
- new image files (``images``): read, preprocessed and encoded with the model's recorded
  encoder configuration and preprocessing (its provenance), then searched;
- raw vectors (``vectors``).

Results are DataFrames, one row per (query, rank): ``query, rank, row, similarity`` then
the neighbour's metadata (``image_id, patient_id, study_id, dataset, view, sex, age``) and
labels. ``where`` restricts the neighbours (a pandas query or a mapping, as in
:func:`cxrstore.store.selection.select`); with an exact (Flat) index, filtered and
patient-excluded results are exact (FAISS ID selectors and over-fetching by the number
of excluded rows); with an approximate index, a filter keeping at most
``FLAT_MAX_COST / dim`` rows is searched exactly over those rows.

:func:`evaluate_retrieval` measures precision@k of neighbours sharing the query's label.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pandas as pd

from cxrstore.errors import UsageError
from cxrstore.index.faiss_index import (
    FLAT_MAX_COST,
    Device,
    LoadedIndex,
    load_index,
    normalise,
    omp_threads,
    query_threads,
)
from cxrstore.store.selection import Where
from cxrstore.store.store import Store

logger = logging.getLogger(__name__)

#: Metadata columns copied into result tables (labels follow).
RESULT_COLUMNS = ("image_id", "patient_id", "study_id", "dataset", "view", "sex", "age")
_QUERY_BATCH = 256


def _open(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    return int(k)


def encoder_from_provenance(provenance: dict[str, Any], **options: Any) -> Any:
    """Rebuild the encoder recorded in a model's provenance (see :func:`encoder_from_config`)."""
    from cxrstore.encoders.base import encoder_from_config

    return encoder_from_config(provenance["encoder"], **options)


class Retriever:
    """Search one model of a store: opens the index and metadata once.

    Parameters
    ----------
    store : Store or path
    model : str
    device : {"auto", "cpu", "gpu"}
        See :func:`cxrstore.index.load_index`.
    encoder_options : dict, optional
        Extra options to rebuild the model's encoder for image-file queries (``weights``).

    Raises
    ------
    StaleIndexError
        If the index is missing or does not cover the store's committed rows; the
        message names the command to run.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        model: str,
        *,
        device: Device = "auto",
        encoder_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = _open(store)
        self.model = model
        self.index: LoadedIndex = load_index(self.store, model, device=device)
        self.encoder_options = dict(encoder_options or {})
        self._encoder: Any = None
        meta = self.store.metadata()
        keep = [c for c in RESULT_COLUMNS if c in meta.columns] + list(self.store.labels)
        self.meta = meta[keep]
        self._columns = {name: self.meta[name].to_numpy() for name in keep}
        self.groups = self.store.select().groups()
        codes, uniques = pd.factorize(self.groups)
        self._group_code = codes
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self._group_rows = dict(zip(uniques, np.split(order.astype(np.int64), bounds))) if len(order) else {}
        ids = meta["image_id"].astype(str).to_numpy()
        variants = meta["variant"].astype(str).to_numpy()
        self._row_of: dict[str, int] = {}
        for r, (i, v) in enumerate(zip(ids, variants)):
            if v == "original" or i not in self._row_of:
                self._row_of[i] = r
        self._patient_ids = set(meta["patient_id"].astype(str))

    # -- lookups ------------------------------------------------------------------------
    def rows_of_images(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of stored image ids (the original variant)."""
        unknown = [str(i) for i in image_ids if str(i) not in self._row_of]
        if unknown:
            raise UsageError(f"image id {unknown[0]!r} is not in store {self.store.path}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        rows = np.asarray([self._row_of[str(i)] for i in image_ids], dtype=np.int64)
        covered = np.isin(rows, self.index.rows)
        if not covered.all():
            bad = [str(i) for i, ok in zip(image_ids, covered) if not ok]
            raise UsageError(f"images {bad[:5]} have no {self.model!r} vector")
        return rows

    def patient_rows(self, patient_id: str) -> np.ndarray:
        """The rows of one patient that have a vector of the model."""
        if str(patient_id) not in self._patient_ids:
            raise UsageError(f"patient id {patient_id!r} is not in store {self.store.path}")
        rows = self._group_rows.get(str(patient_id), np.zeros(0, np.int64))
        return np.intersect1d(rows, self.index.rows)

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(rows, return_inverse=True)
        vecs = self.store.select(model=self.model, rows=uniq).vectors()
        return vecs[inverse]

    def encode_images(self, images: Sequence[str | os.PathLike[str] | bytes]) -> np.ndarray:
        """Encode image files with the model's recorded encoder and preprocessing."""
        from cxrstore.io import PreprocessConfig, load_canonical

        prov = self.store.provenance(self.model)
        if self._encoder is None:
            self._encoder = encoder_from_provenance(prov, **self.encoder_options)
        config = PreprocessConfig.from_json(prov["preprocess"]) if "preprocess" in prov else PreprocessConfig()
        prepare = self._encoder.preparer()
        batch = [prepare(load_canonical(src, config)) for src in images]
        return np.asarray(self._encoder.forward(batch), dtype=np.float32)

    def allowed_rows(self, where: Where) -> np.ndarray | None:
        """Rows a ``where`` filter keeps among those the index covers (None: no filter)."""
        if where is None or (isinstance(where, str) and not where.strip()):
            return None
        rows = self.store.select(where=where, model=self.model).rows
        return np.intersect1d(rows, self.index.rows, assume_unique=True)

    # -- the core -----------------------------------------------------------------------
    def knn(
        self,
        queries: np.ndarray,
        *,
        k: int,
        allowed: np.ndarray | None = None,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest rows of raw query vectors.

        Parameters
        ----------
        queries : ndarray (n, dim)
        k : int
        allowed : ndarray of int64, optional
            Neighbours are restricted to these rows.
        exclude : sequence of ndarray, optional
            Per query, rows that must not be returned.

        Returns
        -------
        similarities : ndarray (n, k) float32, NaN where fewer than ``k`` neighbours exist
        rows : ndarray (n, k) int64, -1 there.
        """
        k = _check_k(k)
        q = self.index.prepare_queries(queries)
        n = q.shape[0]
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        pool = self.index.rows.size if allowed is None else allowed.size
        kk = min(k + extra, pool)
        if kk == 0 or n == 0:
            return np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64)
        dim = int(self.index.sidecar["dim"])
        if allowed is not None and (not self.index.supports_selector or (not self.index.exact and allowed.size * dim <= FLAT_MAX_COST)):
            d, i = self._exact_subset(q, kk, allowed)
        else:
            d, i = self.index.search(q, kk, allowed=allowed)
        if exclude is None and kk == k and (i >= 0).all():
            return d, i  # the common case: k results a query, nothing to drop
        sims = np.full((n, k), np.nan, np.float32)
        rows = np.full((n, k), -1, np.int64)
        for j in range(n):
            keep = i[j] >= 0
            if exclude is not None and len(exclude[j]):
                keep &= ~np.isin(i[j], exclude[j])
            found = np.flatnonzero(keep)[:k]
            sims[j, : found.size] = d[j, found]
            rows[j, : found.size] = i[j, found]
        return sims, rows

    def _exact_subset(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = faiss.IndexFlatIP(q.shape[1])
        for _, vecs in self.store.select(model=self.model, rows=allowed).iter_vectors():
            flat.add(normalise(vecs) if self.index.metric == "cosine" else np.ascontiguousarray(vecs, np.float32))
        with omp_threads(query_threads(len(q))):
            d, pos = flat.search(q, k)
        return d, np.where(pos >= 0, allowed[np.clip(pos, 0, None)], -1)

    def _table(self, labels: Sequence[str], sims: np.ndarray, rows: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        n, k = rows.shape
        flat_rows = rows.ravel()
        ok = flat_rows >= 0
        found = flat_rows[ok]
        data: dict[str, np.ndarray] = {
            "query": np.repeat(np.asarray(labels, dtype=object), k)[ok],
            "rank": np.tile(np.arange(1, k + 1), n)[ok],
            "row": found,
            "similarity": sims.ravel()[ok].astype(np.float64),
        }
        for name, values in (extra or {}).items():
            data[name] = values.ravel()[ok]
        for name, column in self._columns.items():
            data[name] = column[found]
        return pd.DataFrame(data, copy=False)

    # -- queries ------------------------------------------------------------------------
    def search_vectors(
        self, vectors: np.ndarray, *, k: int = 10, where: Where = None, names: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Neighbours of raw vectors (queries named ``q0, q1...`` unless ``names``)."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        names = list(names) if names is not None else [f"q{i}" for i in range(len(vectors))]
        sims, rows = self.knn(vectors, k=k, allowed=self.allowed_rows(where))
        return self._table(names, sims, rows)

    def search_image_ids(
        self, image_ids: Sequence[str], *, k: int = 10, where: Where = None, exclude_same_patient: bool = True
    ) -> pd.DataFrame:
        """Neighbours of stored images; the query image itself is never returned."""
        image_ids = [str(i) for i in ([image_ids] if isinstance(image_ids, str) else image_ids)]
        qrows = self.rows_of_images(image_ids)
        allowed = self.allowed_rows(where)
        parts = []
        for start in range(0, len(qrows), _QUERY_BATCH):
            batch = qrows[start : start + _QUERY_BATCH]
            if exclude_same_patient:
                exclude = [self._group_rows[self.groups[r]] for r in batch]
            else:
                exclude = [np.array([r], np.int64) for r in batch]
            sims, rows = self.knn(self.vectors_of(batch), k=k, allowed=allowed, exclude=exclude)
            parts.append(self._table(image_ids[start : start + _QUERY_BATCH], sims, rows))
        return pd.concat(parts, ignore_index=True)

    def search_patient(
        self, patient_id: str, *, k: int = 10, where: Where = None, exclude_same_patient: bool = True
    ) -> pd.DataFrame:
        """Rows most similar to any of a patient's images (best similarity; ``hits`` counts)."""
        k = _check_k(k)
        prow = self.patient_rows(patient_id)
        if prow.size == 0:
            raise UsageError(f"patient {patient_id!r} has no {self.model!r} vectors")
        exclude = [prow] * prow.size if exclude_same_patient else [np.array([r], np.int64) for r in prow]
        sims, rows = self.knn(self.vectors_of(prow), k=k, allowed=self.allowed_rows(where), exclude=exclude)
        ok = rows >= 0
        frame = pd.DataFrame({"row": rows[ok], "similarity": sims[ok]})
        agg = frame.groupby("row")["similarity"].agg(["max", "size"]).sort_values(["max"], ascending=False, kind="stable").head(k)
        top_rows = agg.index.to_numpy(np.int64)[None, :]
        return self._table([str(patient_id)], agg["max"].to_numpy(np.float32)[None, :], top_rows, {"hits": agg["size"].to_numpy()[None, :]})

    def search_images(
        self, images: Sequence[str | os.PathLike[str]], *, k: int = 10, where: Where = None
    ) -> pd.DataFrame:
        """Neighbours of new image files, encoded as the model was."""
        images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        vecs = self.encode_images(images)
        return self.search_vectors(vecs, k=k, where=where, names=[str(p) for p in images])


def search(
    store: Store | str | os.PathLike[str],
    *,
    model: str,
    image_id: str | Sequence[str] | None = None,
    patient_id: str | None = None,
    image: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    vectors: np.ndarray | None = None,
    k: int = 10,
    where: Where = None,
    exclude_same_patient: bool | None = None,
    device: Device = "auto",
    encoder_options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Search ``model``'s index of ``store`` by exactly one kind of query.

    Parameters
    ----------
    store : Store or path
    model : str
    image_id : str or list of str, optional
        Stored images as queries.
    patient_id : str, optional
        A patient's images as queries, aggregated (best similarity per neighbour).
    image : path or list of paths, optional
        New image files, encoded with the model's recorded encoder configuration.
    vectors : ndarray, optional
        Raw query vectors.
    k : int
        Neighbours per query.
    where : str or mapping, optional
        Filter on the neighbours' metadata and labels.
    exclude_same_patient : bool, optional
        Default: True for stored images and patients (not applicable to files/vectors).
    device : {"auto", "cpu", "gpu"}

    Returns
    -------
    pandas.DataFrame
        One row per (query, rank): ``query, rank, row, similarity``, (``hits`` for a
        patient), then the neighbour's metadata and labels.
    """
    given = [name for name, v in (("image_id", image_id), ("patient_id", patient_id), ("image", image), ("vectors", vectors)) if v is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of image_id, patient_id, image, vectors (got {', '.join(given) or 'none'})")
    retriever = Retriever(store, model, device=device, encoder_options=encoder_options)
    if image_id is not None:
        return retriever.search_image_ids(
            [image_id] if isinstance(image_id, str) else list(image_id), k=k, where=where,
            exclude_same_patient=True if exclude_same_patient is None else exclude_same_patient,
        )
    if patient_id is not None:
        return retriever.search_patient(
            patient_id, k=k, where=where, exclude_same_patient=True if exclude_same_patient is None else exclude_same_patient
        )
    if exclude_same_patient:
        raise UsageError("exclude_same_patient applies to stored images and patients, not to image files or vectors")
    if image is not None:
        return retriever.search_images([image] if isinstance(image, (str, os.PathLike)) else list(image), k=k, where=where)
    return retriever.search_vectors(np.asarray(vectors), k=k, where=where)


def precision_at_k(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> np.ndarray:
    """Per query, the fraction of its found neighbours whose label equals the query's.

    Parameters
    ----------
    query_labels : ndarray (n,)
    neighbour_labels : ndarray (n, k), NaN where no neighbour was found

    Returns
    -------
    ndarray (n,) float64; NaN for a query without neighbours.
    """
    found = ~np.isnan(neighbour_labels)
    same = (neighbour_labels == query_labels[:, None]) & found
    counts = found.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, same.sum(axis=1) / np.maximum(counts, 1), np.nan)


def evaluate_retrieval(
    store: Store | str | os.PathLike[str],
    *,
    model: str,
    label: str,
    k: int = 10,
    where: Where = None,
    exclude_same_patient: bool = True,
    max_queries: int | None = 2000,
    seed: int = 0,
    save: bool = True,
    device: Device = "auto",
) -> dict[str, Any]:
    """Precision@k of neighbours sharing the query's ``label``, over a selection.

    Queries are the selected rows whose label is known (a seeded sample of
    ``max_queries`` if more); neighbours are searched among the selected rows whose label
    is known, excluding the query's patient (or only the query image).

    Returns
    -------
    dict
        ``precision_at_k`` (mean over queries), ``precision_positive`` /
        ``precision_negative`` (over queries with label 1 / 0), ``chance`` (the mean,
        over queries, of the fraction of the pool sharing the query's label: what random
        neighbours would score), ``lift`` (precision / chance), ``n_queries``, ``k``...
        Saved as result ``retrieval/<model>-<label>-k<k>`` when ``save``.
    """
    k = _check_k(k)
    retriever = Retriever(store, model, device=device)
    st = retriever.store
    if label not in st.labels:
        raise UsageError(f"unknown label {label!r}; labels: {', '.join(st.labels) or 'none'}")
    t0 = time.perf_counter()
    values = retriever.meta[label].to_numpy(np.float64)
    base = retriever.allowed_rows(where)
    pool = retriever.index.rows if base is None else base
    pool = pool[~np.isnan(values[pool])]
    if pool.size < 2:
        raise UsageError(f"fewer than 2 selected rows have label {label!r}; nothing to evaluate")
    queries = pool
    if max_queries is not None and queries.size > max_queries:
        queries = np.sort(np.random.default_rng(seed).choice(queries, size=max_queries, replace=False))
    restrict = None if pool.size == retriever.index.rows.size else pool
    prec = np.empty(queries.size)
    pos_frac = float(values[pool].mean())
    for start in range(0, queries.size, _QUERY_BATCH):
        batch = queries[start : start + _QUERY_BATCH]
        exclude = [retriever._group_rows[retriever.groups[r]] if exclude_same_patient else np.array([r], np.int64) for r in batch]
        _, rows = retriever.knn(retriever.vectors_of(batch), k=k, allowed=restrict, exclude=exclude)
        nb = np.where(rows >= 0, values[np.clip(rows, 0, None)], np.nan)
        prec[start : start + batch.size] = precision_at_k(values[batch], nb)
    qv = values[queries]
    chance = np.where(qv == 1, pos_frac, 1 - pos_frac)
    summary = {
        "model": model,
        "label": label,
        "k": k,
        "n_queries": int(queries.size),
        "n_pool": int(pool.size),
        "precision_at_k": float(np.nanmean(prec)),
        "precision_positive": float(np.nanmean(prec[qv == 1])) if (qv == 1).any() else None,
        "precision_negative": float(np.nanmean(prec[qv == 0])) if (qv == 0).any() else None,
        "chance": float(chance.mean()),
        "lift": float(np.nanmean(prec) / chance.mean()) if chance.mean() > 0 else None,
        "exclude_same_patient": bool(exclude_same_patient),
        "index_factory": retriever.index.sidecar["factory"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if save:
        from cxrstore.store.results import save_result

        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}-{label}-k{k}")
        params = {"model": model, "label": label, "k": k, "where": where if not isinstance(where, dict) else dict(where),
                  "exclude_same_patient": exclude_same_patient, "max_queries": max_queries, "seed": seed,
                  "index_build": retriever.index.sidecar["build"]}
        per_query = pd.DataFrame({"row": queries, "label": qv, "precision": prec})
        result = save_result(st, "retrieval", name, params=params, summary=summary, tables={"per_query": per_query})
        summary["result_path"] = str(result.path)
    return summary


def demo_search(
    store: Store | str | os.PathLike[str], *, model: str = "baseline", k: int = 5, label: str | None = None
) -> dict[str, Any]:
    """What ``cxrstore demo`` shows of search: index, one query, one evaluation.

    Builds the model's index when absent (updates it when rows were added since), searches
    the neighbours of the store's first image (its patient excluded), and evaluates
    precision@k for ``label`` (default: the store's first label).

    Returns
    -------
    dict
        ``index`` (the sidecar), ``query`` (the image id), ``neighbours`` (the result
        DataFrame), ``evaluation`` (the :func:`evaluate_retrieval` summary, or None when
        the store has no labels).
    """
    from cxrstore.index import build_index, index_status, update_index

    st = _open(store)
    status = index_status(st, model)
    if not status.exists or status.needs_rebuild:
        side = build_index(st, model)
    else:
        side = update_index(st, model)
    st.refresh()
    query = str(st.column("image_id", np.array([0]))[0])
    neighbours = search(st, model=model, image_id=query, k=k)
    label = label or (st.labels[0] if st.labels else None)
    evaluation = evaluate_retrieval(st, model=model, label=label, k=k) if label else None
    return {"index": side, "query": query, "neighbours": neighbours, "evaluation": evaluation}
