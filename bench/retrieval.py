"""Retrieval benchmark: FAISS index types on clustered embeddings (not uniform noise) of dim 256.

    .venv/bin/python bench/retrieval.py [--sizes 100000,1000000] [--dim 256] [--hnsw-max 200000]

For each size and index type: build seconds (train + add) and tuning seconds (to recall@10 >= 0.95 on
leave-one-out database queries), index memory (serialized size), single-query p50/p99 latency, batch-100
throughput, recall@10 against exact flat search on fresh perturbed queries, and the speed-up over exact flat
in the same run. Also the effect of faiss's `distance_compute_blas_threshold` on batched flat search.

HNSW's build is single-insert bound and slow on few cores: above --hnsw-max vectors it is not built; the
printout extrapolates its build time from the largest size measured (N log N) and says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radalign.retrieval import index as ix  # noqa: E402
from radalign.retrieval.build import build_tuned  # noqa: E402

from bench.common import Timer, table  # noqa: E402

KINDS = ("flat", "ivf-flat", "hnsw", "ivf-pq")


def queries_near(x: np.ndarray, n: int, seed: int = 123) -> np.ndarray:
    """Fresh queries: database points plus noise, re-normalised (new cases near known ones). [n, D]."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, x.shape[1]), dtype=np.float32) * (0.2 / np.sqrt(x.shape[1]))  # norm ~0.2
    q = x[rng.choice(len(x), n, replace=False)] + noise
    return ix.normalize(q)


def latency_ms(index, q: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None], k)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(index, q: np.ndarray, batch: int = 100, k: int = 10) -> float:
    with Timer() as t:
        for i in range(0, len(q), batch):
            index.search(q[i:i + batch], k)
    return len(q) / t.seconds


def index_bytes(index) -> int:
    faiss = ix.faiss_module()
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return Path(f.name).stat().st_size


def blas_effect(x: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """Batch-100 flat throughput with faiss's default BLAS threshold and with ours."""
    faiss = ix.faiss_module()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    out = []
    for value in (ix.FAISS_DEFAULT_BLAS_THRESHOLD, ix.BLAS_THRESHOLD):
        faiss.cvar.distance_compute_blas_threshold = value
        out.append(throughput(flat, q[:500]))
    faiss.cvar.distance_compute_blas_threshold = ix.BLAS_THRESHOLD
    return out[0], out[1]


def run_size(n: int, d: int, hnsw_max: int, hnsw_times: dict, n_lat: int, n_q: int) -> list[list]:
    print(f"\n== {n:,} vectors x {d} (clustered) ==", flush=True)
    with Timer() as t:
        x = ix.clustered_vectors(n, d, clusters=max(1000, n // 500), spread=1.0, seed=0)
        q = queries_near(x, n_q)
        _, truth = ix.exact_topk(x, q, 10)
    print(f"data + exact ground truth: {t.seconds:.1f}s", flush=True)
    slow, fast = blas_effect(x, q)
    print(f"flat batch-100 throughput: {slow:,.0f} q/s with blas threshold {ix.FAISS_DEFAULT_BLAS_THRESHOLD:,} "
          f"(faiss default), {fast:,.0f} q/s with {ix.BLAS_THRESHOLD}: {fast / slow:.1f}x", flush=True)
    rows, flat_p50, flat_qps = [], None, None
    for kind in KINDS:
        if kind == "hnsw" and n > hnsw_max:
            if hnsw_times:
                m, s = max(hnsw_times.items())
                est = s * (n / m) * np.log(n) / np.log(m)
                rows.append([f"{n:,}", kind, f"~{est:,.0f} (extrapolated)", "-", "-", "-", "-", "-", "-",
                             "not built (--hnsw-max)"])
            continue
        with Timer() as t:
            index, entry = build_tuned(x, kind=kind, recall_target=0.95)
        if kind == "hnsw":
            hnsw_times[n] = entry["build_seconds"]
        p50, p99 = latency_ms(index, q[:n_lat])
        qps = throughput(index, q)
        _, found = ix.search(index, q, 10)
        recall = ix.neighbour_recall(found, truth)
        if kind == "flat":
            flat_p50, flat_qps = p50, qps
        rows.append([f"{n:,}", entry["index_string"], f"{entry['build_seconds']:.1f}",
                     f"{entry['tuning']['seconds']:.1f}", f"{index_bytes(index) / 2**20:,.0f}",
                     f"{p50:.2f}", f"{p99:.2f}", f"{qps:,.0f}", f"{recall:.3f}",
                     f"{flat_p50 / p50:.1f}x / {qps / flat_qps:.1f}x {entry['params'] or ''}"])
        print(f"  {kind}: done in {t.seconds:.1f}s", flush=True)
        del index
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated database sizes")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="largest size HNSW is built at")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args(argv)
    faiss = ix.faiss_module()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, GPU: {ix.gpu_available()}")
    rows: list[list] = []
    hnsw_times: dict = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += run_size(n, args.dim, args.hnsw_max, hnsw_times, args.latency_queries, args.queries)
    print()
    print(table(["N", "index", "build s", "tune s", "MiB", "p50 ms", "p99 ms", "batch-100 q/s", "recall@10",
                 "speed-up vs flat (p50 / q/s), params"], rows))
    print("\nrecall@10: fresh perturbed queries vs exact flat; tuned to 0.95 on leave-one-out database queries.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
