"""Per-sample LoRA mixtures on tiny VLMs: vision towers and language models routed per sample.

Every test routes a mixed batch (samples with different numbers and sizes of images, one without images)
through adapters on the vision tower, the projector/merger and the language model, and compares each
sample's logits with an independent reference: that sample alone on a copy of the base model whose
targeted weights are ``W + sum_j w_ij s_j B_j A_j`` (``tests.vlm_fixtures.merge_adapters``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from swift.llm import get_model_tokenizer, get_template, inference, vision_row_index
from swift.tuners import Swift
from tests.factories import make_lora_dir
from tests.tiny_vlms import INTERNVL_TOKENS_PER_TILE, LLAVA_TOKENS_PER_IMAGE, VLM_TYPES
from tests.tolerances import SAME_SHAPES_ATOL, assert_close

pytest_plugins = ["tests.vlm_fixtures"]

# Same ops on same shapes (tiny models, O(1) values): the strict bound of tests/tolerances.py.
ATOL = SAME_SHAPES_ATOL
LANGUAGE = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
# Vision-tower attention + the first projector/merger linear, by transformers-5 module names.
VISION = {
    "qwen2-vl": r".*visual\.(blocks\.\d+\.attn\.qkv|merger\.mlp\.0)",
    "qwen2.5-vl": r".*visual\.(blocks\.\d+\.(attn\.qkv|mlp\.gate_proj)|merger\.mlp\.0)",
    "internvl": r".*(vision_tower\.encoder\.layer\.\d+\.attention\.(q_proj|v_proj)|multi_modal_projector\.linear_1)",
    "llava": r".*(vision_tower\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)|multi_modal_projector\.linear_1)",
}
ADAPTERS = ("lang", "both", "vision")
QUERIES = ["<image> describe this image", "what is the capital of france ?", "compare <image> and <image> ."]


def _images() -> list[list[Image.Image] | None]:
    # Sizes give Qwen grids 4x4, 4x6 (two attention windows in Qwen2.5-VL) and 6x2; InternVL 1, 3 and 4 tiles.
    return [
        [Image.new("RGB", (16, 16), (200, 30, 30))],
        None,
        [Image.new("RGB", (24, 16), (20, 90, 200)), Image.new("RGB", (8, 24), (40, 160, 60))],
    ]


MAPPING = torch.tensor([[0.7, 0.0, 0.5], [0.2, 1.0, 0.4], [0.0, 0.6, 0.9]])


@pytest.fixture(scope="module")
def vlm_setups(tiny_dirs, tmp_path_factory):
    """Per model type: (swift model with 3 adapters, base copy, template, adapter dirs), built on demand."""
    cache = {}

    def build(model_type: str):
        if model_type not in cache:
            model, processor = get_model_tokenizer(model_type, tiny_dirs[model_type])
            root = tmp_path_factory.mktemp(f"adapters_{model_type.replace('.', '_')}")
            targets = {
                "lang": LANGUAGE,
                "both": f"(?:{LANGUAGE})|(?:{VISION[model_type]})",
                "vision": VISION[model_type],
            }
            dirs = [
                make_lora_dir(
                    model, root / name, r=4, lora_alpha=8, target_modules=targets[name], seed=i, std=0.2
                )
                for i, name in enumerate(ADAPTERS)
            ]
            base = copy.deepcopy(model)
            swift = Swift.from_pretrained(model, dirs[0], adapter_name=ADAPTERS[0])
            for name, adapter_dir in zip(ADAPTERS[1:], dirs[1:]):
                swift.load_adapter(adapter_dir, name)
            cache[model_type] = (swift, base, get_template(model_type, processor), dirs)
        return cache[model_type]

    return build


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[batch, T, vocab]``; text positions from the attention mask so left padding changes nothing."""
    kwargs = dict(batch)
    if model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):  # Qwen-VL builds its M-RoPE ids itself
        kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**kwargs).logits


