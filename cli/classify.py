"""``cxrstore classify``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cli.common import echo_json, handle_errors, json_option
from cxrstore.analysis.classify import CLASSIFIERS
from cxrstore.analysis.classify import classify as run_classify
from cxrstore.store.views import VIEWS

logger = logging.getLogger(__name__)


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "models", multiple=True, required=True, help="Model to compare (repeat for several; table columns).")
@click.option("--label", "labels", multiple=True, required=True, help="Label to classify (repeat for several).")
@click.option("--n-per-class", type=int, default=1000, show_default=True, help="Images with and without the finding per sample.")
@click.option("--folds", type=int, default=5, show_default=True, help="Cross-validation folds (grouped by patient).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling, folds, classifier and bootstrap.")
@click.option("--classifier", type=click.Choice(CLASSIFIERS), default="lightgbm", show_default=True)
@click.option("--augment", type=click.Choice(["none", "train"]), default="none", show_default=True,
              help="'train': augmented variants of sampled images join training folds only.")
@click.option("--view", type=click.Choice(VIEWS), default="flat", show_default=True,
              help="Flat vector, or the mean over tokens of a matrix embedding (ELIXR 32x768).")
@click.option("--train-on", default=None, help="Cross-dataset transfer: train on this dataset ...")
@click.option("--test-on", default=None, help="... and test on this one.")
@click.option("--leakage-report", is_flag=True, help="Also run naive (ungrouped) folds and show the gap.")
@click.option("--no-subgroups", is_flag=True, help="Skip metrics by sex and age band.")
@click.option("--where", default=None, help="Metadata filter before sampling, e.g. \"view == 'PA'\".")
@click.option("--ci", type=click.Choice(["t", "bootstrap"]), default="t", show_default=True,
              help="Interval shown in the printed table (both are stored).")
@click.option("--name", default=None, help="Result name under STORE/results/classify/ (default: from the parameters).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the table (markdown, CSV, JSON) and ROC PNGs to this folder.")
@json_option
@handle_errors
def classify(
    store: Path,
    models: tuple[str, ...],
    labels: tuple[str, ...],
    n_per_class: int,
    folds: int,
    seed: int,
    classifier: str,
    augment: str,
    view: str,
    train_on: str | None,
    test_on: str | None,
    leakage_report: bool,
    no_subgroups: bool,
    where: str | None,
    ci: str,
    name: str | None,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    """Benchmark models' embeddings on labels of STORE: the study's protocol, leak-free.

    For each model, dataset and label: a balanced seeded sample (N with the finding, N
    without), stratified K-fold cross-validation grouped by patient, LightGBM (or
    logistic regression), accuracy/AUROC/F1 with 95% intervals. Prints the table and
    saves everything under STORE/results/classify/NAME.

    \b
    Example:
      cxrstore classify mystore --model elixr --model mii --label Edema --label Effusion
      cxrstore classify mystore --model mii --label Edema --train-on mimic --test-on nih
    """
    from cxrstore.analysis.report import paper_table, table_markdown

    result = run_classify(
        store,
        models=list(models),
        labels=list(labels),
        where=where,
        n_per_class=n_per_class,
        folds=folds,
        seed=seed,
        classifier=classifier,  # type: ignore[arg-type]
        augment=augment,  # type: ignore[arg-type]
        view=view,  # type: ignore[arg-type]
        train_on=train_on,
        test_on=test_on,
        subgroups=not no_subgroups,
        leakage_report=leakage_report,
        name=name,
    )
    if out_dir is not None and result.path is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(result.path).iterdir()):
            if f.name.startswith("table") or f.name.startswith("roc_"):
                (out_dir / f.name).write_bytes(f.read_bytes())
    if as_json:
        echo_json(result.to_json())
        return
    if ci == "t":
        click.echo(result.markdown)
    else:
        grouped = result.summary[result.summary["scheme"] == "grouped"]
        for metric in ("auroc", "accuracy", "f1"):
            t = paper_table(grouped, metric=metric, models=list(models), labels=list(labels), ci="bootstrap")
            click.echo(table_markdown(t, title=f"{metric.upper() if metric == 'auroc' else metric.capitalize()}, "
                                      "pooled OOF ± 95% CI half-width (patient bootstrap)"))
        if result.leakage is not None:
            from cxrstore.analysis.report import leakage_markdown

            click.echo(leakage_markdown(result.leakage))
        for note in result.notes:
            click.echo(f"note: {note}")
    click.echo(f"saved: {result.path}")
