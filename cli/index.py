"""``cxrstore index``: build, update or describe the FAISS index of a model."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import echo_json, handle_errors, human_bytes, json_option, table
from cxrstore.index import build_index, index_info, update_index


def _print(info: dict) -> None:
    status = info["status"]
    if "index" not in info:
        click.echo(f"model {info['model']}: no index. {status['reason']}")
        return
    side = info["index"]
    state = "fresh" if status["fresh"] else "STALE"
    rows = [
        ("factory", side["factory"] + (" (auto)" if side.get("auto") else "")),
        ("metric", side["metric"]),
        ("rows x dim", f"{side['n_rows']} x {side['dim']}"),
        ("store generation", f"{side['store_generation']} (store: {info['store_generation']})"),
        ("status", state + (f": {status['reason']}" if status["reason"] else "")),
        ("search params", ", ".join(f"{k}={v}" for k, v in side["search_params"].items()) or "-"),
        ("build", f"{side['build_seconds']} s, {side['created_at']}, updates: {len(side.get('updates', []))}"),
        ("file", f"{info['index_path']} ({human_bytes(info['index_bytes'] or 0)})"),
    ]
    click.echo(table(rows, [f"index of {info['model']}", ""]))


@click.command("index")
@click.argument("store", type=click.Path(file_okay=False, path_type=Path))
@click.argument("action", type=click.Choice(["build", "update", "info"]))
@click.option("--model", "-m", required=True, help="Model whose vectors are indexed.")
@click.option("--factory", default="auto", show_default=True,
              help="FAISS factory string ('Flat', 'HNSW32,Flat', 'HNSW32_SQ8,RFlat', 'PCA512,HNSW32,RFlat'...) or 'auto' "
                   "(Flat up to rows x dim = 2**24; beyond, HNSW32_SQ8 + exact re-rank from 1024-d, HNSW32 below).")
@click.option("--metric", type=click.Choice(["cosine", "ip"]), default="cosine", show_default=True,
              help="cosine: inner product of L2-normalised vectors; ip: raw inner product.")
@click.option("--search-param", "search_params", multiple=True, metavar="NAME=VALUE",
              help="A FAISS search parameter recorded with the index, e.g. efSearch=256 or nprobe=32 (repeatable).")
@click.option("--seed", default=0, show_default=True, help="Seed of the training sample (IVF, PQ...).")
@json_option
@handle_errors
def index(store: Path, action: str, model: str, factory: str, metric: str, search_params: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Build, update or describe the FAISS index of MODEL in STORE.

    \b
    build   index every committed vector of the model (replaces the index)
    update  add the rows committed since the index was built (no retraining)
    info    show what the index covers and whether it is stale

    The index is stored under STORE/indexes/MODEL/ (faiss.read_index opens its
    index.faiss; index.json says what it covers). `cxrstore search` refuses a stale
    index and names the update command.

    \b
    Examples:
      cxrstore index mystore build --model baseline
      cxrstore index mystore build --model elixr --factory HNSW32,Flat --search-param efSearch=256
      cxrstore index mystore update --model baseline
      cxrstore index mystore info --model baseline --json
    """
    from cxrstore.errors import UsageError

    params: dict[str, float | int] = {}
    for item in search_params:
        name, sep, value = item.partition("=")
        try:
            number = float(value) if sep else float("nan")
            params[name.strip()] = int(number) if number.is_integer() else number
        except ValueError:
            raise UsageError(f"bad --search-param {item!r}: use NAME=NUMBER, e.g. efSearch=256 or nprobe=32") from None
        if not sep or not name.strip():
            raise UsageError(f"bad --search-param {item!r}: use NAME=NUMBER, e.g. efSearch=256 or nprobe=32")
    if action == "build":
        build_index(store, model, factory=factory, metric=metric, search_params=params or None, seed=seed)  # type: ignore[arg-type]
    elif action == "update":
        if factory != "auto" or params:
            raise UsageError("--factory and --search-param apply to `build`; `update` keeps the index's own")
        update_index(store, model)
    info = index_info(store, model)
    if as_json:
        echo_json(info)
    else:
        _print(info)
