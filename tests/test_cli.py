"""The CLI: commands, JSON output, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from cli.common import EXIT_PARTIAL, EXIT_USAGE, EXIT_VERIFY_FAILED
from cli.main import cli
from cxrstore.schemas import validate
from cxrstore.store.store import Store
from cxrstore.store import format as fmt


def _ingest_args(store: Path, data: Path, *extra: str) -> list[str]:
    return ["ingest", str(store), "--manifest", str(data / "manifest.csv"), "--root", str(data), "--workers", "0", *extra]


def test_ingest_info_verify_json(tmp_path: Path, small_demo: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, _ingest_args(tmp_path / "s", small_demo, "--json"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert validate(report, "ingest-report") == [] and report["added"] > 0
    res = runner.invoke(cli, ["info", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["rows"] == report["added"] and info["models"]["baseline"]["dim"] > 0
    assert info["labels"]["Effusion"]["positive"] > 0
    res = runner.invoke(cli, ["verify", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0 and validate(json.loads(res.output), "verify-report") == []
    res = runner.invoke(cli, ["info", str(tmp_path / "s")])
    assert "baseline" in res.output and "Effusion" in res.output


def test_human_summary_and_partial_failure_exit_code(tmp_path: Path, small_demo: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_demo, data)
    with open(data / "manifest.csv", "a") as fh:
        fh.write("broken,missing.png,demo-p9999,s1,PA,F,40,1,0,0,0\n")
    res = CliRunner().invoke(cli, _ingest_args(tmp_path / "s", data))
    assert res.exit_code == EXIT_PARTIAL, res.output
    assert "1 failed" in res.output and "missing.png" in res.output and "file not found" in res.output


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["ingest", str(tmp_path / "s")])
    assert res.exit_code == EXIT_USAGE and "--manifest is required" in res.output
    (tmp_path / "m.csv").write_text("image_id,path\n")
    res = runner.invoke(cli, ["ingest", str(tmp_path / "s"), "--manifest", str(tmp_path / "m.csv"), "--encoder", "nope"])
    assert res.exit_code == EXIT_USAGE and "unknown encoder 'nope'" in res.output and "baseline" in res.output


def test_info_on_non_store_is_an_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["info", str(tmp_path)])
    assert res.exit_code == 1 and "not a cxrstore store" in res.output


def test_verify_exit_code_on_corruption(tmp_path: Path, small_demo: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, _ingest_args(tmp_path / "s", small_demo)).exit_code == 0
    chunk = tmp_path / "s" / fmt.ZARR_DIR / "models" / "baseline" / "vectors" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    res = runner.invoke(cli, ["verify", str(tmp_path / "s")])
    assert res.exit_code == EXIT_VERIFY_FAILED
    assert "models/baseline/vectors" in res.output and "corrupt" in res.output


def test_encoder_options_reach_the_encoder_and_are_recorded(tmp_path: Path, small_demo: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, _ingest_args(tmp_path / "s", small_demo, "--encoder-option", "hog_bins=6",
                                          "--encoder-option", "hist_bins=8", "--json"))
    assert res.exit_code == 0, res.output
    params = Store(tmp_path / "s").provenance("baseline")["encoder"]["params"]
    assert params["hog_bins"] == 6 and params["hist_bins"] == 8  # JSON numbers, not text
    res = runner.invoke(cli, _ingest_args(tmp_path / "t", small_demo, "--encoder-option", "colour=red"))
    assert res.exit_code == 2 and "unknown option(s) for encoder 'baseline': colour" in res.output
    res = runner.invoke(cli, _ingest_args(tmp_path / "t", small_demo, "--encoder-option", "hog_bins"))
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(cli, _ingest_args(tmp_path / "t", small_demo, "--encoder-option", "weights=x"))
    assert res.exit_code != 0 and "unknown option(s) for encoder 'baseline': weights" in res.output
