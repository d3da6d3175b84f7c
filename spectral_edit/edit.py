"""Editing the singular values of a LoRA update from their loss sensitivities ``g_σ``.

Modes (the seed's step 4 "Edit", per module, ``σ`` sorted descending with ``k`` entries):

* ``abs_select`` (default): score ``|g_σ|`` (normalised by ``grad_norm``, which does not change the order
  within a module). The ``n_amp = round(amp_frac · k)`` directions with the largest score are multiplied by
  ``amp_factor``, the ``n_sup = round(sup_frac · k)`` with the smallest by ``sup_factor`` (never overlapping
  the amplified ones), the rest by ``mid_factor``. Ties go to the lower index (larger ``σ``).
* ``gd``: one signed step on the normalised gradient ``ĝ`` (``grad_norm``): additive ``σ − η ĝ`` or
  multiplicative ``σ · exp(−η ĝ)``, then clamped at ``σ ≥ 0``. With ``grad_norm="none"`` the additive step is
  plain gradient descent on the calibration loss.
* ``random_index``: the control. Same ``n_amp`` / ``n_sup`` and factors as ``abs_select``, indices drawn
  uniformly at random (``seed``): a gain of ``abs_select`` that ``random_index`` also shows is not due to
  the sensitivities.

``preserve_l1`` then rescales ``σ′`` to the original ``‖σ‖₁`` (any mode).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EDIT_MODES",
    "EditConfig",
    "SpectralGate",
    "apply_spectral_edit",
    "normalize_gradient",
    "spectral_gate",
]

EDIT_MODES = ("abs_select", "gd", "random_index")
GD_UPDATES = ("additive", "multiplicative")
GRAD_NORMS = ("mean_abs", "l2", "none")


@dataclass
class EditConfig:
    """How to edit each module's singular values (validated on construction).

    Attributes:
        mode: ``"abs_select"``, ``"gd"`` or ``"random_index"`` (see the module docstring).
        amp_frac: fraction of a module's directions to amplify (``abs_select``, ``random_index``), in [0, 1].
        sup_frac: fraction to suppress, in [0, 1]; ``amp_frac + sup_frac <= 1``.
        amp_factor: multiplier of amplified ``σ`` (>= 0).
        sup_factor: multiplier of suppressed ``σ`` (>= 0).
        mid_factor: multiplier of the other ``σ`` (>= 0).
        preserve_l1: rescale the edited ``σ`` to the original ``‖σ‖₁``.
        eta: step size of ``gd`` (>= 0; 0 is the identity).
        gd_update: ``"multiplicative"`` (``σ·exp(−η ĝ)``) or ``"additive"`` (``σ − η ĝ``).
        grad_norm: ``ĝ = g / mean|g|`` (``"mean_abs"``), ``g / ‖g‖₂`` (``"l2"``) or ``g`` (``"none"``), per module.
        seed: random seed of ``random_index`` (an integer >= 0).
    """

    mode: str = "abs_select"
    amp_frac: float = 0.2
    sup_frac: float = 0.2
    amp_factor: float = 1.25
    sup_factor: float = 0.8
    mid_factor: float = 1.0
    preserve_l1: bool = False
    eta: float = 0.2
    gd_update: str = "multiplicative"
    grad_norm: str = "mean_abs"
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("mode", self.mode, EDIT_MODES)
        _choice("gd_update", self.gd_update, GD_UPDATES)
        _choice("grad_norm", self.grad_norm, GRAD_NORMS)
        for name in ("amp_frac", "sup_frac"):
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a fraction of the directions), got {value!r}.")
        if self.amp_frac + self.sup_frac > 1.0 + 1e-12:
            raise ValueError(
                f"amp_frac + sup_frac must be <= 1 (a direction is amplified or suppressed, not both), got "
                f"amp_frac={self.amp_frac!r} + sup_frac={self.sup_frac!r}."
            )
        for name in ("amp_factor", "sup_factor", "mid_factor", "eta"):
            value = _number(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if not isinstance(self.preserve_l1, bool):
            raise ValueError(f"preserve_l1 must be True or False, got {self.preserve_l1!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditConfig:
        """Build from a dict; unknown keys are an error (a typo would otherwise be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EditConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}.")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def normalize_gradient(g: torch.Tensor, method: str) -> torch.Tensor:
    """``g / mean|g|`` (``"mean_abs"``), ``g / ‖g‖₂`` (``"l2"``) or ``g`` (``"none"``); all-zero ``g`` stays zero."""
    _choice("grad_norm", method, GRAD_NORMS)
    if method == "none" or g.numel() == 0:
        return g
    denom = g.abs().mean() if method == "mean_abs" else torch.linalg.vector_norm(g)
    return g / denom if denom > 0 else torch.zeros_like(g)


