"""Leiden, UMAP, tables, plots and the store-level cluster job and CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from cli.cluster import cluster as cluster_cmd
from cxrstore.analysis.cluster import (
    _igraph,
    cluster,
    cluster_table,
    connectivity_graph,
    label_agreement,
    leiden,
    modularity,
    plot_embedding,
    umap_embedding,
)
from cxrstore.analysis.knn import array_source, default_block_rows, exact_knn
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest
from cxrstore.store.results import load_result
from cxrstore.store.store import Store
from tests.test_knn import make_store, mixture


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    """A clear 8-cluster mixture, 1,200 points in 32 dimensions."""
    return mixture(1200, 32, 8, seed=11, noise=0.35)


@pytest.fixture(scope="module")
def planted_graph(planted: tuple[np.ndarray, np.ndarray]):
    x, _ = planted
    return exact_knn(array_source(x), len(x), k=15)


@pytest.mark.parametrize("weights", ["similarity", "connectivity"])
def test_leiden_recovers_planted_clusters(planted, planted_graph, weights: str) -> None:
    _, y = planted
    g = connectivity_graph(planted_graph.indices, planted_graph.sims, weights=weights)  # type: ignore[arg-type]
    assert (abs(g - g.T) > 1e-9).nnz == 0, "graph must be symmetric"
    assert g.diagonal().sum() == 0
    labels = leiden(g, resolution=1.0, seed=0)
    assert adjusted_rand_score(y, labels) >= 0.9
    assert np.bincount(labels).tolist() == sorted(np.bincount(labels).tolist(), reverse=True), "numbered by size"
    assert modularity(g, labels) > modularity(g, np.random.default_rng(0).permutation(labels)) + 0.3
    # igraph's own modularity of the same partition, at two resolutions
    ig = _igraph(g)
    for res in (1.0, 0.5):
        assert modularity(g, labels, resolution=res) == pytest.approx(ig.modularity(labels.tolist(), weights="weight", resolution=res), abs=1e-9)
    np.testing.assert_array_equal(labels, leiden(g, resolution=1.0, seed=0))


def test_leiden_resolution_and_cpm(planted_graph) -> None:
    g = connectivity_graph(planted_graph.indices, planted_graph.sims, weights="similarity")
    few = leiden(g, resolution=0.1, seed=1).max() + 1
    many = leiden(g, resolution=5.0, seed=1).max() + 1
    assert few < many
    cpm = leiden(g, objective="CPM", resolution=0.05, seed=1)
    assert cpm.shape == (g.shape[0],)
    with pytest.raises(UsageError, match="objective 'louvain' is not one of modularity, CPM"):
        leiden(g, objective="louvain")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="resolution must be positive"):
        leiden(g, resolution=0)


def test_cluster_table_and_agreement() -> None:
    clusters = np.array([0, 0, 0, 1, 1])
    meta = pd.DataFrame({
        "patient_id": ["a", "a", "b", "c", "c"], "sex": ["F", "M", "F", "", "M"],
        "age": [20.0, 40.0, np.nan, 50.0, 70.0], "L": [1.0, 0.0, np.nan, 0.0, 0.0],
    })
    t = cluster_table(clusters, meta, ["L"])
    assert t["cluster"].tolist() == [0, 1, "all"]
    assert t["size"].tolist() == [3, 2, 5] and t["patients"].tolist() == [2, 1, 3]
    assert t["prevalence_L"].tolist() == [0.5, 0.0, 0.25] and t["known_L"].tolist() == [2, 2, 4]
    assert t["mean_age"].tolist() == [30.0, 60.0, 45.0]
    np.testing.assert_allclose(t["female_fraction"].to_numpy(dtype=float), [2 / 3, 0.0, 0.5])
    agree = label_agreement(np.array([0, 0, 1, 1]), pd.DataFrame({"L": [1.0, 1.0, 0.0, 0.0], "M": [1.0, 0.0, 1.0, np.nan]}))
    assert agree.loc[0, "ari"] == pytest.approx(1.0) and agree.loc[0, "nmi"] == pytest.approx(1.0)
    assert agree.loc[1, "known"] == 3 and agree.loc[1, "ari"] < 0.5


def test_plot_is_a_png() -> None:
    rng = np.random.default_rng(0)
    coords = rng.standard_normal((50, 2))
    for data, kind in ((rng.integers(0, 3, 50), "cluster"), (np.where(rng.random(50) < 0.2, np.nan, rng.integers(0, 2, 50)), "label")):
        img = Image.open(io.BytesIO(plot_embedding(coords, data, title="t", kind=kind)))  # type: ignore[arg-type]
        img.load()
        assert img.format == "PNG" and img.size == (640, 600)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 3


# -- UMAP and the store-level job (one numba compile per session) -----------------------------
@pytest.fixture(scope="module")
def mixture_store(tmp_path_factory: pytest.TempPathFactory, planted) -> Store:
    x, y = planted
    labels = {"Zero": (y == 0).astype(float), "One": np.where(np.arange(len(y)) % 5 == 0, np.nan, (y == 1).astype(float))}
    return make_store(tmp_path_factory.mktemp("mix") / "s", x, chunk_rows=64, labels=labels)


@pytest.fixture(scope="module")
def mixture_run(mixture_store: Store):
    return cluster(mixture_store, model="toy", k=15, seed=0, memory_mb=1)


@pytest.mark.slow
def test_store_cluster_recovers_mixture_and_saves_everything(mixture_run, mixture_store: Store, planted) -> None:
    _, y = planted
    r = mixture_run
    assert adjusted_rand_score(y, r.clusters) >= 0.9
    np.testing.assert_array_equal(r.rows, np.arange(len(y)))
    stored = load_result(mixture_store, "cluster", r.result.name)
    np.testing.assert_array_equal(stored.array("clusters"), r.clusters)
    assert stored.array("umap").shape == (len(y), 2) and np.isfinite(stored.array("umap")).all()
    assert stored.params["k"] == 15 and stored.params["resolution"] == 1.0 and stored.params["seed"] == 0
    assert stored.params["objective"] == "modularity" and stored.params["labels"] == ["Zero", "One"]
    assert set(stored.meta["files"]) == {"umap_cluster.png", "umap_Zero.png", "umap_One.png"}
    table = stored.table("clusters")
    assert table["size"].iloc[:-1].sum() == len(y) and table["cluster"].iloc[-1] == "all"
    agree = stored.table("agreement").set_index("label")
    assert agree.loc["Zero", "ari"] == pytest.approx(adjusted_rand_score(y == 0, r.clusters))
    assert agree.loc["One", "known"] == int((np.arange(len(y)) % 5 != 0).sum())
    knn = load_result(mixture_store, "knn", r.knn_result.name)
    assert knn.params["k"] == 15 and knn.params["method"] == "exact"
    neigh = knn.array("neighbors")
    assert neigh.shape == (len(y), 15) and not (neigh == knn.array("rows")[:, None]).any()
    assert r.summary["knn"]["block_rows"] == default_block_rows(32, memory_mb=1) < len(y)  # streamed in blocks
    assert r.summary["knn"]["passes"] > 1
    # UMAP separates the planted clusters: each cluster's centroid is far from the others'
    cents = np.array([r.coords[y == c].mean(axis=0) for c in range(8)])
    spread = np.mean([np.linalg.norm(r.coords[y == c] - cents[c], axis=1).mean() for c in range(8)])
    gaps = np.linalg.norm(cents[:, None] - cents[None], axis=2)[np.triu_indices(8, 1)]
    assert gaps.min() > spread


@pytest.mark.slow
def test_store_cluster_reuses_graph_and_is_reproducible(mixture_run, mixture_store: Store) -> None:
    again = cluster(mixture_store, model="toy", k=15, seed=0, memory_mb=1)
    assert again.summary["knn_reused"] is True and mixture_run.summary["knn_reused"] is False
    np.testing.assert_array_equal(again.clusters, mixture_run.clusters)
    np.testing.assert_array_equal(again.coords, mixture_run.coords)
    sub = cluster(mixture_store, model="toy", k=10, where="Zero == 1", embed=False, labels=["One"])
    assert sub.summary["knn_reused"] is False and sub.summary["rows"] == int((planted_y(mixture_store) == 1).sum())
    assert sub.coords is None and sub.result.meta["files"] == []


def planted_y(store: Store) -> np.ndarray:
    return store.metadata()["Zero"].to_numpy()


def test_umap_seeded_is_reproducible(planted, planted_graph) -> None:
    x, _ = planted
    a = umap_embedding(planted_graph.indices[:300] % 300, planted_graph.sims[:300], x[:300], seed=3, n_epochs=50)
    b = umap_embedding(planted_graph.indices[:300] % 300, planted_graph.sims[:300], x[:300], seed=3, n_epochs=50)
    assert a.shape == (300, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_store_cluster_approximate_reports_recall(mixture_store: Store, planted) -> None:
    _, y = planted
    r = cluster(mixture_store, model="toy", k=15, method="ivf", embed=False, recall_sample=300)
    rec = r.summary["knn"]["recall_sample"]
    assert rec["sample"] == 300 and 0.9 <= rec["recall"] <= 1.0
    assert r.knn_result.name.startswith("toy-k15-ivf-") and r.knn_result.summary["nprobe"] >= 1
    assert r.knn_result.params["target_recall"] == 0.99 and r.knn_result.summary["calibration"]["recall"] >= 0.99
    assert adjusted_rand_score(y, r.clusters) >= 0.9
    # the CLI: a lower target probes fewer lists (a new graph: the target is a parameter)
    res = CliRunner().invoke(cluster_cmd, [str(mixture_store.path), "--model", "toy", "--method", "ivf", "--target-recall", "0.5",
                                           "--memory-mb", "1", "--no-umap", "--json"])
    assert res.exit_code == 0, res.output
    knn = json.loads(res.output)["knn"]
    assert knn["method"] == "ivf" and knn["nprobe"] < r.knn_result.summary["nprobe"] and 0.0 < knn["recall_sample"]["recall"] <= 1.0


def test_cluster_bad_options(mixture_store: Store) -> None:
    with pytest.raises(UsageError, match="unknown label.*'Nope'.*labels: Zero, One"):
        cluster(mixture_store, model="toy", labels=["Nope"])
    with pytest.raises(UsageError, match="model 'other' is not in"):
        cluster(mixture_store, model="other")
    with pytest.raises(UsageError, match="method 'hnsw' is not one of exact, ivf"):
        cluster(mixture_store, model="toy", method="hnsw")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="needs more than 15"):
        cluster(mixture_store, model="toy", where="image_id in ['img0', 'img1']")


# -- the demo store -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory, small_demo: Path) -> Path:
    path = tmp_path_factory.mktemp("demo-cluster") / "store"
    adapter = CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo")
    ingest(path, adapter.records(), encoder=get_encoder("baseline"), workers=0)
    return path


@pytest.mark.slow
def test_demo_store_cli_clusters_and_draws(demo_store: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cluster_cmd, [str(demo_store), "--model", "baseline", "--k", "15", "--label", "Effusion", "--label", "Edema", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    n = Store(demo_store).n_rows
    assert data["rows"] == n and data["clusters"] >= 1
    assert {r["label"] for r in data["agreement"]} == {"Effusion", "Edema"}
    assert sum(r["size"] for r in data["clusters_table"] if r["cluster"] != "all") == n
    folder = Path(data["result"])
    assert sorted(data["files"]) == ["umap_Edema.png", "umap_Effusion.png", "umap_cluster.png"]
    for name in data["files"]:
        img = Image.open(folder / name)
        img.load()  # decodes the whole PNG
        assert img.format == "PNG" and img.size == (640, 600)
        pixels = np.asarray(img.convert("RGB"))
        assert (pixels < 200).any(axis=2).sum() > 500, f"{name} looks empty"
    res = runner.invoke(cluster_cmd, [str(demo_store), "--model", "baseline", "--no-umap", "--resolution", "2"])
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and "cluster" in res.output and "Effusion" in res.output
    res = runner.invoke(cluster_cmd, [str(demo_store), "--model", "baseline", "--label", "Pneumo"])
    assert res.exit_code == 2 and "unknown label(s) 'Pneumo'" in res.output
    res = runner.invoke(cluster_cmd, [str(demo_store / "nope"), "--model", "baseline"])
    assert res.exit_code == 1
