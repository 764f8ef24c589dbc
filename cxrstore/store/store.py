"""The store: a zarr v3 group of row-aligned metadata, labels and per-model vectors.

Readers (:class:`Store`) see a snapshot: the commit record read when the store was
opened (or last :meth:`Store.refresh`-ed), and only rows and presence stamps it covers.
One writer at a time (:class:`StoreWriter`, from :meth:`Store.writer` or
:func:`open_writer`) stages rows, vectors and failures in memory and makes them visible
with :meth:`StoreWriter.commit`. See :mod:`cxrstore.store.format` for the layout and the
commit protocol.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from cxrstore import __version__
from cxrstore.errors import ProvenanceError, StoreError, StoreFormatError, StoreLockedError, UsageError
from cxrstore.store import format as fmt

if TYPE_CHECKING:
    from cxrstore.store.selection import Selection, Where

logger = logging.getLogger(__name__)

_RUNS_KEPT = 500


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """What the commit record says of one model."""

    dim: int
    dtype: str
    n_present: int

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "dtype": self.dtype, "n_present": self.n_present}


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """The committed state of a store; written last by every commit.

    Attributes
    ----------
    generation : int
        Incremented by every commit; presence stamps above it are not visible.
    n_rows : int
        Rows visible to readers: ``[0, n_rows)``.
    n_failures : int
        Failure records visible to readers.
    labels : tuple of str
        Names of the columns of the ``labels`` array, in order.
    columns : tuple of str
        Extra string metadata columns under ``rows/``, beyond the canonical ones.
    models : mapping of str to ModelEntry
        Committed models.
    committed_at : str
        ISO time of the commit.
    """

    generation: int = 0
    n_rows: int = 0
    n_failures: int = 0
    labels: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    models: Mapping[str, ModelEntry] = dataclasses.field(default_factory=dict)
    committed_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "n_rows": self.n_rows,
            "n_failures": self.n_failures,
            "labels": list(self.labels),
            "columns": list(self.columns),
            "models": {k: v.to_json() for k, v in sorted(self.models.items())},
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommitRecord:
        return cls(
            generation=int(data["generation"]),
            n_rows=int(data["n_rows"]),
            n_failures=int(data["n_failures"]),
            labels=tuple(data["labels"]),
            columns=tuple(data["columns"]),
            models={k: ModelEntry(int(v["dim"]), str(v["dtype"]), int(v["n_present"])) for k, v in data["models"].items()},
            committed_at=str(data.get("committed_at", "")),
        )


def _check_model_name(name: str) -> str:
    ok = name and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
    if not ok:
        raise UsageError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.'")
    return name


class Store:
    """A read-only snapshot of a cxrstore store folder.

    Parameters
    ----------
    path : str or Path
        The store folder (the one holding ``store.zarr``).

    Raises
    ------
    StoreError
        If the folder holds no store.
    StoreFormatError
        If the store's format or version is not one this cxrstore reads.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        zpath = self.path / fmt.ZARR_DIR
        if not (zpath / "zarr.json").is_file():
            raise StoreError(
                f"{self.path}: not a cxrstore store (no {fmt.ZARR_DIR}/zarr.json); "
                "create one with `cxrstore ingest` or `cxrstore demo`"
            )
        self._zstore = LocalStore(zpath)
        self._arrays: dict[str, zarr.Array] = {}
        self.refresh()

    # -- opening -----------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the root attributes: see everything committed since opening."""
        self._arrays.clear()
        self._root = zarr.open_group(store=self._zstore, mode="r", zarr_format=3)
        attrs = self._root.attrs.asdict()
        info = attrs.get(fmt.ATTR_FORMAT)
        if not isinstance(info, dict) or info.get("format") != fmt.FORMAT_NAME:
            raise StoreFormatError(f"{self.path}: the zarr group is not a cxrstore store (no '{fmt.ATTR_FORMAT}' attribute)")
        version = info.get("format_version")
        if version not in fmt.SUPPORTED_VERSIONS:
            raise StoreFormatError(
                f"{self.path}: store format version {version!r} is not supported by cxrstore {__version__} "
                f"(reads {sorted(fmt.SUPPORTED_VERSIONS)}); upgrade cxrstore to read it"
            )
        self.format_info: dict[str, Any] = dict(info)
        self.commit = CommitRecord.from_json(attrs[fmt.ATTR_COMMIT])
        self.runs: list[dict[str, Any]] = list(attrs.get("cxrstore_runs", []))

    def _array(self, key: str) -> zarr.Array:
        arr = self._arrays.get(key)
        if arr is None:
            try:
                arr = zarr.open_array(store=self._zstore, path=key, mode="r", zarr_format=3)
            except (FileNotFoundError, KeyError) as exc:
                raise StoreError(f"{self.path}: array {key!r} is missing; run `cxrstore verify`") from exc
            self._arrays[key] = arr
        return arr

    # -- what is in it -----------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.commit.n_rows

    @property
    def generation(self) -> int:
        return self.commit.generation

    @property
    def models(self) -> list[str]:
        return sorted(self.commit.models)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.commit.labels

    @property
    def columns(self) -> tuple[str, ...]:
        """Every metadata column name (canonical, extra), without labels."""
        return fmt.STR_COLUMNS + tuple(fmt.NUMERIC_COLUMNS) + self.commit.columns

    def _check_model(self, model: str) -> ModelEntry:
        try:
            return self.commit.models[model]
        except KeyError:
            have = ", ".join(self.models) or "none"
            raise UsageError(f"model {model!r} is not in store {self.path} (models: {have})") from None

    def provenance(self, model: str) -> dict[str, Any]:
        """The provenance recorded for ``model`` (encoder config, native shape, ...)."""
        self._check_model(model)
        group = zarr.open_group(store=self._zstore, path=f"models/{model}", mode="r", zarr_format=3)
        return dict(group.attrs["provenance"])

    def vectors_array(self, model: str) -> zarr.Array:
        """The zarr array of ``model``'s vectors (rows beyond ``n_rows`` are not committed)."""
        self._check_model(model)
        return self._array(f"models/{model}/vectors")

    def present(self, model: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: which rows (all committed, or ``rows``) have a committed ``model`` vector."""
        self._check_model(model)
        stamps = self._read(f"models/{model}/present", rows)
        return (stamps > 0) & (stamps <= self.commit.generation)

    def _read(self, key: str, rows: np.ndarray | None) -> np.ndarray:
        arr = self._array(key)
        n = self.commit.n_rows
        if n == 0:
            return np.zeros((0,), dtype=arr.dtype if not isinstance(arr.dtype, np.dtypes.StringDType) else object)
        if rows is None:
            return np.asarray(arr[:n])
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.asarray(arr[0:0])
        if rows.min() < 0 or rows.max() >= n:
            raise UsageError(f"row numbers must lie in [0, {n}) for store {self.path}")
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return np.asarray(arr[lo:hi])[rows - lo]

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """One metadata column for all committed rows, or for ``rows``."""
        if name not in self.columns:
            raise UsageError(f"unknown column {name!r}; columns: {', '.join(self.columns)}")
        values = self._read(f"rows/{name}", rows)
        if name in fmt.NUMERIC_COLUMNS:
            return values
        return values.astype(object)

    def label_matrix(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Labels as float32 (rows x labels): 1.0, 0.0 or NaN for missing."""
        n_labels = len(self.commit.labels)
        n_out = self.commit.n_rows if rows is None else len(rows)
        if n_labels == 0 or n_out == 0:
            return np.zeros((n_out, n_labels), np.float32)
        arr = self._array("labels")
        n = self.commit.n_rows
        if rows is None:
            raw = np.asarray(arr[:n, :n_labels])
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size == 0:
                return np.zeros((0, n_labels), np.float32)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            raw = np.asarray(arr[lo:hi, :n_labels])[rows - lo]
        out = raw.astype(np.float32)
        out[raw == fmt.LABEL_MISSING] = np.nan
        return out

    def metadata(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """Metadata and labels of committed rows as a DataFrame indexed by row number.

        Labels are float columns (1.0, 0.0, NaN for missing) named as in the store.
        """
        index = np.arange(self.commit.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        data: dict[str, Any] = {}
        for name in self.columns:
            data[name] = self.column(name, None if rows is None else index)
        labels = self.label_matrix(None if rows is None else index)
        for j, name in enumerate(self.commit.labels):
            data[name] = labels[:, j]
        df = pd.DataFrame(data, index=pd.Index(index, name="row"))
        return df

    def failures(self) -> pd.DataFrame:
        """Failure records (one per file that could not be ingested), committed ones only."""
        n = self.commit.n_failures
        cols = list(fmt.FAILURE_COLUMNS) + ["generation"]
        if n == 0:
            return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
        data = {c: np.asarray(self._array(f"failures/{c}")[:n]).astype(object) for c in fmt.FAILURE_COLUMNS}
        data["generation"] = np.asarray(self._array("failures/generation")[:n])
        return pd.DataFrame(data)

    def size_bytes(self) -> int:
        """Bytes on disk of the whole store folder."""
        total = 0
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total

    # -- queries -------------------------------------------------------------------
    def select(self, *, where: Where = None, model: str | None = None, rows: Sequence[int] | np.ndarray | None = None) -> Selection:
        """Choose rows: see :func:`cxrstore.store.selection.select`."""
        from cxrstore.store.selection import select

        return select(self, where=where, model=model, rows=rows)

    def writer(self) -> StoreWriter:
        """Open this store for writing (takes the write lock)."""
        return StoreWriter(self.path, create=False)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={self.n_rows}, models={self.models}, generation={self.generation})"


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open an existing store for reading. See :class:`Store`."""
    return Store(path)


def open_writer(path: str | os.PathLike[str], *, create: bool = True) -> StoreWriter:
    """Open (creating if asked and absent) a store for writing; use as a context manager."""
    return StoreWriter(path, create=create)


@dataclasses.dataclass
class RowData:
    """One row to append: canonical metadata, labels and extra string columns."""

    image_id: str
    path: str = ""
    sha256: str = ""
    dataset: str = ""
    variant: str = fmt.ORIGINAL
    source_row: int = -1
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    sex: str = ""
    age: float = float("nan")
    labels: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.image_id, self.variant)


class StoreWriter:
    """The one writer of a store: stages rows, vectors and failures, then commits.

    Use as a context manager; leaving it without :meth:`commit` discards what was
    staged (the store stays at its last commit). A second writer is refused with
    :class:`StoreLockedError`.

    Parameters
    ----------
    path : str or Path
        The store folder.
    create : bool
        Create the store if the folder holds none.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        zpath = self.path / fmt.ZARR_DIR
        exists = (zpath / "zarr.json").is_file()
        if not exists and not create:
            raise StoreError(f"{self.path}: not a cxrstore store (no {fmt.ZARR_DIR}/zarr.json)")
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path}: exists and is not a folder; choose another store path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(str(self.path / fmt.LOCK_FILE), timeout=0)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreLockedError(
                f"{self.path}: another process is writing to this store (lock {fmt.LOCK_FILE} is held); "
                "wait for it to finish, then run again"
            ) from None
        try:
            self._zstore = LocalStore(zpath)
            if not exists:
                self._create()
            self._root = zarr.open_group(store=self._zstore, mode="r+", zarr_format=3)
            self.store = Store(self.path)
            self._recover()
        except BaseException:
            self._lock.release()
            raise
        self._reset_staging()
        self._keys: dict[tuple[str, str], int] | None = None
        self._runs_pending: list[dict[str, Any]] = []

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the write lock; staged, uncommitted work is discarded."""
        if self._lock.is_locked:
            self._lock.release()

    def _create(self) -> None:
        root = zarr.open_group(store=self._zstore, mode="w", zarr_format=3)
        m = fmt.META_CHUNK_ROWS
        for name in fmt.STR_COLUMNS:
            root.create_array(f"rows/{name}", shape=(0,), chunks=(m,), dtype=str, fill_value="", **fmt.string_codecs())
        for name, dtype in fmt.NUMERIC_COLUMNS.items():
            fill = np.nan if dtype.startswith("float") else (-1 if name == "source_row" else 0)
            root.create_array(f"rows/{name}", shape=(0,), chunks=(m,), dtype=dtype, fill_value=fill, **fmt.numeric_codecs())
        root.create_array(
            "labels", shape=(0, 0), chunks=(m, fmt.LABEL_CHUNK_COLS), dtype="int8", fill_value=fmt.LABEL_MISSING, **fmt.numeric_codecs()
        )
        for name in fmt.FAILURE_COLUMNS:
            root.create_array(f"failures/{name}", shape=(0,), chunks=(4096,), dtype=str, fill_value="", **fmt.string_codecs())
        root.create_array("failures/generation", shape=(0,), chunks=(4096,), dtype="int32", fill_value=0, **fmt.numeric_codecs())
        root.require_group("models")
        # The format marker and the empty commit record are written last, in one file.
        root.attrs.update(
            {
                fmt.ATTR_FORMAT: {
                    "format": fmt.FORMAT_NAME,
                    "format_version": fmt.FORMAT_VERSION,
                    "created_by": f"cxrstore {__version__}",
                    "created_at": _now(),
                    "store_uuid": uuid.uuid4().hex,
                },
                fmt.ATTR_COMMIT: CommitRecord(committed_at=_now()).to_json(),
            }
        )
        logger.info("created store %s", self.path)

    def _recover(self) -> None:
        """Roll back whatever a crashed writer left beyond the last commit."""
        commit = self.store.commit
        removed = 0
        for dirpath, _, files in os.walk(self.path / fmt.ZARR_DIR):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(dirpath, f))
                    removed += 1
        if removed:
            logger.warning("%s: removed %d partial chunk files left by an interrupted writer", self.path, removed)
        models_dir = self.path / fmt.ZARR_DIR / "models"
        if models_dir.is_dir():
            for child in models_dir.iterdir():
                if child.is_dir() and child.name not in commit.models:
                    logger.warning("%s: removing uncommitted model %r left by an interrupted writer", self.path, child.name)
                    shutil.rmtree(child)
        for name in commit.models:
            present = zarr.open_array(store=self._zstore, path=f"models/{name}/present", mode="r+")
            chunk = present.chunks[0]
            for start in range(0, present.shape[0], chunk):
                block = np.asarray(present[start : start + chunk])
                stale = block > commit.generation
                if stale.any():
                    block[stale] = 0
                    present[start : start + chunk] = block
                    logger.warning("%s: rolled back %d uncommitted %r vectors", self.path, int(stale.sum()), name)

    def _reset_staging(self) -> None:
        self._new_rows: list[RowData] = []
        self._vectors: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._failures: list[dict[str, str]] = []
        self._new_models: dict[str, dict[str, Any]] = {}
        self._chunk_rows: dict[str, int] = {}
        self._labels: list[str] = list(self.store.commit.labels)
        self._columns: list[str] = list(self.store.commit.columns)

    # -- lookups -------------------------------------------------------------------
    def keys(self) -> dict[tuple[str, str], int]:
        """Map (image_id, variant) to row number, committed and staged rows."""
        if self._keys is None:
            ids = self.store.column("image_id")
            variants = self.store.column("variant")
            self._keys = {(str(i), str(v)): r for r, (i, v) in enumerate(zip(ids, variants))}
            for offset, row in enumerate(self._new_rows):
                self._keys[row.key] = self.store.n_rows + offset
        return self._keys

    def row_of(self, image_id: str, variant: str = fmt.ORIGINAL) -> int | None:
        return self.keys().get((image_id, variant))

    def present_mask(self, model: str) -> np.ndarray:
        """Committed presence of ``model`` over committed rows (all False for a new model)."""
        if model not in self.store.commit.models:
            return np.zeros(self.store.n_rows, dtype=bool)
        return self.store.present(model)

    # -- staging -------------------------------------------------------------------
    def ensure_model(
        self, name: str, provenance: Mapping[str, Any], *, dim: int, dtype: str = "float32", chunk_rows: int | None = None
    ) -> None:
        """Declare ``name`` with its provenance; refuse a different configuration.

        Raises
        ------
        ProvenanceError
            If the model exists with a different encoder configuration, dimension or
            preprocessing; the message names the fields that differ.

        ``chunk_rows`` overrides the rows per vector chunk of a new model (default: about
        4 MiB per chunk, see :func:`cxrstore.store.format.vector_chunk_rows`).
        """
        _check_model_name(name)
        if dtype not in ("float32", "float16"):
            raise UsageError(f"vector dtype {dtype!r} is not supported; choose float32 or float16")
        new = {**dict(provenance), "dim": int(dim), "dtype": dtype}
        if name in self.store.commit.models:
            old = self.store.provenance(name)
        elif name in self._new_models:
            old = self._new_models[name]
        else:
            self._new_models[name] = new
            if chunk_rows is not None:
                if chunk_rows < 1:
                    raise UsageError(f"chunk_rows must be positive, got {chunk_rows}")
                self._chunk_rows[name] = int(chunk_rows)
            return
        differ = _provenance_diff(old, new)
        if differ:
            raise ProvenanceError(
                f"{self.path}: model {name!r} was stored with a different configuration "
                f"({', '.join(differ)} differ); ingest under another --model name, or into another store"
            )

    def add_row(self, row: RowData) -> int:
        """Stage a new row; returns its row number. Refuses a duplicate key."""
        keys = self.keys()
        if row.key in keys:
            raise UsageError(f"row {row.key} already exists (row {keys[row.key]}); rows are never duplicated")
        if not row.image_id:
            raise UsageError("a row needs a non-empty image_id")
        for name in row.labels:
            if name not in self._labels:
                self._labels.append(name)
        for name in row.extra:
            if name in fmt.STR_COLUMNS or name in fmt.NUMERIC_COLUMNS:
                raise UsageError(f"extra column {name!r} clashes with a canonical column")
            if name not in self._columns:
                self._columns.append(name)
        number = self.store.n_rows + len(self._new_rows)
        self._new_rows.append(row)
        keys[row.key] = number
        return number

    def add_vectors(self, model: str, rows: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Stage vectors of ``model`` for existing or staged rows."""
        if model not in self.store.commit.models and model not in self._new_models:
            raise UsageError(f"model {model!r} not declared; call ensure_model first")
        dim = self._model_dim(model)
        rows = np.asarray(rows, dtype=np.int64)
        vectors = np.asarray(vectors)
        if vectors.shape != (rows.size, dim):
            raise UsageError(f"vectors for {model!r} have shape {vectors.shape}, expected ({rows.size}, {dim})")
        if not np.isfinite(vectors).all():
            bad = rows[~np.isfinite(vectors).all(axis=1)]
            raise UsageError(f"vectors for {model!r} contain NaN or infinite values (rows {bad[:5].tolist()})")
        limit = self.store.n_rows + len(self._new_rows)
        if rows.size and (rows.min() < 0 or rows.max() >= limit):
            raise UsageError(f"row numbers out of range [0, {limit})")
        if model in self.store.commit.models:
            old = rows[rows < self.store.n_rows]
            done = old[self.store.present(model, old)]
            if done.size:
                raise UsageError(
                    f"rows {done[:5].tolist()} already hold a committed {model!r} vector; stored vectors are never "
                    "overwritten (ingest into a new --model to re-encode)"
                )
        self._vectors.setdefault(model, []).append((rows, vectors))

    def add_failure(self, *, image_id: str, path: str, model: str, reason: str, run_id: str) -> None:
        """Stage a failure record (kept in the store, shown by `info` and the summary)."""
        self._failures.append({"image_id": image_id, "path": path, "model": model, "reason": reason, "run_id": run_id})

    def add_run(self, summary: Mapping[str, Any]) -> None:
        """Stage a run summary, recorded with the next commit."""
        self._runs_pending.append(dict(summary))

    @property
    def staged_rows(self) -> int:
        return len(self._new_rows)

    @property
    def staged_vectors(self) -> int:
        return sum(r.size for items in self._vectors.values() for r, _ in items)

    def _model_dim(self, model: str) -> int:
        if model in self._new_models:
            return int(self._new_models[model]["dim"])
        return self.store.commit.models[model].dim

    # -- commit --------------------------------------------------------------------
    def commit(self) -> CommitRecord:
        """Write everything staged, then the commit record; returns the new record.

        Until the commit record is written nothing staged is visible to readers; if the
        process dies before that, the next writer rolls the partial writes back.
        """
        old = self.store.commit
        gen = old.generation + 1
        n0, n1 = old.n_rows, old.n_rows + len(self._new_rows)
        root = self._root
        if self._new_rows:
            self._write_rows(n0, n1)
        models: dict[str, ModelEntry] = dict(old.models)
        for name, prov in self._new_models.items():
            self._create_model(name, prov)
            models[name] = ModelEntry(int(prov["dim"]), prov["dtype"], 0)
        for name, entry in models.items():
            vec = zarr.open_array(store=self._zstore, path=f"models/{name}/vectors", mode="r+")
            pres = zarr.open_array(store=self._zstore, path=f"models/{name}/present", mode="r+")
            if vec.shape[0] < n1:
                vec.resize((n1, entry.dim))
                pres.resize((n1,))
            if n1 > n0:
                # New rows start absent for every model (clears leftovers of a crashed writer).
                pres[n0:n1] = np.zeros(n1 - n0, dtype=np.int32)
            staged = self._vectors.get(name, [])
            if not staged:
                continue
            rows = np.concatenate([r for r, _ in staged])
            vecs = np.concatenate([v for _, v in staged]).astype(entry.dtype, copy=False)
            rows, first = np.unique(rows[::-1], return_index=True)  # last staged wins
            vecs = vecs[::-1][first]
            _write_rows_of(vec, rows, vecs)
            # Presence is stamped after the vectors are on disk.
            _write_rows_of(pres, rows, np.full(rows.size, gen, dtype=np.int32))
            # add_vectors refused rows already holding a committed vector: all of these are new.
            models[name] = ModelEntry(entry.dim, entry.dtype, entry.n_present + int(rows.size))
        nf0 = old.n_failures
        nf1 = nf0 + len(self._failures)
        if self._failures:
            for col in fmt.FAILURE_COLUMNS:
                arr = root[f"failures/{col}"]
                arr.resize((nf1,))
                arr[nf0:nf1] = np.array([f[col] for f in self._failures], dtype=object)
            arr = root["failures/generation"]
            arr.resize((nf1,))
            arr[nf0:nf1] = np.full(nf1 - nf0, gen, dtype=np.int32)
        record = CommitRecord(
            generation=gen,
            n_rows=n1,
            n_failures=nf1,
            labels=tuple(self._labels),
            columns=tuple(self._columns),
            models=models,
            committed_at=_now(),
        )
        update: dict[str, Any] = {fmt.ATTR_COMMIT: record.to_json()}
        if self._runs_pending:
            update["cxrstore_runs"] = (self.store.runs + self._runs_pending)[-_RUNS_KEPT:]
        root.attrs.update(update)  # the commit point: one atomic file replace
        self._runs_pending = []
        self.store.refresh()
        self._reset_staging()
        logger.debug("%s: committed generation %d (%d rows)", self.path, gen, n1)
        return record

    def _write_rows(self, n0: int, n1: int) -> None:
        root = self._root
        rows = self._new_rows
        for name in fmt.STR_COLUMNS:
            arr = root[f"rows/{name}"]
            arr.resize((n1,))
            arr[n0:n1] = np.array([str(getattr(r, name)) for r in rows], dtype=object)
        numeric = {
            "age": np.array([r.age if r.age is not None else np.nan for r in rows], dtype=np.float32),
            "source_row": np.array([r.source_row for r in rows], dtype=np.int64),
            "generation": np.full(len(rows), self.store.generation + 1, dtype=np.int32),
        }
        for name, values in numeric.items():
            arr = root[f"rows/{name}"]
            arr.resize((n1,))
            arr[n0:n1] = values
        for name in self._columns:
            key = f"rows/{name}"
            if name not in self.store.commit.columns and key not in root:
                root.create_array(key, shape=(0,), chunks=(fmt.META_CHUNK_ROWS,), dtype=str, fill_value="", **fmt.string_codecs())
            arr = root[key]
            if arr.shape[0] < n1:
                arr.resize((n1,))
            arr[n0:n1] = np.array([str(r.extra.get(name, "")) for r in rows], dtype=object)
        labels = root["labels"]
        n_labels = len(self._labels)
        if labels.shape[0] < n1 or labels.shape[1] < n_labels:
            labels.resize((max(n1, labels.shape[0]), max(n_labels, labels.shape[1])))
        if n_labels:
            block = np.full((n1 - n0, labels.shape[1]), fmt.LABEL_MISSING, dtype=np.int8)
            column = {name: j for j, name in enumerate(self._labels)}
            for i, r in enumerate(rows):
                for name, value in r.labels.items():
                    if value is not None and value == value:  # not None, not NaN
                        block[i, column[name]] = int(value)
            labels[n0:n1, :] = block

    def _create_model(self, name: str, prov: Mapping[str, Any]) -> None:
        dim, dtype = int(prov["dim"]), str(prov["dtype"])
        group = self._root.require_group(f"models/{name}")
        n = self.store.n_rows + len(self._new_rows)
        rows = self._chunk_rows.get(name) or fmt.vector_chunk_rows(dim, np.dtype(dtype).itemsize)
        group.create_array("vectors", shape=(n, dim), chunks=(rows, dim), dtype=dtype, fill_value=0.0, **fmt.vector_codecs())
        group.create_array("present", shape=(n,), chunks=(fmt.META_CHUNK_ROWS,), dtype="int32", fill_value=0, **fmt.numeric_codecs())
        group.attrs["provenance"] = {k: v for k, v in prov.items()}


def _write_rows_of(arr: zarr.Array, rows: np.ndarray, values: np.ndarray) -> None:
    """Write ``values`` at sorted, unique ``rows`` of ``arr``, rewriting each touched chunk once."""
    if rows.size == 0:
        return
    chunk = arr.chunks[0]
    ids = rows // chunk
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for seg_rows, seg_vals in zip(np.split(rows, bounds), np.split(values, bounds)):
        lo, hi = int(seg_rows[0]), int(seg_rows[-1]) + 1
        if hi - lo == seg_rows.size:
            arr[lo:hi] = seg_vals
        else:
            block = np.asarray(arr[lo:hi])
            block[seg_rows - lo] = seg_vals
            arr[lo:hi] = block


def _provenance_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of provenance fields that differ (``created_at`` and versions of cxrstore excluded)."""
    ignore = {"created_at", "cxrstore_version"}

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k in ignore:
                continue
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                out.update(flat(v, key + "."))
            else:
                out[key] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def iter_row_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Group an iterable into lists of ``size`` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
