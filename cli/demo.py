"""``cxrstore demo``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cli.common import handle_errors
from cli.info import print_info
from cli.ingest import print_summary
from cxrstore.demo.run import STEPS, run_demo
from cxrstore.store.info import store_info


def _print_step(name: str, result: Any) -> None:
    click.echo("")
    if name == "ingest":
        print_summary(result)
        click.echo("")
        print_info(store_info(result.store))
    elif name == "classify":
        click.echo("== classify: the study's protocol (balanced sample, 5 folds grouped by patient, LightGBM) ==")
        click.echo(result.markdown)
    elif name == "search":
        from cli.search import format_results

        click.echo(f"== search: the 5 stored images most similar to {result['query']} (other patients only) ==")
        click.echo(format_results(result["neighbours"]))
        evaluation = result.get("evaluation") or {}
        if evaluation:
            click.echo(f"retrieval precision@k for {evaluation.get('label')}: {evaluation.get('precision_at_k')}")
    elif name == "cluster":
        from cli.cluster import print_report

        click.echo("== cluster: cosine kNN k=15, Leiden, UMAP ==")
        print_report(result)
    elif name == "export":
        from cli.export import print_report

        click.echo("== export: fused vectors ==")
        for report in result.values():
            print_report(report.to_json())


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default="cxrstore-demo")
@click.option("--patients", default=60, show_default=True, type=click.IntRange(min=2), help="Synthetic patients to generate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generator and of every analysis.")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (default: CPU count).")
@click.option("--steps", default=",".join(STEPS[1:]), show_default=True,
              help="Steps after ingest, comma-separated: " + ", ".join(STEPS[1:]) + " (empty: ingest only).")
@handle_errors
def demo(directory: Path, patients: int, seed: int, workers: int | None, steps: str) -> None:
    """Generate SYNTHETIC chest-like radiographs in DIRECTORY and run the whole job on them.

    Writes DIRECTORY/data (PNGs and manifest.csv), DIRECTORY/store (with its results:
    classification table, index, clusters and plots) and DIRECTORY/exports.

    \b
    Example:
      cxrstore demo /tmp/cxr-demo
    """
    chosen = tuple(s.strip() for s in steps.split(",") if s.strip())
    click.echo(f"demo data are SYNTHETIC (generated in {directory / 'data'}), not patient data")
    run_demo(directory, n_patients=patients, seed=seed, workers=workers, progress=sys.stderr.isatty(),
             steps=chosen, on_step=_print_step)
