"""``dare_linear`` and ``dare_ties``: DARE (Yu et al. 2023, "Language Models are Super Mario").

DARE ("drop and rescale", Sec. 3) drops each entry of a source's update with probability ``1 − density`` and
rescales the survivors by ``1 / density``, so the expectation is unchanged. As in PEFT 0.21 for LoRA it is
applied to the ``A`` factors and the ``B`` factors separately, each source weighted by PEFT's split of
``w_j s_j`` (see ``factorwise``); then

* ``dare_linear``: the weighted sum of the rescaled factors;
* ``dare_ties``: TIES sign election and disjoint merge (``ties``) on the rescaled factors.

Randomness: a ``torch.Generator`` seeded per module from ``seed`` and the module name (not the global RNG), so a
given seed gives the same adapter every time, whatever else was fused or run before. ``density=1`` draws
nothing and keeps every entry (PEFT does the same).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from lora_retriever.fusion.base import REQUIRED, check_choice, check_density, register_fusion_method
from lora_retriever.fusion.factorwise import FactorwiseMethod
from lora_retriever.fusion.ties import MAJORITY_SIGN_METHODS, disjoint_merge, elect_sign_mask

__all__ = ["DareLinearFusion", "DareTiesFusion", "random_drop"]


def random_drop(factor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by ``1 / density``; ``density >= 1`` keeps all."""
    if density >= 1.0:
        return factor
    keep = torch.bernoulli(torch.full_like(factor, density), generator=generator)
    return factor * keep / density


class _DareMethod(FactorwiseMethod):
    option_defaults = {"density": REQUIRED, "seed": 0}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options["density"] = check_density(options["density"])
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        return options

    def generator(self, module_name: str) -> torch.Generator | None:
        # The CPU generator (mt19937) keeps only 32 bits of a seed, so seed and module name are hashed together
        # into 32 bits; crc32 is stable across processes (unlike hash()).
        module_seed = zlib.crc32(f"{self.options['seed']}:{module_name}".encode())
        return torch.Generator().manual_seed(module_seed)

    def sparsify(self, factor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if factor.device.type != "cpu" and generator is not None:
            # Draw on CPU (a CPU generator), so a seed gives the same masks on every device.
            return random_drop(factor.cpu(), self.options["density"], generator).to(factor.device)
        return random_drop(factor, self.options["density"], generator)


@register_fusion_method
class DareLinearFusion(_DareMethod):
    """DARE then a weighted sum, on ``A`` and ``B`` separately; rank ``max r_j`` per module.

    Options:
        density: keep probability of each entry, in (0, 1] (required).
        seed: integer seed of the drop masks (default 0).
    """

    name = "dare_linear"


@register_fusion_method
class DareTiesFusion(_DareMethod):
    """DARE then TIES sign election and disjoint merge, on ``A`` and ``B`` separately.

    Options:
        density: keep probability of each entry, in (0, 1] (required).
        majority_sign_method: ``"total"`` (default) or ``"frequency"``.
        seed: integer seed of the drop masks (default 0).
    """

    name = "dare_ties"
    option_defaults = {**_DareMethod.option_defaults, "majority_sign_method": "total"}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        check_choice("majority_sign_method", options["majority_sign_method"], MAJORITY_SIGN_METHODS)
        return options

    def combine(self, stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        agree = elect_sign_mask(stacked, self.options["majority_sign_method"])
        return disjoint_merge(stacked * weights.view(-1, 1, 1), agree)
