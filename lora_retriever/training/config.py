"""``TrainConfig``: every setting of one LoRA / QLoRA training run, validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_retriever.embedders.config import ImageRetrievalConfig
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES

__all__ = ["QUANTIZATIONS", "TrainConfig"]

QUANTIZATIONS = ("none", "nf4", "int8")


def _help(text: str, group: str, **more: Any) -> dict[str, Any]:
    return {"help": text, "group": group, **more}


_DATA, _MODEL, _OPTIM, _RUN, _POOL = (
    "data and output",
    "model and LoRA",
    "optimisation",
    "checkpoints and logging",
    "adapter pool",
)


@dataclass
class TrainConfig:
    """Settings of one training run; each field's ``help`` is also its ``train.py`` flag's help.

    The loss is the mean over the answer tokens; AdamW with linear warmup then linear decay; examples longer
    than ``max_length`` lose the answer's tail first, and one whose prompt alone is that long is skipped with
    a warning. ``seed`` seeds the eval split, the data order, the LoRA init and dropout.
    """

    dataset_path: str = field(
        metadata=_help(
            "training data: a JSON list, {'data': [...]} or JSONL of {input, output} or chat "
            "{messages, images} records",
            _DATA,
        )
    )
    output_dir: str | None = field(
        default=None,
        metadata=_help(
            "where the adapter, training_args.json, metrics.json, train.log and checkpoint-<step>/ go "
            "(default: outputs/adapters/<adapter_name>)",
            _DATA,
        ),
    )
    adapter_name: str | None = field(
        default=None,
        metadata=_help("the adapter's name / pool lora_name (default: the dataset's stem)", _DATA),
    )
    eval_split: float = field(default=0.1, metadata=_help("fraction of the records held out for eval", _DATA))
    max_length: int = field(default=512, metadata=_help("max tokens per example", _DATA))
    system: str | None = field(
        default=None, metadata=_help("system prompt for records without their own", _DATA)
    )
    model_type: str = field(
        default=DEFAULT_MODEL_TYPE,
        metadata=_help(
            f"base model type ({DEFAULT_MODEL_TYPE} is packaged; the others need --model_path; auto reads "
            "the directory's config.json)",
            _MODEL,
            choices=MODEL_TYPE_CHOICES,
        ),
    )
    model_path: str | None = field(
        default=None, metadata=_help("local model directory (not needed for the packaged default)", _MODEL)
    )
    lora_r: int = field(default=8, metadata=_help("LoRA rank", _MODEL))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha", _MODEL))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout", _MODEL))
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=_help(
            "module names to adapt (e.g. q_proj v_proj); all-linear: every linear layer but the output head "
            "(a VLM's vision tower and projector included); all-linear-lm: the language model's only",
            _MODEL,
        ),
    )
    quantization: str = field(
        default="none",
        metadata=_help(
            "base model weights: fp32 (none), 4-bit NF4 (QLoRA) or int8, via bitsandbytes",
            _MODEL,
            choices=QUANTIZATIONS,
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("recompute activations in the backward pass (less memory, slower)", _MODEL),
    )
    device: str = field(default="cpu", metadata=_help("torch device to train on", _MODEL))
    epochs: int = field(default=3, metadata=_help("passes over the training split", _OPTIM))
    max_steps: int | None = field(
        default=None, metadata=_help("optimizer steps; overrides --epochs when > 0", _OPTIM)
    )
    learning_rate: float = field(default=2e-3, metadata=_help("AdamW peak learning rate", _OPTIM))
    warmup_ratio: float = field(default=0.1, metadata=_help("fraction of the steps warming up", _OPTIM))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay", _OPTIM))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0 = off)", _OPTIM))
    batch_size: int = field(default=8, metadata=_help("examples per forward pass", _OPTIM))
    grad_accum: int = field(default=1, metadata=_help("forward passes per optimizer step", _OPTIM))
    seed: int = field(default=42, metadata=_help("seed of the split, data order, LoRA init, dropout", _OPTIM))
    save_steps: int = field(
        default=50, metadata=_help("write checkpoint-<step>/ every N steps (0 = never)", _RUN)
    )
    save_total_limit: int | None = field(
        default=None, metadata=_help("keep only the newest N checkpoints", _RUN)
    )
    logging_steps: int = field(default=10, metadata=_help("log the loss every N steps", _RUN))
    resume_from: str | None = field(
        default=None,
        metadata=_help("a checkpoint-<step> folder, or auto (the newest in --output_dir)", _RUN),
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("delete old checkpoints in --output_dir when starting afresh", _RUN)
    )
    register_pool: str | None = field(
        default=None,
        metadata=_help(
            "pool config JSON to add the adapter to (with a retrieval key) after training",
            _POOL,
            metavar="CONFIG",
        ),
    )
    num_key_samples: int = field(default=20, metadata=_help("training samples embedded into the key", _POOL))
    description: str | None = field(default=None, metadata=_help("pool entry description", _POOL))
    task: str | None = field(default=None, metadata=_help("pool entry task", _POOL))
    category: str | None = field(default=None, metadata=_help("pool entry category", _POOL))
    copy_samples: bool = field(
        default=False,
        metadata=_help(
            "copy the dataset to <pool folder>/samples/ instead of pointing samples_path at it", _POOL
        ),
    )
    image: ImageRetrievalConfig = field(
        default_factory=ImageRetrievalConfig,
        metadata={"help": "image key on registration (flags --image_embedder ...)", "cli": False},
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars", "cli": False})

    def __post_init__(self) -> None:
        if not self.dataset_path:
            raise ValueError("dataset_path is required (--dataset_path FILE).")
        if self.adapter_name is None:
            self.adapter_name = Path(self.dataset_path).stem
        if not self.adapter_name or "/" in self.adapter_name or "." in self.adapter_name:
            raise ValueError(
                f"adapter_name must be a non-empty name without '/' or '.', got {self.adapter_name!r}; "
                "pass --adapter_name NAME."
            )
        if not self.output_dir:
            self.output_dir = str(Path("outputs") / "adapters" / self.adapter_name)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty; pass module names (e.g. q_proj v_proj) or all-linear.")
        for keyword in ("all-linear", "all-linear-lm"):
            if keyword in self.target_modules and len(self.target_modules) > 1:
                raise ValueError(
                    f"target_modules {self.target_modules} mixes {keyword!r} with module names; pass one or the "
                    "other."
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
        if isinstance(data.get("image"), dict):
            data = {**data, "image": ImageRetrievalConfig(**data["image"])}
        return cls(**data)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
