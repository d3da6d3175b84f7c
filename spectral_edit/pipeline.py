"""The edit and eval workflows behind the CLI: load -> decompose -> calibrate -> edit -> rebuild -> save.

Calibration runs on the adapter loaded in plain PEFT (``PeftModel.from_pretrained`` on a copy of the
adapter with PEFT's canonical key names, so ms-swift ``.default.`` keys load too), and checks that PEFT holds
exactly the factors and the scaling this package read: the hooks then measure ``g_σ`` of the adapter being
edited, never of a silently half-loaded one. ``g_σ`` needs only each LoRA module's input and output, so
there is no reparametrisation of the model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectral_edit.edit import EditConfig, spectral_gate
from spectral_edit.hooks import ModuleSpec, compute_sigma_gradients, count_target_tokens, resolve_module
from spectral_edit.io import load_lora_adapter
from spectral_edit.svd import LowRankSVD, lowrank_svd_from_ba, rebuild_ba_from_uv_sigma
from swift.tuners.peft_format import (
    CONFIG_NAME,
    LoraAdapter,
    parse_lora_ab_key,
    peft_lora_key,
    write_adapter_dir,
)

logger = logging.getLogger(__name__)

__all__ = [
    "META_NAME",
    "EditJob",
    "EvalJob",
    "ModuleEdit",
    "decompose_adapter",
    "edit_adapter_state",
    "evaluate",
    "load_base_model",
    "load_peft_model",
    "run_edit",
    "select_modules",
]

META_NAME = "spectral_edit_meta.json"


# ----------------------------------------------------------------------------------------------------------
# Library steps
# ----------------------------------------------------------------------------------------------------------


def select_modules(adapter: LoraAdapter, target_modules: list[str] | None) -> list[str]:
    """The adapter's modules to edit: all, or those named (exactly or by a dotted suffix, e.g. ``v_proj``).

    Raises:
        ValueError: ``target_modules`` selects nothing (lists the adapter's module suffixes).
    """
    if not target_modules:
        return list(adapter.pairs)
    chosen = [m for m in adapter.pairs if any(m == t or m.endswith("." + t) for t in target_modules)]
    if not chosen:
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in adapter.pairs})
        raise ValueError(
            f"target_modules {target_modules} match none of the adapter's modules (suffixes {suffixes}); pass "
            "module names or suffixes the adapter has."
        )
    return chosen


def decompose_adapter(adapter: LoraAdapter, modules: list[str]) -> dict[str, tuple[LowRankSVD, float]]:
    """``{module: (svd of B·A, scaling)}`` for the given modules."""
    result = {}
    for module in modules:
        pair = adapter.pairs[module]
        svd = lowrank_svd_from_ba(pair.lora_B, pair.lora_A)
        if svd.S.numel() < pair.r:
            logger.info("%s: rank %d of r=%d (zero singular values dropped)", module, svd.S.numel(), pair.r)
        result[module] = (svd, adapter.scaling(module))
    return result


@dataclass
class ModuleEdit:
    """One module's edit, as recorded in ``spectral_edit_meta.json``."""

    module: str
    r: int
    scaling: float
    sigma_before: list[float]
    sigma_after: list[float]
    g_sigma: list[float] | None
    amplified: list[int] = field(default_factory=list)
    suppressed: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "rank": len(self.sigma_before),
            "scaling": self.scaling,
            "sigma_before": self.sigma_before,
            "sigma_after": self.sigma_after,
            "g_sigma": self.g_sigma,
            "amplified": self.amplified,
            "suppressed": self.suppressed,
        }


