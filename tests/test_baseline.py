"""Tests of the training-free ``baseline`` encoder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstore.demo.synth import LABELS, generate_demo
from cxrstore.encoders.base import Encoder, EncoderConfig, available_encoders, get_encoder
from cxrstore.errors import UsageError


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return get_encoder("baseline")


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for shape in [(256, 256), (512, 512), (300, 417), (1024, 768)]]


def test_registered(encoder: Encoder) -> None:
    assert "baseline" in available_encoders()
    assert isinstance(encoder, Encoder)
    assert encoder.name == "baseline"
    assert encoder.dim == 512
    assert encoder.native_shape == (512,)
    cfg = encoder.config
    assert cfg.encoder == "baseline" and cfg.version == "1" and cfg.weights_sha256 is None
    assert EncoderConfig.from_json(cfg.to_json()) == cfg
    assert get_encoder("baseline", work_size=128).config.diff(cfg) == ["params.work_size"]


def test_output_shape_dtype_finite_deterministic(encoder: Encoder) -> None:
    images = _images()
    out = encoder.encode(images)  # type: ignore[attr-defined]
    assert out.shape == (len(images), encoder.dim)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    again = encoder.encode(_images())  # type: ignore[attr-defined]
    assert out.tobytes() == again.tobytes()
    prep = encoder.preparer()
    assert np.array_equal(encoder.forward([prep(x) for x in images]), out)
    # different images give different vectors
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (40, 300), (255, 257), (1024, 1024), (600, 200)])
def test_any_shape(encoder: Encoder, shape: tuple[int, int]) -> None:
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    v = encoder.preparer()(x)
    assert v.shape == (encoder.dim,) and v.dtype == np.float32 and np.isfinite(v).all()


def test_constant_and_other_dtypes(encoder: Encoder) -> None:
    out = encoder.encode([np.zeros((64, 64), np.float32), np.ones((64, 64), np.float64)])  # type: ignore[attr-defined]
    assert np.isfinite(out).all()
    assert encoder.forward([]).shape == (0, encoder.dim)


def test_preparer_pickles(encoder: Encoder) -> None:
    prep = encoder.preparer()
    clone = pickle.loads(pickle.dumps(prep))
    x = _images()[2]
    assert np.array_equal(prep(x), clone(x))


def test_bad_inputs(encoder: Encoder) -> None:
    prep = encoder.preparer()
    with pytest.raises(UsageError):
        prep(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UsageError):
        prep(np.zeros((0, 8), np.float32))
    bad = np.zeros((64, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(UsageError):
        prep(bad)
    with pytest.raises(UsageError):
        encoder.forward([np.zeros(3, np.float32)])


@pytest.mark.parametrize(
    "options",
    [{"work_size": 100}, {"work_size": 0}, {"work_size": "256"}, {"hog_bins": 1}, {"hist_bins": True}, {"colour": 1}],
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(UsageError, match=next(iter(options))):
        get_encoder("baseline", **options)


def test_other_options_change_dim() -> None:
    enc = get_encoder("baseline", work_size=64, hog_bins=9, hist_bins=8)
    out = enc.encode([np.random.default_rng(0).random((100, 80), dtype=np.float32)])  # type: ignore[attr-defined]
    assert out.shape == (1, enc.dim) and enc.dim != 512


@pytest.mark.slow
def test_real_signal_on_demo(tmp_path: Path, encoder: Encoder) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    manifest = generate_demo(tmp_path, n_patients=150, size=256, seed=0)
    df = pd.read_csv(manifest)
    images = []
    for p in df["path"]:
        with Image.open(tmp_path / p) as im:
            images.append(np.asarray(im, dtype=np.float32) / np.float32(255.0))
    x = encoder.encode(images)  # type: ignore[attr-defined]
    groups = df["patient_id"].to_numpy()
    aucs, shuffled = {}, {}
    for label in LABELS:
        known = df[label].notna().to_numpy()
        y = df[label].to_numpy()[known].astype(int)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        cv = GroupKFold(n_splits=5)
        pred = cross_val_predict(clf, x[known], y, groups=groups[known], cv=cv, method="predict_proba")[:, 1]
        aucs[label] = roc_auc_score(y, pred)
        y_perm = np.random.default_rng(1).permutation(y)
        pred = cross_val_predict(clf, x[known], y_perm, groups=groups[known], cv=cv, method="predict_proba")[:, 1]
        shuffled[label] = roc_auc_score(y_perm, pred)
    assert all(a > 0.65 for a in aucs.values()), aucs
    assert all(a < 0.62 for a in shuffled.values()), shuffled


def test_encoder_rebuilt_from_its_recorded_config() -> None:
    from cxrstore.encoders.base import encoder_from_config

    original = get_encoder("baseline", work_size=128, hog_bins=6)
    rebuilt = encoder_from_config(original.config.to_json())
    assert rebuilt.config == original.config and rebuilt.dim == original.dim
    tampered = original.config.to_json()
    tampered["version"] = "0"
    with pytest.raises(UsageError, match="version differ"):
        encoder_from_config(EncoderConfig.from_json(tampered))
    with pytest.raises(UsageError, match="unknown encoder 'nope'"):
        encoder_from_config({"encoder": "nope", "version": "1", "params": {}})
