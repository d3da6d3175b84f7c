#!/usr/bin/env python
"""Benchmark the per-sample weighted multi-adapter LoRA mixture against its baselines.

A. Layer level (``bench_mixture_layer``): one LoRA layer with SmolLM2's shapes; ours vs the plain linear, a
   merged adapter, PEFT's mixed batch, and a loop over all N adapters; both kernels forced as well. Every
   batch uses the same number of distinct adapters at every N (the smallest N), so N alone varies.
B. End to end (``bench_mixture_e2e``): SmolLM2-135M-Instruct with N adapters on all linear layers; prefill
   latency and decode tokens/s for base, merged, PEFT mixed batch and ours (k=1, k=3); in float32 and, where
   the CPU has bf16 units, in bfloat16 (model and adapter banks) in the same run.
C. A targets block: every target and every cell with its value and PASS / MISS, and the CPU it ran on.

Usage (from the repository root; see benchmarks/README.md)::

    LORA_RETRIEVER_CACHE=/path/to/cache .venv/bin/python benchmarks/bench_mixture.py --quick
    # the targets of issue 12 (layer and end to end, fp32 and bf16):
    .venv/bin/python benchmarks/bench_mixture.py --n-values 16 256 --layer-n-values 4 64 256 \
        --peft-max-n 16 --e2e-repeats 3

Results: ``<out-dir>/mixture_layer.{md,csv,json}`` and ``mixture_e2e.{md,csv,json}``, one set per part (``*_quick.*``
with ``--quick``); every file names the machine (``swift.utils.cpu_summary``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_mixture_e2e import (  # noqa: E402
    DTYPE_COLUMNS,
    E2E_COLUMNS,
    LOAD_COLUMNS,
    E2EConfig,
    dtype_speedups,
    run_e2e_benchmark,
)
from bench_mixture_layer import LAYER_COLUMNS, run_layer_benchmark, scaling_rows  # noqa: E402
from bench_utils import (  # noqa: E402
    Target,
    TimingConfig,
    machine_info,
    machine_line,
    render_table,
    setup_logging,
    write_csv,
    write_json,
)

logger = logging.getLogger("bench_mixture")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALING_TARGET, NAIVE_TARGET, PEFT_TARGET = 1.2, 10.0, 1.0
# Issue 12: prefill within 10 % of the base model, decode within 8 % of one merged adapter (15 % when every
# slot of a batch of 8 is a different adapter: bytes-bound).
PREFILL_TARGET, DECODE_B1_TARGET, DECODE_B8_K1_TARGET, DECODE_DISTINCT_TARGET = 1.10, 0.92, 0.92, 0.85

# Columns shown on the console (the markdown/CSV files hold all of LAYER_COLUMNS / E2E_COLUMNS).
LAYER_CONSOLE = [
    "layer", "N", "k", "batch", "T", "R_U", "base_us", "peft_us", "naive_us", "ours_us", "ours_cold_us",
    "union_us", "gather_us", "auto_kernel", "auto_vs_best", "ours_over_base", "naive_over_ours", "peft_over_ours",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small subset for a smoke check (< 3 min)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable timings)"
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu (default): process CPU time, immune to being descheduled by other work on shared cores; "
        "wall: perf_counter. cpu needs --threads 1 (it would sum the threads' time)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per layer measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each layer measurement")
    p.add_argument(
        "--e2e-repeats", type=int, default=3, help="timed repeats per end-to-end measurement (median)"
    )
    p.add_argument("--r", type=int, default=8, help="LoRA rank of every adapter")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--n-values", type=int, nargs="+", help="adapter pool sizes N (default 4 16 64 256)")
    p.add_argument(
        "--layer-n-values", type=int, nargs="+", help="pool sizes N of the layer part (default: --n-values)"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        help="end-to-end dtypes (default float32, plus bfloat16 where the CPU has bf16 units)",
    )
    p.add_argument("--layer-modules", nargs="+", help="layer shapes to sweep (default q_proj up_proj)")
    p.add_argument(
        "--target-modules", nargs="+", default=list(ALL_LINEAR), help="modules the e2e adapters target"
    )
    p.add_argument(
        "--peft-max-n",
        type=int,
        help="largest N loaded into PEFT end to end (default 16; loading is quadratic in N: 64 adds ~3 min)",
    )
    p.add_argument(
        "--model-type", default="smollm2-135m-instruct", help="swift.llm model_type for the e2e part"
    )
    p.add_argument("--skip-layer", action="store_true", help="skip part A (layer level)")
    p.add_argument("--skip-e2e", action="store_true", help="skip part B (end to end)")
    p.add_argument(
        "--out-dir", type=Path, default=here / "results", help="where tables go (default benchmarks/results)"
    )
    p.add_argument(
        "--adapter-dir",
        type=Path,
        help="where the e2e adapters are written (default: a fresh temporary directory, deleted at the end)",
    )
    p.add_argument("--seed", type=int, default=0)
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true")
    verbosity.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.e2e_repeats < 1 or args.r < 1:
        p.error("--threads, --repeats, --e2e-repeats and --r must be positive integers")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu sums the CPU time of all threads; with --threads > 1 use --clock wall")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep, filled from the flags and the --quick / full defaults."""
    quick = args.quick
    return {
        "mode": "quick" if quick else "full",
        "threads": args.threads,
        "clock": args.clock,
        "r": args.r,
        "lora_alpha": args.lora_alpha,
        "seed": args.seed,
        "layer": {
            "modules": args.layer_modules or ["q_proj", "up_proj"],
            "n_values": args.layer_n_values or args.n_values or ([4, 64] if quick else [4, 16, 64, 256]),
            "k_values": [1, 3],
            "batches": [1, 8] if quick else [1, 8, 32],
            "tokens": [1, 128],
            "repeats": min(args.repeats, 3) if quick else args.repeats,
            "warmup": args.warmup,
            "min_time_s": 0.005 if quick else 0.01,
            # adapters per batch, the same at every N (the smallest N): pool size isolated from diversity
            "distinct": min(args.layer_n_values or args.n_values or ([4, 64] if quick else [4, 16, 64, 256])),
        },
        "e2e": {
            "model_type": args.model_type,
            "n_values": args.n_values or ([4, 16] if quick else [4, 16, 64, 256]),
            "k_values": [1, 3],
            "batches": [1, 2] if quick else [1, 8],
            "target_modules": args.target_modules,
            "prefill_tokens": 64 if quick else 128,
            "prompt_tokens": 32,
            "new_tokens": 8 if quick else 32,
            "repeats": 1 if quick else args.e2e_repeats,
            "peft_max_n": args.peft_max_n or 16,
            "clock": args.clock,
            "dtypes": args.dtypes,
        },
    }