def edit_adapter_state(
    adapter: LoraAdapter,
    decompositions: dict[str, tuple[LowRankSVD, float]],
    g_sigma: dict[str, torch.Tensor] | None,
    config: EditConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, ModuleEdit]]:
    """Edit every decomposed module and build the new state dict (PEFT canonical keys).

    Modules not in ``decompositions`` keep their factors bit for bit; non-LoRA entries pass through. Edited
    factors are ``B′ = U diag(√σ′)``, ``A′ = diag(√σ′) Vᵀ``, zero-padded to the module's ``r`` and cast to the
    original dtype. ``random_index`` draws from one generator seeded with ``config.seed``, modules in sorted
    order.

    Raises:
        ValueError: ``g_sigma`` lacks a decomposed module (modes that need it).
    """
    generator = torch.Generator().manual_seed(config.seed)
    state = {k: v for k, v in adapter.state.items() if parse_lora_ab_key(k) is None}
    edits: dict[str, ModuleEdit] = {}
    for module, pair in adapter.pairs.items():
        lora_A, lora_B = pair.lora_A, pair.lora_B
        if module in decompositions:
            svd, scaling = decompositions[module]
            g = None if g_sigma is None else g_sigma.get(module)
            if g is None and config.mode != "random_index":
                raise ValueError(
                    f"g_sigma has no entry for module {module!r}; mode {config.mode!r} needs one."
                )
            gate = spectral_gate(svd.S, g, config, generator=generator)
            lora_B, lora_A = rebuild_ba_from_uv_sigma(
                svd.U, svd.Vh, gate.sigma, rank=pair.r, dtype=pair.lora_A.dtype
            )
            edits[module] = ModuleEdit(
                module=module,
                r=pair.r,
                scaling=scaling,
                sigma_before=svd.S.tolist(),
                sigma_after=gate.sigma.tolist(),
                g_sigma=None if g is None else g.tolist(),
                amplified=gate.amplified.tolist(),
                suppressed=gate.suppressed.tolist(),
            )
        state[peft_lora_key(module, "A")] = lora_A
        state[peft_lora_key(module, "B")] = lora_B
    return state, edits


def load_base_model(base_model: str, model_type: str = "auto", device: str = "cpu") -> tuple[nn.Module, Any]:
    """``swift.llm.get_model_tokenizer`` for a local directory (with ``model_type``) or a packaged model type.

    Raises:
        FileNotFoundError: ``base_model`` is neither a directory nor a ``swift.llm`` model type.
    """
    from swift.llm import MODEL_TYPES, get_model_tokenizer

    path = Path(base_model).expanduser()
    if path.is_dir():
        return get_model_tokenizer(model_type, path, device=device)
    if base_model in MODEL_TYPES:
        return get_model_tokenizer(base_model, device=device)
    raise FileNotFoundError(
        f"base_model {base_model!r} is neither a local model directory nor a model type of swift.llm "
        f"({sorted(MODEL_TYPES)}); nothing is downloaded."
    )


