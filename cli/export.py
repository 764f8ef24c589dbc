"""``cxrstore export``."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import echo_json, handle_errors, human_bytes, json_option, table
from cxrstore.errors import UsageError
from cxrstore.export.clinical import JOIN_ON_CHOICES, UNMATCHED_CHOICES
from cxrstore.export.fusion import MISSING_CHOICES
from cxrstore.export.writers import FORMATS
from cxrstore.export.writers import export as export_api


def _pca_spec(value: str) -> int | str | None:
    if value.lower() == "none":
        return None
    try:
        n = int(value)
    except ValueError:
        return value
    if n < 1:
        raise UsageError(f"--pca must be a positive number of components or a stored PCA name, got {value!r}")
    return n


def _pca_option(value: str | None) -> int | str | None | dict[str, int | str | None]:
    """``32`` (every model), ``baseline-pca32`` (a stored PCA), or ``elixr=64,mii=none``."""
    if value is None:
        return None
    if "=" not in value:
        return _pca_spec(value)
    out: dict[str, int | str | None] = {}
    for part in value.split(","):
        model, sep, spec = part.partition("=")
        if not sep or not model.strip() or not spec.strip():
            raise UsageError(f"--pca {value!r}: write N, a stored PCA name, or MODEL=N|NAME|none pairs separated by commas")
        out[model.strip()] = _pca_spec(spec.strip())
    return out


def _view_option(value: str) -> str | dict[str, str]:
    if "=" not in value:
        return value
    out: dict[str, str] = {}
    for part in value.split(","):
        model, sep, view = part.partition("=")
        if not sep or not model.strip() or not view.strip():
            raise UsageError(f"--view {value!r}: write a view name, or MODEL=VIEW pairs separated by commas")
        out[model.strip()] = view.strip()
    return out


def print_report(data: dict) -> None:
    click.echo(f"exported  {data['rows']} rows x {data['dim']} to {data['out']} ({data['format']}, {human_bytes(data['bytes_written'])}, "
               f"{data['seconds']:.2f} s, {data['mb_per_s']} MB/s of vectors)")
    rows = []
    for b in data["blocks"]:
        pca = b["pca"]
        rows.append((b["model"], b["view"], "yes" if b["normalize"] else "no", f"{pca['name']} ({pca['fitted_rows']} rows)" if pca else "-",
                     b["dim_in"], b["dim"], f"{b['start']}:{b['stop']}"))
    click.echo(table(rows, ["model", "view", "L2", "pca", "dim in", "dim", "columns"]))
    miss = data["missing"]
    click.echo(f"selected  {miss['selected']} rows; dropped {miss['dropped']} missing a model"
               + ("".join(f"; {m}: {v['count']}" for m, v in miss["missing"].items() if v["count"]) if miss["dropped"] else ""))
    clin = data.get("clinical")
    if clin:
        click.echo(f"clinical  {clin['matched']} of {clin['rows']} rows matched on {clin['join_on']}"
                   + (f" (nearest {clin['date_column']} within {clin['tolerance']})" if clin["date_column"] else "")
                   + f"; {clin['unmatched']} unmatched ({clin['unmatched_policy']})"
                   + (f", e.g. {', '.join(clin['unmatched_image_ids'][:5])}" if clin["unmatched"] else "")
                   + f"; {clin['clinical_unused']} clinical records unused")
    graph = data.get("graph")
    if graph is not None:
        if graph["knn"] or graph["umap"]:
            click.echo(f"graph     knn: {graph['knn'] or '-'} ({graph['edges']} edges), umap: {graph['umap'] or '-'}")
        else:
            click.echo(f"graph     none ({graph['note']})")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--models", required=True, help="Models to fuse, comma-separated, in this order (e.g. baseline,mii).")
@click.option("--where", default=None, help="Row filter: a pandas query over metadata and labels, e.g. \"sex == 'F' and Effusion == 1\".")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="File to write.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise each model's vectors (before PCA).")
@click.option("--pca", default=None, help="PCA: a number of components (fitted now, saved in the store), a stored PCA name, or MODEL=N|NAME|none,... per model.")
@click.option("--pca-fit-where", default=None, help="Fit a new PCA on rows matching this filter (default: the exported rows).")
@click.option("--pca-name", default=None, help="Name to store a new PCA under (default <model>-pca<N>).")
@click.option("--view", "view_opt", default="flat", show_default=True,
              help="How each stored vector is read: flat, or mean (token mean of a matrix embedding such as ELIXR), or MODEL=VIEW,...")
@click.option("--missing", type=click.Choice(MISSING_CHOICES), default="drop", show_default=True, help="Rows lacking a model: drop (reported) or error.")
@click.option("--no-labels", is_flag=True, help="Leave the label columns out.")
@click.option("--clinical", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Clinical table to join (CSV or Parquet).")
@click.option("--join-on", type=click.Choice(JOIN_ON_CHOICES), default="patient_id", show_default=True)
@click.option("--clinical-date-column", default=None, help="Date column of the clinical table: match the nearest study date.")
@click.option("--store-date-column", default=None, help="Store metadata column holding the study date (with --clinical-date-column).")
@click.option("--date-tolerance", default=None, help="Largest date difference for a match, e.g. 30D.")
@click.option("--clinical-unmatched", type=click.Choice(UNMATCHED_CHOICES), default="keep", show_default=True)
@click.option("--graph", default="auto", show_default=True, help="AnnData: stored kNN/UMAP result to include: auto, KIND/NAME or none.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=4096, show_default=True, help="Rows per streamed batch.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@handle_errors
def export(store: Path, models: str, where: str | None, fmt: str, out: Path, normalize: bool, pca: str | None, pca_fit_where: str | None,
           pca_name: str | None, view_opt: str, missing: str, no_labels: bool, clinical: Path | None, join_on: str, clinical_date_column: str | None,
           store_date_column: str | None, date_tolerance: str | None, clinical_unmatched: str, graph: str, batch_rows: int,
           overwrite: bool, as_json: bool) -> None:
    """Export fused vectors of STORE with row ids, metadata, labels and parameters.

    Fuses the --models (each L2-normalised, optionally PCA-reduced) over the rows matching
    --where, optionally joins a clinical table, and writes npz, parquet, h5 or anndata
    (h5ad: vectors in obsm X_<model>, stored kNN graph and UMAP where scanpy expects them).
    Streams: stores larger than memory export.

    \b
    Examples:
      cxrstore export mystore --models baseline --format anndata --out fused.h5ad
      cxrstore export mystore --models elixr,mii --where "dataset == 'mimic'" --pca 64 \\
          --pca-fit-where "dataset == 'mimic'" --clinical clinical.csv --join-on patient_id \\
          --format parquet --out fused.parquet --json
    """
    if (clinical_date_column or store_date_column or date_tolerance) and clinical is None:
        raise UsageError("--clinical-date-column, --store-date-column and --date-tolerance need --clinical FILE")
    report = export_api(
        store, models=models, out=out, format=fmt, where=where, normalize=normalize, pca=_pca_option(pca),  # type: ignore[arg-type]
        pca_fit_where=pca_fit_where, pca_name=pca_name, view=_view_option(view_opt), missing=missing, labels=not no_labels, clinical=clinical,  # type: ignore[arg-type]
        join_on=join_on, clinical_date_column=clinical_date_column, store_date_column=store_date_column,  # type: ignore[arg-type]
        date_tolerance=date_tolerance, clinical_unmatched=clinical_unmatched, graph=None if graph == "none" else graph,  # type: ignore[arg-type]
        batch_rows=batch_rows, overwrite=overwrite,
    )
    data = report.to_json()
    if as_json:
        echo_json(data)
    else:
        print_report(data)
