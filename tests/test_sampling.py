"""Balanced, seeded, patient-aware sampling for classification."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cxrstore.errors import UsageError
from cxrstore.store.sampling import balanced_sample
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "fake", "version": "1", "params": {}, "weights_sha256": None},
        "native_shape": [4], "preprocess": {"max_side": 1024}, "cxrstore_version": "test", "created_at": "now"}


def make_store(path: Path, *, n_pos: int = 30, n_neg: int = 50, n_missing: int = 5, variants: int = 2) -> Path:
    """Originals (3 images a patient, a patient's images share the label) and variants."""
    with open_writer(path) as w:
        w.ensure_model("m", PROV, dim=4)
        rows, vecs = [], []
        values = [1.0] * n_pos + [0.0] * n_neg + [None] * n_missing
        for i, v in enumerate(values):
            r = w.add_row(RowData(image_id=f"img{i:03d}", dataset="toy", patient_id=f"pt{i // 3}" if i % 7 else "",
                                  sex="F" if i % 2 else "M", age=float(30 + i % 60), labels={"Effusion": v}))
            rows.append(r)
            vecs.append(np.full(4, i, dtype=np.float32))
            for k in range(variants):
                a = w.add_row(RowData(image_id=f"img{i:03d}", variant=f"aug{k}", source_row=r, dataset="toy",
                                      patient_id=f"pt{i // 3}" if i % 7 else "", labels={"Effusion": v}))
                rows.append(a)
                vecs.append(np.full(4, i + 0.5, dtype=np.float32))
        w.add_vectors("m", rows, np.stack(vecs))
        w.commit()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(make_store(tmp_path_factory.mktemp("sampling") / "s"))


def test_balanced_seeded_originals_only(store: Store) -> None:
    sel = store.select(model="m")
    s = balanced_sample(sel, "Effusion", n_per_class=20, seed=1)
    assert s.n_positive == 20 and s.n_negative == 20 and not s.short and s.notes == ()
    assert (np.diff(s.rows) > 0).all()
    assert (store.column("variant", s.rows) == "original").all()
    lab = store.label_matrix(s.rows)[:, list(store.labels).index("Effusion")]
    np.testing.assert_array_equal(lab, s.y.astype(float))
    np.testing.assert_array_equal(s.groups, sel.subset(s.rows).groups())
    again = balanced_sample(store.select(model="m"), "Effusion", n_per_class=20, seed=1)
    np.testing.assert_array_equal(again.rows, s.rows)
    other = balanced_sample(sel, "Effusion", n_per_class=20, seed=2)
    assert not np.array_equal(other.rows, s.rows)
    assert s.aug_rows.size == 0


def test_shortfall_uses_everything_and_says_so(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cxrstore.store.sampling"):
        s = balanced_sample(store.select(model="m"), "Effusion", n_per_class=40, seed=0)
    assert s.short and s.n_positive == 30 and s.n_negative == 40
    assert any("only 30 images with the finding" in n for n in s.notes)
    assert "only 30 images with the finding" in caplog.text


def test_missing_labels_never_sampled(store: Store) -> None:
    s = balanced_sample(store.select(model="m"), "Effusion", n_per_class=1000, seed=0)
    lab = store.label_matrix(s.rows)[:, 0]
    assert np.isfinite(lab).all() and len(s) == 80


def test_augmented_variants_follow_their_source(store: Store) -> None:
    s = balanced_sample(store.select(model="m"), "Effusion", n_per_class=10, seed=3, augment="train")
    assert s.aug_rows.size == 2 * len(s)
    src = store.column("source_row", s.aug_rows)
    np.testing.assert_array_equal(src, s.rows[s.aug_source])
    assert (store.column("variant", s.aug_rows) != "original").all()
    np.testing.assert_array_equal(s.aug_y, s.y[s.aug_source])
    np.testing.assert_array_equal(s.aug_groups, s.groups[s.aug_source])
    plain = balanced_sample(store.select(model="m"), "Effusion", n_per_class=10, seed=3)
    np.testing.assert_array_equal(plain.rows, s.rows)  # attaching variants never changes the sample


def test_bad_options(store: Store) -> None:
    sel = store.select(model="m")
    with pytest.raises(UsageError, match="unknown label 'Nope'.*Effusion"):
        balanced_sample(sel, "Nope")
    with pytest.raises(UsageError, match="augment must be one of none, train"):
        balanced_sample(sel, "Effusion", augment="test")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="n_per_class"):
        balanced_sample(sel, "Effusion", n_per_class=0)
    with pytest.raises(UsageError, match="no original image with 'Effusion'"):
        balanced_sample(store.select(model="m", where="Effusion == 0"), "Effusion")
