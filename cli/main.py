"""The ``cxrstore`` command: a thin click layer over the Python API."""

from __future__ import annotations

import click

from cli.classify import classify
from cli.cluster import cluster
from cli.common import setup_logging
from cli.demo import demo
from cli.export import export
from cli.import_vectors import import_cmd
from cli.index import index
from cli.info import info
from cli.ingest import ingest
from cli.models import models
from cli.search import search
from cli.verify import verify
from cxrstore import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxrstore")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """cxrstore: an embedding store for chest X-ray foundation-model embeddings.

    Every command takes the store folder as its first argument (`models` excepted).
    Exit codes: 0 ok, 1 error, 2 usage error, 3 completed with some inputs failed,
    4 verify found problems.
    """
    setup_logging(verbose)


for command in (ingest, import_cmd, info, verify, index, search, classify, cluster, export, models, demo):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="cxrstore")


if __name__ == "__main__":
    main()
