"""``linear``: the LoraRetriever paper's fusion — average the ``A`` factors and the ``B`` factors separately.

LoraRetriever (Zhao et al. 2024, Sec. 3.3, "fusion of LoRAs") fuses the retrieved adapters by averaging their
parameters, ``A = Σ_j w_j A_j`` and ``B = Σ_j w_j B_j`` (``w_j = 1/k`` by default), and applies the result with
one scaling. ``B A`` then holds cross terms ``w_i w_j B_i A_j`` — an approximation of ``Σ_j w_j s_j B_j A_j``.

What we do with scalings and ranks (the paper's adapters all shared one config, so it says nothing):

* **Scaling**: each source's ``s_j`` is folded in as ``sqrt(s_j)`` on both factors, so the output has scaling 1.
  When every ``s_j`` equals ``s`` this is exactly the paper's ``s · (Σ w_j B_j)(Σ w_j A_j)``; a cross term
  ``B_i A_j`` is weighted by ``sqrt(s_i s_j)``, the geometric mean of the two scalings.
* **Weights** (option ``weight_split``):

  - ``"paper"`` (default): ``w_j`` on *both* factors, as in the paper, so a source's own term ``B_j A_j``
    carries ``w_j² s_j`` (``1/k²`` for uniform weights) and a negative weight does not flip it.
  - ``"sqrt"``: PEFT 0.21's ``combination_type="linear"``: ``sign(w_j s_j) sqrt|w_j s_j|`` on ``A``,
    ``sqrt|w_j s_j|`` on ``B``, so the own term carries exactly ``w_j s_j``.

  With equal ranks and scalings, ``"sqrt"`` equals PEFT's ``linear``, and ``"paper"`` equals PEFT's ``linear``
  called with the squared (non-negative) weights.
* **Ranks**: factors are zero-padded to the largest rank present at the module (see ``factorwise``).

A single source with weight 1 is reproduced exactly by both splits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lora_retriever.fusion.base import WeightedModule, check_choice, register_fusion_method
from lora_retriever.fusion.factorwise import FactorwiseMethod

__all__ = ["LinearFusion"]

WEIGHT_SPLITS = ("paper", "sqrt")


@register_fusion_method
class LinearFusion(FactorwiseMethod):
    """Parameter averaging; rank ``max r_j`` per module.

    Options:
        weight_split: ``"paper"`` (default, ``w_j`` on both factors) or ``"sqrt"`` (PEFT's linear).
    """

    name = "linear"
    option_defaults = {"weight_split": "paper"}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        check_choice("weight_split", options["weight_split"], WEIGHT_SPLITS)
        return options

    def factor_weights(self, parts: Sequence[WeightedModule]) -> tuple[list[float], list[float]]:
        if self.options["weight_split"] == "sqrt":
            return super().factor_weights(parts)
        weights_A, weights_B = [], []
        for part in parts:
            root = math.sqrt(abs(part.lora.scaling))
            weights_B.append(part.weight * root)
            weights_A.append(part.weight * (root if part.lora.scaling >= 0 else -root))
        return weights_A, weights_B
