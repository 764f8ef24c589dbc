"""``info``: what a store holds, as a JSON-ready dict."""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrstore.store.store import Store


def store_info(store: Store | str, *, failures: int = 10) -> dict[str, Any]:
    """Rows, models (dimension, presence, provenance), labels, failures and size on disk.

    Parameters
    ----------
    store : Store or str
    failures : int
        How many of the most recent failure records to include.
    """
    if not isinstance(store, Store):
        store = Store(store)
    commit = store.commit
    models = {}
    for name, entry in sorted(commit.models.items()):
        models[name] = {
            "dim": entry.dim,
            "dtype": entry.dtype,
            "rows_present": entry.n_present,
            "provenance": store.provenance(name),
        }
    labels: dict[str, dict[str, int]] = {}
    if commit.labels and commit.n_rows:
        matrix = store.label_matrix()
        for j, name in enumerate(commit.labels):
            col = matrix[:, j]
            labels[name] = {
                "positive": int(np.sum(col == 1)),
                "negative": int(np.sum(col == 0)),
                "missing": int(np.isnan(col).sum()),
            }
    datasets: dict[str, int] = {}
    patients = 0
    if commit.n_rows:
        values, counts = np.unique(store.column("dataset").astype(str), return_counts=True)
        datasets = {str(v): int(c) for v, c in zip(values, counts)}
        patients = int(np.unique(store.column("patient_id").astype(str)).size)
    fails = store.failures()
    return {
        "store": str(store.path),
        "format": store.format_info,
        "generation": commit.generation,
        "committed_at": commit.committed_at,
        "rows": commit.n_rows,
        "patients": patients,
        "datasets": datasets,
        "models": models,
        "labels": labels,
        "extra_columns": list(commit.columns),
        "failures_total": commit.n_failures,
        "failures_recent": fails.tail(failures).to_dict(orient="records"),
        "last_run": store.runs[-1] if store.runs else None,
        "size_bytes": store.size_bytes(),
    }
