"""End-to-end part of the mixture benchmark: SmolLM2-135M-Instruct with a pool of N LoRA adapters.

Methods (same prompts; every model a deep copy of the loaded one, so all have the same memory layout: the
loaded model's single weight mapping ran prefill up to ~10 % faster than per-tensor copies on this machine):

* ``base``: the plain model.
* ``merged``: adapter ``a0`` folded into the weights (``W += s B A``): the single-adapter reference.
* ``ours``: ``Swift.from_pretrained`` pool of N adapters, every request inside ``SwiftModel.mixture`` with k
  adapters per sample (k=1 and k=3): every slot of the batch a different adapter where N allows
  (N >= batch x k), else k random ones per sample; the ``distinct`` column counts them.
* ``peft``: ``PeftModel.from_pretrained`` + ``load_adapter`` with the same adapter directories, per-row
  ``adapter_names`` (PEFT's mixed batch, k=1), for N up to ``peft_max_n`` (PEFT's loading is quadratic in N);
  fp32 only.

Each dtype of ``cfg.dtypes`` (float32; bfloat16 where the CPU has bf16 units) runs the same methods with the
model and the adapter banks in that dtype, in the same process.

Prefill: one forward over ``batch x prefill_tokens`` tokens with ``logits_to_keep=1`` (what ``generate``'s
prefill computes), one fresh mixture context per call. Decode: ``generate`` greedy with exactly
``new_tokens`` new tokens; a logits processor timestamps every step, so decode tokens/s covers steps 2..n only
(the prompt's prefill excluded) and includes generate's own per-step overhead.

All models of a dtype stay in memory; at every N all methods are measured round-robin (base for prefill and
merged for decode included, so ratios compare measurements taken in the same minutes). Times use
``cfg.clock`` ("cpu": process CPU time).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_mixture_layer import make_routing
from torch import nn
from tqdm import tqdm

from swift.tuners.lora_layers import mixture_kernels

logger = logging.getLogger(__name__)

E2E_COLUMNS = [
    "dtype", "method", "N", "k", "batch", "distinct", "prefill_ms", "decode_tok_s", "decode_ms_per_step", "generate_s",
    "prefill_kernels", "prefill_over_base", "decode_over_merged", "peft_over_ours_prefill", "ours_over_peft_decode",
]  # fmt: skip
LOAD_COLUMNS = ["dtype", "method", "N", "load_s", "load_ms_per_adapter"]
DTYPE_COLUMNS = [
    "method", "N", "k", "batch", "distinct", "prefill_fp32_over_bf16", "decode_bf16_over_fp32",
    "bf16_prefill_over_base", "bf16_decode_over_merged",
]  # fmt: skip

# Public-domain style filler text; rows of a batch are windows at different offsets.
PROMPT_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
    "salt and timber. Over the centuries the settlement grew into a market town, then a walled city with a "
    "cathedral, a university and a busy port. Engineers built bridges and canals, merchants founded banks, and "
    "scholars wrote about astronomy, medicine and law. Today visitors walk through the old quarter, taste the "
    "local food, and read the inscriptions on the gates that tell how the citizens rebuilt their home after "
    "floods, fires and wars. "
)


@dataclass(frozen=True)
class E2EConfig:
    """Settings of the end-to-end run (see the module docstring)."""

    model_type: str
    n_values: tuple[int, ...]
    k_values: tuple[int, ...]
    batches: tuple[int, ...]
    target_modules: tuple[str, ...]
    prefill_tokens: int = 128
    prompt_tokens: int = 32
    new_tokens: int = 32
    r: int = 8
    lora_alpha: float = 16.0
    peft_max_n: int = 16
    repeats: int = 3
    seed: int = 0
    clock: str = "cpu"
    dtypes: tuple[str, ...] = ("float32",)

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 to time decode steps, got {self.new_tokens}.")
        if max(self.k_values) > min(self.n_values):
            raise ValueError(f"k values {self.k_values} need every N >= max k; got N values {self.n_values}.")
        unknown = [d for d in self.dtypes if d not in ("float32", "bfloat16")]
        if unknown or not self.dtypes:
            raise ValueError(f"dtypes must be float32 and/or bfloat16, got {self.dtypes}.")


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    if not found:
        raise ValueError(f"no nn.Linear named {list(target_modules)} in {type(model).__name__}.")
    return found


def adapter_tensors(
    j: int, linears: dict[str, nn.Linear], r: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter ``j``'s random ``(lora_A [r, in], lora_B [out, r])`` per module; deterministic in (seed, j)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + j)
    return {
        name: (
            torch.randn(r, lin.in_features, generator=gen) / lin.in_features**0.5,
            torch.randn(lin.out_features, r, generator=gen) * 0.02,
        )
        for name, lin in linears.items()
    }


def write_adapters(model: nn.Module, root: Path, n: int, cfg: E2EConfig) -> float:
    """Write ``n`` PEFT-format adapter directories ``root/a{j}``; returns seconds taken."""
    from safetensors.torch import save_file

    linears = target_linears(model, cfg.target_modules)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(cfg.target_modules),
        "base_model_name_or_path": getattr(model.config, "name_or_path", None),
    }
    start = time.perf_counter()
    for j in tqdm(range(n), desc="writing adapters", unit="adapter"):
        path = root / f"a{j}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (lora_A, lora_B) in adapter_tensors(j, linears, cfg.r, cfg.seed).items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A
            tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return time.perf_counter() - start


def fold_adapter(model: nn.Module, j: int, cfg: E2EConfig) -> None:
    """``W += s B A`` for adapter ``j`` in every target module (an explicit merge)."""
    linears = target_linears(model, cfg.target_modules)
    scaling = cfg.lora_alpha / cfg.r
    with torch.no_grad():
        for name, (lora_A, lora_B) in adapter_tensors(j, linears, cfg.r, cfg.seed).items():
            linears[name].weight.add_(scaling * (lora_B @ lora_A))


def token_windows(tokenizer: Any, rows: int, length: int) -> torch.Tensor:
    """``[rows, length]`` token ids: windows of a fixed English text, one offset per row."""
    ids: list[int] = []
    while len(ids) < length + 7 * rows:
        ids += tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[7 * i : 7 * i + length] for i in range(rows)], dtype=torch.long)


class StepTimer:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(self.now())
        return scores


@dataclass
class Runner:
    """How one method runs a prefill forward and a generate call on ``[batch, T]`` token ids."""

    forward: Callable[[torch.Tensor], Any]
    generate: Callable[..., Any]
    kernels: Callable[[torch.Tensor], dict[str, str]] | None = None  # a prefill -> kernel each layer ran
    prefill: bool = True  # measure the prefill latency
    decode: bool = True  # measure decode tokens/s


def measure_runners(
    runners: dict[str, Runner],
    labels: dict[str, dict[str, Any]],
    cfg: E2EConfig,
    prefill_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    pad_token_id: int,
) -> list[dict[str, Any]]:
    """Prefill latency and decode tokens/s of every runner at every batch size; medians of ``cfg.repeats``.

    Repeats are interleaved round-robin over the runners, so drift from other work hits all of them alike.
    """
    from transformers import LogitsProcessorList

    now = time.process_time if cfg.clock == "cpu" else time.perf_counter
    for runner in runners.values():
        runner.forward(prefill_ids[:1, :8])  # warm-up: first-call allocations, lazy imports
    rows = []
    for batch in cfg.batches:
        ids, prompt = prefill_ids[:batch], prompt_ids[:batch]
        out_rows = {name: {**labels[name], "batch": batch} for name in runners}
        for name, runner in runners.items():
            if runner.kernels is not None:
                chosen = runner.kernels(ids)
                out_rows[name]["prefill_kernels"] = " ".join(
                    f"{k}:{v}" for k, v in sorted(Counter(chosen.values()).items())
                )
        prefill: dict[str, list[float]] = {name: [] for name in runners}
        decode: dict[str, list[float]] = {name: [] for name in runners}
        total: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(cfg.repeats):
            for name, runner in runners.items():
                if runner.prefill:
                    start = now()
                    runner.forward(ids)
                    prefill[name].append(now() - start)
        for _ in range(cfg.repeats):
            for name, runner in runners.items():
                if not runner.decode:
                    continue
                timer = StepTimer(now)
                start = now()
                out = runner.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=cfg.new_tokens,
                    min_new_tokens=cfg.new_tokens,
                    do_sample=False,
                    pad_token_id=pad_token_id,
                    logits_processor=LogitsProcessorList([timer]),
                )
                total[name].append(now() - start)
                if out.shape[1] != prompt.shape[1] + cfg.new_tokens or len(timer.times) != cfg.new_tokens:
                    raise RuntimeError(
                        f"{name}: generate made {out.shape[1] - prompt.shape[1]} tokens, not {cfg.new_tokens}"
                    )
                decode[name].append(timer.times[-1] - timer.times[0])
        steps = cfg.new_tokens - 1
        for name, row in out_rows.items():
            if prefill[name]:
                row["prefill_ms"] = statistics.median(prefill[name]) * 1e3
            if decode[name]:
                decode_s = statistics.median(decode[name])
                row["decode_tok_s"] = batch * steps / decode_s
                row["decode_ms_per_step"] = decode_s / steps * 1e3
                row["generate_s"] = statistics.median(total[name])
            rows.append(row)
            logger.info(
                "%s N=%s batch=%d: prefill %s ms, decode %s tok/s (%s ms/step)",
                name,
                row.get("N", "-"),
                batch,
                _num(row.get("prefill_ms")),
                _num(row.get("decode_tok_s")),
                _num(row.get("decode_ms_per_step")),
            )
    return rows


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plain_runner(model: nn.Module, *, prefill: bool = True, decode: bool = True) -> Runner:
    return Runner(
        forward=lambda ids: model(input_ids=ids, use_cache=False, logits_to_keep=1),
        generate=lambda ids, **kw: model.generate(input_ids=ids, **kw),
        prefill=prefill,
        decode=decode,
    )


def ours_runner(model: nn.Module, routing: tuple[torch.Tensor, torch.Tensor], names: list[str]) -> Runner:
    """Every call opens a fresh mixture context for its batch (as a server would per request batch)."""

    def sub(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return routing[0][:batch], routing[1][:batch]

    def forward(ids: torch.Tensor) -> Any:
        with model.mixture(sub(ids.shape[0]), names):
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def generate(ids: torch.Tensor, **kwargs: Any) -> Any:
        with model.mixture(sub(ids.shape[0]), names):
            return model.generate(input_ids=ids, **kwargs)

    def kernels(ids: torch.Tensor) -> dict[str, str]:
        with model.mixture(sub(ids.shape[0]), names):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return mixture_kernels()

    return Runner(forward, generate, kernels=kernels)


def peft_runner(model: nn.Module, adapter_names: list[str]) -> Runner:
    def forward(ids: torch.Tensor) -> Any:
        names = adapter_names[: ids.shape[0]]
        return model(input_ids=ids, use_cache=False, logits_to_keep=1, adapter_names=names)

    def generate(ids: torch.Tensor, **kwargs: Any) -> Any:
        return model.generate(input_ids=ids, adapter_names=adapter_names[: ids.shape[0]], **kwargs)

    return Runner(forward, generate)


def _check_logits(label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(
            f"{label}: logits differ by {diff:.2e}; the baselines don't compute the same thing"
        )
    logger.info("%s: max |logit difference| %.1e", label, diff)


def run_e2e_benchmark(cfg: E2EConfig, adapter_root: Path) -> dict[str, Any]:
    """Load the model, write the adapters, then per dtype and N: grow the pools and measure all methods.

    Base, merged, ours (and PEFT in fp32) stay in memory together so each N stage interleaves all of them; base
    (the prefill reference) and merged (the decode reference) are measured again at every stage.
    """
    from swift.llm.model import get_model_tokenizer

    start = time.perf_counter()
    model, tokenizer = get_model_tokenizer(cfg.model_type)
    logger.info("model loaded in %.1f s", time.perf_counter() - start)
    max_n, max_batch = max(cfg.n_values), max(cfg.batches)
    write_s = write_adapters(model, adapter_root, max_n, cfg)
    logger.info("wrote %d adapters to %s in %.1f s", max_n, adapter_root, write_s)
    inputs = {
        "prefill": token_windows(tokenizer, max_batch, cfg.prefill_tokens),
        "prompt": token_windows(tokenizer, max_batch, cfg.prompt_tokens),
        "pad": tokenizer.pad_token_id,
    }
    gen = torch.Generator().manual_seed(cfg.seed)
    routings = {}
    for n in cfg.n_values:
        for k in cfg.k_values:
            distinct = (
                max_batch * k if n >= max_batch * k else None
            )  # every slot its own adapter where possible
            routings[(n, k)] = make_routing(max_batch, n, k, gen, distinct=distinct)
    out: dict[str, Any] = {"rows": [], "loads": [{"method": "write_adapters", "N": max_n, "load_s": write_s}]}
    out["notes"] = []
    for dtype in cfg.dtypes:
        part = _run_dtype(cfg, getattr(torch, dtype), model, adapter_root, routings, inputs)
        out["rows"] += part["rows"]
        out["loads"] += part["loads"]
        out["notes"] += part["notes"]
        gc.collect()
    add_e2e_ratios(out["rows"])
    return out


def _run_dtype(
    cfg: E2EConfig,
    dtype: torch.dtype,
    model: nn.Module,
    adapter_root: Path,
    routings: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Every N stage of one dtype: models in ``dtype`` (adapter banks too), methods measured round-robin."""
    from peft import PeftModel

    from swift.tuners.swift_model import Swift

    label = str(dtype).removeprefix("torch.")
    peft_ns = [n for n in cfg.n_values if n <= cfg.peft_max_n] if dtype == torch.float32 else []
    skipped = [n for n in cfg.n_values if n > cfg.peft_max_n]
    notes = []
    if dtype == torch.float32 and skipped:
        notes.append(
            f"PEFT mixed batch measured at N={peft_ns} only; N={skipped} skipped: PeftModel.load_adapter scans "
            "every module per call, so loading N adapters is quadratic in N (see the load table; raise "
            "--peft-max-n to include them)."
        )
    rows: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    names_all = [f"a{j}" for j in range(max(cfg.n_values))]
    check_ids = inputs["prefill"][:, :16]
    with torch.inference_mode():
        base = copy.deepcopy(model).to(dtype)
        merged = copy.deepcopy(model)
        fold_adapter(merged, 0, cfg)  # folded in fp32, then cast: one rounding of W + s B A
        merged = merged.to(dtype)
        ours = copy.deepcopy(base)
        peft_model = None
        loaded = {"ours": 0, "peft": 0}
        load_s = {"ours": 0.0, "peft": 0.0}
        for n in cfg.n_values:
            # Loading is timed on the wall clock: it includes reading the adapter files.
            start = time.perf_counter()
            for j in tqdm(
                range(loaded["ours"], n), desc=f"{label} Swift.from_pretrained -> N={n}", unit="adapter"
            ):
                ours = Swift.from_pretrained(
                    ours, adapter_root / f"a{j}", adapter_name=f"a{j}", lora_dtype=dtype
                )
            load_s["ours"] += time.perf_counter() - start
            loaded["ours"] = n
            loads.append(
                {
                    "dtype": label,
                    "method": "ours",
                    "N": n,
                    "load_s": load_s["ours"],
                    "load_ms_per_adapter": load_s["ours"] / n * 1e3,
                }
            )
            if n in peft_ns:
                start = time.perf_counter()
                for j in tqdm(range(loaded["peft"], n), desc=f"PEFT load_adapter -> N={n}", unit="adapter"):
                    path = str(adapter_root / f"a{j}")
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(
                            copy.deepcopy(model), path, adapter_name=f"a{j}"
                        )
                    else:
                        peft_model.load_adapter(path, adapter_name=f"a{j}")
                load_s["peft"] += time.perf_counter() - start
                loaded["peft"] = n
                loads.append(
                    {
                        "dtype": label,
                        "method": "peft",
                        "N": n,
                        "load_s": load_s["peft"],
                        "load_ms_per_adapter": load_s["peft"] / n * 1e3,
                    }
                )
                peft_model.eval()
            elif peft_model is not None:
                peft_model = None  # beyond --peft-max-n: free its memory
                gc.collect()

            names = names_all[:n]
            # base is the prefill reference, merged the decode reference (they cost the same FLOPs).
            runners = {
                "base": plain_runner(base, decode=False),
                "merged": plain_runner(merged, prefill=False),
            }
            labels = {"base": {"method": "base", "N": n}, "merged": {"method": "merged", "N": n}}
            for k in cfg.k_values:
                runners[f"ours_k{k}"] = ours_runner(ours, routings[(n, k)], names)
                labels[f"ours_k{k}"] = {
                    "method": f"ours_k{k}",
                    "N": n,
                    "k": k,
                    "routing": routings[(n, k)][0],
                }
            if peft_model is not None:
                row_names = [f"a{i}" for i in routings[(n, 1)][0][:, 0].tolist()]
                with ours.mixture(routings[(n, 1)], names):
                    want = ours(input_ids=check_ids).logits
                got = peft_model(input_ids=check_ids, adapter_names=row_names).logits
                _check_logits(f"PEFT vs ours (k=1, N={n})", got, want)
                runners["peft_k1"] = peft_runner(peft_model, row_names)
                labels["peft_k1"] = {"method": "peft_k1", "N": n, "k": 1}
            for lab in labels.values():
                lab["dtype"] = label
            stage = measure_runners(runners, labels, cfg, inputs["prefill"], inputs["prompt"], inputs["pad"])
            for row in stage:
                routing = row.pop("routing", None)
                if routing is not None:
                    row["distinct"] = int(routing[: row["batch"]].unique().numel())
            rows += stage
    return {"rows": rows, "loads": loads, "notes": notes}


