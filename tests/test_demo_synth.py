"""Tests of the synthetic demo data set generator."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstore.demo.synth import (
    LABELS,
    MANIFEST_COLUMNS,
    Findings,
    ImageParams,
    generate_demo,
    render_image,
    sample_anatomy,
)
from cxrstore.errors import UsageError


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("demo")
    manifest = generate_demo(root, n_patients=60, size=96, seed=7)
    return root, pd.read_csv(manifest, dtype={"path": str})


def test_same_seed_identical_different_seed_differs(tmp_path: Path) -> None:
    a = generate_demo(tmp_path / "a", n_patients=4, size=64, seed=1)
    b = generate_demo(tmp_path / "b", n_patients=4, size=64, seed=1)
    c = generate_demo(tmp_path / "c", n_patients=4, size=64, seed=2)
    assert a.name == "manifest.csv"
    assert a.read_bytes() == b.read_bytes()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()
    assert not list((tmp_path / "a").glob(".manifest*"))


def test_manifest_columns_and_images(demo: tuple[Path, pd.DataFrame]) -> None:
    root, df = demo
    header = (root / "manifest.csv").read_text().splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS)
    assert header == "image_id,path,patient_id,study_id,view,sex,age,Atelectasis,Edema,Effusion,Opacity"
    assert df["image_id"].is_unique
    assert set(df["view"]) <= {"PA", "AP"} and (df["view"] == "PA").mean() > 0.6
    assert set(df["sex"]) == {"F", "M"}
    assert df["age"].between(20, 90).all()
    assert df["image_id"].iloc[0] == "demo-p0001-s01-i1"
    for row in df.head(25).itertuples():
        path = root / row.path
        assert path.is_file()
        assert path.name == f"{row.image_id}.png"
        assert path.parent.parent.parent == root / "images"
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.mode == "L"
            assert im.size == (96, 96)


def test_patients_studies_and_labels(demo: tuple[Path, pd.DataFrame]) -> None:
    _, df = demo
    assert df["patient_id"].nunique() == 60
    studies = df.groupby("patient_id")["study_id"].nunique()
    assert (studies >= 1).all()
    assert studies.mean() > 1.8
    # a patient's constant attributes do not change between images
    assert (df.groupby("patient_id")[["sex", "age"]].nunique() == 1).all().all()
    for label in LABELS:
        values = df[label].dropna()
        assert set(values.unique()) <= {0, 1}
        assert 0.15 < values.mean() < 0.6, label
        # labels are per study
        assert (df.groupby("study_id")[label].nunique() <= 1).all()
    assert df[list(LABELS)].isna().to_numpy().sum() > 0


def test_same_patient_images_are_more_similar(demo: tuple[Path, pd.DataFrame]) -> None:
    root, df = demo
    small = []
    for p in df["path"]:
        with Image.open(root / p) as im:
            a = np.asarray(im.resize((24, 24), Image.Resampling.BOX), dtype=np.float64).ravel()
        a = (a - a.mean()) / (a.std() + 1e-9)
        small.append(a)
    x = np.stack(small)
    corr = x @ x.T / x.shape[1]
    pid = df["patient_id"].to_numpy()
    same = pid[:, None] == pid[None, :]
    off = ~np.eye(len(pid), dtype=bool)
    within = corr[same & off].mean()
    between = corr[~same].mean()
    assert within > between + 0.02


def test_render_image_single() -> None:
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(rng, sex="F", age=50)
    params = ImageParams(anatomy=anatomy, findings=Findings(effusion=0.8, opacity=0.5, opacity_blobs=((1, 0.0, 0.0, 0.15),)), size=128)
    a = render_image(params, np.random.default_rng(1))
    b = render_image(params, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == (128, 128)
    assert np.array_equal(a, b)
    assert 20 < a.mean() < 235 and a.std() > 10
    clean = render_image(ImageParams(anatomy=anatomy, size=128), np.random.default_rng(1))
    assert clean.mean() < a.mean()  # findings add density


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_patients": 0},
        {"size": 8},
        {"seed": -1},
        {"studies_per_patient": (3, 1)},
        {"images_per_study": (0, 2)},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        generate_demo(tmp_path, **kwargs)  # type: ignore[arg-type]
