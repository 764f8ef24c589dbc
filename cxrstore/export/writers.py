"""Export fused vectors with row ids, metadata, labels and the fusion parameters.

Formats (every one streamed: vectors are written batch by batch as they are read, so a
store larger than memory exports; what is held in memory is the per-row metadata table,
the clinical columns and, for AnnData, the kNN graph):

``npz``
    A NumPy ``.npz`` (zip of ``.npy``, uncompressed, zip64): ``X`` (rows x dim float32,
    streamed into its zip entry), ``row`` (store row numbers), ``obs/<column>`` for each
    metadata, label and clinical column (strings as unicode arrays), ``obs_columns`` (their
    order) and ``params`` (JSON). ``numpy.load(path)`` reads it without pickles.
``parquet``
    One Parquet table (pyarrow), one row group per streamed batch: ``row``, the metadata,
    label and clinical columns, and ``X`` as a ``fixed_size_list<float32>[dim]`` column.
    The fusion parameters are the schema metadata key ``cxrstore`` (JSON).
``h5``
    HDF5 (h5py): ``/X`` created with its full shape, then filled batch by batch; ``/row``;
    ``/obs/<column>`` (strings as UTF-8); attribute ``cxrstore`` (JSON) on the root and
    ``columns`` (JSON list) on ``/obs``.
``anndata``
    An ``.h5ad`` that ``anndata.read_h5ad`` and scanpy open directly: ``obs`` the metadata,
    labels and clinical columns (index: image id, made unique with the variant);
    ``obsm["X_<model>"]`` each model's (transformed) vectors; ``uns["cxrstore"]`` the
    parameters (JSON string). A stored kNN graph (a result of kind ``"knn"`` or
    ``"cluster"``, see :func:`find_graph`) goes to ``obsp["distances"]`` and
    ``obsp["connectivities"]`` (scipy CSR) with ``uns["neighbors"]`` as scanpy writes it,
    and stored UMAP coordinates to ``obsm["X_umap"]``. ``X`` is empty (no variables): the
    vectors live in ``obsm``; use ``sc.pp.neighbors(adata, use_rep="X_<model>")``.
    How it streams: anndata writes the skeleton (obs, uns, obsp, X_umap) from memory,
    then the ``obsm["X_<model>"]`` datasets are created in the file with h5py at their
    full shape (with anndata's encoding attributes) and filled batch by batch.

Every file is written to a temporary name beside ``out`` and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from cxrstore.errors import UsageError
from cxrstore.export.clinical import (
    ClinicalReport,
    JoinOn,
    Unmatched,
    join_clinical,
    read_clinical,
)
from cxrstore.export.fusion import Fusion, Missing, PcaSpec, fuse
from cxrstore.store.results import list_results, load_result
from cxrstore.store.selection import DEFAULT_BATCH_ROWS, Where
from cxrstore.store.store import Store

logger = logging.getLogger(__name__)

Format = Literal["npz", "parquet", "h5", "anndata"]
FORMATS: tuple[str, ...] = get_args(Format)
SUFFIXES = {"npz": ".npz", "parquet": ".parquet", "h5": ".h5", "anndata": ".h5ad"}

#: Array names read from stored graph results (kinds "knn" and "cluster").
GRAPH_ARRAYS = {
    "rows": "store row numbers the result covers, in its order (optional: rows 0..n-1 otherwise)",
    "neighbors": "(n, k) int: neighbours as store row numbers (-1: none); what cxrstore.analysis.cluster writes",
    "indices": "(n, k) int: neighbours as positions into `rows` (-1: none); used when `neighbors` is absent",
    "distances": "(n, k) float: distance to each neighbour (used as is)",
    "similarities": "(n, k) float: cosine similarity to each neighbour (distance = 1 - similarity); also read as `sims`",
    "umap": "(n, 2) float: UMAP coordinates",
    "clusters": "(n,) int: cluster labels (exported as obs['leiden'] with the UMAP's result)",
}
_NEIGHBOR_ARRAYS = ("neighbors", "indices")
_SIM_ARRAYS = ("similarities", "sims")
GRAPH_KINDS = ("knn", "cluster")


# -- obs -------------------------------------------------------------------------------------
def normalize_obs(df: pd.DataFrame) -> pd.DataFrame:
    """Make a metadata table writable the same way in every format.

    Strings, categoricals and mixed objects become ``str`` (missing: ``""``); dates become
    ISO strings; booleans, integers and floats stay. The index becomes a ``row`` column.
    """
    out: dict[str, Any] = {"row": np.asarray(df.index, dtype=np.int64)}
    strings: list[str] = []
    for col in df.columns:
        name = str(col)
        if name == "row":
            raise UsageError("a metadata or clinical column is named 'row', which the export uses for row numbers; rename it")
        s = df[col]
        if pd.api.types.is_bool_dtype(s) and not s.isna().any():
            out[name] = s.to_numpy(dtype=bool)
        elif pd.api.types.is_integer_dtype(s) and not s.isna().any():
            out[name] = s.to_numpy(dtype=np.int64)
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            out[name] = s.to_numpy(dtype=np.float32 if s.dtype == np.float32 else np.float64, na_value=np.nan)
        elif pd.api.types.is_datetime64_any_dtype(s):
            out[name] = np.array(["" if pd.isna(v) else pd.Timestamp(v).isoformat() for v in s], dtype=object)
        else:
            values = s.to_numpy(dtype=object)
            if not all(type(v) is str for v in values):
                missing = pd.isna(s).to_numpy()
                values = np.array(["" if m else str(v) for v, m in zip(values, missing)], dtype=object)
            out[name] = values
            strings.append(name)
    # Object, not pandas' string dtype (the default for str values from pandas 3): every
    # writer, anndata's included, stores object strings the same way.
    return pd.DataFrame(out).astype(dict.fromkeys(strings, object))


def _str_array(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=str)
    return arr if arr.size else np.zeros(0, dtype="<U1")


# -- the graph -------------------------------------------------------------------------------
@dataclasses.dataclass
class GraphInfo:
    """What a stored kNN / UMAP result gives an AnnData export."""

    knn: str | None = None
    umap: str | None = None
    k: int | None = None
    edges: int = 0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _result_model(params: dict[str, Any]) -> str | None:
    m = params.get("model")
    return m if isinstance(m, str) else None


def find_graph(store: Store | str | os.PathLike[str], models: Sequence[str], graph: str | None = "auto") -> tuple[Any, Any]:
    """The stored results to take the kNN graph and the UMAP coordinates from.

    Parameters
    ----------
    store : Store or path
    models : models of the export (a result whose ``params["model"]`` is one of them is
        preferred; a result without a model parameter is accepted)
    graph : "auto", "KIND/NAME" or None
        ``"auto"``: the newest ``knn`` result with an ``indices`` array (else the newest
        ``cluster`` one), and the newest result of either kind with a ``umap`` array.
        ``"KIND/NAME"``: that result (for both). None: no graph.

    Returns
    -------
    (knn_result or None, umap_result or None)
    """
    if graph is None or graph == "none":
        return None, None
    if graph != "auto":
        kind, _, name = graph.partition("/")
        if not name:
            raise UsageError(f"graph {graph!r}: write KIND/NAME (e.g. knn/baseline-k15), 'auto' or 'none'")
        res = load_result(store, kind, name)
        arrays = res.meta.get("arrays", [])
        if not _has_graph(res) and "umap" not in arrays:
            raise UsageError(f"result {graph} has neither a kNN graph ('neighbors' or 'indices') nor a 'umap' array (it has {arrays})")
        return (res if _has_graph(res) else None), (res if "umap" in arrays else None)
    found: list[tuple[int, str, Any]] = []
    for rank, kind in enumerate(GRAPH_KINDS):
        for k, name, created in list_results(store, kind):
            res = load_result(store, k, name)
            model = _result_model(res.params)
            if model is not None and model not in models:
                continue
            found.append((rank, created, res))
    knn = [f for f in found if _has_graph(f[2])]
    umap = [f for f in found if "umap" in f[2].meta.get("arrays", [])]
    knn.sort(key=lambda f: (f[0], _neg(f[1])))
    umap.sort(key=lambda f: _neg(f[1]))
    return (knn[0][2] if knn else None), (umap[0][2] if umap else None)


def _has_graph(res: Any) -> bool:
    arrays = res.meta.get("arrays", [])
    return any(a in arrays for a in _NEIGHBOR_ARRAYS)


def _neg(created: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in created)


def _result_rows(res: Any, n: int) -> np.ndarray:
    if "rows" in res.meta.get("arrays", []):
        rows = np.asarray(res.array("rows"), dtype=np.int64)
        if rows.shape != (n,):
            raise UsageError(f"result {res.kind}/{res.name}: 'rows' has shape {rows.shape}, expected ({n},)")
        return rows
    return np.arange(n, dtype=np.int64)


def graph_matrices(res: Any, export_rows: np.ndarray, n_store_rows: int) -> tuple[Any, Any, dict[str, Any]]:
    """CSR ``distances`` and ``connectivities`` over the export's rows from a kNN result.

    Edges between rows both in the export are kept (others dropped); self edges dropped.
    ``distances``: the stored distances, else ``1 - similarity``. ``connectivities``: the
    symmetrised (elementwise max with its transpose) similarity clipped to [0, 1], else
    ``1 / (1 + distance)`` -- a weighted kNN graph that scanpy's leiden and umap accept; it
    is not umap's fuzzy-simplicial-set weighting.
    """
    import scipy.sparse as sp

    arrays = res.meta.get("arrays", [])
    by_row = "neighbors" in arrays
    indices = np.asarray(res.array("neighbors" if by_row else "indices"), dtype=np.int64)
    if indices.ndim != 2:
        raise UsageError(f"result {res.kind}/{res.name}: the neighbour array must be 2-D (n x k), got shape {indices.shape}")
    m, k = indices.shape
    sim_name = next((a for a in _SIM_ARRAYS if a in arrays), None)
    sims = np.asarray(res.array(sim_name), dtype=np.float32) if sim_name else None
    dists = np.asarray(res.array("distances"), dtype=np.float32) if "distances" in arrays else None
    if sims is None and dists is None:
        raise UsageError(f"result {res.kind}/{res.name} has neighbours but neither 'distances' nor 'similarities' ('sims')")
    for arr in (sims, dists):
        if arr is not None and arr.shape != indices.shape:
            raise UsageError(f"result {res.kind}/{res.name}: arrays of shape {arr.shape} and {indices.shape} differ")
    rows = _result_rows(res, m)
    n = export_rows.size
    size = max(n_store_rows, int(rows.max(initial=-1)) + 1, int(indices.max(initial=-1)) + 1 if by_row else 0)
    pos_of = np.full(size, -1, dtype=np.int64)
    pos_of[export_rows] = np.arange(n)
    if by_row:
        valid = indices >= 0
        nbr_rows = indices
    else:
        valid = (indices >= 0) & (indices < m)
        nbr_rows = np.where(valid, rows[np.clip(indices, 0, max(m - 1, 0))], -1)
    src = np.repeat(pos_of[rows], k).reshape(m, k)
    dst = np.where(valid, pos_of[np.clip(nbr_rows, 0, None)], -1)
    keep = valid & (src >= 0) & (dst >= 0) & (src != dst)
    d = dists if dists is not None else 1.0 - sims  # type: ignore[operator]
    w = np.clip(sims, 0.0, 1.0) if sims is not None else 1.0 / (1.0 + np.maximum(d, 0.0))
    s, t = src[keep], dst[keep]
    dist = sp.csr_matrix((np.maximum(d[keep], 0.0).astype(np.float32), (s, t)), shape=(n, n))
    weights = sp.csr_matrix((w[keep].astype(np.float32), (s, t)), shape=(n, n))
    conn = weights.maximum(weights.T).tocsr()
    dist.sort_indices()
    conn.sort_indices()
    metric = res.params.get("metric", "cosine") if isinstance(res.params.get("metric"), str) else "cosine"
    params = {"n_neighbors": int(k) + 1, "method": "cxrstore", "metric": metric, "random_state": 0}
    model = _result_model(res.params)
    if model:
        params["use_rep"] = f"X_{model}"
    return dist, conn, params


def aligned_array(res: Any, name: str, export_rows: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """A per-row array of a result (``umap``, ``clusters``) reordered to the export's rows.

    Rows of the export the result does not cover get ``fill``.
    """
    values = np.asarray(res.array(name))
    rows = _result_rows(res, values.shape[0])
    dtype = np.float32 if values.dtype.kind == "f" or np.isnan(fill) else values.dtype
    out = np.full((export_rows.size, *values.shape[1:]), fill, dtype=dtype)
    order = np.argsort(rows, kind="stable")
    where = np.searchsorted(rows[order], export_rows)
    ok = where < rows.size
    ok[ok] = rows[order][where[ok]] == export_rows[ok]
    out[ok] = values[order[where[ok]]]
    return out


def umap_coordinates(res: Any, export_rows: np.ndarray) -> np.ndarray:
    """``(n_export, 2)`` UMAP coordinates from a result's ``umap`` array (NaN where absent)."""
    coords = aligned_array(res, "umap", export_rows)
    if coords.ndim != 2:
        raise UsageError(f"result {res.kind}/{res.name}: 'umap' must be 2-D, got shape {coords.shape}")
    return coords


