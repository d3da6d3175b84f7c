"""Part A of ``bench_retrieval``: key search over synthetic adapter-key pools.

For each pool (clustered keys at every N, then uniform random keys at one N) every method is built, its recall
measured against our exact search per query set, then its batch-1 latency and batch-64 throughput timed
round-robin with the others (``bench_utils.measure_interleaved``, process CPU time by default):

* ``exact``: ``lora_retriever.index.ExactIndex`` (numpy); ``exact-rowmajor``: the same before commit 7e21a6c
  (a benchmark-only reference for the key layout); ``faiss-flat``; ``faiss-hnsw`` with one graph per pool and
  ``ef_search`` swept on it.
* Query sets: ``near`` (noisy copies of keys), ``fresh`` (new draws from the key distribution), ``random``
  (uniform random directions; clustered pools only).
"""

from __future__ import annotations

import gc
import logging
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from bench_utils import Sampler, TimingConfig, measure_interleaved

from lora_retriever.index import FaissHNSWIndex, KeyIndex, build_index

logger = logging.getLogger("bench_retrieval")

RECALL_TARGET = 0.95
# The ef_search choice and the recall target use these query sets; `random` (uniform directions against
# clustered keys) is reported beside them.
IN_DISTRIBUTION = ("near", "fresh")

SEARCH_COLUMNS = [
    "data", "N", "method", "ef", "build_s", "build_cpu_s", "b1_us", "b1_vs_exact", "b64_us_per_q", "b64_qps",
    "r3_near", "r10_near", "r3_fresh", "r10_fresh", "s3_fresh", "r3_random", "r10_random", "s3_random",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "data", "N", "exact_b1_us", "rowmajor_b1_us", "flat_b1_us", "hnsw_ef", "hnsw_b1_us", "hnsw_r3", "hnsw_r10",
    "exact_over_hnsw", "exact_b64_qps", "flat_b64_qps", "hnsw_b64_qps", "hnsw_build_s", "hnsw_build_cpu_s",
    "random_r3", "random_s3", "random_ef", "peak_rss_gb",
]  # fmt: skip


@dataclass(frozen=True)
class RunSettings:
    """Process-wide settings of a run.

    Attributes:
        seed: base seed of the synthetic data.
        threads: threads of searches (FAISS OpenMP; numpy BLAS is limited by the caller).
        hnsw_threads: OpenMP threads of HNSW builds only.
        clock: ``"cpu"`` or ``"wall"`` (see ``bench_utils.TimingConfig``).
    """

    seed: int = 0
    threads: int = 1
    hnsw_threads: int = 2
    clock: str = "cpu"


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy(rng: np.random.Generator, base: np.ndarray, noise: float, chunk: int = 65_536) -> np.ndarray:
    """``normalise(base + noise · g / sqrt(dim))`` row by row, ``g ~ N(0, I)``: ``[n, dim]`` float32.

    The noise vector has norm ~``noise`` in high dimension, so ``cos(result, base_row) ~ 1 / sqrt(1 + noise²)``.
    """
    n, dim = base.shape
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        g = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = _normalise(base[start:stop] + (noise / np.sqrt(dim)) * g)
    return out


