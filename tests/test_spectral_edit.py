"""spectral_edit: factorised SVD, hook gradients vs autograd, edits, PEFT round trips, errors, CLI, smoke test."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from spectral_edit.edit import EditConfig, apply_spectral_edit, spectral_gate
from spectral_edit.hooks import (
    IGNORE_INDEX,
    ModuleSpec,
    SigmaHookError,
    compute_sigma_gradients,
    register_sigma_hooks,
    resolve_module,
)
from spectral_edit.io import load_lora_adapter
from spectral_edit.svd import lowrank_svd_from_ba, rebuild_ba_from_uv_sigma
from swift.tuners.peft_format import (
    pair_lora_weights,
    parse_lora_ab_key,
    read_state_dict,
    write_adapter_dir,
)
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.tolerances import SAME_SHAPES_ATOL

# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||: bounds scale with what is compared, so they hold on every CPU (1e-5
    for fp32 results against float64 references or across batch splits; 1e-4 for gradients summed over a
    different number of backward passes). Logits of the same ids through two loads use SAME_SHAPES_ATOL."""
    return float((a - b).norm() / b.norm())


def _batches(
    seed: int = 1, shapes: tuple[tuple[int, int], ...] = ((2, 12), (3, 9))
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches: 4 'prompt' tokens per row masked, the last row padded at the end."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length in shapes:
        ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[-1, length - 4 :] = 0
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[:, :4] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _reference_gradients(base: nn.Module, batches, specs, sigmas) -> dict[str, torch.Tensor]:
    """Autograd of the mean answer-token loss through y = W x + s·U diag(σ) Vᵀ x, σ a leaf (no PEFT)."""
    leaves = {s.name: sigmas[s.name].float().clone().requires_grad_(True) for s in specs}
    handles = []
    for spec in specs:

        def add_delta(module, args, output, spec=spec):
            return output + spec.scaling * ((args[0] @ spec.V.float()) * leaves[spec.name]) @ spec.U.float().T

        handles.append(dict(base.named_modules())[spec.name].register_forward_hook(add_delta))
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    for batch in batches:
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        (loss / total).backward()
    for handle in handles:
        handle.remove()
    return {name: leaf.grad.double() for name, leaf in leaves.items()}


def _specs(adapter) -> tuple[list[ModuleSpec], dict[str, torch.Tensor]]:
    specs, sigmas = [], {}
    for module, pair in adapter.pairs.items():
        svd = lowrank_svd_from_ba(pair.lora_B, pair.lora_A)
        specs.append(ModuleSpec(module, svd.U, svd.V, adapter.scaling(module)))
        sigmas[module] = svd.S
    return specs, sigmas


@pytest.fixture
def lora_setup(tmp_path):
    base = tiny_causal_lm("llama")
    lora_dir = make_lora_dir(base, tmp_path / "lora", r=8, lora_alpha=16, seed=3, std=0.05)
    return base, lora_dir


def _peft(base: nn.Module, lora_dir: Path, **kwargs) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir), **kwargs).eval()


# ----------------------------------------------------------------------------------------------------------
# svd
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_f, in_f, r", [(48, 40, 8), (16, 64, 8), (64, 16, 4), (6, 50, 8), (50, 6, 8)])
def test_factorised_svd_equals_dense_svd(out_f: int, in_f: int, r: int) -> None:
    B, A = torch.randn(out_f, r), torch.randn(r, in_f)
    dense = B.double() @ A.double()
    U, S, Vh, V = lowrank_svd_from_ba(B, A)
    reference = torch.linalg.svdvals(dense)[: S.numel()]
    assert S.numel() == min(out_f, in_f, r)
    torch.testing.assert_close(S, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(S.numel(), dtype=torch.float64))
    torch.testing.assert_close(Vh @ V, torch.eye(S.numel(), dtype=torch.float64))
    B2, A2 = rebuild_ba_from_uv_sigma(U, Vh, S)
    assert _rel(B2 @ A2, dense) <= 1e-5


