"""Layer-level part of the mixture benchmark: one LoRA layer of SmolLM2's shapes against its baselines.

Every cell (layer shape, pool size N, adapters per sample k, batch, tokens T) times:

* ``base``: the plain ``nn.Linear``; ``merged``: one adapter folded into the weight (the single-adapter
  decode reference, same cost as ``base``).
* ``peft``: PEFT 0.21's ``lora.Linear`` holding the same N adapters, called with ``adapter_names=[...]`` (its
  mixed-batch path; one adapter per row, so k=1 only).
* ``naive``: a loop over all N adapters, each applied to the whole batch and weighted by its column of the
  dense ``[batch, N]`` routing (zeros for samples that don't use it). Its cost doesn't depend on k, so it is
  timed in the first k's cell and reused for the others.
* ``ours``: ``LoraLinear`` inside ``lora_mixture_context``. Three situations:

  - ``steady``: context entered once, repeated forwards (decode: union rows cached per context);
  - ``first``: the layer's first call in a fresh context whose shared plan was already built by another layer
    with the same adapter layout (what layers 2..L of a model pay at prefill);
  - ``cold``: the first call in a fresh context, plan built by this call (what the very first layer pays).

  The headline ``ours`` is ``steady`` for T=1 (decode) and ``first`` for T>1 (a prefill runs once per
  context). ``union`` / ``gather`` are the same headline measurement with the kernel forced through
  ``lora_mixture_context(..., kernel=...)``; ``auto`` names the kernel the automatic choice picked (read back
  with ``mixture_kernels()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench_utils import Sampler, TimingConfig, block, each, measure_interleaved
from torch import nn
from tqdm import tqdm

from swift.tuners.lora_layers import LoraLinear, current_routing, lora_mixture_context, mixture_kernels

logger = logging.getLogger(__name__)

# SmolLM2-135M linear layers: (in_features, out_features).
SMOLLM2_SHAPES: dict[str, tuple[int, int]] = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}

LAYER_COLUMNS = [
    "layer", "N", "k", "batch", "T", "distinct", "R_U", "L",
    "base_us", "merged_us", "peft_us", "naive_us", "ours_us",
    "ours_first_us", "ours_cold_us", "ours_steady_us", "union_us", "gather_us",
    "auto_kernel", "auto_vs_best", "ours_over_base", "naive_over_ours", "peft_over_ours",
]  # fmt: skip


@dataclass
class AdapterPool:
    """``n`` random adapters for one layer shape: ``lora_A[j]`` ``[r, in]``, ``lora_B[j]`` ``[out, r]``."""

    lora_A: list[torch.Tensor]
    lora_B: list[torch.Tensor]
    scaling: float

    @property
    def names(self) -> list[str]:
        return [f"a{j}" for j in range(len(self.lora_A))]


def make_pool(n: int, r: int, lora_alpha: float, in_f: int, out_f: int, gen: torch.Generator) -> AdapterPool:
    lora_A = [torch.randn(r, in_f, generator=gen) / in_f**0.5 for _ in range(n)]
    lora_B = [torch.randn(out_f, r, generator=gen) * 0.02 for _ in range(n)]
    return AdapterPool(lora_A, lora_B, lora_alpha / r)


def make_routing(
    batch: int, n: int, k: int, gen: torch.Generator, *, distinct: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct adapters per sample (``[batch, k]`` indices) with positive weights summing to 1.

    ``distinct=None``: each sample draws its ``k`` at random (samples may share adapters). ``distinct=D``: the
    batch uses exactly ``min(D, batch * k)`` adapters, a random subset of the pool assigned round-robin, so the
    pool size N can change while the batch's adapter diversity stays fixed (``D >= k``; ``D = batch * k``: every
    slot of the batch a different adapter).
    """
    if k > n:
        raise ValueError(f"k={k} adapters per sample needs a pool of at least k adapters, got N={n}.")
    if distinct is None:
        indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])
    else:
        if not k <= distinct <= n:
            raise ValueError(f"distinct={distinct} must be between k={k} and the pool size N={n}.")
        subset = torch.randperm(n, generator=gen)[: min(distinct, batch * k)]
        slots = torch.arange(batch * k).view(batch, k) % subset.numel()
        indices = subset[slots]
    weights = torch.rand(batch, k, generator=gen) + 0.1
    return indices, weights / weights.sum(dim=1, keepdim=True)


