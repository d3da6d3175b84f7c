#!/usr/bin/env python
"""Benchmark adapter retrieval (key search) and adapter fusion on CPU.

A. Key search (``lora_retriever.index``): query latency (batch 1) and throughput (batches of 64) against pools of
   N synthetic 384-d keys (the size of all-MiniLM-L6-v2 embeddings) for ``exact`` (our numpy ``ExactIndex``),
   ``faiss-flat`` and ``faiss-hnsw`` (M=32, ef_search swept); build time; recall@3 / recall@10 of HNSW against
   exact ground truth. Keys are *clustered* (a few thousand random centres plus noise), like embeddings of
   task descriptions; HNSW is also run on *uniform* random keys, its worst case, so nobody is misled.
B. Fusion (``lora_retriever.fusion.fuse``) of k=3 random SmolLM2-135M-sized adapters (r=8 on all 7 linear
   projections of all 30 layers) per method, against PEFT-style dense baselines, plus ``FusedAdapter.save``.
C. A targets block: measured value, threshold, PASS / MISS.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_retrieval.py --quick   # N <= 100k, smoke check (~2 min)
    .venv/bin/python benchmarks/bench_retrieval.py           # N up to 1M (~20 min; the 1M HNSW build dominates)

Results: ``<out-dir>/retrieval.{md,json}`` (``retrieval_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run from a checkout without relying on the editable install's package list (it may predate lora_retriever/).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_utils import (  # noqa: E402
    Sampler,
    Target,
    TimingConfig,
    block,
    machine_info,
    measure_interleaved,
    render_table,
    setup_logging,
    write_json,
)
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from lora_retriever.fusion import FusedAdapter, LoraModuleWeights, LoraWeights, fuse  # noqa: E402
from lora_retriever.index import FaissHNSWIndex, KeyIndex, build_index  # noqa: E402

logger = logging.getLogger("bench_retrieval")

# SmolLM2-135M linear layers: name -> (in_features, out_features); 30 decoder layers.
SMOLLM2_LAYERS = 30
SMOLLM2_SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}

EXACT_MS_TARGET, HNSW_MS_TARGET, RECALL_TARGET = 1.0, 1.0, 0.95
EXACT_TARGET_N, HNSW_TARGET_N = 10_000, 1_000_000
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
FUSION_COLUMNS = [
    "method", "options", "fuse_ms", "vs_cat", "rank", "max_trunc_err", "save_ms", "file_mb", "note",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Arguments and settings.
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="N up to 100k, fewer repeats: a smoke check (~2 min)")
    p.add_argument("--threads", type=int, default=1, help="search / fusion threads (torch, BLAS, OpenMP)")
    p.add_argument(
        "--hnsw-threads",
        "--hnsw_threads",
        dest="hnsw_threads",
        type=int,
        default=2,
        help="OpenMP threads for HNSW *builds* only (default 2: a one-thread 1M build takes ~20 min CPU "
        "here); searches always use --threads",
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu (default): process CPU time, immune to being descheduled on shared cores (needs --threads "
        "1); wall: perf_counter. Builds are always reported in both",
    )
    p.add_argument(
        "--n-values", type=int, nargs="+", help="pool sizes (default 10 1000 10000 100000 1000000)"
    )
    p.add_argument("--uniform-n", type=int, help="pool size of the uniform-random HNSW run (default 100000)")
    p.add_argument("--dim", type=int, default=384, help="key dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--centres", type=int, default=2000, help="cluster centres of the clustered keys")
    p.add_argument(
        "--key-noise",
        type=float,
        default=0.8,
        help="norm of the isotropic noise added to a unit centre (0.8: cos(key, centre) ~ 0.78, "
        "cos between keys of one cluster ~ 0.6, of different clusters ~ 0)",
    )
    p.add_argument("--query-noise", type=float, default=0.3, help="noise norm of the near-key query copies")
    p.add_argument("--m", type=int, default=32, help="HNSW M")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW efConstruction (project default)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128], help="ef_search sweep")
    p.add_argument("--eval-queries", type=int, help="queries per recall query set (default 500; 200 quick)")
    p.add_argument(
        "--latency-queries", type=int, default=256, help="distinct queries cycled in batch-1 timing"
    )
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=int, help="timed repeats (median; default 7, 3 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    p.add_argument("--skip-search", action="store_true", help="skip part A")
    p.add_argument("--skip-fusion", action="store_true", help="skip part B")
    p.add_argument("--k", type=int, default=3, help="adapters fused (part B)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank of the fused adapters (part B)")
    p.add_argument("--density", type=float, default=0.5, help="density of ties / dare_* (part B)")
    p.add_argument(
        "--dense-svd-layers",
        type=int,
        help="layers the slow PEFT-style dense SVD baseline runs on, scaled to 30 (default 30; 3 with --quick)",
    )
    p.add_argument(
        "--out-dir", type=Path, default=here / "results", help="where results go (default benchmarks/results)"
    )
    p.add_argument(
        "--tmp-dir",
        type=Path,
        help="parent of the temporary save() directory (default: the system's tempdir)",
    )
    p.add_argument("--seed", type=int, default=0)
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true")
    verbosity.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    positive = {"--threads": args.threads, "--hnsw-threads": args.hnsw_threads, "--dim": args.dim,
                "--centres": args.centres, "--m": args.m, "--batch": args.batch, "--k": args.k, "--r": args.r,
                "--latency-queries": args.latency_queries}  # fmt: skip
    bad = {flag: v for flag, v in positive.items() if v < 1}
    if bad:
        p.error(f"these flags must be positive integers: {bad}")
    if any(n < 1 for n in (args.n_values or [])) or any(ef < 1 for ef in args.ef_search):
        p.error("--n-values and --ef-search must be positive integers")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu sums the CPU time of all threads; with --threads > 1 use --clock wall")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "mode": "quick" if quick else "full",
        "threads": args.threads,
        "hnsw_build_threads": args.hnsw_threads,
        "clock": args.clock,
        "seed": args.seed,
        "search": {
            "n_values": args.n_values or ([10, 1_000, 10_000, 100_000] if quick else [10, 1_000, 10_000, 100_000, 1_000_000]),
            "uniform_n": args.uniform_n or (10_000 if quick else 100_000),
            "dim": args.dim,
            "centres": args.centres,
            "key_noise": args.key_noise,
            "query_noise": args.query_noise,
            "m": args.m,
            "ef_construction": args.ef_construction,
            "ef_search": sorted(set(args.ef_search)),
            "eval_queries": args.eval_queries or (200 if quick else 500),
            "latency_queries": args.latency_queries,
            "batch": args.batch,
            "repeats": args.repeats or (3 if quick else 7),
            "warmup": args.warmup,
            "min_time_s": 0.005 if quick else 0.02,
        },
        "fusion": {
            "k": args.k,
            "r": args.r,
            "lora_alpha": 2.0 * args.r,
            "layers": SMOLLM2_LAYERS,
            "modules": list(SMOLLM2_SHAPES),
            "density": args.density,
            "repeats": args.repeats or (3 if quick else 5),
            "dense_svd_layers": min(args.dense_svd_layers or (3 if quick else SMOLLM2_LAYERS), SMOLLM2_LAYERS),
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# A. Key search.
# ----------------------------------------------------------------------------------------------------------


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


def run_pool(
    data: str, n: int, cfg: dict[str, Any], args: argparse.Namespace, timing: TimingConfig
) -> list[dict]:
    """Every method on one pool: build, recall per query set, batch-1 latency and batch-64 throughput."""
    t0 = time.perf_counter()
    keys, query_sets = make_pool(data, n, cfg, args.seed)
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
        indexes[kind], *b = timed_build(make, 1, args.threads)
        builds[kind] = tuple(b)
    hnsw_threads = args.hnsw_threads
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
        args.threads,
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
    rng = np.random.default_rng([args.seed, n, 7])
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


def run_search(config: dict[str, Any], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    cfg = config["search"]
    timing = TimingConfig(cfg["repeats"], cfg["warmup"], cfg["min_time_s"], clock=args.clock)
    runs = [("clustered", n) for n in cfg["n_values"]] + [("uniform", cfg["uniform_n"])]
    rows: list[dict[str, Any]] = []
    for data, n in runs:
        t0 = time.perf_counter()
        cell = run_pool(data, n, cfg, args, timing)
        gc.collect()  # free this N's keys and indexes (1M: ~5 GB) before the next
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        for r in cell:
            r["peak_rss_gb"] = rss
        rows += cell
        print(f"  {data:<9} N={n:>9,}: {time.perf_counter() - t0:6.1f} s", flush=True)
    return rows, summarise(rows)


# ----------------------------------------------------------------------------------------------------------
# B. Fusion.
# ----------------------------------------------------------------------------------------------------------


def random_adapter(
    name: str, r: int, lora_alpha: float, layers: int, generator: torch.Generator
) -> LoraWeights:
    """SmolLM2-135M-sized LoRA: r on all 7 linear projections of ``layers`` layers; A ~ kaiming-like, B small."""
    modules = {}
    for layer in range(layers):
        for proj, (fan_in, fan_out) in SMOLLM2_SHAPES.items():
            lora_A = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            lora_B = 0.01 * torch.randn(fan_out, r, generator=generator)
            modules[f"model.layers.{layer}.{proj}"] = LoraModuleWeights(lora_A, lora_B, lora_alpha / r)
    return LoraWeights(name, modules)


def dense_sum(sources: Sequence[LoraWeights], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Baseline: the dense ``ΔW = Σ_j w_j s_j B_j A_j`` per module (what a merge into the base weights forms)."""
    return {m: sum(w * s.modules[m].delta() for w, s in zip(weights, sources)) for m in sources[0].modules}