def uniform_keys(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``[n, dim]`` unit vectors uniform on the sphere."""
    return noisy(rng, np.zeros((n, dim), dtype=np.float32), 1.0)


def clustered_keys(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float) -> np.ndarray:
    """``[n, dim]`` unit keys, each a random centre plus isotropic noise of norm ``noise``."""
    assign = rng.integers(0, len(centres), n)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    chunk = 65_536
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = noisy(rng, centres[assign[start:stop]], noise)
    return out


def make_pool(data: str, n: int, cfg: dict[str, Any], seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Keys ``[n, dim]`` and the recall query sets ``{name: [q, dim]}``.

    Query sets: ``near`` = noisy copies of random keys (a query close to one adapter's key); ``fresh`` = new draws
    from the keys' distribution (clustered: a new point around a random centre); ``random`` = uniform random
    directions (a query unlike every key; for uniform keys it equals ``fresh`` and is left out).
    """
    dim, q = cfg["dim"], cfg["eval_queries"]
    rng = np.random.default_rng([seed, n, 0 if data == "clustered" else 1])
    queries: dict[str, np.ndarray] = {}
    if data == "clustered":
        centres = uniform_keys(rng, min(cfg["centres"], n), dim)
        keys = clustered_keys(rng, n, centres, cfg["key_noise"])
        queries["fresh"] = clustered_keys(rng, q, centres, cfg["key_noise"])
    else:
        keys = uniform_keys(rng, n, dim)
        queries["fresh"] = uniform_keys(rng, q, dim)
    queries = {"near": noisy(rng, keys[rng.integers(0, n, q)], cfg["query_noise"]), **queries}
    if data == "clustered":
        queries["random"] = uniform_keys(rng, q, dim)
    return keys, queries


def search_all(
    index: KeyIndex, queries: np.ndarray, k: int, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(sims, indices)`` ``[q, k]`` in chunks (exact search of 1M keys holds a ``[chunk, N]`` matrix)."""
    parts = [index.search(queries[s : s + chunk], k) for s in range(0, len(queries), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k``."""
    k = min(k, exact.shape[1])
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / k


def similarity_ratio(approx_sims: np.ndarray, exact_sims: np.ndarray, k: int) -> float:
    """Mean top-k similarity found / mean exact top-k similarity: how much worse the misses are (1 = none)."""
    return float(approx_sims[:, :k].mean() / exact_sims[:, :k].mean())


class RowMajorExactIndex(KeyIndex):
    """Benchmark-only reference: ``ExactIndex`` as it was before commit 7e21a6c, keys stored ``[N, dim]``.

    Its search multiplies by the transposed view ``keys.T``, which OpenBLAS runs as a transposed GEMV/GEMM,
    ~2x slower for single queries here than ``ExactIndex``'s contiguous ``[dim, N]`` copy. Kept to show the
    layout's cost in every run (a regression check); not part of the library.
    """

    kind = "exact-rowmajor"

    def __init__(self, keys: np.ndarray, model_id: str | None = None):
        super().__init__(keys, model_id)
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)  # [N, dim]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = queries @ self.keys.T  # [n, N]
        k_eff = min(k, self.size)
        if k_eff < self.size:
            part = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        else:
            part = np.broadcast_to(np.arange(self.size), (sims.shape[0], self.size))
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -part_sims), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        sims_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        idx_out = np.full((len(queries), k), -1, dtype=np.int64)
        sims_out[:, :k_eff], idx_out[:, :k_eff] = np.take_along_axis(sims, idx, axis=1), idx
        return sims_out, idx_out


def set_ef_search(index: FaissHNSWIndex, ef: int) -> None:
    # FaissHNSWIndex applies ef_search at build only; the sweep reuses one graph per N (the graph doesn't
    # depend on ef_search), so it sets the FAISS parameter directly.
    index.index.hnsw.efSearch = ef


def cycling_sampler(
    search: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], timing: TimingConfig, before=None
) -> Sampler:
    """Sampler timing ``search`` over ``batches`` in turn (distinct queries: no repeated-query cache effects).

    ``before`` (untimed) runs at the start of every sample, e.g. to set ef_search on a shared index.
    """
    state = {"i": 0}

    def sample(number: int) -> float:
        if before is not None:
            before()
        i, nb = state["i"], len(batches)
        start = timing.now()
        for j in range(number):
            search(batches[(i + j) % nb])
        elapsed = timing.now() - start
        state["i"] = (i + number) % nb
        return elapsed / number

    return sample


def timed_build(
    fn: Callable[[], KeyIndex], threads: int, search_threads: int
) -> tuple[KeyIndex, float, float]:
    """``(index, wall seconds, CPU seconds summed over threads)`` of one build with ``threads`` OpenMP threads."""
    faiss.omp_set_num_threads(threads)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        index = fn()
        return index, time.perf_counter() - wall, time.process_time() - cpu
    finally:
        faiss.omp_set_num_threads(search_threads)


