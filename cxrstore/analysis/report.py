"""The paper table, ROC curves, subgroup metrics and the leakage report.

The table is laid out like the reference study's: one row per dataset and label plus a
per-dataset average, one column per model, each cell ``mean ± half-width`` of the 95%
interval (t-interval over folds by default), the best model of each row in bold.

The average row's mean is the mean of the label means; its half-width combines the
labels' half-widths as independent errors, ``sqrt(sum(h_i^2)) / L``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from cxrstore.errors import UsageError

CI = Literal["t", "bootstrap"]
AVERAGE = "Average"
METRIC_TITLES = {"auroc": "AUROC", "accuracy": "Accuracy", "f1": "F1"}


def _cell(mean: float, half: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def paper_table(
    summary: pd.DataFrame,
    *,
    metric: str = "auroc",
    models: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    ci: CI = "t",
    digits: int = 3,
) -> pd.DataFrame:
    """The study's table for one metric.

    Parameters
    ----------
    summary : DataFrame
        :attr:`ClassifyResult.summary` rows (one scheme), with columns model, dataset,
        label, metric, mean, t_half, pooled, boot_half.
    metric : {"auroc", "accuracy", "f1"}
    models, labels : sequences, optional
        Column and row order (default: order of appearance).
    ci : {"t", "bootstrap"}
        ``"t"``: fold mean ± t half-width; ``"bootstrap"``: pooled OOF metric ±
        bootstrap half-width.
    digits : int

    Returns
    -------
    DataFrame
        Columns ``dataset``, ``label``, then per model ``<model>`` (the formatted cell),
        ``<model>_mean`` and ``<model>_half``, and ``best`` (the best model(s) of the row,
        ``|``-joined).
    """
    if ci not in ("t", "bootstrap"):
        raise UsageError(f"ci must be 't' or 'bootstrap', not {ci!r}")
    df = summary[summary["metric"] == metric]
    if df.empty:
        raise UsageError(f"no {metric!r} rows in the summary; metrics: {sorted(set(summary['metric']))}")
    models = list(models) if models is not None else list(dict.fromkeys(df["model"]))
    labels = list(labels) if labels is not None else list(dict.fromkeys(df["label"]))
    mean_col, half_col = ("mean", "t_half") if ci == "t" else ("pooled", "boot_half")
    out = []
    for dataset in dict.fromkeys(df["dataset"]):
        block = df[df["dataset"] == dataset]
        rows = []
        for label in labels:
            rec: dict[str, Any] = {"dataset": dataset, "label": label}
            for m in models:
                hit = block[(block["model"] == m) & (block["label"] == label)]
                rec[f"{m}_mean"] = float(hit[mean_col].iloc[0]) if len(hit) else float("nan")
                rec[f"{m}_half"] = float(hit[half_col].iloc[0]) if len(hit) else float("nan")
            rows.append(rec)
        avg: dict[str, Any] = {"dataset": dataset, "label": AVERAGE}
        for m in models:
            means = np.array([r[f"{m}_mean"] for r in rows])
            halves = np.array([r[f"{m}_half"] for r in rows])
            avg[f"{m}_mean"] = float(np.mean(means)) if np.isfinite(means).all() else float("nan")
            avg[f"{m}_half"] = float(math.sqrt(float(np.sum(halves**2))) / len(halves)) if np.isfinite(halves).all() else float("nan")
        rows.append(avg)
        out.extend(rows)
    table = pd.DataFrame(out)
    for rec_i, rec in table.iterrows():
        means = {m: round(rec[f"{m}_mean"], digits) for m in models if np.isfinite(rec[f"{m}_mean"])}
        top = max(means.values()) if means else None
        table.loc[rec_i, "best"] = "|".join(m for m, v in means.items() if v == top) if means else ""
    for m in models:
        table[m] = [_cell(a, b, digits) for a, b in zip(table[f"{m}_mean"], table[f"{m}_half"])]
    cols = ["dataset", "label"] + models + [c for m in models for c in (f"{m}_mean", f"{m}_half")] + ["best"]
    table = table[cols]
    table.attrs.update({"metric": metric, "models": models, "ci": ci, "digits": digits})
    return table


def table_markdown(table: pd.DataFrame, *, title: str | None = None) -> str:
    """Markdown of a :func:`paper_table`, best cell per row in bold."""
    models = table.attrs.get("models") or [c for c in table.columns if c not in ("dataset", "label", "best") and not c.endswith(("_mean", "_half"))]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| Dataset | Label | " + " | ".join(models) + " |")
    lines.append("|---|---|" + "---|" * len(models))
    best_col = table["best"].astype(str)
    for (_, rec), best in zip(table.iterrows(), best_col):
        winners = set(best.split("|")) if best else set()
        cells = [f"**{rec[m]}**" if (m in winners and len(models) > 1) else str(rec[m]) for m in models]
        label = f"*{rec['label']}*" if rec["label"] == AVERAGE else str(rec["label"])
        lines.append(f"| {rec['dataset']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_json(table: pd.DataFrame) -> dict[str, Any]:
    """A :func:`paper_table` as JSON-ready data (numbers rounded to 6 digits)."""
    models = list(table.attrs.get("models", []))
    rows = []
    for _, rec in table.iterrows():
        rows.append({
            "dataset": rec["dataset"],
            "label": rec["label"],
            "best": [b for b in str(rec["best"]).split("|") if b],
            "cells": {m: {"mean": _num(rec[f"{m}_mean"]), "half_width": _num(rec[f"{m}_half"]), "text": rec[m]} for m in models},
        })
    return {"metric": table.attrs.get("metric"), "ci": table.attrs.get("ci"), "models": models, "rows": rows}


def _num(x: Any) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def dumps_json(data: Any) -> str:
    """Deterministic JSON text (sorted keys, no NaN)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_default) + "\n"


