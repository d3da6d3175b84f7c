#!/usr/bin/env python
"""Where a mixture decode step and a mixture prefill spend their time (SmolLM2-135M, N adapters, k per sample).

Everything in one process, one thread, process CPU time (the machine may be shared: the load average is
printed), medians of repeats interleaved round-robin:

1. **Timed workloads**: a decode step (one new token per sample on a KV cache) and a prefill (batch x T tokens,
   ``logits_to_keep=1``) of the base model, a merged adapter (``W += s B A``), the mixture with a zero routing
   (every ``LoraLinear`` wrapper runs but no adapter is used: the wrappers' fixed cost) and the mixture.
2. **Op replay**: one call of each workload is recorded at the aten level (``TorchDispatchMode``), every op
   tagged by who ran it: a wrapped projection's base GEMM, the LoRA path of a ``LoraLinear``, or the rest of
   the model (attention, norms, rotary, lm_head, cache). Each group's op list is then replayed alone, back to
   back: its cost with no Python logic around the ops. ``Python and bookkeeping`` = timed mixture minus the
   three replays; a torch.profiler trace is not used because its per-op overhead (several microseconds, wall
   clock) is as large as the decode ops it would measure.

    python benchmarks/bench_mixture_profile.py [--cells decode-b1-k3 prefill-b8-k3] [--n 16] [--repeats 5]
        [--compare REV] [--no-replay] [--out FILE.json]

``--compare REV`` also builds the mixture of git revision REV (its ``swift/tuners/lora_layers.py`` and
``swift_model.py``) and times it in the same rounds: ``mixture_over_baseline`` is the median of the per-round
ratios, the before/after figure of a change.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402
from bench_mixture_e2e import (  # noqa: E402
    E2EConfig,
    adapter_tensors,
    fold_adapter,
    target_linears,
    token_windows,
)
from bench_mixture_layer import make_routing  # noqa: E402
from bench_utils import machine_info, machine_line, render_table, setup_logging  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from swift.tuners.lora_layers import LoraLinear  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = ("base GEMMs", "LoRA ops", "other model ops")
COLUMNS = [
    "workload", "base_ms", "merged_ms", "zero_routing_ms", "mixture_ms", "mixture_over_merged",
    "base GEMMs", "LoRA ops", "other model ops", "Python and bookkeeping", "lora_ops_count", "lora_ops_per_layer",
]  # fmt: skip


def load_baseline(rev: str) -> Any:
    """``swift.tuners.swift_model`` as it was at git revision ``rev`` (with that revision's ``lora_layers``).

    Both files are read with ``git show`` and imported under private module names, so the baseline and the
    working tree run side by side in this process (before/after ratios measured interleaved).
    """
    sources = {}
    for name in ("lora_layers", "swift_model"):
        sources[name] = subprocess.run(
            ["git", "show", f"{rev}:swift/tuners/{name}.py"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    modules = {}
    for name in ("lora_layers", "swift_model"):
        module_name = f"_baseline_{name}"
        source = sources[name].replace(
            "from swift.tuners.lora_layers import", "from _baseline_lora_layers import"
        )
        module = types.ModuleType(module_name)
        module.__file__ = f"<{rev}:swift/tuners/{name}.py>"
        sys.modules[module_name] = module  # dataclasses look their module up while the code runs
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        modules[name] = module
    return modules["swift_model"]


def build_models(n: int, r: int, lora_alpha: float, seed: int, baseline: str | None) -> dict[str, Any]:
    """base model, merged adapter a0, SwiftModel with N in-memory adapters (and the baseline's), tokenizer."""
    from swift.llm.model import get_model_tokenizer
    from swift.tuners.swift_model import SwiftModel

    model, tokenizer = get_model_tokenizer("smollm2-135m-instruct")
    cfg = E2EConfig(
        "smollm2-135m-instruct", (n,), (1,), (1,), ALL_LINEAR, r=r, lora_alpha=lora_alpha, seed=seed
    )
    merged = copy.deepcopy(model)
    fold_adapter(merged, 0, cfg)
    linears = target_linears(model, ALL_LINEAR)
    pools = {"mixture": SwiftModel}
    if baseline:
        pools["baseline"] = load_baseline(baseline).SwiftModel
    # Every model is a deep copy: the loaded model's weights sit in one mapping, copies in one allocation per
    # tensor, and that alone moved prefill times by up to ~10 % here; like is compared with like.
    out = {"base": copy.deepcopy(model).eval(), "merged": merged.eval(), "tokenizer": tokenizer}
    for label, cls in pools.items():
        pool = cls(copy.deepcopy(model))
        for j in range(n):
            weights = {
                name: (a, b, lora_alpha / r) for name, (a, b) in adapter_tensors(j, linears, r, seed).items()
            }
            pool.add_adapter_weights(f"a{j}", weights)
        out[label] = pool.eval()
    return out


class Workload:
    """A decode step or a prefill of one model, with an optional mixture context around it.

    ``prepare()`` does the untimed part (for decode: the prompt's prefill and the context's first call) and
    returns ``step``, the timed part.
    """

    def __init__(self, model: Any, ids: torch.Tensor, decode: bool, enter: Callable[[], Any] | None):
        self.model, self.ids, self.decode, self.enter = model, ids, decode, enter

    @contextlib.contextmanager
    def prepared(self):
        with self.enter() if self.enter is not None else contextlib.nullcontext():
            if not self.decode:
                yield lambda: self.model(input_ids=self.ids, use_cache=False, logits_to_keep=1)
                return
            out = self.model(input_ids=self.ids, use_cache=True)
            state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

            def step() -> None:
                out = self.model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
                state["cache"], state["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

            yield step

    def sample(self, steps: int) -> float:
        """Seconds per decode step (``steps`` of them) or per prefill; a fresh context each call."""
        if not self.decode:
            start = time.process_time()
            with self.enter() if self.enter is not None else contextlib.nullcontext():
                self.model(input_ids=self.ids, use_cache=False, logits_to_keep=1)
            return time.process_time() - start
        with self.prepared() as step:
            start = time.process_time()
            for _ in range(steps):
                step()
            return (time.process_time() - start) / steps


class OpRecorder(TorchDispatchMode):
    """Records every aten op with its arguments, tagged by the module group that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = "other model ops"
        self.ops: dict[str, list[tuple[Any, tuple, dict]]] = {g: [] for g in GROUPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[self.tag].append((func, args, kwargs))
        return func(*args, **kwargs)


def tag_hooks(model: Any, recorder: OpRecorder) -> list[Any]:
    """Forward (pre-)hooks that switch the recorder's tag inside LoraLinear and inside their base layers."""

    def setter(tag: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            recorder.tag = tag

        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            handles.append(module.register_forward_pre_hook(setter("LoRA ops")))
            handles.append(module.register_forward_hook(setter("other model ops")))
            handles.append(module.base_layer.register_forward_pre_hook(setter("base GEMMs")))
            handles.append(module.base_layer.register_forward_hook(setter("LoRA ops")))
    return handles


def replay_seconds(
    ops: list[tuple[Any, tuple, dict]], repeats: int, stat: Callable = statistics.median
) -> float:
    """``stat`` (median) of the seconds of running ``ops`` back to back (after one warm-up pass)."""

    def once() -> float:
        start = time.process_time()
        for func, args, kwargs in ops:
            func(*args, **kwargs)
        return time.process_time() - start

    once()
    return stat([once() for _ in range(repeats)])


def profile_workload(
    label: str,
    workloads: dict[str, Workload],
    steps: int,
    repeats: int,
    replay: bool = True,
    stat: Callable[[list[float]], float] = statistics.median,
) -> dict[str, Any]:
    """Interleaved timings of every workload (``stat`` of the repeats); with ``replay``, the mixture's split."""
    samples: dict[str, list[float]] = {name: [] for name in workloads}
    for w in workloads.values():
        w.sample(1)  # warm-up
    for _ in range(repeats):
        for name, w in workloads.items():
            samples[name].append(w.sample(steps))
    ms = {name: stat(v) * 1e3 for name, v in samples.items()}
    row: dict[str, Any] = {
        "workload": label,
        **{f"{name}_ms": value for name, value in ms.items()},
        "mixture_over_merged": ms["mixture"] / ms["merged"],
    }
    if "baseline" in ms:
        # the ratio of medians, and the median of per-round ratios (robust to drift between rounds)
        row["mixture_over_baseline"] = stat([a / b for a, b in zip(samples["mixture"], samples["baseline"])])
    if not replay:
        return row
    recorder = OpRecorder()
    mixture = workloads["mixture"]
    handles = tag_hooks(mixture.model, recorder)
    try:
        with mixture.prepared() as step:
            step()  # decode: the context's first call already ran in prepared(); this is a steady step
            recorder.ops = {g: [] for g in GROUPS}
            with recorder:
                step()
    finally:
        for handle in handles:
            handle.remove()
    times = {g: replay_seconds(ops, repeats, stat) * 1e3 for g, ops in recorder.ops.items()}
    n_layers = sum(isinstance(m, LoraLinear) for m in mixture.model.modules())
    row.update(times)
    row["Python and bookkeeping"] = ms["mixture"] - sum(times.values())
    row["lora_ops_count"] = len(recorder.ops["LoRA ops"])
    row["lora_ops_per_layer"] = len(recorder.ops["LoRA ops"]) / n_layers
    row["lora_op_names"] = _count_names(recorder.ops["LoRA ops"])
    return row


def _count_names(ops: list[tuple[Any, tuple, dict]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for func, _, _ in ops:
        name = str(func).removeprefix("aten.")
        counts[name] = counts.get(name, 0) + 1
    return counts


CELLS = {
    "decode-b1-k3": (True, 1, 3),
    "decode-b8-k1": (True, 8, 1),
    "decode-b8-k3": (True, 8, 3),
    "prefill-b1-k3": (False, 1, 3),
    "prefill-b8-k3": (False, 8, 3),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="adapters in the pool (default 16)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument(
        "--cells", nargs="+", choices=list(CELLS), default=["decode-b1-k3", "prefill-b8-k3"], help="workloads"
    )
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed sample")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--compare",
        metavar="REV",
        help="also time the mixture of git revision REV (before/after, interleaved)",
    )
    p.add_argument("--no-replay", action="store_true", help="timings only, no op replay")
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic of the repeats (min: robust to bursts of other work on a shared machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    setup_logging(False, True)
    torch.set_num_threads(1)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    models = build_models(args.n, args.r, 16.0, args.seed, args.compare)
    names = [f"a{j}" for j in range(args.n)]
    rows = []
    ours, old = models["mixture"], models.get("baseline")
    with torch.inference_mode():
        for cell in args.cells:
            decode, batch, k = CELLS[cell]
            routing = make_routing(batch, args.n, k, torch.Generator().manual_seed(args.seed))
            zero = (routing[0], torch.zeros_like(routing[1]))
            ids = token_windows(models["tokenizer"], batch, 32 if decode else args.prefill_tokens)
            workloads = {
                "base": Workload(models["base"], ids, decode, None),
                "merged": Workload(models["merged"], ids, decode, None),
                "zero_routing": Workload(ours, ids, decode, lambda z=zero: ours.mixture(z, names)),
                "mixture": Workload(ours, ids, decode, lambda r=routing: ours.mixture(r, names)),
            }
            if old is not None:
                workloads["baseline"] = Workload(old, ids, decode, lambda r=routing: old.mixture(r, names))
            rows.append(
                profile_workload(cell, workloads, args.steps, args.repeats, replay=not args.no_replay)
            )
            print(f"{cell}: {rows[-1]}", flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    print(
        f"\nms per decode step / per prefill; CPU clock, {args.stat} of {args.repeats}; load avg at end {load}"
    )
    columns = (
        COLUMNS if not args.compare else [*COLUMNS[:5], "baseline_ms", "mixture_over_baseline", *COLUMNS[5:]]
    )
    print(render_table(rows, columns, markdown=False))
    for row in rows:
        print(f"{row['workload']} LoRA ops: {row.get('lora_op_names')}")
    if args.out:
        payload = {"machine": machine, "load_avg_end": load, "settings": vars(args), "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
