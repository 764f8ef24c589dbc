"""The study's 16 cross-validations: cxrstore's LightGBM vs default LightGBM, fold by fold.

The reference study ran 5-fold cross-validation of LightGBM for 2 models x 2 datasets x
4 labels, on balanced samples of 2,000 images, at ELIXR's 24,576 features and
MedImageInsight's 1,024. This benchmark generates vectors of those shapes with planted
signal (a low-rank latent space with a label shift, a patient effect shared by a
patient's images, and per-feature noise; patients of one label with 1-3 images each),
then, for every cross-validation and every fold, in the same process and alternating:

- ``cxrstore``: :class:`cxrstore.analysis.classify.LightGBMFitter` with
  :data:`FAST_LGBM_PARAMS`: the binned Dataset built once per sample and each fold
  trained on ``Dataset.subset`` (its one-off build time is shared out over the folds),
  ``max_bin`` 63, ``feature_fraction`` 0.1, ``force_col_wise``, every core (1 thread
  for small problems);
- ``default``: ``lightgbm.LGBMClassifier(random_state=0).fit(X[train], y[train])`` and
  ``predict_proba(X[test])``: what a user would write.

Both use the same patient-grouped folds (``StratifiedGroupKFold``, seed 0). Reported
per fold: seconds and AUROC of each, and ``ratio = default / cxrstore``. Per CV: mean
AUROC of each and their difference. Target: ratio >= 15, |AUROC difference| <= 0.005.

Default LightGBM at 24,576 features costs about 200 s a fold on a quiet 2-core machine,
so the default side can be limited to some CVs (``--default-cvs N`` per width) and
folds (``--default-folds K``); cxrstore always runs all of them. The JSON is rewritten
after every CV, so an interrupted run keeps what it measured.

    python benchmarks/bench_classify.py --quick
    nice -n 5 python benchmarks/bench_classify.py --default-cvs 1 --out bench-out/classify.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrstore import __version__
from cxrstore.analysis.classify import (
    FAST_LGBM_PARAMS,
    LightGBMFitter,
    auroc,
    cpu_count,
    lightgbm_params,
    make_folds,
)
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODELS = (("elixr-like", 24576), ("mii-like", 1024))
DATASETS = ("mimic-like", "nih-like")
LABELS = ("Atelectasis", "Edema", "Effusion", "Opacity")
#: Label shift in the latent space, per label: gives AUROCs spread around the study's.
SHIFT = {"Atelectasis": 2.3, "Edema": 2.9, "Effusion": 3.5, "Opacity": 2.1}


def planted(n: int, dim: int, *, shift: float, seed: int, latent: int = 32, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` balanced rows of ``dim`` features with a planted label signal.

    Returns ``(X float32 (n, dim), y int8 (n,), groups int64 (n,))``; a patient's 1-3
    images share the label and a patient effect.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array([1, 0], dtype=np.int8), [n - n // 2, n // 2])
    groups = np.empty(n, dtype=np.int64)
    g = i = 0
    while i < n:
        j = min(n, i + int(rng.integers(1, 4)))
        if (y[i:j] != y[i]).any():
            j = i + int(np.argmax(y[i:j] != y[i]))
        groups[i:j] = g
        g += 1
        i = j
    u = rng.standard_normal(latent)
    u /= np.linalg.norm(u)
    patient = rng.standard_normal((g, latent)) * 0.8
    z = patient[groups] + rng.standard_normal((n, latent)) + shift * np.outer(y, u)
    w = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    x = z.astype(np.float32) @ w
    x += noise * rng.standard_normal((n, dim), dtype=np.float32)
    return x, y, groups


def default_fold(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, threads: int | None = None) -> np.ndarray:
    import lightgbm as lgb

    model = lgb.LGBMClassifier(random_state=0, verbose=-1, **({"n_jobs": threads} if threads else {}))
    model.fit(x[train], y[train])
    return model.predict_proba(x[test])[:, 1]


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import lightgbm
    import sklearn

    if args.quick:
        models = (("elixr-like", 2048), ("mii-like", 256))
        datasets, labels = DATASETS[:1], LABELS[:2]
    else:
        models = tuple((m, w) for m, w in MODELS if w in args.widths)
        datasets, labels = DATASETS, LABELS
    cases = [(m, w, d, lab) for m, w in models for d in datasets for lab in labels]
    # CVs compared with default LightGBM: the first --default-cvs of each width, run first.
    compare = set()
    for m, w in models:
        own = [c for c in cases if c[0] == m]
        compare.update(own[: args.default_cvs if args.default_cvs is not None else len(own)])
    cases.sort(key=lambda c: (c not in compare, -c[1] if args.widest_first else c[1]))
    if args.max_cvs is not None:
        cases = cases[: args.max_cvs]
    out: dict[str, Any] = {
        "benchmark": "classify",
        "cxrstore_version": __version__,
        "lightgbm": lightgbm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": {"cpus": cpu_count(), "platform": platform.platform(), "loadavg_start": loadavg()},
        "settings": {
            "rows": args.rows,
            "folds": args.folds,
            "quick": args.quick,
            "default_cvs_per_width": args.default_cvs,
            "default_folds": args.default_folds,
            "default_folds_wide": args.default_folds_wide,
            "default_fold_start": args.default_fold_start,
            "max_cvs": args.max_cvs,
            "threads_both_sides": args.threads,
            "cxrstore_params": {k: v for k, v in FAST_LGBM_PARAMS.items()},
            "default": "lightgbm.LGBMClassifier(random_state=0) fit/predict_proba per fold (bins rebuilt per fold)",
        },
        "cvs": [],
    }
    for m, w, d, lab in cases:
        seed = zlib.crc32(f"{m}/{d}/{lab}".encode()) % (2**31)
        x, y, groups = planted(args.rows, w, shift=SHIFT[lab], seed=seed)
        fold = make_folds(y, groups, folds=args.folds, seed=0)
        params = lightgbm_params(0, n_rows=x.shape[0], n_features=x.shape[1])
        if args.threads:
            params["num_threads"] = args.threads
        t0 = time.perf_counter()
        fitter = LightGBMFitter(x, y, params=params)
        build = time.perf_counter() - t0
        with_default = (m, w, d, lab) in compare
        recs = []
        oof_c = np.full(y.size, np.nan)
        for k in range(args.folds):
            train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            t0 = time.perf_counter()
            sc = fitter.fit_predict(train, test)
            tc = time.perf_counter() - t0
            oof_c[test] = sc
            rec: dict[str, Any] = {"fold": k, "cxrstore_s": round(tc, 3), "cxrstore_s_with_build_share": round(tc + build / args.folds, 3),
                                   "cxrstore_auroc": round(auroc(y[test], sc), 5), "default_s": None, "default_auroc": None, "ratio": None}
            limit = args.default_folds_wide if (w >= 8192 and args.default_folds_wide is not None) else args.default_folds
            if with_default and k >= args.default_fold_start and (limit is None or k < args.default_fold_start + limit):
                t0 = time.perf_counter()
                sd = default_fold(x, y, train, test, args.threads)
                td = time.perf_counter() - t0
                rec.update(default_s=round(td, 3), default_auroc=round(auroc(y[test], sd), 5),
                           ratio=round(td / rec["cxrstore_s_with_build_share"], 2))
            recs.append(rec)
            print(f"{m} {d} {lab} fold {k}: " + json.dumps(rec), file=sys.stderr, flush=True)
        both = [r for r in recs if r["default_s"] is not None]
        cv = {
            "model": m, "width": w, "dataset": d, "label": lab, "rows": int(y.size), "patients": int(np.unique(groups).size),
            "num_threads": params["num_threads"], "build_s": round(build, 3), "folds": recs,
            "cxrstore_total_s": round(build + sum(r["cxrstore_s"] for r in recs), 3),
            "cxrstore_auroc_mean": round(float(np.mean([r["cxrstore_auroc"] for r in recs])), 5),
        }
        if both:
            cx_part = sum(r["cxrstore_s_with_build_share"] for r in both)
            cv.update(
                default_folds_run=len(both),
                default_total_s=round(sum(r["default_s"] for r in both), 3),
                ratio_same_folds=round(sum(r["default_s"] for r in both) / cx_part, 2),
                cxrstore_auroc_mean_same_folds=round(float(np.mean([r["cxrstore_auroc"] for r in both])), 5),
                default_auroc_mean_same_folds=round(float(np.mean([r["default_auroc"] for r in both])), 5),
            )
            cv["auroc_diff"] = round(cv["cxrstore_auroc_mean_same_folds"] - cv["default_auroc_mean_same_folds"], 5)
        out["cvs"].append(cv)
        out["summary"] = summarize(out["cvs"])
        out["machine"]["loadavg_end"] = loadavg()
        emit(out, args.out, echo=False)
    return out


def summarize(cvs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"cvs_run": len(cvs), "cvs_with_default": sum(1 for c in cvs if "ratio_same_folds" in c)}
    for w in sorted({c["width"] for c in cvs}, reverse=True):
        mine = [c for c in cvs if c["width"] == w]
        comp = [c for c in mine if "ratio_same_folds" in c]
        ratios = [f["ratio"] for c in comp for f in c["folds"] if f["ratio"] is not None]
        s: dict[str, Any] = {
            "cvs": len(mine),
            "cxrstore_cv_s_median": round(statistics.median(c["cxrstore_total_s"] for c in mine), 2),
            "cxrstore_all_cvs_s": round(sum(c["cxrstore_total_s"] for c in mine), 2),
        }
        if comp:
            s.update(
                cvs_with_default=len(comp),
                folds_with_default=len(ratios),
                fold_ratio_median=round(statistics.median(ratios), 2),
                fold_ratio_min=round(min(ratios), 2),
                fold_ratio_max=round(max(ratios), 2),
                default_fold_s_median=round(statistics.median(f["default_s"] for c in comp for f in c["folds"] if f["default_s"] is not None), 2),
                auroc_diff_max_abs=round(max(abs(c["auroc_diff"]) for c in comp), 5),
                auroc_diffs=[c["auroc_diff"] for c in comp],
            )
        summary[str(w)] = s
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 small widths, 1 dataset, 2 labels, 400 rows, 3 folds")
    ap.add_argument("--rows", type=int, default=None, help="rows per sample (default 2000; 400 with --quick)")
    ap.add_argument("--folds", type=int, default=None, help="folds (default 5; 3 with --quick)")
    ap.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=[24576, 1024])
    ap.add_argument("--default-cvs", type=int, default=None, help="CVs per width also run with default LightGBM (default: all)")
    ap.add_argument("--default-folds", type=int, default=None, help="folds of those CVs run with default LightGBM (default: all)")
    ap.add_argument("--default-folds-wide", type=int, default=None, help="the same for widths >= 8,192 (default: --default-folds)")
    ap.add_argument("--default-fold-start", type=int, default=0, help="first fold run with default LightGBM (default 0)")
    ap.add_argument("--max-cvs", type=int, default=None, help="stop after this many CVs (compared ones run first)")
    ap.add_argument("--widest-first", action="store_true", help="run the widest CVs first")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for BOTH sides (default: LightGBM's default for 'default', cxrstore's rule for cxrstore); "
                         "use 1 on a machine loaded by other jobs, where OpenMP threads contend")
    ap.add_argument("--out", default=None, help="write the JSON here too (rewritten after every CV)")
    args = ap.parse_args(argv)
    if args.rows is None:
        args.rows = 400 if args.quick else 2000
    if args.folds is None:
        args.folds = 3 if args.quick else 5
    out = run(args)
    emit(out, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
