"""The mixture layers against independent references: plain PEFT and explicitly merged weights."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import PeftModel
from torch import nn

from swift.tuners import LoraLinear, LoraRouting, Swift, lora_layers, lora_mixture_context
from swift.tuners.lora_layers import mixture_kernels
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.tolerances import SAME_SHAPES_ATOL, assert_close

# Same ops on same shapes (tiny models, O(1) values): the strict bound of tests/tolerances.py.
TOL = SAME_SHAPES_ATOL

# generate() kwargs for comparing every decode step's logits with a full forward.
GREEDY_WITH_LOGITS = dict(
    do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True
)

# Three adapters with different ranks, alphas, rsLoRA-free, and different target modules.
POOL_SPECS = {
    "a0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
    "a1": dict(r=8, lora_alpha=32, target_modules="all-linear", seed=2),
    "a2": dict(r=16, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj", "q_proj"], seed=3),
}
NAMES = list(POOL_SPECS)
WEIGHTS = torch.tensor(
    [
        [0.5, 0.5, 0.0],
        [0.0, 0.2, 0.8],
        [0.3, 0.3, 0.4],
        [0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0],
    ]
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pool(request, tmp_path_factory):
    """(base model, {name: adapter dir}, SwiftModel with the pool loaded)."""
    base = tiny_causal_lm(request.param)
    root = tmp_path_factory.mktemp(f"pool_{request.param}")
    dirs = {name: make_lora_dir(base, root / name, **spec) for name, spec in POOL_SPECS.items()}
    model = None
    for name, path in dirs.items():
        model = Swift.from_pretrained(model or copy.deepcopy(base), path, adapter_name=name)
    return base, dirs, model


def peft_pool(base: nn.Module, dirs: dict) -> PeftModel:
    names = list(dirs)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(dirs[name]), adapter_name=name)
    return peft_model.eval()


def peft_cat_logits(
    peft_model: PeftModel, weights: list[float], input_ids: torch.Tensor, tag: str
) -> torch.Tensor:
    """Reference for one sample: PEFT's exact `cat` merge with that sample's weights."""
    used = [(n, w) for n, w in zip(NAMES, weights) if w != 0]
    with torch.no_grad():
        if not used:
            with peft_model.disable_adapter():
                return peft_model(input_ids=input_ids).logits
        peft_model.add_weighted_adapter(
            [n for n, _ in used], [w for _, w in used], tag, combination_type="cat"
        )
        peft_model.set_adapter(tag)
        return peft_model(input_ids=input_ids).logits


@pytest.mark.parametrize("kernel", ["auto", "union", "gather"])
def test_mixed_batch_rows_equal_peft_cat(pool, kernel):
    base, dirs, model = pool
    input_ids = torch.randint(3, VOCAB, (WEIGHTS.shape[0], 12))
    with torch.no_grad(), model.mixture(WEIGHTS, NAMES, kernel=kernel):
        mixed = model(input_ids=input_ids).logits
        ran = set(mixture_kernels().values())
    if kernel == "auto":
        assert ran and ran <= {"union", "gather"}, ran
    else:
        assert ran == {kernel}, ran  # every layer ran the forced kernel
    reference = peft_pool(base, dirs)
    for i, row in enumerate(WEIGHTS.tolist()):
        expected = peft_cat_logits(reference, row, input_ids[i : i + 1], tag=f"row{i}")
        # a row of the batch vs the sample alone: different GEMM shapes (tests/tolerances.py)
        assert_close(mixed[i : i + 1], expected, same_shapes=False, what=f"row {i} ({kernel})")


def test_one_hot_equals_single_peft_adapter_and_zero_equals_base(pool):
    base, dirs, model = pool
    input_ids = torch.randint(3, VOCAB, (3, 9))
    with torch.no_grad():
        with lora_mixture_context(torch.eye(3), NAMES):
            one_hot = model(input_ids=input_ids).logits
        with lora_mixture_context(torch.zeros(3, 3), NAMES):
            zero = model(input_ids=input_ids).logits
        base_logits = base(input_ids=input_ids).logits
        for i, name in enumerate(NAMES):
            single = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[name])).eval()
            expected = single(input_ids=input_ids[i : i + 1]).logits
            assert_close(one_hot[i : i + 1], expected, same_shapes=False, what=name)  # batch row vs alone
    assert torch.equal(zero, base_logits)


def test_sparse_routing_equals_dense(pool):
    _, _, model = pool
    input_ids = torch.randint(3, VOCAB, (WEIGHTS.shape[0], 7))
    routing = LoraRouting.from_dense(WEIGHTS, NAMES)
    with torch.no_grad():
        with lora_mixture_context(WEIGHTS, NAMES):
            dense = model(input_ids=input_ids).logits
        with lora_mixture_context((routing.indices, routing.weights), NAMES):
            sparse = model(input_ids=input_ids).logits
    assert torch.equal(dense, sparse)
    assert torch.equal(routing.to_dense(), WEIGHTS)


def test_outside_context_first_adapter_is_active_like_peft(pool):
    base, dirs, model = pool
    input_ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = (
            PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a0"])).eval()(input_ids=input_ids).logits
        )
        assert model.active_adapters == ("a0",)
        assert (model(input_ids=input_ids).logits - expected).abs().max().item() <= TOL
        with model.disable_adapters():
            assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)
        model.set_active_adapters(None)
        try:
            assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)
        finally:
            model.set_active_adapters("a0")


def test_generate_mixed_batch_equals_each_sample_alone(pool):
    """Greedy generate of a left-padded mixed batch == each prompt alone with its `cat`-merged adapter."""
    base, dirs, model = pool
    torch.manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (5, 9, 7)]
    weights = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = p
        attention_mask[i, width - len(p) :] = 1
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), lora_mixture_context(weights, NAMES):
        batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen)[:, width:]
    reference = peft_pool(base, dirs)
    for i, p in enumerate(prompts):
        used = [(n, w) for n, w in zip(NAMES, weights[i].tolist()) if w != 0]
        reference.add_weighted_adapter(
            [n for n, _ in used], [w for _, w in used], f"g{i}", combination_type="cat"
        )
        reference.set_adapter(f"g{i}")
        with torch.no_grad():
            alone = reference.generate(
                input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **gen
            )
        assert batched[i].tolist() == alone[0, len(p) :].tolist(), f"sample {i}"


def test_decode_steps_keep_routing(pool):
    """Every decode step of generate() stays routed: the logits of each step match a fresh forward."""
    _, _, model = pool
    input_ids = torch.randint(3, VOCAB, (3, 6))
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad(), lora_mixture_context(weights, NAMES):
        out = model.generate(input_ids=input_ids, max_new_tokens=5, **GREEDY_WITH_LOGITS)
        full = model(input_ids=out.sequences[:, :-1]).logits[:, input_ids.shape[1] - 1 :]
    steps = torch.stack(out.logits, dim=1)
    assert_close(steps, full, same_shapes=False, what="decode steps vs full forward")  # T=1 vs T=n GEMMs


def manual_delta(layer: LoraLinear, x: torch.Tensor, row_weights: dict[str, float]) -> torch.Tensor:
    delta = torch.zeros(*x.shape[:-1], layer.out_features)
    for name, w in row_weights.items():
        lora_A, lora_B = layer.lora_weights(name)
        delta += w * layer.slots[name].scaling * (x @ lora_A.t() @ lora_B.t())
    return delta


@pytest.fixture
def lone_layer() -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12), "blocks.0.fc")
    for j, r in enumerate((2, 4, 3, 5)):
        layer.add_adapter(f"n{j}", 0.1 * torch.randn(r, 16), 0.1 * torch.randn(12, r), scaling=0.5 + j)
    return layer


# Layer-level tests below compare a batched layer call with per-row references on one 16 -> 12 layer: the
# shapes differ but a single GEMM with K=16 on O(1) values rounds within a few ulps on any CPU, so the strict
# bound holds.


@pytest.mark.parametrize("kernel", ["auto", "union", "gather"])
def test_2d_and_3d_activations_and_row_index(lone_layer, kernel):
    names = [f"n{j}" for j in range(4)]
    weights = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 1.0, 0.0, -0.5]])
    rows = [dict(zip(names, w)) for w in weights.tolist()]
    x3 = torch.randn(2, 5, 16)
    x2 = torch.randn(2, 16)
    x_rows = torch.randn(7, 16)  # e.g. image patches: rows 0-3 from sample 1, rows 4-6 from sample 0
    row_sample = torch.tensor([1, 1, 1, 1, 0, 0, 0])
    assert mixture_kernels() == {}  # outside any context
    with torch.no_grad():
        with lora_mixture_context(weights, names, kernel=kernel):
            y3, y2 = lone_layer(x3), lone_layer(x2)
            ran = mixture_kernels()["blocks.0.fc"]
        with lora_mixture_context(weights, names, row_index={"blocks": row_sample}, kernel=kernel):
            y_rows = lone_layer(x_rows)
            assert mixture_kernels() == {"blocks.0.fc": "union"}  # rows aren't samples: only union applies
        assert ran in ("union", "gather") if kernel == "auto" else ran == kernel
        base = lone_layer.base_layer
        for i in range(2):
            assert (y3[i] - base(x3[i]) - manual_delta(lone_layer, x3[i], rows[i])).abs().max() <= TOL
            assert (y2[i] - base(x2[i]) - manual_delta(lone_layer, x2[i], rows[i])).abs().max() <= TOL
        for j, s in enumerate(row_sample.tolist()):
            expected = base(x_rows[j]) + manual_delta(lone_layer, x_rows[j], rows[s])
            assert (y_rows[j] - expected).abs().max() <= TOL


def test_repeated_samples_follow_their_routing(lone_layer):
    """generate(num_beams=n) repeats each sample n times in a row: rows follow their sample's routing."""
    names = ["n0", "n1"]
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.randn(4, 3, 16)
    with torch.no_grad(), lora_mixture_context(weights, names):
        y = lone_layer(x)
        expected = [
            lone_layer.base_layer(x[j]) + manual_delta(lone_layer, x[j], {names[j // 2]: 1.0})
            for j in range(4)
        ]
    assert (y - torch.stack(expected)).abs().max() <= TOL


def test_vision_layer_without_row_index_raises(lone_layer):
    lone_layer.requires_row_index = True
    with lora_mixture_context(torch.ones(2, 1), ["n0"]), pytest.raises(ValueError, match="row_index"):
        lone_layer(torch.randn(2, 3, 16))


def test_only_used_adapters_are_read():
    """The rows a call touches depend on the adapters used, not on the pool size."""
    layer = LoraLinear(nn.Linear(8, 8), "fc")
    for j in range(64):
        layer.add_adapter(f"p{j}", torch.randn(4, 8), torch.randn(8, 4), scaling=1.0)
    names = [f"p{j}" for j in range(64)]
    weights = torch.zeros(3, 64)
    weights[0, 5] = weights[1, 5] = weights[2, 40] = 1.0
    with torch.no_grad(), lora_mixture_context(weights, names) as routing:
        layer(torch.randn(3, 1, 8))
        state = lora_layers._MIXTURE.get()
        cache = state.layers[id(layer)]
        slots = [layer.slots["p5"], layer.slots["p40"]]
        expected_rows = [r for slot in slots for r in range(slot.start, slot.start + slot.r)]
        assert cache.plan.union_rows.tolist() == expected_rows  # two adapters of rank 4, nothing else
        assert cache.kernel == "gather" and cache.a_t.shape == (3, 8, 4)  # [batch, in, L], L = one rank
    assert routing.used_names() == ["p5", "p40"]
    with torch.no_grad(), lora_mixture_context(weights, names, kernel="union"):
        layer(torch.randn(3, 1, 8))
        cache = lora_layers._MIXTURE.get().layers[id(layer)]
        assert cache.kernel == "union" and cache.a_t.shape == (8, 8)  # forced union: [in, R_U], no gather
        assert mixture_kernels() == {"fc": "union"}


def test_threads_get_their_own_routing(pool):
    _, _, model = pool
    input_ids = torch.randint(3, VOCAB, (2, 8))
    routings = [
        torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]),
        torch.tensor([[0.0, 0.0, 1.0], [0.3, 0.7, 0.0]]),
    ]
    with torch.no_grad():
        expected = []
        for w in routings:
            with lora_mixture_context(w, NAMES):
                expected.append(model(input_ids=input_ids).logits)
    assert not torch.allclose(expected[0], expected[1])
    barrier = threading.Barrier(2)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            with torch.no_grad(), lora_mixture_context(routings[t], NAMES):
                barrier.wait()
                for _ in range(4):
                    results[t].append(model(input_ids=input_ids).logits)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for t in range(2):
        for out in results[t]:
            assert torch.equal(out, expected[t])


def test_rslora_and_mixed_scalings_against_merged_weights(tmp_path):
    """rsLoRA: PEFT's merges mis-scale it (peft #3761), so the reference is W + sum w*s*B@A built by hand."""
    base = tiny_causal_lm("llama")
    specs = {"r1": dict(r=4, lora_alpha=16, use_rslora=True, seed=7), "r2": dict(r=8, lora_alpha=4, seed=8)}
    model = None
    for name, spec in specs.items():
        make_lora_dir(base, tmp_path / name, target_modules=["q_proj", "up_proj"], **spec)
        model = Swift.from_pretrained(model or copy.deepcopy(base), tmp_path / name, adapter_name=name)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    input_ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad(), lora_mixture_context(weights, list(specs)):
        mixed = model(input_ids=input_ids).logits
    layers = dict(model.lora_layers())
    for i in range(2):
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for module_name, layer in layers.items():
                target = merged.get_submodule(module_name)
                for j, name in enumerate(specs):
                    lora_A, lora_B = layer.lora_weights(name)
                    target.weight += weights[i, j] * layer.slots[name].scaling * (lora_B @ lora_A)
            expected = merged(input_ids=input_ids[i : i + 1]).logits
        assert_close(mixed[i : i + 1], expected, same_shapes=False, what=f"row {i}")  # batch row vs alone
    assert layers["model.layers.0.self_attn.q_proj"].slots["r1"].scaling == pytest.approx(16 / 2)


def test_routing_validation_errors(pool):
    _, _, model = pool
    with pytest.raises(ValueError, match=r"\[batch, 3\]"):
        with lora_mixture_context(torch.ones(2, 2), NAMES):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        with lora_mixture_context(torch.tensor([[float("nan"), 0.0, 0.0]]), NAMES):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with lora_mixture_context((torch.tensor([[3]]), torch.tensor([[1.0]])), NAMES):
            pass
    with pytest.raises(ValueError, match="duplicates"):
        with lora_mixture_context(torch.ones(1, 2), ["a0", "a0"]):
            pass
    with pytest.raises(ValueError, match="not loaded"):
        model.mixture(torch.ones(1, 1), ["nope"])
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'union', 'gather'\), got 'fast'"):
        with model.mixture(torch.ones(1, 3), NAMES, kernel="fast"):
            pass


