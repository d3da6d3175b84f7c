"""Factorised vs dense SVD of a LoRA update ``ΔW = B·A`` (``B [d, r]``, ``A [r, d]``).

* ``factorised``: ``spectral_edit.svd.lowrank_svd_from_ba`` — QR of ``B`` and ``Aᵀ``, SVD of the ``r × r``
  core, float64 (the library path, conversions included): ``O(d r²)``.
* ``dense``: form ``B @ A`` and ``torch.linalg.svd(ΔW, full_matrices=False)`` in float32: ``O(d³)``. float32
  is the *faster* dense baseline here (float64 takes ~1.6x longer at d=4096), so the ratio is conservative.

One thread, warm-up, median of ``--repeats`` samples taken round-robin in the same process (CPU clock), as
in ``bench_utils``. Every cell also checks that both give the same singular values:
``max_k |σ_k − σ̂_k| / σ_k`` over the ``r`` nonzero values (the dense float32 SVD limits this to ~1e-5).
Target: ``dense / factorised >= 50`` at d=4096, r=16 (PASS/MISS).

Usage::

    python benchmarks/bench_spectral_svd.py                # full: d in {576, 2048, 4096}, r in {8, 16, 64}
    python benchmarks/bench_spectral_svd.py --quick        # d in {576, 2048}, 2 repeats

Writes ``benchmarks/results/spectral_svd{_quick}.md`` and ``.json`` (``--out_dir``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

# Run from a checkout without relying on the editable install's package list (it may predate spectral_edit/).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402
from bench_utils import (  # noqa: E402
    Target,
    TimingConfig,
    block,
    machine_info,
    machine_line,
    measure_interleaved,
    render_table,
    write_json,
)
from tqdm import tqdm  # noqa: E402

from spectral_edit.svd import lowrank_svd_from_ba  # noqa: E402

logger = logging.getLogger("bench_spectral_svd")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["d", "r", "factorised_ms", "dense_ms", "speedup", "max_rel_sigma_diff", "rank"]
TARGET_D, TARGET_R, TARGET_SPEEDUP = 4096, 16, 50.0
SIGMA_TOLERANCE = 1e-4  # float32 dense SVD vs float64 factorised, relative per singular value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 2048, 4096], help="square d (in = out).")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="LoRA ranks r.")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per method (median).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="d in {576, 2048}, 2 repeats.")
    parser.add_argument("--out_dir", type=Path, default=RESULTS_DIR, help=f"default: {RESULTS_DIR}.")
    return parser.parse_args(argv)


def bench_cell(d: int, r: int, timing: TimingConfig, seed: int) -> dict[str, Any]:
    """Time both methods on one random fp32 LoRA of shape ``[d, r] x [r, d]`` and compare their σ."""
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(d, r, generator=generator) * 0.02
    A = torch.randn(r, d, generator=generator) / d**0.5
    last: dict[str, torch.Tensor] = {}

    def factorised() -> None:
        last["factorised"] = lowrank_svd_from_ba(B, A).S

    def dense() -> None:
        last["dense"] = torch.linalg.svd(B @ A, full_matrices=False).S

    seconds = measure_interleaved(
        {"factorised": block(factorised, timing), "dense": block(dense, timing)}, timing
    )
    ours, ref = last["factorised"], last["dense"][: last["factorised"].numel()].double()
    rel = float(((ours - ref).abs() / ref).max())
    return {
        "d": d,
        "r": r,
        "factorised_ms": seconds["factorised"] * 1e3,
        "dense_ms": seconds["dense"] * 1e3,
        "speedup": seconds["dense"] / seconds["factorised"],
        "max_rel_sigma_diff": float(f"{rel:.2e}"),
        "rank": int(ours.numel()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.dims, args.repeats = [d for d in args.dims if d <= 2048], 2
    torch.set_num_threads(args.threads)
    timing = TimingConfig(repeats=args.repeats, warmup=1, min_time=0.01, clock="cpu")
    info = machine_info()
    print(machine_line(info), flush=True)
    start = time.perf_counter()
    rows = []
    cells = [(d, r) for d in args.dims for r in args.ranks]
    for d, r in tqdm(cells, desc="cells", unit="cell"):
        rows.append(bench_cell(d, r, timing, args.seed))
        logger.info("d=%d r=%d: %s", d, r, {k: rows[-1][k] for k in ("factorised_ms", "dense_ms", "speedup")})

    target = Target(f"dense/factorised at d={TARGET_D}, r={TARGET_R}", ">=", TARGET_SPEEDUP)
    target.values = [
        (row["speedup"], f"d={row['d']} r={row['r']}")
        for row in rows
        if (row["d"], row["r"]) == (TARGET_D, TARGET_R)
    ]
    summary = target.summary()
    worst_sigma = max(row["max_rel_sigma_diff"] for row in rows)
    sigma_ok = worst_sigma <= SIGMA_TOLERANCE

    name = "spectral_svd_quick" if args.quick else "spectral_svd"
    shown = [row | {"max_rel_sigma_diff": f"{row['max_rel_sigma_diff']:.1e}"} for row in rows]
    table = render_table(shown, COLUMNS)
    status = summary["status"]
    lines = [
        "# Spectral edit: factorised vs dense SVD of B·A",
        "",
        f"{machine_line(info)}  ",
        f"Software: python {info['python']}, torch {info['torch']}  ",
        f"Settings: {args.threads} thread(s), CPU clock, median of {args.repeats} interleaved repeats after warm-up, "
        f"seed {args.seed}, B·A square d×d. factorised = `lowrank_svd_from_ba` (QR + r×r core SVD, float64); "
        "dense = `B @ A` then `torch.linalg.svd(full_matrices=False)` in float32 (the faster dense dtype).  ",
        f"Run time: {time.perf_counter() - start:.0f} s.",
        "",
        table,
        "",
        f"Target {summary['target']} {summary['op']} {TARGET_SPEEDUP:g}: **{status}**"
        + (f" (measured {summary['worst']:.0f}x)" if status != "n/a" else " (cell not run)"),
        "",
        f"Singular values agree: max relative difference {worst_sigma:.1e} "
        f"({'PASS' if sigma_ok else 'FAIL'}, tolerance {SIGMA_TOLERANCE:g}; limited by the float32 dense SVD).",
        "",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text("\n".join(lines))
    write_json(
        args.out_dir / f"{name}.json",
        {
            "machine": info,
            "settings": vars(args) | {"out_dir": str(args.out_dir)},
            "rows": rows,
            "target": summary,
            "max_rel_sigma_diff": worst_sigma,
            "sigma_tolerance": SIGMA_TOLERANCE,
        },
    )
    print(render_table(shown, COLUMNS, markdown=False))
    print(
        f"{status}: {summary['target']} >= {TARGET_SPEEDUP:g}"
        + (f" (measured {summary['worst']:.0f}x)" if status != "n/a" else "")
    )
    print(
        f"{'PASS' if sigma_ok else 'FAIL'}: sigma max relative difference {worst_sigma:.1e} <= {SIGMA_TOLERANCE:g}"
    )
    return 0 if sigma_ok else 1


if __name__ == "__main__":
    sys.exit(main())