# -- format writers --------------------------------------------------------------------------
def _write_npz(path: Path, fusion: Fusion, obs: pd.DataFrame, params: str, batch_rows: int) -> None:
    fmt = np.lib.format
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as fh:
            fmt.write_array_header_2_0(fh, {"descr": fmt.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (len(fusion), fusion.dim)})
            for _, x in fusion.iter_batches(batch_rows):
                fh.write(memoryview(np.ascontiguousarray(x, dtype="<f4")).cast("B"))

        def put(name: str, arr: np.ndarray) -> None:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                fmt.write_array(fh, np.asarray(arr), allow_pickle=False)

        put("row", obs["row"].to_numpy(np.int64))
        cols = [c for c in obs.columns if c != "row"]
        for c in cols:
            v = obs[c].to_numpy()
            put(f"obs/{c}", _str_array(v) if v.dtype == object else v)
        put("obs_columns", _str_array(np.array(cols, dtype=object)))
        put("params", np.array(params))


def _write_parquet(path: Path, fusion: Fusion, obs: pd.DataFrame, params: str, batch_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    obs_schema = pa.Schema.from_pandas(obs, preserve_index=False)
    fields = [obs_schema.field(i).with_type(pa.string()) if obs[obs_schema.names[i]].dtype == object else obs_schema.field(i) for i in range(len(obs_schema))]
    schema = pa.schema([*fields, pa.field("X", pa.list_(pa.float32(), fusion.dim))], metadata={b"cxrstore": params.encode()})
    obs_schema = pa.schema(fields)
    obs_cols = [f.name for f in fields]
    # vectors: no dictionary, no statistics, no compression (floats do not compress; they cost 30% of the time)
    options = {
        "use_dictionary": [f.name for f in fields if pa.types.is_string(f.type)],
        "write_statistics": obs_cols,
        "compression": {**{c: "snappy" for c in obs_cols}, "X": "none"},
    }
    with pq.ParquetWriter(path, schema, **options) as writer:
        pos = 0
        for _, x in fusion.iter_batches(batch_rows):
            part = obs.iloc[pos : pos + len(x)]
            table = pa.Table.from_pandas(part, schema=obs_schema, preserve_index=False)
            values = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1), type=pa.float32())
            table = table.append_column("X", pa.FixedSizeListArray.from_arrays(values, fusion.dim))
            writer.write_table(table.replace_schema_metadata(schema.metadata), row_group_size=len(x))
            pos += len(x)
        if pos == 0:
            writer.write_table(schema.empty_table())


