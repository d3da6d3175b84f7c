"""Shared machinery for methods that merge the ``A`` factors and the ``B`` factors separately.

``linear``, ``ties``, ``dare_linear`` and ``dare_ties`` (as PEFT 0.21's ``add_weighted_adapter`` applies them to
LoRA) never form ``ΔW``: they combine the stacked ``A_j`` into one ``A`` and the stacked ``B_j`` into one ``B``, so
``B A`` contains cross terms ``B_i A_j`` (i ≠ j) that belong to no source. Each source's weight and scaling
``c_j = w_j s_j`` is split over the two factors (PEFT: ``sign(c_j) sqrt|c_j|`` on ``A``, ``sqrt|c_j|`` on ``B``) so
that the diagonal terms ``B_j A_j`` carry exactly ``c_j``.

Sources of different ranks (PEFT refuses them): each factor is sparsified at its own size first (so a
density is a fraction of that source's entries, not of zero padding), then zero-padded to the largest rank
present at the module — ``A_j`` gains zero rows, ``B_j`` zero columns — and combined. Rank direction ``i`` of one
source is thereby paired with rank direction ``i`` of another; LoRA rank directions have no canonical order,
which is one more reason these methods are approximations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lora_retriever.fusion.base import FusedModule, FusionMethod, WeightedModule, compute_dtype

__all__ = ["FactorwiseMethod", "peft_factor_weights"]


def peft_factor_weights(parts: Sequence[WeightedModule]) -> tuple[list[float], list[float]]:
    """PEFT's split of ``c_j = w_j s_j``: ``(sign(c_j) sqrt|c_j|`` for ``A``, ``sqrt|c_j|`` for ``B)``.

    The sign goes on one side only, so a negative weight subtracts the source's ``B_j A_j`` term.
    """
    weights_A, weights_B = [], []
    for part in parts:
        c = part.weight * part.lora.scaling
        root = math.sqrt(abs(c))
        weights_A.append(root if c >= 0 else -root)
        weights_B.append(root)
    return weights_A, weights_B


class FactorwiseMethod(FusionMethod):
    """Base for methods that combine ``A`` and ``B`` separately; subclasses override the three hooks.

    Hooks:
        factor_weights: per-source coefficients for the ``A`` side and the ``B`` side (PEFT's split by default).
        sparsify: drop entries of one source's factor (identity by default), before zero-padding.
        combine: merge the stacked, padded factors ``[k, ...]`` with their coefficients ``[k]`` (weighted sum by
            default).
    """

    def factor_weights(self, parts: Sequence[WeightedModule]) -> tuple[list[float], list[float]]:
        return peft_factor_weights(parts)

    def generator(self, module_name: str) -> torch.Generator | None:
        """A random generator for ``sparsify`` at this module (None: the method is deterministic)."""
        return None

    def sparsify(self, factor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return factor

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_j weights[j] · stacked[j]``: ``stacked`` ``[k, rows, cols]``, ``weights`` ``[k]``."""
        return (stacked * weights.view(-1, 1, 1)).sum(dim=0)

    def fuse_module(self, module_name: str, parts: Sequence[WeightedModule]) -> FusedModule:
        dtype = compute_dtype(parts[0].lora.lora_A)
        device = parts[0].lora.lora_A.device
        rank = max(p.lora.r for p in parts)
        weights_A, weights_B = self.factor_weights(parts)
        generator = self.generator(module_name)
        # PEFT's order: every A factor, then every B factor (matters only for random sparsification).
        factors_A = [self.sparsify(p.lora.lora_A.to(device, dtype), generator) for p in parts]
        factors_B = [self.sparsify(p.lora.lora_B.to(device, dtype), generator) for p in parts]
        stacked_A = torch.stack([_pad_rows(a, rank) for a in factors_A])  # [k, r_max, in]
        stacked_B = torch.stack([_pad_rows(b.T, rank).T for b in factors_B])  # [k, out, r_max]
        lora_A = self.combine(stacked_A, torch.tensor(weights_A, dtype=dtype, device=device))
        lora_B = self.combine(stacked_B, torch.tensor(weights_B, dtype=dtype, device=device))
        return FusedModule(lora_A, lora_B)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended to reach ``rows``: ``[r, n]`` -> ``[rows, n]``."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])], dim=0)
