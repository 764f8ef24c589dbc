"""Benchmark: cxrstore's cluster pipeline against scanpy's, on the same vectors.

For each size N x D a synthetic 20-cluster mixture (overlapping clusters in a 16-d latent
space, mapped to D dimensions with isotropic noise, L2-normalised) is written to a
cxrstore store. Then, after warming up numba (pynndescent, umap-learn) in this process
for both tools on a small set:

- cxrstore: ``cxrstore.analysis.cluster.cluster`` on the store (cosine kNN k=15
  streamed from the store, exact or, with ``--method ivf`` / ``exact,ivf``, approximate
  with its recall calibrated to 0.99; UMAP connectivities, igraph Leiden, seeded UMAP
  from the precomputed neighbours, tables; plots off). With two methods, both run on
  the same store and scanpy runs once (``cxrstore`` and ``cxrstore_ivf`` in the JSON);
- scanpy: ``pp.neighbors(n_neighbors=16, metric="cosine", use_rep="X")`` (16 counts the
  point itself, so both graphs have 15 neighbours a point), ``tl.leiden`` default
  (leidenalg flavour, random_state=0), ``tl.umap`` (random_state=0), on the in-memory
  array (scanpy has no store to stream from).

Quality: kNN recall@15 against the exact graph (cxrstore's graphs are checked against an
independent in-memory FAISS search of a 500-row sample, the approximate one's recall is
that sample's), ARI and NMI of each
partition against the mixture labels, modularity of each partition on its own graph.

The machine's float32 matrix-multiply rate (numpy, 4096 cubed, best of 3) is measured
in the same run; the exact kNN rate is reported as the rate of an all-pairs product
(2 N^2 D / seconds, what a plain flat search performs: cxrstore computes each block pair
once, so it does half of it) and as the arithmetic actually performed.

``--memory-rows``: a separate subprocess computes the exact kNN graph of a store larger
than the address-space limit it runs under (``RLIMIT_AS``), and reports its peak RSS
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` is not used: after fork it starts from the
parent's peak) and peak address space (``VmPeak``, which includes about 0.9 GB of mapped
libraries, thread arenas and numba's JIT before any data is read: hence a 1.6 GiB limit
for a 1.97 GB store by default). The child runs with ``MALLOC_ARENA_MAX=2``: zarr reads
the chunks of a batch in a pool of threads, and glibc reserves 64 MB of address space
for each thread's malloc arena, which counts against ``RLIMIT_AS`` though it is never
used (without it the run stops with a MemoryError at 1.6 GiB).

    python benchmarks/bench_cluster.py --quick
    nice -n 5 python benchmarks/bench_cluster.py --sizes 20000x1024,50000x1024,20000x24576 --method exact,ivf --out bench-out/cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from cxrstore.analysis.cluster import KNN_MEMORY_MB, cluster
from cxrstore.analysis.knn import exact_knn, recall, selection_source
from cxrstore.store.store import RowData, Store, open_writer

PROV = {"encoder": {"encoder": "bench-mixture", "version": "1", "params": {}, "weights_sha256": "0" * 64}, "preprocess": {}}


def mixture(n: int, d: int, *, clusters: int = 20, seed: int = 0, latent: int = 16, sigma: float = 0.7, iso: float = 0.5):
    """Overlapping Gaussian clusters in a ``latent``-d space, mapped to ``d`` dims plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent))
    y = rng.integers(0, clusters, n)
    w = (rng.standard_normal((latent, d)) / np.sqrt(latent)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 2048):
        hi = min(n, lo + 2048)
        z = (centres[y[lo:hi]] + sigma * rng.standard_normal((hi - lo, latent))).astype(np.float32)
        block = z @ w + iso * rng.standard_normal((hi - lo, d), dtype=np.float32)
        x[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, y


def write_store(path: Path, x: np.ndarray, *, commit_rows: int = 4096) -> Store:
    n, d = x.shape
    with open_writer(path) as w:
        w.ensure_model("m", {**PROV, "native_shape": [d]}, dim=d)
        for lo in range(0, n, commit_rows):
            hi = min(n, lo + commit_rows)
            rows = [w.add_row(RowData(image_id=f"i{i}", patient_id=f"p{i // 3}")) for i in range(lo, hi)]
            w.add_vectors("m", rows, x[lo:hi])
            w.commit()
    return Store(path)


def matmul_rate(size: int = 4096, repeats: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def scanpy_pipeline(x: np.ndarray, *, seed: int = 0) -> dict:
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(x)
    out: dict = {}
    t = time.perf_counter()
    sc.pp.neighbors(adata, n_neighbors=16, use_rep="X", metric="cosine", random_state=seed)
    out["neighbors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.tl.leiden(adata, random_state=seed)
    out["leiden_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sc.tl.umap(adata, random_state=seed)
    out["umap_s"] = time.perf_counter() - t
    out["total_s"] = out["neighbors_s"] + out["leiden_s"] + out["umap_s"]
    # each row's stored neighbours, self dropped, nearest first (scanpy 1.11 with
    # pynndescent 0.6 stores more than n_neighbors - 1 entries a row, so cut at 15)
    dist = adata.obsp["distances"].tocsr()
    n = x.shape[0]
    counts = np.diff(dist.indptr)
    idx = np.full((n, 15), -1, np.int64)
    for i in range(n):
        row = dist.indices[dist.indptr[i] : dist.indptr[i + 1]]
        vals = dist.data[dist.indptr[i] : dist.indptr[i + 1]]
        row = row[np.argsort(vals, kind="stable")]
        row = row[row != i][:15]
        idx[i, : row.size] = row
    out["stored_neighbors_per_row"] = [int(counts.min()), int(counts.max())]
    out["_indices"] = idx
    out["_labels"] = adata.obs["leiden"].astype(int).to_numpy()
    out["_connectivities"] = adata.obsp["connectivities"]
    out["clusters"] = int(out["_labels"].max() + 1)
    return out


def warm_up(tmp: Path) -> float:
    """Compile numba code of both tools (pynndescent, umap-learn) once, untimed.

    6,000 rows: below about 4,096 umap-learn and scanpy take other code paths, and a
    warm-up there left pynndescent's compile (about 45 s) inside scanpy's first timing.
    """
    t = time.perf_counter()
    x, _ = mixture(6000, 256, seed=99)
    store = write_store(tmp / "warm", x)
    cluster(store, model="m", k=15, seed=0, labels=[], reuse_graph=False)
    scanpy_pipeline(x)
    shutil.rmtree(tmp / "warm")
    return time.perf_counter() - t


def modularity_of(conn, labels: np.ndarray) -> float:
    import igraph
    import scipy.sparse as sp

    upper = sp.triu(conn, k=1).tocoo()
    g = igraph.Graph(n=conn.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    return float(g.modularity(labels.tolist(), weights=upper.data.tolist()))


def knn_rate(store: Store, n: int, d: int, *, memory_mb: float, repeats: int) -> dict:
    """Exact kNN from the store alternated with the matmul measurement; per-pair ratios."""
    pairs = []
    for _ in range(repeats):
        mm = matmul_rate(repeats=2)
        sel = store.select(model="m")
        t = time.perf_counter()
        g = exact_knn(selection_source(sel), n, k=15, memory_mb=memory_mb)
        sec = time.perf_counter() - t
        pairs.append({
            "matmul_gflops": mm / 1e9, "knn_s": sec, "knn_all_pairs_gflops": 2.0 * n * n * d / sec / 1e9,
            "knn_performed_gflops": g.stats["gemm_flops"] / sec / 1e9,
            "fraction_all_pairs": 2.0 * n * n * d / sec / mm, "fraction_performed": g.stats["gemm_flops"] / sec / mm,
        })
    return {"pairs": pairs, **{f"median_{k}": float(np.median([p[k] for p in pairs])) for k in pairs[0]}}


def flat_reference(x: np.ndarray, size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of rows and their exact 15 neighbours by an in-memory FAISS flat search."""
    n = x.shape[0]
    sample = np.sort(np.random.default_rng(1).choice(n, size=min(n, size), replace=False))
    _, fi = faiss.knn(x[sample], x, 16, metric=faiss.METRIC_INNER_PRODUCT)
    return sample, np.array([[j for j in row if j != s][:15] for row, s in zip(fi, sample)])


def cxrstore_runs(
    store: Store, x: np.ndarray, y: np.ndarray, *, method: str, seed: int, memory_mb: float, repeats: int,
    reference: tuple[np.ndarray, np.ndarray],
) -> dict:
    """cxrstore's pipeline with one kNN method: times, kNN rate, recall, partition quality."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from cxrstore.analysis.cluster import connectivity_graph as cg
    from cxrstore.store.results import load_result

    n, d = x.shape
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        rep_c = cluster(store, model="m", k=15, seed=seed, labels=[], embed=True, reuse_graph=False, memory_mb=memory_mb,
                        method=method)  # type: ignore[arg-type]
        wall = time.perf_counter() - t
        secs = rep_c.summary["seconds"]
        runs.append({"total_s": wall, **{f"{k}_s": v for k, v in secs.items()}, "knn_gflops_performed": rep_c.summary["knn"]["gflops_per_s"]})
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    out: dict = {"knn_method": method, "runs": runs, "median": med}
    out["knn_all_pairs_gflops"] = 2.0 * n * n * d / med["knn_s"] / 1e9
    if method == "ivf":
        for key in ("nlist", "nprobe", "pairs_fraction", "passes", "calibration"):
            out[key] = rep_c.knn_result.summary.get(key)
    knn = load_result(Store(store.path), "knn", rep_c.knn_result.name)
    idx = knn.array("neighbors")
    # recall on a sample against an independent in-memory FAISS flat search
    sample, fi = reference
    out["knn_recall_vs_faiss_flat_sample"] = recall(idx[sample], fi)
    if method != "exact":
        out["knn_recall_own_estimate"] = rep_c.summary["knn"].get("recall_sample")
    clusters = rep_c.clusters
    conn = cg(np.searchsorted(knn.array("rows"), idx), knn.array("sims"))
    out.update({
        "clusters": int(clusters.max() + 1),
        "ari": adjusted_rand_score(y, clusters), "nmi": normalized_mutual_info_score(y, clusters),
        "modularity_own_graph": modularity_of(conn, clusters),
        "_indices": idx, "_conn": conn,
    })
    return out


def one_size(
    n: int, d: int, tmp: Path, *, seed: int, skip_scanpy: bool, memory_mb: float, repeats: int, rate_repeats: int = 0,
    methods: tuple[str, ...] = ("exact",),
) -> dict:
    """One size: cxrstore with each kNN method, then scanpy once, on the same vectors.

    Results: ``cxrstore`` (the first method) and ``cxrstore_<method>`` for the others,
    each with its ``time_ratio_over_scanpy``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t = time.perf_counter()
    x, y = mixture(n, d, seed=seed)
    store = write_store(tmp / f"s{n}x{d}", x)
    res: dict = {"n": n, "dim": d, "setup_s": time.perf_counter() - t, "store_bytes": int(n * d * 4)}
    if rate_repeats:
        res["knn_rate"] = knn_rate(store, n, d, memory_mb=memory_mb, repeats=rate_repeats)
    res["matmul_gflops_before"] = matmul_rate() / 1e9
    sample, fi = flat_reference(x)
    per_method = {}
    for method in methods:
        per_method[method] = cxrstore_runs(store, x, y, method=method, seed=seed, memory_mb=memory_mb, repeats=repeats,
                                           reference=(sample, fi))
    sc_runs = [scanpy_pipeline(x, seed=seed) for _ in range(repeats)] if not skip_scanpy else []
    res["matmul_gflops_after"] = matmul_rate() / 1e9
    mm = max(res["matmul_gflops_before"], res["matmul_gflops_after"])
    for out in per_method.values():
        out["knn_fraction_of_matmul_all_pairs"] = out["knn_all_pairs_gflops"] / mm
        out["knn_fraction_of_matmul_performed"] = out["median"]["knn_gflops_performed"] / mm
    # the exact graph (when computed) is the reference for scanpy's recall; else the sample
    exact = per_method.get("exact")
    if sc_runs:
        smed = {k: float(np.median([r[k] for r in sc_runs])) for k in ("neighbors_s", "leiden_s", "umap_s", "total_s")}
        s = sc_runs[-1]
        ref_conn = (exact or per_method[methods[0]])["_conn"]
        res["scanpy"] = {
            "runs": [{k: r[k] for k in ("neighbors_s", "leiden_s", "umap_s", "total_s")} for r in sc_runs],
            "median": smed, "stored_neighbors_per_row": s["stored_neighbors_per_row"], "clusters": s["clusters"],
            "knn_recall": recall(s["_indices"], exact["_indices"]) if exact else recall(s["_indices"][sample], fi),
            "knn_recall_vs_faiss_flat_sample": recall(s["_indices"][sample], fi),
            "ari": adjusted_rand_score(y, s["_labels"]), "nmi": normalized_mutual_info_score(y, s["_labels"]),
            "modularity_own_graph": modularity_of(s["_connectivities"], s["_labels"]),
            "modularity_on_cxrstore_graph": modularity_of(ref_conn, s["_labels"]),
        }
    for i, method in enumerate(methods):
        out = per_method[method]
        out.pop("_conn")
        out.pop("_indices")
        out["knn_recall"] = 1.0 if method == "exact" else out["knn_recall_vs_faiss_flat_sample"]
        if sc_runs:
            out["time_ratio_over_scanpy"] = out["median"]["total_s"] / res["scanpy"]["median"]["total_s"]
            out["time_ratio_runs"] = [c["total_s"] / s_["total_s"] for c, s_ in zip(out["runs"], sc_runs)]
        res["cxrstore" if i == 0 else f"cxrstore_{method}"] = out
    if sc_runs:
        res["time_ratio_cxrstore_over_scanpy"] = res["cxrstore"]["time_ratio_over_scanpy"]
    shutil.rmtree(store.path)
    return res


MEMORY_CHILD = r"""
import json, resource, sys, time
limit = int(sys.argv[2])
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[3])
from cxrstore.store.store import Store
from cxrstore.analysis.knn import exact_knn, selection_source
sel = Store(sys.argv[1]).select(model="m")
t = time.perf_counter()
g = exact_knn(selection_source(sel), len(sel), k=15, memory_mb=float(sys.argv[4]))
status = open("/proc/self/status").read()
vm = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(("VmPeak", "VmHWM"))}
print(json.dumps({"seconds": time.perf_counter() - t, "vm_peak_bytes": vm.get("VmPeak"), "peak_rss_bytes": vm.get("VmHWM"),
                  "block_rows": g.stats["block_rows"], "passes": g.stats["passes"], "gflops_performed": g.stats["gflops_per_s"]}))
"""


def memory_run(n: int, d: int, tmp: Path, *, limit_bytes: int, memory_mb: float) -> dict:
    x, _ = mixture(n, d, seed=5)
    store = write_store(tmp / "mem", x)
    ref_rows = np.array([0, n // 2, n - 1])
    del x
    size = sum(f.stat().st_size for f in (store.path / "store.zarr" / "models").rglob("*") if f.is_file())
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(store.path), str(limit_bytes), str(Path(__file__).resolve().parents[1]), str(memory_mb)],
        capture_output=True, text=True, check=False, env={**os.environ, "MALLOC_ARENA_MAX": "2"},
    )
    out = {"n": n, "dim": d, "vector_bytes_on_disk": size, "rlimit_as_bytes": limit_bytes, "memory_mb": memory_mb, "returncode": proc.returncode,
           "malloc_arena_max": 2}
    if proc.returncode == 0:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        out["stderr_tail"] = proc.stderr[-2000:]
    del ref_rows
    shutil.rmtree(store.path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000x1024,50000x1024,20000x24576", help="comma-separated NxD")
    ap.add_argument("--quick", action="store_true", help="small smoke run (3000x256, memory 2000x24576 under 1.6 GiB)")
    ap.add_argument("--repeats", type=int, default=1, help="alternated repeats per size (median reported)")
    ap.add_argument("--memory-mb", type=float, default=KNN_MEMORY_MB, help="cxrstore's kNN block memory (cluster's default)")
    ap.add_argument("--memory-rows", default="20000x24576", help="NxD of the store for the memory-limit run ('' to skip)")
    ap.add_argument("--memory-limit-gb", type=float, default=1.6, help="RLIMIT_AS of the memory-limit run")
    ap.add_argument("--memory-run-mb", type=float, default=128.0, help="cxrstore's kNN block memory in the memory-limit run")
    ap.add_argument("--skip-scanpy", action="store_true")
    ap.add_argument("--rate-repeats", type=int, default=0, help="exact kNN alternated with matmul, per size")
    ap.add_argument("--method", default="exact", help="cxrstore's kNN graph: exact, ivf, or both (exact,ivf; scanpy runs once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.memory_rows, args.memory_limit_gb = "3000x256", "2000x24576", 1.6
    methods = tuple(m for m in args.method.split(",") if m)
    bad = [m for m in methods if m not in ("exact", "ivf")]
    if bad or not methods:
        ap.error(f"--method: exact, ivf or both, got {args.method!r}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=args.tmp))
    report: dict = {
        "benchmark": "cluster",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()},
        "args": vars(args),
    }
    try:
        report["warm_up_s"] = warm_up(tmp)
        report["results"] = []
        for spec in [s for s in args.sizes.split(",") if s]:
            n, d = (int(v) for v in spec.lower().split("x"))
            r = one_size(n, d, tmp, seed=args.seed, skip_scanpy=args.skip_scanpy, memory_mb=args.memory_mb, repeats=args.repeats,
                         rate_repeats=args.rate_repeats, methods=methods)
            report["results"].append(r)
            emit(report, args.out, echo=False)
            print(json.dumps({"done": spec, **{f"{m}_total_s": r["cxrstore" if i == 0 else f"cxrstore_{m}"]["median"]["total_s"] for i, m in enumerate(methods)},
                              "scanpy_total_s": r.get("scanpy", {}).get("median", {}).get("total_s")}), file=sys.stderr, flush=True)
        if args.memory_rows:
            n, d = (int(v) for v in args.memory_rows.lower().split("x"))
            report["memory"] = memory_run(n, d, tmp, limit_bytes=int(args.memory_limit_gb * 2**30), memory_mb=args.memory_run_mb)
        report["machine"]["load_avg_end"] = os.getloadavg()
        report["peak_rss_bytes_main"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
