"""FAISS indexes per model: exactness, recall of the approximate default, staleness, files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from cli.index import index as index_cmd
from cxrstore.analysis.retrieve import Retriever
from cxrstore.errors import UsageError
from cxrstore.index import (
    FLAT_MAX_COST,
    StaleIndexError,
    build_index,
    default_factory,
    gpu_available,
    index_status,
    load_index,
    normalise,
    update_index,
)
from cxrstore.index import faiss_index
from cxrstore.index.faiss_index import APPROX_EF_CONSTRUCTION, CALIBRATION_GRID, HIGH_DIM_MIN, SQ_TRAIN_ROWS, calibrate, fit_pca, index_chain
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "fake", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [0], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


def clustered(n: int, d: int, *, clusters: int = 20, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """Structured synthetic vectors: an overlapping mixture of Gaussian clusters, L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    scale = rng.uniform(0.5, 1.5, clusters)[which, None]
    x = centres[which] + spread * scale * rng.standard_normal((n, d)).astype(np.float32) * np.sqrt(1.0)
    return normalise(x)


def make_store(path: Path, vectors: np.ndarray, *, model: str = "m", rows: list[RowData] | None = None, start: int = 0,
               chunk_rows: int | None = None) -> Store:
    """Append rows (default: generated metadata) with ``vectors`` to a store at ``path``."""
    n, d = vectors.shape
    if rows is None:
        rows = [
            RowData(image_id=f"img{i:05d}", patient_id=f"pt{i // 4}", dataset="toy", view="PA" if i % 3 else "AP",
                    sex="F" if i % 2 else "M", age=float(20 + i % 60),
                    labels={"Effusion": float((i // 4) % 2), "Edema": None if i % 7 == 0 else float(i % 3 == 0)})
            for i in range(start, start + n)
        ]
    with open_writer(path) as w:
        w.ensure_model(model, {**PROV, "native_shape": [d]}, dim=d, chunk_rows=chunk_rows)
        for lo in range(0, n, 4096):
            ids = [w.add_row(r) for r in rows[lo : lo + 4096]]
            w.add_vectors(model, ids, vectors[lo : lo + 4096])
        w.commit()
    return Store(path)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = normalise(q) @ normalise(x).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(scope="module")
def flat_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, np.ndarray]:
    x = clustered(700, 48, seed=1)
    # stored un-normalised: the index must normalise for cosine
    scale = np.random.default_rng(2).uniform(0.5, 3.0, (len(x), 1)).astype(np.float32)
    store = make_store(tmp_path_factory.mktemp("flat") / "s", x * scale, chunk_rows=64)
    build_index(store, "m", batch_rows=100)
    return store, x


def test_default_factory_thresholds() -> None:
    assert default_factory(500, 512) == ("Flat", {})
    assert default_factory(FLAT_MAX_COST // 1024, 1024)[0] == "Flat"
    assert default_factory(FLAT_MAX_COST // 1024 + 1, 1024)[0].startswith("HNSW")
    factory, params = default_factory(50_000, 512)
    assert factory == "HNSW32,Flat" and params == {"efSearch": 128}
    assert default_factory(50_000, 1024)[0] == "HNSW32_SQ8,RFlat"
    # high dimensions: HNSW over 8-bit codes, exact re-rank
    assert default_factory(20_000, 24_576) == ("HNSW32_SQ8,RFlat", {"efSearch": 64, "k_factor_rf": 2})
    assert default_factory(FLAT_MAX_COST // HIGH_DIM_MIN + 1, HIGH_DIM_MIN)[0] == "HNSW32_SQ8,RFlat"
    assert default_factory(50_000, HIGH_DIM_MIN // 2)[0] == "HNSW32,Flat"
    assert default_factory(FLAT_MAX_COST // 24_576, 24_576)[0] == "Flat"


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def high_dim_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, np.ndarray, dict]:
    """5,000 x 4,096 clustered vectors with isotropic within-cluster noise, indexed with ``auto``."""
    n, d = 5000, 4 * HIGH_DIM_MIN
    assert n * d > FLAT_MAX_COST
    x = clustered(n, d, clusters=30, spread=0.7, seed=4)
    store = make_store(tmp_path_factory.mktemp("hd") / "s", x)
    side = build_index(store, "m")
    return store, x, side


def held_out_queries(x: np.ndarray, m: int = 300) -> np.ndarray:
    """Stored rows plus noise of norm about 0.4 (as the 64-d recall test's 0.05 per dimension)."""
    rng = np.random.default_rng(0)
    noise = 0.4 / np.sqrt(x.shape[1])
    return x[rng.choice(len(x), m, replace=False)] + noise * rng.standard_normal((m, x.shape[1])).astype(np.float32)


def test_high_dim_default_is_hnsw_sq8_refine_and_records_training(high_dim_store: tuple[Store, np.ndarray, dict]) -> None:
    store, x, side = high_dim_store
    assert side["factory"] == "HNSW32_SQ8,RFlat" and side["auto"] and side["index_factory"] == "IDMap2,HNSW32_SQ8,RFlat"
    trained = side["build_params"]["trained"]
    assert trained["parts"] == ["IndexHNSWSQ"] and trained["rows"] == SQ_TRAIN_ROWS == side["build_params"]["train_rows"]
    cal = side["build_params"]["calibration"]
    chosen = {"efSearch": cal["tried"][-1]["efSearch"], "k_factor_rf": cal["tried"][-1]["k_factor_rf"]}
    assert side["search_params"] == chosen and cal["reached"] and cal["tried"][-1]["recall_at_10"] >= 0.98
    assert cal["held_out"] and cal["queries"] == 200
    assert all(t["recall_at_10"] < 0.98 for t in cal["tried"][:-1])
    assert [(t["efSearch"], t["k_factor_rf"]) for t in cal["tried"]] == list(CALIBRATION_GRID[: len(cal["tried"])])
    loaded = load_index(store, "m")
    parts = index_chain(loaded.index)
    assert [type(p).__name__ for p in parts] == ["IndexIDMap2", "IndexRefineFlat", "IndexHNSWSQ"]
    assert parts[1].k_factor == side["search_params"]["k_factor_rf"] and parts[-1].hnsw.efSearch == side["search_params"]["efSearch"]
    assert not loaded.exact and loaded.supports_selector


def test_high_dim_default_reaches_recall_095(high_dim_store: tuple[Store, np.ndarray, dict]) -> None:
    store, x, _ = high_dim_store
    loaded = load_index(store, "m")
    q = held_out_queries(x)
    sims, rows = loaded.search(loaded.prepare_queries(q), 10)
    want_sims, truth = brute_force(x, q, 10)
    assert recall(rows, truth) >= 0.95, recall(rows, truth)
    # the re-rank returns exact cosine similarities of the rows it returns
    exact = np.einsum("ij,ikj->ik", normalise(q), x[rows])
    np.testing.assert_allclose(sims, exact, atol=1e-5)


@pytest.mark.slow
def test_sq8_default_at_1024_dims_reaches_recall_095(tmp_path: Path) -> None:
    """From HIGH_DIM_MIN (1024, MedImageInsight's width) the automatic index is HNSW over
    8-bit codes with an exact re-rank; its calibrated default keeps recall@10 >= 0.95."""
    n, d = FLAT_MAX_COST // HIGH_DIM_MIN + 600, HIGH_DIM_MIN
    x = clustered(n, d, clusters=30, spread=0.7, seed=12)
    store = make_store(tmp_path / "s", x)
    side = build_index(store, "m")
    assert side["factory"] == "HNSW32_SQ8,RFlat" and side["auto"]
    loaded = load_index(store, "m")
    q = held_out_queries(x)
    sims, rows = loaded.search(loaded.prepare_queries(q), 10)
    _, truth = brute_force(x, q, 10)
    assert recall(rows, truth) >= 0.95, recall(rows, truth)
    np.testing.assert_allclose(sims, np.einsum("ij,ikj->ik", normalise(q), x[rows]), atol=1e-5)


def test_high_dim_index_file_opens_with_faiss_read_index(high_dim_store: tuple[Store, np.ndarray, dict]) -> None:
    store, x, side = high_dim_store
    folder = store.path / "indexes" / "m"
    raw = faiss.read_index(str(folder / side["files"]["index"]))
    assert raw.ntotal == len(x) and raw.d == x.shape[1]
    space = faiss.ParameterSpace()
    for key, value in side["search_params"].items():  # what benchmarks/bench_search.py's raw path does
        space.set_index_parameter(raw, key, float(value))
    q = held_out_queries(x, 50)
    _, raw_rows = raw.search(normalise(q), 10)
    loaded = load_index(store, "m")
    _, rows = loaded.search(loaded.prepare_queries(q), 10)
    np.testing.assert_array_equal(raw_rows, rows)


def test_high_dim_filtered_search(high_dim_store: tuple[Store, np.ndarray, dict]) -> None:
    store, x, _ = high_dim_store
    loaded = load_index(store, "m")
    q = held_out_queries(x, 40)
    # a broad filter goes through the ID selector, past the re-rank wrapper
    allowed = np.arange(1, len(x), 2)
    sims, rows = loaded.search(loaded.prepare_queries(q), 10, allowed=allowed)
    assert np.isin(rows, allowed).all()
    want_sims, pos = brute_force(x[allowed], q, 10)
    assert recall(rows, allowed[pos]) >= 0.95
    np.testing.assert_allclose(sims, np.einsum("ij,ikj->ik", normalise(q), x[rows]), atol=1e-5)
    retriever = Retriever(store, "m", device="cpu")
    # through the retriever: a `where` keeping more than FLAT_MAX_COST / dim rows uses the selector
    broad = np.flatnonzero(store.metadata()["age"].to_numpy() >= 25)
    assert broad.size * x.shape[1] > FLAT_MAX_COST
    table = retriever.search_vectors(q, k=10, where="age >= 25")
    assert (table["age"] >= 25).all() and len(table) == 10 * len(q)
    _, pos = brute_force(x[broad], q, 10)
    assert recall(table["row"].to_numpy().reshape(len(q), 10), broad[pos]) >= 0.95
    # a narrow filter (rows x dim within the Flat threshold) is searched exactly by the retriever
    narrow = np.arange(7, len(x), 13)
    assert narrow.size * x.shape[1] <= FLAT_MAX_COST
    sims, rows = retriever.knn(q, k=5, allowed=narrow)
    want_sims, pos = brute_force(x[narrow], q, 5)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert (rows == narrow[pos]).mean() > 0.99


def test_calibration_takes_the_first_setting_reaching_the_target(high_dim_store: tuple[Store, np.ndarray, dict],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store, x, side = high_dim_store
    index = load_index(store, "m").index
    q = normalise(held_out_queries(x, 100))
    try:
        monkeypatch.setattr(faiss_index, "CALIBRATION_RECALL", 0.0)
        params, record = calibrate(index, q)
        assert params == dict(zip(("efSearch", "k_factor_rf"), CALIBRATION_GRID[0])) and len(record["tried"]) == 1 and record["reached"]
        monkeypatch.setattr(faiss_index, "CALIBRATION_RECALL", 1.01)  # unreachable: the whole grid, the widest kept
        params, record = calibrate(index, q)
        assert params == dict(zip(("efSearch", "k_factor_rf"), CALIBRATION_GRID[-1])) and not record["reached"]
        recalls = [t["recall_at_10"] for t in record["tried"]]
        assert len(recalls) == len(CALIBRATION_GRID) and recalls[-1] >= recalls[0] and recalls[-1] >= 0.98
    finally:  # the loaded index is cached: give it back its own settings
        space = faiss.ParameterSpace()
        for key, value in side["search_params"].items():
            space.set_index_parameter(index, key, float(value))


def test_fit_pca_matches_faiss_pca_training() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 1000)) * np.linspace(3, 0.1, 1000)).astype(np.float32)
    ours, theirs = faiss.PCAMatrix(1000, 64), faiss.PCAMatrix(1000, 64)
    fit_pca(ours, x)
    theirs.train(x)
    # components agree up to sign; eigenvalues as FAISS scales them
    np.testing.assert_allclose(np.abs(ours.apply(x)), np.abs(theirs.apply(x)), atol=1e-3)
    np.testing.assert_allclose(faiss.vector_to_array(ours.eigenvalues), faiss.vector_to_array(theirs.eigenvalues)[:64], rtol=1e-3)
    # fewer rows than output dimensions (FAISS refuses): the extra directions are zero
    few = faiss.PCAMatrix(1000, 64)
    fit_pca(few, x[:20])
    y = few.apply(x)
    assert np.abs(y[:, 20:]).max() == 0 and np.abs(y[:, :19]).max() > 0
    with pytest.raises(UsageError, match="dimension 999"):
        fit_pca(faiss.PCAMatrix(1000, 8), x[:, :999])


def test_pca_index_update_keeps_training_and_finds_new_rows(tmp_path: Path) -> None:
    x = clustered(700, 64, seed=13)
    store = make_store(tmp_path / "s", x[:500])
    side = build_index(store, "m", factory="PCA32,HNSW16,RFlat", search_params={"efSearch": 64, "k_factor_rf": 16}, train_rows=300)
    assert side["build_params"]["trained"]["parts"] == ["PCAMatrix 64->32"] and side["build_params"]["trained"]["rows"] == 300
    make_store(tmp_path / "s", x[500:], start=500)
    store = Store(tmp_path / "s")
    assert index_status(store, "m").new_rows == 200
    new = update_index(store, "m")
    assert new["build_params"] == side["build_params"] and new["updates"][-1] == {**new["updates"][-1], "added": 200, "retrained": False}
    loaded = load_index(store, "m")
    assert loaded.index.ntotal == 700 and index_chain(loaded.index)[1].k_factor == 16
    _, rows = loaded.search(loaded.prepare_queries(x[500:700]), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(500, 700))


def test_exact_index_equals_numpy_cosine(flat_store: tuple[Store, np.ndarray]) -> None:
    store, x = flat_store
    loaded = load_index(store, "m", device="cpu")
    assert loaded.exact and loaded.sidecar["factory"] == "Flat" and loaded.sidecar["auto"]
    q = clustered(50, 48, seed=9) * 2.5
    sims, rows = loaded.search(loaded.prepare_queries(q), 10)
    want_sims, want_rows = brute_force(x, q, 10)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    # rows equal except where two similarities tie within float error
    mismatch = rows != want_rows
    assert np.all(np.abs(sims[mismatch] - want_sims[mismatch]) < 1e-5)
    assert mismatch.mean() < 0.01


def test_index_file_opens_with_faiss_read_index(flat_store: tuple[Store, np.ndarray]) -> None:
    store, x = flat_store
    folder = store.path / "indexes" / "m"
    side = json.loads((folder / "index.json").read_text())
    raw = faiss.read_index(str(folder / side["files"]["index"]))
    assert raw.ntotal == len(x) == side["n_rows"] and raw.d == 48
    np.testing.assert_array_equal(np.sort(faiss.vector_to_array(raw.id_map)), np.arange(len(x)))
    np.testing.assert_array_equal(np.load(folder / side["files"]["rows"]), np.arange(len(x)))
    assert side["metric"] == "cosine" and side["store_generation"] == store.generation and side["dim"] == 48
    _, i = raw.search(x[:5], 1)  # normalised rows: each finds itself
    np.testing.assert_array_equal(i[:, 0], np.arange(5))


def test_filtered_flat_search_is_exact(flat_store: tuple[Store, np.ndarray]) -> None:
    store, x = flat_store
    loaded = load_index(store, "m", device="cpu")
    allowed = np.arange(3, len(x), 7)
    q = clustered(20, 48, seed=11)
    sims, rows = loaded.search(loaded.prepare_queries(q), 5, allowed=allowed)
    want_sims, pos = brute_force(x[allowed], q, 5)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert np.isin(rows, allowed).all()
    assert (rows == allowed[pos]).mean() > 0.99


@pytest.mark.slow
def test_approximate_default_reaches_recall_095(tmp_path: Path) -> None:
    n, d = 10_000, 64
    x = clustered(n, d, clusters=30, spread=0.7, seed=4)
    store = make_store(tmp_path / "s", x)
    factory, params = default_factory(10 * FLAT_MAX_COST, d)  # what auto picks beyond the threshold
    side = build_index(store, "m", factory=factory, search_params=params)
    assert side["factory"] == "HNSW32,Flat" and side["search_params"] == {"efSearch": 128}
    assert side["build_params"]["efConstruction"] == APPROX_EF_CONSTRUCTION == 80
    loaded = load_index(store, "m")
    assert not loaded.exact
    q = x[np.random.default_rng(0).choice(n, 300, replace=False)] + 0.05 * np.random.default_rng(1).standard_normal((300, d)).astype(np.float32)
    _, rows = loaded.search(loaded.prepare_queries(q), 10)
    _, truth = brute_force(x, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert recall >= 0.95, recall


def test_ivf_factory_trains_on_sample_and_is_exact_with_all_probes(tmp_path: Path) -> None:
    x = clustered(900, 32, seed=5)
    store = make_store(tmp_path / "s", x)
    side = build_index(store, "m", factory="IVF8,Flat", search_params={"nprobe": 8}, train_rows=400, seed=3)
    assert side["build_params"]["train_rows"] == 400 and side["factory"] == "IVF8,Flat"
    loaded = load_index(store, "m")
    q = clustered(30, 32, seed=6)
    sims, _ = loaded.search(loaded.prepare_queries(q), 10)
    np.testing.assert_allclose(sims, brute_force(x, q, 10)[0], atol=1e-5)


def test_stale_index_is_refused_then_updated(tmp_path: Path) -> None:
    x = clustered(300, 16, seed=7)
    store = make_store(tmp_path / "s", x[:200])
    build_index(store, "m", factory="HNSW32,Flat", search_params={"efSearch": 64})
    assert index_status(store, "m").fresh
    make_store(tmp_path / "s", x[200:], start=200)  # an ingest appends 100 rows
    store = Store(tmp_path / "s")
    status = index_status(store, "m")
    assert not status.fresh and status.new_rows == 100 and not status.needs_rebuild
    with pytest.raises(StaleIndexError, match=r"cxrstore index .*s update --model m"):
        load_index(store, "m")
    side = update_index(store, "m")
    assert side["n_rows"] == 300 and side["store_generation"] == store.generation and side["updates"][-1]["added"] == 100
    loaded = load_index(store, "m")
    assert loaded.rows.size == 300 and loaded.index.ntotal == 300
    _, rows = loaded.search(loaded.prepare_queries(x[250:260]), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(250, 260))
    assert update_index(store, "m")["build"] == side["build"]  # fresh: nothing to do


def test_missing_index_and_other_store_need_a_build(tmp_path: Path) -> None:
    x = clustered(60, 8, seed=8)
    store = make_store(tmp_path / "a", x)
    with pytest.raises(StaleIndexError, match="build --model m"):
        load_index(store, "m")
    with pytest.raises(StaleIndexError, match="build --model m"):
        update_index(store, "m")
    build_index(store, "m")
    other = make_store(tmp_path / "b", x)  # same rows, another store
    (other.path / "indexes").mkdir()
    import shutil

    shutil.copytree(store.path / "indexes" / "m", other.path / "indexes" / "m")
    status = index_status(other, "m")
    assert status.needs_rebuild and "another store" in status.reason


def test_rebuilds_replace_atomically_and_concurrent_builds_do_not_corrupt(tmp_path: Path) -> None:
    x = clustered(400, 24, seed=10)
    store = make_store(tmp_path / "s", x)
    first = build_index(store, "m")
    errors: list[BaseException] = []

    def run(factory: str) -> None:
        try:
            build_index(Store(store.path), "m", factory=factory)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in ("Flat", "HNSW16,Flat", "Flat", "HNSW16,Flat")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    folder = store.path / "indexes" / "m"
    side = json.loads((folder / "index.json").read_text())
    assert side["build"] != first["build"] and side["factory"] in ("Flat", "HNSW16,Flat")
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob(".index.json.*"))
    loaded = load_index(store, "m")
    assert loaded.index.ntotal == 400 and loaded.sidecar["build"] == side["build"]


def test_bad_options_are_usage_errors(flat_store: tuple[Store, np.ndarray]) -> None:
    store, _ = flat_store
    with pytest.raises(UsageError, match="bad factory 'NoSuchIndex'"):
        build_index(store, "m", factory="NoSuchIndex")
    with pytest.raises(UsageError, match="unknown metric 'l1'"):
        build_index(store, "m", metric="l1")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="model 'nope' is not in store"):
        build_index(store, "nope")
    with pytest.raises(UsageError, match="unknown device"):
        load_index(store, "m", device="tpu")  # type: ignore[arg-type]
    if not gpu_available():
        with pytest.raises(UsageError, match="no GPU"):
            load_index(store, "m", device="gpu")
    assert load_index(store, "m", device="auto").device == ("gpu" if gpu_available() else "cpu")


def test_cli_build_info_update(tmp_path: Path) -> None:
    x = clustered(120, 16, seed=12)
    make_store(tmp_path / "s", x[:100])
    runner = CliRunner()
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "info", "--model", "m"])
    assert res.exit_code == 0 and "no index" in res.output and "build --model m" in res.output
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "build", "--model", "m", "--factory", "HNSW8,Flat",
                                    "--search-param", "efSearch=32", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["index"]["factory"] == "HNSW8,Flat" and data["index"]["search_params"] == {"efSearch": 32}
    assert data["status"]["fresh"] is True
    make_store(tmp_path / "s", x[100:], start=100)
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "info", "--model", "m"])
    assert res.exit_code == 0 and "STALE" in res.output and "update --model m" in res.output
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "update", "--model", "m", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["index"]["n_rows"] == 120
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "build", "--model", "m", "--factory", "Bogus"])
    assert res.exit_code == 2 and "bad factory 'Bogus'" in res.output
    res = runner.invoke(index_cmd, [str(tmp_path / "s"), "build", "--model", "m", "--search-param", "efSearch"])
    assert res.exit_code == 2 and "NAME=NUMBER" in res.output
