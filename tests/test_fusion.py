"""Fusion methods against independent references: dense sums built by hand, the mixture layers and PEFT 0.21."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from lora_retriever.fusion import LoraModuleWeights, LoraWeights, available_methods, fuse
from swift.tuners import Swift, lora_mixture_context, read_adapter_dir
from swift.tuners.peft_format import LoraAdapterConfig
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.tolerances import SAME_SHAPES_ATOL

# Tolerances: factor and delta comparisons hold fp32 results against float64 references built from O(0.1)
# factors (1e-6 / 1e-5 are hundreds of ulps of those values on any CPU, far below the effect of a wrong weight);
# logit comparisons run the same batch through both sides of a tiny model (tests/tolerances.py).

# Different ranks, alphas and target modules, one rsLoRA; gate_proj/up_proj are held by b (and rs) only.
MIXED_SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
    "b": dict(r=8, lora_alpha=32, target_modules="all-linear", seed=2),
    "c": dict(r=16, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj", "q_proj"], seed=3),
    "rs": dict(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_rslora=True, seed=4),
}
MIXED_WEIGHTS = [0.5, -0.3, 0.8, 0.4]
# Same rank and alpha everywhere: what PEFT's linear/ties/dare accept.
EQUAL_SPECS = {
    f"e{i}": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], seed=10 + i)
    for i in range(3)
}
EQUAL_WEIGHTS = [0.6, -0.3, 0.5]

# Each method with the options exercised on the mixed pool.
METHOD_CASES = {
    "cat": ("cat", {}),
    "linear-paper": ("linear", {}),
    "linear-sqrt": ("linear", {"weight_split": "sqrt"}),
    "svd-full": ("svd", {}),
    "svd-5": ("svd", {"svd_rank": 5}),
    "ties": ("ties", {"density": 0.5}),
    "dare_linear": ("dare_linear", {"density": 0.5, "seed": 3}),
    "dare_ties": ("dare_ties", {"density": 0.5, "majority_sign_method": "frequency"}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base model, {name: adapter dir} for the mixed and the equal pool, output root)."""
    base = tiny_causal_lm("llama")
    root = tmp_path_factory.mktemp("fusion")
    specs = {**MIXED_SPECS, **EQUAL_SPECS}
    dirs = {name: make_lora_dir(base, root / name, **spec) for name, spec in specs.items()}
    return base, dirs, root


def mixed_dirs(dirs):
    return [dirs[n] for n in MIXED_SPECS]


def equal_dirs(dirs):
    return [dirs[n] for n in EQUAL_SPECS]


def hand_scaled_factors(adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) per module with s computed here from the JSON: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = {}
    for module, pair in read_adapter_dir(adapter_dir).pairs.items():
        s = raw["lora_alpha"] / (math.sqrt(pair.r) if raw.get("use_rslora") else pair.r)
        out[module] = (pair.lora_A.double(), pair.lora_B.double(), s)
    return out


def dense_weighted_sum(adapter_dirs, weights) -> dict[str, torch.Tensor]:
    """Reference Σ_j w_j s_j B_j A_j per module, in float64, from the files."""
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(adapter_dirs, weights):
        for module, (lora_A, lora_B, s) in hand_scaled_factors(path).items():
            term = w * s * (lora_B @ lora_A)
            total[module] = total[module] + term if module in total else term
    return total