def _mixture_logits(swift, template, mapping: torch.Tensor) -> tuple[torch.Tensor, dict]:
    batch = template.encode_batch(QUERIES, _images())
    row_index = vision_row_index(swift, batch, len(QUERIES))
    with swift.mixture(mapping, ADAPTERS, row_index=row_index):
        return _forward(swift, batch), batch


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_adapters_sit_on_language_and_vision_layers(vlm_setups, model_type):
    swift, _, _, _ = vlm_setups(model_type)
    holders = {name: {"vision": 0, "language": 0} for name in ADAPTERS}
    for _, layer in swift.lora_layers():
        for name in layer.slots:
            holders[name]["vision" if layer.requires_row_index else "language"] += 1
    # 2 language layers x (q_proj, v_proj); 2 vision layers x 2 projections (Qwen2-VL: qkv) + 1 projector.
    vision = {"qwen2-vl": 3, "qwen2.5-vl": 5, "internvl": 5, "llava": 5}[model_type]
    assert holders["lang"] == {"vision": 0, "language": 4}
    assert holders["vision"] == {"vision": vision, "language": 0}
    assert holders["both"] == {"vision": vision, "language": 4}


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_mixture_matches_merged_reference_per_sample(vlm_setups, merged_reference, model_type):
    swift, base, template, dirs = vlm_setups(model_type)
    logits, batch = _mixture_logits(swift, template, MAPPING)
    for i, (query, images) in enumerate(zip(QUERIES, _images())):
        alone = template.encode_batch([query], [images])
        length = alone["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, -length:], alone["input_ids"][0])
        reference = _forward(merged_reference(base, dirs, MAPPING[i].tolist()), alone)[0]
        # a row of the batch vs the sample alone: different GEMM shapes (tests/tolerances.py)
        assert_close(logits[i, -length:], reference, same_shapes=False, what=f"{model_type} sample {i}")
        # The adapters matter: the base model is far from the reference.
        base_diff = (_forward(base, alone)[0] - reference).abs().max().item()
        assert base_diff > 1e-2, f"{model_type} sample {i}: adapters change logits by only {base_diff:.2e}"


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_vision_only_adapter_routing_changes_only_samples_with_images(vlm_setups, model_type):
    swift, _, template, _ = vlm_setups(model_type)
    logits, _ = _mixture_logits(swift, template, MAPPING)
    changed = MAPPING.clone()
    changed[:, 2] = torch.tensor([0.0, 0.0, 0.0])  # drop the vision-only adapter everywhere
    other, _ = _mixture_logits(swift, template, changed)
    diffs = (logits - other).abs().amax(dim=(1, 2))
    assert diffs[0] > 1e-3 and diffs[2] > 1e-3, diffs  # samples with images see the vision adapter
    assert diffs[1] <= ATOL, diffs  # the text-only sample never runs the vision tower


@pytest.mark.parametrize("model_type", VLM_TYPES)
def test_vision_layer_without_row_index_raises(vlm_setups, model_type):
    swift, _, template, _ = vlm_setups(model_type)
    batch = template.encode_batch(QUERIES, _images())
    with swift.mixture(MAPPING, ADAPTERS), pytest.raises(ValueError, match="vision tower"):
        swift(**batch)


def test_row_index_qwen2_vl_rows_and_merger(vlm_setups):
    swift, _, template, _ = vlm_setups("qwen2-vl")
    batch = template.encode_batch(QUERIES, _images())
    rows = vision_row_index(swift, batch, 3)
    assert set(rows) == {"model.visual", "model.visual.merger"}
    # Grids 4x4 (sample 0), 4x6 and 6x2 (sample 2): 16 + 24 + 12 patch rows, a quarter as many merger rows.
    assert rows["model.visual"].tolist() == [0] * 16 + [2] * 36
    assert rows["model.visual.merger"].tolist() == [0] * 4 + [2] * 9
    assert batch["pixel_values"].shape[0] == 52


def test_row_index_qwen2_5_vl_follows_window_permutation(vlm_setups):
    from transformers.vision_utils import get_vision_window_index

    swift, _, template, _ = vlm_setups("qwen2.5-vl")
    batch = template.encode_batch(QUERIES, _images())
    window_index, _ = get_vision_window_index(
        batch["image_grid_thw"], spatial_merge_size=2, window_size=16, patch_size=4
    )
    assert not torch.equal(window_index, torch.arange(window_index.numel()))  # rows really are reordered
    rows = vision_row_index(swift, batch, 3)
    # The permutation stays inside each image, so every row keeps its sample.
    assert rows["model.visual.merger"].tolist() == [0] * 4 + [2] * 9
    assert rows["model.visual"].tolist() == [0] * 16 + [2] * 36


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        # InternVL: 16x16 -> 1 tile (sample 0); 24x16 -> 2 tiles + thumbnail, 8x24 -> 3 tiles + thumbnail.
        ("internvl", [0] + [2] * 7),
        ("llava", [0, 2, 2]),  # one row per image
    ],
)
def test_row_index_tiles(vlm_setups, model_type, expected):
    swift, _, template, _ = vlm_setups(model_type)
    batch = template.encode_batch(QUERIES, _images())
    rows = vision_row_index(swift, batch, 3)
    assert set(rows) == {"model.vision_tower", "model.multi_modal_projector"}
    assert rows["model.vision_tower"].tolist() == expected
    assert rows["model.multi_modal_projector"].tolist() == expected
    assert batch["pixel_values"].shape[0] == len(expected)
    per_tile = INTERNVL_TOKENS_PER_TILE if model_type == "internvl" else LLAVA_TOKENS_PER_IMAGE
    tokens = (batch["input_ids"] == swift.config.image_token_id).sum(1)
    assert tokens.tolist() == [expected.count(i) * per_tile for i in range(3)]


def test_row_index_rejects_inconsistent_inputs(vlm_setups):
    swift, _, template, _ = vlm_setups("qwen2-vl")
    batch = template.encode_batch(QUERIES, _images())
    with pytest.raises(ValueError, match="batch_size=2"):
        vision_row_index(swift, batch, 2)
    broken = dict(batch, image_grid_thw=batch["image_grid_thw"][:2])
    with pytest.raises(ValueError, match="patches"):
        vision_row_index(swift, broken, 3)
    assert vision_row_index(swift, template.encode_batch(["what is this ?"]), 1) == {}


def test_inference_with_vision_mixture_matches_single_queries(vlm_setups):
    from transformers import GenerationConfig

    swift, _, template, _ = vlm_setups("qwen2-vl")
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    kwargs = dict(lora_mapping=MAPPING, adapter_names=ADAPTERS, generation_config=config, progress=False)
    batched = inference(swift, template, QUERIES, _images(), batch_size=3, **kwargs)
    single = inference(swift, template, QUERIES, _images(), batch_size=1, **kwargs)
    assert batched == single
    assert all(answer for answer in batched)
    # Beam search: generate encodes the images before expanding the batch, so the row map still holds.
    beams = GenerationConfig(max_new_tokens=4, do_sample=False, num_beams=2)
    kwargs["generation_config"] = beams
    assert inference(swift, template, QUERIES, _images(), batch_size=3, **kwargs) == inference(
        swift, template, QUERIES, _images(), batch_size=1, **kwargs
    )
