"""FAISS indexes per model, stored with the store and kept in step with it.

An index lives under ``STORE/indexes/<model>/``:

- ``index.json``: the sidecar (the pointer readers follow): factory string, metric,
  dimension, build parameters, search parameters, the store generation and store uuid it
  covers, the number of rows it covers, and the build folder holding the files;
- ``<build>/index.faiss``: the index, readable by :func:`faiss.read_index` (ids are store
  row numbers, through an ``IndexIDMap2``);
- ``<build>/rows.npy``: the store rows it covers, sorted.

See :mod:`cxrstore.index.faiss_index` for building, updating and loading.
"""

from __future__ import annotations

from cxrstore.index.faiss_index import (
    APPROX_EF_CONSTRUCTION,
    APPROX_EF_SEARCH,
    APPROX_M,
    FLAT_MAX_COST,
    IndexStatus,
    LoadedIndex,
    Metric,
    StaleIndexError,
    build_index,
    default_factory,
    gpu_available,
    index_info,
    index_status,
    load_index,
    normalise,
    omp_threads,
    query_threads,
    update_index,
)

__all__ = [
    "APPROX_EF_CONSTRUCTION",
    "APPROX_EF_SEARCH",
    "APPROX_M",
    "FLAT_MAX_COST",
    "IndexStatus",
    "LoadedIndex",
    "Metric",
    "StaleIndexError",
    "build_index",
    "default_factory",
    "gpu_available",
    "index_info",
    "index_status",
    "load_index",
    "normalise",
    "omp_threads",
    "query_threads",
    "update_index",
]