def peft_factors(peft_model, adapter_name) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (lora_A, lora_B)} of one adapter inside a PeftModel (names without PEFT's prefix)."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            short = name.removeprefix("base_model.model.")
            out[short] = (
                module.lora_A[adapter_name].weight.detach(),
                module.lora_B[adapter_name].weight.detach(),
            )
    return out


def peft_merged(base, adapter_dirs, weights, combination_type, **kwargs):
    """PEFT 0.21's add_weighted_adapter on the same sources: {module: (lora_A, lora_B)}."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[0]), adapter_name="s0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"s{i}")
    names = [f"s{i}" for i in range(len(adapter_dirs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density >= 1 prunes nothing
        model.add_weighted_adapter(
            names, list(weights), "merged", combination_type=combination_type, **kwargs
        )
    return peft_factors(model, "merged")


def assert_factors_close(ours, theirs, tol):
    assert set(ours.modules) == set(theirs)
    for module, (lora_A, lora_B) in ours.modules.items():
        ref_A, ref_B = theirs[module]
        assert lora_A.shape == ref_A.shape and lora_B.shape == ref_B.shape, module
        assert (lora_A - ref_A).abs().max().item() <= tol, f"lora_A at {module}"
        assert (lora_B - ref_B).abs().max().item() <= tol, f"lora_B at {module}"


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ----------------------------------------------------------------------------------------------------------
# cat and svd: exact.
# ----------------------------------------------------------------------------------------------------------


def test_cat_equals_dense_weighted_sum_over_the_union_of_modules(setup):
    _, dirs, _ = setup
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "cat")
    reference = dense_weighted_sum(mixed_dirs(dirs), MIXED_WEIGHTS)
    assert set(fused.modules) == set(reference)
    assert "model.layers.0.mlp.gate_proj" in reference  # held by b alone
    for module, ref in reference.items():
        assert (fused.delta(module).double() - ref).abs().max().item() <= 1e-5, module
        present = [spec["r"] for n, spec in MIXED_SPECS.items() if module in read_adapter_dir(dirs[n]).pairs]
        assert fused.ranks[module] == sum(present), module


def test_cat_adapter_equals_the_mixture_of_its_sources_per_sample(setup):
    """A fused `cat` adapter == the mixture layers routing every sample with the same weights."""
    base, dirs, root = setup
    out = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "cat").save(root / "cat_vs_mixture")
    pool = None
    for name in MIXED_SPECS:
        pool = Swift.from_pretrained(pool or copy.deepcopy(base), dirs[name], adapter_name=name)
    fused_model = Swift.from_pretrained(copy.deepcopy(base), out)
    input_ids = torch.randint(3, VOCAB, (3, 11))
    mapping = torch.tensor([MIXED_WEIGHTS] * 3)
    with torch.no_grad(), lora_mixture_context(mapping, list(MIXED_SPECS)):
        mixed = pool(input_ids=input_ids).logits
    fused_logits = logits(fused_model, input_ids)
    assert (fused_logits - mixed).abs().max().item() <= SAME_SHAPES_ATOL  # same batch through both
    assert (fused_logits - logits(base, input_ids)).abs().max().item() > 1e-3  # the adapters do something


def test_svd_full_rank_equals_cat(setup):
    _, dirs, _ = setup
    cat = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "cat")
    svd = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "svd")
    assert set(svd.modules) == set(cat.modules)
    for module in cat.modules:
        assert (svd.delta(module) - cat.delta(module)).abs().max().item() <= 1e-5, module
        assert svd.ranks[module] <= cat.ranks[module]
        assert svd.truncation_error[module] <= 1e-6


@pytest.mark.parametrize("svd_rank", [1, 5])
def test_svd_truncation_error_is_the_dropped_singular_values_and_optimal(setup, svd_rank):
    """Reported error == sqrt(Σ dropped σ²)/sqrt(Σ σ²) of the dense ΔW; actual error == dense truncated SVD's."""
    _, dirs, _ = setup
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "svd", svd_rank=svd_rank)
    reference = dense_weighted_sum(mixed_dirs(dirs), MIXED_WEIGHTS)
    for module, ref in reference.items():
        u, sigma, vh = torch.linalg.svd(ref, full_matrices=False)
        k = min(svd_rank, sigma.numel())
        assert fused.ranks[module] == k
        formula = math.sqrt(float(sigma[k:].square().sum() / sigma.square().sum()))
        best = (ref - (u[:, :k] * sigma[:k]) @ vh[:k]).norm() / ref.norm()  # Eckart–Young optimum
        actual = (ref - fused.delta(module).double()).norm() / ref.norm()
        assert abs(fused.truncation_error[module] - formula) <= 1e-6, module
        assert actual <= best + 1e-6, module
        assert abs(actual - fused.truncation_error[module]) <= 1e-5, module
    assert max(fused.truncation_error.values()) > 0.1  # the truncation really drops something


# ----------------------------------------------------------------------------------------------------------
# Every method: a plain PEFT adapter that PEFT and our Swift loader read identically.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_fused_adapter_loads_in_plain_peft_like_in_swift(setup, case):
    base, dirs, root = setup
    method, options = METHOD_CASES[case]
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, method, **options)
    out = fused.save(root / f"peft_{case}")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    swift_model = Swift.from_pretrained(copy.deepcopy(base), out)

    loaded = peft_factors(peft_model, "default")
    assert set(loaded) == set(fused.modules)
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            assert module.scaling["default"] == 1.0, short
            assert module.r["default"] == fused.ranks[short], short
            assert torch.equal(loaded[short][0], fused.modules[short][0]), short
            assert torch.equal(loaded[short][1], fused.modules[short][1]), short

    input_ids = torch.randint(3, VOCAB, (2, 9))
    peft_logits = logits(peft_model, input_ids)
    assert (peft_logits - logits(swift_model, input_ids)).abs().max().item() <= 1e-6
    assert (peft_logits - logits(base, input_ids)).abs().max().item() > 1e-3


