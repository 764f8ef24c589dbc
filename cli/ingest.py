"""``cxrstore ingest``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import EXIT_PARTIAL, echo_json, handle_errors, json_option, table
from cxrstore.ingest import IngestReport, ingest_dataset


def print_summary(report: IngestReport) -> None:
    click.echo(
        f"ingest {report.model} ({report.encoder}) into {report.store}: "
        f"{report.added} rows added, {report.filled} filled, {report.skipped} skipped as already present, "
        f"{report.failed} failed, in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)"
    )
    if report.failures:
        shown = report.failures[:20]
        click.echo(table([(f["image_id"] or "-", f["path"] or "-", f["reason"]) for f in shown], ["image_id", "path", "reason"]))
        if len(report.failures) > len(shown):
            click.echo(f"... and {len(report.failures) - len(shown)} more (all kept in the store: `cxrstore info STORE`)")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="CSV manifest (dataset csv).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Folder the manifest's paths are relative to (default: the manifest's folder).")
@click.option("--dataset", default="csv", show_default=True, help="Dataset adapter.")
@click.option("--encoder", default="baseline", show_default=True, help="Registered encoder name.")
@click.option("--model", help="Model name in the store (default: the encoder's name).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (default: CPU count; 0: in-process).")
@click.option("--commit-every", default=1024, show_default=True, type=click.IntRange(min=1), help="Rows per commit (a crash loses at most these).")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16), help="Uniform preprocessing: longest side after downscaling.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Storage dtype of a new model.")
@click.option("--id-column", default="image_id", show_default=True)
@click.option("--path-column", default="path", show_default=True)
@click.option("--labels", help="Comma-separated label columns (default: every non-canonical column).")
@click.option("--dataset-name", default="csv", show_default=True, help="Value of the dataset column when the manifest has none.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@json_option
@handle_errors
def ingest(store: Path, manifest: Path | None, root: Path | None, dataset: str, encoder: str, model: str | None,
           batch_size: int, workers: int | None, commit_every: int, max_side: int, dtype: str, id_column: str,
           path_column: str, labels: str | None, dataset_name: str, progress: bool | None, as_json: bool) -> None:
    """Embed the images of a dataset into STORE (created if absent).

    Re-running resumes: images already stored with this model are skipped.

    \b
    Example:
      cxrstore ingest mystore --manifest images.csv --root /data/cxr --encoder baseline
    """
    from cxrstore.io.preprocess import PreprocessConfig

    if dataset == "csv" and manifest is None:
        raise click.UsageError("--manifest is required with --dataset csv")
    options: dict[str, object] = {}
    if dataset == "csv":
        options = {
            "manifest": manifest,
            "root": root,
            "id_column": id_column,
            "path_column": path_column,
            "labels": [s.strip() for s in labels.split(",") if s.strip()] if labels else None,
            "dataset_name": dataset_name,
        }
    report = ingest_dataset(
        store,
        dataset=dataset,
        encoder=encoder,
        dataset_options=options,
        model=model,
        batch_size=batch_size,
        workers=workers,
        commit_every=commit_every,
        dtype=dtype,
        preprocess_config=PreprocessConfig(max_side=max_side),
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    if as_json:
        echo_json(report.to_json())
    else:
        print_summary(report)
    if report.failed:
        sys.exit(EXIT_PARTIAL)
