"""``cxrstore demo``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import handle_errors
from cli.info import print_info
from cli.ingest import print_summary
from cxrstore.demo.run import run_demo
from cxrstore.store.info import store_info


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default="cxrstore-demo")
@click.option("--patients", default=60, show_default=True, type=click.IntRange(min=2), help="Synthetic patients to generate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generator.")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (default: CPU count).")
@handle_errors
def demo(directory: Path, patients: int, seed: int, workers: int | None) -> None:
    """Generate SYNTHETIC chest-like radiographs in DIRECTORY and run the job on them.

    Writes DIRECTORY/data (PNGs and manifest.csv) and DIRECTORY/store.

    \b
    Example:
      cxrstore demo /tmp/cxr-demo
    """
    result = run_demo(directory, n_patients=patients, seed=seed, workers=workers, progress=sys.stderr.isatty())
    click.echo(f"demo data (synthetic): {result['manifest']}")
    print_summary(result["ingest"])
    click.echo("")
    print_info(store_info(result["store"]))