def test_delete_and_add_in_memory_keep_other_adapters_exact(tmp_path):
    base = tiny_causal_lm("llama")
    model = None
    for name, spec in POOL_SPECS.items():
        make_lora_dir(base, tmp_path / name, **spec)
        model = Swift.from_pretrained(model or copy.deepcopy(base), tmp_path / name, adapter_name=name)
    input_ids = torch.randint(3, VOCAB, (2, 6))
    weights = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    with torch.no_grad(), lora_mixture_context(weights, NAMES):
        before = model(input_ids=input_ids).logits
    saved = {
        n: (*layer.lora_weights("a1"), layer.slots["a1"].scaling)
        for n, layer in model.lora_layers()
        if "a1" in layer.slots
    }
    saved = {n: (a.clone(), b.clone(), s) for n, (a, b, s) in saved.items()}
    model.delete_adapter("a1")
    assert "a1" not in model.adapter_names
    with torch.no_grad(), lora_mixture_context(weights[:, [0, 2]], ["a0", "a2"]):
        after = model(input_ids=input_ids).logits
    assert torch.equal(before, after)
    model.add_adapter_weights("a1_again", saved)
    with torch.no_grad(), lora_mixture_context(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), ["a0", "a1_again"]):
        readded = model(input_ids=input_ids).logits
    reference = Swift.from_pretrained(copy.deepcopy(base), tmp_path / "a1", adapter_name="a1")
    with torch.no_grad():
        assert (readded - reference(input_ids=input_ids).logits).abs().max() <= TOL
    with (
        lora_mixture_context(weights, NAMES),
        pytest.raises(RuntimeError, match="inside a lora_mixture_context"),
    ):
        model.delete_adapter("a0")