def _h5_chunks(n: int, dim: int) -> tuple[int, int] | None:
    if n == 0 or dim == 0:
        return None
    return (max(1, min(n, (1 << 20) // (4 * dim))), dim)


def _write_h5(path: Path, fusion: Fusion, obs: pd.DataFrame, params: str, batch_rows: int) -> None:
    import h5py

    n, dim = len(fusion), fusion.dim
    with h5py.File(path, "w") as f:
        f.attrs["cxrstore"] = params
        ds = f.create_dataset("X", shape=(n, dim), dtype="<f4", chunks=_h5_chunks(n, dim))
        pos = 0
        for _, x in fusion.iter_batches(batch_rows):
            ds[pos : pos + len(x)] = x
            pos += len(x)
        f.create_dataset("row", data=obs["row"].to_numpy(np.int64))
        g = f.create_group("obs")
        cols = [c for c in obs.columns if c != "row"]
        g.attrs["columns"] = json.dumps(cols)
        for c in cols:
            v = obs[c].to_numpy()
            if v.dtype == object:
                g.create_dataset(c, data=np.array(v.tolist(), dtype=h5py.string_dtype("utf-8")), dtype=h5py.string_dtype("utf-8"))
            else:
                g.create_dataset(c, data=v)


def _obs_names(obs: pd.DataFrame) -> pd.Index:
    ids = obs["image_id"].astype(str) if "image_id" in obs.columns else obs["row"].astype(str)
    if ids.is_unique:
        return pd.Index(ids.to_numpy(dtype=object), dtype=object)
    variant = obs["variant"].astype(str) if "variant" in obs.columns else pd.Series([""] * len(obs))
    names = np.array([i if v in ("", "original") else f"{i}|{v}" for i, v in zip(ids, variant)], dtype=object)
    if not pd.Index(names).is_unique:
        names = obs["row"].astype(str).to_numpy(dtype=object)
    return pd.Index(names, dtype=object)


def _write_anndata(path: Path, fusion: Fusion, obs: pd.DataFrame, params: str, batch_rows: int, graph: GraphInfo, knn: Any, umap: Any, n_store_rows: int) -> None:
    import anndata as ad
    import h5py

    frame = obs.copy()
    frame.index = _obs_names(obs)
    frame.index.name = None
    adata = ad.AnnData(obs=frame, uns={"cxrstore": params})
    if knn is not None:
        dist, conn, nparams = graph_matrices(knn, fusion.rows, n_store_rows)
        adata.obsp["distances"] = dist
        adata.obsp["connectivities"] = conn
        adata.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances", "params": nparams}
        graph.edges = int(dist.nnz)
        graph.k = int(nparams["n_neighbors"]) - 1
    if umap is not None:
        adata.obsm["X_umap"] = umap_coordinates(umap, fusion.rows)
        if "clusters" in umap.meta.get("arrays", []):
            labels = aligned_array(umap, "clusters", fusion.rows, fill=-1).astype(np.int64)
            adata.obs["leiden"] = pd.Categorical([str(c) if c >= 0 else None for c in labels])
    adata.write_h5ad(path)
    with h5py.File(path, "a") as f:
        obsm = f.require_group("obsm")
        sets = []
        for b in fusion.blocks:
            key = f"X_{b.model}"
            if key in obsm:
                raise UsageError(f"obsm key {key!r} is taken; a model must not be named 'umap'")
            ds = obsm.create_dataset(key, shape=(len(fusion), b.dim), dtype="<f4", chunks=_h5_chunks(len(fusion), b.dim))
            ds.attrs["encoding-type"] = "array"
            ds.attrs["encoding-version"] = "0.2.0"
            sets.append((b, ds))
        pos = 0
        for _, x in fusion.iter_batches(batch_rows):
            for b, ds in sets:
                ds[pos : pos + len(x)] = x[:, b.start : b.stop]
            pos += len(x)


# -- the store-level export ------------------------------------------------------------------
@dataclasses.dataclass
class ExportReport:
    """What an export wrote."""

    out: Path
    format: str
    rows: int
    dim: int
    blocks: list[dict[str, Any]]
    bytes_written: int
    vector_bytes: int
    seconds: float
    missing: dict[str, Any]
    clinical: dict[str, Any] | None
    graph: dict[str, Any] | None
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        out["mb_per_s"] = round(self.vector_bytes / 1e6 / self.seconds, 3) if self.seconds > 0 else None
        return out


def export(
    store: Store | str | os.PathLike[str],
    *,
    models: str | Sequence[str],
    out: str | os.PathLike[str],
    format: Format = "npz",
    where: Where = None,
    rows: Sequence[int] | np.ndarray | None = None,
    normalize: bool | dict[str, bool] = True,
    pca: PcaSpec | dict[str, PcaSpec] = None,
    pca_fit_where: Where = None,
    pca_name: str | None = None,
    view: str | dict[str, str] = "flat",
    missing: Missing = "drop",
    labels: bool = True,
    clinical: str | os.PathLike[str] | pd.DataFrame | None = None,
    join_on: JoinOn = "patient_id",
    clinical_columns: Sequence[str] | None = None,
    clinical_date_column: str | None = None,
    store_date_column: str | None = None,
    date_tolerance: str | None = None,
    clinical_unmatched: Unmatched = "keep",
    graph: str | None = "auto",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    overwrite: bool = False,
) -> ExportReport:
    """Fuse ``models`` over a selection and write vectors, ids, metadata, labels, parameters.

    Parameters
    ----------
    store : Store or path
    models, where, rows, normalize, pca, pca_fit_where, pca_name, view, missing
        The fusion: see :func:`cxrstore.export.fusion.fuse`.
    out : path
        The file to write (its suffix is not changed).
    format : {"npz", "parquet", "h5", "anndata"}
        See the module documentation for each layout.
    labels : bool
        Include the label columns (1.0, 0.0, NaN for missing).
    clinical : path or DataFrame, optional
        A clinical table (CSV or Parquet) joined on ``join_on``; see
        :func:`cxrstore.export.clinical.join_clinical` for the other ``clinical_*`` and
        date options. With ``clinical_unmatched="drop"`` unmatched rows are not exported.
    graph : "auto", "KIND/NAME" or None
        AnnData only: the stored kNN / UMAP results to include (:func:`find_graph`). When
        none is stored the export goes on without, and the report says so.
    batch_rows : int
        Rows read and written per batch (memory: one batch plus one chunk per model).
    overwrite : bool
        Replace ``out`` if it exists.

    Returns
    -------
    ExportReport
    """
    if format not in FORMATS:
        raise UsageError(f"format {format!r} is not supported; choose one of {', '.join(FORMATS)}")
    if batch_rows < 1:
        raise UsageError(f"batch_rows must be positive, got {batch_rows}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; remove it or pass overwrite=True (--overwrite)")
    if out.is_dir():
        raise UsageError(f"{out} is a folder; give a file path")
    st = store if isinstance(store, Store) else Store(store)
    t0 = time.perf_counter()
    fusion = fuse(st, models, where=where, rows=rows, normalize=normalize, pca=pca, pca_fit_where=pca_fit_where,
                  pca_name=pca_name, view=view, missing=missing, batch_rows=batch_rows)
    meta = st.metadata(fusion.rows)
    if not labels:
        meta = meta.drop(columns=list(st.labels))
    clinical_report: ClinicalReport | None = None
    if clinical is not None:
        table = read_clinical(clinical, key=join_on)
        joined, clinical_report = join_clinical(meta, table, on=join_on, date_column=clinical_date_column, store_date_column=store_date_column,
                                                tolerance=date_tolerance, columns=clinical_columns, unmatched=clinical_unmatched)
        if len(joined) != len(meta):
            keep = np.isin(fusion.rows, np.asarray(joined.index, dtype=np.int64))
            fusion.rows = fusion.rows[keep]
            meta = meta.loc[joined.index]
        meta = pd.concat([meta, joined], axis=1)
    obs = normalize_obs(meta)
    params = fusion.params()
    params["format"] = format
    params["labels"] = list(st.labels) if labels else []
    params["clinical"] = clinical_report.to_json(limit=0) if clinical_report is not None else None
    if clinical_report is not None and isinstance(clinical, (str, os.PathLike)):
        params["clinical"]["source"] = str(clinical)
    graph_info: GraphInfo | None = None
    knn_res = umap_res = None
    if format == "anndata":
        knn_res, umap_res = find_graph(st, fusion.models, graph)
        graph_info = GraphInfo(knn=None if knn_res is None else f"{knn_res.kind}/{knn_res.name}",
                               umap=None if umap_res is None else f"{umap_res.kind}/{umap_res.name}")
        if knn_res is None and umap_res is None:
            graph_info.note = "no stored knn/cluster result with a neighbour graph ('neighbors' or 'indices') or 'umap' array: exported without a graph"
            logger.info(graph_info.note)
        params["graph"] = {"knn": graph_info.knn, "umap": graph_info.umap}
    params_json = json.dumps(params, sort_keys=True, allow_nan=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if format == "npz":
            _write_npz(tmp, fusion, obs, params_json, batch_rows)
        elif format == "parquet":
            _write_parquet(tmp, fusion, obs, params_json, batch_rows)
        elif format == "h5":
            _write_h5(tmp, fusion, obs, params_json, batch_rows)
        else:
            assert graph_info is not None
            _write_anndata(tmp, fusion, obs, params_json, batch_rows, graph_info, knn_res, umap_res, st.n_rows)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    report = ExportReport(
        out=out,
        format=format,
        rows=len(fusion),
        dim=fusion.dim,
        blocks=[b.to_json() for b in fusion.blocks],
        bytes_written=out.stat().st_size,
        vector_bytes=len(fusion) * fusion.dim * 4,
        seconds=seconds,
        missing=fusion.report.to_json(),
        clinical=None if clinical_report is None else clinical_report.to_json(),
        graph=None if graph_info is None else graph_info.to_json(),
        params=params,
    )
    logger.info("exported %d rows x %d to %s (%s) in %.1f s", report.rows, report.dim, out, format, seconds)
    return report


# -- reading back ------------------------------------------------------------------------------
@dataclasses.dataclass
class Exported:
    """An export read back into memory (for checks and small exports)."""

    X: np.ndarray
    rows: np.ndarray
    obs: pd.DataFrame
    params: dict[str, Any]

    def block(self, model: str) -> np.ndarray:
        """One model's columns of ``X``."""
        for b in self.params["blocks"]:
            if b["model"] == model:
                return self.X[:, b["start"] : b["stop"]]
        raise UsageError(f"model {model!r} is not in this export; it has {[b['model'] for b in self.params['blocks']]}")


def _guess_format(path: Path) -> str:
    for fmt_name, suffix in SUFFIXES.items():
        if path.name.endswith(suffix):
            return fmt_name
    if path.name.endswith((".hdf5", ".hdf")):
        return "h5"
    if path.name.endswith(".pq"):
        return "parquet"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError:
        magic = b""
    if magic.startswith(b"PK"):
        return "npz"
    if magic.startswith(b"PAR1"):
        return "parquet"
    if magic.startswith(b"\x89HDF"):
        import h5py

        with h5py.File(path, "r") as f:
            return "anndata" if "obsm" in f else "h5"
    raise UsageError(f"cannot tell the format of {path}; pass format= one of {', '.join(FORMATS)}")


def read_export(path: str | os.PathLike[str], *, format: Format | None = None) -> Exported:
    """Read an export written by :func:`export` back (whole, in memory).

    ``obs`` holds the metadata, label and clinical columns (without ``row``; its index is
    the store row number) with strings as ``str``.
    """
    path = Path(path)
    fmt_name = format or _guess_format(path)
    if fmt_name == "npz":
        with np.load(path, allow_pickle=False) as z:
            x = z["X"]
            rows = z["row"]
            cols = [str(c) for c in z["obs_columns"]]
            obs = pd.DataFrame({c: z[f"obs/{c}"] for c in cols})
            params = json.loads(str(z["params"]))
    elif fmt_name == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        params = json.loads(table.schema.metadata[b"cxrstore"])
        xcol = table.column("X").combine_chunks()
        x = xcol.flatten().to_numpy(zero_copy_only=False).reshape(len(table), params["dim"]) if len(table) else np.zeros((0, params["dim"]), np.float32)
        frame = table.drop_columns(["X"]).to_pandas()
        rows = frame.pop("row").to_numpy(np.int64)
        obs = frame
    elif fmt_name == "h5":
        import h5py

        with h5py.File(path, "r") as f:
            x = f["X"][...]
            rows = f["row"][...]
            params = json.loads(f.attrs["cxrstore"])
            cols = json.loads(f["obs"].attrs["columns"])
            data = {}
            for c in cols:
                ds = f["obs"][c]
                data[c] = ds.asstr()[...] if h5py.check_string_dtype(ds.dtype) else ds[...]
            obs = pd.DataFrame(data)
    elif fmt_name == "anndata":
        import anndata as ad

        adata = ad.read_h5ad(path)
        params = json.loads(adata.uns["cxrstore"])
        x = np.concatenate([np.asarray(adata.obsm[f"X_{b['model']}"]) for b in params["blocks"]], axis=1) if params["blocks"] else np.zeros((adata.n_obs, 0), np.float32)
        frame = adata.obs.copy()
        for c in frame.columns:
            if isinstance(frame[c].dtype, pd.CategoricalDtype):
                frame[c] = frame[c].astype(str)
        rows = frame.pop("row").to_numpy(np.int64)
        obs = frame.reset_index(drop=True)
    else:
        raise UsageError(f"format {fmt_name!r} is not supported; choose one of {', '.join(FORMATS)}")
    for c in obs.columns:
        if obs[c].dtype == object or pd.api.types.is_string_dtype(obs[c]):
            obs[c] = obs[c].astype(object).astype(str)
    obs.index = pd.Index(np.asarray(rows, dtype=np.int64), name="row")
    return Exported(X=np.asarray(x, dtype=np.float32), rows=np.asarray(rows, dtype=np.int64), obs=obs, params=params)