class SpectralGate(NamedTuple):
    """The edit of one module: ``σ′`` and which directions were amplified / suppressed (index tensors)."""

    sigma: torch.Tensor
    amplified: torch.Tensor
    suppressed: torch.Tensor


def _counts(k: int, config: EditConfig) -> tuple[int, int]:
    # Half-up rounding (Python's round() is half-to-even: round(0.5) == 0).
    n_amp = min(k, int(math.floor(config.amp_frac * k + 0.5)))
    n_sup = min(k - n_amp, int(math.floor(config.sup_frac * k + 0.5)))
    return n_amp, n_sup


def spectral_gate(
    sigma: torch.Tensor,
    g_sigma: torch.Tensor | None,
    config: EditConfig,
    *,
    generator: torch.Generator | None = None,
) -> SpectralGate:
    """Edit one module's singular values and report the selected directions; see ``apply_spectral_edit``."""
    if not isinstance(config, EditConfig):
        raise ValueError(f"config must be an EditConfig, got {type(config).__name__}.")
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 1:
        raise ValueError(
            f"sigma must be a 1-D tensor [k], got {getattr(sigma, 'shape', type(sigma).__name__)}."
        )
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError(f"sigma must hold finite singular values >= 0, got {sigma}.")
    if g_sigma is None:
        if config.mode != "random_index":
            raise ValueError(
                f"mode {config.mode!r} needs g_sigma (calibration gradients); only random_index doesn't."
            )
        g = torch.zeros_like(sigma, dtype=torch.float64)
    else:
        if not isinstance(g_sigma, torch.Tensor) or g_sigma.shape != sigma.shape:
            raise ValueError(
                f"g_sigma must have the shape of sigma {tuple(sigma.shape)}, got "
                f"{tuple(getattr(g_sigma, 'shape', ()))}."
            )
        if not torch.isfinite(g_sigma).all():
            raise ValueError(f"g_sigma holds NaN/inf values: {g_sigma}.")
        g = g_sigma.detach().to(torch.float64)
    s = sigma.detach().to(torch.float64)
    k = s.numel()
    empty = torch.zeros(0, dtype=torch.long)
    if k == 0:
        return SpectralGate(sigma.clone(), empty, empty)

    amplified = suppressed = empty
    if config.mode == "gd":
        step = config.eta * normalize_gradient(g, config.grad_norm)
        new = s - step if config.gd_update == "additive" else s * torch.exp(-step)
        new = new.clamp_min(0.0)
    else:
        n_amp, n_sup = _counts(k, config)
        if config.mode == "abs_select":
            score = normalize_gradient(g.abs(), config.grad_norm)
            if not bool((score > 0).any()) and (n_amp or n_sup):
                logger.warning(
                    "abs_select: every |g_sigma| is zero, the ranking is meaningless; sigma left unchanged."
                )
                return SpectralGate(sigma.clone(), empty, empty)
            order = torch.argsort(-score, stable=True)  # descending |g|; ties keep the larger sigma first
        else:
            if generator is None:
                generator = torch.Generator().manual_seed(config.seed)
            order = torch.randperm(k, generator=generator)
        amplified = order[:n_amp].sort().values
        suppressed = order[k - n_sup :].sort().values if n_sup else empty
        factor = torch.full_like(s, config.mid_factor)
        factor[amplified] = config.amp_factor
        factor[suppressed] = config.sup_factor
        new = s * factor
    if config.preserve_l1:
        total = float(new.sum())
        if total > 0:
            new = new * (float(s.sum()) / total)
        else:
            logger.warning("preserve_l1: every edited sigma is zero, cannot rescale to the original L1 norm.")
    return SpectralGate(new.to(sigma.dtype), amplified, suppressed)


def apply_spectral_edit(
    sigma: torch.Tensor,
    g_sigma: torch.Tensor | None,
    config: EditConfig,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New singular values ``σ′`` for one module (modes in the module docstring).

    Args:
        sigma: ``[k]`` singular values of ``B A``, non-negative (descending, as ``lowrank_svd_from_ba`` returns).
        g_sigma: ``[k]`` ``∂L/∂σ`` from calibration; may be ``None`` for ``random_index``.
        config: the edit.
        generator: randomness of ``random_index``; default a generator seeded with ``config.seed`` (pass one
            shared generator to edit several modules with independent draws).

    Returns:
        ``σ′ [k]``, same dtype, all ``>= 0``.

    Raises:
        ValueError: not an ``EditConfig``, a non-1-D / negative / non-finite ``sigma``, a ``g_sigma`` of another
            shape or with NaN/inf, or a missing ``g_sigma`` for ``abs_select`` / ``gd``.
    """
    return spectral_gate(sigma, g_sigma, config, generator=generator).sigma
