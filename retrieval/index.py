"""FAISS indexes over L2-normalised embeddings (inner product = cosine): choose, build, tune, search.

The choice follows autofaiss's rules, reduced to what a case base of chest radiographs needs:
    exact `Flat`                      up to `flat_max` vectors (default 10^6) when it fits the memory budget
    `IVF{nlist},Flat`                 beyond that, when full vectors fit the budget
    `IVF{nlist},PQ{m}x4fs,Refine(Flat)`  when they do not: 4-bit fast-scan PQ codes (d/4 bytes a vector) in
                                      RAM, exact re-ranking from the memory-mapped full vectors (only the
                                      touched pages are resident)
`HNSW32` is available explicitly; it is not auto-chosen because its build is slow on few cores and its graph
costs ~260 bytes per vector on top of the vectors. Approximate indexes are tuned (nprobe / efSearch / k_factor)
to reach a recall target on leave-one-out queries drawn from the database itself.

Index ids are row numbers 0..N-1 (FAISS's own sequential ids), so no IDMap is needed: row i of the metadata
store is id i.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from radalign import RadalignError
from radalign.log import get_logger

log = get_logger("radalign.retrieval.index")

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq")
# faiss-cpu switches flat search from its SIMD loop to BLAS only for batches of >= this many queries; the
# default (128000 in 1.15) keeps batched flat search on the slow path. 16 is measured in bench/retrieval.py.
BLAS_THRESHOLD = 16
FAISS_DEFAULT_BLAS_THRESHOLD = 128_000
DEFAULT_FLAT_MAX = 1_000_000
HNSW_M = 32
# k-means wants >= 39 training points per centroid (FAISS warns below); more than 64 adds time, not quality.
MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 64
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def faiss_module():
    """`faiss`, configured once: the BLAS threshold above; a clear error when it is not installed."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise RadalignError("faiss is not installed; `pip install faiss-cpu` (or faiss-gpu with CUDA)") from None
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss


@contextlib.contextmanager
def _blas_threshold(value: int):
    """Temporarily change FAISS's BLAS threshold. Training uses the default: k-means over PQ sub-vectors
    (d=4) is twice as slow through BLAS (measured), while search of d>=64 vectors is far faster with it."""
    faiss = faiss_module()
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = value
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a CUDA device."""
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def parse_memory(text: str | int | float | None) -> int | None:
    """'4G', '512M', '1.5GB', 2**30 -> bytes; None/'' -> None (no budget)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise RadalignError(f"--memory-budget {text!r}: not a size; use e.g. 512M, 4G or a number of bytes")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised, float32, C-contiguous (what FAISS wants). [N, D] -> [N, D]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [N, 1]
    return x / np.maximum(norms, 1e-12)


# ----------------------------------------------------------------------------------------------------------
# Choosing an index.


@dataclass
class IndexPlan:
    """What to build: a FAISS factory string plus why, and the memory it is expected to take."""

    kind: str
    factory: str
    reason: str
    ram_bytes: int
    train_size: int = 0
    params: dict = field(default_factory=dict)


