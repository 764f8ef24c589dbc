"""The VAE example trains on the demo store's fused vectors and its loss decreases."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="PyTorch is optional (extras mii / dev)")

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.ingest import ingest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_vae.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_vae_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_store(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vae") / "store"
    ingest(path, CsvManifest(small_demo / "manifest.csv", root=small_demo, dataset_name="demo").records(),
           encoder=get_encoder("baseline"), workers=0)
    return path


@pytest.mark.slow
def test_vae_loss_decreases_and_is_reproducible(demo_store: Path) -> None:
    example = _load_example()
    losses = example.main(demo_store, epochs=6, seed=0)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert example.main(demo_store, epochs=2, seed=0) == losses[:2]  # same seed, same losses


def test_vae_example_command_line(demo_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script's entry point (`python examples/train_vae.py STORE --epochs 2`), run in-process."""
    example = _load_example()
    assert example._cli([str(demo_store), "--epochs", "2", "--models", "baseline"]) == 0
    out = capsys.readouterr().out
    assert out.count("epoch") == 2 and "loss" in out
