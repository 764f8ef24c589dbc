"""``cxrstore search``: similar images and patients, and retrieval evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.common import echo_json, handle_errors, json_option, table
from cxrstore.analysis.retrieve import evaluate_retrieval
from cxrstore.analysis.retrieve import search as run_search
from cxrstore.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def format_results(df: pd.DataFrame) -> str:
    """A search result DataFrame as the human table `cxrstore search` prints."""
    if df.empty:
        return "no neighbours found (check --where)"
    return table([[_fmt(v) for v in rec] for rec in df.itertuples(index=False)], list(df.columns))


@click.command("search")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help="Model whose index is searched.")
@click.option("--image-id", "image_ids", multiple=True, help="A stored image as the query (repeatable: a batch).")
@click.option("--patient-id", help="A patient's images as the queries, aggregated (best similarity per neighbour).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A new image file (DICOM, PNG, JPEG), encoded as the model was (repeatable).")
@click.option("--k", "k", default=10, show_default=True, help="Neighbours per query (or per label query with --evaluate).")
@click.option("--where", "wheres", multiple=True,
              help="Filter on neighbours' metadata and labels, a pandas query: \"sex == 'F' and age >= 40 and Effusion == 1\" (repeatable: and-ed).")
@click.option("--exclude-same-patient/--include-same-patient", default=None,
              help="Leave out the query patient's other images (default: on for --image-id, --patient-id and --evaluate).")
@click.option("--evaluate", is_flag=True, help="Report precision@k of neighbours sharing the query's --label over the (filtered) rows.")
@click.option("--label", help="The label for --evaluate.")
@click.option("--max-queries", default=2000, show_default=True, help="With --evaluate: a seeded sample of at most this many queries (0: all).")
@click.option("--seed", default=0, show_default=True, help="Seed of the --evaluate query sample.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@json_option
@handle_errors
def search(store: Path, model: str, image_ids: tuple[str, ...], patient_id: str | None, images: tuple[Path, ...], k: int,
           wheres: tuple[str, ...], exclude_same_patient: bool | None, evaluate: bool, label: str | None, max_queries: int,
           seed: int, device: str, as_json: bool) -> None:
    """Find the stored images most similar to a stored image, a patient or a new image.

    Needs the model's index (`cxrstore index STORE build --model M`); a stale index is
    refused with the command that updates it. Similarity is cosine.

    \b
    Examples:
      cxrstore search mystore --model baseline --image-id img001 --k 5
      cxrstore search mystore --model baseline --patient-id p7 --where "view == 'PA'" --json
      cxrstore search mystore --model baseline --image new.dcm --where "Effusion == 1"
      cxrstore search mystore --model baseline --evaluate --label Effusion --k 10
    """
    where = " and ".join(f"({w})" for w in wheres) if wheres else None
    if evaluate:
        if label is None:
            raise UsageError("--evaluate needs --label (one of the store's labels)")
        if image_ids or patient_id or images:
            raise UsageError("--evaluate runs over the store's rows; drop --image-id, --patient-id and --image")
        summary = evaluate_retrieval(store, model=model, label=label, k=k, where=where,
                                     exclude_same_patient=True if exclude_same_patient is None else exclude_same_patient,
                                     max_queries=max_queries or None, seed=seed, device=device)  # type: ignore[arg-type]
        if as_json:
            echo_json(summary)
        else:
            keys = ["label", "k", "n_queries", "n_pool", "precision_at_k", "precision_positive", "precision_negative", "chance", "lift",
                    "exclude_same_patient", "index_factory", "result_path"]
            click.echo(table([(key, _fmt(summary.get(key))) for key in keys], [f"retrieval of {model}", ""]))
        return
    if label is not None:
        raise UsageError("--label applies to --evaluate")
    kinds = sum(bool(x) for x in (image_ids, patient_id, images))
    if kinds != 1:
        raise UsageError("give exactly one kind of query: --image-id, --patient-id or --image (or --evaluate --label L)")
    df = run_search(store, model=model, image_id=list(image_ids) or None, patient_id=patient_id,
                    image=[str(p) for p in images] or None, k=k, where=where, exclude_same_patient=exclude_same_patient,
                    device=device)  # type: ignore[arg-type]
    if as_json:
        echo_json(df.astype(object).where(df.notna(), None).to_dict(orient="records"))
        return
    click.echo(format_results(df))
