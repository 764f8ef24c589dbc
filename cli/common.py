"""Shared CLI plumbing: exit codes, error handling, JSON and table output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from cxrstore.errors import CxrStoreError, UsageError

#: Exit codes: documented in the README.
EXIT_OK = 0
EXIT_ERROR = 1  # the command could not do its job (store locked, corrupt, bad manifest...)
EXIT_USAGE = 2  # bad options or arguments (click's own convention)
EXIT_PARTIAL = 3  # the run completed, but some inputs failed (see the summary)
EXIT_VERIFY_FAILED = 4  # verify found problems

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turn cxrstore errors into one clear line on stderr and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            raise click.UsageError(str(exc)) from None
        except CxrStoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, allow_nan=False))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def finish_run(report: Any, *, as_json: bool, summary: Callable[[Any], None]) -> None:
    """Print a run's report (JSON or human summary); exit 3 when some inputs failed."""
    if as_json:
        echo_json(report.to_json())
    else:
        summary(report)
    if report.failed:
        sys.exit(EXIT_PARTIAL)


def parse_key_values(items: tuple[str, ...] | list[str], flag: str) -> dict[str, Any]:
    """``("a=1", "b=text")`` -> ``{"a": 1, "b": "text"}``: a value is JSON when it parses, text otherwise.

    Raises
    ------
    click.UsageError
        On an item without ``=``, an empty key, or a key given twice (naming ``flag``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key in out:
            raise click.UsageError(f"{flag} {key} is given twice")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out