def add_e2e_ratios(rows: list[dict[str, Any]]) -> None:
    """prefill ours/base, decode ours/merged (tok/s), and ours(k=1) against PEFT, at the same dtype, N and batch."""
    by = {(r["dtype"], r["method"], r.get("N"), r["batch"]): r for r in rows}
    for row in rows:
        if not row["method"].startswith("ours"):
            continue
        key = (row["dtype"], row["N"], row["batch"])
        base = by[(key[0], "base", *key[1:])]
        merged = by[(key[0], "merged", *key[1:])]
        row["prefill_over_base"] = row["prefill_ms"] / base["prefill_ms"]
        row["decode_over_merged"] = row["decode_tok_s"] / merged["decode_tok_s"]
        peft = by.get((key[0], "peft_k1", *key[1:]))
        if row["method"] == "ours_k1" and peft is not None:
            row["peft_over_ours_prefill"] = peft["prefill_ms"] / row["prefill_ms"]
            row["ours_over_peft_decode"] = row["decode_tok_s"] / peft["decode_tok_s"]


def dtype_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every method measured in float32 and bfloat16: bf16's prefill and decode speed-up over fp32."""
    by = {(r["dtype"], r["method"], r.get("N"), r["batch"]): r for r in rows}
    out = []
    for row in rows:
        if row["dtype"] != "bfloat16":
            continue
        fp32 = by.get(("float32", row["method"], row.get("N"), row["batch"]))
        if fp32 is None:
            continue
        entry = {key: row.get(key) for key in ("method", "N", "k", "batch", "distinct")}
        if row.get("prefill_ms") and fp32.get("prefill_ms"):
            entry["prefill_fp32_over_bf16"] = fp32["prefill_ms"] / row["prefill_ms"]
        if row.get("decode_tok_s") and fp32.get("decode_tok_s"):
            entry["decode_bf16_over_fp32"] = row["decode_tok_s"] / fp32["decode_tok_s"]
        for key in ("prefill_over_base", "decode_over_merged"):
            entry[f"bf16_{key}"] = row.get(key)
        out.append(entry)
    return out
