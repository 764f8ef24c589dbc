"""The whole job on the bundled (synthetic) demo data: ``cxrstore demo``.

Generate the data, ingest it with the ``baseline`` encoder, benchmark it with the study's
classification protocol, build the FAISS index and look up similar images, cluster it
(kNN k=15, Leiden, UMAP, plots), and export fused vectors (AnnData and NumPy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.demo.synth import generate_demo
from cxrstore.encoders.base import get_encoder
from cxrstore.ingest import IngestReport, ingest

logger = logging.getLogger(__name__)

STEPS = ("ingest", "classify", "search", "cluster", "export")


def run_demo(
    directory: str | Path,
    *,
    n_patients: int = 60,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    steps: tuple[str, ...] = STEPS,
    on_step: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Generate the synthetic demo data set in ``directory/data`` and run the job on it.

    The images are SYNTHETIC chest-like radiographs with planted findings
    (see :mod:`cxrstore.demo.synth`), not patient data.

    Parameters
    ----------
    directory : str or Path
        Receives ``data/`` (PNGs, manifest.csv), ``store/`` and ``exports/``.
    steps : tuple of str
        Which steps to run after ``ingest`` (always run), in this order: classify,
        search, cluster, export.
    on_step : callable, optional
        Called as ``on_step(name, result)`` after each step (the CLI prints there).

    Returns
    -------
    dict
        ``manifest``, ``store`` and each step's result under its name: ``ingest``
        (IngestReport), ``classify`` (ClassifyResult), ``search`` (dict with the
        neighbours DataFrame), ``cluster`` (ClusterReport), ``export`` (dict of
        ExportReport by format).
    """
    from cxrstore.errors import UsageError

    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise UsageError(f"unknown demo step(s) {unknown}; steps are {', '.join(STEPS)}")
    directory = Path(directory)
    data = directory / "data"
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        logger.info("generating demo data in %s", data)
        manifest = generate_demo(data, n_patients=n_patients, seed=seed)
    store = directory / "store"
    out: dict[str, Any] = {"manifest": manifest, "store": store}

    def done(name: str, result: Any) -> None:
        out[name] = result
        if on_step is not None:
            on_step(name, result)

    adapter = CsvManifest(manifest, root=data, dataset_name="demo")
    report: IngestReport = ingest(
        store, adapter.records(), encoder=get_encoder("baseline"), workers=workers, policies=adapter.policies(), progress=progress
    )
    done("ingest", report)
    if "classify" in steps:
        from cxrstore.analysis.classify import classify_demo

        done("classify", classify_demo(store, seed=seed))
    if "search" in steps:
        from cxrstore.analysis.retrieve import demo_search

        done("search", demo_search(store, model="baseline", k=5))
    if "cluster" in steps:
        from cxrstore.analysis.cluster import cluster

        done("cluster", cluster(store, model="baseline", k=15, seed=seed))
    if "export" in steps:
        from cxrstore.export import export_demo

        done("export", export_demo(store, directory / "exports"))
    return out
