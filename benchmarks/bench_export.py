"""Export throughput against a raw zarr-to-numpy read, and DataLoader rows per second.

On a synthetic store of N rows with two models (1024-d and 512-d float32, the shapes of
MedImageInsight and a 512-d model), measures:

- ``raw_read``: what a user would otherwise do: open each model's zarr array directly and
  read it whole into numpy (``zarr.open_array(...)[:n]``), nothing else;
- ``raw_read_and_savez``: the same read, then ``numpy.savez`` of the arrays to a file (the
  naive in-memory export: no normalisation, no metadata, memory = the whole store);
- ``export/<format>``: ``cxrstore.export.export`` of both models fused and L2-normalised
  (npz, parquet, h5, anndata): select, stream, transform, write to a file;
- ``dataloader``: :class:`FusedVectorDataset` rows per second through a PyTorch
  ``DataLoader`` (per-row items collated in batches of 256, and ready batches of 256 with
  ``batch_size=None``), with 0 and 2 workers, next to the raw read's rows per second;
- ``peak_rss``: the peak resident memory of a child process that exports the store
  (npz and anndata), against the size of the vectors: the export streams.

Raw read and each export run alternately ``--repeat`` times after a warm-up; medians are
reported, with ``ratio = export MB/s / raw read MB/s`` (MB = MB of float32 vectors read).

    python benchmarks/bench_export.py --rows 50000 --out bench-out/export.json
    python benchmarks/bench_export.py --quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrstore import __version__
from cxrstore.export import export
from cxrstore.export.writers import FORMATS, SUFFIXES
from cxrstore.store.store import RowData, Store, open_writer
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODELS = {"m1024": 1024, "m512": 512}
PROV = {"encoder": {"encoder": "synthetic", "version": "1", "params": {}, "weights_sha256": None},
        "preprocess": {"max_side": 1024}, "cxrstore_version": __version__, "created_at": "bench"}


def make_store(path: Path, n: int, seed: int = 0, commit_every: int = 16384) -> None:
    """A store of ``n`` rows with clustered synthetic vectors for every model of MODELS."""
    rng = np.random.default_rng(seed)
    with open_writer(path) as w:
        for name, dim in MODELS.items():
            w.ensure_model(name, {**PROV, "native_shape": [dim]}, dim=dim)
        centres = {name: rng.standard_normal((20, dim)).astype(np.float32) for name, dim in MODELS.items()}
        for start in range(0, n, commit_every):
            stop = min(n, start + commit_every)
            rows = [w.add_row(RowData(image_id=f"img{i}", patient_id=f"p{i // 4}", study_id=f"s{i // 2}", dataset="synthetic",
                                      sex="FM"[i % 2], age=float(20 + i % 70), labels={"Effusion": float(i % 3 == 0)}))
                    for i in range(start, stop)]
            cluster = rng.integers(0, 20, stop - start)
            for name, dim in MODELS.items():
                vecs = centres[name][cluster] + 0.5 * rng.standard_normal((stop - start, dim)).astype(np.float32)
                w.add_vectors(name, rows, vecs)
            w.commit()


def raw_read(store: Path) -> float:
    """Seconds to read every model's vectors whole with zarr (the baseline)."""
    import zarr

    st = Store(store)
    n = st.n_rows
    t = time.perf_counter()
    for name, dim in MODELS.items():
        arr = zarr.open_array(store=str(store / "store.zarr"), path=f"models/{name}/vectors", mode="r")
        x = np.asarray(arr[:n])
        if x.shape != (n, dim):
            raise RuntimeError(f"read {x.shape}, expected {(n, dim)}")
    return time.perf_counter() - t


def raw_read_and_save(store: Path, out_dir: Path) -> float:
    """Seconds to read every model whole with zarr and save them with ``numpy.savez`` (unnormalised)."""
    import zarr

    n = Store(store).n_rows
    t = time.perf_counter()
    arrays = {name: np.asarray(zarr.open_array(store=str(store / "store.zarr"), path=f"models/{name}/vectors", mode="r")[:n]) for name in MODELS}
    np.savez(out_dir / "naive.npz", **arrays)
    seconds = time.perf_counter() - t
    (out_dir / "naive.npz").unlink()
    return seconds


