"""``svd``: the exact weighted sum, re-factored by SVD without forming the dense ``ΔW``; optionally truncated.

With ``R = Σ r_j`` (over the sources present at a module),

    ΔW = B_s A_s,   B_s = [w_1 s_1 B_1 | … | w_k s_k B_k]  [out, R],   A_s = [A_1; …; A_k]  [R, in].

Thin QR of both sides, ``B_s = Q_b R_b`` and ``A_s^T = Q_a R_a``, gives ``ΔW = Q_b (R_b R_a^T) Q_a^T``; the
SVD of the small core ``R_b R_a^T = U Σ V^T`` (at most ``R × R``) is then an SVD of ``ΔW`` itself
(``Q_b U`` and ``Q_a V`` have orthonormal columns). Keeping the top ``k`` singular triplets is the best rank-``k``
approximation (Eckart–Young–Mirsky), with relative Frobenius error

    ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²),

reported per module. ``sqrt(σ)`` goes into each factor: ``B = Q_b U_k Σ_k^{1/2}``, ``A = Σ_k^{1/2} V_k^T Q_a^T``.
Cost ``O((out + in) R²)`` instead of the ``O(out · in · min(out, in))`` SVD of the dense matrix that PEFT's
``combination_type="svd"`` forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lora_retriever.fusion.base import (
    FusedModule,
    FusionMethod,
    WeightedModule,
    compute_dtype,
    register_fusion_method,
)

__all__ = ["SvdFusion"]


@register_fusion_method
class SvdFusion(FusionMethod):
    """Exact at full rank (the default); ``svd_rank=k`` keeps the top ``k`` singular directions per module.

    Options:
        svd_rank: ``None`` (default) keeps every singular value (``min(out, in, R)``, exact); an int ``k >= 1``
            truncates each module to ``min(k, min(out, in, R))`` (never padded with zeros).
    """

    name = "svd"
    option_defaults = {"svd_rank": None}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        k = options["svd_rank"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"svd_rank must be an integer >= 1 (or None for full rank), got {k!r}.")
        return options

    def fuse_module(self, module_name: str, parts: Sequence[WeightedModule]) -> FusedModule:
        out_dtype = compute_dtype(parts[0].lora.lora_A)
        # float64 for the factorisations: the exact (full-rank) result must match `cat` to fp32 precision.
        b_stack = torch.cat([p.weight * p.lora.scaling * p.lora.lora_B.double() for p in parts], dim=1)
        a_stack = torch.cat([p.lora.lora_A.double() for p in parts], dim=0)  # [R, in]
        q_b, r_b = torch.linalg.qr(b_stack)  # [out, m], [m, R]
        q_a, r_a = torch.linalg.qr(a_stack.T)  # [in, n], [n, R]
        u, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [m, p], [p], [p, n]

        full = sigma.numel()
        k = full if self.options["svd_rank"] is None else min(self.options["svd_rank"], full)
        root = sigma[:k].sqrt()
        lora_B = (q_b @ u[:, :k]) * root  # [out, k]
        lora_A = root[:, None] * (vh[:k] @ q_a.T)  # [k, in]

        total = float(sigma.square().sum())
        dropped = float(sigma[k:].square().sum())
        error = math.sqrt(dropped / total) if total > 0 else 0.0
        return FusedModule(lora_A.to(out_dtype), lora_B.to(out_dtype), error)
