"""Checks every real encoder's tests make: a manifest of real files, re-encoding against the
store, refusal of other weights, the common options, CLI ingest then `cxrstore info`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
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


def check_reencoding_matches_store(store_path: Path, model: str, encoder: Any, real_cxr: Path, names: list[str],
                                   *, rtol: float = 1e-7, atol: float) -> np.ndarray:
    """A second encoder instance, all at once and one image at a time, gives the vectors
    ingest stored for ``names`` (deterministic, independent of batching); returns them."""
    from cxrstore.io import load_canonical
    from cxrstore.store.store import Store

    store = Store(store_path)
    ids = store.column("image_id").tolist()
    stored = store.select(model=model).vectors()
    images = [load_canonical(real_cxr / n) for n in names]
    again = encoder.encode(images)
    single = np.concatenate([encoder.encode([im]) for im in images])
    for i, n in enumerate(names):
        np.testing.assert_allclose(again[i], stored[ids.index(Path(n).stem)], rtol=rtol, atol=atol)
    np.testing.assert_allclose(single, again, rtol=rtol, atol=atol)
    return again


def check_other_weights_refused(store_path: Path, real_cxr: Path, name: str, encoder: Any) -> None:
    """Appending one more image with ``encoder`` (other weights) to the model is refused."""
    import pytest

    from cxrstore.datasets.csv_manifest import CsvManifest
    from cxrstore.errors import ProvenanceError
    from cxrstore.ingest import ingest

    manifest = write_manifest(store_path.parent / "extra.csv", [name])
    with pytest.raises(ProvenanceError, match="weights_sha256"):
        ingest(store_path, CsvManifest(manifest, root=real_cxr).records(), encoder=encoder, workers=0)


def check_torch_encoder_options(name: str, weights: Path, allowed: str) -> None:
    """What every torch encoder refuses alike: unknown options, half precision on the CPU,
    a bad batch, an unknown device, and cuda where torch sees no GPU."""
    import pytest
    import torch

    from cxrstore.encoders.base import get_encoder
    from cxrstore.errors import UsageError

    with pytest.raises(UsageError, match=f"allowed: {allowed}"):
        get_encoder(name, weights=weights, colour=True)
    with pytest.raises(UsageError, match="needs --device cuda"):
        get_encoder(name, weights=weights, half=True)
    with pytest.raises(UsageError, match="batch must be a positive integer"):
        get_encoder(name, weights=weights, batch=0)
    with pytest.raises(UsageError, match="unknown device"):
        get_encoder(name, weights=weights, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="use --device cpu"):
            get_encoder(name, weights=weights, device="cuda")