def test_saved_adapter_round_trips_with_scaling_one_and_metadata(setup):
    _, dirs, root = setup
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "svd", svd_rank=5)
    out = fused.save(root / "roundtrip", base_model_name_or_path="tiny-llama")
    adapter = read_adapter_dir(out)
    config = adapter.config
    assert set(adapter.pairs) == set(fused.modules)
    for module, pair in adapter.pairs.items():
        assert torch.equal(pair.lora_A, fused.modules[module][0])
        assert torch.equal(pair.lora_B, fused.modules[module][1])
        assert config.scaling(module, pair.r) == 1.0
    assert not config.use_rslora and config.base_model_name_or_path == "tiny-llama"
    meta = json.loads((out / "fusion_meta.json").read_text())
    assert meta["method"] == "svd" and meta["options"] == {"svd_rank": 5}
    assert [s["name"] for s in meta["sources"]] == list(MIXED_SPECS)
    assert meta["weights"] == MIXED_WEIGHTS
    assert meta["ranks"] == fused.ranks
    assert meta["truncation_error"] == pytest.approx(fused.truncation_error)


def test_rank_pattern_covers_modules_whose_rank_differs(setup):
    _, dirs, _ = setup
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "cat")
    config = LoraAdapterConfig.from_dict(fused.peft_config())
    assert len(set(fused.ranks.values())) > 1 and config.rank_pattern
    for module, r in fused.ranks.items():
        assert config.expected_rank(module) == r, module
        assert config.scaling(module, r) == 1.0, module


# ----------------------------------------------------------------------------------------------------------
# linear / ties / dare against PEFT where PEFT accepts the inputs (same ranks and scalings).
# ----------------------------------------------------------------------------------------------------------


def test_linear_sqrt_split_equals_peft_linear(setup):
    base, dirs, _ = setup
    ours = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, "linear", weight_split="sqrt")
    assert_factors_close(ours, peft_merged(base, equal_dirs(dirs), EQUAL_WEIGHTS, "linear"), 1e-6)


def test_linear_paper_split_equals_peft_linear_with_squared_weights(setup):
    """The paper's A = Σ w_j A_j, B = Σ w_j B_j (shared scaling) is PEFT's linear with weights w_j²."""
    base, dirs, _ = setup
    weights = [0.5, 0.3, 0.2]
    ours = fuse(equal_dirs(dirs), weights, "linear")
    squared = [w * w for w in weights]
    assert_factors_close(ours, peft_merged(base, equal_dirs(dirs), squared, "linear"), 1e-6)
    # and its product is the paper's s · (Σ w_j B_j)(Σ w_j A_j)
    factors = [hand_scaled_factors(p) for p in equal_dirs(dirs)]
    for module in ours.modules:
        s = factors[0][module][2]
        sum_A = sum(w * f[module][0] for w, f in zip(weights, factors))
        sum_B = sum(w * f[module][1] for w, f in zip(weights, factors))
        assert (ours.delta(module).double() - s * sum_B @ sum_A).abs().max().item() <= 1e-6


