"""``TrainConfig``: every setting of one LoRA / QLoRA training run, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["QUANTIZATIONS", "TrainConfig"]

QUANTIZATIONS = ("none", "nf4", "int8")


@dataclass
class TrainConfig:
    """Settings of one training run (``train.py --help`` documents each flag of the same name).

    Attributes:
        dataset_path: training data: a JSON list, ``{"data": [...]}`` or JSONL of ``{"input", "output"}``
            records or of chat ``messages`` (see ``lora_retriever.training.data``).
        output_dir: where the adapter, ``training_args.json``, ``metrics.json``, ``train.log`` and the
            ``checkpoint-<step>/`` folders go.
        adapter_name: the adapter's name (its ``lora_name`` in a pool); defaults to the dataset file's stem.
        model_type / model_path: the base model, as ``swift.llm.get_model_tokenizer`` takes them.
        lora_r / lora_alpha / lora_dropout / target_modules: the PEFT ``LoraConfig`` (``["all-linear"]``
            targets every linear layer but the output head).
        quantization: ``"none"`` (fp32 LoRA), ``"nf4"`` (QLoRA: 4-bit NF4 base) or ``"int8"`` (LLM.int8 base).
        epochs / max_steps: passes over the training split, unless ``max_steps`` (optimizer steps) is set.
        learning_rate / warmup_ratio / weight_decay / max_grad_norm: AdamW with linear warmup then linear
            decay, gradients clipped to ``max_grad_norm`` (0 disables clipping).
        batch_size / grad_accum: examples per forward pass and forward passes per optimizer step.
        max_length: examples are cut to this many tokens (the answer's tail goes first); an example whose
            prompt alone is this long is skipped with a warning.
        eval_split: fraction of the records held out for the eval loss / perplexity (0 = no eval).
        seed: seeds the eval split, the data order, LoRA init and dropout.
        save_steps: write ``checkpoint-<step>/`` every this many steps (0 = never).
        save_total_limit: keep only the newest this many checkpoints (``None`` = keep all).
        logging_steps: log the loss every this many steps.
        resume_from: a checkpoint folder, or ``"auto"`` for the newest one in ``output_dir``.
        overwrite_output_dir: delete existing checkpoints in ``output_dir`` when starting afresh.
        system: optional system prompt for every example without its own.
        register_pool: pool config JSON to add the adapter to (with a retrieval key) after training.
        num_key_samples: training samples embedded into the retrieval key.
        description / task / category: fields of the pool entry.
        copy_samples: copy the dataset next to the pool config instead of pointing at it.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        device: where to train.
        progress: show progress bars.
    """

    dataset_path: str
    output_dir: str
    adapter_name: str | None = None
    model_type: str = "smollm2-135m-instruct"
    model_path: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    quantization: str = "none"
    epochs: int = 3
    max_steps: int | None = None
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    eval_split: float = 0.1
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int | None = None
    logging_steps: int = 10
    resume_from: str | None = None
    overwrite_output_dir: bool = False
    system: str | None = None
    register_pool: str | None = None
    num_key_samples: int = 20
    description: str | None = None
    task: str | None = None
    category: str | None = None
    copy_samples: bool = False
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.dataset_path:
            raise ValueError("dataset_path is required (--dataset_path FILE).")
        if not self.output_dir:
            raise ValueError("output_dir is required (--output_dir DIR).")
        if self.adapter_name is None:
            self.adapter_name = Path(self.dataset_path).stem
        if not self.adapter_name or "/" in self.adapter_name or "." in self.adapter_name:
            raise ValueError(
                f"adapter_name must be a non-empty name without '/' or '.', got {self.adapter_name!r}; "
                "pass --adapter_name NAME."
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty; pass module names (e.g. q_proj v_proj) or all-linear.")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(
                f"target_modules {self.target_modules} mixes 'all-linear' with module names; pass one or the other."
            )
        _positive("lora_r", self.lora_r)
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _positive("max_length", self.max_length)
        _positive("num_key_samples", self.num_key_samples)
        _positive("logging_steps", self.logging_steps)
        if self.max_steps is not None and self.max_steps <= 0:
            self.max_steps = None  # -1 / 0 on the command line: train for `epochs`
        if self.max_steps is None:
            _positive("epochs", self.epochs)
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0 (0 = no checkpoints), got {self.save_steps}.")
        if self.save_total_limit is not None:
            _positive("save_total_limit", self.save_total_limit)
        for name in ("lora_alpha", "learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        for name, value in (
            ("lora_dropout", self.lora_dropout),
            ("warmup_ratio", self.warmup_ratio),
            ("eval_split", self.eval_split),
        ):
            if not (0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a saved ``training_args.json``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
