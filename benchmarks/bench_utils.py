"""Shared helpers for the benchmarks: machine description (via ``swift.utils.cpu_info``), timing, targets, tables.

Timing follows the project's notes on this machine: one thread, warm-up, median of repeats, every baseline
measured in the same process, interleaved round-robin, and reported as ratios.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swift.utils import cpu_info, cpu_summary

__all__ = [
    "Target",
    "TimingConfig",
    "block",
    "each",
    "machine_info",
    "machine_line",
    "measure_interleaved",
    "quantile",
    "render_table",
    "setup_logging",
    "write_csv",
    "write_json",
]


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Entry-point logging: INFO by default; the project's per-adapter load messages only with --verbose."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # swift attaches its own handler on first use; keep its per-adapter INFO lines out of the benchmark log.
    logging.getLogger("swift").setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the project
        pass


def machine_info() -> dict[str, Any]:
    """The machine and software a run measured on, stored with its results.

    The CPU facts come from the project's one source, ``swift.utils.cpu_info`` (call this after setting
    torch's thread count: the summary names it); this adds the load at start, python / transformers / peft
    versions and the repository commit.
    """
    cpu = cpu_info()
    versions = {}
    for name in ("transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {
        "cpu_summary": cpu_summary(cpu),
        "cpu": cpu,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        **_git_state(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """``Machine: <cpu_summary>; load avg at start ...``: the first line of every benchmark's report."""
    return f"Machine: {machine['cpu_summary']}; load avg at start {machine['load_average_at_start']}"


def _git_state() -> dict[str, Any]:
    """Commit of the repository and whether ``swift/`` has uncommitted changes (results belong to a version)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "swift"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "swift_dirty": None}
    return {"git_commit": commit, "swift_dirty": bool(dirty)}


@dataclass(frozen=True)
class TimingConfig:
    """How one measurement is taken.

    Attributes:
        repeats: timed repeats; the reported value is their median.
        warmup: untimed calls before the first repeat.
        min_time: a repeat runs the call ``number`` times (calibrated once) so it lasts at least this many
            seconds; its value is the mean per call. Keeps the timer's resolution out of microsecond calls.
        clock: ``"cpu"`` = CPU time of this process (``time.process_time``): time the process is descheduled
            by other work on shared cores doesn't count; right for one thread only. ``"wall"`` =
            ``time.perf_counter``.
    """

    repeats: int = 5
    warmup: int = 1
    min_time: float = 0.01
    clock: str = "cpu"

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.min_time < 0:
            raise ValueError(f"repeats must be >= 1 and warmup, min_time >= 0; got {self}.")
        if self.clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {self.clock!r}.")

    def now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()


# A sampler runs the operation ``number`` times and returns the mean seconds per call.
Sampler = Callable[[int], float]


def block(fn: Callable[[], object], timing: TimingConfig) -> Sampler:
    """Sampler timing ``number`` back-to-back calls of ``fn`` with one pair of clock reads."""

    def sample(number: int) -> float:
        start = timing.now()
        for _ in range(number):
            fn()
        return (timing.now() - start) / number

    return sample


def each(call: Callable[[], float]) -> Sampler:
    """Sampler for calls that need untimed setup: ``call`` runs once and returns its own elapsed seconds."""

    def sample(number: int) -> float:
        return sum(call() for _ in range(number)) / number

    return sample


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank, no interpolation: a value that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_interleaved(
    samplers: dict[str, Sampler], timing: TimingConfig, slow_call_s: float = 0.5
) -> dict[str, float]:
    """Median seconds per call of every sampler, taken round-robin so slow drifts hit all methods alike.

    Each method is warmed up (a method whose first call takes over ``slow_call_s`` counts that call as its
    whole warm-up), its inner loop count calibrated from a warm call (at most 1000), then
    ``timing.repeats`` rounds each take one sample of every method.
    """
    numbers = {}
    for name, sample in samplers.items():
        seconds = sample(1)
        if seconds < slow_call_s:
            for _ in range(timing.warmup - 1):
                sample(1)
            seconds = sample(1)
        numbers[name] = max(1, min(1000, int(timing.min_time / max(seconds, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(timing.repeats):
        for name, sample in samplers.items():
            samples[name].append(sample(numbers[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Target:
    """A performance target checked over several cells.

    Attributes:
        name: what is measured, e.g. ``"layer ours(N=256)/ours(N=4)"``.
        op: ``"<="`` or ``">="``.
        threshold: the target value.
        values: ``(measured value, where)`` for every cell the target covers.
        note: caveat printed with the result (e.g. which N values a baseline covers).
    """

    name: str
    op: str
    threshold: float
    values: list[tuple[float, str]] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target.op must be '<=' or '>=', got {self.op!r}.")

    def passes(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def summary(self) -> dict[str, Any]:
        """Worst value and where, median, how many cells pass, and PASS (all cells) / MISS / n/a."""
        if not self.values:
            return {
                "target": self.name,
                "op": self.op,
                "threshold": self.threshold,
                "status": "n/a",
                "note": self.note,
            }
        pick = max if self.op == "<=" else min
        worst, where = pick(self.values, key=lambda v: v[0])
        n_pass = sum(self.passes(v) for v, _ in self.values)
        return {
            "target": self.name,
            "op": self.op,
            "threshold": self.threshold,
            "worst": round(worst, 3),
            "worst_at": where,
            "median": round(statistics.median(v for v, _ in self.values), 3),
            "cells_passing": f"{n_pass}/{len(self.values)}",
            "status": "PASS" if n_pass == len(self.values) else "MISS",
            "note": self.note,
        }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], markdown: bool = True) -> str:
    """A markdown table (or a fixed-width console table) of ``columns`` from ``rows``."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