@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
def test_ties_equals_peft_ties(setup, density, majority_sign_method):
    base, dirs, _ = setup
    kwargs = dict(density=density, majority_sign_method=majority_sign_method)
    ours = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, "ties", **kwargs)
    assert_factors_close(ours, peft_merged(base, equal_dirs(dirs), EQUAL_WEIGHTS, "ties", **kwargs), 1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_dropping_equals_peft(setup, method):
    base, dirs, _ = setup
    ours = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, method, density=1.0, seed=123)
    theirs = peft_merged(base, equal_dirs(dirs), EQUAL_WEIGHTS, method, density=1.0)
    assert_factors_close(ours, theirs, 1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed_and_leaves_the_global_rng_alone(setup, method):
    _, dirs, _ = setup
    rng_before = torch.get_rng_state()
    first = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, method, density=0.4, seed=7)
    again = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, method, density=0.4, seed=7)
    other = fuse(equal_dirs(dirs), EQUAL_WEIGHTS, method, density=0.4, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for module in first.modules:
        assert torch.equal(first.modules[module][0], again.modules[module][0])
        assert torch.equal(first.modules[module][1], again.modules[module][1])
    assert any(not torch.equal(first.modules[m][0], other.modules[m][0]) for m in first.modules)


def test_dare_drops_entries_at_rate_one_minus_density_and_rescales(setup):
    """One source, weight 1: every fused entry is 0 or sqrt(s)·x/density, about `density` of them kept."""
    _, dirs, _ = setup
    density = 0.4
    source = hand_scaled_factors(dirs["e0"])
    fused = fuse([dirs["e0"]], [1.0], "dare_linear", density=density, seed=1)
    kept, total = 0, 0
    for module, (lora_A, lora_B) in fused.modules.items():
        src_A, src_B, s = source[module]
        for ours, src in ((lora_A, src_A), (lora_B, src_B)):
            expected = math.sqrt(s) * src / density
            nonzero = ours != 0
            assert torch.allclose(ours[nonzero].double(), expected[nonzero], atol=1e-6)
            kept += int(nonzero.sum())
            total += ours.numel()
    assert abs(kept / total - density) < 0.02


# ----------------------------------------------------------------------------------------------------------
# Different ranks, alphas, target modules and rsLoRA.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"])
def test_single_rslora_adapter_is_reproduced_exactly(setup, method):
    """Weight 1 on one rsLoRA adapter: ΔW == (alpha / sqrt(r)) B A (by hand), logits == PEFT's own rsLoRA."""
    base, dirs, root = setup
    options = {"density": 1.0} if method in ("ties", "dare_linear", "dare_ties") else {}
    fused = fuse([dirs["rs"]], [1.0], method, **options)
    for module, (lora_A, lora_B, s) in hand_scaled_factors(dirs["rs"]).items():
        assert s == 16 / math.sqrt(8)
        assert (fused.delta(module).double() - s * lora_B @ lora_A).abs().max().item() <= 1e-6, module
    out = fused.save(root / f"rs_{method}")
    input_ids = torch.randint(3, VOCAB, (2, 7))
    original = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["rs"])).eval()
    refused = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert (logits(refused, input_ids) - logits(original, input_ids)).abs().max().item() <= SAME_SHAPES_ATOL


def test_linear_with_mixed_ranks_pads_and_absent_adapters_contribute_nothing(setup):
    """Paper split on ranks 4/8/16 + rsLoRA: (Σ w_j √s_j B_j⁰)(Σ w_j √s_j A_j⁰) with zero padding to max rank."""
    _, dirs, _ = setup
    fused = fuse(mixed_dirs(dirs), MIXED_WEIGHTS, "linear")
    factors = {n: hand_scaled_factors(dirs[n]) for n in MIXED_SPECS}
    for module in fused.modules:
        present = [
            (w, factors[n][module]) for w, n in zip(MIXED_WEIGHTS, MIXED_SPECS) if module in factors[n]
        ]
        rank = max(a.shape[0] for _, (a, _, _) in present)
        assert fused.ranks[module] == rank
        sum_A = sum(
            w * math.sqrt(s) * torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
            for w, (a, _, s) in present
        )
        sum_B = sum(
            w * math.sqrt(s) * torch.nn.functional.pad(b, (0, rank - b.shape[1])) for w, (_, b, s) in present
        )
        assert (fused.delta(module).double() - sum_B @ sum_A).abs().max().item() <= 1e-6, module
    # gate_proj is held by b alone: the paper split gives w_b² s_b B_b A_b there.
    gate = "model.layers.1.mlp.gate_proj"
    lora_A, lora_B, s = factors["b"][gate]
    assert (fused.delta(gate).double() - 0.09 * s * lora_B @ lora_A).abs().max().item() <= 1e-7


def test_ties_trims_each_source_at_its_own_rank_before_zero_padding():
    """Worked by hand: density 0.5 keeps 2 of the rank-1 source's 4 entries (not all 4 of 8 padded ones)."""
    small = LoraModuleWeights(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(3, 1), 1.0)
    big_A = torch.tensor([[10.0, 0.1, 0.1, 10.0], [5.0, 5.0, 0.1, 0.1]])
    big = LoraModuleWeights(big_A, torch.ones(3, 2), 1.0)
    fused = fuse(
        [LoraWeights("small", {"m": small}), LoraWeights("big", {"m": big})], [1.0, 1.0], "ties", density=0.5
    )
    # trimmed: small -> [0, 0, 3, 4] (+ a zero row); big -> [[10, 0, 0, 10], [5, 5, 0, 0]];
    # all kept signs are +, so each entry is the mean over the sources that kept it.
    expected = torch.tensor([[10.0, 0.0, 3.0, 7.0], [5.0, 5.0, 0.0, 0.0]])
    assert torch.equal(fused.modules["m"][0], expected)


