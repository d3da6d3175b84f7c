"""Adapters: loading PEFT-format LoRA pools and the per-sample mixture layers."""

from swift.tuners.lora_layers import (
    LoraLinear,
    LoraRouting,
    current_routing,
    lora_mixture_context,
    mixture_kernels,
)
from swift.tuners.peft_format import (
    AdapterLoadError,
    LoraAdapter,
    LoraAdapterConfig,
    read_adapter_dir,
    write_adapter_dir,
)
from swift.tuners.swift_model import Swift, SwiftModel

__all__ = [
    "AdapterLoadError",
    "LoraAdapter",
    "LoraAdapterConfig",
    "LoraLinear",
    "LoraRouting",
    "Swift",
    "SwiftModel",
    "current_routing",
    "lora_mixture_context",
    "mixture_kernels",
    "read_adapter_dir",
    "write_adapter_dir",
]
