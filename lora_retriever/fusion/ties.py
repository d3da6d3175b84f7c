"""``ties``: TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models").

Three steps, applied as PEFT 0.21 applies them to LoRA — to the ``A`` factors and the ``B`` factors separately,
each source's factor weighted by PEFT's split of ``w_j s_j`` (see ``factorwise``):

1. **Trim** (Sec. 3, step 1): keep the ``density`` fraction of each source's entries with the largest
   magnitude (``int(density · numel)`` entries), zero the rest.
2. **Elect sign** (step 2): per entry, the sign of ``Σ_j t_j`` over the trimmed, *unweighted* factors
   (``majority_sign_method="total"``) or the sign held by more sources (``"frequency"``); ties go to ``+``.
3. **Disjoint merge** (step 3): per entry, the mean of the weighted values ``c_j t_j`` over the sources whose
   trimmed value has the elected sign (zeros never count).

``density=1`` skips trimming (PEFT does the same).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_retriever.fusion.base import REQUIRED, check_choice, check_density, register_fusion_method
from lora_retriever.fusion.factorwise import FactorwiseMethod

__all__ = ["TiesFusion", "disjoint_merge", "elect_sign_mask", "magnitude_prune"]

MAJORITY_SIGN_METHODS = ("total", "frequency")


def magnitude_prune(factor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude (TIES "trim"); ``density >= 1`` keeps all."""
    if density >= 1.0:
        return factor
    keep = int(density * factor.numel())
    mask = torch.zeros(factor.numel(), dtype=factor.dtype, device=factor.device)
    mask[torch.topk(factor.abs().flatten(), k=keep, largest=True).indices] = 1
    return factor * mask.view_as(factor)


def elect_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Boolean ``[k, ...]``: where each source agrees with the elected sign (TIES "elect").

    Args:
        stacked: the trimmed, unweighted factors ``[k, rows, cols]``.
        method: ``"total"`` (sign of the sum) or ``"frequency"`` (sign of the sign count).
    """
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the agreeing sources (TIES "disjoint merge"): ``[k, ...]`` -> ``[...]``."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


@register_fusion_method
class TiesFusion(FactorwiseMethod):
    """TIES on ``A`` and ``B`` separately; rank ``max r_j`` per module.

    Options:
        density: fraction of each source factor's entries kept, in (0, 1] (required).
        majority_sign_method: ``"total"`` (default) or ``"frequency"``.
    """

    name = "ties"
    option_defaults = {"density": REQUIRED, "majority_sign_method": "total"}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options["density"] = check_density(options["density"])
        check_choice("majority_sign_method", options["majority_sign_method"], MAJORITY_SIGN_METHODS)
        return options

    def sparsify(self, factor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return magnitude_prune(factor, self.options["density"])

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        agree = elect_sign_mask(stacked, self.options["majority_sign_method"])
        return disjoint_merge(stacked * weights.view(-1, 1, 1), agree)
