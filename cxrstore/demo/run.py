"""The whole job on the bundled (synthetic) demo data: ``cxrstore demo``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.demo.synth import generate_demo
from cxrstore.encoders.base import get_encoder
from cxrstore.ingest import IngestReport, ingest

logger = logging.getLogger(__name__)


def run_demo(
    directory: str | Path,
    *,
    n_patients: int = 60,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic demo data set in ``directory/data`` and ingest it.

    The images are SYNTHETIC chest-like radiographs with planted findings
    (see :mod:`cxrstore.demo.synth`), not patient data.

    Returns
    -------
    dict
        ``{"manifest": Path, "store": Path, "ingest": IngestReport}``.
    """
    directory = Path(directory)
    data = directory / "data"
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        logger.info("generating demo data in %s", data)
        manifest = generate_demo(data, n_patients=n_patients, seed=seed)
    store = directory / "store"
    adapter = CsvManifest(manifest, root=data, dataset_name="demo")
    report: IngestReport = ingest(
        store, adapter.records(), encoder=get_encoder("baseline"), workers=workers, policies=adapter.policies(), progress=progress
    )
    return {"manifest": manifest, "store": store, "ingest": report}