def test_factorised_svd_of_rank_deficient_factors_drops_zero_directions() -> None:
    B, A = torch.randn(40, 8), torch.randn(8, 30)
    B[:, 3] = 0.0  # a zero column
    B[:, 5] = B[:, 1]  # and a repeated one (exactly representable)
    A[6] = 0.0  # a zero row
    dense = B.double() @ A.double()
    U, S, Vh, _ = lowrank_svd_from_ba(B, A)
    reference = torch.linalg.svdvals(dense)
    assert S.numel() == 5 == int(torch.linalg.matrix_rank(dense))
    torch.testing.assert_close(S, reference[:5], rtol=1e-5, atol=0)
    assert float(reference[5:].max()) <= 1e-12 * float(reference[0])  # dropped ones are zero
    B2, A2 = rebuild_ba_from_uv_sigma(U, Vh, S, rank=8)  # padded back to the adapter's r
    assert B2.shape == (40, 8) and A2.shape == (8, 30)
    assert _rel(B2 @ A2, dense) <= 1e-5
    assert not B2[:, 5:].any() and not A2[5:].any()


def test_zero_update_has_no_directions() -> None:
    U, S, Vh, V = lowrank_svd_from_ba(torch.zeros(12, 4), torch.randn(4, 10))  # LoRA B at init
    assert S.numel() == 0 and U.shape == (12, 0) and V.shape == (10, 0)
    B2, A2 = rebuild_ba_from_uv_sigma(U, Vh, S, rank=4, dtype=torch.float32)
    assert B2.shape == (12, 4) and A2.shape == (4, 10) and not B2.any() and B2.dtype == torch.float32


def test_rebuild_with_edited_sigma() -> None:
    B, A = torch.randn(20, 4), torch.randn(4, 24)
    U, S, Vh, _ = lowrank_svd_from_ba(B, A)
    new = S * torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    B2, A2 = rebuild_ba_from_uv_sigma(U, Vh, new)
    torch.testing.assert_close(B2 @ A2, U @ torch.diag(new) @ Vh)
    torch.testing.assert_close(B2, U * new.sqrt())  # sqrt(σ′) in each factor


# ----------------------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_hook_gradients_equal_autograd_of_sigma_reparametrisation(tmp_path, use_rslora: bool) -> None:
    base = tiny_causal_lm("llama")
    lora_dir = make_lora_dir(base, tmp_path / "lora", r=8, lora_alpha=16, use_rslora=use_rslora, seed=3)
    adapter = load_lora_adapter(lora_dir)
    assert len(adapter.pairs) == 4  # q_proj, v_proj in 2 layers
    specs, sigmas = _specs(adapter)
    peft_model = _peft(base, lora_dir)
    for spec in specs:  # the scaling read from adapter_config.json is PEFT's
        assert resolve_module(peft_model, spec.name).scaling["default"] == pytest.approx(
            spec.scaling, rel=1e-12
        )
    batches = _batches()
    got = compute_sigma_gradients(peft_model, batches, specs)
    reference = _reference_gradients(copy.deepcopy(base), batches, specs, sigmas)
    for spec in specs:
        assert reference[spec.name].abs().max() > 0
        assert _rel(got[spec.name], reference[spec.name]) <= 1e-4, spec.name
    # frozen parameters stay frozen, no weight gradients are left behind
    assert all(p.grad is None for p in peft_model.parameters())


def test_hook_gradients_do_not_depend_on_batching(lora_setup) -> None:
    base, lora_dir = lora_setup
    specs, _ = _specs(load_lora_adapter(lora_dir))
    peft_model = _peft(base, lora_dir)
    (one,) = _batches(shapes=((4, 10),))
    split = [{k: v[:1] for k, v in one.items()}, {k: v[1:] for k, v in one.items()}]
    whole = compute_sigma_gradients(peft_model, [one], specs)
    parts = compute_sigma_gradients(peft_model, split, specs)
    for spec in specs:
        assert _rel(parts[spec.name], whole[spec.name]) <= 1e-5


def test_hooks_in_a_user_loop_with_trainable_lora(lora_setup) -> None:
    base, lora_dir = lora_setup
    specs, _ = _specs(load_lora_adapter(lora_dir))
    expected = compute_sigma_gradients(_peft(base, lora_dir), _batches(), specs)
    model = _peft(base, lora_dir, is_trainable=True)  # outputs already carry a graph here
    batches = _batches()
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    with register_sigma_hooks(model, specs) as context:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum"
            )
            (loss / total).backward()
        got = context.g_sigma()
    assert not context.handles  # removed on exit
    for spec in specs:
        assert _rel(got[spec.name], expected[spec.name]) <= 1e-5


