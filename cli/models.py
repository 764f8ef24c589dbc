"""``cxrstore models``: list encoders; fetch published weights on explicit request."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import echo_json, handle_errors, json_option, table
from cxrstore.encoders.weights import FETCHABLE, fetch_plan, fetch_weights


@click.group("models")
def models() -> None:
    """Encoders and their weights. Nothing is ever downloaded unless you run `models fetch`."""


@models.command("list")
@json_option
@handle_errors
def list_cmd(as_json: bool) -> None:
    """List registered encoders and which weights `models fetch` knows."""
    from cxrstore.encoders.base import available_encoders

    rows = [{"encoder": name, "fetchable": name in FETCHABLE, "repo": FETCHABLE[name].repo_id if name in FETCHABLE else ""}
            for name in available_encoders()]
    rows += [{"encoder": n, "fetchable": True, "repo": s.repo_id} for n, s in FETCHABLE.items() if n not in available_encoders()]
    if as_json:
        echo_json(rows)
    else:
        click.echo(table([(r["encoder"], "yes" if r["fetchable"] else "-", r["repo"] or "-") for r in rows], ["encoder", "fetchable", "repository"]))


@models.command("fetch")
@click.argument("name")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to download into.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Only say what would be downloaded.")
@json_option
@handle_errors
def fetch_cmd(name: str, to: Path, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Download NAME's published weights from Hugging Face into --to.

    Says what it will download (repository, files, size, licence) and asks before
    downloading. Needs network access, and for gated models accepted terms and a login.
    Then pass the folder as the encoder's weights.

    \b
    Example:
      cxrstore models fetch medimageinsight --to ~/models/MedImageInsights
      cxrstore ingest st --manifest m.csv --encoder medimageinsight --weights ~/models/MedImageInsights
    """
    spec = fetch_plan(name)
    if as_json and (dry_run or not yes):
        echo_json({"plan": spec.to_json(), "to": str(to), "downloaded": False})
        return
    if not as_json:
        click.echo(f"will download {spec.describe()}\ninto {to}")
    if dry_run:
        return
    if not yes and not click.confirm("proceed?", default=False):
        click.echo("nothing downloaded")
        return
    dest = fetch_weights(name, to)
    if as_json:
        echo_json({"plan": spec.to_json(), "to": str(dest), "downloaded": True})
    else:
        click.echo(f"done: use --weights {dest}")
