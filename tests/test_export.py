"""Export: fusion, stored PCA, clinical join, the four formats, AnnData graph, the CLI."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.export import export as export_cmd
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import UsageError
from cxrstore.export import (
    export,
    export_demo,
    fit_pca,
    fuse,
    join_clinical,
    load_pca,
    read_export,
)
from cxrstore.export.fusion import l2_normalize, rebatch
from cxrstore.export.writers import FORMATS, normalize_obs
from cxrstore.ingest import ingest
from cxrstore.store.results import list_results, save_result
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "toy", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [16], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}
TOY_DIM = 16


def _toy_vectors(rows: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(rows.astype(np.uint64) + 7)  # one seed per call: deterministic per row set
    base = rng.standard_normal((rows.size, TOY_DIM)).astype(np.float32)
    return base + rows[:, None].astype(np.float32) / 10


def _toy_rows(n: int) -> np.ndarray:
    return np.array([r for r in range(n) if r % 5 != 0], dtype=np.int64)  # rows 0, 5, 10... lack "toy"


@pytest.fixture(scope="module")
def store(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo ingested with `baseline`, plus a 16-d `toy` model missing on every 5th row."""
    path = tmp_path_factory.mktemp("export") / "store"
    ingest(path, CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo").records(),
           encoder=get_encoder("baseline"), workers=0)
    n = Store(path).n_rows
    rows = _toy_rows(n)
    with open_writer(path, create=False) as w:
        w.ensure_model("toy", PROV, dim=TOY_DIM, chunk_rows=8)
        w.add_vectors("toy", rows, _toy_vectors(rows))
        w.commit()
    return path


@pytest.fixture()
def store_copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return dst


def _expected_fused(st: Store, rows: np.ndarray) -> np.ndarray:
    base = st.select(rows=rows).vectors("baseline")
    toy = st.select(rows=rows).vectors("toy")
    return np.hstack([l2_normalize(base), l2_normalize(toy)])


# -- fusion ------------------------------------------------------------------------------------
def test_fusion_concatenates_normalised_blocks_and_reports_missing(store: Path) -> None:
    st = Store(store)
    fusion = fuse(st, "baseline,toy")
    toy_rows = _toy_rows(st.n_rows)
    np.testing.assert_array_equal(fusion.rows, toy_rows)
    assert fusion.dim == 512 + TOY_DIM and [b.model for b in fusion.blocks] == ["baseline", "toy"]
    x = fusion.to_array(batch_rows=7)
    np.testing.assert_allclose(x, _expected_fused(st, toy_rows), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(x[:, 512:], axis=1), 1.0, rtol=1e-5)
    rep = fusion.report.to_json()
    lacking = np.setdiff1d(np.arange(st.n_rows), toy_rows)
    assert rep["selected"] == st.n_rows and rep["dropped"] == lacking.size == rep["missing"]["toy"]["count"]
    assert rep["missing"]["toy"]["rows"] == lacking[:20].tolist() and rep["missing"]["baseline"]["count"] == 0
    assert rep["missing"]["toy"]["image_ids"][0] == st.column("image_id", lacking[:1])[0]
    # streamed batches and a random read agree with the whole
    some = toy_rows[[1, 4, 9]]
    np.testing.assert_allclose(fusion.read(some), x[[1, 4, 9]], rtol=1e-6)
    raw = fuse(st, ["toy"], normalize=False).to_array()
    np.testing.assert_array_equal(raw, st.select(model="toy").vectors())


def test_missing_error_names_count_and_rows(store: Path) -> None:
    st = Store(store)
    with pytest.raises(UsageError, match=r"lack a model's vector.*toy: \d+ rows") as exc:
        fuse(st, ["baseline", "toy"], missing="error")
    first_missing = st.column("image_id", np.array([0]))[0]
    assert first_missing in str(exc.value)
    with pytest.raises(UsageError, match="choose one of drop, error"):
        fuse(st, ["baseline"], missing="ignore")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown view 'token-mean'; choose one of: flat, mean"):
        fuse(st, ["baseline"], view="token-mean")
    with pytest.raises(UsageError, match="one axis"):
        fuse(st, ["baseline"], view="mean")
    with pytest.raises(UsageError, match="model 'nope' is not in store"):
        fuse(st, ["baseline", "nope"])


