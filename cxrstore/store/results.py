"""Results stored under the store, with the parameters that made them.

Classification tables, kNN graphs, cluster labels, UMAP coordinates, plots: each result
is a folder ``STORE/results/<kind>/<name>/`` holding

- ``result.json``: kind, name, parameters, summary, the store generation it was computed
  on, cxrstore version, time, and the list of what else is in the folder
  (schema: ``schemas/result.schema.json``);
- ``<array>.npy`` for arrays (open with ``numpy.load``, memory-mapped if large);
- ``<table>.csv`` for tables;
- any other files (PNG plots, markdown tables) under their own names.

A result is written into a temporary folder and renamed into place, so a reader never
sees half a result, and results can be written while an ingest holds the write lock.
Re-saving the same kind and name replaces the old result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrstore import __version__
from cxrstore.errors import StoreError, UsageError

RESULTS_DIR = "results"


def _store_path(store: Any) -> Path:
    return Path(getattr(store, "path", store))


def _check_name(what: str, value: str) -> str:
    if not value or not all(c.isalnum() or c in "-_.=+," for c in value) or value.startswith("."):
        raise UsageError(f"invalid result {what} {value!r}: use letters, digits and -_.=+,")
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """A stored result: its metadata, and accessors for its arrays, tables and files."""

    path: Path
    kind: str
    name: str
    params: dict[str, Any]
    summary: dict[str, Any]
    meta: dict[str, Any]

    def array(self, name: str, *, mmap: bool = False) -> np.ndarray:
        if name not in self.meta.get("arrays", []):
            raise UsageError(f"result {self.kind}/{self.name} has no array {name!r}; it has {self.meta.get('arrays', [])}")
        return np.load(self.path / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.meta.get("tables", []):
            raise UsageError(f"result {self.kind}/{self.name} has no table {name!r}; it has {self.meta.get('tables', [])}")
        return pd.read_csv(self.path / f"{name}.csv", keep_default_na=True)

    def file(self, name: str) -> Path:
        if name not in self.meta.get("files", []):
            raise UsageError(f"result {self.kind}/{self.name} has no file {name!r}; it has {self.meta.get('files', [])}")
        return self.path / name


def save_result(
    store: Any,
    kind: str,
    name: str,
    *,
    params: Mapping[str, Any],
    summary: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Result:
    """Write a result atomically under ``STORE/results/<kind>/<name>``.

    Parameters
    ----------
    store : Store or path
        The store (its folder).
    kind, name : str
        E.g. ``"cluster"``, ``"baseline-k15"``.
    params : mapping
        Everything needed to recompute the result (JSON-serialisable).
    summary : mapping, optional
        Headline figures (JSON-serialisable).
    arrays, tables, files : mappings, optional
        Saved as ``.npy``, ``.csv`` and raw bytes.

    Returns
    -------
    Result
    """
    base = _store_path(store)
    if not (base / "store.zarr").is_dir():
        raise StoreError(f"{base}: not a cxrstore store; results live inside a store folder")
    _check_name("kind", kind)
    _check_name("name", name)
    arrays, tables, files = dict(arrays or {}), dict(tables or {}), dict(files or {})
    for key in list(arrays) + list(tables) + list(files):
        _check_name("entry", key)
    generation = None
    try:
        from cxrstore.store.store import Store

        generation = (store if isinstance(store, Store) else Store(base)).generation
    except StoreError:
        pass
    meta = {
        "kind": kind,
        "name": name,
        "params": json.loads(json.dumps(dict(params), default=_jsonable)),
        "summary": json.loads(json.dumps(dict(summary or {}), default=_jsonable)),
        "store_generation": generation,
        "cxrstore_version": __version__,
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "arrays": sorted(arrays),
        "tables": sorted(tables),
        "files": sorted(files),
    }
    root = base / RESULTS_DIR
    final = root / kind / name
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", np.asarray(arr), allow_pickle=False)
        for key, df in tables.items():
            df.to_csv(tmp / f"{key}.csv", index=False)
        for key, data in files.items():
            (tmp / key).write_bytes(data)
        (tmp / "result.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = root / f".old-{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_result(base, kind, name)


def load_result(store: Any, kind: str, name: str) -> Result:
    """Read a stored result's metadata (arrays and tables load on access)."""
    path = _store_path(store) / RESULTS_DIR / kind / name
    try:
        meta = json.loads((path / "result.json").read_text())
    except FileNotFoundError:
        have = [f"{k}/{n}" for k, n, _ in list_results(store)]
        raise UsageError(f"no result {kind}/{name} in {_store_path(store)}; stored results: {', '.join(have) or 'none'}") from None
    return Result(path=path, kind=kind, name=name, params=meta["params"], summary=meta["summary"], meta=meta)


def list_results(store: Any, kind: str | None = None) -> list[tuple[str, str, str]]:
    """``(kind, name, created_at)`` of every stored result, sorted."""
    root = _store_path(store) / RESULTS_DIR
    out = []
    if not root.is_dir():
        return out
    for kdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if kind is not None and kdir.name != kind:
            continue
        for rdir in sorted(p for p in kdir.iterdir() if (p / "result.json").is_file()):
            meta = json.loads((rdir / "result.json").read_text())
            out.append((kdir.name, rdir.name, meta.get("created_at", "")))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
