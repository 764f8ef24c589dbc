"""Similar-image and similar-patient search: filters, patient exclusion, files, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.search import format_results
from cli.search import search as search_cmd
from cxrstore.analysis.retrieve import (
    Retriever,
    demo_search,
    encoder_from_provenance,
    evaluate_retrieval,
    precision_at_k,
    search,
)
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import UsageError
from cxrstore.index import StaleIndexError, build_index, normalise
from cxrstore.ingest import ingest
from cxrstore.store.results import load_result
from cxrstore.store.store import RowData, Store
from tests.test_index import make_store

# A hand-made store: 4 patients x 3 images. pA and pB are close to each other (both
# Effusion positive), pC and pD too (both negative); each patient's images are closest
# to one another.
PATIENTS = {"pA": ("F", 30.0, 1.0), "pB": ("M", 40.0, 1.0), "pC": ("F", 50.0, 0.0), "pD": ("M", 60.0, 0.0)}


def _hand_rows() -> list[RowData]:
    rows = []
    for p, (sex, age, eff) in PATIENTS.items():
        for j in range(3):
            rows.append(RowData(image_id=f"{p}-{j}", patient_id=p, dataset="toy", view="PA" if j < 2 else "AP", sex=sex,
                                age=age + j, labels={"Effusion": eff, "Edema": float(j == 0)}))
    return rows


def _hand_vectors(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = np.eye(8, dtype=np.float32)
    centres = {"pA": e[0], "pB": e[0] + 0.35 * e[1], "pC": e[2], "pD": e[2] + 0.35 * e[3]}
    x = np.stack([centres[p] + 0.05 * rng.standard_normal(8).astype(np.float32) for p in PATIENTS for _ in range(3)])
    return x * rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, np.ndarray]:
    x = _hand_vectors()
    store = make_store(tmp_path_factory.mktemp("hand") / "s", x, rows=_hand_rows())
    build_index(store, "m")
    return store, x


def _brute(x: np.ndarray, q: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = normalise(q) @ normalise(x[allowed]).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return allowed[order], np.take_along_axis(sims, order, 1)


def test_stored_image_excludes_its_patient_by_default(hand_store: tuple[Store, np.ndarray]) -> None:
    store, x = hand_store
    df = search(store, model="m", image_id="pA-0", k=4)
    assert list(df.columns[:4]) == ["query", "rank", "row", "similarity"]
    assert {"patient_id", "sex", "age", "Effusion", "Edema"} <= set(df.columns)
    assert (df["patient_id"] != "pA").all() and df["rank"].tolist() == [1, 2, 3, 4]
    rows, sims = _brute(x, x[:1], np.arange(3, 12), 4)
    assert df["row"].tolist() == rows[0].tolist()
    np.testing.assert_allclose(df["similarity"], sims[0], atol=1e-5)
    assert df["patient_id"].iloc[:3].eq("pB").all()  # the nearest other patient


def test_include_same_patient_never_returns_the_query_itself(hand_store: tuple[Store, np.ndarray]) -> None:
    store, _ = hand_store
    df = search(store, model="m", image_id="pA-0", k=3, exclude_same_patient=False)
    assert sorted(df["row"].iloc[:2]) == [1, 2] and 0 not in df["row"].tolist()
    assert df["image_id"].iloc[0] in ("pA-1", "pA-2")


@pytest.mark.parametrize("where, allowed", [
    ("sex == 'F'", [0, 1, 2, 6, 7, 8]),
    ("age >= 40 and Effusion == 1", [3, 4, 5]),
    ({"view": "AP"}, [2, 5, 8, 11]),
    ("view == 'PA' and Edema == 0", [1, 4, 7, 10]),
])
def test_where_filters_are_exact_with_flat(hand_store: tuple[Store, np.ndarray], where: object, allowed: list[int]) -> None:
    store, x = hand_store
    df = search(store, model="m", image_id="pC-1", k=3, where=where)
    keep = np.array([r for r in allowed if not 6 <= r <= 8], dtype=np.int64)  # pC itself excluded
    rows, sims = _brute(x, x[7:8], keep, 3)
    assert df["row"].tolist() == rows[0][: len(df)].tolist() and len(df) == min(3, keep.size)
    np.testing.assert_allclose(df["similarity"], sims[0][: len(df)], atol=1e-5)


def test_where_on_approximate_index_searches_the_subset_exactly(tmp_path: Path) -> None:
    x = _hand_vectors(seed=5)
    store = make_store(tmp_path / "s", x, rows=_hand_rows())
    build_index(store, "m", factory="HNSW4,Flat", search_params={"efSearch": 4})
    retriever = Retriever(store, "m")
    assert not retriever.index.exact
    df = retriever.search_vectors(x[:2], k=5, where="sex == 'M'")
    rows, sims = _brute(x, x[:2], np.array([3, 4, 5, 9, 10, 11]), 5)
    assert df["row"].to_numpy().reshape(2, 5).tolist() == rows.tolist()
    np.testing.assert_allclose(df["similarity"].to_numpy().reshape(2, 5), sims, atol=1e-5)


def test_patient_search_aggregates_best_similarity(hand_store: tuple[Store, np.ndarray]) -> None:
    store, x = hand_store
    df = search(store, model="m", patient_id="pA", k=4)
    sims = normalise(x[:3]) @ normalise(x[3:]).T  # pA's images against everyone else
    best = sims.max(axis=0)
    order = np.argsort(-best, kind="stable")[:4]
    assert df["row"].tolist() == (order + 3).tolist()
    np.testing.assert_allclose(df["similarity"], best[order], atol=1e-5)
    assert (df["query"] == "pA").all() and "hits" in df.columns and df["hits"].between(1, 3).all()
    assert (df["patient_id"] != "pA").all()
    own = search(store, model="m", patient_id="pA", k=3, exclude_same_patient=False)
    assert set(own["row"]) == {0, 1, 2}  # each image finds its two siblings first


def test_batch_of_queries_equals_single_queries(hand_store: tuple[Store, np.ndarray]) -> None:
    store, _ = hand_store
    retriever = Retriever(store, "m")
    ids = ["pA-0", "pB-2", "pD-1"]
    batch = retriever.search_image_ids(ids, k=5, where="age < 62")
    single = pd.concat([retriever.search_image_ids([i], k=5, where="age < 62") for i in ids], ignore_index=True)
    pd.testing.assert_frame_equal(batch, single)
    assert batch["query"].tolist() == [i for i in ids for _ in range(5)]


def test_knn_pads_when_fewer_than_k_rows_qualify(hand_store: tuple[Store, np.ndarray]) -> None:
    store, x = hand_store
    retriever = Retriever(store, "m")
    q = x[[0, 7]] + 0.01
    sims, rows = retriever.knn(q, k=5)  # 12 rows: every query gets k results
    want_rows, want_sims = _brute(x, q, np.arange(len(x)), 5)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    sims, rows = retriever.knn(q, k=len(x) + 3)  # more than the store holds
    assert (rows[:, : len(x)] >= 0).all() and (rows[:, len(x) :] == -1).all()
    assert not np.isnan(sims[:, : len(x)]).any() and np.isnan(sims[:, len(x) :]).all()
    allowed = np.array([1, 4, 9])
    sims, rows = retriever.knn(q, k=5, allowed=allowed)  # a filter keeping 3 rows
    want_rows, _ = _brute(x, q, allowed, 3)
    np.testing.assert_array_equal(rows[:, :3], want_rows)
    assert (rows[:, 3:] == -1).all() and np.isnan(sims[:, 3:]).all()


def test_bad_queries_are_usage_errors(hand_store: tuple[Store, np.ndarray]) -> None:
    store, x = hand_store
    with pytest.raises(UsageError, match="exactly one of"):
        search(store, model="m", image_id="pA-0", patient_id="pA")
    with pytest.raises(UsageError, match="exactly one of"):
        search(store, model="m")
    with pytest.raises(UsageError, match="image id 'nope' is not in store"):
        search(store, model="m", image_id="nope")
    with pytest.raises(UsageError, match="patient id 'nobody'"):
        search(store, model="m", patient_id="nobody")
    with pytest.raises(UsageError, match="k must be a positive integer"):
        search(store, model="m", image_id="pA-0", k=0)
    with pytest.raises(UsageError, match="bad filter"):
        search(store, model="m", image_id="pA-0", where="nosuchcolumn > 3")
    with pytest.raises(UsageError, match="not to image files or vectors"):
        search(store, model="m", vectors=x[:1], exclude_same_patient=True)
    with pytest.raises(UsageError, match="dimension 3"):
        search(store, model="m", vectors=np.ones((1, 3)))


def test_precision_at_k_by_hand() -> None:
    q = np.array([1.0, 0.0, 1.0])
    nb = np.array([[1, 1, 0], [0, 1, np.nan], [np.nan, np.nan, np.nan]])
    p = precision_at_k(q, nb)
    np.testing.assert_allclose(p[:2], [2 / 3, 1 / 2])
    assert np.isnan(p[2])


def test_evaluate_retrieval_on_hand_made_store(hand_store: tuple[Store, np.ndarray]) -> None:
    store, _ = hand_store
    r3 = evaluate_retrieval(store, model="m", label="Effusion", k=3)
    # the patient excluded, each image's 3 nearest are the images of its partner patient
    assert r3["precision_at_k"] == pytest.approx(1.0) and r3["n_queries"] == 12
    assert r3["chance"] == pytest.approx(0.5) and r3["lift"] == pytest.approx(2.0)
    r6 = evaluate_retrieval(store, model="m", label="Effusion", k=6)
    assert r6["precision_at_k"] == pytest.approx(0.5)  # 3 from the partner, 3 from the other pair
    saved = load_result(store, "retrieval", "m-Effusion-k3")
    assert saved.params["k"] == 3 and saved.summary["precision_at_k"] == pytest.approx(1.0)
    assert len(saved.table("per_query")) == 12
    only_f = evaluate_retrieval(store, model="m", label="Effusion", k=3, where="sex == 'F'", save=False)
    # among women (pA positive, pC negative) with the patient excluded, neighbours have the other label
    assert only_f["precision_at_k"] == pytest.approx(0.0) and only_f["n_pool"] == 6
    with pytest.raises(UsageError, match="unknown label 'Nope'"):
        evaluate_retrieval(store, model="m", label="Nope")


def test_stale_index_is_refused_by_search(tmp_path: Path) -> None:
    x = _hand_vectors(seed=2)
    rows = _hand_rows()
    store = make_store(tmp_path / "s", x[:9], rows=rows[:9])
    build_index(store, "m")
    make_store(tmp_path / "s", x[9:], rows=rows[9:])
    with pytest.raises(StaleIndexError, match=r"3 committed rows are not in it.*cxrstore index .* update --model m"):
        search(tmp_path / "s", model="m", image_id="pA-0")
    res = CliRunner().invoke(search_cmd, [str(tmp_path / "s"), "--model", "m", "--image-id", "pA-0"])
    assert res.exit_code == 1 and "update --model m" in res.output


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory, small_demo: Path) -> Path:
    path = tmp_path_factory.mktemp("demo-search") / "store"
    ingest(path, CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo").records(),
           encoder=get_encoder("baseline"), workers=0)
    build_index(path, "baseline")
    return path


@pytest.mark.slow
def test_new_image_file_that_was_ingested_finds_its_own_row_first(demo_store: Path, small_demo: Path) -> None:
    store = Store(demo_store)
    meta = store.metadata()
    picks = [3, len(meta) - 2]
    files = [small_demo / meta.loc[r, "path"] for r in picks]
    df = search(store, model="baseline", image=files, k=3)
    firsts = df[df["rank"] == 1]
    assert firsts["row"].tolist() == picks
    assert (firsts["similarity"] > 0.9999).all()
    assert firsts["query"].tolist() == [str(f) for f in files]


def test_encoder_is_rebuilt_from_provenance_and_checked(demo_store: Path) -> None:
    prov = Store(demo_store).provenance("baseline")
    assert encoder_from_provenance(prov).config.to_json() == prov["encoder"]
    changed = {**prov, "encoder": {**prov["encoder"], "params": {**prov["encoder"]["params"], "resize": "bilinear"}}}
    with pytest.raises(UsageError, match="params.resize differ"):
        encoder_from_provenance(changed)


def test_cli_search_table_json_and_evaluate(demo_store: Path) -> None:
    runner = CliRunner()
    store = Store(demo_store)
    image_id = store.metadata()["image_id"].iloc[0]
    res = runner.invoke(search_cmd, [str(demo_store), "--model", "baseline", "--image-id", image_id, "--k", "4"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].split()[:4] == ["query", "rank", "row", "similarity"] and len(lines) == 2 + 4
    res = runner.invoke(search_cmd, [str(demo_store), "--model", "baseline", "--image-id", image_id, "--k", "4", "--json",
                                     "--where", "sex == 'F'", "--where", "age > 0"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    patient = store.metadata()["patient_id"].iloc[0]
    assert 0 < len(data) <= 4 and all(d["sex"] == "F" and d["patient_id"] != patient for d in data)
    res = runner.invoke(search_cmd, [str(demo_store), "--model", "baseline", "--evaluate", "--label", "Effusion", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["k"] == 10 and 0.0 <= summary["precision_at_k"] <= 1.0 and summary["n_queries"] == store.n_rows - int(store.metadata()["Effusion"].isna().sum())
    res = runner.invoke(search_cmd, [str(demo_store), "--model", "baseline"])
    assert res.exit_code == 2 and "exactly one kind of query" in res.output
    res = runner.invoke(search_cmd, [str(demo_store), "--model", "baseline", "--evaluate"])
    assert res.exit_code == 2 and "--evaluate needs --label" in res.output


def test_demo_search_builds_searches_and_evaluates(demo_store: Path) -> None:
    out = demo_search(demo_store, model="baseline", k=3)
    assert out["index"]["factory"] == "Flat" and out["index"]["n_rows"] == Store(demo_store).n_rows
    assert len(out["neighbours"]) == 3 and (out["neighbours"]["query"] == out["query"]).all()
    assert out["evaluation"]["label"] == Store(demo_store).labels[0] and out["evaluation"]["k"] == 3
    text = format_results(out["neighbours"])
    assert text.splitlines()[0].startswith("query") and len(text.splitlines()) == 5
