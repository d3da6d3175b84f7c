"""Spectral editing on a real model (issue #5, item 3): unedited vs ``abs_select`` vs ``gd`` vs ``random_index``.

For one task adapter of the demo pool (SmolLM2-135M-Instruct, r=8, all-linear), this script

1. calibrates ``g_σ = ∂L/∂σ`` once on the first ``--num_calib`` records of the adapter task's *train* split
   (test items are never touched by calibration),
2. builds the edited adapters (``abs_select``; ``gd``; ``random_index`` with the same amplify/suppress counts
   and factors as ``abs_select``, one per ``--random_seeds`` seed) with ``spectral_edit.pipeline``,
3. evaluates the base model (no adapter), the unedited adapter and every edit with greedy decoding on the
   held-out ``test`` and ``test_alt`` splits of the adapter's own task and of a transfer task, scored with the
   task suite's ``lora_retriever.tasks.is_correct`` (the same rule as ``make eval-paper``), and also reports
   the teacher-forced answer-token NLL on the same items (a continuous, less noisy signal),
4. writes ``<out_dir>/results.json`` (every prediction) and ``<out_dir>/table.md``.

One base model is loaded once; the adapter is loaded with PEFT once and each method's factors are copied into
the LoRA layers in place (checked bit for bit), so no method pays for a model reload.

    python scripts/eval_spectral_edit.py                      # defaults reproduce spectral_edit/README.md
    python scripts/eval_spectral_edit.py --num_calib 4 --num_test 4 --random_seeds 0 --out_dir /tmp/se
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spectral_edit.data import QAPair, batch_examples, encode_calibration, read_qa_pairs  # noqa: E402
from spectral_edit.edit import GD_UPDATES, GRAD_NORMS, EditConfig  # noqa: E402
from spectral_edit.hooks import (  # noqa: E402
    ModuleSpec,
    compute_sigma_gradients,
    count_target_tokens,
    masked_lm_loss_sum,
    resolve_module,
)
from spectral_edit.io import load_lora_adapter  # noqa: E402
from spectral_edit.pipeline import (  # noqa: E402
    decompose_adapter,
    edit_adapter_state,
    load_base_model,
    load_peft_model,
    select_modules,
)
from swift.tuners.peft_format import (  # noqa: E402
    CONFIG_NAME,
    LoraAdapter,
    parse_lora_ab_key,
    peft_lora_key,
    write_adapter_dir,
)

logger = logging.getLogger("eval_spectral_edit")

ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def original_state(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The adapter's own factors under PEFT canonical keys (what ``load_peft_model`` loads)."""
    state = {k: v for k, v in adapter.state.items() if parse_lora_ab_key(k) is None}
    for module, pair in adapter.pairs.items():
        state[peft_lora_key(module, "A")] = pair.lora_A
        state[peft_lora_key(module, "B")] = pair.lora_B
    return state


def set_lora_factors(
    peft_model: torch.nn.Module, adapter: LoraAdapter, state: dict[str, torch.Tensor]
) -> None:
    """Copy ``state``'s ``lora_A`` / ``lora_B`` into the loaded PEFT layers and check they hold exactly them."""
    table = dict(peft_model.named_modules())
    with torch.no_grad():
        for module in adapter.pairs:
            layer = resolve_module(peft_model, module, table)
            for part, holder in (("A", layer.lora_A), ("B", layer.lora_B)):
                weight = holder[ADAPTER_NAME].weight
                value = state[peft_lora_key(module, part)]
                if weight.shape != value.shape:
                    raise ValueError(
                        f"{module} lora_{part}: shape {tuple(value.shape)} != {tuple(weight.shape)}"
                    )
                weight.copy_(value.to(weight.dtype))
                if not torch.equal(weight.detach().cpu().to(value.dtype), value):
                    raise ValueError(f"{module} lora_{part}: the copied factor differs from the state's")


