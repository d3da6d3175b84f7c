"""Fusion: merge several LoRA adapters into one PEFT adapter (``cat``, ``linear``, ``svd``, ``ties``, ``dare_*``).

from lora_retriever.fusion import fuse

fused = fuse(["adapters/a", "adapters/b"], [0.5, 0.5], method="svd", svd_rank=16)
fused.save("adapters/a+b")  # loadable by PeftModel.from_pretrained and Swift.from_pretrained
"""

from lora_retriever.fusion import cat, dare, linear, svd, ties  # noqa: F401  (register the methods)
from lora_retriever.fusion.base import (
    FUSION_METHODS,
    FusedAdapter,
    FusedModule,
    FusionMethod,
    LoraModuleWeights,
    LoraWeights,
    WeightedModule,
    available_methods,
    fuse,
    get_fusion_method,
    register_fusion_method,
)

__all__ = [
    "FUSION_METHODS",
    "FusedAdapter",
    "FusedModule",
    "FusionMethod",
    "LoraModuleWeights",
    "LoraWeights",
    "WeightedModule",
    "available_methods",
    "fuse",
    "get_fusion_method",
    "register_fusion_method",
]
