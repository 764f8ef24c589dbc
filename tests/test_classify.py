"""Classification benchmark: folds without leakage, intervals with coverage, the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import norm
from sklearn.metrics import f1_score, roc_auc_score

from cli.classify import classify as classify_cmd
from cxrstore.analysis.classify import (
    LightGBMFitter,
    LogisticFitter,
    auroc,
    binary_metrics,
    bootstrap_intervals,
    classify,
    cross_validate,
    lightgbm_params,
    make_folds,
    t_interval,
)
from cxrstore.analysis.report import paper_table, table_markdown
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.demo.synth import generate_demo
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest
from cxrstore.store.results import load_result
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "fake", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [4, 4], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


# ---------------------------------------------------------------------------------------
# synthetic stores


def planted_store(path: Path, *, datasets: tuple[str, ...] = ("a", "b"), patients: int = 40, dim: int = 16,
                  seed: int = 0, variants: int = 1, leak: bool = False) -> Path:
    """Two models ("good": strong signal, "weak": little), patients with 2-4 images.

    ``leak=True``: no label signal at all, but each patient's images are near-duplicates
    of one patient vector and share one label (the leakage trap).
    """
    rng = np.random.default_rng(seed)
    with open_writer(path) as w:
        for m in ("good", "weak"):
            w.ensure_model(m, {**PROV, "native_shape": [4, dim // 4]}, dim=dim)
        rows: list[int] = []
        vecs: dict[str, list[np.ndarray]] = {"good": [], "weak": []}
        for d in datasets:
            for p in range(patients):
                y = float(rng.random() < 0.5)
                centre = rng.standard_normal(dim) * (3.0 if leak else 0.5)
                sex = "F" if p % 2 else "M"
                age = float(25 + (p * 7) % 65)
                for i in range(int(rng.integers(2, 5))):
                    noise = rng.standard_normal(dim) * (0.05 if leak else 1.0)
                    base = centre + noise
                    good = base + (0 if leak else 2.5 * y) * np.eye(dim)[0]
                    weak = base + (0 if leak else 0.4 * y) * np.eye(dim)[0]
                    r = w.add_row(RowData(image_id=f"{d}-p{p}-i{i}", dataset=d, patient_id=f"{d}-p{p}", sex=sex, age=age,
                                          labels={"L1": y, "L2": float(rng.random() < 0.5)}))
                    rows.append(r)
                    vecs["good"].append(good)
                    vecs["weak"].append(weak)
                    for k in range(variants):
                        a = w.add_row(RowData(image_id=f"{d}-p{p}-i{i}", variant=f"rot{k}", source_row=r, dataset=d,
                                              patient_id=f"{d}-p{p}", sex=sex, age=age, labels={"L1": y}))
                        rows.append(a)
                        vecs["good"].append(good + rng.standard_normal(dim) * 0.1)
                        vecs["weak"].append(weak + rng.standard_normal(dim) * 0.1)
        for m in ("good", "weak"):
            w.add_vectors(m, rows, np.asarray(vecs[m], dtype=np.float32))
        w.commit()
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_store(tmp_path_factory.mktemp("classify") / "toy")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic demo (60 patients, as ``cxrstore demo``; 128 px to keep it fast)."""
    root = tmp_path_factory.mktemp("classify-demo")
    generate_demo(root / "data", n_patients=60, size=128, seed=0)
    adapter = CsvManifest(root / "data" / "manifest.csv", root=root / "data", dataset_name="demo")
    ingest(root / "store", adapter.records(), encoder=get_encoder("baseline"), workers=0)
    return root / "store"


# ---------------------------------------------------------------------------------------
# metrics and intervals


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    m = binary_metrics(y, s)
    assert m["f1"] == pytest.approx(f1_score(y, s >= 0.5))
    assert m["accuracy"] == pytest.approx(np.mean((s >= 0.5) == y))
    assert np.isnan(auroc(np.ones(5), np.arange(5)))
    mean, _lo, hi = t_interval([0.8, 0.82, 0.78, 0.81, 0.79])
    assert mean == pytest.approx(0.8) and hi - mean == pytest.approx(2.776445 * np.std([0.8, 0.82, 0.78, 0.81, 0.79], ddof=1) / np.sqrt(5), rel=1e-5)


