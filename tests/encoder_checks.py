"""Checks every real encoder's tests make: a manifest of real files; CLI ingest, then `cxrstore info`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cli.main import cli

#: Two real files of ../shared/data/real-cxr: an 8-bit PNG and a MONOCHROME1 DICOM.
REAL_FILES = ("00000001_000.png", "Fake_MONOHR1.dcm")


def write_manifest(path: Path, files: list[str] | tuple[str, ...]) -> Path:
    """A CSV manifest (``image_id`` = the file's stem, ``path``) of ``files``; returns ``path``."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "path"])
        for name in files:
            writer.writerow([Path(name).stem, name])
    return path


def ingest_then_info(
    real_cxr: Path, tmp_path: Path, encoder: str, weights: Path, *extra: str, files: tuple[str, ...] = REAL_FILES,
    workers: int = 0,
) -> tuple[dict[str, Any], str]:
    """``cxrstore ingest STORE --manifest M --encoder E --weights W ... --json`` on ``files``,
    checked (exit 0, every file added), then ``cxrstore info`` on the store.

    Returns
    -------
    entry : dict
        ``info --json``'s entry of the model (``dim``, ``rows_present``, ``provenance``...).
    human : str
        The human-readable ``info`` output, which must name the model and the first 12
        digits of its weights' sha256 (checked here).
    """
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path\n" + "".join(f"r{i},{name}\n" for i, name in enumerate(files)))
    runner = CliRunner()
    res = runner.invoke(cli, ["ingest", str(tmp_path / "s"), "--manifest", str(manifest), "--root", str(real_cxr),
                              "--encoder", encoder, "--weights", str(weights), "--device", "cpu",
                              "--encoder-batch", "2", "--workers", str(workers), "--json", *extra])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["added"] == len(files)
    res = runner.invoke(cli, ["info", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    entry = json.loads(res.output)["models"][encoder]
    assert entry["rows_present"] == len(files)
    human = runner.invoke(cli, ["info", str(tmp_path / "s")]).output
    assert encoder in human and entry["provenance"]["encoder"]["weights_sha256"][:12] in human
    return entry, human
