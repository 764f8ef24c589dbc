"""Encoder throughput: end-to-end ingest against the model alone.

Measures, with the same model (random weights in the real folder layout of ``--encoder``:
the reduced test size by default, the published size with ``--full`` for
``medimageinsight`` and ``torchxrayvision``) and the same batch size:

- ``model_only``: ``encoder.forward`` on inputs already prepared and held in memory
  (what a user timing the bare model would measure): images per second, after one
  warm-up batch;
- ``ingest``: ``cxrstore.ingest.ingest`` end to end on real chest X-ray files (those of
  ``../shared/data/real-cxr``, repeated under distinct ids to reach ``--n`` images):
  read, sha256, decode, uniform preprocessing and the encoder's ``prepare`` in worker
  processes, ``forward`` in a background thread of this process (two batches deep),
  store writes and commits in the main thread.

``ratio = ingest / model_only``: 1.0 means the model never waits for decoding. Each is
run once (``--repeat`` for more, median reported). On the CPU both compete for the same
cores, so the ratio there measures contention more than pipelining.

    python benchmarks/bench_encode.py --quick
    python benchmarks/bench_encode.py --encoder torchxrayvision --n 96
    python benchmarks/bench_encode.py --full --device cuda --half --batch-size 64 --n 1024 --workers 14
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrstore import __version__
from cxrstore.datasets.csv_manifest import CsvManifest
from cxrstore.encoders.base import get_encoder
from cxrstore.ingest import ingest
from cxrstore.io.preprocess import preprocess
from cxrstore.io.read import read_image
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-cxr"


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


ENCODERS = ("medimageinsight", "torchxrayvision", "hf-vision", "open-clip", "elixr-v2")


def write_standin(name: str, work: Path, full: bool) -> tuple[Path, dict]:
    """Random weights for ``name`` in its real layout; returns (weights path, size description)."""
    if full and name not in ("medimageinsight", "torchxrayvision"):
        raise SystemExit(f"--full is available for medimageinsight and torchxrayvision, not {name}")
    if name == "medimageinsight":
        from cxrstore.encoders.medimageinsight import PUBLISHED_ARCH, REDUCED_ARCH, write_mii_standin

        arch = PUBLISHED_ARCH if full else REDUCED_ARCH
        path = write_mii_standin(work / "MedImageInsights", arch=arch, seed=0, text_encoder=False)
        return path, {k: arch[k] for k in ("embed_dims", "depths", "image_size")}
    if name == "torchxrayvision":
        from cxrstore.encoders.densenet import DENSENET121
        from cxrstore.encoders.xrv import TINY_ARCH, write_xrv_standin

        arch = DENSENET121 if full else TINY_ARCH
        keys = ("growth_rate", "block_config", "num_init_features", "bn_size")
        return write_xrv_standin(work / "xrv.pt", **{k: arch[k] for k in keys}), {k: arch[k] for k in keys}
    if name == "hf-vision":
        from cxrstore.encoders.hf_vision import write_hf_standin

        return write_hf_standin(work / "rad-dino"), {"model": "reduced Dinov2 (write_hf_standin defaults)"}
    if name == "open-clip":
        from cxrstore.encoders.openclip import write_openclip_standin

        return write_openclip_standin(work / "open-clip"), {"model": "reduced timm ViT (write_openclip_standin defaults)"}
    if name == "elixr-v2":
        from cxrstore.encoders.elixr import write_elixr_standin

        return write_elixr_standin(work / "cxr-foundation"), {"model": "stand-in SavedModels (write_elixr_standin)"}
    raise SystemExit(f"unknown encoder {name!r}; one of {', '.join(ENCODERS)}")


def model_only(encoder, prepared: list[np.ndarray], batch_size: int, device: str) -> float:
    """Images per second of ``forward`` alone on prepared inputs held in memory."""
    encoder.forward(prepared[:batch_size])  # warm-up
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(prepared), batch_size):
        encoder.forward(prepared[i : i + batch_size])
    _sync(device)
    return len(prepared) / (time.perf_counter() - started)


def end_to_end(encoder, work: Path, manifest: Path, root: Path, batch_size: int, workers: int) -> tuple[float, dict]:
    store = work / "store"
    if store.exists():
        shutil.rmtree(store)
    records = CsvManifest(manifest, root=root).records()
    report = ingest(store, records, encoder=encoder, batch_size=batch_size, workers=workers, commit_every=4096)
    if report.failed:
        raise SystemExit(f"ingest failed on {report.failed} files: {report.failures[:3]}")
    return report.images_per_second, report.to_json(max_failures=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="number of images (real files repeated under distinct ids)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--half", action="store_true", help="float16 model (cuda only)")
    parser.add_argument("--encoder", default="medimageinsight", choices=ENCODERS)
    parser.add_argument("--full", action="store_true", help="the published architecture instead of the reduced one (medimageinsight, torchxrayvision)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 images, batch 8")
    parser.add_argument("--images", type=Path, default=REAL_CXR, help="folder of chest X-ray files")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.batch_size = 16, 8
    files = sorted(p for p in args.images.iterdir() if p.is_file()) if args.images.is_dir() else []
    if not files:
        raise SystemExit(f"no image files in {args.images}")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CXRSTORE_CACHE", str(work / "cache"))
        weights, arch = write_standin(args.encoder, work, args.full)
        options = {"weights": weights, "device": args.device, **({"half": True} if args.half else {})}
        encoder = get_encoder(args.encoder, **options)
        names = [files[i % len(files)] for i in range(args.n)]
        manifest = work / "manifest.csv"
        manifest.write_text("image_id,path\n" + "".join(f"img{i:06d},{p.name}\n" for i, p in enumerate(names)))
        prep = encoder.preparer()
        cache = {p: prep(preprocess(read_image(p.read_bytes()))) for p in files}
        prepared = [cache[p] for p in names]

        model_runs, ingest_runs, last = [], [], {}
        for _ in range(args.repeat):  # alternate the two
            model_runs.append(model_only(encoder, prepared, args.batch_size, args.device))
            ips, last = end_to_end(encoder, work, manifest, args.images, args.batch_size, args.workers)
            ingest_runs.append(ips)
        mo, ie = statistics.median(model_runs), statistics.median(ingest_runs)

    result = {
        "benchmark": "encode",
        "encoder": args.encoder,
        "architecture": "published" if args.full else "reduced",
        "arch": arch,
        "dim": encoder.dim,
        "device": args.device,
        "half": args.half,
        "n_images": args.n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeat": args.repeat,
        "model_only_images_per_second": round(mo, 2),
        "ingest_images_per_second": round(ie, 2),
        "ratio": round(ie / mo, 3) if mo else None,
        "model_only_runs": [round(x, 2) for x in model_runs],
        "ingest_runs": [round(x, 2) for x in ingest_runs],
        "ingest_report": {k: last.get(k) for k in ("added", "failed", "seconds", "commits")},
        "files": [p.name for p in files],
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": _version("torch"),
            "tensorflow": _version("tensorflow"),
        },
        "cxrstore_version": __version__,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
