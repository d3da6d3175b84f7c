"""``cat``: the exact weighted sum of the sources' updates, by concatenating their factors.

    ΔW = Σ_j w_j s_j B_j A_j = [w_1 s_1 B_1 | … | w_k s_k B_k] · [A_1; …; A_k]

so ``A = vstack(A_j)`` ``[Σ r_j, in]`` and ``B = hstack(w_j s_j B_j)`` ``[out, Σ r_j]``. Rank grows with every
source; this is what the per-sample mixture computes for one routing row (LoraRetriever, Zhao et al. 2024,
Sec. 3.3) and what PEFT's ``add_weighted_adapter(combination_type="cat")`` computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_retriever.fusion.base import (
    FusedModule,
    FusionMethod,
    WeightedModule,
    compute_dtype,
    register_fusion_method,
)

__all__ = ["CatFusion"]


@register_fusion_method
class CatFusion(FusionMethod):
    """Exact: rank ``Σ r_j`` at each module (over the sources present there)."""

    name = "cat"

    def fuse_module(self, module_name: str, parts: Sequence[WeightedModule]) -> FusedModule:
        dtype = compute_dtype(parts[0].lora.lora_A)
        lora_A = torch.cat([p.lora.lora_A.to(dtype) for p in parts], dim=0)  # [Σ r_j, in]
        lora_B = torch.cat([p.weight * p.lora.scaling * p.lora.lora_B.to(dtype) for p in parts], dim=1)
        return FusedModule(lora_A, lora_B)
