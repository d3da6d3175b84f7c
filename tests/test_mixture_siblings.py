"""Sibling layers (q/k/v, gate/up) project their shared input through one LoRA-A GEMM, and only when shared.

The reference everywhere is the explicit per-sample sum ``W x + sum_j w_ij s_j B_j A_j x`` computed here from
the adapters' own tensors, and the same model with its siblings unlinked (every layer alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from swift.tuners import Swift, lora_layers, lora_mixture_context
from swift.tuners.swift_model import SwiftModel
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.test_mixture import GREEDY_WITH_LOGITS
from tests.tolerances import SAME_SHAPES_ATOL, assert_close

NAMES = ["a", "b", "c"]
WEIGHTS = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.3, 0.7], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]])


def three_adapter_pool(
    root, *, dtype: torch.dtype = torch.float32, narrow_c: bool = True, **spec
) -> SwiftModel:
    """Adapters a, b, c (ranks 4, 6, 8) on a tiny Llama, loaded with ``dtype`` model and banks.

    ``narrow_c``: "c" skips k_proj and up_proj (siblings with different layouts); ``spec``: ``make_lora_dir``
    keywords (``lora_alpha``, ``seed`` offset as ``seed``, ``std``).
    """
    base = tiny_causal_lm("llama")
    seed = spec.pop("seed", 10)
    model = None
    for j, name in enumerate(NAMES):
        targets = "all-linear" if name != "c" or not narrow_c else C_TARGETS
        make_lora_dir(base, root / name, r=4 + 2 * j, target_modules=targets, seed=seed + j, **spec)
        model = Swift.from_pretrained(
            model or copy.deepcopy(base).to(dtype), root / name, adapter_name=name, lora_dtype=dtype
        )
    return model


C_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj", "o_proj"]


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory):
    return three_adapter_pool(tmp_path_factory.mktemp("siblings"), lora_alpha=8)


def unlinked(model: SwiftModel) -> SwiftModel:
    alone = copy.deepcopy(model)
    for _, layer in alone.lora_layers():
        layer.siblings = ()
    return alone


@pytest.mark.parametrize("kernel", ["union", "gather"])
def test_siblings_share_one_projection_and_match_layers_alone(llama_pool, kernel):
    layers = dict(llama_pool.lora_layers())
    attn = "model.layers.0.self_attn"
    assert [s.module_name for s in layers[f"{attn}.q_proj"].siblings] == [f"{attn}.{p}_proj" for p in "qkv"]
    assert len(layers["model.layers.1.mlp.up_proj"].siblings) == 2 and not layers[f"{attn}.o_proj"].siblings
    ids = torch.randint(3, VOCAB, (WEIGHTS.shape[0], 7))
    with torch.inference_mode():
        with lora_mixture_context(WEIGHTS, NAMES, kernel=kernel):
            together = llama_pool(input_ids=ids).logits
            state = lora_layers._MIXTURE.get()
            groups = [g for g in state.groups.values() if g is not None]
            q = state.layers[id(layers[f"{attn}.q_proj"])]
            v = state.layers[id(layers[f"{attn}.v_proj"])]
        alone_model = unlinked(llama_pool)
        with lora_mixture_context(WEIGHTS, NAMES, kernel=kernel):
            alone = alone_model(input_ids=ids).logits
            assert not lora_layers._MIXTURE.get().groups
    assert len(groups) == 4 and all(
        g.shared and g.kernel == kernel for g in groups
    )  # 2 layers x (qkv, gate/up)
    assert q.group is v.group and (q.offset, v.offset) == (
        0,
        q.width + state.layers[id(layers[f"{attn}.k_proj"])].width,
    )
    assert groups[0].uses == 3  # the last decode-free forward: q projected, k and v read its columns
    assert (together - alone).abs().max().item() <= SAME_SHAPES_ATOL


def test_generate_switches_kernels_between_prefill_and_decode(llama_pool):
    """Batch 6 on a, b, c (k=1): q/v gather at prefill, union at decode (k_proj lacks c: union in both);
    every decode step's logits match a full forward over the sequence so far."""
    weights = torch.zeros(6, 3)
    weights[torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])] = 1.0
    q = dict(llama_pool.lora_layers())["model.layers.0.self_attn.q_proj"].module_name
    ids = torch.randint(3, VOCAB, (6, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), lora_mixture_context(weights, NAMES):
        llama_pool(input_ids=ids)
        prefill_kernel = lora_layers.mixture_kernels()[q]
        out = llama_pool.generate(input_ids=ids, max_new_tokens=4, **GREEDY_WITH_LOGITS)
        decode_kernel = lora_layers.mixture_kernels()[q]
    with torch.inference_mode(), lora_mixture_context(weights, NAMES, kernel="gather"):
        full = llama_pool(input_ids=out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    assert (prefill_kernel, decode_kernel) == ("gather", "union")
    assert_close(torch.stack(out.logits, dim=1), full, same_shapes=False, what="decode steps vs full forward")


class CrossBlock(nn.Module):
    """q reads ``x``, k and v read ``memory`` (cross-attention): the siblings' inputs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 12) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(memory) * self.v_proj(memory)


class InPlaceBlock(nn.Module):
    """q and k read the same tensor object, but it changes in place in between."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(16, 12), nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)
        x.mul_(-2.0)
        return q + self.k_proj(x)


def with_adapters(block: nn.Module, seed: int) -> tuple[SwiftModel, dict]:
    torch.manual_seed(seed)
    projections = [name for name, module in block.named_children() if isinstance(module, nn.Linear)]
    model = SwiftModel(block)
    tensors = {}
    for j, name in enumerate(NAMES[:2]):
        weights = {
            proj: (0.2 * torch.randn(3 + j, 16), 0.2 * torch.randn(12, 3 + j), 0.5 + j)
            for proj in projections
        }
        model.add_adapter_weights(name, weights)
        tensors[name] = weights
    return model, tensors


def reference(
    linear: nn.Linear, x: torch.Tensor, proj: str, tensors: dict, weights: torch.Tensor
) -> torch.Tensor:
    """``W x_i + sum_j w_ij s_j B_j A_j x_i`` per sample ``i`` (rows of ``weights``)."""
    rows = []
    for i in range(x.shape[0]):
        y = linear(x[i])
        for j, name in enumerate(NAMES[:2]):
            lora_A, lora_B, scaling = tensors[name][proj]
            y = y + weights[i, j] * scaling * (x[i] @ lora_A.t() @ lora_B.t())
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("kernel", ["union", "gather"])
def test_siblings_with_different_inputs_run_alone_and_stay_exact(kernel):
    block = CrossBlock()
    model, tensors = with_adapters(copy.deepcopy(block), seed=3)
    weights = torch.tensor([[0.6, 0.4], [0.0, 1.0]])
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.inference_mode(), lora_mixture_context(weights, NAMES[:2], kernel=kernel):
        first = model(x, memory)
        (group,) = lora_layers._MIXTURE.get().groups.values()
        second = model(x, memory)
    assert group is not None and not group.shared  # k found q's projection of another tensor: stopped sharing
    expected = reference(block.q_proj, x, "q_proj", tensors, weights) + reference(
        block.k_proj, memory, "k_proj", tensors, weights
    ) * reference(block.v_proj, memory, "v_proj", tensors, weights)
    for got in (first, second):
        assert (got - expected).abs().max().item() <= SAME_SHAPES_ATOL


def test_sibling_input_changed_in_place_is_projected_again():
    block = InPlaceBlock()
    model, tensors = with_adapters(copy.deepcopy(block), seed=4)
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.0, 0.5]])
    x = torch.randn(3, 4, 16)
    with torch.no_grad(), lora_mixture_context(weights, NAMES[:2], kernel="union"):
        got = model(x.clone())
    with torch.no_grad():
        expected = reference(block.q_proj, x, "q_proj", tensors, weights) + reference(
            block.k_proj, -2.0 * x, "k_proj", tensors, weights
        )
    assert (got - expected).abs().max().item() <= SAME_SHAPES_ATOL