def token_nll(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the answer tokens of ``batches`` (teacher forcing)."""
    total = count_target_tokens(batches)
    loss = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            loss += float(masked_lm_loss_sum(logits, batch["labels"]))
    return loss / total


def binomial_se(correct: int, n: int) -> float:
    p = correct / n
    return math.sqrt(p * (1 - p) / n)


def relative_change(meta_modules: dict[str, Any]) -> float:
    """``‖ΔW′ − ΔW‖_F / ‖ΔW‖_F`` summed over modules (U, V orthonormal: ``s·‖σ′ − σ‖₂`` per module)."""
    num = den = 0.0
    for m in meta_modules.values():
        s = m.scaling
        num += s * s * sum((a - b) ** 2 for a, b in zip(m.sigma_after, m.sigma_before))
        den += s * s * sum(b * b for b in m.sigma_before)
    return math.sqrt(num / den) if den > 0 else 0.0


def selection_overlap(edits: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Fraction of (module, direction) amplified / suppressed by ``edits`` that ``reference`` also selects."""
    out = {}
    for kind in ("amplified", "suppressed"):
        total = same = 0
        for module, e in edits.items():
            chosen = set(getattr(e, kind))
            total += len(chosen)
            same += len(chosen & set(getattr(reference[module], kind)))
        out[kind] = same / total if total else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation of one model state
# ----------------------------------------------------------------------------------------------------------


class Evaluator:
    """Greedy generation + task-aware exact match + answer NLL on fixed test sets, for any model state."""

    def __init__(
        self, template: Any, test_sets: dict[tuple[str, str], list[QAPair]], args: argparse.Namespace
    ):
        from transformers import GenerationConfig

        self.template = template
        self.test_sets = test_sets
        self.args = args
        self.generation_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
        pad = template.tokenizer.pad_token_id
        self.nll_batches = {
            key: batch_examples(
                encode_calibration(template, pairs, max_length=args.max_length), args.batch_size, pad
            )
            for key, pairs in test_sets.items()
        }

    def __call__(
        self, model: torch.nn.Module, calib_batches: list[dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        from lora_retriever.tasks import is_correct
        from swift.llm import inference

        start = time.perf_counter()
        model.eval()
        result: dict[str, Any] = {"sets": {}, "calib_nll": token_nll(model, calib_batches)}
        for (task, split), pairs in self.test_sets.items():
            predictions = inference(
                model,
                self.template,
                [p.query for p in pairs],
                batch_size=self.args.batch_size,
                generation_config=self.generation_config,
                progress=False,
            )
            rows = [
                {
                    "query": p.query,
                    "reference": p.response,
                    "prediction": pred,
                    "correct": is_correct(task, pred, p.response),
                }
                for p, pred in zip(pairs, predictions)
            ]
            result["sets"][f"{task}/{split}"] = {
                "task": task,
                "split": split,
                "correct": sum(r["correct"] for r in rows),
                "count": len(rows),
                "nll": token_nll(model, self.nll_batches[(task, split)]),
                "predictions": rows,
            }
        result["seconds"] = round(time.perf_counter() - start, 1)
        return result


def per_task(result: dict[str, Any], task: str) -> dict[str, Any]:
    """Pool a method's splits of one task: accuracy, counts, SE, token-weighted-free mean NLL over splits."""
    sets = [s for s in result["sets"].values() if s["task"] == task]
    correct, count = sum(s["correct"] for s in sets), sum(s["count"] for s in sets)
    return {
        "correct": correct,
        "count": count,
        "accuracy": correct / count,
        "se": binomial_se(correct, count),
        "nll": statistics.fmean(s["nll"] for s in sets),
        "flags": [r["correct"] for s in sets for r in s["predictions"]],
        "by_split": {s["split"]: s["correct"] / s["count"] for s in sets},
    }


def flips(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(wrong→right, right→wrong) going from ``a`` (reference) to ``b``, item by item."""
    return sum(not x and y for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b))


def paired_se(a: list[bool], b: list[bool]) -> float:
    """Standard error of the accuracy difference ``mean(b) − mean(a)`` on the same items (sd of d_i / √n)."""
    d = [int(y) - int(x) for x, y in zip(a, b)]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = EditConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", default="smollm2-135m-instruct")
    p.add_argument("--model_type", default="auto")
    p.add_argument(
        "--tasks_dir", default="data/demo/tasks", help="task suite (<task>/{train,test,test_alt}.jsonl)"
    )
    p.add_argument("--pool_dir", default="data/demo/pool", help="trained adapters (<pool_dir>/<task>/)")
    p.add_argument("--adapter_task", default="arithmetic", help="the adapter to edit (its own task)")
    p.add_argument("--transfer_task", default="capital", help="the other task to evaluate on")
    p.add_argument("--splits", nargs="+", default=["test", "test_alt"], help="held-out splits, pooled")
    p.add_argument("--num_test", type=int, default=None, help="first N records of each split (default: all)")
    p.add_argument(
        "--num_calib", type=int, default=32, help="first N records of the adapter task's train split"
    )
    p.add_argument("--calib_batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8, help="generation / NLL batch size")
    p.add_argument("--target_modules", nargs="+", default=None, help="edit only these (default: all modules)")
    p.add_argument("--amp_frac", type=float, default=defaults.amp_frac)
    p.add_argument("--sup_frac", type=float, default=defaults.sup_frac)
    p.add_argument("--amp_factor", type=float, default=defaults.amp_factor)
    p.add_argument("--sup_factor", type=float, default=defaults.sup_factor)
    p.add_argument("--preserve_l1", action="store_true")
    p.add_argument("--eta", type=float, default=defaults.eta, help="gd step size")
    p.add_argument("--gd_update", choices=GD_UPDATES, default=defaults.gd_update)
    p.add_argument("--grad_norm", choices=GRAD_NORMS, default=defaults.grad_norm)
    p.add_argument(
        "--random_seeds", type=int, nargs="+", default=[0, 1, 2], help="random_index seeds (averaged)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no_save_adapters", action="store_true", help="don't write the edited adapters")
    p.add_argument("--out_dir", default="outputs/spectral_eval")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tasks_dir, pool_dir, out_dir = Path(args.tasks_dir), Path(args.pool_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own, other = args.adapter_task, args.transfer_task
    calib_path = tasks_dir / own / "train.jsonl"
    calib_pairs = read_qa_pairs(calib_path, limit=args.num_calib)
    test_sets = {
        (task, split): read_qa_pairs(tasks_dir / task / f"{split}.jsonl", limit=args.num_test)
        for task in (own, other)
        for split in args.splits
    }
    test_queries = {p.query for pairs in test_sets.values() for p in pairs}
    leaked = [p.query for p in calib_pairs if p.query in test_queries]
    if leaked:
        raise ValueError(f"calibration records also appear in the test splits: {leaked[:3]}")

    base_kwargs = {
        "amp_frac": args.amp_frac,
        "sup_frac": args.sup_frac,
        "amp_factor": args.amp_factor,
        "sup_factor": args.sup_factor,
        "preserve_l1": args.preserve_l1,
        "eta": args.eta,
        "gd_update": args.gd_update,
        "grad_norm": args.grad_norm,
    }
    configs = {
        "abs_select": EditConfig(mode="abs_select", **base_kwargs),
        "gd": EditConfig(mode="gd", **base_kwargs),
    }
    for seed in args.random_seeds:
        configs[f"random_index/seed{seed}"] = EditConfig(mode="random_index", seed=seed, **base_kwargs)

    # One base model for everything.
    from swift.llm import get_template

    model, tokenizer = load_base_model(args.base_model, args.model_type)
    template = get_template(model.model_type, tokenizer)
    pad = template.tokenizer.pad_token_id
    calib_batches = batch_examples(
        encode_calibration(template, calib_pairs, max_length=args.max_length), args.calib_batch_size, pad
    )
    evaluator = Evaluator(template, test_sets, args)
    results: dict[str, dict[str, Any]] = {}

    logger.info("evaluating the base model (no adapter)")
    results["base (no adapter)"] = evaluator(model, calib_batches)

    adapter_path = pool_dir / own
    adapter = load_lora_adapter(adapter_path)
    modules = select_modules(adapter, args.target_modules)
    decompositions = decompose_adapter(adapter, modules)
    peft_model = load_peft_model(model, adapter)  # wraps `model` in place: the base row is done before this

    logger.info("calibrating g_sigma on %d train records of %s", len(calib_pairs), own)
    t_cal = time.perf_counter()
    specs = [
        ModuleSpec(m, decompositions[m][0].U, decompositions[m][0].V, decompositions[m][1])
        for m in modules
        if decompositions[m][0].S.numel() > 0
    ]
    g_sigma = compute_sigma_gradients(peft_model, calib_batches, specs)
    for m in modules:
        g_sigma.setdefault(m, torch.zeros(0, dtype=torch.float64))
    calib_seconds = round(time.perf_counter() - t_cal, 1)

    states = {"unedited": (original_state(adapter), None)}
    for name, config in configs.items():
        states[name] = edit_adapter_state(adapter, decompositions, g_sigma, config)
    edit_info: dict[str, Any] = {}
    for name, (state, edits) in states.items():
        set_lora_factors(peft_model, adapter, state)
        logger.info("evaluating %s", name)
        results[name] = evaluator(peft_model, calib_batches)
        if edits is not None:
            edit_info[name] = {
                "config": configs[name].to_dict(),
                "relative_change_frobenius": relative_change(edits),
                "modules_changed": sum(e.sigma_before != e.sigma_after for e in edits.values()),
                "modules": len(edits),
            }
            if configs[name].mode == "random_index":
                edit_info[name]["overlap_with_abs_select"] = selection_overlap(edits, states["abs_select"][1])
            if not args.no_save_adapters:
                target = out_dir / "adapters" / name.replace("/", "_")
                write_adapter_dir(target, state)
                (target / CONFIG_NAME).write_text((adapter_path / CONFIG_NAME).read_text())
    set_lora_factors(peft_model, adapter, states["unedited"][0])

    summary = summarize(results, own, other, args.random_seeds)
    command = "python scripts/eval_spectral_edit.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    payload = {
        "command": command.rstrip(),
        "settings": vars(args),
        "adapter": str(adapter_path),
        "adapter_config": {k: adapter.config.raw.get(k) for k in ("r", "lora_alpha", "target_modules")},
        "calibration": {
            "path": str(calib_path),
            "num_examples": len(calib_pairs),
            "num_target_tokens": count_target_tokens(calib_batches),
            "seconds": calib_seconds,
        },
        "scoring": "lora_retriever.tasks.is_correct (task-aware normalised exact match), greedy decoding",
        "edits": edit_info,
        "summary": summary,
        "results": results,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = render_table(payload, own, other)
    (out_dir / "table.md").write_text(table)
    print(table)
    return 0


def summarize(results: dict[str, Any], own: str, other: str, seeds: list[int]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, result in results.items():
        rows[name] = {"own": per_task(result, own), "transfer": per_task(result, other)}
    ref = rows["unedited"]
    for name, row in rows.items():
        for key in ("own", "transfer"):
            row[key]["delta"] = row[key]["accuracy"] - ref[key]["accuracy"]
            row[key]["delta_nll"] = row[key]["nll"] - ref[key]["nll"]
            row[key]["flips_vs_unedited"] = flips(ref[key]["flags"], row[key]["flags"])
            row[key]["delta_paired_se"] = paired_se(ref[key]["flags"], row[key]["flags"])
            row[key]["calib_nll"] = results[name]["calib_nll"]
    randoms = [rows[f"random_index/seed{s}"] for s in seeds]
    mean_row: dict[str, Any] = {}
    for key in ("own", "transfer"):
        accs = [r[key]["accuracy"] for r in randoms]
        mean_row[key] = {
            "accuracy": statistics.fmean(accs),
            "accuracy_sd_over_seeds": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "count": randoms[0][key]["count"],
            "se": statistics.fmean(r[key]["se"] for r in randoms),
            "nll": statistics.fmean(r[key]["nll"] for r in randoms),
            "delta": statistics.fmean(r[key]["delta"] for r in randoms),
            "delta_nll": statistics.fmean(r[key]["delta_nll"] for r in randoms),
            "calib_nll": statistics.fmean(r[key]["calib_nll"] for r in randoms),
        }
    rows[f"random_index (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})"] = mean_row
    for row in rows.values():
        for key in ("own", "transfer"):
            row[key].pop("flags", None)
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_table(payload: dict[str, Any], own: str, other: str) -> str:
    s = payload["settings"]
    summary = payload["summary"]
    n_own = summary["unedited"]["own"]["count"]
    n_other = summary["unedited"]["transfer"]["count"]
    lines = [
        f"Adapter `{own}` ({payload['adapter']}, r={payload['adapter_config']['r']}, "
        f"alpha={payload['adapter_config']['lora_alpha']}, all-linear) on SmolLM2-135M-Instruct. "
        f"Own task `{own}` (n={n_own}), transfer task `{other}` (n={n_other}); splits {' + '.join(s['splits'])} "
        "pooled. Accuracy = `lora_retriever.tasks.is_correct`, greedy, "
        f"max_new_tokens={s['max_new_tokens']}. NLL = mean answer-token cross-entropy (teacher forcing) on the "
        f"same items; calib NLL on the {payload['calibration']['num_examples']} calibration records.",
        "",
        f"| method | {own} acc % (±SE) | Δ acc | flips +/− | {own} NLL | {other} acc % (±SE) | Δ acc | "
        f"flips +/− | {other} NLL | calib NLL | ‖ΔW′−ΔW‖/‖ΔW‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cells = [f"`{name}`" if not name.startswith("base") else name]
        for key in ("own", "transfer"):
            r = row[key]
            acc = f"{_pct(r['accuracy'])} ± {_pct(r['se'])}"
            if "accuracy_sd_over_seeds" in r:
                acc += f" (seed sd {_pct(r['accuracy_sd_over_seeds'])})"
            delta = "—" if name == "unedited" else f"{100 * r['delta']:+.1f}"
            if "delta_paired_se" in r and name != "unedited":
                delta += f" ± {_pct(r['delta_paired_se'])}"
            flip = r.get("flips_vs_unedited")
            flip_s = "—" if flip is None or name == "unedited" else f"+{flip[0]} / −{flip[1]}"
            cells += [acc, delta, flip_s, f"{r['nll']:.3f}"]
        cells.append(f"{row['own']['calib_nll']:.3f}")
        info = payload["edits"].get(name)
        if info is None and name.startswith("random_index ("):
            infos = [v for k, v in payload["edits"].items() if k.startswith("random_index/")]
            change = statistics.fmean(v["relative_change_frobenius"] for v in infos)
            cells.append(f"{change:.3f}")
        else:
            cells.append("—" if info is None else f"{info['relative_change_frobenius']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    ri = [v for k, v in payload["edits"].items() if k.startswith("random_index/")]
    overlap = ""
    if ri:
        amp = statistics.fmean(v["overlap_with_abs_select"]["amplified"] for v in ri)
        sup = statistics.fmean(v["overlap_with_abs_select"]["suppressed"] for v in ri)
        overlap = f" random_index picks overlap abs_select's on {_pct(amp)}% (amplified) / {_pct(sup)}% (suppressed)."
    cfg = payload["edits"]["abs_select"]["config"]
    k = payload["adapter_config"]["r"]
    n_amp = min(k, math.floor(cfg["amp_frac"] * k + 0.5))
    n_sup = min(k - n_amp, math.floor(cfg["sup_frac"] * k + 0.5))
    lines += [
        "",
        f"Edits: all {payload['edits']['abs_select']['modules']} LoRA modules; abs_select / random_index amplify "
        f"round({cfg['amp_frac']}·k) directions ×{cfg['amp_factor']} and suppress round({cfg['sup_frac']}·k) "
        f"×{cfg['sup_factor']} (k={k} → {n_amp} and {n_sup}); gd: σ·exp(−{cfg['eta']}·g/mean|g|) ({cfg['gd_update']}); "
        f"preserve_l1={cfg['preserve_l1']}. Calibration: first {payload['calibration']['num_examples']} records "
        f"of `{payload['calibration']['path']}` ({payload['calibration']['num_target_tokens']} answer tokens); "
        f"random_index seeds {s['random_seeds']}.{overlap} SE = binomial √(p(1−p)/n); Δ acc ± paired SE (sd of the per-item difference / √n). Flips = items "
        "wrong→right / right→wrong vs the unedited adapter. Note: test and test_alt ask about the same 20 "
        "subjects in different wordings, so the pooled items are not independent.",
        "",
        f"Command (`{payload['seconds_total']:.0f}` s, {payload['torch_threads']} torch thread(s), CPU):",
        "",
        "```bash",
        payload["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
