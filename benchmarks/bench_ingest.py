"""Ingest throughput against a bare decode loop over the same files.

Measures, on the same N files and with the same number of worker processes:

- ``decode``: what a user would otherwise write to read the images: read the bytes and
  decode them with Pillow into a numpy array, nothing else;
- ``ingest``: ``cxrstore ingest`` end to end: read, sha256, content sniffing, decode,
  uniform preprocessing, baseline encoder, store writes and commits.

Both are run alternately ``--repeat`` times (first a warm-up of each) and the median
images per second is reported, with ``ratio = ingest / decode``. Target: ingest is
decode-bound (ratio at least 0.8).

    python benchmarks/bench_ingest.py --n 400 --size 1024 --out bench-out/ingest.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrstore import __version__  # noqa: E402
from cxrstore.datasets.csv_manifest import CsvManifest  # noqa: E402
from cxrstore.demo.synth import generate_demo  # noqa: E402
from cxrstore.encoders.base import get_encoder  # noqa: E402
from cxrstore.ingest import ingest  # noqa: E402
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _decode(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        with Image.open(__import__("io").BytesIO(data)) as im:
            total += np.asarray(im).shape[0]
    return total


def bare_decode(paths: list[str], workers: int) -> float:
    """Seconds to read and decode every file with Pillow, in ``workers`` processes."""
    started = time.perf_counter()
    if workers == 0:
        _decode(paths)
    else:
        chunks = [paths[i : i + 16] for i in range(0, len(paths), 16)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            list(ex.map(_decode, chunks))
    return time.perf_counter() - started


def full_ingest(data: Path, store: Path, workers: int) -> float:
    shutil.rmtree(store, ignore_errors=True)
    adapter = CsvManifest(data / "manifest.csv", root=data)
    started = time.perf_counter()
    report = ingest(store, adapter.records(), encoder=get_encoder("baseline"), workers=workers, batch_size=32)
    elapsed = time.perf_counter() - started
    if report.failed or report.added == 0:
        raise SystemExit(f"ingest failed: {report.to_json()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="approximate number of images")
    parser.add_argument("--size", type=int, default=1024, help="image side (NIH ChestX-ray14 is 1024)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        data = tmp / "data"
        t0 = time.perf_counter()
        # about 3.75 images per synthetic patient
        generate_demo(data, n_patients=max(1, round(args.n / 3.75)), size=args.size, seed=0)
        gen_s = time.perf_counter() - t0
        paths = [str(p) for p in sorted((data / "images").rglob("*.png"))]
        n = len(paths)
        bare_decode(paths[:64], args.workers)  # warm-up: process start, imports
        full_ingest(data, tmp / "warm", args.workers)
        decode_s, ingest_s = [], []
        for _ in range(args.repeat):
            decode_s.append(bare_decode(paths, args.workers))
            ingest_s.append(full_ingest(data, tmp / "store", args.workers))
        dec = n / statistics.median(decode_s)
        ing = n / statistics.median(ingest_s)
        result = {
            "benchmark": "ingest",
            "cxrstore_version": __version__,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "images": n,
            "image_size": args.size,
            "image_format": "8-bit grayscale PNG (synthetic demo)",
            "workers": args.workers,
            "repeat": args.repeat,
            "generate_seconds": round(gen_s, 2),
            "decode_seconds": [round(s, 3) for s in decode_s],
            "ingest_seconds": [round(s, 3) for s in ingest_s],
            "decode_images_per_s": round(dec, 1),
            "ingest_images_per_s": round(ing, 1),
            "ratio_ingest_over_decode": round(ing / dec, 3),
            "target_ratio": 0.8,
        }
        emit(result, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
