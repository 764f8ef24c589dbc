"""``cxrstore cluster``."""

from __future__ import annotations

import math
from pathlib import Path

import click

from cli.common import echo_json, handle_errors, json_option, table
from cxrstore.analysis.cluster import (
    KNN_MEMORY_MB,
    KNN_METHODS,
    OBJECTIVES,
    WEIGHTS,
    ClusterReport,
)
from cxrstore.analysis.cluster import cluster as run_cluster
from cxrstore.analysis.knn import TARGET_RECALL


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_report(report: ClusterReport) -> None:
    s = report.summary
    knn = s["knn"]
    how = "reused" if s["knn_reused"] else f"{_fmt(knn.get('seconds'), 1)} s"
    click.echo(f"rows      {s['rows']}   clusters {s['clusters']}   modularity {s['modularity']:.3f}")
    recall = knn.get("recall_sample")
    click.echo(f"kNN       {knn.get('method')} on {knn.get('device', 'cpu')} ({how})" + (f", recall {recall['recall']:.3f} on {recall['sample']} rows" if recall else ""))
    labels = [c[len("prevalence_"):] for c in report.table.columns if c.startswith("prevalence_")]
    headers = ["cluster", "size", "patients"] + labels + ["mean age", "female"]
    rows = [
        [r["cluster"], r["size"], r["patients"]] + [_fmt(r[f"prevalence_{lab}"], 2) for lab in labels] + [_fmt(r["mean_age"], 1), _fmt(r["female_fraction"], 2)]
        for r in report.table.to_dict("records")
    ]
    click.echo(table(rows, headers))
    if len(report.agreement):
        click.echo(table([[r["label"], r["known"], _fmt(r["ari"]), _fmt(r["nmi"])] for r in report.agreement.to_dict("records")], ["label", "known", "ARI", "NMI"]))
    click.echo(f"saved     {report.result.path}")
    for f in report.result.meta.get("files", []):
        click.echo(f"  {f}")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", required=True, help="Model whose vectors are clustered.")
@click.option("--k", "k", type=int, default=15, show_default=True, help="Neighbours per row in the kNN graph (self excluded).")
@click.option("--where", default=None, help="Metadata filter, a pandas query, e.g. \"sex == 'F' and age >= 40\".")
@click.option("--resolution", type=float, default=1.0, show_default=True, help="Leiden resolution (higher: more clusters).")
@click.option("--label", "labels", multiple=True, help="Label to colour a plot by and compare with (repeat; default: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds Leiden and UMAP.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="modularity", show_default=True)
@click.option("--weights", type=click.Choice(WEIGHTS), default="connectivity", show_default=True,
              help="Leiden edge weights: UMAP connectivities (as scanpy) or cosine similarity.")
@click.option("--method", type=click.Choice(KNN_METHODS), default="exact", show_default=True,
              help="kNN graph: exact, or approximate (rows searched exactly within their nearest k-means lists; "
                   "recall calibrated to --target-recall and measured on a sample).")
@click.option("--target-recall", type=float, default=TARGET_RECALL, show_default=True,
              help="With --method ivf: recall@k the number of lists searched is calibrated to.")
@click.option("--no-umap", "no_umap", is_flag=True, help="Skip UMAP and the plots.")
@click.option("--memory-mb", type=float, default=KNN_MEMORY_MB, show_default=True, help="Memory for the kNN graph's blocks of vectors.")
@click.option("--recompute", is_flag=True, help="Recompute the kNN graph even if a stored one matches.")
@json_option
@handle_errors
def cluster(
    store: Path, model: str, k: int, where: str | None, resolution: float, labels: tuple[str, ...], seed: int,
    objective: str, weights: str, method: str, target_recall: float, no_umap: bool, memory_mb: float, recompute: bool, as_json: bool,
) -> None:
    """Cluster STORE's vectors: exact cosine kNN graph, Leiden, UMAP, plots, tables.

    The kNN graph is stored under STORE/results/knn/ and reused; labels, UMAP
    coordinates, the cluster table, label agreement (ARI, NMI) and PNG plots are
    stored under STORE/results/cluster/.

    \b
    Example:
      cxrstore cluster mystore --model baseline --k 15 --label Effusion --label Edema
    """
    report = run_cluster(
        store, model=model, k=k, where=where, resolution=resolution, seed=seed, labels=list(labels) or None,
        objective=objective, weights=weights, method=method, embed=not no_umap,  # type: ignore[arg-type]
        memory_mb=memory_mb, reuse_graph=not recompute, target_recall=target_recall,
    )
    if as_json:
        echo_json(report.to_json())
    else:
        print_report(report)