def load_peft_model(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    """Load ``adapter`` onto ``model`` with ``peft.PeftModel.from_pretrained`` and check what PEFT holds.

    The adapter is written to a temporary directory with PEFT's canonical keys first (PEFT inserts the adapter
    name itself, so ``.default.`` keys would not load). Afterwards every module's ``lora_A``/``lora_B`` must
    equal the file's factors and PEFT's scaling must equal ``adapter.scaling`` (same rank/alpha reading).

    Raises:
        ValueError: no ``adapter_config.json``; PEFT put a LoRA variant (DoRA, aLoRA, ...) on a module; or
            PEFT's factors / scaling differ from the file's.
    """
    from peft import PeftModel

    if not adapter.config:
        raise ValueError(
            f"{adapter.path} has no {CONFIG_NAME}; calibration loads the adapter with PEFT, which needs it. "
            "Write a PEFT LoraConfig (r, lora_alpha, target_modules) next to the weights."
        )
    state = {k: v for k, v in adapter.state.items() if parse_lora_ab_key(k) is None}
    for module, pair in adapter.pairs.items():
        state[peft_lora_key(module, "A")] = pair.lora_A
        state[peft_lora_key(module, "B")] = pair.lora_B
    with tempfile.TemporaryDirectory(prefix="spectral-edit-") as tmp:
        write_adapter_dir(tmp, state, adapter.config)
        peft_model = PeftModel.from_pretrained(model, tmp).eval()
    table = dict(peft_model.named_modules())
    for module, pair in adapter.pairs.items():
        layer = resolve_module(peft_model, module, table)
        name = "default"
        if getattr(layer, "lora_variant", {}).get(name) is not None:
            raise ValueError(
                f"PEFT loaded {module!r} as a {type(layer.lora_variant[name]).__name__} LoRA variant; only plain "
                "LoRA (ΔW = s·B·A) can be edited."
            )
        loaded_a, loaded_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        same = torch.equal(loaded_a.detach().cpu().to(pair.lora_A.dtype), pair.lora_A) and torch.equal(
            loaded_b.detach().cpu().to(pair.lora_B.dtype), pair.lora_B
        )
        if not same:
            raise ValueError(f"PEFT did not load the file's factors for {module!r}; check target_modules.")
        if not math.isclose(layer.scaling[name], adapter.scaling(module), rel_tol=1e-12):
            raise ValueError(
                f"{module!r}: PEFT's scaling {layer.scaling[name]} differs from {adapter.scaling(module)} read "
                "from adapter_config.json."
            )
    return peft_model


# ----------------------------------------------------------------------------------------------------------
# Workflows
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EditJob:
    """Everything ``python -m spectral_edit edit`` needs (see ``cli.py`` for the flags)."""

    base_model: str
    lora_path: str
    out_dir: str
    config: EditConfig
    calib_data: str | None = None
    model_type: str = "auto"
    num_calib: int | None = 32
    max_length: int = 256
    batch_size: int = 4
    target_modules: list[str] | None = None
    adapter_name: str | None = None
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


def _prepare_out_dir(out_dir: Path, lora_path: Path, overwrite: bool) -> None:
    if out_dir.resolve() == lora_path.resolve():
        raise ValueError(
            f"out_dir {str(out_dir)!r} is the input adapter; write the edit to another directory."
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out_dir {str(out_dir)!r} is not empty; pass --overwrite or another directory."
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def run_edit(job: EditJob) -> dict[str, Any]:
    """Calibrate, edit and save; returns the meta dict written to ``spectral_edit_meta.json``.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: bad inputs (each names the flag and the fix).
    """
    from spectral_edit.data import batch_examples, encode_calibration, read_qa_pairs

    start = time.perf_counter()
    lora_path, out_dir = Path(job.lora_path).expanduser(), Path(job.out_dir).expanduser()
    adapter = load_lora_adapter(lora_path, adapter_name=job.adapter_name)
    if job.calib_data is None and job.config.mode != "random_index":
        raise ValueError(f"mode {job.config.mode!r} needs --calib_data (only random_index runs without it).")
    pairs = None if job.calib_data is None else read_qa_pairs(job.calib_data, limit=job.num_calib)
    _prepare_out_dir(out_dir, lora_path, job.overwrite)
    modules = select_modules(adapter, job.target_modules)
    decompositions = decompose_adapter(adapter, modules)
    logger.info("decomposed %d modules of %s", len(modules), lora_path)

    g_sigma, calib = None, {"path": job.calib_data, "num_examples": 0, "num_target_tokens": 0}
    probed = [m for m in modules if decompositions[m][0].S.numel() > 0]
    if pairs is not None:
        g_sigma = {}
        if probed:
            model, tokenizer = load_base_model(job.base_model, job.model_type, job.device)
            from swift.llm import get_template

            template = get_template(model.model_type, tokenizer)
            examples = encode_calibration(template, pairs, max_length=job.max_length)
            batches = batch_examples(examples, job.batch_size, template.tokenizer.pad_token_id)
            calib.update(num_examples=len(examples), num_target_tokens=count_target_tokens(batches))
            peft_model = load_peft_model(model, adapter)
            specs = [
                ModuleSpec(m, decompositions[m][0].U, decompositions[m][0].V, decompositions[m][1])
                for m in probed
            ]
            g_sigma = compute_sigma_gradients(peft_model, batches, specs, progress=job.progress)
        for module in modules:  # a module without nonzero singular values has nothing to probe
            g_sigma.setdefault(module, torch.zeros(0, dtype=torch.float64))

    state, edits = edit_adapter_state(adapter, decompositions, g_sigma, job.config)
    write_adapter_dir(out_dir, state)
    config_file = (lora_path if lora_path.is_dir() else lora_path.parent) / CONFIG_NAME
    if config_file.is_file():
        shutil.copyfile(config_file, out_dir / CONFIG_NAME)  # verbatim: the weights keep their shapes
    else:
        logger.warning("%s has no %s; the edited adapter has none either", lora_path, CONFIG_NAME)
    meta = {
        "method": "spectral_edit",
        "base_model": job.base_model,
        "lora_path": str(lora_path),
        "config": job.config.to_dict(),
        "calibration": {**calib, "max_length": job.max_length, "batch_size": job.batch_size},
        "target_modules": job.target_modules,
        "seconds": round(time.perf_counter() - start, 3),
        "modules": {m: e.to_dict() for m, e in edits.items()},
    }
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("edited %d modules in %.1f s -> %s", len(edits), meta["seconds"], out_dir)
    return meta


@dataclass
class EvalJob:
    """Everything ``python -m spectral_edit eval`` needs."""

    base_model: str
    test_data: str
    output: str
    lora_dir: str | None = None
    model_type: str = "auto"
    num_test: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 8
    match: str = "exact"
    device: str = "cpu"
    progress: bool = True


def answer_form(text: str, match: str) -> str:
    """What ``--match`` compares: ``exact``: the whitespace-stripped text; ``normalized``: the project's one
    exact-match rule, :func:`lora_retriever.metrics.normalize_answer` (the CLI's and the paper protocol's)."""
    if match == "normalized":
        from lora_retriever.metrics import normalize_answer

        return normalize_answer(text)
    return text.strip()


def evaluate(job: EvalJob) -> dict[str, Any]:
    """Greedy generation on the test set, exact-match accuracy; writes and returns the result JSON.

    Raises:
        ValueError: bad ``match`` / ``max_new_tokens``, or test data errors (see ``read_qa_pairs``).
    """
    from spectral_edit.data import read_qa_pairs

    if job.match not in ("exact", "normalized"):
        raise ValueError(f"match must be 'exact' or 'normalized', got {job.match!r}.")
    if (
        isinstance(job.max_new_tokens, bool)
        or not isinstance(job.max_new_tokens, int)
        or job.max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive integer, got {job.max_new_tokens!r}.")
    pairs = read_qa_pairs(job.test_data, limit=job.num_test)
    start = time.perf_counter()
    from transformers import GenerationConfig

    from swift.llm import get_template, inference

    model, tokenizer = load_base_model(job.base_model, job.model_type, job.device)
    template = get_template(model.model_type, tokenizer)
    if job.lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(job.lora_dir).expanduser())).eval()
    predictions = inference(
        model,
        template,
        [p.query for p in pairs],
        batch_size=job.batch_size,
        generation_config=GenerationConfig(max_new_tokens=job.max_new_tokens, do_sample=False),
        progress=job.progress,
    )
    rows = []
    for pair, prediction in zip(pairs, predictions):
        hit = answer_form(prediction, job.match) == answer_form(pair.response, job.match)
        rows.append(
            {"query": pair.query, "reference": pair.response, "prediction": prediction, "correct": hit}
        )
    correct = sum(row["correct"] for row in rows)
    result = {
        "accuracy": correct / len(rows),
        "correct": correct,
        "count": len(rows),
        "base_model": job.base_model,
        "lora_dir": job.lora_dir,
        "test_data": job.test_data,
        "match": job.match,
        "max_new_tokens": job.max_new_tokens,
        "seconds": round(time.perf_counter() - start, 3),
        "predictions": rows,
    }
    output = Path(job.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result
