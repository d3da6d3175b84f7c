"""The mixture in bf16 end to end (model and adapter banks) against a bf16 per-row merged reference.

Tolerance. bf16 keeps 8 significant bits: every op rounds its output with a relative error up to 2^-9, and the
two sides round different things (the mixture: x W^T and the LoRA terms separately, then their sum; the
reference: W + sum_j w_j s_j B_j A_j rounded to bf16 once, then x W'^T). On the tiny 2-layer model below the
logits of the two differed by at most 1.5 % of the largest logit (0.0078 at max |logit| 0.58, every kernel and
call size, Intel Xeon). The bound ``BF16_RTOL * max|reference|`` with ``BF16_RTOL = 2^-5`` (3.1 %) is twice
that, and the test also asserts the adapters move the logits by at least 10x the bound, so a missing adapter,
a wrong weight or a wrong scaling cannot pass. bf16 runs on every CPU (slowly where it has no bf16 units, e.g.
AMD EPYC with AVX2): this is a correctness test only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from swift.tuners import lora_layers, lora_mixture_context
from tests.factories import VOCAB, tiny_causal_lm
from tests.test_mixture_siblings import NAMES, WEIGHTS, three_adapter_pool

BF16_RTOL = 2**-5


@pytest.fixture(scope="module")
def bf16_pool(tmp_path_factory):
    """(fp32 base model, the pool loaded into a bf16 copy with bf16 banks)."""
    root = tmp_path_factory.mktemp("bf16")
    model = three_adapter_pool(root, dtype=torch.bfloat16, narrow_c=False, lora_alpha=16, seed=20, std=0.1)
    return tiny_causal_lm("llama"), model


def merged_reference(base, model, weights: list[float]) -> torch.nn.Module:
    """A bf16 copy of ``base`` with ``W + sum_j w_j s_j B_j A_j`` (summed in fp32, rounded to bf16 once)."""
    merged = copy.deepcopy(base).to(torch.bfloat16)
    with torch.no_grad():
        for module_name, layer in model.lora_layers():
            delta = torch.zeros(layer.out_features, layer.in_features)
            for w, name in zip(weights, NAMES):
                if name in layer.slots:
                    lora_A, lora_B = layer.lora_weights(name)
                    delta += w * layer.slots[name].scaling * (lora_B.float() @ lora_A.float())
            target = merged.get_submodule(module_name)
            target.weight.copy_((target.weight.float() + delta).to(torch.bfloat16))
    return merged


@pytest.mark.parametrize("kernel", ["union", "gather"])
@pytest.mark.parametrize("tokens", [1, 9])  # 4 rows: LoRA terms computed in fp32; 36 rows: in bf16 GEMMs
def test_bf16_mixture_rows_match_bf16_merged_reference(bf16_pool, kernel, tokens):
    base, model = bf16_pool
    layer = dict(model.lora_layers())["model.layers.0.mlp.down_proj"]
    assert layer.lora_A_bank.dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.bfloat16
    ids = torch.randint(3, VOCAB, (WEIGHTS.shape[0], tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode(), lora_mixture_context(WEIGHTS, NAMES, kernel=kernel):
        mixed = model(input_ids=ids).logits
        upcast = lora_layers._MIXTURE.get().layers[id(layer)].fp32 is not None
    assert mixed.dtype == torch.bfloat16
    assert upcast == (WEIGHTS.shape[0] * tokens <= lora_layers.FP32_MAX_ROWS)
    with torch.inference_mode():
        plain = copy.deepcopy(base).to(torch.bfloat16)(input_ids=ids).logits.float()
        for i, row in enumerate(WEIGHTS.tolist()):
            expected = merged_reference(base, model, row)(input_ids=ids[i : i + 1]).logits.float()
            bound = BF16_RTOL * float(expected.abs().max())
            diff = float((mixed[i : i + 1].float() - expected).abs().max())
            assert diff <= bound, f"row {i}: {diff:.4g} > {bound:.4g}"
            assert float((expected - plain[i : i + 1]).abs().max()) >= 10 * bound  # the adapters matter
