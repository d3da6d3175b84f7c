"""``VlmRecipe``: everything that decides the built VLM's weights, validated at construction, with its hash.

The hash names the cache folder (``$LORA_RETRIEVER_CACHE/vlm/<hash>/``): the same recipe reuses the folder, any
change builds a new one. It covers every field (with ``image_size=None`` resolved to the suite's size) and
``BUILD_VERSION`` (bumped when the build code changes its result).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["BUILD_VERSION", "VISION_MODELS", "VlmRecipe"]

#: Bump when a change to the build code changes the model it produces for an unchanged recipe.
BUILD_VERSION = 2  # 2: redrawn screens (one-digit counter, work-week calendar, wide hour hand)
#: Vision transformers the tower can be built from (transformers config classes).
VISION_MODELS = ("clip", "siglip")

_VISION, _PRETRAIN, _TRAIN = (
    "vision tower and projector",
    "stage 1: vision pre-training",
    "stage 2: alignment",
)


@dataclass
class VlmRecipe:
    """How to build the small VLM: the vision tower's shape, the image/patch sizes and the training run.

    The language model is always the packaged SmolLM2-135M-Instruct (frozen); only the vision tower and the
    projector train, with AdamW (linear warmup, linear decay) on the answer tokens of (image, question,
    answer) triples.
    """

    vision_model: str = field(
        default="siglip",
        metadata={"help": "vision transformer config class", "choices": VISION_MODELS, "group": _VISION},
    )
    image_size: int | None = field(
        default=32,
        metadata={
            "help": "side in pixels the image processor resizes images to (none: the suite's IMAGE_SIZE)",
            "group": _VISION,
        },
    )
    patch_size: int = field(
        default=8,
        metadata={"help": "ViT patch side; (image_size/patch_size)^2 image tokens", "group": _VISION},
    )
    vision_hidden_size: int = field(default=192, metadata={"help": "vision tower width", "group": _VISION})
    vision_layers: int = field(default=4, metadata={"help": "vision transformer layers", "group": _VISION})
    vision_heads: int = field(default=3, metadata={"help": "vision attention heads", "group": _VISION})
    vision_intermediate_size: int = field(
        default=768, metadata={"help": "vision MLP width", "group": _VISION}
    )
    projector_hidden_act: str = field(
        default="gelu", metadata={"help": "activation between the projector's two linears", "group": _VISION}
    )
    train_examples: int = field(
        default=8000, metadata={"help": "training (image, question, answer) triples", "group": _PRETRAIN}
    )
    domain_weights: list[str] = field(
        default_factory=lambda: ["digits=4"],
        metadata={
            "help": "share of each image domain in the training triples, as DOMAIN=WEIGHT (unnamed domains: 1); "
            "digits, the one domain with few images (875), gets more",
            "group": _PRETRAIN,
        },
    )
    heldout_examples: int = field(
        default=560, metadata={"help": "held-out triples for the accuracy report", "group": _PRETRAIN}
    )
    pretrain_steps: int = field(
        default=2500, metadata={"help": "vision pre-training steps (0: none)", "group": _PRETRAIN}
    )
    pretrain_batch_size: int = field(
        default=32, metadata={"help": "images per pre-training step", "group": _PRETRAIN}
    )
    pretrain_learning_rate: float = field(
        default=1e-3, metadata={"help": "pre-training AdamW peak learning rate", "group": _PRETRAIN}
    )
    pretrain_weight_decay: float = field(
        default=0.05, metadata={"help": "pre-training AdamW weight decay", "group": _PRETRAIN}
    )
    pretrain_shift: int = field(
        default=3, metadata={"help": "random shift of pre-training images, in pixels", "group": _PRETRAIN}
    )
    pretrain_noise: float = field(
        default=0.3,
        metadata={
            "help": "std of Gaussian noise added to normalised pre-training pixels",
            "group": _PRETRAIN,
        },
    )
    steps: int = field(
        default=250, metadata={"help": "alignment steps (through the frozen LM)", "group": _TRAIN}
    )
    batch_size: int = field(default=8, metadata={"help": "examples per step", "group": _TRAIN})
    learning_rate: float = field(
        default=3e-3, metadata={"help": "alignment AdamW peak learning rate (projector)", "group": _TRAIN}
    )
    tower_lr_scale: float = field(
        default=0.03,
        metadata={
            "help": "the vision tower's alignment learning rate as a fraction of learning_rate (0: the tower "
            "keeps its pre-trained weights, as in LLaVA's alignment stage; at 1/3 of it the LM's gradients "
            "undid the pre-training)",
            "group": _TRAIN,
        },
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "fraction of steps warming up", "group": _TRAIN}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "group": _TRAIN})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient clipping (0 = off)", "group": _TRAIN}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the data, the init and the data order", "group": _TRAIN}
    )

    def __post_init__(self) -> None:
        if self.vision_model not in VISION_MODELS:
            raise ValueError(f"vision_model must be one of {VISION_MODELS}, got {self.vision_model!r}.")
        for name in (
            "patch_size",
            "vision_hidden_size",
            "vision_layers",
            "vision_heads",
            "vision_intermediate_size",
            "train_examples",
            "steps",
            "batch_size",
            "pretrain_batch_size",
        ):
            _positive(name, getattr(self, name))
        for name in ("heldout_examples", "pretrain_steps", "pretrain_shift"):
            _non_negative(name, getattr(self, name))
        if self.image_size is not None:
            _positive("image_size", self.image_size)
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; pick a "
                    "patch_size that divides it."
                )
        self.domain_weights = sorted(self.domain_weights)  # order doesn't matter: one hash per mix
        self.weights()  # validates the DOMAIN=WEIGHT entries
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size {self.vision_hidden_size} is not divisible by vision_heads "
                f"{self.vision_heads}; pick heads that divide the width."
            )
        for name in ("learning_rate", "pretrain_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name in (
            "weight_decay",
            "max_grad_norm",
            "pretrain_weight_decay",
            "pretrain_noise",
            "tower_lr_scale",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")

    def weights(self) -> dict[str, float]:
        """``domain_weights`` as ``{domain: weight}`` (domains not named weigh 1).

        Raises:
            ValueError: an entry that isn't ``DOMAIN=WEIGHT`` with a finite weight > 0, or a domain named twice.
        """
        parsed: dict[str, float] = {}
        for entry in self.domain_weights:
            name, sep, value = str(entry).partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not sep or not name or not (math.isfinite(weight) and weight > 0) or name in parsed:
                raise ValueError(
                    f"domain_weights entry {entry!r} is not DOMAIN=WEIGHT with a weight > 0 (each domain once); "
                    "e.g. --domain_weights digits=3 clock=2."
                )
            parsed[name] = weight
        return parsed

    @property
    def image_tokens(self) -> int:
        """``<image>`` tokens one image expands to (the CLS token is dropped); needs a resolved ``image_size``."""
        if self.image_size is None:
            raise ValueError("image_size is not resolved yet; call resolved(image_size) first.")
        return (self.image_size // self.patch_size) ** 2

    def resolved(self, default_image_size: int) -> VlmRecipe:
        """This recipe with ``image_size=None`` replaced by ``default_image_size`` (validated again)."""
        if self.image_size is not None:
            return self
        return VlmRecipe(**{**self.to_dict(), "image_size": default_image_size})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VlmRecipe:
        """Build from a dict (e.g. ``build.json``'s ``recipe``); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VlmRecipe field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def recipe_hash(self) -> str:
        """12 hex digits of the SHA-256 of the (resolved) recipe and ``BUILD_VERSION``."""
        if self.image_size is None:
            raise ValueError("hash a resolved recipe (image_size set); call resolved(image_size) first.")
        payload = json.dumps({"recipe": self.to_dict(), "build_version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
