"""Build, update, check and load the FAISS index of one model of a store.

Layout (``STORE/indexes/<model>/``)::

    index.json             the sidecar, replaced atomically last: what the index covers
    <build>/index.faiss    faiss.read_index opens it; ids are store row numbers (IDMap2)
    <build>/rows.npy       the store rows covered, sorted int64

**Cosine** is the inner product of L2-normalised vectors: vectors are normalised as they
are added and queries before they are searched (``metric="ip"`` keeps raw inner
products).

**The default factory** (:func:`default_factory`), by rows ``n`` and dimension ``d``:

- ``"Flat"`` (exact) while ``n * d <= FLAT_MAX_COST`` (2**24, about 16.8 M: 16,384 rows
  at 1024-d, 32,768 at 512-d, 682 at 24,576-d). A flat single query reads the whole
  ``4 n d`` bytes; at that size it takes about 5 ms on two cores, beyond it latency
  grows linearly (about 19 ms at 50,000 x 1024, 200 ms at 20,000 x 24,576).
- ``"HNSW32_SQ8,RFlat"`` beyond it when ``d >= HIGH_DIM_MIN`` (1024): an HNSW32 graph
  over 8-bit scalar-quantised codes (per-dimension ranges trained on a seeded sample of
  ``SQ_TRAIN_ROWS`` rows), then an exact re-rank of ``k_factor_rf x k`` candidates over
  the full-precision vectors (``IndexRefineFlat``): the returned similarities are exact.
  Its search settings are calibrated at build (:func:`calibrate`): the cheapest of
  ``efSearch=64, k_factor_rf=2`` and wider settings whose recall@10 against exact search
  reaches 0.98 for 200 seeded rows held out of the graph until then. Memory: the 8-bit
  codes add a quarter to the full vectors.

  Why: at these dimensions HNSW32,Flat's cost is its full-precision distance
  computations (about 100 KB read per distance at 24,576-d); the graph walk on 8-bit
  codes reads a quarter of that and the re-rank only ``2 k`` full vectors. Measured by
  ``benchmarks/bench_search.py`` (clustered vectors, two loaded cores, one query on one
  thread, cxrstore's full search path) at 20,000 x 24,576:

  ======================  =======  ======  =========  =========
  factory                 build s  p50 ms  batch QPS  recall@10
  ======================  =======  ======  =========  =========
  HNSW32,Flat (before)    353      17.9    61         0.986
  PCA512,HNSW32,RFlat     30       4.66    1455       0.998
  HNSW32_SQ8,RFlat        45       2.70    781        0.986
  the same, efC 80 (*)    126      2.50    382        1.000
  ======================  =======  ======  =========  =========

  (*) the current build beam (below), a later run with another job on one core.

  The default is chosen by single-query latency at recall@10 >= 0.97. The PCA variant
  (a 512 x d projection per query: it reads a 50 MB matrix, most of its time) batches
  better and remains a factory to ask for (``--factory PCA512,HNSW32,RFlat``; its PCA is
  trained by :func:`fit_pca` on ``PCA_TRAIN_ROWS`` rows); ``PCA256`` missed recall@10
  0.97 even with ``k_factor_rf=8`` (0.967 on a 6,000-row sample), and a PCA loses more
  where the neighbour order lives in the discarded dimensions (isotropic within-cluster
  noise at 4,096-d needed ``k_factor_rf=16``). At 20,000 x 4,096 (raw FAISS, one thread)
  SQ8 answered in 0.29-0.45 ms at recall@10 0.988-0.996 against HNSW32,Flat's
  0.64-1.08 ms at 0.989-0.996. At 50,000 x 1024 (the benchmark's clustered vectors,
  raw FAISS, one thread): 0.23 ms at recall@10 0.973 (efSearch 64) and 0.33 ms at 0.983
  (efSearch 128) against HNSW32,Flat's 0.52 ms at 0.990; hence the threshold at 1024
  dimensions (MedImageInsight, torchxrayvision).
- ``"HNSW32,Flat"`` (approximate graph, full-precision vectors) below 1024 dimensions
  (e.g. the 512-d baseline, where 8-bit codes save little), built with
  ``efConstruction=80`` and searched with ``efSearch=128``.

**Build beam** (``efConstruction``, both HNSW defaults): 80, twice FAISS's default. On
clustered vectors a graph built with 40 leaves some rows hard to reach and lets some
queries walk into the wrong cluster, and no search setting repairs that: at 50,000 x 1024
(the benchmark's vectors, 1,000 queries, raw FAISS, one thread) recall@10 stayed at
0.987-0.992 from ``efSearch`` 64 to 256 with 40, and reached 0.997 at ``efSearch`` 64
(0.21 ms) with 64 and 0.9996 with 128; build time grows about linearly (3.9 s, 6.8 s,
14.9 s on two cores).

Recall@10 against exact search of both approximate defaults is measured in
``tests/test_index.py`` (>= 0.95 required) and ``benchmarks/bench_search.py``. The file
stays a plain FAISS index (``IDMap2,HNSW32_SQ8,RFlat``): ``faiss.read_index`` opens it
and ``faiss.ParameterSpace`` applies the sidecar's ``search_params`` (``efSearch``,
``k_factor_rf``) to it, as :func:`load_index` does.

**Training** (PCA, IVF centroids, scalar or product quantisers) happens once, at build,
on a seeded sample; the sidecar's ``build_params.trained`` names what was trained on
how many rows. ``update`` adds rows with the trained quantiser or transform, without
retraining.

**Filtered search** passes a FAISS ID selector down to the graph or list search through
the re-rank and transform wrappers (``IndexRefineSearchParameters`` around the
HNSW/IVF parameters, with an ``IDSelectorTranslated`` from store rows to the index's
internal ids); the re-rank then only sees allowed rows.

**Never stale.** The sidecar records the store uuid, the generation and the rows it
covers. :func:`index_status` compares them with the store's committed rows for the
model; :func:`load_index` refuses a stale index with :class:`StaleIndexError`, naming
``cxrstore index STORE update --model M`` (new rows only: they are added without
retraining) or ``build`` (the store was replaced or the model's provenance changed).
Search never updates an index on its own: it may run on a read-only store.

**Writes** need no store lock: a build is written into its own new folder, then the
sidecar is replaced atomically (``os.replace``); two concurrent builders cannot corrupt
the index, the last to replace the sidecar wins. Old build folders are removed after
``GC_AGE_SECONDS`` unless the sidecar points at them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import faiss
import numpy as np

from cxrstore import __version__
from cxrstore.errors import StoreError, UsageError
from cxrstore.store.store import Store, _now

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "ip"]
Device = Literal["auto", "cpu", "gpu"]

INDEX_DIR = "indexes"
SIDECAR = "index.json"
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.npy"
FORMAT_NAME = "cxrstore-index"
FORMAT_VERSION = 1

#: Exact ("Flat") while rows x dim stays at or below this.
FLAT_MAX_COST = 2**24
#: The approximate default: HNSW graph degree, build and search beam widths.
APPROX_M = 32
APPROX_EF_CONSTRUCTION = 80
APPROX_EF_SEARCH = 128
#: The high-dimensional default from HIGH_DIM_MIN dimensions: HNSW over 8-bit scalar
#: codes, exact re-rank of HIGH_DIM_K_FACTOR x k candidates (efSearch HIGH_DIM_EF_SEARCH),
#: the settings calibrate() starts from.
HIGH_DIM_MIN = 1024
HIGH_DIM_EF_SEARCH = 64
HIGH_DIM_K_FACTOR = 2
#: Training sample of scalar quantisers (per-dimension ranges) and of PCA transforms
#: (fit_pca's cost grows as rows^2 x d + rows^3).
SQ_TRAIN_ROWS = 4096
PCA_TRAIN_ROWS = 2048
#: Build-time calibration of the high-dimensional default's search settings: stored rows
#: held out of the index until calibrated are the queries, recall@10 against exact search
#: over the re-rank's vectors; the first (efSearch, k_factor_rf) of CALIBRATION_GRID
#: (cheapest first) reaching CALIBRATION_RECALL wins (more than 2 x CALIBRATION_QUERIES
#: rows needed, else the default settings stay).
CALIBRATION_QUERIES = 200
CALIBRATION_RECALL = 0.98
CALIBRATION_GRID = ((64, 2), (128, 2), (128, 4), (256, 4), (256, 8), (512, 16))
#: Rows used to train an index that needs training (IVF, PQ...), seeded sample,
#: capped so the sample stays within TRAIN_MAX_BYTES (10,922 rows at 24,576-d); an index
#: with a PCA transform trains on PCA_TRAIN_ROWS (its cost grows as rows^2 x d + rows^3).
DEFAULT_TRAIN_ROWS = 50_000
TRAIN_MAX_BYTES = 1 << 30
#: Searches of at most this many queries run on one OpenMP thread: FAISS's thread start-up
#: and barrier cost (about 12 ms a call on a loaded 2-core machine) dwarfs one query.
SINGLE_THREAD_MAX_QUERIES = 8
#: Build folders not pointed at by the sidecar are removed when older than this.
GC_AGE_SECONDS = 600.0


@contextlib.contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads inside the block (``None``: unchanged)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def query_threads(n_queries: int) -> int | None:
    """OpenMP threads cxrstore uses for a search of ``n_queries`` (None: FAISS's default)."""
    return 1 if n_queries <= SINGLE_THREAD_MAX_QUERIES else None


class StaleIndexError(StoreError):
    """The index does not cover the store's committed rows for its model (or is absent)."""


def _open(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else Store(store)


def _check_metric(metric: str) -> Metric:
    if metric not in get_args(Metric):
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(get_args(Metric))}")
    return metric  # type: ignore[return-value]


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, as a new C-contiguous float32 array (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2:
        raise UsageError(f"vectors must be 2-D (n x dim), got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def default_factory(n: int, d: int) -> tuple[str, dict[str, int]]:
    """The automatic factory string and search parameters for ``n`` rows of dimension ``d``.

    Returns
    -------
    factory : str
        ``"Flat"`` while ``n * d <= FLAT_MAX_COST``; else ``"HNSW32_SQ8,RFlat"`` when
        ``d >= HIGH_DIM_MIN``; else ``"HNSW32,Flat"``.
    search_params : dict
        ``{}`` for Flat, ``{"efSearch": 64, "k_factor_rf": 2}`` for HNSW32_SQ8,RFlat (the
        first setting :func:`calibrate` tries: ``build_index`` may widen it),
        ``{"efSearch": APPROX_EF_SEARCH}`` for HNSW32,Flat.
    """
    if n * d <= FLAT_MAX_COST:
        return "Flat", {}
    if d >= HIGH_DIM_MIN:
        return f"HNSW{APPROX_M}_SQ8,RFlat", {"efSearch": HIGH_DIM_EF_SEARCH, "k_factor_rf": HIGH_DIM_K_FACTOR}
    return f"HNSW{APPROX_M},Flat", {"efSearch": APPROX_EF_SEARCH}


def gpu_available() -> bool:
    """True when this faiss has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a faiss build without GPU symbols  # noqa: BLE001
        return False


def _resolve_device(device: str) -> Literal["cpu", "gpu"]:
    if device not in get_args(Device):
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(get_args(Device))}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise UsageError("device 'gpu' asked for, but faiss has no GPU support or sees no GPU; use 'cpu' or 'auto'")
    return device  # type: ignore[return-value]


def _make_index(factory: str, d: int) -> Any:
    if not isinstance(factory, str) or not factory.strip() or factory.upper().startswith("IDMAP"):
        raise UsageError(f"bad factory {factory!r}: give a FAISS factory string such as 'Flat', 'HNSW32,Flat', 'IVF256,Flat' (ids are mapped by cxrstore)")
    try:
        return faiss.index_factory(d, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise UsageError(
            f"bad factory {factory!r} for dim {d}: faiss says {first!r}; examples: 'Flat', 'HNSW32,Flat', 'IVF256,Flat', 'IVF256,SQ8'"
        ) from None


def inner_index(index: Any) -> Any:
    """The index inside cxrstore's ``IndexIDMap2`` wrapper (downcast)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    return inner


_WRAPPERS = (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexRefine, faiss.IndexPreTransform)


def index_chain(index: Any) -> list[Any]:
    """The nested parts of an index, outermost first (downcast).

    Follows ``IndexIDMap2.index``, ``IndexRefine.base_index`` and
    ``IndexPreTransform.index``; a pre-transform's vector transforms are listed before
    its index. The last element is the index that does the search (``search_core``).
    """
    out: list[Any] = []
    ix: Any = faiss.downcast_index(index)
    while ix is not None:
        out.append(ix)
        if isinstance(ix, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            nxt = ix.index
        elif isinstance(ix, faiss.IndexRefine):
            nxt = ix.base_index
        elif isinstance(ix, faiss.IndexPreTransform):
            out.extend(faiss.downcast_VectorTransform(ix.chain.at(i)) for i in range(ix.chain.size()))
            nxt = ix.index
        else:
            nxt = None
        ix = faiss.downcast_index(nxt) if nxt is not None else None
    return out


def search_core(index: Any) -> Any:
    """The innermost index of :func:`index_chain` (Flat, HNSW, IVF...)."""
    return index_chain(index)[-1]


def _describe(part: Any) -> str:
    name = type(part).__name__
    if isinstance(part, faiss.VectorTransform):
        return f"{name} {part.d_in}->{part.d_out}"
    if isinstance(part, faiss.IndexIVF):
        return f"{name} nlist={part.nlist}"
    return name


def _untrained_parts(index: Any) -> list[str]:
    """Descriptions of the parts that need training (wrappers excluded)."""
    return [_describe(p) for p in index_chain(index) if not isinstance(p, _WRAPPERS) and not p.is_trained]


def _train_rows(index: Any, n: int, d: int, train_rows: int | None) -> int:
    """Rows of the training sample (``train_rows`` or a default for what needs training).

    PCA_TRAIN_ROWS with a PCA, SQ_TRAIN_ROWS when only scalar quantisers need training,
    else DEFAULT_TRAIN_ROWS; at most ``n`` and TRAIN_MAX_BYTES of vectors.
    """
    if train_rows is None:
        chain = index_chain(index)
        untrained = [p for p in chain if not isinstance(p, _WRAPPERS) and not p.is_trained]
        if any(isinstance(p, faiss.PCAMatrix) for p in chain):
            train_rows = PCA_TRAIN_ROWS
        elif untrained and all(isinstance(p, (faiss.IndexScalarQuantizer, faiss.IndexHNSWSQ)) for p in untrained):
            train_rows = SQ_TRAIN_ROWS
        else:
            train_rows = DEFAULT_TRAIN_ROWS
    return int(min(n, train_rows, max(1, TRAIN_MAX_BYTES // (4 * d))))


def _apply_params(index: Any, params: dict[str, Any]) -> None:
    if not params:
        return
    space = faiss.ParameterSpace()
    for key, value in params.items():
        try:
            space.set_index_parameter(index, key, float(value))
        except RuntimeError as exc:
            raise UsageError(f"search parameter {key}={value!r} does not apply to this index: {str(exc).strip().splitlines()[-1]}") from None


def _provenance_key(store: Store, model: str) -> str:
    prov = store.provenance(model)
    keep = {k: v for k, v in prov.items() if k not in ("created_at", "cxrstore_version")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _index_dir(store: Store, model: str) -> Path:
    store._check_model(model)
    return store.path / INDEX_DIR / model


def _read_sidecar(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / SIDECAR).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder / SIDECAR}: unreadable index sidecar ({exc}); rebuild with `cxrstore index STORE build`") from None
    if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{folder / SIDECAR}: not a cxrstore index sidecar of version {FORMAT_VERSION}; rebuild it")
    return data


# -- status ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IndexStatus:
    """How an index relates to the store.

    Attributes
    ----------
    exists : bool
    fresh : bool
        True when the index covers exactly the store's committed rows of the model.
    new_rows : int
        Committed rows of the model the index does not cover (``update`` adds them).
    needs_rebuild : bool
        The index cannot be updated (another store, changed provenance, rows gone).
    reason : str
        Empty when fresh; otherwise why not, and the command to run.
    sidecar : dict or None
    """

    exists: bool
    fresh: bool
    new_rows: int
    needs_rebuild: bool
    reason: str
    sidecar: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"exists": self.exists, "fresh": self.fresh, "new_rows": self.new_rows, "needs_rebuild": self.needs_rebuild, "reason": self.reason}


def _covered_rows(folder: Path, sidecar: dict[str, Any]) -> np.ndarray:
    try:
        return np.load(folder / sidecar["files"]["rows"], allow_pickle=False)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"{folder}: the index rows file is missing or unreadable ({exc}); rebuild the index") from None


def index_status(store: Store | str | os.PathLike[str], model: str) -> IndexStatus:
    """Compare the stored index of ``model`` with the store's committed rows."""
    st = _open(store)
    folder = _index_dir(st, model)
    side = _read_sidecar(folder)
    build = f"cxrstore index {st.path} build --model {model}"
    update = f"cxrstore index {st.path} update --model {model}"
    if side is None:
        return IndexStatus(False, False, 0, True, f"model {model!r} has no index; run `{build}`", None)
    if side.get("store_uuid") != st.format_info.get("store_uuid"):
        return IndexStatus(True, False, 0, True, f"the index of {model!r} was built on another store; run `{build}`", side)
    if side.get("provenance_sha256") != _provenance_key(st, model):
        return IndexStatus(True, False, 0, True, f"model {model!r}'s provenance changed since the index was built; run `{build}`", side)
    if int(side["store_generation"]) > st.generation:
        return IndexStatus(True, False, 0, True, f"the index of {model!r} is newer than the store (generation {side['store_generation']} > {st.generation}); run `{build}`", side)
    present = np.flatnonzero(st.present(model))
    covered = _covered_rows(folder, side)
    gone = np.setdiff1d(covered, present, assume_unique=True)
    if gone.size:
        return IndexStatus(True, False, 0, True, f"the index of {model!r} covers {gone.size} rows the store no longer has; run `{build}`", side)
    new = np.setdiff1d(present, covered, assume_unique=True)
    if new.size:
        return IndexStatus(
            True, False, int(new.size), False,
            f"the index of {model!r} is stale: {new.size} committed rows are not in it (index generation "
            f"{side['store_generation']}, store generation {st.generation}); run `{update}`",
            side,
        )
    return IndexStatus(True, True, 0, False, "", side)


# -- writing ---------------------------------------------------------------------------
def _write(st: Store, model: str, index: Any, rows: np.ndarray, side: dict[str, Any]) -> dict[str, Any]:
    folder = _index_dir(st, model)
    folder.mkdir(parents=True, exist_ok=True)
    build = f"g{st.generation}-{uuid.uuid4().hex[:12]}"
    tmp = folder / f".tmp-{build}"
    tmp.mkdir()
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / ROWS_FILE, np.asarray(rows, dtype=np.int64), allow_pickle=False)
        os.replace(tmp, folder / build)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    side = {**side, "build": build, "files": {"index": f"{build}/{INDEX_FILE}", "rows": f"{build}/{ROWS_FILE}"}}
    tmp_side = folder / f".{SIDECAR}.{uuid.uuid4().hex}.tmp"
    tmp_side.write_text(json.dumps(side, indent=2, allow_nan=False) + "\n")
    os.replace(tmp_side, folder / SIDECAR)  # the commit point
    _gc(folder)
    return side


def _gc(folder: Path) -> None:
    try:
        current = (_read_sidecar(folder) or {}).get("build")
    except StoreError:
        return
    now = time.time()
    for child in folder.iterdir():
        if child.name == current or child.name == SIDECAR:
            continue
        try:
            old = now - child.stat().st_mtime > GC_AGE_SECONDS
        except FileNotFoundError:
            continue
        if old:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _add_rows(index: Any, st: Store, model: str, rows: np.ndarray, metric: Metric, batch_rows: int) -> None:
    sel = st.select(model=model, rows=rows)
    for r, vecs in sel.iter_vectors(batch_rows=batch_rows):
        x = normalise(vecs) if metric == "cosine" else np.ascontiguousarray(vecs, dtype=np.float32)
        index.add_with_ids(x, np.ascontiguousarray(r, dtype=np.int64))


def fit_pca(pca: Any, x: np.ndarray) -> None:
    """Train a FAISS ``PCAMatrix`` on ``x`` (m x d) in numpy, as FAISS would, but faster.

    With ``m < d`` the principal directions come from the ``m x m`` Gram matrix of the
    centred sample (``v_i = X^T u_i / sqrt(lambda_i)``), never a ``d x d`` covariance;
    otherwise from the covariance. FAISS's own ``PCAMatrix.train`` does the same through
    a full double-precision eigendecomposition that takes about 10 s for 2,048 rows on
    two cores, numpy's ``eigh`` about 1 s. The fields FAISS serialises are filled
    (``mean``, ``eigenvalues``, ``PCAMat``; ``A`` and ``b`` by ``prepare_Ab``), so the
    written index is an ordinary trained ``PCAMatrix``. Directions beyond the sample's
    rank are zero rows.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, d = x.shape
    if d != pca.d_in:
        raise UsageError(f"PCA training vectors have dimension {d}, the transform expects {pca.d_in}")
    if pca.random_rotation or pca.eigen_power != 0 or pca.balanced_bins != 0:
        pca.train(x)  # variants FAISS post-processes: let it train them
        return
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    xc = x - mean
    r = min(int(pca.d_out), m, d)
    if m < d:
        lam, u = np.linalg.eigh((xc @ xc.T).astype(np.float64))
        lam, u = lam[::-1][:r], u[:, ::-1][:, :r]
        comps = (u.T.astype(np.float32) @ xc).astype(np.float64)  # rows: sqrt(lambda_i) v_i
        ok = lam > max(float(lam[0]), 0.0) * 1e-10
        comps[ok] /= np.sqrt(lam[ok])[:, None]
        comps[~ok] = 0.0
    else:
        lam, v = np.linalg.eigh((xc.T @ xc).astype(np.float64))
        lam, comps = lam[::-1][:r], v[:, ::-1][:, :r].T
    mat = np.zeros((pca.d_out, d), np.float32)
    mat[:r] = comps
    eig = np.zeros(pca.d_out, np.float32)
    eig[:r] = np.clip(lam, 0.0, None)  # as FAISS: eigenvalues of the centred X^T X
    faiss.copy_array_to_vector(mean, pca.mean)
    faiss.copy_array_to_vector(eig, pca.eigenvalues)
    faiss.copy_array_to_vector(mat.ravel(), pca.PCAMat)
    pca.is_trained = True
    pca.prepare_Ab()


def calibrate(index: Any, queries: np.ndarray, *, k: int = 10) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pick ``efSearch`` and ``k_factor_rf`` of a filled ``...HNSW...,RFlat`` index by recall.

    ``queries`` (prepared: normalised for cosine) should be held out of the index: a
    stored vector is a graph node, its neighbours are its own edges, and its recall
    flatters the graph (isotropic noise at 4,096-d: 1.000 for stored rows, 0.956 for
    held-out ones at the same setting). :func:`build_index` holds out
    ``CALIBRATION_QUERIES`` seeded rows, calibrates, then adds them. Each query is
    searched by the index at each ``(efSearch, k_factor_rf)`` of ``CALIBRATION_GRID``
    and exactly by the re-rank's flat vectors; the first setting reaching
    ``CALIBRATION_RECALL`` (recall@k) is kept, else the last.

    Returns
    -------
    search_params : dict
        ``{"efSearch": ..., "k_factor_rf": ...}``.
    record : dict
        Queries, target, each setting tried with its recall, whether the target was met.
    """
    refine = next(p for p in index_chain(index) if isinstance(p, faiss.IndexRefine))
    flat = faiss.downcast_index(refine.refine_index)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    kk = min(k, int(flat.ntotal))
    _, truth = flat.search(q, kk)
    tried: list[dict[str, Any]] = []
    for ef, kf in CALIBRATION_GRID:
        _apply_params(refine, {"efSearch": ef, "k_factor_rf": kf})
        _, got = refine.search(q, kk)
        hits = [len(set(w.tolist()) & set(g.tolist())) / max(1, kk) for w, g in zip(truth, got)]
        tried.append({"efSearch": ef, "k_factor_rf": kf, "recall_at_10": round(float(np.mean(hits)), 4)})
        if tried[-1]["recall_at_10"] >= CALIBRATION_RECALL:
            break
    best = tried[-1]
    reached = best["recall_at_10"] >= CALIBRATION_RECALL
    if not reached:
        logger.warning("index calibration: recall@%d %.3f < %.2f at the widest setting %s", k, best["recall_at_10"], CALIBRATION_RECALL, best)
    record = {"queries": int(len(q)), "held_out": True, "target_recall_at_10": CALIBRATION_RECALL, "tried": tried, "reached": reached}
    return {"efSearch": best["efSearch"], "k_factor_rf": best["k_factor_rf"]}, record


def _train(index: Any, st: Store, model: str, rows: np.ndarray, metric: Metric, seed: int, take: int) -> dict[str, Any]:
    """Train ``index`` on a seeded sample of ``take`` of ``rows``; what was trained, on what.

    A PCA that is the first transform met (it sees the raw vectors) is fitted by
    :func:`fit_pca`; FAISS trains the rest (``index.train`` skips trained transforms).
    """
    parts = _untrained_parts(index)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, size=take, replace=False))
    xt = st.select(model=model, rows=sample).vectors()
    xt = normalise(xt) if metric == "cosine" else np.ascontiguousarray(xt, dtype=np.float32)
    t0 = time.perf_counter()
    first = next((p for p in index_chain(index) if isinstance(p, faiss.VectorTransform)), None)
    if isinstance(first, faiss.PCAMatrix) and not first.is_trained:
        fit_pca(first, xt)
    if _untrained_parts(index):
        index.train(xt)
    else:  # only the PCA needed training: spare FAISS projecting the sample for nothing
        for part in index_chain(index):
            if isinstance(part, _WRAPPERS):
                part.is_trained = True
    seconds = time.perf_counter() - t0
    logger.info("trained %s on %d rows in %.1f s", ", ".join(parts), take, seconds)
    return {"train_rows": int(take), "trained": {"parts": parts, "rows": int(take), "seed": int(seed), "seconds": round(seconds, 3)}}


def build_index(
    store: Store | str | os.PathLike[str],
    model: str,
    *,
    factory: str = "auto",
    metric: Metric = "cosine",
    search_params: dict[str, Any] | None = None,
    seed: int = 0,
    batch_rows: int = 4096,
    train_rows: int | None = None,
) -> dict[str, Any]:
    """Build the FAISS index of ``model`` over its committed rows and store it.

    Vectors are streamed from the store ``batch_rows`` at a time and added with their
    row numbers as ids; an index that needs training (PCA, IVF, PQ...) is trained first on
    a seeded sample of ``train_rows`` rows.

    Parameters
    ----------
    store : Store or path
    model : str
    factory : str
        A FAISS factory string (``"Flat"``, ``"HNSW32,Flat"``, ``"IVF1024,Flat"``,
        ``"HNSW32_SQ8,RFlat"``, ``"PCA512,HNSW32,RFlat"``...) or ``"auto"`` for
        :func:`default_factory`.
    metric : {"cosine", "ip"}
    search_params : dict, optional
        FAISS search-time parameters recorded with the index and applied on load through
        ``faiss.ParameterSpace`` (``{"efSearch": 128}``, ``{"nprobe": 32}``,
        ``{"k_factor_rf": 2}`` for a re-rank); defaults to those of
        :func:`default_factory` for ``auto``, calibrated by :func:`calibrate` for the
        high-dimensional default (``build_params.calibration`` records how).
    seed : int
        Seed of the training sample.
    batch_rows : int
        Rows read and added per batch.
    train_rows : int, optional
        Largest training sample (default ``PCA_TRAIN_ROWS`` for an index with a PCA,
        ``SQ_TRAIN_ROWS`` for scalar quantisers, else ``DEFAULT_TRAIN_ROWS``; at most
        ``TRAIN_MAX_BYTES`` of vectors).

    Returns
    -------
    dict
        The sidecar written to ``STORE/indexes/<model>/index.json``.
    """
    st = _open(store)
    metric = _check_metric(metric)
    if batch_rows < 1 or (train_rows is not None and train_rows < 1):
        raise UsageError(f"batch_rows and train_rows must be positive, got {batch_rows} and {train_rows}")
    sel = st.select(model=model)
    n, d = len(sel), st.commit.models[model].dim
    if n == 0:
        raise UsageError(f"model {model!r} has no committed vectors in {st.path}; ingest first")
    auto = factory == "auto"
    if auto:
        factory, params = default_factory(n, d)
        params = dict(search_params) if search_params is not None else params
    else:
        params = dict(search_params or {})
    t0 = time.perf_counter()
    index = _make_index(factory, d)
    core = search_core(index)
    build_params: dict[str, Any] = {"seed": int(seed), "batch_rows": int(batch_rows)}
    if isinstance(core, faiss.IndexHNSW):
        core.hnsw.efConstruction = APPROX_EF_CONSTRUCTION
        build_params["efConstruction"] = APPROX_EF_CONSTRUCTION
    if not index.is_trained:
        build_params.update(_train(index, st, model, sel.rows, metric, seed, _train_rows(index, n, d, train_rows)))
    _apply_params(index, params)
    if auto and search_params is None and factory.endswith(",RFlat") and n > 2 * CALIBRATION_QUERIES:
        rng = np.random.default_rng(seed + 1)
        held = np.sort(rng.choice(sel.rows, size=CALIBRATION_QUERIES, replace=False))
        _add_rows(index, st, model, np.setdiff1d(sel.rows, held, assume_unique=True), metric, batch_rows)
        vecs = st.select(model=model, rows=held).vectors()
        params, build_params["calibration"] = calibrate(index, normalise(vecs) if metric == "cosine" else np.ascontiguousarray(vecs, np.float32))
        _apply_params(index, params)
        _add_rows(index, st, model, held, metric, batch_rows)
    else:
        _add_rows(index, st, model, sel.rows, metric, batch_rows)
    seconds = time.perf_counter() - t0
    side = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "factory": factory,
        "auto": auto,
        "index_factory": f"IDMap2,{factory}",
        "metric": metric,
        "dim": int(d),
        "n_rows": int(n),
        "store_generation": int(st.generation),
        "store_uuid": st.format_info.get("store_uuid"),
        "provenance_sha256": _provenance_key(st, model),
        "build_params": build_params,
        "search_params": params,
        "build_seconds": round(seconds, 3),
        "updates": [],
        "faiss_version": faiss.__version__,
        "cxrstore_version": __version__,
        "created_at": _now(),
    }
    logger.info("built %s index of %r: %d rows x %d in %.1f s", factory, model, n, d, seconds)
    return _write(st, model, index, sel.rows, side)


def update_index(
    store: Store | str | os.PathLike[str], model: str, *, batch_rows: int = 4096
) -> dict[str, Any]:
    """Add the model's committed rows that the index does not cover yet; store it.

    The index is not retrained (a scalar quantiser keeps its ranges, a PCA its
    projection, an IVF its centroids: the sidecar's ``build_params.trained`` still says
    what they were trained on). Does nothing when the index is fresh.

    Returns
    -------
    dict
        The sidecar, with ``updates`` listing ``{generation, added, seconds}``.

    Raises
    ------
    StaleIndexError
        If there is no index, or it cannot be updated (run ``build``).
    """
    st = _open(store)
    status = index_status(st, model)
    if status.fresh:
        return dict(status.sidecar or {})
    if status.needs_rebuild:
        raise StaleIndexError(status.reason)
    side = dict(status.sidecar or {})
    folder = _index_dir(st, model)
    t0 = time.perf_counter()
    index = faiss.read_index(str(folder / side["files"]["index"]))
    covered = _covered_rows(folder, side)
    present = np.flatnonzero(st.present(model))
    new = np.setdiff1d(present, covered, assume_unique=True)
    _add_rows(index, st, model, new, side["metric"], batch_rows)
    rows = np.union1d(covered, new)
    seconds = time.perf_counter() - t0
    side.update(
        n_rows=int(rows.size),
        store_generation=int(st.generation),
        updates=list(side.get("updates", []))
        + [{"generation": int(st.generation), "added": int(new.size), "retrained": False, "seconds": round(seconds, 3)}],
        cxrstore_version=__version__,
    )
    logger.info("added %d rows to the index of %r in %.1f s", new.size, model, seconds)
    return _write(st, model, index, rows, side)


def index_info(store: Store | str | os.PathLike[str], model: str) -> dict[str, Any]:
    """The sidecar of ``model``'s index with its status, path and size (JSON-ready)."""
    st = _open(store)
    status = index_status(st, model)
    folder = _index_dir(st, model)
    out: dict[str, Any] = {"model": model, "store": str(st.path), "store_generation": st.generation, "status": status.to_json()}
    if status.sidecar is not None:
        side = status.sidecar
        path = folder / side["files"]["index"]
        out["index"] = side
        out["index_path"] = str(path)
        out["index_bytes"] = path.stat().st_size if path.exists() else None
    return out


# -- loading ---------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedIndex:
    """An index opened for search, with its sidecar and covered rows.

    Attributes
    ----------
    index : faiss.Index
        The CPU index (``IndexIDMap2``; ids are store rows).
    sidecar : dict
    rows : ndarray of int64
        Covered store rows, sorted.
    device : {"cpu", "gpu"}
    """

    index: Any
    sidecar: dict[str, Any]
    rows: np.ndarray
    device: Literal["cpu", "gpu"] = "cpu"
    _gpu: Any = None
    _gpu_res: Any = None
    _gpu_ids: Any = None

    @property
    def metric(self) -> Metric:
        return self.sidecar["metric"]

    @property
    def exact(self) -> bool:
        return isinstance(inner_index(self.index), faiss.IndexFlat)

    @property
    def supports_selector(self) -> bool:
        """Whether a filtered search can pass an ID selector to the searching index."""
        chain = index_chain(self.index)
        wrappers_ok = all(isinstance(p, (*_WRAPPERS, faiss.VectorTransform)) for p in chain[:-1])
        return wrappers_ok and isinstance(chain[-1], (faiss.IndexFlat, faiss.IndexHNSW, faiss.IndexIVF))

    def prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries as the index expects them (L2-normalised for cosine)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.sidecar["dim"]:
            raise UsageError(f"queries have dimension {q.shape[1]}, the index of {self.sidecar['model']!r} has {self.sidecar['dim']}")
        return normalise(q) if self.metric == "cosine" else np.ascontiguousarray(q)

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search prepared queries (see :meth:`prepare_queries`).

        Parameters
        ----------
        queries : ndarray (n, dim) float32
        k : int
        allowed : ndarray of int64, optional
            Only these store rows may be returned (a FAISS ID selector: exact with Flat).

        Returns
        -------
        similarities : ndarray (n, k) float32
        rows : ndarray (n, k) int64, -1 where fewer than ``k`` results exist.
        """
        k = int(k)
        if allowed is None:
            if self._gpu is not None:
                sims, pos = self._gpu.search(queries, k)
                rows = np.where(pos >= 0, self._gpu_ids[np.clip(pos, 0, None)], -1)
                return sims, rows
            with omp_threads(query_threads(len(queries))):
                return self.index.search(queries, k)
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        keep: list[Any] = [sel]  # SWIG parameter objects hold raw pointers: keep them alive
        params = self._params(sel, keep) if self.supports_selector else None
        if params is None:
            raise UsageError(f"index {self.sidecar['factory']!r} does not support filtered search")
        with omp_threads(query_threads(len(queries))):
            return self.index.search(queries, k, params=params)

    def _params(self, sel: Any, keep: list[Any]) -> Any:
        """Search parameters carrying ``sel`` (store rows) to the searching index.

        Directly under the ``IndexIDMap2``, the selector rides on the outer parameters
        and FAISS translates it to internal ids. Under an ``IndexRefine`` (whose search
        reads only ``IndexRefineSearchParameters.base_index_params``) and an
        ``IndexPreTransform`` (which hands the parameters to its index), the selector is
        translated here (``IDSelectorTranslated``) and set on the innermost parameters.
        """
        chain = index_chain(self.index)
        nested = any(isinstance(p, (faiss.IndexRefine, faiss.IndexPreTransform)) for p in chain)
        if nested and isinstance(self.index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            sel = faiss.IDSelectorTranslated(self.index.id_map, sel)
            keep.append(sel)
        params = _core_params(chain[-1], sel)
        for part in reversed(chain[:-1]):
            if isinstance(part, faiss.IndexRefine):
                keep.append(params)
                params = faiss.IndexRefineSearchParameters(k_factor=float(part.k_factor), base_index_params=params)
        keep.append(params)
        return params


def _core_params(core: Any, sel: Any) -> Any:
    """Parameters of the searching index with its current settings and ``sel``."""
    if isinstance(core, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(core.hnsw.efSearch))
    if isinstance(core, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(core.nprobe))
    return faiss.SearchParameters(sel=sel)


_CACHE: dict[tuple[str, str], LoadedIndex] = {}
_CACHE_SIZE = 2


def load_index(
    store: Store | str | os.PathLike[str],
    model: str,
    *,
    device: Device = "auto",
    check: bool = True,
) -> LoadedIndex:
    """Open ``model``'s index for search (cached per build).

    Parameters
    ----------
    store : Store or path
    model : str
    device : {"auto", "cpu", "gpu"}
        ``auto``: a GPU copy for exact (Flat) indexes when faiss has GPU support and a
        GPU is present; CPU otherwise. Filtered searches always run on the CPU copy.
    check : bool
        Refuse a stale index (see :func:`index_status`). Leave on.

    Raises
    ------
    StaleIndexError
        If there is no index, or it does not cover the store's committed rows.
    """
    st = _open(store)
    dev = _resolve_device(device)
    folder = _index_dir(st, model)
    if check:
        status = index_status(st, model)
        if not status.fresh:
            raise StaleIndexError(status.reason)
        side = dict(status.sidecar or {})
    else:
        side = _read_sidecar(folder)
        if side is None:
            raise StaleIndexError(f"model {model!r} has no index; run `cxrstore index {st.path} build --model {model}`")
    key = (str(folder.resolve()), f"{side['build']}:{dev}")
    hit = _CACHE.get(key)
    if hit is not None:
        hit.sidecar = side
        return hit
    index = faiss.read_index(str(folder / side["files"]["index"]))
    _apply_params(index, side.get("search_params", {}))
    loaded = LoadedIndex(index=index, sidecar=side, rows=_covered_rows(folder, side), device=dev)
    if dev == "gpu":
        inner = inner_index(index)
        if isinstance(inner, faiss.IndexFlat):
            res = faiss.StandardGpuResources()
            loaded._gpu_res = res
            loaded._gpu = faiss.index_cpu_to_gpu(res, 0, inner)
            loaded._gpu_ids = faiss.vector_to_array(index.id_map)
        else:
            logger.info("index %r is not Flat: searching it on the CPU", side["factory"])
            loaded.device = "cpu"
    while len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = loaded
    return loaded