def _default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def tables_markdown(
    tables: Mapping[str, pd.DataFrame],
    *,
    leakage: pd.DataFrame | None = None,
    subgroups: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
) -> str:
    """All metric tables (AUROC first), the leakage report, subgroups and notes, as markdown."""
    parts = []
    for metric in ("auroc", "accuracy", "f1"):
        if metric in tables:
            ci = "t-interval over folds" if tables[metric].attrs.get("ci", "t") == "t" else "patient bootstrap over OOF predictions"
            parts.append(table_markdown(tables[metric], title=f"{METRIC_TITLES[metric]}, mean ± 95% CI half-width ({ci})"))
    if leakage is not None and not leakage.empty:
        parts.append(leakage_markdown(leakage))
    if subgroups is not None and not subgroups.empty:
        parts.append(subgroups_markdown(subgroups))
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# leakage, subgroups, ROC curves


def leakage_table(summary: pd.DataFrame, *, metric: str = "auroc") -> pd.DataFrame:
    """Grouped (patient-disjoint) folds next to naive (ungrouped) folds, and the gap."""
    df = summary[summary["metric"] == metric]
    g = df[df["scheme"] == "grouped"].set_index(["model", "dataset", "label"])
    n = df[df["scheme"] == "naive"].set_index(["model", "dataset", "label"])
    both = g[["mean", "t_half"]].merge(n[["mean", "t_half"]], left_index=True, right_index=True, how="inner", suffixes=("_grouped", "_naive"))
    both["gap"] = both["mean_naive"] - both["mean_grouped"]
    both = both.reset_index()
    both.insert(3, "metric", metric)
    return both


def leakage_markdown(leak: pd.DataFrame, *, digits: int = 3) -> str:
    lines = [
        "**Leakage report: naive (ungrouped) folds vs patient-grouped folds**",
        "",
        "| Model | Dataset | Label | Grouped | Naive | Naive - grouped |",
        "|---|---|---|---|---|---|",
    ]
    for r in leak.itertuples():
        lines.append(
            f"| {r.model} | {r.dataset} | {r.label} | {_cell(r.mean_grouped, r.t_half_grouped, digits)} | "
            f"{_cell(r.mean_naive, r.t_half_naive, digits)} | {r.gap:+.{digits}f} |"
        )
    return "\n".join(lines) + "\n"


