"""``cxrstore verify``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cli.common import EXIT_VERIFY_FAILED, echo_json, handle_errors, json_option
from cxrstore.store.verify import verify as verify_store


@click.command()
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@json_option
@handle_errors
def verify(store: Path, as_json: bool) -> None:
    """Check STORE's integrity: commit record, shapes, presence flags, every chunk's checksum.

    Exits with 4 when problems are found, naming the array and chunk.

    \b
    Example:
      cxrstore verify mystore
    """
    report = verify_store(str(store))
    if as_json:
        echo_json(report.to_json())
    else:
        for problem in report.problems:
            click.echo(f"PROBLEM {problem}")
        state = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"verify {store}: {state} ({report.arrays_checked} arrays, {report.chunks_checked} chunks checked)")
    if not report.ok:
        sys.exit(EXIT_VERIFY_FAILED)