def test_rebatch_keeps_every_batch_large_enough() -> None:
    batches = [np.full((n, 2), i, float) for i, n in enumerate([3, 1, 5, 2, 1])]
    out = list(rebatch(iter(batches), 4))
    assert [len(b) for b in out] == [4, 8]
    np.testing.assert_array_equal(np.concatenate(out), np.concatenate(batches))
    assert [len(b) for b in rebatch(iter([np.zeros((2, 1))]), 4)] == [2]


# -- PCA ---------------------------------------------------------------------------------------
def _synthetic_store(path: Path, n: int, dim: int = 24, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    mix = rng.standard_normal((4, dim))
    with open_writer(path) as w:
        w.ensure_model("m", {**PROV, "native_shape": [dim]}, dim=dim, chunk_rows=16)
        rows = [w.add_row(RowData(image_id=f"img{i}", patient_id=f"p{i // 3}", dataset="a" if i % 3 else "b",
                                  extra={"study_date": f"2020-01-{1 + i % 28:02d}"})) for i in range(start, start + n)]
        vecs = rng.standard_normal((n, 4)) @ mix + 0.1 * rng.standard_normal((n, dim))
        w.add_vectors("m", rows, vecs.astype(np.float32))
        w.commit()


@pytest.mark.slow
def test_stored_pca_reproduces_on_new_rows(tmp_path: Path) -> None:
    from sklearn.decomposition import IncrementalPCA

    path = tmp_path / "s"
    _synthetic_store(path, 100)
    st = Store(path)
    pca = fit_pca(st, "m", n_components=5, where="dataset == 'a'", batch_rows=20)
    fit_rows = st.select(where="dataset == 'a'").rows
    assert pca.fitted_rows == fit_rows.size == 66 and pca.name == "m-pca5"
    # the same stream in memory with sklearn gives the same transform
    data = l2_normalize(st.select(rows=fit_rows).vectors("m")).astype(np.float64)
    ref = IncrementalPCA(n_components=5, batch_size=20).fit(data)
    np.testing.assert_allclose(pca.mean, ref.mean_, atol=1e-6)
    np.testing.assert_allclose(np.abs(pca.components), np.abs(ref.components_), atol=1e-4)
    # rows added after the fit
    with open_writer(path, create=False) as w:
        rng = np.random.default_rng(9)
        new = [w.add_row(RowData(image_id=f"new{i}", patient_id="pnew", dataset="c")) for i in range(7)]
        w.add_vectors("m", new, rng.standard_normal((7, 24)).astype(np.float32))
        w.commit()
    st = Store(path)
    loaded = load_pca(st, "m-pca5")
    assert loaded.params["where"] == "dataset == 'a'" and loaded.params["n_components"] == 5 and loaded.normalized
    assert [k for k, n, _ in list_results(st, "pca")] == ["pca"]
    new_x = st.select(where="dataset == 'c'").vectors("m")
    expected = ref.transform(l2_normalize(new_x).astype(np.float64))
    got = fuse(st, ["m"], where="dataset == 'c'", pca="m-pca5").to_array()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(loaded.transform(l2_normalize(new_x)), got, atol=1e-6)
    # a PCA fitted with normalisation does not apply to raw vectors; too few rows refused
    with pytest.raises(UsageError, match="normalize=True"):
        fuse(st, ["m"], pca="m-pca5", normalize=False)
    with pytest.raises(UsageError, match="no result pca/nope.*m-pca5"):
        fuse(st, ["m"], pca="nope")
    with pytest.raises(UsageError, match="needs at least 10 rows"):
        fit_pca(st, "m", n_components=10, where="dataset == 'c'")


def test_export_fits_pca_on_named_subset_and_records_it(store_copy: Path, tmp_path: Path) -> None:
    rep = export(store_copy, models=["baseline", "toy"], out=tmp_path / "o.npz", pca={"baseline": 6}, pca_fit_where="sex == 'F'")
    block = rep.blocks[0]
    st = Store(store_copy)
    assert block["pca"]["name"] == "baseline-pca6" and block["dim"] == 6 and rep.dim == 6 + TOY_DIM
    assert block["pca"]["fitted_rows"] == len(st.select(where="sex == 'F'", model="baseline"))
    back = read_export(tmp_path / "o.npz")
    pca = load_pca(st, "baseline-pca6")
    base = l2_normalize(st.select(rows=back.rows).vectors("baseline"))
    np.testing.assert_allclose(back.block("baseline"), pca.transform(base), atol=1e-5)
    assert back.params["blocks"][0]["pca"]["where"] == "sex == 'F'"


# -- clinical ----------------------------------------------------------------------------------
def _meta() -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": ["a", "b", "c", "d", "e"], "patient_id": ["p1", "p1", "p2", "p3", ""],
         "study_date": ["2020-01-01", "2020-03-01", "2021-06-10", "2020-01-01", "2020-01-01"], "age": [50.0, 50.2, 61, 70, 20]},
        index=pd.Index([3, 4, 8, 9, 12], name="row"),
    )


