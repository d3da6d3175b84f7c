"""Tolerances for comparing fp32 model outputs, each justified by what the two sides compute.

Our machines differ in CPU (AMD EPYC with AVX2; Intel Xeon with AVX-512/AMX), and MKL/oneDNN pick different
GEMM kernels, blockings and reduction orders per CPU *and per shape*. So:

* **Same shapes** (``same_shapes=True``): both sides run the same operations on tensors of the same shapes
  (e.g. a batch through our layers vs the same batch through PEFT, on a tiny model with O(1) values). Only the
  order of a few additions in the LoRA path differs: a few ulps of values of magnitude ~1, far below the
  strict absolute bound ``SAME_SHAPES_ATOL = 1e-5``.
* **Different shapes** (``same_shapes=False``): a row of a batched forward vs the same sample alone, or a
  decode step (T=1) vs a full forward. The base GEMMs themselves then round differently on each CPU, and the
  rounding compounds through the layers, proportionally to the size of the values. Seen on the real
  SmolLM2-135M (30 layers, logits ~20): 1.5e-4 on an Intel Xeon, < 1e-4 on an AMD EPYC (7.7e-6 of the
  largest logit). The bound is ``CROSS_SHAPE_ATOL + CROSS_SHAPE_RTOL * max|reference|``: 5e-5 of the
  largest value is ~6x the worst relative error seen, and still 100x below what a wrong weight or a missing
  adapter does to the output (tests that use it also check that the adapters move the output by far more).
"""

from __future__ import annotations

import torch

SAME_SHAPES_ATOL = 1e-5
CROSS_SHAPE_ATOL = 1e-5
CROSS_SHAPE_RTOL = 5e-5


def tolerance(reference: torch.Tensor, *, same_shapes: bool) -> float:
    """The bound on ``max|got - reference|`` for fp32 outputs (see the module docstring)."""
    if same_shapes:
        return SAME_SHAPES_ATOL
    return CROSS_SHAPE_ATOL + CROSS_SHAPE_RTOL * float(reference.detach().abs().max())


def assert_close(got: torch.Tensor, reference: torch.Tensor, *, same_shapes: bool, what: str = "") -> float:
    """Assert ``max|got - reference| <= tolerance(reference)``; returns the tolerance used."""
    bound = tolerance(reference, same_shapes=same_shapes)
    diff = float((got.detach().double() - reference.detach().double()).abs().max())
    assert diff <= bound, (
        f"{what}: max |got - reference| = {diff:.3e} > {bound:.3e} (same_shapes={same_shapes})"
    )
    return bound