def test_in_memory_sources_and_default_uniform_weights(setup):
    _, dirs, _ = setup
    sources = [LoraWeights.from_dir(p) for p in mixed_dirs(dirs)]
    fused = fuse(sources, method="cat")
    assert fused.weights == [0.25] * 4 and fused.sources == list(MIXED_SPECS)
    reference = dense_weighted_sum(mixed_dirs(dirs), [0.25] * 4)
    for module, ref in reference.items():
        assert (fused.delta(module).double() - ref).abs().max().item() <= 1e-5, module


def test_lm_head_sources_fuse_into_an_adapter_that_carries_the_base_weight(setup):
    """PEFT saves lm_head's base weight with a LoRA on it; the fused adapter keeps it, as PEFT would."""
    base, dirs, root = setup
    head = make_lora_dir(base, root / "lm_head_src", r=4, target_modules=["q_proj", "lm_head"], seed=7)
    fused = fuse([head, dirs["a"]], [0.7, 0.4], "cat")
    out = fused.save(root / "lm_head_cat")
    saved = read_adapter_dir(out)
    assert torch.equal(saved.base_weights["lm_head"], base.lm_head.weight)
    reference = dense_weighted_sum([head, dirs["a"]], [0.7, 0.4])
    assert (fused.delta("lm_head").double() - reference["lm_head"]).abs().max().item() <= 1e-5
    input_ids = torch.randint(3, VOCAB, (2, 6))
    peft_logits = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval(), input_ids)
    swift_logits = logits(Swift.from_pretrained(copy.deepcopy(base), out), input_ids)
    assert (peft_logits - swift_logits).abs().max().item() <= 1e-5  # same shapes, tiny model: strict bound

    other = LoraWeights.from_dir(head, name="resized")
    other.base_weights["lm_head"] = other.base_weights["lm_head"] + 1e-3
    with pytest.raises(
        ValueError, match=r"'lm_head_src' and 'resized' carry different base weights for 'lm_head'"
    ):
        fuse([head, other], None, "cat")


# ----------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------


def _pair(in_features: int) -> LoraWeights:
    module = LoraModuleWeights(torch.randn(2, in_features), torch.randn(4, 2), 1.0)
    return LoraWeights(f"in{in_features}", {"layer.proj": module})


BAD_CALLS = {
    "empty": (lambda d: fuse([], None, "cat"), r"non-empty.*\[\]"),
    "unknown method": (lambda d: fuse(d, None, "avg"), r"'avg'.*\['cat', 'dare_linear'"),
    "weights length": (lambda d: fuse(d, [1.0], "cat"), r"1 entries.*\[1\.0\].*2 adapters"),
    "weight nan": (lambda d: fuse(d, [1.0, float("nan")], "cat"), r"nan"),
    "svd_rank 0": (lambda d: fuse(d, None, "svd", svd_rank=0), r"svd_rank.*got 0"),
    "svd_rank float": (lambda d: fuse(d, None, "svd", svd_rank=2.5), r"svd_rank.*got 2\.5"),
    "density 0": (lambda d: fuse(d, None, "ties", density=0.0), r"density.*\(0, 1\].*got 0\.0"),
    "density 1.5": (lambda d: fuse(d, None, "dare_linear", density=1.5), r"density.*got 1\.5"),
    "density missing": (lambda d: fuse(d, None, "dare_ties"), r"'dare_ties' needs option.*density"),
    "option of another method": (lambda d: fuse(d, None, "cat", density=0.5), r"'cat'.*unknown.*density"),
    "majority sign": (lambda d: fuse(d, None, "ties", density=0.5, majority_sign_method="most"), r"'most'"),
    "weight split": (lambda d: fuse(d, None, "linear", weight_split="mean"), r"weight_split.*'mean'"),
    "seed": (lambda d: fuse(d, None, "dare_linear", density=0.5, seed=-1), r"seed.*-1"),
    "base shapes": (
        lambda d: fuse([_pair(8), _pair(16)], None, "cat"),
        r"'in8' and 'in16'.*layer\.proj.*\[4, 8\]",
    ),
    "factor shapes": (
        lambda d: LoraModuleWeights(torch.randn(2, 8), torch.randn(4, 3), 1.0),
        r"\(2, 8\).*\(4, 3\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_value(setup, case):
    _, dirs, _ = setup
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call([dirs["a"], dirs["b"]])


def test_registry_lists_every_method():
    assert available_methods() == ["cat", "dare_linear", "dare_ties", "linear", "svd", "ties"]