def test_hook_without_gradient_is_an_error_naming_the_module(lora_setup) -> None:
    base, lora_dir = lora_setup
    specs, _ = _specs(load_lora_adapter(lora_dir))
    model = _peft(base, lora_dir)
    with register_sigma_hooks(model, specs) as context, torch.enable_grad():
        model(input_ids=_batches()[0]["input_ids"])  # forward, no backward
        with pytest.raises(
            SigmaHookError, match=r"model\.layers\.0\.self_attn\.q_proj.*never received a gradient"
        ):
            context.g_sigma()
    with pytest.raises(ValueError, match="'model.layers.9.self_attn.q_proj' is not in the model"):
        register_sigma_hooks(
            model, [ModuleSpec("model.layers.9.self_attn.q_proj", specs[0].U, specs[0].V, 1.0)]
        )
    wrong = ModuleSpec(specs[0].name, torch.zeros(7, 2), torch.zeros(64, 2), 1.0)
    with pytest.raises(ValueError, match="is 64 -> 64 but its spec has"):
        register_sigma_hooks(model, [wrong])
    with pytest.raises(ValueError, match="batches is empty"):
        compute_sigma_gradients(model, [], specs)
    no_labels = [{**_batches()[0], "labels": torch.full((2, 12), IGNORE_INDEX)}]
    with pytest.raises(ValueError, match="no labelled token"):
        compute_sigma_gradients(model, no_labels, specs)


# ----------------------------------------------------------------------------------------------------------
# edit
# ----------------------------------------------------------------------------------------------------------


SIGMA = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
G = torch.tensor([0.1, -3.0, 0.0, 2.0, -0.5], dtype=torch.float64)


def test_abs_select_amplifies_largest_and_suppresses_smallest_abs_gradient() -> None:
    gate = spectral_gate(SIGMA, G, EditConfig(amp_frac=0.2, sup_frac=0.2, amp_factor=1.5, sup_factor=0.5))
    assert gate.amplified.tolist() == [1] and gate.suppressed.tolist() == [2]
    torch.testing.assert_close(gate.sigma, torch.tensor([5.0, 6.0, 1.5, 2.0, 1.0], dtype=torch.float64))
    kept = apply_spectral_edit(SIGMA, G, EditConfig(amp_factor=1.5, sup_factor=0.5, preserve_l1=True))
    assert float(kept.sum()) == pytest.approx(float(SIGMA.sum()))


def test_gd_steps_and_clamps() -> None:
    additive = apply_spectral_edit(
        SIGMA, G, EditConfig(mode="gd", gd_update="additive", eta=1.0, grad_norm="none")
    )
    torch.testing.assert_close(additive, (SIGMA - G).clamp_min(0))
    assert float(additive[3]) == 0.0  # 2 - 2 -> clamped at 0, never negative
    mult = apply_spectral_edit(SIGMA, G, EditConfig(mode="gd", eta=0.5, grad_norm="mean_abs"))
    torch.testing.assert_close(mult, SIGMA * torch.exp(-0.5 * G / G.abs().mean()))


def test_random_index_matches_abs_select_counts_and_is_seeded() -> None:
    sigma = torch.linspace(10, 1, 20, dtype=torch.float64)
    g = torch.randn(20, dtype=torch.float64)
    selected = spectral_gate(sigma, g, EditConfig(amp_frac=0.25, sup_frac=0.15))
    draws = [
        spectral_gate(sigma, None, EditConfig(mode="random_index", amp_frac=0.25, sup_frac=0.15, seed=s))
        for s in range(4)
    ]
    for draw in draws:
        assert len(draw.amplified) == len(selected.amplified) == 5
        assert len(draw.suppressed) == len(selected.suppressed) == 3
        assert not set(draw.amplified.tolist()) & set(draw.suppressed.tolist())
    again = spectral_gate(sigma, None, EditConfig(mode="random_index", amp_frac=0.25, sup_frac=0.15, seed=0))
    assert torch.equal(again.sigma, draws[0].sigma)
    assert len({tuple(d.amplified.tolist()) for d in draws}) > 1