def build_ours(base: nn.Linear, pool: AdapterPool, n: int, module_name: str) -> LoraLinear:
    layer = LoraLinear(base, module_name)
    out_f = base.out_features
    for name, lora_A, lora_B in zip(pool.names[:n], pool.lora_A, pool.lora_B):
        # A 1-output sibling gets the first row of B: same slots, hence the same shared plan.
        layer.add_adapter(name, lora_A, lora_B[:out_f], pool.scaling)
    return layer.eval()


def build_peft(base: nn.Linear, pool: AdapterPool, n: int, r: int, lora_alpha: float) -> nn.Module:
    """PEFT 0.21's ``lora.Linear`` with the first ``n`` adapters of the pool (same weights as ours)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=r, lora_alpha=lora_alpha)
    names = pool.names[:n]
    layer = PeftLoraLinear(base, names[0], config=config, r=r, lora_alpha=lora_alpha)
    for name in names[1:]:
        layer.update_layer(name, r, lora_alpha, config)
    with torch.no_grad():
        for name, lora_A, lora_B in zip(names, pool.lora_A, pool.lora_B):
            layer.lora_A[name].weight.copy_(lora_A)
            layer.lora_B[name].weight.copy_(lora_B)
            if abs(layer.scaling[name] - pool.scaling) > 1e-12:
                raise RuntimeError(f"PEFT scaling {layer.scaling[name]} != {pool.scaling} for {name}")
    return layer.eval()


def make_naive(
    base: nn.Linear, pool: AdapterPool, n: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loop over all N adapters: ``y = W x + sum_j (w[:, j] s_j) * (x A_j^T B_j^T)``."""
    a_t = [a.t().contiguous() for a in pool.lora_A[:n]]  # [in, r]
    b_t = [b.t().contiguous() for b in pool.lora_B[:n]]  # [r, out]

    def naive(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        y = base(x)
        coef = dense * pool.scaling  # [batch, N]
        for j in range(n):
            y.add_(coef[:, j].view(-1, *([1] * (x.dim() - 1))) * ((x @ a_t[j]) @ b_t[j]))
        return y

    return naive


def make_merged(base: nn.Linear, pool: AdapterPool) -> nn.Linear:
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    with torch.no_grad():
        merged.weight.copy_(base.weight + pool.scaling * pool.lora_B[0] @ pool.lora_A[0])
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged.eval()


def _first_call(
    layer: LoraLinear,
    sibling: LoraLinear | None,
    routing: tuple,
    names: Sequence[str],
    x: torch.Tensor,
    mode: str,
    timing: TimingConfig,
) -> Sampler:
    """Time only ``layer(x)`` as the layer's first call in a fresh context (after ``sibling`` built the plan)."""

    def call() -> float:
        with lora_mixture_context(routing, names, kernel=mode):
            if sibling is not None:
                sibling(x)
            start = timing.now()
            layer(x)
            return timing.now() - start

    return each(call)


def _steady(
    layer: LoraLinear,
    routing: tuple,
    names: Sequence[str],
    x: torch.Tensor,
    mode: str,
    timing: TimingConfig,
    stack: contextlib.ExitStack,
) -> Sampler:
    """Repeated ``layer(x)`` inside one context that stays open across samples (decode steps of a generate).

    The mixture context is entered inside its own ``contextvars.Context`` so several can stay open while
    samples interleave; ``stack`` exits it (in that Context) when the cell is done. Every sample checks that
    the routing is still in force, and the first call that the kernel ``mode`` asked for was used.
    """
    ctx = contextvars.copy_context()
    # Keep a reference: dropping it would exit the context.
    manager = lora_mixture_context(routing, names, kernel=mode)

    def enter() -> str | None:
        manager.__enter__()
        layer(x)  # the first call fills the per-context cache, as the prefill does in generate
        return mixture_kernels().get(layer.module_name)

    chosen = ctx.run(enter)
    stack.callback(ctx.run, manager.__exit__, None, None, None)
    if chosen is None or (mode != "auto" and chosen != mode):
        raise RuntimeError(f"steady {mode}: the mixture path did not run the requested kernel (got {chosen})")
    inner = block(lambda: layer(x), timing)

    def sample(number: int) -> float:
        if ctx.run(current_routing) is None:
            raise RuntimeError("steady-state sample ran outside its mixture context")
        return ctx.run(inner, number)

    return sample


def _measure_methods(
    layers: dict[str, Any],
    x: torch.Tensor,
    routing: tuple,
    names: Sequence[str],
    dense: torch.Tensor,
    peft: nn.Module | None,
    peft_names: list[str],
    naive_us: float | None,
    decode: bool,
    timing: TimingConfig,
    stack: contextlib.ExitStack,
) -> dict[str, float]:
    """Interleaved medians, in microseconds, of every method of a cell."""
    ours, sibling, naive = layers["ours"], layers["sibling"], layers["naive"]
    samplers: dict[str, Sampler] = {
        "base": block(lambda: layers["base"](x), timing),
        "merged": block(lambda: layers["merged"](x), timing),
        "ours_steady": _steady(ours, routing, names, x, "auto", timing, stack),
        "ours_first": _first_call(ours, sibling, routing, names, x, "auto", timing),
        "ours_cold": _first_call(ours, None, routing, names, x, "auto", timing),
    }
    if peft is not None:
        samplers["peft"] = block(lambda: peft(x, adapter_names=peft_names), timing)
    if naive_us is None:
        samplers["naive"] = block(lambda: naive(x, dense), timing)
    for mode in ("union", "gather"):
        if decode:
            samplers[mode] = _steady(ours, routing, names, x, mode, timing, stack)
        else:
            samplers[mode] = _first_call(ours, sibling, routing, names, x, mode, timing)
    return {name: seconds * 1e6 for name, seconds in measure_interleaved(samplers, timing).items()}


def measure_cell(
    *,
    layer_name: str,
    n: int,
    k: int,
    batch: int,
    tokens: int,
    layers: dict[str, Any],
    pool: AdapterPool,
    timing: TimingConfig,
    seed: int,
    naive_us: float | None = None,
    distinct: int | None = None,
) -> dict[str, Any]:
    """All methods of one cell; times in microseconds. Checks ours against naive (and PEFT at k=1) first.

    ``naive_us``: the naive loop's time from another cell with the same (layer, N, batch, T); its cost
    doesn't depend on k (it runs all N adapters), so it is measured once and reused. ``distinct``: adapters
    the batch uses (``make_routing``); None = random per sample.
    """
    gen = torch.Generator().manual_seed(seed)
    in_f = layers["base"].in_features
    x = torch.randn(batch, tokens, in_f, generator=gen)
    indices, weights = make_routing(batch, n, k, gen, distinct=distinct)
    routing = (indices, weights)
    names = pool.names[:n]
    dense = torch.zeros(batch, n).scatter_(1, indices, weights)
    ours, naive = layers["ours"], layers["naive"]
    peft = layers.get("peft") if k == 1 else None
    peft_names = [names[i] for i in indices[:, 0].tolist()]

    with lora_mixture_context(routing, names):
        y_ours = ours(x)
        auto = mixture_kernels()[ours.module_name]
    y_naive = naive(x, dense)
    torch.testing.assert_close(y_ours, y_naive, rtol=1e-4, atol=1e-4, msg=lambda m: f"ours != naive: {m}")
    if peft is not None:
        y_peft = peft(x, adapter_names=peft_names)
        torch.testing.assert_close(y_ours, y_peft, rtol=1e-4, atol=1e-4, msg=lambda m: f"ours != peft: {m}")

    decode = tokens == 1  # headline: steady state for decode, first call in its context for a prefill
    with contextlib.ExitStack() as stack:
        us = _measure_methods(
            layers, x, routing, names, dense, peft, peft_names, naive_us, decode, timing, stack
        )
    row: dict[str, Any] = {"layer": layer_name, "N": n, "k": k, "batch": batch, "T": tokens}
    row["distinct"] = int(indices.unique().numel())
    # Union rows (distinct adapters used by the batch x r) and rows per sample: what _choose_kernel weighs.
    row["R_U"] = int(indices.unique().numel()) * pool.lora_A[0].shape[0]
    row["L"] = k * pool.lora_A[0].shape[0]
    row.update({f"{name}_us": value for name, value in us.items()})
    row.setdefault("peft_us", None)
    row.setdefault("naive_us", naive_us)
    row["ours_us"] = us["ours_steady"] if decode else us["ours_first"]
    other = "gather" if auto == "union" else "union"
    row["auto_kernel"] = auto
    row["auto_vs_best"] = us[auto] / min(us[auto], us[other])
    row["ours_over_base"] = row["ours_us"] / row["base_us"]
    row["naive_over_ours"] = row["naive_us"] / row["ours_us"]
    row["peft_over_ours"] = row["peft_us"] / row["ours_us"] if peft is not None else None
    return row


def run_layer_benchmark(
    *,
    layer_names: Sequence[str],
    n_values: Sequence[int],
    k_values: Sequence[int],
    batches: Sequence[int],
    token_counts: Sequence[int],
    r: int,
    lora_alpha: float,
    timing: TimingConfig,
    seed: int,
    distinct: int | None = None,
) -> list[dict[str, Any]]:
    """Every cell of the sweep, as rows of ``LAYER_COLUMNS``; ``distinct``: see ``make_routing``."""
    unknown = [name for name in layer_names if name not in SMOLLM2_SHAPES]
    if unknown:
        raise ValueError(f"unknown layer names {unknown}; choose from {sorted(SMOLLM2_SHAPES)}.")
    rows = []
    total = len(layer_names) * len(n_values) * len(k_values) * len(batches) * len(token_counts)
    bar = tqdm(total=total, desc="layer cells", unit="cell")
    for layer_index, layer_name in enumerate(layer_names):
        in_f, out_f = SMOLLM2_SHAPES[layer_name]
        gen = torch.Generator().manual_seed(seed + 1000 * layer_index)
        base = nn.Linear(in_f, out_f, bias=False).eval()
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=gen) / in_f**0.5)
        pool = make_pool(max(n_values), r, lora_alpha, in_f, out_f, gen)
        for n in n_values:
            start = time.perf_counter()
            layers: dict[str, Any] = {
                "base": base,
                "merged": make_merged(base, pool),
                "ours": build_ours(base, pool, n, f"model.layers.0.{layer_name}"),
                "sibling": build_ours(
                    nn.Linear(in_f, 1, bias=False), pool, n, f"model.layers.1.{layer_name}"
                ),
                "naive": make_naive(base, pool, n),
            }
            if 1 in k_values:
                layers["peft"] = build_peft(base, pool, n, r, lora_alpha)
            logger.debug("built %s layers with N=%d in %.2f s", layer_name, n, time.perf_counter() - start)
            naive_us: dict[tuple[int, int], float] = {}
            for k in k_values:
                for batch in batches:
                    for tokens in token_counts:
                        bar.set_postfix_str(f"{layer_name} N={n} k={k} b={batch} T={tokens}")
                        cell_seed = (
                            seed + zlib.crc32(f"{layer_name}/{n}/{k}/{batch}/{tokens}".encode()) % 100_000
                        )
                        row = measure_cell(
                            layer_name=layer_name,
                            n=n,
                            k=k,
                            batch=batch,
                            tokens=tokens,
                            layers=layers,
                            pool=pool,
                            timing=timing,
                            seed=cell_seed,
                            naive_us=naive_us.get((batch, tokens)),
                            distinct=distinct,
                        )
                        naive_us[(batch, tokens)] = row["naive_us"]
                        rows.append(row)
                        bar.update()
    bar.close()
    return rows


def scaling_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours at every N for each (layer, k, batch, T); ratio largest-N / smallest-N, raw and relative to base."""
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["k"], row["batch"], row["T"]), {})[row["N"]] = row
    out = []
    for (layer, k, batch, tokens), by_n in groups.items():
        ns = sorted(by_n)
        small, large = by_n[ns[0]], by_n[ns[-1]]
        entry: dict[str, Any] = {"layer": layer, "k": k, "batch": batch, "T": tokens}
        entry.update({f"ours_N{n}_us": by_n[n]["ours_us"] for n in ns})
        entry["n_small"], entry["n_large"] = ns[0], ns[-1]
        entry["large_over_small"] = large["ours_us"] / small["ours_us"]
        # The same ratio of ours/base: cancels machine drift between the two cells (base is N-independent).
        entry["large_over_small_vs_base"] = large["ours_over_base"] / small["ours_over_base"]
        out.append(entry)
    return out
