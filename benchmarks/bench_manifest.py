"""The NIH adapter plus the store's metadata write, against a plain pandas read of the same file.

Measures, on the real NIH label file (``Data_Entry_2017_v2020.csv.gz``, 112,120 rows; no
pixels are read):

- ``cxrstore``: :class:`~cxrstore.datasets.nih.NihCxr14` (header with bracketed commas,
  pipe-separated findings, the harmonised label map and the expert Airspace-opacity
  relabels, canonical columns, the report) and then every row written to a new store
  with :meth:`StoreWriter.add_row` plus a tiny generated 8-d vector per row (one model),
  committed every 16,384 rows: what ``cxrstore ingest --dataset nih-cxr14`` does apart
  from decoding and encoding images;
- ``pandas``: ``pandas.read_csv`` of the same file, what a user would otherwise write to
  get the table (no label harmonisation, nothing stored).

Each measurement runs in a fresh process (so ``ru_maxrss`` is that step's peak resident
memory), alternating cxrstore and pandas, ``--repeat`` times; the median seconds is
reported. Peak Python-allocated memory (``tracemalloc``, which slows the code down) is
measured in one further run of each, untimed. Module imports happen before the clock and
tracemalloc start; ``maxrss_after_imports_mb`` is the resident memory they take.

    python benchmarks/bench_manifest.py --out bench-out/manifest.json
    python benchmarks/bench_manifest.py --quick          # first 5,000 rows, 1 repeat
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_METADATA = ROOT.parent / "shared" / "data" / "metadata"
LABELS = "Data_Entry_2017_v2020.csv.gz"
EXPERT = "google2019_nih-chest-xray-labels.csv.gz"


def run_cxrstore(data: Path, store: Path) -> dict:
    import numpy as np

    from cxrstore.datasets.nih import NihCxr14
    from cxrstore.store.store import open_writer

    t0 = time.perf_counter()
    adapter = NihCxr14(data, label_file=data / LABELS, expert_labels=data / EXPERT if (data / EXPERT).is_file() else False,
                       check_images=False)
    records = [r for r in adapter.records() if hasattr(r, "row_data")]
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    with open_writer(store) as writer:
        writer.ensure_model("bench", {"encoder": {"encoder": "bench", "version": "1", "params": {}, "weights_sha256": None},
                                      "native_shape": [8], "preprocess": {}}, dim=8)
        rows: list[int] = []
        for rec in records:
            rows.append(writer.add_row(rec.row_data(sha256="0" * 64)))
            if len(rows) == 16384:
                writer.add_vectors("bench", rows, rng.standard_normal((len(rows), 8), dtype=np.float32))
                writer.commit()
                rows = []
        if rows:
            writer.add_vectors("bench", rows, rng.standard_normal((len(rows), 8), dtype=np.float32))
        writer.commit()
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"rows": len(records), "adapter_s": t1 - t0, "write_s": t2 - t1, "seconds": t2 - t0, "store_bytes": size,
            "issues": len(adapter.report().issues)}


def run_pandas(data: Path) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.read_csv(data / LABELS)
    t1 = time.perf_counter()
    return {"rows": len(df), "seconds": t1 - t0}


def _step(kind: str, data: Path, trace: bool) -> dict:
    # Imports first: neither the timings nor the tracemalloc peak include them.
    importlib.import_module("pandas")
    if kind == "cxrstore":
        importlib.import_module("cxrstore.datasets.nih")
        importlib.import_module("cxrstore.store.store")
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        out = run_cxrstore(data, Path(tmp) / "store") if kind == "cxrstore" else run_pandas(data)
    if trace:
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["maxrss_after_imports_mb"] = rss_imports
    return out


def _in_subprocess(kind: str, data: Path, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--step", kind, "--data", str(data)] + (["--trace"] if trace else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _subset(src: Path, dst: Path, n: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    with gzip.open(src / LABELS, "rt") as fh, gzip.open(dst / LABELS, "wt") as out:
        for i, line in enumerate(fh):
            if i > n:
                break
            out.write(line)
    if (src / EXPERT).is_file():
        shutil.copy(src / EXPERT, dst / EXPERT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_METADATA, help="folder holding Data_Entry_2017_v2020.csv.gz")
    ap.add_argument("--rows", type=int, default=0, help="use only the first ROWS rows (0: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="first 5,000 rows, one repeat")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--step", choices=["cxrstore", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(_step(args.step, args.data, args.trace)))
        return
    if not (args.data / LABELS).is_file():
        sys.exit(f"{args.data / LABELS} not found; pass --data FOLDER")
    if args.quick:
        args.rows, args.repeat = args.rows or 5000, 1
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if args.rows:
            data = Path(tmp) / "subset"
            _subset(args.data, data, args.rows)
        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {"cxrstore": [], "pandas": []}
        _in_subprocess("pandas", data, False)  # warm the page cache
        for _ in range(args.repeat):
            for kind in ("cxrstore", "pandas"):
                runs[kind].append(_in_subprocess(kind, data, False))
        traced = {kind: _in_subprocess(kind, data, True) for kind in ("cxrstore", "pandas")}
        load_after = os.getloadavg()

    def summary(kind: str) -> dict:
        items = runs[kind]
        out = {"seconds_median": statistics.median(r["seconds"] for r in items),
               "seconds_all": [round(r["seconds"], 3) for r in items],
               "maxrss_mb_median": statistics.median(r["maxrss_mb"] for r in items),
               "maxrss_after_imports_mb": statistics.median(r["maxrss_after_imports_mb"] for r in items),
               "tracemalloc_peak_mb": traced[kind]["tracemalloc_peak_mb"],
               "rows": items[0]["rows"]}
        if kind == "cxrstore":
            out["adapter_s_median"] = statistics.median(r["adapter_s"] for r in items)
            out["write_s_median"] = statistics.median(r["write_s"] for r in items)
            out["store_bytes"] = items[0]["store_bytes"]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}

    cx, pd_ = summary("cxrstore"), summary("pandas")
    result = {
        "benchmark": "manifest",
        "what": "NIH adapter + metadata write (add_row, 8-d vector per row, commits) vs pandas.read_csv of the same file",
        "file": LABELS,
        "rows": cx["rows"],
        "repeat": args.repeat,
        "cxrstore": cx,
        "pandas_read_csv": pd_,
        "ratio_seconds": round(cx["seconds_median"] / pd_["seconds_median"], 2),
        "ratio_adapter_seconds": round(cx["adapter_s_median"] / pd_["seconds_median"], 2),
        "ratio_maxrss": round(cx["maxrss_mb_median"] / pd_["maxrss_mb_median"], 2),
        "ratio_tracemalloc_peak": round(cx["tracemalloc_peak_mb"] / pd_["tracemalloc_peak_mb"], 2),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