def layer_targets(rows: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> list[Target]:
    ns = sorted({r["N"] for r in rows})
    n64 = 64 if 64 in ns else ns[-1]
    t_scale = Target(f"layer ours(N={ns[-1]})/ours(N={ns[0]}), same layer/k/batch/T", "<=", SCALING_TARGET)
    t_naive = Target(f"layer naive_loop/ours at N={n64}", ">=", NAIVE_TARGET)
    t_scale_rel = Target(
        f"[info] same, as (ours/base at N={ns[-1]}) / (ours/base at N={ns[0]})",
        "<=",
        SCALING_TARGET,
        note="not a target: dividing by each cell's own base cancels drift between the two cells",
    )
    t_peft = Target("layer peft_mixed/ours at k=1 (all N)", ">=", PEFT_TARGET)
    for s in scaling:
        where = f"{s['layer']} k={s['k']} b={s['batch']} T={s['T']}"
        t_scale.values.append((s["large_over_small"], where))
        t_scale_rel.values.append((s["large_over_small_vs_base"], where))
    for r in rows:
        where = f"{r['layer']} N={r['N']} k={r['k']} b={r['batch']} T={r['T']}"
        if r["N"] == n64:
            t_naive.values.append((r["naive_over_ours"], where))
        if r["peft_over_ours"] is not None:
            t_peft.values.append((r["peft_over_ours"], where))
    return [t_scale, t_scale_rel, t_naive, t_peft]


def e2e_targets(rows: list[dict[str, Any]], notes: list[str]) -> list[Target]:
    """Issue 12's four cells (float32), PEFT against ours, and the same four cells in bf16 as [info]."""
    targets = []
    for dtype, tag in (("float32", ""), ("bfloat16", "[info] bf16: ")):
        cells = [r for r in rows if r["dtype"] == dtype and r["method"].startswith("ours")]
        if not cells:
            continue
        t_prefill = Target(f"{tag}e2e prefill ours(k=3)/base, batch 1 and 8", "<=", PREFILL_TARGET)
        t_b1 = Target(f"{tag}e2e decode tok/s ours/merged, b=1 k=3", ">=", DECODE_B1_TARGET)
        t_b8 = Target(f"{tag}e2e decode tok/s ours/merged, b=8 k=1", ">=", DECODE_B8_K1_TARGET)
        t_distinct = Target(
            f"{tag}e2e decode tok/s ours/merged, b=8 k=3, 24 distinct", ">=", DECODE_DISTINCT_TARGET
        )
        for r in cells:
            where = f"{r['method']} N={r['N']} b={r['batch']} distinct={r.get('distinct')}"
            if r["k"] == 3:
                t_prefill.values.append((r["prefill_over_base"], where))
            if r["k"] == 3 and r["batch"] == 1:
                t_b1.values.append((r["decode_over_merged"], where))
            if r["k"] == 1 and r["batch"] == 8:
                t_b8.values.append((r["decode_over_merged"], where))
            if r["k"] == 3 and r["batch"] == 8 and r.get("distinct") == 24:
                t_distinct.values.append((r["decode_over_merged"], where))
        if not t_distinct.values:
            t_distinct.note = "needs N >= 24 (e.g. --n-values 16 256)"
        targets += [t_prefill, t_b1, t_b8, t_distinct]
    t_peft_p = Target(
        "e2e prefill PEFT-mixed/ours(k=1) (time ratio)", ">=", PEFT_TARGET, note=" ".join(notes)
    )
    t_peft_d = Target("e2e decode tok/s ours(k=1)/PEFT-mixed", ">=", PEFT_TARGET, note=" ".join(notes))
    for r in rows:
        if r.get("peft_over_ours_prefill") is not None:
            where = f"{r['method']} N={r['N']} b={r['batch']}"
            t_peft_p.values.append((r["peft_over_ours_prefill"], where))
            t_peft_d.values.append((r["ours_over_peft_decode"], where))
    return targets + [t_peft_p, t_peft_d]


def format_targets(summaries: list[dict[str, Any]], machine: dict[str, Any] | None = None) -> str:
    """The TARGETS block: per target the worst cell, the median and PASS / MISS, then every cell."""
    lines = ["TARGETS (PASS = every cell meets it; worst cell shown, then every cell)"]
    if machine is not None:
        lines.append(f"  on {machine_line(machine)}")
    for s in summaries:
        if s["status"] == "n/a":
            note = f"   ({s['note']})" if s.get("note") else ""
            lines.append(f"  {s['target']:<58} {s['op']} {s['threshold']:<5}  not measured        n/a{note}")
            continue
        lines.append(
            f"  {s['target']:<58} {s['op']} {s['threshold']:<5}  worst {s['worst']:<8} median {s['median']:<8} "
            f"cells {s['cells_passing']:<7} {s['status']}   (worst at {s['worst_at']})"
        )
        for value, where, ok in s.get("cells", []):
            lines.append(f"      {value:<8.3f} {'PASS' if ok else 'MISS'}  {where}")
        if s["note"]:
            lines.append(f"      note: {s['note']}")
    return "\n".join(lines)


def summarize(targets: list[Target]) -> list[dict[str, Any]]:
    """``Target.summary()`` plus every cell as ``(value, where, passes)``."""
    return [{**t.summary(), "cells": [(v, where, t.passes(v)) for v, where in t.values]} for t in targets]


def kernel_summary(rows: list[dict[str, Any]], tolerance: float = 1.05) -> list[str]:
    """Cells where the automatic kernel was more than 5 % slower than the other one."""
    bad = [r for r in rows if r["auto_vs_best"] > tolerance]
    lines = [f"automatic kernel within 5 % of the faster one in {len(rows) - len(bad)}/{len(rows)} cells"]
    for r in bad:
        other = "gather" if r["auto_kernel"] == "union" else "union"
        lines.append(
            f"  {r['layer']} N={r['N']} k={r['k']} b={r['batch']} T={r['T']}: auto={r['auto_kernel']} "
            f"{r[r['auto_kernel'] + '_us']:.0f} us vs {other} {r[other + '_us']:.0f} us ({r['auto_vs_best']:.2f}x)"
        )
    return lines


def e2e_dtypes(requested: list[str] | None, machine: dict[str, Any]) -> tuple[list[str], str]:
    """The end-to-end dtypes to run, and a note when bf16 is left out for want of bf16 units."""
    has_bf16 = bool(machine["cpu"].get("bf16"))
    dtypes = list(requested or (["float32", "bfloat16"] if has_bf16 else ["float32"]))
    if "bfloat16" in dtypes and not has_bf16:
        dtypes.remove("bfloat16")
        if not dtypes:
            dtypes = ["float32"]
    if has_bf16 or (requested and "bfloat16" not in requested):
        return dtypes, ""
    return dtypes, (
        f"bf16 skipped: {machine['cpu']['model']} has no bf16 units (AVX512-BF16 / AMX), where bf16 matmuls run "
        "4-100x slower than fp32; the bf16 correctness test (tests/test_mixture_bf16.py) still runs there."
    )


def header(machine: dict[str, Any], config: dict[str, Any]) -> str:
    return "\n".join(
        [
            machine_line(machine),
            f"Software: python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
            f"peft {machine['peft']}; repo commit {machine['git_commit']}"
            + (" (swift/ has uncommitted changes)" if machine["swift_dirty"] else ""),
            f"Settings: {config['mode']} run, {config['threads']} thread(s), clock={config['clock']} "
            "(cpu = process CPU time), "
            f"layer float32, end to end {'+'.join(config['e2e']['dtypes'] or ['float32'])}, r={config['r']}, "
            f"lora_alpha={config['lora_alpha']}, seed={config['seed']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (kill, nohup'd runs) unwinds like Ctrl-C, so the temporary adapter directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    setup_logging(args.verbose, args.quiet)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = settings(args)
    machine = machine_info()
    config["e2e"]["dtypes"], dtype_note = e2e_dtypes(args.dtypes, machine)
    suffix = "_quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    head = header(machine, config)
    print(head, flush=True)
    print(f"Layer sweep: {config['layer']}\nE2E: {config['e2e']}\n", flush=True)
    results: dict[str, Any] = {"machine": machine, "settings": config}
    summaries: list[dict[str, Any]] = []
    started, started_cpu = time.perf_counter(), time.process_time()

    if not args.skip_layer:
        lc = config["layer"]
        timing = TimingConfig(lc["repeats"], lc["warmup"], lc["min_time_s"], clock=args.clock)
        t0 = time.perf_counter()
        with torch.inference_mode():
            rows = run_layer_benchmark(
                layer_names=lc["modules"],
                n_values=lc["n_values"],
                k_values=lc["k_values"],
                batches=lc["batches"],
                token_counts=lc["tokens"],
                r=args.r,
                lora_alpha=args.lora_alpha,
                timing=timing,
                seed=args.seed,
                distinct=lc["distinct"],
            )
        scaling = scaling_rows(rows)
        targets = summarize(layer_targets(rows, scaling))
        summaries += targets
        kernels = kernel_summary(rows)
        scale_cols = (
            ["layer", "k", "batch", "T"]
            + [f"ours_N{n}_us" for n in lc["n_values"]]
            + ["large_over_small", "large_over_small_vs_base"]
        )
        print("\nA. LAYER LEVEL (times in microseconds; ours = steady for T=1, first call for T>1)")
        print(render_table(rows, LAYER_CONSOLE, markdown=False))
        print("\nScaling with the pool size N (ours, us)")
        print(render_table(scaling, scale_cols, markdown=False))
        print("\nKernel choice: " + "\n".join(kernels))
        write_csv(args.out_dir / f"mixture_layer{suffix}.csv", rows, LAYER_COLUMNS)
        md = [
            "# Mixture LoRA, layer level",
            "",
            head.replace("\n", "  \n"),
            f"Sweep: {lc}",
            "",
            "Times in microseconds, median of repeats interleaved round-robin over the methods. `ours` = `ours_steady` for T=1 (decode: context entered "
            "once, union rows cached), `ours_first` for T>1 (first call in a fresh context whose plan another "
            "layer already built); `ours_cold` also builds the plan. `union`/`gather`: headline measurement with "
            "the kernel forced; `auto_vs_best` = chosen kernel time / faster kernel time.",
            "",
            render_table(rows, LAYER_COLUMNS),
            "",
            "## Scaling with N (ours, us)",
            "",
            render_table(scaling, scale_cols),
            "",
            "## Kernel choice",
            "",
            *[f"    {line}" for line in kernels],
            "",
            "## Targets",
            "",
            "```",
            format_targets(targets, machine),
            "```",
        ]
        (args.out_dir / f"mixture_layer{suffix}.md").write_text("\n".join(md) + "\n")
        layer = {"rows": rows, "scaling": scaling, "kernel_choice": kernels}
        seconds = time.perf_counter() - t0
        # One JSON per part: re-running one part (--skip-e2e / --skip-layer) leaves the other's results intact.
        write_json(
            args.out_dir / f"mixture_layer{suffix}.json",
            {**results, "layer": layer, "layer_seconds": seconds, "targets": targets},
        )

    if not args.skip_e2e:
        ec = config["e2e"]
        cfg = E2EConfig(
            model_type=ec["model_type"],
            n_values=tuple(ec["n_values"]),
            k_values=tuple(ec["k_values"]),
            batches=tuple(ec["batches"]),
            target_modules=tuple(ec["target_modules"]),
            prefill_tokens=ec["prefill_tokens"],
            prompt_tokens=ec["prompt_tokens"],
            new_tokens=ec["new_tokens"],
            r=args.r,
            lora_alpha=args.lora_alpha,
            peft_max_n=ec["peft_max_n"],
            repeats=ec["repeats"],
            seed=args.seed,
            clock=args.clock,
            dtypes=tuple(ec["dtypes"]),
        )
        owned = args.adapter_dir is None
        adapter_root = Path(tempfile.mkdtemp(prefix="bench_mixture_adapters_")) if owned else args.adapter_dir
        t0 = time.perf_counter()
        try:
            e2e = run_e2e_benchmark(cfg, adapter_root)
        finally:
            if owned:
                shutil.rmtree(adapter_root, ignore_errors=True)
        targets = summarize(e2e_targets(e2e["rows"], e2e["notes"]))
        summaries += targets
        print(
            f"\nB. END TO END ({ec['model_type']}; prefill {ec['prefill_tokens']} tokens, decode {ec['new_tokens']} "
            f"new tokens after a {ec['prompt_tokens']}-token prompt)"
        )
        print(render_table(e2e["rows"], E2E_COLUMNS, markdown=False))
        print("\nLoading")
        print(render_table(e2e["loads"], LOAD_COLUMNS, markdown=False))
        speedups = dtype_speedups(e2e["rows"])
        dtype_lines = [dtype_note] if dtype_note else []
        if speedups:
            dtype_lines = [render_table(speedups, DTYPE_COLUMNS, markdown=False)]
            print("\nbf16 vs fp32 in this run (model and adapter banks in bf16; speed-ups > 1 favour bf16)")
            print(dtype_lines[0])
        elif dtype_note:
            print("\n" + dtype_note)
        for note in e2e["notes"]:
            print("Note: " + note)
        write_csv(args.out_dir / f"mixture_e2e{suffix}.csv", e2e["rows"], E2E_COLUMNS)
        md = [
            "# Mixture LoRA, end to end",
            "",
            head.replace("\n", "  \n"),
            f"Settings: {ec}",
            "",
            f"Prefill: one forward over batch x {ec['prefill_tokens']} tokens (`logits_to_keep=1`), median ms. "
            f"Decode: `generate` greedy, exactly {ec['new_tokens']} new tokens; tokens/s over steps 2..n (prompt "
            "prefill excluded). At each N all methods are measured round-robin; base (prefill reference) and "
            "merged (decode reference) are re-measured at every N.",
            "",
            render_table(e2e["rows"], E2E_COLUMNS),
            "",
            "## Loading (cumulative seconds to reach N)",
            "",
            render_table(e2e["loads"], LOAD_COLUMNS),
            "",
            "## bf16 vs fp32 (same run)",
            "",
            render_table(speedups, DTYPE_COLUMNS)
            if speedups
            else dtype_note or "bf16 not requested (--dtypes).",
            "",
            *[f"Note: {note}" for note in e2e["notes"]],
            "",
            "## Targets",
            "",
            "```",
            format_targets(targets, machine),
            "```",
        ]
        (args.out_dir / f"mixture_e2e{suffix}.md").write_text("\n".join(md) + "\n")
        seconds = time.perf_counter() - t0
        write_json(
            args.out_dir / f"mixture_e2e{suffix}.json",
            {**results, "e2e": e2e, "dtype_speedups": speedups, "e2e_seconds": seconds, "targets": targets},
        )

    total_s, total_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    print("\n" + format_targets(summaries, machine_info()))  # the load average now, at the end of the run
    print(f"\nTotal {total_s / 60:.1f} min wall, {total_cpu_s / 60:.1f} min CPU; results in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
