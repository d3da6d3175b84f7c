"""The SVD of a LoRA update ``B·A`` without forming it, and the factors of an edited spectrum.

With ``B [out, r]`` and ``A [r, in]``, thin QR of both factors, ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a``, gives

    B A = Q_b (R_b R_aᵀ) Q_aᵀ,

and the SVD of the small core ``R_b R_aᵀ = U_c diag(σ) V_cᵀ`` (at most ``r × r``) is an SVD of ``B A``
itself, ``U = Q_b U_c``, ``V = Q_a V_c``, since both products have orthonormal columns. Cost
``O((out + in) r²)`` instead of ``O(out · in · min(out, in))`` for the dense SVD (see
``benchmarks/bench_spectral_svd.py``). This is the decomposition of the LoRA spectral-edit method
(``lowrank_svd_from_ba``, the seed's step 2 "Decompose"), computed in float64.

The edited factors split ``σ′`` evenly (the seed's step 5 "Reconstruct"):

    B′ = U diag(√σ′),   A′ = diag(√σ′) Vᵀ,   so   B′A′ = U diag(σ′) Vᵀ.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RTOL", "LowRankSVD", "lowrank_svd_from_ba", "rebuild_ba_from_uv_sigma"]

DEFAULT_RTOL = 1e-12  # singular values below DEFAULT_RTOL * σ_max are zero (see lowrank_svd_from_ba)


class LowRankSVD(NamedTuple):
    """Compact SVD ``B A = U diag(S) Vh``, float64, ``S`` descending and strictly positive.

    Attributes:
        U: ``[out, k]`` orthonormal columns.
        S: ``[k]`` singular values, ``k ≤ min(r, out, in)`` (zero ones dropped).
        Vh: ``[k, in]`` orthonormal rows.
        V: ``[in, k]`` = ``Vh.T``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    V: torch.Tensor


def _check_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
        raise ValueError(f"B and A must be tensors, got {type(B).__name__} and {type(A).__name__}.")
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(
            f"B must be [out, r] and A [r, in] (2-D), got B {tuple(B.shape)} and A {tuple(A.shape)}."
        )
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} have different ranks ({B.shape[1]} vs {A.shape[0]}); "
            "pass B = lora_B [out, r] and A = lora_A [r, in]."
        )
    if not (B.is_floating_point() and A.is_floating_point()):
        raise ValueError(f"B and A must be floating point, got {B.dtype} and {A.dtype}.")
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise ValueError("B or A holds NaN/inf values; the adapter is corrupt.")


def lowrank_svd_from_ba(B: torch.Tensor, A: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> LowRankSVD:
    """Compact SVD of ``B @ A`` via QR of ``B`` and ``Aᵀ`` and an SVD of the ``r × r`` core (float64).

    Singular values ``σ_k ≤ rtol · σ_max`` are treated as zero and dropped together with their vectors, so a
    rank-deficient adapter (zero or repeated columns of ``B``, zero rows of ``A``, ``B = 0`` at init) gives
    exactly its ``k < r`` nonzero directions, never arbitrary null-space vectors. Exact rank deficiency leaves
    ``σ ~ 1e-16 · σ_max`` in float64, while factors stored in float32 (or bf16) hold real content down to
    ``~1e-7`` (``~1e-3``) of ``σ_max``; the default ``rtol = 1e-12`` separates the two, so no direction the
    stored factors contain is dropped, whatever their dtype.

    Args:
        B: ``lora_B`` ``[out, r]``.
        A: ``lora_A`` ``[r, in]``.
        rtol: relative threshold for zero singular values (see above), default ``DEFAULT_RTOL = 1e-12``.

    Returns:
        ``LowRankSVD(U [out, k], S [k], Vh [k, in], V [in, k])`` on ``B``'s device, float64.

    Raises:
        ValueError: non-2-D or non-floating factors, ranks that differ, NaN/inf, or ``rtol`` outside [0, 1).
    """
    _check_factors(B, A)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0 <= rtol < 1:
        raise ValueError(f"rtol must be a number in [0, 1), got {rtol!r}.")
    b = B.detach().to(torch.float64)
    a = A.detach().to(torch.float64)
    q_b, r_b = torch.linalg.qr(b)  # [out, m], [m, r]   m = min(out, r)
    q_a, r_a = torch.linalg.qr(a.T)  # [in, n], [n, r]    n = min(in, r)
    u_c, sigma, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [m, p], [p], [p, n]
    sigma_max = float(sigma[0]) if sigma.numel() else 0.0
    keep = sigma > rtol * sigma_max if sigma_max > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    u = q_b @ u_c[:, keep]  # [out, k]
    vh = vh_c[keep] @ q_a.T  # [k, in]
    return LowRankSVD(U=u, S=sigma[keep].clone(), Vh=vh, V=vh.T)


def rebuild_ba_from_uv_sigma(
    U: torch.Tensor,
    Vh: torch.Tensor,
    sigma: torch.Tensor,
    *,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors with product ``U diag(σ) Vh``: ``B′ = U diag(√σ)``, ``A′ = diag(√σ) Vh``.

    Args:
        U: ``[out, k]``.
        Vh: ``[k, in]``.
        sigma: ``[k]`` non-negative singular values.
        rank: pad the factors with zero columns of ``B′`` / zero rows of ``A′`` up to this rank (the
            adapter's ``r``, so ``adapter_config.json`` still describes the weights); default ``k``.
        dtype: output dtype; default float64.

    Returns:
        ``(B′ [out, rank], A′ [rank, in])``.

    Raises:
        ValueError: shapes that don't chain, negative or non-finite ``sigma``, or ``rank < k``.
    """
    if U.dim() != 2 or Vh.dim() != 2 or sigma.dim() != 1:
        raise ValueError(
            f"expected U [out, k], Vh [k, in], sigma [k]; got {tuple(U.shape)}, {tuple(Vh.shape)}, "
            f"{tuple(sigma.shape)}."
        )
    k = sigma.numel()
    if U.shape[1] != k or Vh.shape[0] != k:
        raise ValueError(
            f"U {tuple(U.shape)}, Vh {tuple(Vh.shape)} and sigma {tuple(sigma.shape)} disagree on k={k}."
        )
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError(f"sigma must be finite and >= 0 (its square root splits into B and A), got {sigma}.")
    rank = k if rank is None else rank
    if rank < k:
        raise ValueError(f"rank={rank} is smaller than the number of singular values k={k}; pass rank >= k.")
    root = sigma.to(torch.float64).sqrt()
    b = torch.zeros(U.shape[0], rank, dtype=torch.float64, device=U.device)
    a = torch.zeros(rank, Vh.shape[1], dtype=torch.float64, device=Vh.device)
    b[:, :k] = U.to(torch.float64) * root
    a[:k] = root[:, None] * Vh.to(torch.float64)
    if dtype is not None:
        b, a = b.to(dtype), a.to(dtype)
    return b, a
