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
    factory, params = default_factory(50_000, 1024)
    assert factory == "HNSW32,Flat" and params == {"efSearch": 128}
    assert default_factory(20_000, 24_576)[0] == "HNSW32,Flat"


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
    assert side["build_params"]["efConstruction"] == 40
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