def subgroups_markdown(sub: pd.DataFrame, *, digits: int = 3) -> str:
    """AUROC by sex and age band (pooled OOF, patient-bootstrap 95% interval)."""
    lines = [
        "**Subgroups: AUROC of out-of-fold predictions [95% patient-bootstrap interval]**",
        "",
        "| Model | Dataset | Label | By | Subgroup | n (positive) | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sub.itertuples():
        auc = "n/a" if not np.isfinite(r.auroc) else f"{r.auroc:.{digits}f} [{r.auroc_boot_low:.{digits}f}, {r.auroc_boot_high:.{digits}f}]"
        lines.append(f"| {r.model} | {r.dataset} | {r.label} | {r.by} | {r.subgroup} | {r.n} ({r.n_positive}) | {auc} |")
    return "\n".join(lines) + "\n"


def subgroup_metrics(
    y: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray,
    *,
    sex: np.ndarray,
    age: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Metrics of out-of-fold predictions by sex and by age band.

    Returns one record per subgroup: ``by`` ("sex" or "age_band"), ``subgroup``, ``n``,
    ``n_positive``, ``auroc``/``accuracy``/``f1`` on the pooled OOF predictions and the
    patient-bootstrap interval of AUROC (NaN when a subgroup holds one class only).
    """
    from cxrstore.analysis.classify import (
        AGE_BANDS,
        age_band,
        binary_metrics,
        bootstrap_intervals,
    )

    y = np.asarray(y)
    score = np.asarray(score)
    sex = np.where(np.isin(np.asarray(sex).astype(str), ["F", "M"]), np.asarray(sex).astype(str), "unknown")
    bands = age_band(np.asarray(age, dtype=np.float64))
    band_order = [b[0] for b in AGE_BANDS] + ["unknown"]
    out = []
    for by, values in (("sex", sex), ("age_band", bands)):
        present = set(values.tolist())
        order = sorted(present) if by == "sex" else [b for b in band_order if b in present]
        for sub in order:
            mask = values == sub
            m = binary_metrics(y[mask], score[mask])
            boot = bootstrap_intervals(y[mask], score[mask], np.asarray(groups)[mask], n_boot=n_boot, seed=seed, level=level)
            out.append({**dict(extra or {}), "by": by, "subgroup": sub, "n": int(mask.sum()),
                        "n_positive": int((y[mask] == 1).sum()), **m,
                        "auroc_boot_low": boot["auroc"][0], "auroc_boot_high": boot["auroc"][1]})
    return out


def roc_curve_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y), np.asarray(score))
    return fpr, tpr


def roc_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, title: str) -> bytes:
    """A PNG of ROC curves ``{legend: (y, score)}`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from cxrstore.analysis.classify import auroc

    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for legend, (y, s) in curves.items():
        if len(set(np.asarray(y).tolist())) < 2:
            continue
        fpr, tpr = roc_curve_points(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{legend} (AUROC {auroc(y, s):.3f})")
    ax.set_xlabel("False-positive rate")
    ax.set_ylabel("True-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if (c.isalnum() or c in "-_.=+,") else "_" for c in name)


def roc_pngs(samples: pd.DataFrame) -> dict[str, bytes]:
    """One ROC PNG per dataset and label (a curve per model) from OOF predictions."""
    out = {}
    for (dataset, label), block in samples.groupby(["dataset", "label"], sort=False):
        curves = {m: (b["y"].to_numpy(), b["oof"].to_numpy()) for m, b in block.groupby("model", sort=False)}
        out[f"roc_{_safe(str(dataset))}_{_safe(str(label))}.png"] = roc_png(curves, title=f"{dataset} / {label} (out-of-fold)")
    return out


def save(store: Any, name: str, **kwargs: Any) -> Any:
    """Save a classification result (kind ``"classify"``) via :func:`save_result`."""
    from cxrstore.store.results import save_result

    return save_result(store, "classify", name, **kwargs)