def dense_svd(sources: Sequence[LoraWeights], weights: Sequence[float], rank: int) -> int:
    """Baseline: PEFT's ``combination_type="svd"`` route — dense ``ΔW``, full ``torch.linalg.svd``, truncate."""
    for m in sources[0].modules:
        delta = sum(w * s.modules[m].delta() for w, s in zip(weights, sources))
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        _ = (u[:, :rank] * sigma[:rank], vh[:rank])
    return len(sources[0].modules)


def run_fusion(config: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = config["fusion"]
    timing = TimingConfig(cfg["repeats"], 1, 0.0, clock=args.clock)
    generator = torch.Generator().manual_seed(args.seed)
    sources = [
        random_adapter(f"src{j}", cfg["r"], cfg["lora_alpha"], cfg["layers"], generator)
        for j in range(cfg["k"])
    ]
    weights = [1.0 / cfg["k"]] * cfg["k"]
    d = cfg["density"]
    methods: list[tuple[str, str, dict[str, Any]]] = [
        ("cat", "cat", {}),
        ("linear", "linear", {}),
        ("svd", "svd", {}),
        ("svd_r8", "svd", {"svd_rank": 8}),
        ("ties", "ties", {"density": d}),
        ("dare_linear", "dare_linear", {"density": d}),
        ("dare_ties", "dare_ties", {"density": d}),
    ]
    samplers = {
        label: block(lambda method=method, options=options: fuse(sources, weights, method, **options), timing)
        for label, method, options in methods
    }
    samplers["dense_sum (baseline)"] = block(lambda: dense_sum(sources, weights), timing)
    t0 = time.perf_counter()
    times = measure_interleaved(samplers, timing)
    logger.info("fusion methods timed in %.1f s", time.perf_counter() - t0)

    # PEFT-style dense SVD: ~0.5 s per layer here, so it runs alone, on `dense_svd_layers` layers, scaled to all.
    n_layers = cfg["dense_svd_layers"]
    subset = [
        LoraWeights(s.name, {m: w for m, w in s.modules.items() if int(m.split(".")[2]) < n_layers})
        for s in sources
    ]
    svd_time = measure_interleaved(
        {"dense": block(lambda: dense_svd(subset, weights, 8), timing)},
        TimingConfig(max(1, cfg["repeats"] // 2), 1, 0.0, clock=args.clock),
    )["dense"] * (cfg["layers"] / n_layers)

    rows = []
    parent = tempfile.mkdtemp(prefix="bench_retrieval_save_", dir=args.tmp_dir)
    try:
        for label, method, options in methods:
            fused: FusedAdapter = fuse(sources, weights, method, **options)
            out = Path(parent) / label
            saves = []
            for _ in range(cfg["repeats"] + 1):  # first save is the warm-up
                t0 = time.perf_counter()  # wall: writing files is I/O
                fused.save(out)
                saves.append(time.perf_counter() - t0)
            ranks = set(fused.ranks.values())
            rows.append(
                {
                    "method": label,
                    "options": options or "",
                    "fuse_ms": times[label] * 1e3,
                    "vs_cat": times[label] / times["cat"],
                    "rank": "/".join(map(str, sorted(ranks))),
                    "max_trunc_err": max(fused.truncation_error.values()) if fused.truncation_error else None,
                    "save_ms": statistics.median(saves[1:]) * 1e3,
                    "file_mb": sum(f.stat().st_size for f in out.iterdir()) / 2**20,
                    "note": "",
                }
            )
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    rows.append(
        {
            "method": "dense_sum (baseline)",
            "options": "",
            "fuse_ms": times["dense_sum (baseline)"] * 1e3,
            "vs_cat": times["dense_sum (baseline)"] / times["cat"],
            "rank": "dense",
            "note": "Σ w s B A as dense [out, in] per module",
        }
    )
    rows.append(
        {
            "method": "dense_svd (PEFT-style baseline)",
            "options": {"svd_rank": 8},
            "fuse_ms": svd_time * 1e3,
            "vs_cat": svd_time / times["cat"],
            "rank": "8",
            "note": f"dense ΔW + torch.linalg.svd; measured on {n_layers} layer(s), scaled to {cfg['layers']}",
        }
    )
    return rows


# ----------------------------------------------------------------------------------------------------------
# C. Targets and output.
# ----------------------------------------------------------------------------------------------------------


def make_targets(search_rows: list[dict], summary: list[dict], quick: bool) -> list[Target]:
    t_exact = Target(f"exact search, batch 1, N={EXACT_TARGET_N:,} (ms/query)", "<=", EXACT_MS_TARGET)
    t_recall = Target(
        f"HNSW N={HNSW_TARGET_N:,}: best recall@3 over the ef sweep (worse of near/fresh)",
        ">=",
        RECALL_TARGET,
    )
    t_hnsw = Target(
        f"HNSW batch 1, N={HNSW_TARGET_N:,}, smallest ef with recall@3 >= {RECALL_TARGET} (ms/query)",
        "<=",
        HNSW_MS_TARGET,
    )
    for r in search_rows:
        if r["data"] == "clustered" and r["N"] == EXACT_TARGET_N and r["method"] == "exact":
            t_exact.values.append((r["b1_us"] / 1e3, "ExactIndex, clustered keys"))
        if r["data"] == "clustered" and r["N"] == EXACT_TARGET_N and r["method"] == "exact-rowmajor":
            t_exact.note = (
                f"the previous [N, dim] layout (bench-only RowMajorExactIndex, before commit 7e21a6c): "
                f"{r['b1_us'] / 1e3:.3f} ms"
            )
    hnsw = [r for r in search_rows if r["data"] == "clustered" and r["N"] == HNSW_TARGET_N and r["ef"]]
    if hnsw:
        best = max(hnsw, key=lambda r: min_recall(r, 3))
        t_recall.values.append((min_recall(best, 3), f"ef={best['ef']}"))
    for s in summary:
        if s["data"] == "clustered" and s["N"] == HNSW_TARGET_N:
            if s["recall_reached"]:
                t_hnsw.values.append((s["hnsw_b1_us"] / 1e3, f"ef={s['hnsw_ef']}"))
            else:
                t_hnsw.values.append((float("inf"), "no ef reached the recall"))
    if quick:
        for t in (t_recall, t_hnsw):
            t.note = "N=1M is not run with --quick"
    return [t_exact, t_recall, t_hnsw]


def format_targets(summaries: list[dict[str, Any]]) -> str:
    lines = ["TARGETS"]
    for s in summaries:
        if s["status"] == "n/a":
            lines.append(f"  {s['target']:<84} {s['op']} {s['threshold']:<5} not measured   n/a")
        else:
            lines.append(
                f"  {s['target']:<84} {s['op']} {s['threshold']:<5} measured {s['worst']:<8} {s['status']}"
                f"   ({s['worst_at']})"
            )
        if s["note"]:
            lines.append(f"      note: {s['note']}")
    return "\n".join(lines)


def header(machine: dict[str, Any], config: dict[str, Any]) -> str:
    sc, fc = config["search"], config["fusion"]
    return "\n".join(
        [
            f"Machine: {machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['logical_cores']} logical "
            f"cores ({machine['cores_available']} available), load avg at start {machine['load_average_at_start']}",
            f"Software: python {machine['python']}, numpy {machine['numpy']}, faiss-cpu {machine['faiss']} "
            f"({machine['faiss_simd']}), torch {machine['torch']}, threadpoolctl BLAS: {machine['blas']}",
            f"Settings: {config['mode']} run; searches and fusion on {config['threads']} thread(s) "
            f"(torch, numpy BLAS, FAISS OpenMP), clock={config['clock']} (cpu = process CPU time); HNSW builds on "
            f"{config['hnsw_build_threads']} OpenMP thread(s), timed in wall and CPU seconds; seed {config['seed']}",
            f"Search: dim {sc['dim']}, clustered keys = {sc['centres']} random centres + noise of norm "
            f"{sc['key_noise']}; near queries = key + noise {sc['query_noise']}; HNSW M={sc['m']}, "
            f"efConstruction={sc['ef_construction']}, ef_search {sc['ef_search']}; {sc['eval_queries']} recall "
            f"queries per set; {sc['repeats']} repeats (median), warm-up {sc['warmup']}",
            f"Fusion: k={fc['k']} adapters, r={fc['r']}, lora_alpha={fc['lora_alpha']}, {fc['layers']} layers x "
            f"{len(fc['modules'])} projections, density {fc['density']}, {fc['repeats']} repeats (median)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    # fuse() logs one INFO line per call through the project's own handler.
    logging.getLogger("lora_retriever").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    config = settings(args)
    machine = machine_info()  # imports transformers/peft (and whatever BLAS they load): limit threads after
    threadpool_limits(limits=args.threads, user_api="blas")  # numpy's OpenBLAS (ExactIndex), FAISS's OpenBLAS
    blas = [
        f"{i['internal_api']} {i['version']} ({i['num_threads']} thread(s))"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    machine.update(
        numpy=np.__version__,
        faiss=faiss.__version__,
        faiss_simd=faiss.get_compile_options().strip(),
        blas=blas,
    )
    suffix = "_quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    head = header(machine, config)
    print(head, flush=True)
    results: dict[str, Any] = {"machine": machine, "settings": config}
    targets: list[dict[str, Any]] = []
    started = time.perf_counter()
    md = ["# Retrieval and fusion benchmark", "", head.replace("\n", "  \n"), ""]

    if not args.skip_search:
        print("\nA. KEY SEARCH", flush=True)
        rows, summary = run_search(config, args)
        targets += [t.summary() for t in make_targets(rows, summary, args.quick)]
        results["search"] = {"rows": rows, "summary": summary}
        print("\nPer method (b1 = one query per call, us; b64 = batches of 64; recall vs exact top-k)")
        print(render_table(rows, SEARCH_COLUMNS, markdown=False))
        print(
            f"\nSummary (HNSW at the smallest ef with recall@3 >= {RECALL_TARGET} on near and fresh queries;"
            " random_* = uniform random query directions at that ef, random_ef = smallest ef for those)"
        )
        print(render_table(summary, SUMMARY_COLUMNS, markdown=False), flush=True)
        md += [
            "## A. Key search",
            "",
            "`b1_us`: one query per call (k=3), median microseconds; `b64_*`: batches of 64 queries. Recall of the "
            "top-3 / top-10 against our exact search, per query set: `near` = noisy copies of keys, `fresh` = new "
            "draws from the key distribution, `random` = uniform random directions (clustered data only). "
            "`s3_*`: mean top-3 similarity found / exact mean top-3 similarity (1.00 = the misses are as close "
            "as the true neighbours). `exact-rowmajor` is a benchmark-only reference: `ExactIndex` "
            "before commit 7e21a6c (keys `[N, dim]`, multiplied by the transposed view). `build_s` wall / `build_cpu_s` CPU seconds (HNSW: summed over the build threads).",
            "",
            render_table(rows, SEARCH_COLUMNS),
            "",
            f"### Summary: HNSW at the smallest ef_search with recall@3 >= {RECALL_TARGET} on near and fresh queries",
            "",
            "`random_r3` / `random_s3`: recall@3 and similarity ratio of uniform random query directions "
            "(clustered keys) at that ef; `random_ef`: the smallest ef reaching recall@3 >= "
            f"{RECALL_TARGET} on them.",
            "",
            render_table(summary, SUMMARY_COLUMNS),
            "",
        ]
        write_json(args.out_dir / f"retrieval{suffix}.json", {**results, "targets": targets})

    if not args.skip_fusion:
        print("\nB. FUSION", flush=True)
        fusion_rows = run_fusion(config, args)
        results["fusion"] = fusion_rows
        print(render_table(fusion_rows, FUSION_COLUMNS, markdown=False), flush=True)
        md += [
            f"## B. Fusion of k={config['fusion']['k']} SmolLM2-135M-sized adapters",
            "",
            "`fuse_ms`: `fuse(...)` of in-memory `LoraWeights`, median; `save_ms`: `FusedAdapter.save` to a temporary "
            "directory (wall clock, median after one warm-up); `rank`: fused rank per module.",
            "",
            render_table(fusion_rows, FUSION_COLUMNS),
            "",
        ]

    results["targets"] = targets
    results["total_seconds"] = time.perf_counter() - started
    block_text = format_targets(targets)
    md += ["## C. Targets", "", "```", block_text, "```", ""]
    (args.out_dir / f"retrieval{suffix}.md").write_text("\n".join(md))
    write_json(args.out_dir / f"retrieval{suffix}.json", results)
    print("\n" + block_text)
    print(
        f"\nTotal {results['total_seconds'] / 60:.1f} min; results in {args.out_dir}/retrieval{suffix}.{{md,json}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
