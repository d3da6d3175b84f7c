"""Adapters: loading PEFT-format LoRA pools and the per-sample mixture layers."""

from swift.tuners.lora_layers import LoraLinear, LoraRouting, current_routing, lora_mixture_context
from swift.tuners.peft_format import AdapterLoadError, LoraAdapterConfig, read_adapter_dir
from swift.tuners.swift_model import Swift, SwiftModel

__all__ = [
    "AdapterLoadError",
    "LoraAdapterConfig",
    "LoraLinear",
    "LoraRouting",
    "Swift",
    "SwiftModel",
    "current_routing",
    "lora_mixture_context",
    "read_adapter_dir",
]
