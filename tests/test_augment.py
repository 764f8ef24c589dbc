"""The study's five augmentation variants, and augmented rows in the store."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.model_selection import GroupKFold

import cxrstore.ingest as ingest_mod
from cli.ingest import ingest as ingest_cmd
from cxrstore.augment import (
    VARIANT_NAMES,
    apply_variant,
    augment_record,
    parse_variants,
)
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.errors import UsageError
from cxrstore.ingest import ingest, load_one
from cxrstore.io.preprocess import preprocess
from cxrstore.io.read import read_image
from cxrstore.store.store import Store
from cxrstore.store.verify import verify


def _ingest(store: Path, root: Path, manifest: Path | None = None, **kw):
    adapter = CsvManifest(manifest or root / "manifest.csv", root=root, dataset_name="demo")
    kw.setdefault("workers", 0)
    return ingest(store, adapter.records(), encoder=get_encoder("baseline"), policies=adapter.policies(), **kw)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory: pytest.TempPathFactory, small_demo: Path) -> Path:
    store = tmp_path_factory.mktemp("aug") / "s"
    _ingest(store, small_demo, augment="all", batch_size=7, commit_every=20)
    return store


def test_parse_variants() -> None:
    assert parse_variants("all") == VARIANT_NAMES == ("brighter", "darker", "contrast", "rot+45", "rot-45")
    assert parse_variants(True) == VARIANT_NAMES and parse_variants(None) == () and parse_variants("") == ()
    assert parse_variants("rot-45, brighter") == ("brighter", "rot-45")  # canonical order
    with pytest.raises(UsageError, match="unknown augmentation variant.*'blur'.*brighter, darker"):
        parse_variants("brighter,blur")


def test_variants_are_deterministic_and_do_what_they_say() -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((64, 80)) * 0.6 + 0.2).astype(np.float32)
    for name in VARIANT_NAMES:
        a, b = apply_variant(img, name), apply_variant(img, name)
        assert a.dtype == np.float32 and a.shape == img.shape and a.tobytes() == b.tobytes()
        assert a.min() >= 0 and a.max() <= 1 and not np.array_equal(a, img)
    np.testing.assert_allclose(apply_variant(img, "brighter"), np.clip(img + 0.1, 0, 1), atol=1e-6)
    np.testing.assert_allclose(apply_variant(img, "darker"), np.clip(img - 0.1, 0, 1), atol=1e-6)
    assert apply_variant(img, "contrast").std() == pytest.approx(1.5 * img.std(), rel=0.02)
    # a bright dot right of the centre: +45 (counter-clockwise) moves it up and right, -45 down and right
    dot = np.zeros((101, 101), np.float32)
    dot[48:53, 78:83] = 1.0
    for name, up in (("rot+45", True), ("rot-45", False)):
        out = apply_variant(dot, name)
        r, c = np.argwhere(out > 0.5).mean(axis=0)
        assert c > 60 and ((r < 40) if up else (r > 60)), (name, r, c)
    assert apply_variant(np.ones((50, 50), np.float32), "rot+45")[0, 0] == 0.0  # corners filled with black
    with pytest.raises(UsageError):
        apply_variant(img, "blur")
    rec = augment_record(["brighter", "rot-45"])
    assert rec["variants"]["brighter"]["params"] == {"offset": 0.1} and rec["variants"]["rot-45"]["params"]["degrees"] == -45.0


def test_worker_decodes_once_and_prepares_every_variant(small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = next((small_demo / "images").rglob("*.png"))
    enc = get_encoder("baseline")
    prep = enc.preparer()
    calls = []

    def counting(data, *a, **k):
        calls.append(1)
        return read_image(data, *a, **k)

    monkeypatch.setattr(ingest_mod, "read_image", counting)
    out, _sha, err = load_one(str(path), prep, 1024, ("original", *VARIANT_NAMES))
    assert err == "" and len(calls) == 1 and list(out) == ["original", *VARIANT_NAMES]
    canonical = preprocess(read_image(path.read_bytes()), max_side=1024)
    np.testing.assert_array_equal(out["original"], prep(canonical))
    np.testing.assert_array_equal(out["rot+45"], prep(apply_variant(canonical, "rot+45")))
    bad, _, err = load_one(str(small_demo / "nope.png"), prep, 1024, ("original", "brighter"))
    assert bad is None and err == "file not found"


def test_augmented_rows_point_at_their_source(augmented: Path, small_demo: Path) -> None:
    store = Store(augmented)
    meta = store.metadata()
    n_images = len((small_demo / "manifest.csv").read_text().splitlines()) - 1
    assert len(meta) == 6 * n_images
    assert meta["variant"].value_counts().to_dict() == {v: n_images for v in ("original", *VARIANT_NAMES)}
    originals = meta[meta["variant"] == "original"]
    assert (originals["source_row"] == -1).all()
    variants = meta[meta["variant"] != "original"]
    src = meta.loc[variants["source_row"].to_numpy()]
    assert (src["variant"] == "original").all()
    for col in ("image_id", "patient_id", "study_id", "sha256", "path", "Effusion", "Atelectasis"):
        a, b = variants[col].to_numpy(), src[col].to_numpy()
        assert ((a == b) | (pd_isna(a) & pd_isna(b))).all(), col
    vecs = store.select(model="baseline").vectors()
    assert not np.allclose(vecs[variants.index.to_numpy()], vecs[variants["source_row"].to_numpy()])
    run = store.runs[-1]
    assert run["variants"] == list(VARIANT_NAMES) and run["augment"]["variants"]["contrast"]["params"]["factor"] == 1.5
    assert "augment" not in str(store.provenance("baseline"))  # the encoder config stays the same
    assert verify(store).ok


def pd_isna(a: np.ndarray) -> np.ndarray:
    return np.array([isinstance(x, float) and np.isnan(x) for x in a])


def test_augmented_rows_never_leave_their_patient_group(augmented: Path) -> None:
    store = Store(augmented)
    sel = store.select(model="baseline")
    groups = sel.groups()
    meta = sel.metadata()
    pos = {r: i for i, r in enumerate(sel.rows)}
    variant = meta["variant"].to_numpy() != "original"
    source = meta["source_row"].to_numpy()
    for i in np.flatnonzero(variant):
        assert groups[i] == groups[pos[source[i]]]
    assert len(set(groups)) < len(groups) / 6  # several images per patient, six rows per image
    for train, test in GroupKFold(n_splits=4).split(np.zeros(len(sel)), groups=groups):
        assert not set(groups[train]) & set(groups[test])
        test_rows = set(sel.rows[test].tolist())
        for i in test:
            if variant[i]:
                assert source[i] in test_rows  # a variant is in its source's fold
        assert (~variant[test]).any()


def test_groups_without_patient_ids(tmp_path: Path, small_demo: Path) -> None:
    with open(small_demo / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "path", "Effusion"])
        for r in rows:
            w.writerow([r["image_id"], r["path"], r["Effusion"]])
    _ingest(tmp_path / "s", small_demo, manifest, augment="brighter,rot-45")
    sel = Store(tmp_path / "s").select()
    groups, meta = sel.groups(), sel.metadata()
    assert len(set(groups)) == 4
    for g in set(groups):
        assert meta.loc[sel.rows[groups == g], "image_id"].nunique() == 1


def test_idempotent_and_variants_added_later(tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    first = _ingest(store, small_demo)
    n = first.added
    reads = []
    real = ingest_mod.read_image
    monkeypatch.setattr(ingest_mod, "read_image", lambda data, *a, **k: reads.append(1) or real(data, *a, **k))
    later = _ingest(store, small_demo, augment="brighter,rot+45")
    assert later.added == 2 * n and later.skipped == n and len(reads) == n  # each file decoded once
    again = _ingest(store, small_demo, augment="brighter,rot+45")
    assert again.added == 0 and again.skipped == 3 * n
    s = Store(store)
    assert s.n_rows == 3 * n
    meta = s.metadata()
    keys = list(zip(meta["image_id"], meta["variant"]))
    assert len(keys) == len(set(keys))
    # a second model fills the variant rows too
    more = _ingest(store, small_demo, augment="brighter,rot+45", model="baseline-b")
    assert more.filled == 3 * n and more.added == 0


def test_unreadable_original_fails_once_with_its_variants(tmp_path: Path, small_demo: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path,patient_id\nx1,missing.png,p1\n")
    rep = _ingest(tmp_path / "s", small_demo, manifest, augment="all")
    assert rep.failed == 1 and rep.added == 0 and "5 variant rows" in rep.failures[0]["reason"]


def test_cli_augment(tmp_path: Path, small_demo: Path) -> None:
    runner = CliRunner()
    args = [str(tmp_path / "s"), "--manifest", str(small_demo / "manifest.csv"), "--root", str(small_demo), "--workers", "0"]
    res = runner.invoke(ingest_cmd, [*args, "--augment", "darker"])
    assert res.exit_code == 0, res.output
    assert "darker" in res.output
    assert set(Store(tmp_path / "s").metadata()["variant"]) == {"original", "darker"}
    res = runner.invoke(ingest_cmd, [*args, "--augment", "blur"])
    assert res.exit_code == 2 and "blur" in res.output and "rot+45" in res.output
    res = runner.invoke(ingest_cmd, [*args, "--augment", "--json"])  # no value: all five
    assert res.exit_code == 0, res.output
    assert set(Store(tmp_path / "s").metadata()["variant"]) == {"original", *VARIANT_NAMES}


def test_augmentation_summary(augmented: Path) -> None:
    from cxrstore.augment import augmentation_summary

    out = augmentation_summary(augmented, model="baseline")
    n = out["variants"]["original"]
    assert out["rows"] == 6 * n and out["variant_rows"] == 5 * n and out["variants_in_source_group"] is True
    assert out["orphans"] == 0 and 1 < out["groups"] < n


def test_variant_of_a_changed_file_is_refused(tmp_path: Path, small_demo: Path) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(small_demo, root)
    _ingest(tmp_path / "s", root)
    first = (root / "manifest.csv").read_text().splitlines()[1].split(",")
    other = next(p for p in (root / "images").rglob("*.png") if p.name != Path(first[1]).name)
    shutil.copy(other, root / first[1])  # the first image's file now holds another image
    rep = _ingest(tmp_path / "s", root, augment="brighter")
    assert rep.failed == 1 and "changed since its original" in rep.failures[0]["reason"]
    assert rep.failures[0]["image_id"] == first[0]


@pytest.mark.slow
def test_worker_processes_give_the_same_augmented_vectors(tmp_path: Path, small_demo: Path, augmented: Path) -> None:
    lines = (small_demo / "manifest.csv").read_text().splitlines()
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines[:5]) + "\n")
    _ingest(tmp_path / "s", small_demo, manifest, augment="rot-45,brighter", workers=2)
    got = Store(tmp_path / "s")
    ref = Store(augmented)
    ref_meta = ref.metadata()
    index = {(i, v): r for r, i, v in zip(ref_meta.index, ref_meta["image_id"], ref_meta["variant"])}
    meta = got.metadata()
    assert len(meta) == 12 and set(meta["variant"]) == {"original", "rot-45", "brighter"}
    want = np.array([index[(i, v)] for i, v in zip(meta["image_id"], meta["variant"])])
    ref_vectors = ref.select(model="baseline").vectors()
    np.testing.assert_array_equal(got.select(model="baseline").vectors(), ref_vectors[want])