def test_eval_model_has_no_lora_dropout(tmp_path):
    """Adapters with lora_dropout > 0 loaded into an eval model stay deterministic (dropout off)."""
    base = tiny_causal_lm("llama")
    make_lora_dir(base, tmp_path / "d", r=4, lora_dropout=0.5)
    model = Swift.from_pretrained(copy.deepcopy(base), tmp_path / "d", adapter_name="d")
    assert all(not layer.training for _, layer in model.lora_layers())
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = (
            PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "d")).eval()(input_ids=ids).logits
        )
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        assert (model(input_ids=ids).logits - expected).abs().max() <= TOL


def test_gathered_rows_reuse_the_previous_contexts_buffers(lone_layer):
    """A context hands its gathered-row buffers to the next one; results stay exact, grad contexts don't share."""
    names = [f"n{j}" for j in range(4)]
    x = torch.randn(3, 6, 16)
    routings = [  # the first needs the most rows (9 per sample): its buffers fit the others
        torch.tensor([[0.0, 0.3, 0.0, 0.7], [1.0, 0.0, 0.0, 0.0], [0.4, 0.0, 0.6, 0.0]]),
        torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]]),
    ]
    lone_layer.release_workspace()
    pointers = []
    for weights in routings + routings[::-1]:
        with torch.no_grad(), lora_mixture_context(weights, names, kernel="gather"):
            y = lone_layer(x)
            pointers.append(lora_layers._MIXTURE.get().layers[id(lone_layer)].b.data_ptr())
        rows = [dict(zip(names, w)) for w in weights.tolist()]
        for i in range(3):
            expected = lone_layer.base_layer(x[i]) + manual_delta(lone_layer, x[i], rows[i])
            assert (y[i] - expected).abs().max() <= TOL
    assert len(set(pointers)) == 1  # the same B buffer served all four contexts
    with lora_mixture_context(routings[0], names, kernel="gather"):  # grad enabled: fresh buffers
        assert lone_layer(x).requires_grad
        assert lora_layers._MIXTURE.get().layers[id(lone_layer)].b.data_ptr() != pointers[0]
    assert {k: len(v) for k, v in lone_layer._spares.items()} == {"a": 1, "b": 1}
    lone_layer.release_workspace()
    assert lone_layer._spares == {}