def _nlist(n: int) -> int:
    """IVF lists: a power of two near 4*sqrt(N) (autofaiss), but never fewer than 39 training points each."""
    target = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    return int(max(1, min(target, n // MIN_POINTS_PER_CENTROID)))


def _pq_m(d: int, n: int, budget: int | None) -> int:
    """4-bit PQ sub-quantizers: d/2 (d/4 bytes a vector) by default, fewer (an even divisor of d) when the
    budget demands."""
    options = [m for m in (d // 2, d // 4, d // 8, d // 16) if m >= 2 and m % 2 == 0 and d % m == 0] or [2]
    for m in options:
        if budget is None or n * (m // 2 + 8) <= 0.8 * budget:
            return m
    return options[-1]


def estimate_ram(kind: str, n: int, d: int, *, m: int = 0, nlist: int = 0) -> int:
    """Resident bytes of an index of `n` vectors of dim `d` (vectors + structure, not Python overhead)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return n * (d * 4 + HNSW_M * 2 * 4 + 16)  # level-0 links (2M ints) + upper levels/levels array
    if kind == "ivf-flat":
        return n * (d * 4 + 8) + nlist * d * 4  # codes + ids + centroids
    if kind == "ivf-pq":
        return n * (m // 2 + 8) + nlist * d * 4 + 16 * d * 4  # 4-bit codes + ids + centroids + PQ tables
    raise ValueError(kind)


def plan_index(n: int, d: int, kind: str = "auto", memory_budget: int | None = None,
               flat_max: int = DEFAULT_FLAT_MAX) -> IndexPlan:
    """The index to build for `n` vectors of dim `d`: an explicit `kind`, or the auto rule (module docstring)."""
    if kind not in INDEX_KINDS:
        raise RadalignError(f"--index-type {kind!r}: unknown; choose one of {', '.join(INDEX_KINDS)}")
    if n < 1:
        raise RadalignError("no vectors to index (the data gave 0 usable samples)")
    nlist = _nlist(n)
    m = _pq_m(d, n, memory_budget)
    train = min(n, nlist * TRAIN_POINTS_PER_CENTROID)
    flat_ram = estimate_ram("flat", n, d)
    if kind == "auto":
        fits = memory_budget is None or flat_ram <= memory_budget
        if n <= flat_max and fits:
            kind, reason = "flat", f"{n:,} vectors <= {flat_max:,}: exact search is affordable"
        elif memory_budget is None or estimate_ram("ivf-flat", n, d, nlist=nlist) <= memory_budget:
            kind, reason = "ivf-flat", (f"{n:,} vectors > {flat_max:,}: inverted lists, full vectors"
                                        if n > flat_max else "flat exceeds the budget; ivf-flat fits")
        else:
            kind, reason = "ivf-pq", (f"full vectors ({flat_ram / 2**20:,.0f} MiB) exceed the memory budget "
                                      f"({memory_budget / 2**20:,.0f} MiB): PQ codes + exact refine")
    else:
        reason = "chosen explicitly"
    if kind in ("ivf-flat", "ivf-pq") and nlist < 2:
        raise RadalignError(f"--index-type {kind}: {n} vectors are too few for inverted lists (need >= "
                            f"{2 * MIN_POINTS_PER_CENTROID}); use --index-type flat")
    if kind == "ivf-pq" and n < 16 * MIN_POINTS_PER_CENTROID:
        raise RadalignError(f"--index-type ivf-pq: {n} vectors are too few to train 4-bit PQ (need >= "
                            f"{16 * MIN_POINTS_PER_CENTROID}); use --index-type flat or ivf-flat")
    factory = {
        "flat": "Flat",
        "hnsw": f"HNSW{HNSW_M},Flat",
        "ivf-flat": f"IVF{nlist},Flat",
        # 4-bit fast-scan PQ rather than 8-bit PQ (+OPQ, autofaiss's choice): 8-bit sub-quantizers and OPQ train
        # far slower, and after the exact refine step neither raised recall@10 (bench/RESULTS.md, "retrieval").
        # Fast-scan search is SIMD-friendly too.
        "ivf-pq": f"IVF{nlist},PQ{m}x4fs,Refine(Flat)",
    }[kind]
    ram = estimate_ram(kind, n, d, m=m, nlist=nlist)
    if memory_budget is not None and ram > memory_budget:
        log.warning("%s needs about %.0f MiB, more than the budget of %.0f MiB", factory, ram / 2**20,
                    memory_budget / 2**20)
    return IndexPlan(kind, factory, reason, ram, train_size=0 if kind in ("flat", "hnsw") else train)


# ----------------------------------------------------------------------------------------------------------
# Building, tuning, searching.


def build_index(x: np.ndarray, plan: IndexPlan, *, seed: int = 0, use_gpu: bool | None = None):
    """Train (on a seeded subsample) and fill a CPU FAISS index from L2-normalised `x` [N, D]."""
    faiss = faiss_module()
    n, d = x.shape
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=plan.train_size, replace=False))] if plan.train_size < n else x
        _limit_training(index)
        with _blas_threshold(FAISS_DEFAULT_BLAS_THRESHOLD):
            _train(index, sample, use_gpu)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = 40
    index.add(x)
    return index


def _limit_training(index) -> None:
    """Cap PQ training work: FAISS's default (25 k-means iterations on 256 points per centroid for every
    sub-quantizer) dominates build time on few cores; the exact refine step recovers the small loss."""
    faiss = faiss_module()
    ivf = _ivf_of(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None:
        pq.cp.niter, pq.cp.max_points_per_centroid = 10, 64


def _train(index, sample: np.ndarray, use_gpu: bool) -> None:
    faiss = faiss_module()
    ivf = _ivf_of(index)
    if use_gpu and ivf is not None:
        # The coarse k-means is the costly part of training: run it on the GPU, keep the index on the CPU.
        clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        ivf.clustering_index = clustering_index
    index.train(np.ascontiguousarray(sample))


def _ivf_of(index):
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_params(index, params: dict) -> None:
    """Apply search-time parameters (`nprobe`, `efSearch`, `k_factor_rf`) by their FAISS AutoTune names."""
    faiss = faiss_module()
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores [Q, k] float32, ids [Q, k] int64; -1 where fewer exist)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    return index.search(q, k)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with a flat FAISS index (ground truth for recall). [Q, k] each."""
    faiss = faiss_module()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(np.ascontiguousarray(x, dtype=np.float32))
    return flat.search(np.ascontiguousarray(q, dtype=np.float32), k)


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """ANN quality, not retrieval quality: mean share of the exact top-k ids that the approximate index also
    returns in its top-k (both [Q, k]). (Retrieval Recall@K - a positive among the top K - is
    `radalign.metrics.recall_at_k`.)"""
    k = truth.shape[1]
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if len(hits) else 1.0


@dataclass
class TuneResult:
    params: dict
    recall: float
    target: float
    k: int
    queries: int
    seconds: float
    reached: bool
    tried: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _grid(index, plan: IndexPlan) -> list[dict]:
    """Parameter settings from cheapest to most expensive."""
    if plan.kind == "hnsw":
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512, 1024)]
    nlist = _ivf_of(index).nlist
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p < nlist] + [nlist]
    if plan.kind == "ivf-flat":
        return [{"nprobe": p} for p in probes]
    # ivf-pq + refine: each nprobe with growing re-ranking depth; cost ~ nprobe * N/nlist + k * k_factor.
    return [{"nprobe": p, "k_factor_rf": f} for p in probes for f in (2, 4, 8, 16)]


def tune(index, x: np.ndarray, plan: IndexPlan, *, target: float = 0.95, k: int = 10, queries: int = 500,
         seed: int = 0) -> TuneResult:
    """Cheapest search parameters whose neighbour recall@k (share of the exact top-k found) >= target.

    Queries are `queries` database vectors (seeded sample) with themselves left out of both result lists,
    so they behave like new cases near the data rather than exact duplicates of it.
    """
    t0 = time.perf_counter()
    n = x.shape[0]
    if plan.kind == "flat":
        return TuneResult({}, 1.0, target, k, 0, 0.0, True)
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(n, size=min(queries, n), replace=False))  # [Q]
    kk = min(k, n - 1)
    _, truth = exact_topk(x, x[qids], kk + 1)
    truth = _drop_self(truth, qids, kk)
    best, tried = None, []
    for params in _grid(index, plan):
        set_params(index, params)
        _, found = search(index, x[qids], kk + 1)
        r = neighbour_recall(_drop_self(found, qids, kk), truth)
        tried.append({**params, "recall": round(r, 4)})
        if best is None or r > best[1]:
            best = (params, r)
        if r >= target:
            best = (params, r)
            break
    params, r = best
    set_params(index, params)
    if r < target:
        log.warning("neighbour recall@%d (vs exact search) reached only %.3f (target %.3f) with %s", k, r, target,
                    params)
    return TuneResult(params, r, target, k, len(qids), time.perf_counter() - t0, r >= target, tried)


def _drop_self(ids: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its row, keep the first k. [Q, k+1] -> [Q, k]."""
    out = np.empty((len(qids), k), dtype=np.int64)
    for i, (row, q) in enumerate(zip(ids, qids)):
        kept = row[row != q][:k]
        out[i, : len(kept)] = kept
        out[i, len(kept):] = -1
    return out


def clustered_vectors(n: int, d: int, *, clusters: int = 1000, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """Synthetic embeddings with structure like real ones (tests and bench): L2-normalised, [n, d] float32.

    Uniform noise is the worst case of ANN search and unlike learned embeddings; these are Gaussian blobs
    around random centres with power-law sizes, so some regions are dense and some sparse.
    """
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((clusters, d)))  # [C, D]
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    assign = rng.choice(clusters, size=n, p=weights / weights.sum())  # [n]
    x = centres[assign] + rng.standard_normal((n, d), dtype=np.float32) * (spread / math.sqrt(d))
    return normalize(x)


__all__ = ["INDEX_KINDS", "BLAS_THRESHOLD", "IndexPlan", "TuneResult", "faiss_module", "gpu_available",
           "parse_memory", "normalize", "plan_index", "estimate_ram", "build_index", "set_params", "search",
           "exact_topk", "neighbour_recall", "tune", "clustered_vectors"]
