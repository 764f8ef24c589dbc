"""Kill -9 an ingest at random points, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
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


def _committed(commit_file: Path) -> int:
    """Committed rows according to the commit record (0 before the store exists)."""
    try:
        return int(json.loads(commit_file.read_text())["attributes"]["cxrstore_commit"]["n_rows"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0  # no store yet, or created but not yet marked


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo(data, n_patients=150, size=128, seed=11)
    n_images = len(pd.read_csv(data / "manifest.csv"))
    assert n_images >= 500

    ref = _run(_cmd(tmp_path / "ref", data))
    assert ref.returncode == 0, ref.stderr

    # Kill when the committed row count passes random targets, then a random few ms
    # later, so the kill lands at a random point of a batch (decoding, encoding, or
    # writing chunks before the commit record). Polling the commit record keeps the
    # test independent of how loaded the machine is.
    rng = np.random.default_rng(2026)
    store = tmp_path / "killed"
    commit_file = store / "store.zarr" / "zarr.json"
    mid_run = []
    for target in sorted(rng.uniform(0.1, 0.9, size=3) * n_images):
        proc = subprocess.Popen(_cmd(store, data), cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and _committed(commit_file) < target:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.2)))
        os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its decoding workers
        proc.wait()
        rows = _committed(commit_file)
        if rows < n_images:
            mid_run.append(rows)
    assert len(mid_run) >= 2, f"the ingest finished before most kills: {mid_run}"
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