def test_workspace_made_in_inference_mode_is_not_reused_under_no_grad(lone_layer):
    """Inference tensors can't be written outside inference mode: a no_grad context gathers into fresh buffers."""
    names = ["n0", "n1"]
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    x = torch.randn(2, 3, 16)
    outputs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode(), lora_mixture_context(weights, names, kernel="gather"):
            outputs.append(lone_layer(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])


def test_hooks_on_the_base_layer_still_run_under_a_mixture(lone_layer):
    """The base nn.Linear is called functionally only when that skips nothing: its own and global hooks run."""
    names = ["n0", "n1"]
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    x = torch.randn(2, 3, 16)
    seen: list[str] = []
    with torch.no_grad(), lora_mixture_context(weights, names):
        plain = lone_layer(x)
        local = lone_layer.base_layer.register_forward_hook(lambda m, i, o: seen.append("local") or o + 1.0)
        try:
            hooked = lone_layer(x)
        finally:
            local.remove()
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append(type(m).__name__) if m is lone_layer.base_layer else None
        )
        try:
            lone_layer(x)
        finally:
            handle.remove()
    assert seen == ["local", "Linear"]
    assert torch.allclose(hooked, plain + 1.0, atol=TOL)  # the hook's output replaced the base output


def test_prefill_and_decode_phases_pick_their_own_kernel(lone_layer):
    """A batch whose adapters overlap: gather for several tokens per sample, union for one (fewer rows read)."""
    names = [f"n{j}" for j in range(4)]  # ranks 2, 4, 3, 5
    chosen = [0, 2, 3, 0, 2, 3]  # R_U = 10 rows, one sample's L = 5: 10 >= 2 L, but 10 < 0.6 * 6 * 5
    weights = torch.zeros(6, 4)
    weights[torch.arange(6), chosen] = torch.tensor([1.0, 0.5, 0.8, 0.3, 1.2, 0.7])
    rows = [dict(zip(names, w)) for w in weights.tolist()]
    kernels = []
    with torch.no_grad(), lora_mixture_context(weights, names):
        for tokens in (5, 1, 1, 4):
            x = torch.randn(6, tokens, 16)
            y = lone_layer(x)
            kernels.append(mixture_kernels()["blocks.0.fc"])
            for i in range(6):
                expected = lone_layer.base_layer(x[i]) + manual_delta(lone_layer, x[i], rows[i])
                assert (y[i] - expected).abs().max() <= TOL
    assert kernels == ["gather", "union", "union", "gather"]
