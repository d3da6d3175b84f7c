"""Per-sample mixtures on the VLM built here: the real SmolLM2 language model, a trained vision tower, every
tower routed per sample.

One batch mixes samples with 0, 1 and 2 suite images, each with its own adapter set over three adapters: one on
the language model only, one on the vision tower + projector + language model, one on the vision tower +
projector only. Two independent references:

* **merged weights, same shapes**: the whole batch through a copy of the base VLM whose targeted weights are
  ``W + sum_j w_ij s_j B_j A_j`` for row ``i`` (``tests.vlm_fixtures.merge_adapters``), row ``i`` read off.
  Both sides run the same GEMM shapes, so only the LoRA path's rounding differs: relative error <= 1e-5.
* **alone, different shapes**: each sample by itself on its merged copy (``tests/tolerances.py``'s
  cross-shape bound), and greedy generation of the batch equals each sample generated alone.

The fast run uses the tiny recipe's build (seconds); the slow run the default recipe (``make demo-vlm``'s VLM,
built once and cached in ``$LORA_RETRIEVER_CACHE``).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from swift.llm import get_model_tokenizer, get_template, inference, vision_row_index
from swift.tuners import Swift
from tests.factories import make_lora_dir
from tests.tolerances import assert_close

pytest_plugins = ["tests.vlm_fixtures"]

RELATIVE_BOUND = 1e-5  # same shapes on both sides (module docstring)
LANGUAGE = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION = r".*(vision_tower\..*layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|multi_modal_projector\.linear_[12])"
ADAPTERS = ("lang", "both", "vision")
TARGETS = {"lang": LANGUAGE, "both": f"(?:{LANGUAGE})|(?:{VISION})", "vision": VISION}
QUERIES = [
    "What is the capital of France?",  # no image
    "<image> What digit is this?",
    "Compare <image> and <image>: which clock shows the later hour?",
    "<image> What time does the clock show?",
]
# Row i's weight on each adapter: different sets per row, a text-only row with a vision-only adapter (which
# must then do nothing), a row with the vision-only adapter alone.
MAPPING = torch.tensor([[0.7, 0.0, 0.5], [0.2, 1.0, 0.4], [0.0, 0.6, 0.9], [0.0, 0.0, 1.0]])


def _images():
    from lora_retriever.tasks.multimodal import get_domain

    rng = random.Random(0)
    digits, clock = get_domain("digits"), get_domain("clock")
    digit = digits.render(digits.all_items()[7])
    clocks = [clock.render(clock.sample(rng)) for _ in range(3)]
    return [None, [digit], clocks[:2], [clocks[2]]]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("tiny", id="tiny-build"),
        pytest.param("default", marks=pytest.mark.slow, id="default-build"),
    ],
)
def built(request, tmp_path_factory):
    """(swift model with the 3 adapters, plain base copy, template, adapter dirs) on a built VLM."""
    if request.param == "tiny":
        folder, _ = request.getfixturevalue("tiny_llava_build")
    else:
        from lora_retriever.vlm import VlmRecipe, build_vlm

        folder = build_vlm(VlmRecipe(), progress=False)
    model, processor = get_model_tokenizer("llava", folder)
    root = tmp_path_factory.mktemp(f"vlm_adapters_{request.param}")
    # std 0.01 with r=8: each adapter moves a weight by ~2 % of its size (enough to change answers, not to
    # wreck the model).
    dirs = [
        make_lora_dir(model, root / name, r=8, lora_alpha=16, target_modules=TARGETS[name], seed=i, std=0.01)
        for i, name in enumerate(ADAPTERS)
    ]
    base = copy.deepcopy(model)
    swift = Swift.from_pretrained(model, dirs[0], adapter_name=ADAPTERS[0])
    for name, adapter_dir in zip(ADAPTERS[1:], dirs[1:]):
        swift.load_adapter(adapter_dir, name)
    return swift, base, get_template("llava", processor), dirs


def _forward(model, batch) -> torch.Tensor:
    kwargs = dict(batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(**kwargs).logits


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference.double()).abs().max() / reference.double().abs().max())


def test_adapters_reach_every_tower(built):
    swift, _, _, _ = built
    holders = {
        name: {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 0} for name in ADAPTERS
    }
    for module_name, layer in swift.lora_layers():
        tower = next(part for part in holders["lang"] if f".{part}." in f".{module_name}.")
        for name in layer.slots:
            holders[name][tower] += 1
    layers = swift.config.text_config.num_hidden_layers
    vision_layers = swift.config.vision_config.num_hidden_layers
    assert holders["lang"] == {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 7 * layers}
    assert holders["vision"] == {
        "vision_tower": 6 * vision_layers,
        "multi_modal_projector": 2,
        "language_model": 0,
    }
    assert holders["both"] == {
        "vision_tower": 6 * vision_layers,
        "multi_modal_projector": 2,
        "language_model": 7 * layers,
    }


def test_each_row_equals_its_merged_weights(built, merged_reference):
    swift, base, template, dirs = built
    images = _images()
    batch = template.encode_batch(QUERIES, images)
    assert [len(i or []) for i in images] == [0, 1, 2, 1]
    with swift.mixture(MAPPING, ADAPTERS, row_index=vision_row_index(swift, batch, len(QUERIES))):
        mixed = _forward(swift, batch)
    base_logits = _forward(base, batch)
    for i, (query, row_images) in enumerate(zip(QUERIES, images)):
        merged = merged_reference(base, dirs, MAPPING[i].tolist())
        same_shapes = _forward(merged, batch)[i]
        mask = batch["attention_mask"][i].bool()
        error = _relative_error(mixed[i][mask], same_shapes[mask])
        print(f"row {i}: relative error {error:.2e}")
        assert error <= RELATIVE_BOUND, f"row {i}: relative error {error:.2e} > {RELATIVE_BOUND:.0e}"
        # The adapters matter far beyond the bound (the vision-only adapter least: the tiny tower's signal is weak).
        moved = _relative_error(base_logits[i][mask], same_shapes[mask])
        assert moved > 100 * RELATIVE_BOUND, f"row {i}: the adapters move the logits by only {moved:.2e}"
        # Alone (other shapes): tests/tolerances.py's cross-shape bound.
        alone = template.encode_batch([query], [row_images])
        length = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, -length:], alone["input_ids"][0])
        assert_close(mixed[i, -length:], _forward(merged, alone)[0], same_shapes=False, what=f"row {i} alone")


def test_vision_adapters_leave_the_text_only_row_alone(built):
    swift, _, template, _ = built
    batch = template.encode_batch(QUERIES, _images())
    rows = vision_row_index(swift, batch, len(QUERIES))
    with swift.mixture(MAPPING, ADAPTERS, row_index=rows):
        mixed = _forward(swift, batch)
    without_vision = MAPPING.clone()
    without_vision[:, 2] = 0.0
    with swift.mixture(without_vision, ADAPTERS, row_index=rows):
        other = _forward(swift, batch)
    diffs = (mixed - other).abs().amax(dim=(1, 2))
    assert diffs[0] == 0.0, diffs  # the text-only row never runs the vision tower
    assert (diffs[1:] > 1e-3).all(), diffs  # rows with images see the vision-only adapter


def test_greedy_batch_equals_each_sample_alone(built):
    from transformers import GenerationConfig

    swift, _, template, _ = built
    images = _images()
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    kwargs = dict(lora_mapping=MAPPING, adapter_names=ADAPTERS, generation_config=config, progress=False)
    batched = inference(swift, template, QUERIES, images, batch_size=len(QUERIES), **kwargs)
    alone = inference(swift, template, QUERIES, images, batch_size=1, **kwargs)
    assert list(batched) == list(alone) and batched.errors == [None] * len(QUERIES)
    assert all(batched)
