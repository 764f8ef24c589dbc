"""``cxrstore import``: precomputed embeddings into a store."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import finish_run, handle_errors, json_option, table
from cxrstore.importers import FORMATS, ImportReport, import_vectors


def _shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(s) for s in value.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give sizes separated by commas, e.g. 32,768") from None
    if not shape:
        raise click.BadParameter(f"{value!r}: give sizes separated by commas, e.g. 32,768")
    return shape


def print_summary(report: ImportReport) -> None:
    click.echo(
        f"import {report.source} ({report.format}) into {report.store} as {report.model} "
        f"[dim {report.dim}, native shape {'x'.join(map(str, report.native_shape))}]: "
        f"{report.added} rows added, {report.filled} filled, {report.skipped} skipped as already present, "
        f"{report.failed} failed ({report.unmatched} without a row), in {report.seconds:.1f} s"
    )
    if report.unmatched:
        click.echo(
            f"ids without a row in the store or manifest: {report.unmatched}, e.g. {', '.join(report.unmatched_examples[:5])}"
            + (f" (known ids look like {report.known_id_example!r}; see --strip-suffix / --add-suffix)" if report.known_id_example else "")
        )
    if report.manifest_without_vector:
        click.echo(
            f"manifest rows without a vector in the source: {report.manifest_without_vector}, "
            f"e.g. {', '.join(report.manifest_without_vector_examples[:5])}"
        )
    if report.failures:
        shown = report.failures[:20]
        click.echo(table([(f["image_id"] or "-", f["path"] or "-", f["reason"]) for f in shown], ["image_id", "source", "reason"]))
        if report.failed > len(shown):
            click.echo(f"... and {report.failed - len(shown)} more (all kept in the store: `cxrstore info STORE`)")


@click.command("import")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--vectors", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="Vectors file, or a folder of per-image .tfrecord files.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Source format (default: from the suffix).")
@click.option("--model", required=True, help="Model name in the store, e.g. elixr-v2-contrastive.")
@click.option("--dim", type=click.IntRange(min=1), help="Values per vector (default: the first vector's, if a known size).")
@click.option("--native-shape", help="Matrix each vector flattens, e.g. 32,768 (default: known sizes, or the arrays' shape).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="CSV manifest: rows to create for new ids.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Folder the manifest's paths are relative to.")
@click.option("--ids", type=click.Path(dir_okay=False, path_type=Path), help="npy: text file with one id per line, in row order.")
@click.option("--ids-key", help="h5/npz: dataset or array of ids (h5 default: ids).")
@click.option("--vectors-key", help="h5/npz: dataset or array of vectors (h5 default: embeddings).")
@click.option("--id-column", default="image_id", show_default=True, help="parquet: id column.")
@click.option("--vector-column", help="parquet: list column of vectors (default: the only list column, else one column per dimension).")
@click.option("--feature", default="embedding", show_default=True, help="tfrecord: float-list feature of the tf.Example.")
@click.option("--source-model", default="", help="Free text naming the model that made the vectors (recorded).")
@click.option("--manifest-id-column", default="image_id", show_default=True)
@click.option("--manifest-path-column", default="path", show_default=True)
@click.option("--dataset-name", default="csv", show_default=True, help="Value of the dataset column for new rows.")
@click.option("--strip-suffix", default="", help="Remove this suffix from source ids before matching.")
@click.option("--add-suffix", default="", help="Append this suffix to source ids before matching (e.g. .png for NIH).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@json_option
@handle_errors
def import_cmd(store: Path, source: Path, fmt: str | None, model: str, dim: int | None, native_shape: str | None,
               manifest: Path | None, root: Path | None, ids: Path | None, ids_key: str | None, vectors_key: str | None,
               id_column: str, vector_column: str | None, feature: str, source_model: str, manifest_id_column: str,
               manifest_path_column: str, dataset_name: str, strip_suffix: str, add_suffix: str, dtype: str,
               as_json: bool) -> None:
    """Import precomputed embeddings keyed by image id into STORE.

    Ids are matched to store rows (filled) or manifest rows (created with their
    metadata); ids matching neither, vectors of the wrong size and vectors holding NaN
    or infinity become failure records. Re-running skips ids already imported.

    \b
    Examples:
      cxrstore import st --vectors nih_elixr_v2.npz --model elixr-v2-contrastive --manifest nih.csv
      cxrstore import st --vectors mimic-embeddings/ --format tfrecord --model elixr-v1 --manifest m.csv
      cxrstore import st --vectors emb.npy --ids ids.txt --model mii --dim 1024
    """
    report = import_vectors(
        store, source, model=model, format=fmt, dim=dim, native_shape=_shape(native_shape), manifest=manifest,  # type: ignore[arg-type]
        root=root, ids=ids, ids_key=ids_key, vectors_key=vectors_key, id_column=id_column, vector_column=vector_column,
        feature=feature, source_model=source_model, manifest_id_column=manifest_id_column,
        manifest_path_column=manifest_path_column, dataset_name=dataset_name, strip_suffix=strip_suffix,
        add_suffix=add_suffix, dtype=dtype,
    )
    finish_run(report, as_json=as_json, summary=print_summary)