@pytest.mark.parametrize(
    "config",
    [
        EditConfig(amp_factor=1.0, sup_factor=1.0),
        EditConfig(mode="gd", eta=0.0),
        EditConfig(mode="random_index", amp_factor=1.0, sup_factor=1.0, preserve_l1=True),
    ],
    ids=["abs_select-factors-1", "gd-eta-0", "random_index-factors-1"],
)
def test_identity_edit_reproduces_the_original_logits(lora_setup, tmp_path, config: EditConfig) -> None:
    from spectral_edit.pipeline import decompose_adapter, edit_adapter_state

    base, lora_dir = lora_setup
    adapter = load_lora_adapter(lora_dir)
    decompositions = decompose_adapter(adapter, list(adapter.pairs))
    g = compute_sigma_gradients(_peft(base, lora_dir), _batches(), _specs(adapter)[0])
    state, edits = edit_adapter_state(adapter, decompositions, g, config)
    for edit in edits.values():
        assert edit.sigma_after == pytest.approx(edit.sigma_before, rel=1e-12)
    write_adapter_dir(tmp_path / "same", state, adapter.config)
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        original = _peft(base, lora_dir)(input_ids=ids).logits
        rebuilt = _peft(base, tmp_path / "same")(input_ids=ids).logits
    torch.testing.assert_close(rebuilt, original, rtol=0, atol=SAME_SHAPES_ATOL)


def test_edited_adapter_loads_in_plain_peft_with_the_edited_spectrum(lora_setup, tmp_path) -> None:
    from spectral_edit.pipeline import decompose_adapter, edit_adapter_state

    base, lora_dir = lora_setup
    adapter = load_lora_adapter(lora_dir)
    decompositions = decompose_adapter(adapter, list(adapter.pairs))
    g = compute_sigma_gradients(_peft(base, lora_dir), _batches(), _specs(adapter)[0])
    state, edits = edit_adapter_state(adapter, decompositions, g, EditConfig(amp_factor=2.0, sup_factor=0.0))
    write_adapter_dir(tmp_path / "edited", state, adapter.config)
    saved = read_state_dict(tmp_path / "edited")
    model = _peft(base, tmp_path / "edited")
    for module, edit in edits.items():
        layer = resolve_module(model, module)
        assert torch.equal(layer.lora_A["default"].weight, saved[f"base_model.model.{module}.lora_A.weight"])
        U, _, Vh, _ = decompositions[module][0]
        delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        expected = U @ torch.diag(torch.tensor(edit.sigma_after, dtype=torch.float64)) @ Vh
        assert _rel(delta, expected) <= 1e-6
        assert edit.sigma_after != pytest.approx(edit.sigma_before)
        assert len(edit.amplified) == 2 and len(edit.suppressed) == 2  # round(0.2 * 8)


# ----------------------------------------------------------------------------------------------------------
# io
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, expected",
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            ("model.layers.0.self_attn.q_proj", "A"),
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            ("model.layers.0.self_attn.q_proj", "B"),
        ),
        ("model.layers.1.mlp.down_proj.lora_A.my_task.weight", ("model.layers.1.mlp.down_proj", "A")),
        ("layers.0.attn.q_proj.lora_a.weight", ("layers.0.attn.q_proj", "A")),
        ("lora_unet_block_0_to_q.lora_up.weight", ("lora_unet_block_0_to_q", "B")),
        ("unet.block.attn.to_k.lora.down.weight", ("unet.block.attn.to_k", "A")),
        ("base_model.model.model.embed_tokens.lora_embedding_A", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", None),
        ("base_model.model.lm_head.weight", None),
    ],
)
def test_parse_lora_ab_key(key: str, expected) -> None:
    assert parse_lora_ab_key(key) == expected


