"""Classification benchmark: the reference study's protocol, leak-free, with CIs.

Protocol (per model, dataset and label)
---------------------------------------
1. A balanced, seeded sample: ``n_per_class`` originals with the finding and as many
   without (:func:`cxrstore.store.sampling.balanced_sample`); the same images for every
   model (rows must hold a vector of every requested model).
2. Stratified K-fold cross-validation **grouped by patient** (scikit-learn's
   ``StratifiedGroupKFold``, shuffled with ``seed``): no patient, and no augmented copy of
   an image, is on both sides of a split. Augmented variants (``augment="train"``) join
   the training folds of their source image only; evaluation is always on originals.
3. A classifier on the embedding (flat view; ``view="mean"`` averages the tokens
   of a matrix embedding such as ELIXR's 32 x 768): LightGBM (the study's choice) or
   logistic regression (standardised features, L2, lbfgs).
4. Accuracy (threshold 0.5 on the predicted probability), AUROC and F1 per fold, and the
   out-of-fold (OOF) prediction of every sampled image.

Confidence intervals (both are reported)
----------------------------------------
- **t-interval over folds** (the study's "mean with a 95% CI"): the mean of the K fold
  metrics ± ``t(0.975, K-1) * sd / sqrt(K)``. It treats the folds as independent draws;
  because training sets overlap it tends to be somewhat narrow for a *trained*
  classifier, and with K = 5 it is wide by construction (t = 2.78).
- **Patient-cluster bootstrap over the OOF predictions**: the metric is computed on the
  pooled OOF predictions; patients (groups) are resampled with replacement ``n_boot``
  times (default 1,000, seeded) and the 2.5th and 97.5th percentiles of the metric form
  the interval (percentile bootstrap). Resampling patients rather than images respects
  the correlation of images of one patient.

Both intervals' coverage is checked by simulation in ``tests/test_classify.py``.

Speed without changing the science (LightGBM)
---------------------------------------------
The study's model is LightGBM's defaults (100 rounds, learning rate 0.1, 31 leaves,
20 rows per leaf). cxrstore keeps those and changes only how the work is done:

- the binned ``lightgbm.Dataset`` is built ONCE per sample (``free_raw_data=False``)
  and each fold trains on ``Dataset.subset(train_indices)``, which reuses the bins
  instead of re-binning 24,576 features per fold. Bin boundaries are then quantiles of
  the unlabelled feature values of the whole sample (no label enters them);
- ``max_bin`` (:data:`FAST_LGBM_PARAMS`), fewer candidate thresholds per feature;
- ``feature_fraction`` (a random subset of features per tree, seeded);
- ``force_col_wise`` (no row-/col-wise trial), ``enable_bundle=False`` (exclusive
  feature bundling finds nothing to bundle in dense embeddings but costs a third of the
  binning time at 24,576 features; predictions are identical) and ``num_threads`` =
  every core (1 for small problems, see :func:`auto_threads`).

``benchmarks/bench_classify.py`` measures the speed-up fold by fold against default
LightGBM and checks that AUROC stays within 0.005.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from cxrstore.errors import UsageError
from cxrstore.store.views import VIEWS

if TYPE_CHECKING:
    from cxrstore.store.store import Store

logger = logging.getLogger(__name__)

Classifier = Literal["lightgbm", "logistic"]
CLASSIFIERS: tuple[str, ...] = ("lightgbm", "logistic")
View = Literal["flat", "mean"]
METRICS: tuple[str, ...] = ("auroc", "accuracy", "f1")

#: LightGBM's defaults, as ``LGBMClassifier()`` trains them (the study's classifier).
DEFAULT_LGBM_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "min_sum_hessian_in_leaf": 1e-3,
    "lambda_l1": 0.0,
    "lambda_l2": 0.0,
    "bagging_fraction": 1.0,
    "max_bin": 255,
    "feature_fraction": 1.0,
}
DEFAULT_NUM_ROUNDS = 100

#: cxrstore's settings: the same model (rounds, learning rate, leaves, leaf size), fewer
#: bins and a random feature subset per tree; see the module docstring.
FAST_LGBM_PARAMS: dict[str, Any] = {
    **DEFAULT_LGBM_PARAMS,
    "max_bin": 63,
    "feature_fraction": 0.1,
    "force_col_wise": True,
    "enable_bundle": False,
    "deterministic": True,
    "verbose": -1,
}


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Below this many (rows x features per tree), one thread beats several: OpenMP's
#: fork/join per histogram costs more than the work (and far more on a loaded machine).
SMALL_PROBLEM = 2_000_000


def auto_threads(n_rows: int | None, n_features: int | None, feature_fraction: float = 1.0) -> int:
    """Threads for LightGBM: every core, or 1 for small problems (see :data:`SMALL_PROBLEM`)."""
    if n_rows is None or n_features is None:
        return cpu_count()
    return cpu_count() if n_rows * n_features * feature_fraction >= SMALL_PROBLEM else 1


def lightgbm_params(
    seed: int = 0,
    *,
    fast: bool = True,
    overrides: Mapping[str, Any] | None = None,
    n_rows: int | None = None,
    n_features: int | None = None,
) -> dict[str, Any]:
    """LightGBM parameters for :class:`LightGBMFitter` (``fast=False``: library defaults).

    ``num_threads`` is every core, or 1 for a small problem when its size is given
    (:func:`auto_threads`); ``overrides`` win over everything.
    """
    params = dict(FAST_LGBM_PARAMS if fast else {**DEFAULT_LGBM_PARAMS, "verbose": -1})
    ff = float(params.get("feature_fraction", 1.0)) if fast else 1.0
    params.update({"seed": int(seed), "num_threads": auto_threads(n_rows, n_features, ff) if fast else cpu_count()})
    params.update(dict(overrides or {}))
    return params


# ---------------------------------------------------------------------------------------
# metrics and intervals


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when one class is absent."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, score: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and F1 at ``threshold`` on the score, and AUROC."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score) >= threshold
    tp = float((pred & y).sum())
    fp = float((pred & ~y).sum())
    fn = float((~pred & y).sum())
    acc = float((pred == y).mean()) if y.size else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0
    return {"auroc": auroc(y, score), "accuracy": acc, "f1": float(f1)}


def t_interval(values: Sequence[float] | np.ndarray, *, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and ``level`` t-interval of ``values`` (NaNs dropped): ``(mean, low, high)``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def bootstrap_intervals(
    y: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of AUROC, accuracy and F1, resampling groups.

    Parameters
    ----------
    y, score : ndarray, shape (n,)
        Labels (0/1) and out-of-fold scores.
    groups : ndarray, shape (n,), optional
        Group (patient) of each row: whole groups are resampled with replacement. Each
        row is its own group when omitted.
    n_boot : int
        Bootstrap replicates.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    dict
        ``{"auroc": (low, high), "accuracy": ..., "f1": ...}``.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n = y.size
    if n == 0 or n_boot < 1:
        return {m: (float("nan"), float("nan")) for m in METRICS}
    if groups is None:
        gidx = np.arange(n)
    else:
        _, gidx = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(gidx.max()) + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)
    w = counts[:, gidx]  # (B, n) weight of each row in each replicate
    pred = score >= threshold
    # accuracy and F1
    tot = w.sum(axis=1)
    acc = (w * (pred == y)).sum(axis=1) / tot
    tp = (w * (pred & y)).sum(axis=1)
    fp = (w * (pred & ~y)).sum(axis=1)
    fn = (w * (~pred & y)).sum(axis=1)
    den = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
    # AUROC with weights: sort once, aggregate weights per distinct score
    order = np.argsort(score, kind="stable")
    s_sorted = score[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    wp = np.add.reduceat(w[:, order] * y[order], starts, axis=1)
    wn = np.add.reduceat(w[:, order] * ~y[order], starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
    den_auc = wp.sum(axis=1) * wn.sum(axis=1)
    auc = np.full(n_boot, np.nan)
    np.divide(num, den_auc, out=auc, where=den_auc > 0)
    lo, hi = 50 * (1 - level), 100 - 50 * (1 - level)
    out = {}
    for name, stat in (("auroc", auc), ("accuracy", acc), ("f1", f1)):
        stat = stat[np.isfinite(stat)]
        out[name] = (float(np.percentile(stat, lo)), float(np.percentile(stat, hi))) if stat.size else (float("nan"),) * 2
    return out


# ---------------------------------------------------------------------------------------
# folds


def make_folds(
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    grouped: bool = True,
) -> np.ndarray:
    """Fold number (0..folds-1) of each row: stratified, grouped by patient by default.

    ``grouped=False`` gives the naive (ungrouped) ``StratifiedKFold`` split that a
    leakage report compares against.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise UsageError(f"folds must be an integer >= 2, not {folds!r}")
    n_min = int(min((y == 1).sum(), (y == 0).sum()))
    n_groups = int(np.unique(np.asarray(groups).astype(str)).size)
    if grouped and n_groups < folds:
        raise UsageError(f"folds={folds} needs at least {folds} patients; the sample has {n_groups}")
    if n_min < folds:
        raise UsageError(f"folds={folds} needs at least {folds} rows of each class; the sample has {n_min}")
    out = np.full(y.size, -1, dtype=np.int64)
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(y.size), y, np.asarray(groups).astype(str))
    else:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(y.size), y)
    for k, (_, test) in enumerate(splits):
        out[test] = k
    return out