def test_clinical_exact_join_reports_unmatched(tmp_path: Path) -> None:
    clin = pd.DataFrame({"patient_id": ["p1", "p2", "p9"], "lactate": [1.5, 3.0, 9.9], "age": [1, 2, 3], "sofa": [4, 7, 1]})
    joined, rep = join_clinical(_meta(), clin, on="patient_id")
    assert list(joined.columns) == ["lactate", "clinical_age", "sofa"]
    np.testing.assert_array_equal(joined["lactate"].to_numpy(), [1.5, 1.5, 3.0, np.nan, np.nan])
    assert rep.matched == 3 and rep.unmatched_rows.tolist() == [9, 12] and list(rep.unmatched_image_ids) == ["d", "e"]
    assert rep.clinical_unused == 1  # p9
    kept, _ = join_clinical(_meta(), clin, on="patient_id", unmatched="drop")
    assert kept.index.tolist() == [3, 4, 8]
    with pytest.raises(UsageError, match="2 of 5 rows have no clinical record"):
        join_clinical(_meta(), clin, unmatched="error")
    dup = pd.concat([clin, clin.iloc[:1]])
    with pytest.raises(UsageError, match="several records.*p1"):
        join_clinical(_meta(), dup)
    with pytest.raises(UsageError, match="choose one of patient_id, study_id"):
        join_clinical(_meta(), clin, on="mrn")  # type: ignore[arg-type]


def test_clinical_nearest_date_within_tolerance() -> None:
    clin = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3"], "visit": ["2020-01-05", "2020-02-20", "2021-01-01", "2019-12-30"],
                         "lactate": [1.0, 2.0, 3.0, 4.0]})
    joined, rep = join_clinical(_meta(), clin, date_column="visit", store_date_column="study_date", tolerance="30D")
    # a: Jan 1 -> Jan 5 (4 days); b: Mar 1 -> Feb 20 (10 days); c: p2 Jun 2021 vs Jan 2021 is beyond 30 days; d: Dec 30
    np.testing.assert_array_equal(joined["lactate"].to_numpy(), [1.0, 2.0, np.nan, 4.0, np.nan])
    assert rep.unmatched_rows.tolist() == [8, 12] and rep.tolerance == "30 days 00:00:00"
    loose, rep2 = join_clinical(_meta(), clin, date_column="visit", store_date_column="study_date")
    assert loose["lactate"].tolist()[:4] == [1.0, 2.0, 3.0, 4.0] and rep2.unmatched == 1
    with pytest.raises(UsageError, match="not a duration"):
        join_clinical(_meta(), clin, date_column="visit", store_date_column="study_date", tolerance="soon")


