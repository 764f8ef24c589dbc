"""``cxrstore info``."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import echo_json, handle_errors, human_bytes, json_option, table
from cxrstore.datasets.labels import policies_in_store
from cxrstore.store.info import store_info
from cxrstore.store.store import Store


def print_info(data: dict) -> None:
    click.echo(f"store     {data['store']}  (format v{data['format']['format_version']}, generation {data['generation']}, {human_bytes(data['size_bytes'])} on disk)")
    click.echo(f"rows      {data['rows']} from {data['patients']} patients; datasets: " + (", ".join(f"{k} {v}" for k, v in data["datasets"].items()) or "none"))
    if data["models"]:
        rows = []
        for name, m in data["models"].items():
            enc = m["provenance"]["encoder"]
            sha = enc.get("weights_sha256") or "-"
            rows.append((name, f"{enc['encoder']} v{enc['version']}", m["dim"], "x".join(map(str, m["provenance"]["native_shape"])), m["dtype"], m["rows_present"], sha[:12]))
        click.echo(table(rows, ["model", "encoder", "dim", "native", "dtype", "rows", "weights"]))
    if data["labels"]:
        click.echo(table([(k, v["positive"], v["negative"], v["missing"]) for k, v in data["labels"].items()], ["label", "positive", "negative", "missing"]))
    if data.get("variants") and set(data["variants"]) != {"original"}:
        click.echo("variants  " + ", ".join(f"{k} {v}" for k, v in data["variants"].items()))
    for pol in data.get("label_policies", []):
        pid = pol["label_policy"] or "(none)"
        click.echo(f"label policy {pid}: {pol['rows']} rows")
        if pol["policies"] is None:
            click.echo("  (no kept run summary records this policy)")
            continue
        for key in ("adapter", "labeller", "label_file", "uncertain", "not_mentioned", "views", "opacity_fallback",
                    "expert_labels", "manifest", "label_values"):
            if key in pol["policies"]:
                value = pol["policies"][key]
                click.echo(f"  {key:<16} {', '.join(map(str, value)) if isinstance(value, list) else value}")
        lm = pol["policies"].get("label_map")
        if isinstance(lm, dict):
            click.echo(f"  {'label_map':<16} {lm.get('source')} (sha256 {str(lm.get('sha256', ''))[:12]})")
    click.echo(f"failures  {data['failures_total']} recorded")
    for f in data["failures_recent"]:
        click.echo(f"  {f['image_id'] or '-'}  {f['path'] or '-'}: {f['reason']}")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@json_option
@handle_errors
def info(store: Path, as_json: bool) -> None:
    """Show what STORE holds: rows, models with provenance, labels, label policies, variants, failures, size.

    The label policies in force are shown per ``label_policy`` id (a metadata column of
    the rows each dataset adapter produced; the full policy is kept in the run summaries).

    \b
    Example:
      cxrstore info mystore --json
    """
    opened = Store(store)
    data = store_info(opened)
    data["label_policies"] = policies_in_store(opened)
    data["variants"] = {}
    if opened.n_rows:
        import numpy as np

        values, counts = np.unique(opened.column("variant").astype(str), return_counts=True)
        data["variants"] = {str(v): int(c) for v, c in zip(values, counts)}
    if as_json:
        echo_json(data)
    else:
        print_info(data)
