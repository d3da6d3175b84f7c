"""The universal retrievers' configs, importable without torch (the CLI builds its flags from them):
:class:`RetrieverConfig` (the model's shape, stored in its checkpoint) and :class:`TrainConfig` (the run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["FUSIONS", "RetrieverConfig", "TrainConfig"]


FUSIONS = ("sf", "ff")
"""``sf``: score-level fusion (separate towers, sum of normalised vectors); ``ff``: feature-level fusion."""
_TOWER, _FUSE = "image tower", "fusion"


@dataclass
class RetrieverConfig:
    """The shape of a universal retriever (what its checkpoint's ``retriever_config.json`` holds)."""

    fusion: str = field(
        default="sf", metadata={"help": "sf (score-level) or ff (feature-level)", "choices": FUSIONS}
    )
    text_model_path: str | None = field(
        default=None,
        metadata={"help": "sentence-transformers folder of the text tower (none: packaged MiniLM)"},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on the text tower (0: frozen text tower)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha on the text tower"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"], metadata={"help": "text tower modules LoRA wraps"}
    )
    lora_layers: int = field(
        default=2,
        metadata={
            "help": "LoRA on the text tower's top N layers only (0: all); the layers below run without a backward"
        },
    )
    max_text_tokens: int = field(default=64, metadata={"help": "text tokens kept (longer texts are cut)"})
    image_size: int = field(default=32, metadata={"help": "side images are resized to", "group": _TOWER})
    patch_size: int = field(default=8, metadata={"help": "ViT patch side", "group": _TOWER})
    vision_hidden_size: int = field(default=128, metadata={"help": "ViT width", "group": _TOWER})
    vision_layers: int = field(default=3, metadata={"help": "ViT layers", "group": _TOWER})
    vision_heads: int = field(default=4, metadata={"help": "ViT attention heads", "group": _TOWER})
    vision_intermediate_size: int = field(default=512, metadata={"help": "ViT MLP width", "group": _TOWER})
    fusion_layers: int = field(default=2, metadata={"help": "FF transformer layers", "group": _FUSE})
    fusion_heads: int = field(default=4, metadata={"help": "FF attention heads", "group": _FUSE})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights"})

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for name in (
            "max_text_tokens",
            "image_size",
            "patch_size",
            "vision_hidden_size",
            "vision_layers",
            "vision_heads",
            "vision_intermediate_size",
            "fusion_layers",
            "fusion_heads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lora_r", "lora_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; pick sizes "
                "that tile the image"
            )
        if self.vision_hidden_size % self.vision_heads or self.vision_hidden_size % 4:
            raise ValueError(
                f"vision_hidden_size {self.vision_hidden_size} must be divisible by vision_heads "
                f"({self.vision_heads}) and by 4 (sin-cos positions)"
            )
        self.lora_target_modules = list(self.lora_target_modules)
        if self.text_model_path is not None:
            self.text_model_path = str(Path(self.text_model_path).expanduser())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrieverConfig:
        """Raises: ValueError: unknown keys or invalid values."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown retriever config keys {unknown}; known: {[f.name for f in fields(cls)]}"
            )
        return cls(**data)


@dataclass
class TrainConfig:
    """How :func:`train_retriever` trains (each field is a flag of ``python -m lora_retriever.mbeir train``)."""

    data_root: str = field(metadata={"help": "M-BEIR folder (UniIR's layout; 'build --out_dir' writes one)"})
    out_dir: str = field(metadata={"help": "checkpoint folder (refused when not empty, unless --overwrite)"})
    split: str = field(default="train", metadata={"help": "split to train on"})
    instruct: bool = field(
        default=True, metadata={"help": "prefix query texts with task prompts (UniIR Instruct)"}
    )
    steps: int = field(default=200, metadata={"help": "optimizer steps (0: save the untrained retriever)"})
    batch_size: int = field(default=32, metadata={"help": "queries per step (in-batch negatives)"})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "lr of the new weights (image tower, fusion)"}
    )
    text_learning_rate: float = field(default=3e-4, metadata={"help": "lr of the text tower's LoRA"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with a linear warmup"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and of the batches"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty out_dir"})
    progress: bool = field(default=True, metadata={"help": "progress bar", "cli": False})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            low = 0 if name == "steps" else 2
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("learning_rate", "text_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        out_dir = Path(self.out_dir).expanduser()
        if out_dir.exists() and any(out_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(f"out_dir {str(out_dir)!r} is not empty; pass --overwrite to replace it")