def test_clinical_csv_join_in_export(store: Path, tmp_path: Path) -> None:
    st = Store(store)
    patients = sorted(set(st.column("patient_id")))
    clin = pd.DataFrame({"patient_id": patients[:-1], "lactate": np.arange(len(patients) - 1, dtype=float), "site": "north"})
    clin.to_csv(tmp_path / "clin.csv", index=False)
    rep = export(st, models=["baseline"], out=tmp_path / "o.parquet", format="parquet", clinical=tmp_path / "clin.csv")
    lost = st.column("patient_id") == patients[-1]
    assert rep.clinical["unmatched"] == int(lost.sum()) > 0 and rep.clinical["matched"] == rep.rows - int(lost.sum())
    back = read_export(tmp_path / "o.parquet")
    assert back.obs["site"].tolist() == ["" if m else "north" for m in lost]
    assert np.isnan(back.obs["lactate"].to_numpy()[lost]).all()
    clin.to_parquet(tmp_path / "clin.parquet")
    rep2 = export(st, models=["baseline"], out=tmp_path / "o2.npz", clinical=tmp_path / "clin.parquet", clinical_unmatched="drop")
    assert rep2.rows == rep.rows - int(lost.sum())
    np.testing.assert_array_equal(read_export(tmp_path / "o2.npz").rows, np.flatnonzero(~lost))


# -- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(store: Path, tmp_path: Path, fmt: str) -> None:
    st = Store(store)
    out = tmp_path / f"fused.{fmt}"
    where = "view == 'PA' or Effusion == 1"
    rep = export(st, models=["baseline", "toy"], where=where, out=out, format=fmt, batch_rows=7)  # type: ignore[arg-type]
    rows = np.intersect1d(st.select(where=where).rows, _toy_rows(st.n_rows))
    assert rep.rows == rows.size > 14 and rep.dim == 512 + TOY_DIM and rep.bytes_written == out.stat().st_size
    back = read_export(out)
    np.testing.assert_array_equal(back.rows, rows)
    np.testing.assert_allclose(back.X, _expected_fused(st, rows), rtol=1e-6, atol=1e-7)
    expected = normalize_obs(st.metadata(rows)).drop(columns=["row"])
    got = back.obs.drop(columns=[c for c in back.obs.columns if c == "leiden"])
    assert list(got.columns) == list(expected.columns)
    for col in expected.columns:
        e, g = expected[col].to_numpy(), got[col].to_numpy()
        if e.dtype == object:
            assert [str(v) for v in g] == list(e), col
        else:
            np.testing.assert_array_equal(g.astype(e.dtype), e, err_msg=col)
    assert set(st.labels) <= set(got.columns)
    assert back.params["models"] == ["baseline", "toy"] and back.params["where"] == where
    assert back.params["blocks"][1] == {**back.params["blocks"][1], "start": 512, "stop": 512 + TOY_DIM, "normalize": True, "view": "flat"}
    assert back.params["store_generation"] == st.generation and back.params["format"] == fmt
    if fmt == "parquet":
        import pyarrow.parquet as pq

        assert pq.ParquetFile(out).num_row_groups == -(-rows.size // 7)
    if fmt == "npz":
        with zipfile.ZipFile(out) as zf:
            assert "X.npy" in zf.namelist() and zf.getinfo("X.npy").compress_type == zipfile.ZIP_STORED
        with np.load(out, allow_pickle=False) as z:
            assert z["X"].shape == (rows.size, 512 + TOY_DIM)
    if fmt == "h5":
        import h5py

        with h5py.File(out) as f:
            assert f["X"].shape == (rows.size, 512 + TOY_DIM) and f["X"].chunks is not None


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,000 rows of a 2,048-d model in chunks of 64 rows (33 MB of vectors)."""
    path, n, dim = tmp_path_factory.mktemp("wide") / "store", 4000, 2048
    with open_writer(path) as w:
        w.ensure_model("wide", {**PROV, "native_shape": [dim]}, dim=dim, chunk_rows=64)
        rng = np.random.default_rng(0)
        for start in range(0, n, 1000):
            rows = [w.add_row(RowData(image_id=f"i{i}", patient_id=f"p{i // 4}")) for i in range(start, start + 1000)]
            w.add_vectors("wide", rows, rng.standard_normal((1000, dim)).astype(np.float32))
        w.commit()
    return path


@pytest.mark.parametrize("fmt", ["npz", "h5", "anndata"])
def test_export_streams_with_bounded_memory(wide_store: Path, tmp_path: Path, fmt: str) -> None:
    """numpy memory at peak stays far below the vectors' size: the vectors are never all in memory."""
    import tracemalloc

    import anndata  # noqa: F401  (imported before measuring: module imports are not the export's memory)
    import h5py  # noqa: F401

    st = Store(wide_store)
    n = st.n_rows
    tracemalloc.start()
    try:
        rep = export(st, models="wide", out=tmp_path / f"o{fmt}", format=fmt, batch_rows=128)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rep.vector_bytes == n * 2048 * 4
    assert peak < 0.35 * rep.vector_bytes, f"peak {peak / 1e6:.1f} MB for {rep.vector_bytes / 1e6:.1f} MB of vectors"
    back = read_export(tmp_path / f"o{fmt}", format=fmt)  # type: ignore[arg-type]
    np.testing.assert_allclose(back.X[[0, 1234, n - 1]], l2_normalize(st.select(rows=[0, 1234, n - 1]).vectors("wide")), rtol=1e-6)


def test_export_refuses_existing_file_and_bad_format(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    export(store, models="baseline", out=out)
    with pytest.raises(UsageError, match="exists"):
        export(store, models="baseline", out=out)
    export(store, models="baseline", out=out, overwrite=True, normalize=False)
    np.testing.assert_array_equal(read_export(out).X, Store(store).select(model="baseline").vectors())
    with pytest.raises(UsageError, match="choose one of npz, parquet, h5, anndata"):
        export(store, models="baseline", out=tmp_path / "x.csv", format="csv")  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".*tmp*"))