def run_export(store: Path, out_dir: Path, fmt: str) -> float:
    out = out_dir / f"bench{SUFFIXES[fmt]}"
    t = time.perf_counter()
    export(store, models=list(MODELS), out=out, format=fmt, overwrite=True, graph=None)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t
    out.unlink()
    return seconds


def dataloader_rows_per_s(store: Path, *, workers: int, batch_mode: bool, batch: int = 256) -> float:
    from torch.utils.data import DataLoader

    from cxrstore.export.torch_dataset import FusedVectorDataset

    ds = FusedVectorDataset.from_store(store, list(MODELS), batch_size=batch if batch_mode else None)
    loader = DataLoader(ds, batch_size=None if batch_mode else batch, num_workers=workers)
    t = time.perf_counter()
    rows = 0
    for b in loader:
        rows += int(b["x"].shape[0])
    seconds = time.perf_counter() - t
    assert rows == len(ds.fusion)
    return rows / seconds


def child_peak_rss(store: Path, out_dir: Path, fmt: str) -> dict[str, float]:
    """Peak resident memory (MiB, VmHWM) of a fresh process: after its imports, and after exporting the store."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024;"
        "from cxrstore.export import export; import anndata, h5py, pyarrow.parquet;"
        "base = hwm();"
        f"export(sys.argv[2], models={list(MODELS)!r}, out=sys.argv[3], format={fmt!r}, overwrite=True, graph=None);"
        "print(base, hwm())"
    )
    out = out_dir / f"rss{SUFFIXES[fmt]}"
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), str(store), str(out)], capture_output=True, text=True, check=True)
    out.unlink()
    before, after = (float(v) for v in res.stdout.split())
    return {"after_imports": round(before, 1), "peak": round(after, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--workdir", type=Path, default=None, help="where the store and exports go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: 4,000 rows, 1 repeat")
    parser.add_argument("--no-dataloader", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeat = 4000, 1
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.workdir))
    try:
        store = work / "store"
        t = time.perf_counter()
        make_store(store, args.rows)
        build_s = time.perf_counter() - t
        mb = args.rows * sum(MODELS.values()) * 4 / 1e6
        raw_read(store)  # warm-up: page cache and imports
        for fmt in formats:
            run_export(store, work, fmt)
        raw: list[float] = []
        naive: list[float] = []
        times: dict[str, list[float]] = {f: [] for f in formats}
        for _ in range(args.repeat):
            raw.append(raw_read(store))
            naive.append(raw_read_and_save(store, work))
            for fmt in formats:
                times[fmt].append(run_export(store, work, fmt))
        raw_s = statistics.median(raw)
        raw_mbs = mb / raw_s
        result: dict = {
            "benchmark": "export",
            "rows": args.rows,
            "models": MODELS,
            "vector_mb": round(mb, 1),
            "repeat": args.repeat,
            "store_build_s": round(build_s, 2),
            "raw_read": {"seconds": round(raw_s, 3), "mb_per_s": round(raw_mbs, 1), "rows_per_s": round(args.rows / raw_s, 1), "all_s": [round(v, 3) for v in raw]},
            "raw_read_and_savez": {"seconds": round(statistics.median(naive), 3), "mb_per_s": round(mb / statistics.median(naive), 1),
                                   "all_s": [round(v, 3) for v in naive]},
            "export": {},
        }
        for fmt in formats:
            s = statistics.median(times[fmt])
            result["export"][fmt] = {"seconds": round(s, 3), "mb_per_s": round(mb / s, 1), "ratio_to_raw_read": round((mb / s) / raw_mbs, 3),
                                     "ratio_to_raw_read_and_savez": round(statistics.median(naive) / s, 3),
                                     "all_s": [round(v, 3) for v in times[fmt]]}
        result["peak_rss_mib"] = {fmt: child_peak_rss(store, work, fmt) for fmt in formats}
        if not args.no_dataloader:
            try:
                import torch  # noqa: F401

                dl = {}
                for workers in (0, 2):
                    for mode in (False, True):
                        key = f"{'batches' if mode else 'rows'}_workers{workers}"
                        dl[key] = round(statistics.median(dataloader_rows_per_s(store, workers=workers, batch_mode=mode) for _ in range(args.repeat)), 1)
                result["dataloader_rows_per_s"] = dl
            except ImportError:
                result["dataloader_rows_per_s"] = "skipped: torch not installed"
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                             "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
        result["cxrstore_version"] = __version__
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
