"""``cxrstore info``."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import echo_json, handle_errors, human_bytes, json_option, table
from cxrstore.store.info import store_info


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
    click.echo(f"failures  {data['failures_total']} recorded")
    for f in data["failures_recent"]:
        click.echo(f"  {f['image_id'] or '-'}  {f['path'] or '-'}: {f['reason']}")


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@json_option
@handle_errors
def info(store: Path, as_json: bool) -> None:
    """Show what STORE holds: rows, models with provenance, labels, failures, size.

    \b
    Example:
      cxrstore info mystore --json
    """
    data = store_info(store)
    if as_json:
        echo_json(data)
    else:
        print_info(data)
