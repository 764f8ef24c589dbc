"""Join store rows with a clinical table (CSV or Parquet) on patient or study id.

The clinical table is read whole (clinical tables are small next to vectors). Two ways
to match a store row to a clinical record:

- **exact** on ``patient_id`` or ``study_id``: the clinical table must hold at most one
  record per key (a duplicated key is refused, naming examples);
- **nearest date**: with ``date_column`` (a date in the clinical table) and
  ``store_date_column`` (a store metadata column holding the study date, e.g. an extra
  manifest column ``study_date``), each row takes the clinical record of the same key
  whose date is nearest its own, within ``tolerance`` (``pandas.merge_asof`` by key).

Clinical columns keep their names; one that clashes with a store column is renamed
``clinical_<name>``. Rows without a match are kept with missing values (``unmatched=
"keep"``), dropped, or refused, and always reported (:class:`ClinicalReport`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from cxrstore.errors import UsageError

logger = logging.getLogger(__name__)

JoinOn = Literal["patient_id", "study_id"]
JOIN_ON_CHOICES: tuple[str, ...] = get_args(JoinOn)
Unmatched = Literal["keep", "drop", "error"]
UNMATCHED_CHOICES: tuple[str, ...] = get_args(Unmatched)

_KEY = "__cxr_key"
_DATE = "__cxr_date"
_POS = "__cxr_pos"
_HIT = "__cxr_hit"


def read_clinical(source: str | os.PathLike[str] | pd.DataFrame, *, key: str) -> pd.DataFrame:
    """Read a clinical table: ``.csv`` (also ``.csv.gz``, ``.tsv``) or ``.parquet`` / ``.pq``.

    The ``key`` column is read as strings (so ``00123`` stays ``00123``).
    """
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"clinical table {path} does not exist")
        name = path.name.lower()
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            df = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", dtype={key: str}, keep_default_na=True)
        else:
            raise UsageError(f"clinical table {path}: unknown format; use a .csv, .tsv, .csv.gz or .parquet file")
    if key not in df.columns:
        raise UsageError(f"clinical table has no {key!r} column to join on; its columns: {', '.join(map(str, df.columns))}")
    return df


@dataclasses.dataclass
class ClinicalReport:
    """How the join went: matched and unmatched store rows, unused clinical records."""

    join_on: str
    date_column: str | None
    store_date_column: str | None
    tolerance: str | None
    columns: list[str]
    rows: int
    matched: int
    unmatched_rows: np.ndarray
    unmatched_image_ids: np.ndarray
    clinical_records: int
    clinical_unused: int
    policy: str

    @property
    def unmatched(self) -> int:
        return int(self.unmatched_rows.size)

    def to_json(self, *, limit: int = 20) -> dict[str, Any]:
        return {
            "join_on": self.join_on,
            "date_column": self.date_column,
            "store_date_column": self.store_date_column,
            "tolerance": self.tolerance,
            "columns": self.columns,
            "rows": self.rows,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "unmatched_policy": self.policy,
            "unmatched_rows": self.unmatched_rows[:limit].tolist(),
            "unmatched_image_ids": [str(i) for i in self.unmatched_image_ids[:limit]],
            "clinical_records": self.clinical_records,
            "clinical_unused": self.clinical_unused,
        }


def _timedelta(tolerance: str | pd.Timedelta | None) -> pd.Timedelta | None:
    if tolerance is None or isinstance(tolerance, pd.Timedelta):
        return tolerance
    try:
        return pd.Timedelta(tolerance)
    except (ValueError, TypeError):
        raise UsageError(f"date tolerance {tolerance!r} is not a duration; write e.g. '30D', '12h' or '7 days'") from None


def join_clinical(
    meta: pd.DataFrame,
    clinical: pd.DataFrame,
    *,
    on: JoinOn = "patient_id",
    date_column: str | None = None,
    store_date_column: str | None = None,
    tolerance: str | pd.Timedelta | None = None,
    columns: Sequence[str] | None = None,
    unmatched: Unmatched = "keep",
) -> tuple[pd.DataFrame, ClinicalReport]:
    """Match each store row (a row of ``meta``) with at most one clinical record.

    Parameters
    ----------
    meta : DataFrame
        Store metadata (index: row number), e.g. ``Selection.metadata()``.
    clinical : DataFrame
        The clinical table (see :func:`read_clinical`).
    on : {"patient_id", "study_id"}
    date_column, store_date_column : str, optional
        Match the nearest date within a key (both or neither).
    tolerance : str or Timedelta, optional
        Largest date difference accepted (``"30D"``); None: any.
    columns : sequence of str, optional
        Clinical columns to keep (default: all but the key).
    unmatched : {"keep", "drop", "error"}
        Rows with no clinical record: kept with missing values, dropped (the returned
        frame then has fewer rows), or refused with :class:`UsageError`.

    Returns
    -------
    joined : DataFrame
        The clinical columns, indexed like ``meta`` (minus dropped rows).
    report : ClinicalReport
    """
    if on not in JOIN_ON_CHOICES:
        raise UsageError(f"join on {on!r} is not supported; choose one of {', '.join(JOIN_ON_CHOICES)}")
    if unmatched not in UNMATCHED_CHOICES:
        raise UsageError(f"unmatched={unmatched!r} is not valid; choose one of {', '.join(UNMATCHED_CHOICES)}")
    if (date_column is None) != (store_date_column is None):
        raise UsageError("a nearest-date join needs both date_column (clinical table) and store_date_column (store metadata)")
    if on not in meta.columns:
        raise UsageError(f"store metadata has no {on!r} column")
    if on not in clinical.columns:
        raise UsageError(f"clinical table has no {on!r} column; its columns: {', '.join(map(str, clinical.columns))}")
    if columns is None:
        columns = [c for c in clinical.columns if c != on]
    else:
        bad = [c for c in columns if c not in clinical.columns]
        if bad:
            raise UsageError(f"clinical columns {bad} not found; its columns: {', '.join(map(str, clinical.columns))}")
        columns = [c for c in columns if c != on]
    tol = _timedelta(tolerance)
    keys = meta[on].astype(str).to_numpy()
    right = clinical[[on, *columns] + ([date_column] if date_column and date_column not in columns else [])].copy()
    right[_KEY] = right[on].astype(str)
    right = right[right[on].notna() & (right[_KEY] != "")]
    right[_HIT] = np.arange(len(right))
    n = len(meta)
    if date_column is None:
        dup = right[_KEY][right[_KEY].duplicated()]
        if len(dup):
            raise UsageError(
                f"clinical table has {dup.nunique()} {on} values with several records (e.g. {', '.join(dup.unique()[:5])}); "
                "give a date column to match the nearest study date, or keep one record per key"
            )
        table = right.set_index(_KEY)
        picked = table.reindex(keys)
        hit = picked[_HIT].to_numpy()
        out = picked[list(columns)]
    else:
        if store_date_column not in meta.columns:
            raise UsageError(f"store has no column {store_date_column!r} for the study date; columns: {', '.join(map(str, meta.columns))}")
        if date_column not in clinical.columns:
            raise UsageError(f"clinical table has no date column {date_column!r}; its columns: {', '.join(map(str, clinical.columns))}")
        left = pd.DataFrame({_POS: np.arange(n), _KEY: keys, _DATE: _to_datetime(meta[store_date_column], store_date_column)})
        right[_DATE] = _to_datetime(right[date_column], date_column)
        right = right[right[_DATE].notna()]
        valid = left[left[_DATE].notna()].sort_values(_DATE, kind="stable")
        merged = pd.merge_asof(
            valid, right.drop(columns=[on]).sort_values(_DATE, kind="stable"), on=_DATE, by=_KEY, direction="nearest", tolerance=tol
        )
        merged = merged.set_index(_POS).reindex(np.arange(n))
        hit = merged[_HIT].to_numpy()
        keep_cols = list(columns) + ([date_column] if date_column not in columns else [])
        out = merged[keep_cols]
        columns = keep_cols
    out = out.copy()
    out.index = meta.index
    matched = ~pd.isna(hit)
    rename = {c: f"clinical_{c}" for c in columns if c in meta.columns}
    out = out.rename(columns=rename)
    unmatched_rows = np.asarray(meta.index[~matched])
    image_ids = meta["image_id"].to_numpy()[~matched] if "image_id" in meta.columns else unmatched_rows.astype(str)
    used = np.unique(hit[matched].astype(np.int64)) if matched.any() else np.zeros(0, np.int64)
    report = ClinicalReport(
        join_on=on,
        date_column=date_column,
        store_date_column=store_date_column,
        tolerance=None if tol is None else str(tol),
        columns=[rename.get(c, c) for c in columns],
        rows=n,
        matched=int(matched.sum()),
        unmatched_rows=unmatched_rows,
        unmatched_image_ids=np.asarray(image_ids),
        clinical_records=len(clinical),
        clinical_unused=int(len(right) - used.size) + int(len(clinical) - len(right)),
        policy=unmatched,
    )
    if report.unmatched:
        logger.info("clinical join: %d of %d rows have no clinical record", report.unmatched, n)
        if unmatched == "error":
            raise UsageError(
                f"{report.unmatched} of {n} rows have no clinical record on {on} (e.g. {', '.join(map(str, image_ids[:5]))}); "
                "use unmatched='keep' or 'drop'"
            )
        if unmatched == "drop":
            out = out[matched]
    return out, report


def _to_datetime(values: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        out = values
    else:
        out = pd.to_datetime(values.replace("", None), errors="coerce", format="mixed")
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert(None)
    return out.astype("datetime64[ns]")