def test_ms_swift_key_naming_is_edited_into_a_peft_adapter(lora_setup, tmp_path) -> None:
    from safetensors.torch import save_file

    from spectral_edit.pipeline import EditJob, run_edit
    from tests.tiny_vlms import save_tiny_llama

    base, lora_dir = lora_setup
    swift_dir = tmp_path / "swift_lora"
    swift_dir.mkdir()
    state = read_state_dict(lora_dir)
    save_file(
        {k.replace(".weight", ".default.weight"): v for k, v in state.items()},
        str(swift_dir / "adapter_model.safetensors"),
    )
    (swift_dir / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    assert set(load_lora_adapter(swift_dir).pairs) == set(load_lora_adapter(lora_dir).pairs)
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([{"query": "what is the capital of france ?", "response": "paris ."}] * 2))
    config = EditConfig(amp_factor=1.0, sup_factor=1.0)
    run_edit(
        EditJob(
            str(save_tiny_llama(tmp_path / "model")),
            str(swift_dir),
            str(tmp_path / "out"),
            config,
            str(calib),
            progress=False,
        )
    )
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in read_state_dict(tmp_path / "out"))
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            _peft(base, tmp_path / "out")(input_ids=ids).logits,
            _peft(base, lora_dir)(input_ids=ids).logits,
            rtol=0,
            atol=SAME_SHAPES_ATOL,  # the same ids through both loads of a tiny model
        )


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def _write_adapter(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return path


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"model.embed_tokens.weight": torch.zeros(4, 4)}, "holds no LoRA A/B weight pairs"),
        (
            {"m.q_proj.lora_A.weight": torch.zeros(4, 16), "m.q_proj.lora_B.weight": torch.zeros(16, 3)},
            r"mismatched shapes lora_A \(4, 16\).*lora_B \(16, 3\)",
        ),
        (
            {"m.q_proj.lora_A.weight": torch.zeros(4, 16)},
            "has no matching lora_B weight for module 'm.q_proj'",
        ),
        (
            {
                "m.q.lora_A.a1.weight": torch.zeros(4, 8),
                "m.q.lora_B.a1.weight": torch.zeros(8, 4),
                "m.q.lora_A.a2.weight": torch.zeros(4, 8),
            },
            "Pass adapter_name",
        ),
    ],
    ids=["no-pairs", "mismatched-shapes", "unpaired", "two-adapters"],
)
def test_bad_adapters_are_clear_errors(tmp_path, tensors, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_lora_adapter(_write_adapter(tmp_path / "bad", tensors))


def test_dora_and_missing_paths_are_refused(tmp_path) -> None:
    path = _write_adapter(
        tmp_path / "dora", {"m.q.lora_A.weight": torch.zeros(4, 8), "m.q.lora_B.weight": torch.zeros(8, 4)}
    )
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_lora_adapter(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora_adapter(tmp_path / "missing")
    pairs = pair_lora_weights(
        {"m.q.lora_A.a1.weight": torch.ones(2, 3), "m.q.lora_B.a1.weight": torch.ones(3, 2)},
        adapter_name="a1",
    )
    assert pairs["m.q"].r == 2


@pytest.mark.parametrize(
    "kwargs, value",
    [
        ({"mode": "top_k"}, "'top_k'"),
        ({"amp_frac": 1.5}, "1.5"),
        ({"sup_frac": -0.1}, "-0.1"),
        ({"amp_frac": 0.7, "sup_frac": 0.5}, "amp_frac=0.7"),
        ({"sup_factor": -1.0}, "-1.0"),
        ({"eta": float("nan")}, "nan"),
        ({"amp_factor": True}, "True"),
        ({"gd_update": "newton"}, "'newton'"),
        ({"grad_norm": "max"}, "'max'"),
        ({"seed": -3}, "-3"),
        ({"preserve_l1": "yes"}, "'yes'"),
    ],
)
def test_bad_edit_config_values_name_the_value(kwargs: dict, value: str) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(value)}"):
        EditConfig(**kwargs)


def test_bad_edit_inputs() -> None:
    with pytest.raises(ValueError, match="unknown EditConfig field"):
        EditConfig.from_dict({"amp_fraction": 0.2})
    with pytest.raises(ValueError, match="g_sigma must have the shape of sigma"):
        apply_spectral_edit(SIGMA, G[:3], EditConfig())
    with pytest.raises(ValueError, match="sigma must hold finite singular values >= 0"):
        apply_spectral_edit(-SIGMA, G, EditConfig())
    with pytest.raises(ValueError, match="needs g_sigma"):
        apply_spectral_edit(SIGMA, None, EditConfig())
    with pytest.raises(ValueError, match="different ranks"):
        lowrank_svd_from_ba(torch.randn(8, 4), torch.randn(3, 8))


def test_empty_calibration_data_is_an_error(tmp_path) -> None:
    from spectral_edit.data import read_qa_pairs

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="holds no records"):
        read_qa_pairs(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a"}\n')
    with pytest.raises(ValueError, match=r"record 0: the record has none of \['output', 'response'\]"):
        read_qa_pairs(bad)


# ----------------------------------------------------------------------------------------------------------
# CLI and smoke test
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from tests.tiny_vlms import save_tiny_llama

    root = tmp_path_factory.mktemp("spectral_cli")
    model_dir = save_tiny_llama(root / "model")
    lora_dir = make_lora_dir(tiny_causal_lm("llama"), root / "lora", r=4, lora_alpha=8, seed=5)
    data = root / "data.jsonl"
    records = [
        {"input": "what is the capital of france ?", "output": "paris ."},
        {"query": "describe this image", "response": "a red cat and a dog"},
        {"input": "what is two plus one ?", "output": "two"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, model_dir, lora_dir, data


@pytest.mark.parametrize("mode", ["abs_select", "gd", "random_index"])
def test_cli_edit_writes_a_peft_adapter_and_meta(cli_setup, mode: str) -> None:
    from spectral_edit.cli import main

    root, model_dir, lora_dir, data = cli_setup
    out = root / f"edited_{mode}"
    argv = ["edit", "--base_model", str(model_dir), "--model_type", "llama", "--lora_path", str(lora_dir)]
    argv += ["--calib_data", str(data), "--out_dir", str(out), "--mode", mode, "--num_calib", "3"]
    argv += [
        "--batch_size",
        "2",
        "--max_length",
        "64",
        "--amp_factor",
        "1.5",
        "--seed",
        "7",
        "--no_progress",
        "--quiet",
    ]
    assert main(argv) == 0
    assert (out / "adapter_config.json").read_text() == (lora_dir / "adapter_config.json").read_text()
    meta = json.loads((out / "spectral_edit_meta.json").read_text())
    assert (
        meta["config"]["mode"] == mode and meta["config"]["amp_factor"] == 1.5 and meta["config"]["seed"] == 7
    )
    assert meta["calibration"]["path"] == str(data) and meta["calibration"]["num_examples"] == 3
    assert meta["calibration"]["num_target_tokens"] > 0
    assert len(meta["modules"]) == 4
    for entry in meta["modules"].values():
        assert len(entry["sigma_before"]) == len(entry["sigma_after"]) == len(entry["g_sigma"]) == 4
        assert any(g != 0 for g in entry["g_sigma"])
    assert any(e["sigma_before"] != e["sigma_after"] for e in meta["modules"].values())
    _peft(tiny_causal_lm("llama"), out)  # loads in plain PEFT


def test_cli_eval_reports_exact_match(cli_setup, capsys) -> None:
    from spectral_edit.cli import main

    root, model_dir, lora_dir, data = cli_setup
    argv = ["eval", "--base_model", str(model_dir), "--lora_dir", str(lora_dir), "--test_data", str(data)]
    assert main(argv + ["--max_new_tokens", "3", "--batch_size", "2", "--no_progress", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((lora_dir / "eval_data.json").read_text())
    assert printed["count"] == result["count"] == 3
    assert result["accuracy"] == result["correct"] / 3
    assert [row["reference"] for row in result["predictions"]] == ["paris .", "a red cat and a dog", "two"]


def test_cli_reports_user_errors(cli_setup, tmp_path, capsys) -> None:
    from spectral_edit.cli import main

    _, model_dir, lora_dir, _ = cli_setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = ["edit", "--base_model", str(model_dir), "--lora_path", str(lora_dir), "--calib_data", str(empty)]
    assert main(argv + ["--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert "holds no records" in capsys.readouterr().err
    assert main(argv[:-2] + ["--out_dir", str(tmp_path / "out2"), "--quiet"]) == 2
    assert "needs --calib_data" in capsys.readouterr().err
    assert main(["eval", "--base_model", str(model_dir), "--test_data", str(empty), "--quiet"]) == 2
    assert "--output is required" in capsys.readouterr().err


def test_smoke_test_passes(capsys) -> None:
    from spectral_edit import smoke_test

    assert smoke_test.main() == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out