def test_bootstrap_replicates_are_weighted_metrics() -> None:
    """With one replicate, the bootstrap's weighted AUROC equals sklearn's on the resampled rows."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    s = np.round(rng.random(120) + 0.4 * y, 2)
    groups = np.repeat([f"g{i:02d}" for i in range(40)], 3)  # sorted names = group order
    idx = np.repeat(np.arange(40), 3)
    for seed in range(5):
        lo, hi = bootstrap_intervals(y, s, groups, n_boot=1, seed=seed)["auroc"]
        counts = np.random.default_rng(seed).multinomial(40, np.full(40, 1 / 40), size=1)[0]
        w = counts[idx]
        assert lo == pytest.approx(roc_auc_score(y, s, sample_weight=w)) and lo == hi


@pytest.mark.slow
def test_interval_coverage_by_simulation() -> None:
    """95% intervals cover the true AUROC in about 95% of simulated data sets.

    Scores are binormal (positives N(d, 1), negatives N(0, 1)): true AUROC = Phi(d / sqrt 2).
    Rows come in patients of 3 images sharing a patient effect, so only a
    patient-level bootstrap is valid; an image-level bootstrap is shown to under-cover.
    """
    rng = np.random.default_rng(2024)
    d, n_pat, per, draws = 1.2, 100, 3, 250
    true = float(norm.cdf(d / np.sqrt(2 * (1 + 0.0))))
    hits_boot = hits_t = hits_naive = 0
    for _ in range(draws):
        y_pat = rng.integers(0, 2, n_pat)
        # patient effect and image noise with total variance 1 in each class
        eff = rng.standard_normal(n_pat) * np.sqrt(0.6)
        y = np.repeat(y_pat, per)
        groups = np.repeat(np.arange(n_pat), per)
        s = d * y + eff[groups] + rng.standard_normal(y.size) * np.sqrt(0.4)
        lo, hi = bootstrap_intervals(y, s, groups, n_boot=250, seed=int(rng.integers(1 << 31)))["auroc"]
        hits_boot += lo <= true <= hi
        nlo, nhi = bootstrap_intervals(y, s, None, n_boot=250, seed=1)["auroc"]
        hits_naive += nlo <= true <= nhi
        fold = (rng.permutation(n_pat) % 5)[groups]  # patient-disjoint folds of a fixed scorer
        _, tlo, thi = t_interval([auroc(y[fold == k], s[fold == k]) for k in range(5)])
        hits_t += tlo <= true <= thi
    assert 0.90 <= hits_boot / draws <= 0.99, hits_boot / draws
    assert 0.90 <= hits_t / draws <= 0.99, hits_t / draws
    assert hits_naive / draws < hits_boot / draws  # ignoring patients makes intervals too narrow


# ---------------------------------------------------------------------------------------
# folds: no patient and no augmentation source on both sides


class SpyFitter:
    """Records every (train, test) split and scores rows by their first feature."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X
        self.build_seconds = 0.0
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def fit_predict(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        self.calls.append((np.asarray(train), np.asarray(test)))
        return 1 / (1 + np.exp(-self.X[test, 0]))


def test_no_patient_and_no_augmentation_source_on_both_sides(toy: Path) -> None:
    from cxrstore.store.sampling import balanced_sample

    store = Store(toy)
    sel = store.select(model="good", where={"dataset": "a"})
    s = balanced_sample(sel, "L1", n_per_class=1000, seed=0, augment="train")
    assert s.aug_rows.size == len(s)  # one variant per image
    X = np.vstack([store.select(model="good", rows=s.rows).vectors(), np.zeros((s.aug_rows.size, 16))])
    spy = SpyFitter(X)
    aug_index = len(s) + np.arange(s.aug_rows.size)
    cv = cross_validate(spy, s.y, s.groups, folds=5, seed=0, aug_index=aug_index, aug_source=s.aug_source, n_boot=10)
    groups_all = np.concatenate([s.groups, s.aug_groups])
    image_all = np.concatenate([s.rows, s.rows[s.aug_source]])  # an augmented row's source image
    tested = np.zeros(len(s), dtype=int)
    assert len(spy.calls) == 5
    for train, test in spy.calls:
        assert (test < len(s)).all()  # evaluation on originals only
        assert not set(groups_all[train]) & set(groups_all[test])
        assert not set(image_all[train]) & set(image_all[test])
        assert np.isin(aug_index, train).sum() > 0
        tested[test] += 1
    assert (tested == 1).all() and np.isfinite(cv.oof).all()
    # stratified: every fold holds both classes in about the sample's proportion
    for k in range(5):
        assert 0.2 < s.y[cv.fold == k].mean() < 0.8
    # naive folds do split patients (which is what the leakage report shows)
    naive = make_folds(s.y, s.groups, folds=5, seed=0, grouped=False)
    assert any(len(set(naive[s.groups == g])) > 1 for g in np.unique(s.groups))


def test_store_level_folds_are_patient_disjoint(toy: Path) -> None:
    res = classify(toy, models=["good"], labels=["L1"], folds=4, classifier="logistic", augment="train",
                   subgroups=False, save=False, n_boot=50)
    sm = res.samples
    for (_, _, _), block in sm.groupby(["model", "dataset", "label"]):
        aug = block[block["role"] == "augmented"]
        assert len(aug) > 0
        for k in range(4):
            test = block[(block["role"] == "original") & (block["fold"] == k)]
            train = block[block["fold"] != k]
            assert not set(test["group"]) & set(train["group"])
            assert not set(test["image_id"]) & set(train["image_id"])  # augmented copies share the image id


# ---------------------------------------------------------------------------------------
# leakage


def test_planted_patient_leakage_inflates_naive_folds_only(tmp_path: Path) -> None:
    path = planted_store(tmp_path / "leak", datasets=("a",), patients=50, dim=32, leak=True, variants=0)
    res = classify(path, models=["good"], labels=["L1"], classifier="logistic", leakage_report=True,
                   subgroups=False, n_boot=100, roc_plots=False)
    row = res.leakage.iloc[0]
    assert row["mean_naive"] > 0.8, row  # near-duplicates of a test image sit in training
    assert row["mean_grouped"] < 0.65, row  # no signal: chance (or below), never inflated
    assert row["gap"] > 0.25
    assert "Leakage report" in res.markdown


@pytest.mark.slow
def test_planted_leakage_lightgbm(tmp_path: Path) -> None:
    """The same trap with the study's classifier."""
    rng = np.random.default_rng(5)
    n_pat, per, dim = 60, 10, 16
    y = np.repeat(rng.integers(0, 2, n_pat), per).astype(np.int8)
    groups = np.repeat(np.arange(n_pat), per).astype(str)
    X = (np.repeat(rng.standard_normal((n_pat, dim)) * 3, per, axis=0) + rng.standard_normal((n_pat * per, dim)) * 0.05)
    fitter = LightGBMFitter(X, y, params=lightgbm_params(0, n_rows=X.shape[0], n_features=dim))
    grouped = cross_validate(fitter, y, groups, folds=5, seed=0, n_boot=50).summary["auroc"]["mean"]
    naive = cross_validate(fitter, y, groups, folds=5, seed=0, grouped=False, n_boot=50).summary["auroc"]["mean"]
    assert naive > 0.85 and grouped < 0.7 and naive - grouped > 0.2, (naive, grouped)


# ---------------------------------------------------------------------------------------
# speed settings keep the science


@pytest.mark.slow
def test_fast_lightgbm_matches_default_on_planted_data() -> None:
    """Bins built once + fewer bins + feature sampling: AUROC close to default LightGBM.

    (The full-size check, 2,000 rows at 1,024 and 24,576 features, with the 0.005
    target, is ``benchmarks/bench_classify.py``; at this small size fold noise is larger.)
    """
    import lightgbm as lgb

    rng = np.random.default_rng(7)
    n, dim = 600, 64
    y = np.repeat([1, 0], n // 2).astype(np.int8)
    latent = rng.standard_normal((n, 8)) + 1.2 * np.outer(y, np.ones(8) / np.sqrt(8)) * 2
    X = (latent @ rng.standard_normal((8, dim)) / np.sqrt(8) + rng.standard_normal((n, dim))).astype(np.float32)
    groups = np.arange(n).astype(str)
    fold = make_folds(y, groups, folds=5, seed=0)
    fast = cross_validate(LightGBMFitter(X, y, params=lightgbm_params(0, n_rows=n, n_features=dim)), y, groups,
                          fold_ids=fold, n_boot=10).summary["auroc"]["mean"]
    scores = np.zeros(n)
    for k in range(5):
        tr, te = fold != k, fold == k
        scores[te] = lgb.LGBMClassifier(verbose=-1, random_state=0, n_jobs=1).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    default = np.mean([auroc(y[fold == k], scores[fold == k]) for k in range(5)])
    assert default > 0.8
    assert abs(fast - default) < 0.02, (fast, default)


# ---------------------------------------------------------------------------------------
# the table, transfer, stored results


def test_table_two_models_best_in_bold_and_saved(toy: Path) -> None:
    res = classify(toy, models=["good", "weak"], labels=["L1"], classifier="logistic", n_boot=100, seed=1)
    t = res.tables["auroc"]
    assert list(t["dataset"]) == ["a", "a", "b", "b"] and list(t["label"]) == ["L1", "Average"] * 2
    assert (t["best"] == "good").all()
    assert (t["good_mean"] > 0.75).all() and (t["good_mean"] > t["weak_mean"]).all()
    md = table_markdown(t)
    assert md.count("| **") == 4 and "*Average*" in md
    # stored with its parameters
    r = load_result(toy, "classify", res.name)
    assert r.params["seed"] == 1 and r.params["labels"] == ["L1"] and r.params["classifier"] == "logistic"
    assert set(r.params["versions"]) >= {"cxrstore", "lightgbm", "scikit-learn", "numpy"}
    samples = r.table("samples")
    assert {"row", "image_id", "group", "y", "fold", "oof", "model", "scheme"} <= set(samples.columns)
    assert set(r.table("subgroups")["by"]) == {"sex", "age_band"}
    folds = r.table("folds")
    assert len(folds) == 2 * 2 * 5 and {"auroc", "accuracy", "f1"} <= set(folds.columns)
    assert r.file("roc_a_L1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tj = json.loads(r.file("table.json").read_text())
    assert tj["tables"]["auroc"]["rows"][0]["best"] == ["good"]
    assert pd.read_csv(r.file("table_auroc.csv"))["good"].str.contains("±").all()


def test_average_row_and_bootstrap_columns() -> None:
    summary = pd.DataFrame([
        {"model": "m", "dataset": "d", "label": lab, "metric": "auroc", "mean": mean, "t_half": h, "pooled": mean, "boot_half": h / 2}
        for lab, mean, h in (("A", 0.8, 0.03), ("B", 0.9, 0.04))
    ])
    t = paper_table(summary, metric="auroc")
    avg = t[t["label"] == "Average"].iloc[0]
    assert avg["m_mean"] == pytest.approx(0.85) and avg["m_half"] == pytest.approx(0.025)
    assert avg["m"] == "0.850 ± 0.025"
    tb = paper_table(summary, metric="auroc", ci="bootstrap")
    assert tb.iloc[0]["m"] == "0.800 ± 0.015"
    with pytest.raises(UsageError, match="ci must be"):
        paper_table(summary, ci="z")  # type: ignore[arg-type]


def test_cross_dataset_transfer(toy: Path) -> None:
    res = classify(toy, models=["good"], labels=["L1"], classifier="logistic", train_on="a", test_on="b",
                   n_boot=100, save=False)
    t = res.tables["auroc"]
    assert list(t["dataset"].unique()) == ["a->b"] and t.iloc[0]["good_mean"] > 0.75
    sm = res.samples
    assert sm[sm["role"] == "original"]["image_id"].str.startswith("b-").all()  # evaluated on the other dataset
    assert sm[sm["role"] == "train"]["image_id"].str.startswith("a-").all() and (sm["role"] == "train").sum() > 50
    assert np.isfinite(sm[sm["role"] == "original"]["oof"]).all()
    with pytest.raises(UsageError, match="unknown dataset 'c'.*a, b"):
        classify(toy, models=["good"], labels=["L1"], train_on="a", test_on="c", save=False)
    with pytest.raises(UsageError, match="both train_on and test_on"):
        classify(toy, models=["good"], labels=["L1"], train_on="a", save=False)


def test_token_mean_view_and_bad_options(toy: Path) -> None:
    res = classify(toy, models=["good"], labels=["L1"], classifier="logistic", view="mean", subgroups=False,
                   n_boot=20, save=False, where={"dataset": "a"})
    assert res.tables["auroc"].iloc[0]["good_mean"] > 0.6
    for kw, msg in [({"models": ["nope"]}, "unknown model 'nope'.*good, weak"),
                    ({"labels": ["Nope"]}, "unknown label 'Nope'"),
                    ({"classifier": "svm"}, "classifier must be one of lightgbm, logistic"),
                    ({"augment": "all"}, "augment must be one of none, train"),
                    ({"folds": 1}, "folds must be an integer >= 2")]:
        args = {"models": ["good"], "labels": ["L1"], "save": False, **kw}
        with pytest.raises(UsageError, match=msg):
            classify(toy, **args)


def test_logistic_fitter_scores_are_probabilities() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5))
    y = (X[:, 0] > 0).astype(int)
    p = LogisticFitter(X, y).fit_predict(np.arange(40), np.arange(40, 60))
    assert p.shape == (20,) and ((p >= 0) & (p <= 1)).all() and auroc(y[40:], p) > 0.9


# ---------------------------------------------------------------------------------------
# acceptance on the demo store, through the CLI


@pytest.mark.slow
def test_cli_on_demo_store_prints_table_and_is_reproducible(demo_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [str(demo_store), "--model", "baseline", "--label", "Atelectasis", "--label", "Edema", "--label", "Effusion",
            "--label", "Opacity", "--seed", "0", "--out", str(tmp_path / "o1")]
    first = runner.invoke(classify_cmd, args)
    assert first.exit_code == 0, first.output
    assert "| Dataset | Label | baseline |" in first.output and "AUROC" in first.output
    tables = json.loads((tmp_path / "o1" / "table.json").read_text())["tables"]
    aurocs = {r["label"]: r["cells"]["baseline"]["mean"] for r in tables["auroc"]["rows"]}
    for label in ("Atelectasis", "Edema", "Effusion", "Opacity"):
        assert aurocs[label] > 0.5, aurocs  # the labels the demo plants are learnt
    md1 = (tmp_path / "o1" / "table.md").read_bytes()
    js1 = (tmp_path / "o1" / "table.json").read_bytes()
    second = runner.invoke(classify_cmd, args[:-1] + [str(tmp_path / "o2")])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "o2" / "table.md").read_bytes() == md1
    assert (tmp_path / "o2" / "table.json").read_bytes() == js1
    assert (tmp_path / "o2" / "table_auroc.csv").read_bytes() == (tmp_path / "o1" / "table_auroc.csv").read_bytes()
    assert second.output == first.output


def test_cli_json_output(toy: Path) -> None:
    args = [str(toy), "--model", "good", "--model", "weak", "--label", "L1", "--classifier", "logistic", "--json",
            "--no-subgroups", "--where", "dataset == 'a'"]
    out = CliRunner().invoke(classify_cmd, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["tables"]["auroc"]["models"] == ["good", "weak"] and data["params"]["where"] == "dataset == 'a'"
    assert data["tables"]["auroc"]["rows"][0]["best"] == ["good"]
    again = CliRunner().invoke(classify_cmd, args)
    assert again.output == out.output  # same command and seed: same JSON


def test_cli_bad_model_is_a_usage_error(toy: Path) -> None:
    out = CliRunner().invoke(classify_cmd, [str(toy), "--model", "nope", "--label", "L1"])
    assert out.exit_code == 2 and "unknown model 'nope'" in out.output