def _save_graph(store: Path, rows: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A kNN result of the given shape, built by brute force on the baseline vectors."""
    st = Store(store)
    x = l2_normalize(st.select(rows=rows).vectors("baseline"))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1)[:, :k]
    sim_k = np.take_along_axis(sims, idx, axis=1).astype(np.float32)
    save_result(store, "knn", "baseline-k4", params={"model": "baseline", "k": k, "metric": "cosine"},
                arrays={"rows": rows, "indices": idx, "similarities": sim_k})
    return idx, sim_k


def test_anndata_opens_with_vectors_obs_graph_and_umap(store_copy: Path, tmp_path: Path) -> None:
    import anndata as ad
    import scipy.sparse as sp

    st = Store(store_copy)
    graph_rows = np.arange(st.n_rows - 3)  # the graph does not cover the last 3 rows
    idx, sim_k = _save_graph(store_copy, graph_rows)
    coords = np.random.default_rng(0).standard_normal((graph_rows.size, 2)).astype(np.float32)
    clusters = (graph_rows % 3).astype(np.int64)
    save_result(store_copy, "cluster", "baseline-leiden", params={"model": "baseline", "k": 4},
                arrays={"rows": graph_rows, "umap": coords, "clusters": clusters})
    rep = export(st, models=["baseline"], out=tmp_path / "a.h5ad", format="anndata", batch_rows=9)
    assert rep.graph["knn"] == "knn/baseline-k4" and rep.graph["umap"] == "cluster/baseline-leiden" and rep.graph["k"] == 4
    adata = ad.read_h5ad(tmp_path / "a.h5ad")
    n = st.n_rows
    assert adata.n_obs == n and set(adata.obsm.keys()) == {"X_baseline", "X_umap"}
    np.testing.assert_allclose(adata.obsm["X_baseline"], l2_normalize(st.select(model="baseline").vectors()), rtol=1e-6)
    assert list(adata.obs_names) == list(st.column("image_id"))
    assert adata.obs["patient_id"].astype(str).tolist() == list(st.column("patient_id"))
    np.testing.assert_array_equal(adata.obs["Effusion"].to_numpy(), st.metadata()["Effusion"].to_numpy())
    dist, conn = adata.obsp["distances"], adata.obsp["connectivities"]
    assert sp.issparse(dist) and sp.issparse(conn) and dist.format == "csr" and conn.format == "csr"
    assert dist.nnz == idx.size  # every edge lies inside the export
    i, j = 5, idx[5, 2]
    assert dist[i, j] == pytest.approx(1 - sim_k[5, 2], abs=1e-6)
    assert (abs(conn - conn.T) > 1e-7).nnz == 0 and conn[i, j] == pytest.approx(max(sim_k[5, 2], 0), abs=1e-6)
    assert dist[n - 1].nnz == 0  # rows outside the graph have no edges
    nb = adata.uns["neighbors"]
    assert nb["connectivities_key"] == "connectivities" and nb["distances_key"] == "distances"
    assert nb["params"]["n_neighbors"] == 5 and nb["params"]["use_rep"] == "X_baseline"
    np.testing.assert_allclose(adata.obsm["X_umap"][: n - 3], coords)
    assert np.isnan(adata.obsm["X_umap"][n - 3 :]).all()
    assert adata.obs["leiden"].astype(str).tolist()[:6] == ["0", "1", "2", "0", "1", "2"]
    assert json.loads(adata.uns["cxrstore"])["models"] == ["baseline"]
    # without stored results: exported, and the report says why there is no graph
    shutil.rmtree(store_copy / "results")
    rep2 = export(st, models=["baseline"], out=tmp_path / "b.h5ad", format="anndata")
    assert rep2.graph["knn"] is None and "no stored knn/cluster result" in rep2.graph["note"]
    assert "distances" not in ad.read_h5ad(tmp_path / "b.h5ad").obsp


def test_anndata_reads_the_cluster_module_layout(store_copy: Path, tmp_path: Path) -> None:
    """knn results as cxrstore.analysis.cluster writes them: neighbours as store rows, 'sims'."""
    import anndata as ad

    st = Store(store_copy)
    rows = np.arange(st.n_rows)
    idx, sim_k = _save_graph(store_copy, rows)
    shutil.rmtree(store_copy / "results" / "knn" / "baseline-k4")
    save_result(store_copy, "knn", "baseline-k4-exact", params={"model": "baseline", "k": 4, "metric": "cosine"},
                arrays={"rows": rows, "neighbors": rows[idx], "sims": sim_k})
    # export a subset: edges to rows outside it are dropped
    rep = export(st, models=["baseline"], where="sex == 'F'", out=tmp_path / "c.h5ad", format="anndata")
    adata = ad.read_h5ad(tmp_path / "c.h5ad")
    chosen = st.select(where="sex == 'F'").rows
    inside = np.isin(idx[chosen], chosen).sum()
    assert rep.graph["knn"] == "knn/baseline-k4-exact" and adata.obsp["distances"].nnz == inside


def test_anndata_takes_the_graph_of_the_cluster_module(store_copy: Path, tmp_path: Path) -> None:
    """The kNN result written by cxrstore.analysis.cluster.build_knn lands in obsp."""
    import anndata as ad

    from cxrstore.analysis import cluster

    st = Store(store_copy)
    sel = st.select(model="baseline")
    graph, res, _ = cluster.build_knn(sel, model="baseline", k=5)
    rep = export(st, models=["baseline"], out=tmp_path / "k.h5ad", format="anndata")
    assert rep.graph["knn"] == f"knn/{res.name}" and rep.graph["edges"] == len(sel) * 5
    adata = ad.read_h5ad(tmp_path / "k.h5ad")
    i = 3
    j = int(graph.indices[i, 0])
    assert adata.obsp["distances"][i, j] == pytest.approx(1 - float(graph.sims[i, 0]), abs=1e-5)


def test_anndata_works_with_scanpy(store_copy: Path, tmp_path: Path) -> None:
    sc = pytest.importorskip("scanpy", reason="scanpy is optional (the bench extra)")
    import anndata as ad

    st = Store(store_copy)
    _save_graph(store_copy, np.arange(st.n_rows), k=6)
    export(st, models=["baseline"], out=tmp_path / "s.h5ad", format="anndata")
    adata = ad.read_h5ad(tmp_path / "s.h5ad")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, random_state=0)  # reads obsp via uns["neighbors"]
    assert adata.obs["leiden"].nunique() >= 1 and adata.obs["leiden"].notna().all()


# -- CLI and demo ------------------------------------------------------------------------------
def test_cli_json_and_human(store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline,toy", "--where", "sex == 'F'", "--pca", "4",
                                     "--pca-name", "cli", "--view", "baseline=flat", "--format", "h5", "--out", str(tmp_path / "c.h5"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["format"] == "h5" and data["dim"] == 8 and data["blocks"][0]["pca"]["name"] == "cli-baseline"
    assert data["missing"]["dropped"] == data["missing"]["missing"]["toy"]["count"] > 0
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline", "--format", "anndata", "--out", str(tmp_path / "c.h5ad"), "--graph", "none"])
    assert res.exit_code == 0, res.output
    assert "exported" in res.output and "graph     none" in res.output
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline", "--format", "xlsx", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "xlsx" in res.output
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline,toy", "--pca", "toy=cli-baseline", "--format", "npz",
                                     "--out", str(tmp_path / "p.npz")])
    assert res.exit_code == 2 and "fitted on model 'baseline', not 'toy'" in res.output
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline,toy", "--pca", "baseline=cli-baseline,toy=none", "--format", "npz",
                                     "--out", str(tmp_path / "p.npz"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["dim"] == 4 + TOY_DIM
    res = runner.invoke(export_cmd, [str(store), "--models", "baseline,toy", "--missing", "error", "--format", "npz", "--out", str(tmp_path / "e.npz")])
    assert res.exit_code == 2 and "lack a model's vector" in res.output
    res = runner.invoke(export_cmd, [str(tmp_path / "nostore"), "--models", "baseline", "--format", "npz", "--out", str(tmp_path / "n.npz")])
    assert res.exit_code == 1 and "not a cxrstore store" in res.output


def test_export_demo_writes_h5ad_and_npz(store: Path, tmp_path: Path) -> None:
    reports = export_demo(store, tmp_path / "exports", models=["baseline"])
    assert (tmp_path / "exports" / "fused.h5ad").is_file() and (tmp_path / "exports" / "fused.npz").is_file()
    assert reports["npz"].rows == Store(store).n_rows and reports["anndata"].dim == 512


def test_matrix_view_and_a_pca_fitted_on_it(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((40, 12)).astype(np.float32)
    with open_writer(path) as w:
        w.ensure_model("tok", {**PROV, "native_shape": [4, 3]}, dim=12, chunk_rows=16)
        rows = [w.add_row(RowData(image_id=f"t{i}")) for i in range(40)]
        w.add_vectors("tok", rows, vecs)
        w.commit()
    fusion = fuse(path, ["tok"], view="mean", normalize=False)
    assert fusion.dim == 3 and fusion.params()["blocks"][0]["view"] == "mean"
    np.testing.assert_allclose(fusion.to_array(batch_rows=7), vecs.reshape(40, 4, 3).mean(axis=1), rtol=1e-6)
    pca = fit_pca(path, "tok", n_components=2, view="mean")
    assert pca.dim_in == 3 and load_pca(path, "tok-pca2").view == "mean"
    with pytest.raises(UsageError, match="expects view 'mean'"):
        fuse(path, ["tok"], pca="tok-pca2")  # view flat does not match
    assert fuse(path, ["tok"], view="mean", pca="tok-pca2").dim == 2


def test_export_does_not_import_torch() -> None:
    """PyTorch is optional: only cxrstore.export.torch_dataset imports it."""
    import subprocess
    import sys

    code = "import sys, cxrstore.export, cli.export; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
