"""The export step of ``cxrstore demo``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cxrstore.export.writers import SUFFIXES, ExportReport, export
from cxrstore.store.store import Store

logger = logging.getLogger(__name__)


def export_demo(
    store: Store | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    models: Sequence[str] | None = None,
    formats: Sequence[str] = ("anndata", "npz"),
) -> dict[str, ExportReport]:
    """Export every model of the (demo) store, fused and L2-normalised, in ``formats``.

    Writes ``out_dir/fused.h5ad`` (with the stored kNN graph and UMAP when a cluster step
    ran before) and ``out_dir/fused.npz``, replacing earlier ones. Prints nothing.

    Returns
    -------
    dict
        Format -> :class:`~cxrstore.export.writers.ExportReport` (``.to_json()`` for a
        summary: rows, dim, bytes, seconds, graph included or why not).
    """
    st = store if isinstance(store, Store) else Store(store)
    chosen = list(models) if models else st.models
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for fmt in formats:
        reports[fmt] = export(st, models=chosen, out=out / f"fused{SUFFIXES[fmt]}", format=fmt, overwrite=True)  # type: ignore[arg-type]
    return reports
