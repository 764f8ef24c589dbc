"""Kill -9 an ingest at random points, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrstore.demo.synth import generate_demo
from cxrstore.store.store import Store
from cxrstore.store.verify import verify

PROJECT = Path(__file__).resolve().parents[1]


def _cmd(store: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "ingest", str(store), "--manifest", str(data / "manifest.csv"),
            "--root", str(data), "--commit-every", "24", "--batch-size", "8", "--workers", "2", "--no-progress", "--json"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo(data, n_patients=150, size=128, seed=11)
    n_images = len(pd.read_csv(data / "manifest.csv"))
    assert n_images >= 500

    started = time.monotonic()
    ref = _run(_cmd(tmp_path / "ref", data))
    full_time = time.monotonic() - started
    assert ref.returncode == 0, ref.stderr

    rng = np.random.default_rng(2026)
    store = tmp_path / "killed"
    progress = []
    for _ in range(4):
        proc = subprocess.Popen(_cmd(store, data), cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(float(rng.uniform(0.3, 0.9)) * full_time)
        os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its decoding workers, mid-write
        proc.wait()
        if (store / "store.zarr" / "zarr.json").exists():
            progress.append(Store(store).n_rows)
    # Some kill must have landed mid-run, after a commit and before the end.
    assert any(0 < p < n_images for p in progress), progress
    final = _run(_cmd(store, data))
    assert final.returncode == 0, final.stderr

    a, b = Store(tmp_path / "ref"), Store(store)
    assert a.n_rows == b.n_rows == n_images
    meta_a, meta_b = a.metadata(), b.metadata()
    assert meta_a.drop(columns="generation").equals(meta_b.drop(columns="generation"))
    assert meta_b["image_id"].is_unique
    np.testing.assert_array_equal(a.select(model="baseline").vectors(), b.select(model="baseline").vectors())
    report = verify(b)
    assert report.ok, report.problems
    assert not list((store / "store.zarr").rglob("*.partial"))
