"""`cxrstore demo` runs the whole job: ingest, classify, search, cluster, export."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from cxrstore.store.results import list_results
from cxrstore.store.store import Store


@pytest.mark.slow
def test_demo_runs_every_step(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["demo", str(tmp_path / "d"), "--patients", "16", "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "SYNTHETIC" in out and "0 failed" in out
    for heading in ("== classify", "== search", "== cluster", "== export"):
        assert heading in out
    store = Store(tmp_path / "d" / "store")
    kinds = {kind for kind, _, _ in list_results(store)}
    assert {"classify", "knn", "cluster", "retrieval"} <= kinds
    plots = list((tmp_path / "d" / "store" / "results" / "cluster").rglob("*.png"))
    assert plots
    for plot in plots:
        with Image.open(plot) as im:
            im.load()  # decodes: a truncated PNG fails here
            assert im.size[0] > 100
    adata = anndata.read_h5ad(tmp_path / "d" / "exports" / "fused.h5ad")
    assert adata.n_obs == store.n_rows and "X_baseline" in adata.obsm and "X_umap" in adata.obsm
    np.testing.assert_allclose(np.linalg.norm(adata.obsm["X_baseline"], axis=1), 1.0, atol=1e-5)