# ---------------------------------------------------------------------------------------
# classifiers: fit on some rows of X, predict others


class LightGBMFitter:
    """LightGBM on one sample: bins built once, each fold trains on a subset.

    Parameters
    ----------
    X : ndarray, shape (n, d)
        Every row a fold may train or test on (originals and attached variants).
    y : ndarray, shape (n,)
    params : mapping, optional
        LightGBM parameters (default :func:`lightgbm_params`).
    num_rounds : int
        Boosting rounds (LightGBM's default 100).
    reuse_bins : bool
        True (cxrstore): one binned Dataset for all folds. False: bin each fold's
        training rows afresh, as ``LGBMClassifier.fit`` does.
    """

    name = "lightgbm"

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        params: Mapping[str, Any] | None = None,
        num_rounds: int = DEFAULT_NUM_ROUNDS,
        reuse_bins: bool = True,
    ) -> None:
        import lightgbm as lgb

        self._lgb = lgb
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.float64)
        self.params = dict(params if params is not None else lightgbm_params())
        self.num_rounds = int(num_rounds)
        self.reuse_bins = reuse_bins
        t0 = time.perf_counter()
        self._full = None
        if reuse_bins:
            self._full = lgb.Dataset(self.X, label=self.y, params=self.params, free_raw_data=False).construct()
        self.build_seconds = time.perf_counter() - t0

    def settings(self) -> dict[str, Any]:
        return {"classifier": "lightgbm", "params": dict(self.params), "num_rounds": self.num_rounds, "reuse_bins": self.reuse_bins}

    def fit_predict(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        lgb = self._lgb
        train = np.sort(np.asarray(train, dtype=np.int64))
        if self._full is not None:
            data = self._full.subset(train.tolist())
        else:
            data = lgb.Dataset(self.X[train], label=self.y[train], params=self.params)
        booster = lgb.train(self.params, data, num_boost_round=self.num_rounds)
        return np.asarray(booster.predict(self.X[np.asarray(test, dtype=np.int64)], num_threads=self.params.get("num_threads", 0)))


class LogisticFitter:
    """Standardised features + L2 logistic regression (lbfgs), deterministic."""

    name = "logistic"

    def __init__(self, X: np.ndarray, y: np.ndarray, *, C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> None:
        self.X = np.asarray(X, dtype=np.float64)
        self.y = np.asarray(y).astype(np.int64)
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.build_seconds = 0.0

    def settings(self) -> dict[str, Any]:
        return {"classifier": "logistic", "C": self.C, "max_iter": self.max_iter, "scaler": "standard", "solver": "lbfgs"}

    def fit_predict(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(self.X[train])
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(scaler.transform(self.X[train]), self.y[train])
        return model.predict_proba(scaler.transform(self.X[test]))[:, 1]


def make_fitter(
    X: np.ndarray,
    y: np.ndarray,
    *,
    classifier: Classifier = "lightgbm",
    seed: int = 0,
    lgbm_params: Mapping[str, Any] | None = None,
) -> LightGBMFitter | LogisticFitter:
    """The classifier for one sample (its LightGBM bins are built here, once)."""
    if classifier == "lightgbm":
        params = lightgbm_params(seed, overrides=lgbm_params, n_rows=X.shape[0], n_features=X.shape[1])
        return LightGBMFitter(X, y, params=params)
    if classifier == "logistic":
        return LogisticFitter(X, y, seed=seed)
    raise UsageError(f"classifier must be one of {', '.join(CLASSIFIERS)}, not {classifier!r}")


# ---------------------------------------------------------------------------------------
# cross-validation


@dataclasses.dataclass
class CVResult:
    """One cross-validation: folds, out-of-fold scores, per-fold metrics and intervals.

    Attributes
    ----------
    fold : ndarray of int64, shape (n,)
        Test fold of each evaluated row.
    oof : ndarray of float64, shape (n,)
        Out-of-fold predicted probability of each evaluated row.
    fold_metrics : DataFrame
        One row per fold: fold, n_train, n_test, auroc, accuracy, f1, seconds.
    summary : dict
        Per metric: mean, t_low, t_high, t_half (t-interval over folds), pooled,
        boot_low, boot_high, boot_half (patient bootstrap over OOF predictions).
    build_seconds : float
        Time spent building the classifier's data (LightGBM bins), once per sample.
    """

    fold: np.ndarray
    oof: np.ndarray
    fold_metrics: pd.DataFrame
    summary: dict[str, dict[str, float]]
    build_seconds: float = 0.0


def summarize(
    fold_metrics: pd.DataFrame,
    y: np.ndarray,
    oof: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Both intervals for every metric (see the module docstring)."""
    pooled = binary_metrics(y, oof)
    boot = bootstrap_intervals(y, oof, groups, n_boot=n_boot, seed=seed, level=level)
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        mean, lo, hi = t_interval(fold_metrics[m].to_numpy(), level=level)
        blo, bhi = boot[m]
        out[m] = {
            "mean": mean,
            "t_low": lo,
            "t_high": hi,
            "t_half": (hi - lo) / 2,
            "pooled": pooled[m],
            "boot_low": blo,
            "boot_high": bhi,
            "boot_half": (bhi - blo) / 2,
        }
    return out


def cross_validate(
    fitter: LightGBMFitter | LogisticFitter,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    grouped: bool = True,
    fold_ids: np.ndarray | None = None,
    aug_index: np.ndarray | None = None,
    aug_source: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
) -> CVResult:
    """K-fold cross-validation of ``fitter`` over the originals of one sample.

    Parameters
    ----------
    fitter : LightGBMFitter or LogisticFitter
        Built on the matrix whose first ``len(y)`` rows are the sample's originals (and
        whose rows ``aug_index`` are attached augmented variants).
    y, groups : ndarray, shape (n,)
        Labels and patient groups of the originals.
    folds, seed, grouped :
        Passed to :func:`make_folds` unless ``fold_ids`` is given.
    fold_ids : ndarray, optional
        Precomputed fold of each original.
    aug_index, aug_source : ndarray, optional
        Row in the fitter's matrix of each augmented variant, and the position (in
        ``y``) of its source original: a variant trains only in folds where its source
        trains, and is never tested on.
    n_boot, level :
        Bootstrap replicates and interval level.

    Returns
    -------
    CVResult
    """
    y = np.asarray(y).astype(np.int8)
    fold = make_folds(y, groups, folds=folds, seed=seed, grouped=grouped) if fold_ids is None else np.asarray(fold_ids)
    n_folds = int(fold.max()) + 1
    aug_index = np.empty(0, dtype=np.int64) if aug_index is None else np.asarray(aug_index, dtype=np.int64)
    aug_source = np.empty(0, dtype=np.int64) if aug_source is None else np.asarray(aug_source, dtype=np.int64)
    oof, fm = _fold_loop(fitter, n_folds, fold, fold, y, aug_index, aug_source)
    summary = summarize(fm, y, oof, groups, n_boot=n_boot, seed=seed, level=level)
    return CVResult(fold=fold, oof=oof, fold_metrics=fm, summary=summary, build_seconds=float(fitter.build_seconds))


def _fold_loop(
    fitter: LightGBMFitter | LogisticFitter,
    n_folds: int,
    train_fold: np.ndarray,
    test_fold: np.ndarray,
    y_test: np.ndarray,
    aug_index: np.ndarray,
    aug_source: np.ndarray,
    *,
    test_offset: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Fit on every fold but k, predict fold k: out-of-fold scores and per-fold metrics.

    ``train_fold``/``test_fold`` give each training/test row's fold (the same array for
    cross-validation; two data sets for transfer, the test rows then sitting at
    ``test_offset + position`` in the fitter's data). Augmented rows ``aug_index`` train
    only in the folds where their source (``aug_source``, a training position) trains.
    """
    oof = np.full(y_test.size, np.nan)
    rows = []
    for k in range(n_folds):
        train = np.flatnonzero(train_fold != k)
        if aug_index.size:
            train = np.concatenate([train, aug_index[train_fold[aug_source] != k]])
        test = np.flatnonzero(test_fold == k)
        t0 = time.perf_counter()
        oof[test] = fitter.fit_predict(train, test_offset + test)
        seconds = time.perf_counter() - t0
        m = binary_metrics(y_test[test], oof[test])
        rows.append({"fold": k, "n_train": int(train.size), "n_test": int(test.size), **m, "seconds": seconds})
    return oof, pd.DataFrame(rows)


def transfer_validate(
    fitter: LightGBMFitter | LogisticFitter,
    y_train: np.ndarray,
    groups_train: np.ndarray,
    y_test: np.ndarray,
    groups_test: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    aug_index: np.ndarray | None = None,
    aug_source: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
) -> CVResult:
    """Cross-dataset transfer: train on one dataset's folds, test on another's.

    The fitter's matrix holds the training sample's originals first (``len(y_train)``
    rows), then the test sample's originals, then any augmented variants of the training
    sample. Both samples are split into ``folds`` grouped, stratified folds; fold k
    trains on the training sample without its fold k and tests on the test sample's fold
    k, so the K test sets are disjoint and every test image gets one out-of-fold score.
    """
    y_train = np.asarray(y_train).astype(np.int8)
    y_test = np.asarray(y_test).astype(np.int8)
    f_train = make_folds(y_train, groups_train, folds=folds, seed=seed)
    f_test = make_folds(y_test, groups_test, folds=folds, seed=seed)
    n_tr = y_train.size
    aug_index = np.empty(0, dtype=np.int64) if aug_index is None else np.asarray(aug_index, dtype=np.int64)
    aug_source = np.empty(0, dtype=np.int64) if aug_source is None else np.asarray(aug_source, dtype=np.int64)
    oof, fm = _fold_loop(fitter, folds, f_train, f_test, y_test, aug_index, aug_source, test_offset=n_tr)
    summary = summarize(fm, y_test, oof, groups_test, n_boot=n_boot, seed=seed, level=level)
    return CVResult(fold=f_test, oof=oof, fold_metrics=fm, summary=summary, build_seconds=float(fitter.build_seconds))


# ---------------------------------------------------------------------------------------
# the store-level command


AGE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<40", -np.inf, 40),
    ("40-59", 40, 60),
    ("60-79", 60, 80),
    ("80+", 80, np.inf),
)


def age_band(age: np.ndarray) -> np.ndarray:
    """Age band of each age (``"unknown"`` for NaN)."""
    age = np.asarray(age, dtype=np.float64)
    out = np.full(age.size, "unknown", dtype=object)
    for name, lo, hi in AGE_BANDS:
        out[(age >= lo) & (age < hi)] = name
    return out


def _read_vectors(store: Store, model: str, rows: np.ndarray, view: View) -> np.ndarray:
    """Vectors of ``rows`` (any order, duplicates allowed), streamed chunk by chunk."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    sel = store.select(model=model, rows=uniq)
    if len(sel) != uniq.size:  # pragma: no cover - rows were chosen among present ones
        raise UsageError(f"some sampled rows have no {model!r} vector")
    return sel.vectors(model, view=view)[inverse]


@dataclasses.dataclass
class ClassifyResult:
    """What :func:`classify` returns (everything is also saved in the store).

    Attributes
    ----------
    summary : DataFrame
        One row per (model, dataset, label, scheme, metric) with both intervals.
    folds : DataFrame
        Per-fold metrics.
    samples : DataFrame
        One row per sampled image and (model, scheme): row, image id, group, label,
        fold, OOF score. ``role`` is "original" for evaluated originals, "augmented" for
        augmented training copies (fold = their source's fold) and, for transfer, "train"
        for the training dataset's originals (fold k trains without its fold k).
    subgroups : DataFrame or None
    leakage : DataFrame or None
    tables : dict
        Paper tables (:func:`cxrstore.analysis.report.paper_table`) per metric.
    markdown : str
        The AUROC, accuracy and F1 tables as markdown.
    notes : list of str
        Warnings (shortfalls of the sample...).
    name : str
        Result name under ``STORE/results/classify/``.
    path : pathlib.Path or None
        Folder of the saved result.
    """

    summary: pd.DataFrame
    folds: pd.DataFrame
    samples: pd.DataFrame
    subgroups: pd.DataFrame | None
    leakage: pd.DataFrame | None
    tables: dict[str, pd.DataFrame]
    markdown: str
    notes: list[str]
    name: str
    params: dict[str, Any]
    path: Any = None

    def to_json_tables(self) -> dict[str, Any]:
        """The paper tables and notes only (deterministic: no paths, no timings)."""
        from cxrstore.analysis.report import table_json

        return {"name": self.name, "tables": {m: table_json(t) for m, t in self.tables.items()}, "notes": list(self.notes)}

    def to_json(self) -> dict[str, Any]:
        from cxrstore.analysis.report import table_json

        return {
            "name": self.name,
            "path": str(self.path) if self.path is not None else None,
            "params": self.params,
            "tables": {m: table_json(t) for m, t in self.tables.items()},
            "summary": _records(self.summary.drop(columns=["build_seconds", "cv_seconds"], errors="ignore")),
            "leakage": _records(self.leakage) if self.leakage is not None else None,
            "notes": list(self.notes),
        }


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in rec.items()})
    return out


def _versions() -> dict[str, str]:
    import lightgbm
    import sklearn

    from cxrstore import __version__

    return {"cxrstore": __version__, "lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def classify(
    store: Store | str | os.PathLike[str],
    *,
    models: Sequence[str],
    labels: Sequence[str],
    where: Any = None,
    n_per_class: int = 1000,
    folds: int = 5,
    seed: int = 0,
    classifier: Classifier = "lightgbm",
    augment: Literal["none", "train"] = "none",
    train_on: str | None = None,
    test_on: str | None = None,
    subgroups: bool = True,
    leakage_report: bool = False,
    view: View = "flat",
    n_boot: int = 1000,
    level: float = 0.95,
    lgbm_params: Mapping[str, Any] | None = None,
    name: str | None = None,
    save: bool = True,
    roc_plots: bool = True,
) -> ClassifyResult:
    """Run the study's classification protocol on a store and save the table.

    Parameters
    ----------
    store : Store or path
    models : sequence of str
        Models of the store to compare (table columns).
    labels : sequence of str
        Labels to classify (one sample and one cross-validation each, per dataset).
    where : str or mapping, optional
        Metadata filter applied before sampling (see :func:`cxrstore.store.selection.select`).
    n_per_class : int
        Images with and without the finding per sample (default 1,000).
    folds : int
        Cross-validation folds (default 5).
    seed : int
        Seed of sampling, folds, classifier and bootstrap.
    classifier : {"lightgbm", "logistic"}
    augment : {"none", "train"}
        ``"train"``: augmented variants of the sampled images join training folds.
    train_on, test_on : str, optional
        Cross-dataset transfer: train on dataset ``train_on``, test on ``test_on``
        (both or neither).
    subgroups : bool
        Also report metrics by sex and age band (on the OOF predictions).
    leakage_report : bool
        Also run naive (ungrouped) folds on the same samples and report the gap.
    view : {"flat", "mean"}
        Flat vector, or the mean over tokens for matrix embeddings.
    n_boot, level : int, float
        Bootstrap replicates and interval level.
    lgbm_params : mapping, optional
        Overrides of :data:`FAST_LGBM_PARAMS`.
    name : str, optional
        Result name (default: derived from the parameters, so the same command
        replaces its own result).
    save : bool
        Save under ``STORE/results/classify/<name>``.
    roc_plots : bool
        Save one ROC PNG per dataset and label.

    Returns
    -------
    ClassifyResult
    """
    from cxrstore.analysis import report
    from cxrstore.store.sampling import AUGMENT_CHOICES, balanced_sample
    from cxrstore.store.selection import select
    from cxrstore.store.store import Store

    if not isinstance(store, Store):
        store = Store(store)
    models = list(dict.fromkeys(models))
    labels = list(dict.fromkeys(labels))
    if not models:
        raise UsageError(f"give at least one model; models of this store: {', '.join(store.models) or 'none'}")
    if not labels:
        raise UsageError(f"give at least one label; labels of this store: {', '.join(store.labels) or 'none'}")
    for m in models:
        if m not in store.models:
            raise UsageError(f"unknown model {m!r}; models of this store: {', '.join(store.models) or 'none'}")
    for lab in labels:
        if lab not in store.labels:
            raise UsageError(f"unknown label {lab!r}; labels of this store: {', '.join(store.labels) or 'none'}")
    if classifier not in CLASSIFIERS:
        raise UsageError(f"classifier must be one of {', '.join(CLASSIFIERS)}, not {classifier!r}")
    if augment not in AUGMENT_CHOICES:
        raise UsageError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, not {augment!r}")
    if view not in VIEWS:
        raise UsageError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    if (train_on is None) != (test_on is None):
        raise UsageError("give both train_on and test_on (cross-dataset transfer), or neither")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed!r}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise UsageError(f"folds must be an integer >= 2, not {folds!r}")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise UsageError(f"n_per_class must be a positive integer, not {n_per_class!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UsageError(f"n_boot must be a positive integer, not {n_boot!r}")
    if not 0 < level < 1:
        raise UsageError(f"level must lie in (0, 1), e.g. 0.95, not {level!r}")
    from cxrstore.store.views import model_view_dim

    for m in models:
        model_view_dim(store, m, view)  # refuses "mean" for a one-axis embedding

    base = select(store, where=where)
    rows = base.rows
    for m in models:
        rows = rows[store.present(m, rows)]
    base = select(store, rows=rows) if rows.size else base.subset([])
    if len(base) == 0:
        raise UsageError(f"no row matches where={where!r} with vectors of every model in {models}")
    dataset_col = store.column("dataset", base.rows).astype(str)
    variant_col = store.column("variant", base.rows).astype(str)
    datasets = sorted(set(dataset_col[variant_col == "original"].tolist()))
    if train_on is not None:
        for d in (train_on, test_on):
            if d not in datasets:
                raise UsageError(f"unknown dataset {d!r}; datasets in the selection: {', '.join(datasets)}")
        if train_on == test_on:
            raise UsageError(f"train_on and test_on are both {train_on!r}; leave both out for cross-validation within a dataset")
        if leakage_report:
            raise UsageError("leakage_report compares fold schemes within a dataset; it does not apply to train_on/test_on")
        tasks = [(f"{train_on}->{test_on}", train_on, test_on)]
    else:
        tasks = [(d, d, None) for d in datasets]

    params: dict[str, Any] = {
        "models": models,
        "labels": labels,
        "where": where if (where is None or isinstance(where, str)) else dict(where),
        "n_per_class": int(n_per_class),
        "folds": int(folds),
        "seed": int(seed),
        "classifier": classifier,
        "augment": augment,
        "train_on": train_on,
        "test_on": test_on,
        "view": view,
        "subgroups": bool(subgroups),
        "leakage_report": bool(leakage_report),
        "n_boot": int(n_boot),
        "level": float(level),
        "threshold": 0.5,
        "label_policy": "label value 1 = with the finding, 0 = without; missing (NaN) never sampled",
        "datasets": [t[0] for t in tasks],
    }
    if classifier == "lightgbm":
        lp = lightgbm_params(seed, overrides=lgbm_params)
        if not (lgbm_params and "num_threads" in lgbm_params):
            lp["num_threads"] = f"auto: {cpu_count()} cores, 1 below {SMALL_PROBLEM} rows x features per tree"
        params["classifier_settings"] = {"params": lp, "num_rounds": DEFAULT_NUM_ROUNDS, "reuse_bins": True}
    else:
        params["classifier_settings"] = LogisticFitter(np.zeros((1, 1)), np.zeros(1), seed=seed).settings()
    key = json.dumps({k: v for k, v in params.items() if k != "classifier_settings"}, sort_keys=True, default=str)
    key += json.dumps({k: v for k, v in params["classifier_settings"].items() if k != "params"}, sort_keys=True, default=str)
    if lgbm_params:
        key += json.dumps(dict(lgbm_params), sort_keys=True, default=str)
    if name is None:
        name = f"{classifier}-seed{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    params["versions"] = _versions()
    params["num_threads"] = cpu_count()

    def _subset_rows(dataset: str) -> Any:
        return base.subset(base.rows[dataset_col == dataset])

    summary_rows: list[dict[str, Any]] = []
    fold_rows: list[pd.DataFrame] = []
    sample_frames: list[pd.DataFrame] = []
    subgroup_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    samples_cache: dict[tuple[str, str], Any] = {}

    def _sample(dataset: str, label: str) -> Any:
        if (dataset, label) not in samples_cache:
            s = balanced_sample(_subset_rows(dataset), label, n_per_class=n_per_class, seed=seed, augment=augment)
            notes.extend(f"{dataset}: {n}" for n in s.notes)
            samples_cache[(dataset, label)] = s
        return samples_cache[(dataset, label)]

    meta_all = store.metadata(base.rows)
    meta_all = meta_all.set_index(base.rows) if meta_all.index.name != "row" else meta_all

    for task, train_ds, test_ds in tasks:
        for label in labels:
            s_tr = _sample(train_ds, label)
            s_te = _sample(test_ds, label) if test_ds is not None else None
            if s_te is not None:
                overlap = np.intersect1d(s_tr.groups, s_te.groups)
                if overlap.size:
                    raise UsageError(
                        f"{overlap.size} patients are in both {train_ds!r} and {test_ds!r} samples (e.g. {overlap[0]!r}); "
                        "transfer needs disjoint patients"
                    )
            for model in models:
                eval_rows = s_tr.rows if s_te is None else s_te.rows
                all_rows = np.concatenate([s_tr.rows] + ([s_te.rows] if s_te is not None else []) + [s_tr.aug_rows])
                X = _read_vectors(store, model, all_rows, view)
                y_all = np.concatenate([s_tr.y] + ([s_te.y] if s_te is not None else []) + [s_tr.aug_y]).astype(np.int8)
                n_orig = s_tr.rows.size + (s_te.rows.size if s_te is not None else 0)
                aug_index = n_orig + np.arange(s_tr.aug_rows.size)
                fitter = make_fitter(X, y_all, classifier=classifier, seed=seed, lgbm_params=lgbm_params)
                schemes: list[tuple[str, CVResult]] = []
                if s_te is None:
                    cv = cross_validate(fitter, s_tr.y, s_tr.groups, folds=folds, seed=seed, aug_index=aug_index,
                                        aug_source=s_tr.aug_source, n_boot=n_boot, level=level)
                    schemes.append(("grouped", cv))
                    if leakage_report:
                        cvn = cross_validate(fitter, s_tr.y, s_tr.groups, folds=folds, seed=seed, grouped=False,
                                             aug_index=aug_index, aug_source=s_tr.aug_source, n_boot=n_boot, level=level)
                        schemes.append(("naive", cvn))
                    y_eval, g_eval = s_tr.y, s_tr.groups
                else:
                    cv = transfer_validate(fitter, s_tr.y, s_tr.groups, s_te.y, s_te.groups, folds=folds, seed=seed,
                                           aug_index=aug_index, aug_source=s_tr.aug_source, n_boot=n_boot, level=level)
                    schemes.append(("grouped", cv))
                    y_eval, g_eval = s_te.y, s_te.groups
                for scheme, res in schemes:
                    sample_info = {"n_positive": int((y_eval == 1).sum()), "n_negative": int((y_eval == 0).sum()),
                                   "short": bool(s_tr.short or (s_te.short if s_te is not None else False)),
                                   "build_seconds": res.build_seconds, "cv_seconds": float(res.fold_metrics["seconds"].sum())}
                    for metric, vals in res.summary.items():
                        summary_rows.append({"model": model, "dataset": task, "label": label, "scheme": scheme,
                                             "metric": metric, **vals, **sample_info})
                    fm = res.fold_metrics.copy()
                    fm.insert(0, "scheme", scheme)
                    fm.insert(0, "label", label)
                    fm.insert(0, "dataset", task)
                    fm.insert(0, "model", model)
                    fold_rows.append(fm)
                    frame = pd.DataFrame({
                        "model": model, "dataset": task, "label": label, "scheme": scheme, "role": "original",
                        "row": eval_rows, "image_id": meta_all.loc[eval_rows, "image_id"].to_numpy(),
                        "group": g_eval, "y": y_eval.astype(int), "fold": res.fold, "oof": res.oof,
                    })
                    train_fold = res.fold if s_te is None else make_folds(s_tr.y, s_tr.groups, folds=folds, seed=seed)
                    if s_te is not None:  # transfer: the training sample too (fold k trains without its fold k)
                        frame = pd.concat([frame, pd.DataFrame({
                            "model": model, "dataset": task, "label": label, "scheme": scheme, "role": "train",
                            "row": s_tr.rows, "image_id": meta_all.loc[s_tr.rows, "image_id"].to_numpy(),
                            "group": s_tr.groups, "y": s_tr.y.astype(int), "fold": train_fold, "oof": np.nan,
                        })], ignore_index=True)
                    if s_tr.aug_rows.size and scheme == "grouped":
                        src_fold = train_fold[s_tr.aug_source]
                        frame = pd.concat([frame, pd.DataFrame({
                            "model": model, "dataset": task, "label": label, "scheme": scheme, "role": "augmented",
                            "row": s_tr.aug_rows, "image_id": meta_all.loc[s_tr.aug_rows, "image_id"].to_numpy(),
                            "group": s_tr.aug_groups, "y": s_tr.aug_y.astype(int), "fold": src_fold, "oof": np.nan,
                        })], ignore_index=True)
                    sample_frames.append(frame)
                    if subgroups and scheme == "grouped":
                        meta = meta_all.loc[eval_rows]
                        subgroup_rows.extend(report.subgroup_metrics(
                            y_eval, res.oof, g_eval, sex=meta["sex"].astype(str).to_numpy(), age=meta["age"].to_numpy(),
                            n_boot=n_boot, seed=seed, level=level,
                            extra={"model": model, "dataset": task, "label": label}))
                logger.info("%s %s %s: AUROC %.3f", model, task, label, cv.summary["auroc"]["mean"])
                del X, fitter

    summary = pd.DataFrame(summary_rows)
    folds_df = pd.concat(fold_rows, ignore_index=True)
    samples = pd.concat(sample_frames, ignore_index=True)
    sub_df = pd.DataFrame(subgroup_rows) if subgroups else None
    leak_df = report.leakage_table(summary) if leakage_report else None
    grouped = summary[summary["scheme"] == "grouped"]
    tables = {m: report.paper_table(grouped, metric=m, models=models, labels=labels) for m in METRICS}
    markdown = report.tables_markdown(tables, leakage=leak_df, subgroups=sub_df, notes=notes)
    result = ClassifyResult(summary=summary, folds=folds_df, samples=samples, subgroups=sub_df, leakage=leak_df,
                            tables=tables, markdown=markdown, notes=notes, name=name, params=params)
    if save:
        files = {"table.md": markdown.encode(), "table.json": report.dumps_json(result.to_json_tables()).encode()}
        for m, t in tables.items():
            files[f"table_{m}.csv"] = t.to_csv(index=False).encode()
        if roc_plots:
            files.update(report.roc_pngs(samples[(samples["scheme"] == "grouped") & (samples["role"] == "original")]))
        tabs = {"summary": summary, "folds": folds_df, "samples": samples}
        if sub_df is not None:
            tabs["subgroups"] = sub_df
        if leak_df is not None:
            tabs["leakage"] = leak_df
        headline = {f"{r.model}|{r.dataset}|{r.label}": round(float(r.mean), 6)
                    for r in grouped[grouped["metric"] == "auroc"].itertuples()}
        saved = report.save(store, name, params=params, summary={"auroc_mean": headline, "notes": notes},
                            tables=tabs, files=files)
        result.path = saved.path
    return result


#: The study's four labels, which the synthetic demo plants.
STUDY_LABELS: tuple[str, ...] = ("Atelectasis", "Edema", "Effusion", "Opacity")


def classify_demo(store: Store | str | os.PathLike[str], *, seed: int = 0, model: str = "baseline") -> ClassifyResult:
    """The classification step of ``cxrstore demo``: the study's protocol on the demo store.

    Runs :func:`classify` with ``model`` (the baseline encoder), the study's four labels
    (those the store has), LightGBM, 5 grouped folds, subgroups and the leakage report,
    and saves the result in the store. Print ``result.markdown`` to show the table.
    """
    from cxrstore.store.store import Store as _Store

    st = store if isinstance(store, _Store) else _Store(store)
    labels = [lab for lab in STUDY_LABELS if lab in st.labels] or list(st.labels)
    return classify(st, models=[model], labels=labels, seed=seed, leakage_report=True, name=f"demo-seed{seed}")