def run_pool(data: str, n: int, cfg: dict[str, Any], run: RunSettings, timing: TimingConfig) -> list[dict]:
    """Every method on one pool: build, recall per query set, batch-1 latency and batch-64 throughput."""
    t0 = time.perf_counter()
    keys, query_sets = make_pool(data, n, cfg, run.seed)
    logger.info("%s N=%d: keys and queries generated in %.1f s", data, n, time.perf_counter() - t0)
    k_eval = min(10, n)
    indexes: dict[str, KeyIndex] = {}
    builds: dict[str, tuple[float, float]] = {}
    makers = {
        "exact": lambda: build_index(keys, "exact"),
        "exact-rowmajor": lambda: RowMajorExactIndex(keys),
        "faiss-flat": lambda: build_index(keys, "faiss-flat"),
    }
    for kind, make in makers.items():
        indexes[kind], *b = timed_build(make, 1, run.threads)
        builds[kind] = tuple(b)
    hnsw_threads = run.hnsw_threads
    t0 = time.perf_counter()
    hnsw, *b = timed_build(
        lambda: build_index(
            keys,
            "faiss-hnsw",
            m=cfg["m"],
            ef_search=cfg["ef_search"][0],
            ef_construction=cfg["ef_construction"],
        ),
        hnsw_threads,
        run.threads,
    )
    builds["faiss-hnsw"] = tuple(b)
    logger.info("%s N=%d: HNSW built in %.1f s wall, %.1f s CPU (%d threads)", data, n, *b, hnsw_threads)

    # Recall against our exact search (ground truth) for every query set.
    truth = {name: search_all(indexes["exact"], q, k_eval) for name, q in query_sets.items()}
    quality = {"exact": _quality_cols(truth, truth)}
    for kind in ("exact-rowmajor", "faiss-flat"):
        found = {name: search_all(indexes[kind], q, k_eval) for name, q in query_sets.items()}
        quality[kind] = _quality_cols(found, truth)
    for ef in cfg["ef_search"]:
        set_ef_search(hnsw, ef)
        found = {name: search_all(hnsw, q, k_eval) for name, q in query_sets.items()}
        quality[f"hnsw_ef{ef}"] = _quality_cols(found, truth)

    # Latency (batch 1) and throughput (batches of `batch`), all methods interleaved round-robin.
    lat_pool = np.concatenate(list(query_sets.values()))
    rng = np.random.default_rng([run.seed, n, 7])
    lat_pool = lat_pool[rng.permutation(len(lat_pool))]
    singles = [
        np.ascontiguousarray(lat_pool[i : i + 1]) for i in range(min(cfg["latency_queries"], len(lat_pool)))
    ]
    nb = max(1, min(4, len(lat_pool) // cfg["batch"]))
    batches = [np.ascontiguousarray(lat_pool[i * cfg["batch"] : (i + 1) * cfg["batch"]]) for i in range(nb)]
    samplers: dict[str, Sampler] = {}
    methods = ["exact", "exact-rowmajor", "faiss-flat"] + [f"hnsw_ef{ef}" for ef in cfg["ef_search"]]
    for method in methods:
        if method.startswith("hnsw"):
            index, ef = hnsw, int(method.removeprefix("hnsw_ef"))
            before = lambda ef=ef: set_ef_search(hnsw, ef)  # noqa: E731
        else:
            index, before = indexes[method], None
        search = lambda q, index=index: index.search(q, 3)  # noqa: E731
        samplers[f"{method}|b1"] = cycling_sampler(search, singles, timing, before)
        samplers[f"{method}|b{cfg['batch']}"] = cycling_sampler(search, batches, timing, before)
    t0 = time.perf_counter()
    times = measure_interleaved(samplers, timing)
    logger.info("%s N=%d: timings in %.1f s", data, n, time.perf_counter() - t0)

    rows = []
    exact_b1 = times["exact|b1"]
    for method in methods:
        kind = "faiss-hnsw" if method.startswith("hnsw") else method
        b1, bb = times[f"{method}|b1"], times[f"{method}|b{cfg['batch']}"]
        rows.append(
            {
                "data": data,
                "N": n,
                "method": kind,
                "ef": int(method.removeprefix("hnsw_ef")) if kind == "faiss-hnsw" else None,
                "build_s": builds[kind][0],
                "build_cpu_s": builds[kind][1],
                "build_threads": hnsw_threads if kind == "faiss-hnsw" else 1,
                "b1_us": b1 * 1e6,
                "b1_vs_exact": exact_b1 / b1,
                "b64_us_per_q": bb / len(batches[0]) * 1e6,
                "b64_qps": len(batches[0]) / bb,
                **quality[method],
            }
        )
    return rows  # the keys and indexes are freed on return (the caller collects)


def _quality_cols(found: dict[str, tuple], truth: dict[str, tuple]) -> dict[str, float]:
    cols = {}
    for name, (sims, idx) in found.items():
        cols[f"r3_{name}"] = recall(idx, truth[name][1], 3)
        cols[f"r10_{name}"] = recall(idx, truth[name][1], 10)
        cols[f"s3_{name}"] = similarity_ratio(sims, truth[name][0], 3)
    return cols


def min_recall(row: dict[str, Any], k: int, sets: Sequence[str] = IN_DISTRIBUTION) -> float:
    """Worst recall@k over the query sets ``sets`` that ``row`` has."""
    return min(row[f"r{k}_{name}"] for name in sets if row.get(f"r{k}_{name}") is not None)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data, N): exact / flat / HNSW at the smallest ef with recall@3 >= 0.95 on near and fresh queries."""
    out = []
    for key in dict.fromkeys((r["data"], r["N"]) for r in rows):
        cell = {(r["method"], r["ef"]): r for r in rows if (r["data"], r["N"]) == key}
        exact, rowmajor, flat = (
            cell[("exact", None)],
            cell[("exact-rowmajor", None)],
            cell[("faiss-flat", None)],
        )
        hnsw = [r for (m, _), r in cell.items() if m == "faiss-hnsw"]
        ok = [r for r in hnsw if min_recall(r, 3) >= RECALL_TARGET]
        pick = ok[0] if ok else hnsw[-1]
        ok_random = [r for r in hnsw if r.get("r3_random") is not None and r["r3_random"] >= RECALL_TARGET]
        out.append(
            {
                "data": key[0],
                "N": key[1],
                "exact_b1_us": exact["b1_us"],
                "rowmajor_b1_us": rowmajor["b1_us"],
                "flat_b1_us": flat["b1_us"],
                "hnsw_ef": pick["ef"] if ok else f"none<={pick['ef']}",
                "hnsw_b1_us": pick["b1_us"],
                "hnsw_r3": min_recall(pick, 3),
                "hnsw_r10": min_recall(pick, 10),
                "exact_over_hnsw": exact["b1_us"] / pick["b1_us"],
                "exact_b64_qps": exact["b64_qps"],
                "flat_b64_qps": flat["b64_qps"],
                "hnsw_b64_qps": pick["b64_qps"],
                "hnsw_build_s": pick["build_s"],
                "hnsw_build_cpu_s": pick["build_cpu_s"],
                "random_r3": pick.get("r3_random"),
                "random_s3": pick.get("s3_random"),
                "random_ef": (ok_random[0]["ef"] if ok_random else f"none<={hnsw[-1]['ef']}")
                if pick.get("r3_random") is not None
                else None,
                "peak_rss_gb": exact.get("peak_rss_gb"),
                "recall_reached": bool(ok),
            }
        )
    return out


def run_search(cfg: dict[str, Any], run: RunSettings) -> tuple[list[dict], list[dict]]:
    """Part A over every pool (clustered at each N, then uniform): ``(rows per method, summary per pool)``."""
    timing = TimingConfig(cfg["repeats"], cfg["warmup"], cfg["min_time_s"], clock=run.clock)
    runs = [("clustered", n) for n in cfg["n_values"]] + [("uniform", cfg["uniform_n"])]
    rows: list[dict[str, Any]] = []
    for data, n in runs:
        t0 = time.perf_counter()
        cell = run_pool(data, n, cfg, run, timing)
        gc.collect()  # free this N's keys and indexes (1M: ~5 GB) before the next
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        for r in cell:
            r["peak_rss_gb"] = rss
        rows += cell
        print(f"  {data:<9} N={n:>9,}: {time.perf_counter() - t0:6.1f} s", flush=True)
    return rows, summarise(rows)
