"""Sensitivity-based spectral editing of LoRA adapters.

Each LoRA update ``ΔW = s·B·A`` is decomposed as ``s·U diag(σ) Vᵀ`` without forming it (``svd``); forward /
backward hooks measure ``g_σ = ∂L/∂σ`` of a task loss on calibration data (``hooks``); singular directions
are amplified or suppressed from ``|g_σ|`` (``edit``); the edited factors ``B′ = U diag(√σ′)``,
``A′ = diag(√σ′) Vᵀ`` are written as a normal PEFT adapter (``io``, ``pipeline``). CLI:
``python -m spectral_edit edit|eval``; installation check: ``python -m spectral_edit.smoke_test``.

Importing this package loads torch only (PEFT and transformers load lazily in ``pipeline``).
"""

from spectral_edit.edit import EDIT_MODES, EditConfig, apply_spectral_edit, spectral_gate
from spectral_edit.hooks import (
    HookContext,
    ModuleSpec,
    SigmaHookError,
    compute_sigma_gradients,
    register_sigma_hooks,
)
from spectral_edit.io import load_lora_adapter
from spectral_edit.svd import LowRankSVD, lowrank_svd_from_ba, rebuild_ba_from_uv_sigma

__all__ = [
    "EDIT_MODES",
    "EditConfig",
    "HookContext",
    "LowRankSVD",
    "ModuleSpec",
    "SigmaHookError",
    "apply_spectral_edit",
    "compute_sigma_gradients",
    "load_lora_adapter",
    "lowrank_svd_from_ba",
    "rebuild_ba_from_uv_sigma",
    "register_sigma_hooks",
    "spectral_gate",
]
