"""Shared fixtures: the shared real-data folder and small synthetic demo sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrstore.demo.synth import generate_demo

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data"
REAL_CXR = SHARED / "real-cxr"
METADATA = SHARED / "metadata"


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Weights digests are cached in a folder of the test session, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cxrstore-cache")
    mp.setenv("CXRSTORE_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def real_cxr() -> Path:
    """../shared/data/real-cxr: real chest X-ray files (absent on a user's machine)."""
    if not REAL_CXR.is_dir():
        pytest.skip(f"{REAL_CXR} is absent (it ships beside the repository for development, not with cxrstore)")
    return REAL_CXR


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic demo data set (256 px); returns its folder (manifest.csv inside)."""
    root = tmp_path_factory.mktemp("demo-small")
    generate_demo(root, n_patients=12, size=256, seed=3)
    return root
