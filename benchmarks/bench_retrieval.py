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

    .venv/bin/python benchmarks/bench_retrieval.py --quick   # N <= 100k, smoke check (2-4 min here)
    .venv/bin/python benchmarks/bench_retrieval.py           # N up to 1M: 43 min here under load 4-5; the 1M
                                                             # HNSW build alone is ~9 CPU-minutes

Results: ``<out-dir>/retrieval.{md,json}`` (``retrieval_quick.*`` with ``--quick``). Files: this CLI (settings,
targets, reports), ``bench_retrieval_search.py`` (part A), ``bench_retrieval_fusion.py`` (part B).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
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
from bench_retrieval_fusion import FUSION_COLUMNS, SMOLLM2_LAYERS, SMOLLM2_SHAPES, run_fusion  # noqa: E402
from bench_retrieval_search import (  # noqa: E402
    RECALL_TARGET,
    SEARCH_COLUMNS,
    SUMMARY_COLUMNS,
    RunSettings,
    min_recall,
    run_search,
)
from bench_utils import Target, machine_info, machine_line, render_table, setup_logging, write_json  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

logger = logging.getLogger("bench_retrieval")

EXACT_MS_TARGET, HNSW_MS_TARGET = 1.0, 1.0
EXACT_TARGET_N, HNSW_TARGET_N = 10_000, 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="N up to 100k, fewer repeats: a smoke check (2-4 min)"
    )
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
            machine_line(machine),
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
        run = RunSettings(args.seed, args.threads, args.hnsw_threads, args.clock)
        rows, summary = run_search(config["search"], run)
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
        fusion_rows = run_fusion(config["fusion"], args.seed, args.clock, args.tmp_dir)
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
