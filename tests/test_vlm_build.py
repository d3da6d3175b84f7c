"""lora_retriever.vlm: the small real VLM (LLaVA = packaged SmolLM2 + a new vision tower), built and cached.

The fast tests build a TINY recipe (a 1-layer, 32-wide vision tower on 16x16 images, a handful of steps)
around the real SmolLM2; the full recipe's accuracy target is the slow test.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_retriever.vlm import VlmRecipe, build_vlm, read_build_info, vlm_dir
from lora_retriever.vlm.compose import IMAGE_TOKEN, llava_chat_template
from lora_retriever.vlm.pretrain import init_position_embeddings, sincos_position_embeddings
from swift.llm import get_model_tokenizer, get_template, inference
from swift.llm.model import smollm2_hf_dir
from tests.vlm_fixtures import TINY_VLM_RECIPE

pytest_plugins = ["tests.vlm_fixtures"]

TINY = TINY_VLM_RECIPE


@pytest.fixture(scope="module")
def tiny_build(tiny_llava_build) -> tuple[Path, float]:
    return tiny_llava_build


@pytest.fixture(scope="module")
def tiny_vlm(tiny_build):
    folder, _ = tiny_build
    return get_model_tokenizer("llava", folder)


def _image(seed: int, size: int = 64) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# ----------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("vision_model", "resnet", "vision_model"),
        ("patch_size", 0, "patch_size"),
        ("image_size", 30, "not a multiple of patch_size"),
        ("vision_heads", 5, "not divisible by vision_heads"),
        ("steps", 1.5, "steps"),
        ("heldout_examples", -1, "heldout_examples"),
        ("pretrain_steps", True, "pretrain_steps"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("pretrain_noise", -0.1, "pretrain_noise"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
    ],
)
def test_recipe_rejects_bad_values_naming_the_field(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        VlmRecipe(**{field: value})


def test_recipe_hash_is_stable_and_covers_every_field():
    recipe = VlmRecipe()
    assert recipe.recipe_hash() == VlmRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))).recipe_hash()
    changed = {
        "vision_model": "clip",
        "image_size": 64,
        "seed": 1,
        "learning_rate": 2e-3,
        "pretrain_shift": 0,
        "steps": 251,
    }
    hashes = {VlmRecipe(**{name: value}).recipe_hash() for name, value in changed.items()}
    assert len(hashes | {recipe.recipe_hash()}) == len(changed) + 1
    with pytest.raises(ValueError, match="unknown VlmRecipe field"):
        VlmRecipe.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="resolved"):
        VlmRecipe(image_size=None).recipe_hash()
    assert VlmRecipe(image_size=None).resolved(64).image_tokens == 64


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def test_sincos_position_embeddings_give_each_patch_its_own_bounded_code():
    table = sincos_position_embeddings(4, 32)
    assert table.shape == (16, 32)
    assert float(table.abs().max()) <= 1.0
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1  # every position distinct
    # Row and column halves: patches in one row share the row half exactly.
    assert torch.equal(table[0, :16], table[3, :16]) and not torch.equal(table[0, 16:], table[3, 16:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embeddings(4, 30)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_init_position_embeddings_sets_the_patch_grid(kind):
    import transformers

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if kind == "clip":
        tower = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**shape, image_size=16, patch_size=4)
        )
    else:
        tower = transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**shape, image_size=16, patch_size=4)
        )
    init_position_embeddings(tower)
    weight = next(m for n, m in tower.named_modules() if n.endswith("embeddings")).position_embedding.weight
    expected = sincos_position_embeddings(4, 32)
    assert torch.equal(weight[-16:], expected)
    if kind == "clip":  # CLIP's CLS position comes first and starts at zero
        assert weight.shape[0] == 17 and not weight[0].any()


def test_chat_template_keeps_text_rendering_and_places_images():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf_dir()))
    template = llava_chat_template(tokenizer.chat_template)
    text = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(text, tokenize=False, chat_template=template) == (
        tokenizer.apply_chat_template(text, tokenize=False)
    )
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]}
    ]
    rendered = tokenizer.apply_chat_template(
        parts, tokenize=False, chat_template=template, add_generation_prompt=True
    )
    assert f"<|im_start|>user\n{IMAGE_TOKEN}What digit is this?<|im_end|>" in rendered
    assert rendered.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt is kept
    with pytest.raises(ValueError, match="reads message\\['content'\\] 0 times"):
        llava_chat_template("{{ messages }}")


def test_prefix_cached_loss_and_gradients_equal_a_full_forward(tmp_path):
    """The shared prompt start runs once; the loss and the tower's gradients must equal a full pass."""
    from lora_retriever.training.data import collate
    from lora_retriever.vlm.train import _answer_loss, _prefix_states, _shared_prefix_length, encode_examples
    from tests.tiny_vlms import save_tiny_llava
    from tests.tolerances import assert_close

    model, processor = get_model_tokenizer("llava", save_tiny_llava(tmp_path / "llava"))
    template = get_template("llava", processor)
    examples = encode_examples(
        template,
        [
            (_image(i, 16), q, a)
            for i, (q, a) in enumerate([("describe this image", "red cat"), ("what is the capital", "paris")])
        ],
    )
    prefix = _shared_prefix_length(examples, model.config.image_token_id)
    assert prefix > 0 and torch.equal(examples[0]["input_ids"][:prefix], examples[1]["input_ids"][:prefix])
    results = []
    for length in (0, prefix):
        model.zero_grad()
        states = _prefix_states(model, examples[0]["input_ids"][:length])
        loss = _answer_loss(model, collate(examples, processor.tokenizer.pad_token_id), length, states)
        loss.backward()
        results.append((loss.detach(), model.model.vision_tower.get_input_embeddings().weight.grad.clone()))
    (full_loss, full_grad), (cached_loss, cached_grad) = results
    assert_close(cached_loss, full_loss, same_shapes=False, what="loss")
    assert_close(cached_grad, full_grad, same_shapes=False, what="patch-embedding gradient")
    assert float(full_grad.abs().max()) > 1e-4  # the image tokens do get a gradient


# ----------------------------------------------------------------------------------------------------------
# The tiny build: cache, reuse, weights, processor, loading, inference
# ----------------------------------------------------------------------------------------------------------


def test_tiny_build_is_cached_under_its_recipe_hash_with_its_report(tiny_build):
    from lora_retriever.tasks.multimodal import DOMAIN_NAMES
    from swift.utils import cpu_summary

    folder, _ = tiny_build
    recipe = VlmRecipe(**TINY)
    assert folder == vlm_dir(recipe, cache_root=folder.parent) and folder.name == recipe.recipe_hash()
    info = read_build_info(folder)
    assert info["recipe"] == recipe.to_dict() and info["recipe_hash"] == recipe.recipe_hash()
    assert set(info["heldout"]["per_domain"]) == set(DOMAIN_NAMES)
    assert sum(info["heldout"]["counts"].values()) == TINY["heldout_examples"]
    assert info["cpu"].split(";")[0] == cpu_summary().split(";")[0]
    assert info["seconds"]["total"] > 0 and info["image_tokens"] == 16
    assert info["pretrain"]["steps"] == 3
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary build folders left behind: {leftovers}"


def test_same_recipe_is_reused_without_loading_anything(tiny_build):
    folder, _ = tiny_build
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    start = time.perf_counter()
    again = build_vlm(VlmRecipe(**TINY), cache_root=folder.parent, progress=False)
    assert time.perf_counter() - start < 2.0
    assert again == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_language_model_weights_are_smollm2_bit_for_bit(tiny_build):
    folder, _ = tiny_build
    built = load_file(str(folder / "model.safetensors"))
    original = load_file(str(smollm2_hf_dir() / "model.safetensors"))
    checked = 0
    for name, tensor in original.items():
        # transformers 5 saves LLaVA under its checkpoint names (language_model.model.*); accept the module names too
        mine = _saved(built, f"language_model.{name}", f"model.language_model.{name.removeprefix('model.')}")
        if name == "model.embed_tokens.weight":
            assert torch.equal(mine[: tensor.shape[0]], tensor)
            assert mine.shape[0] == tensor.shape[0] + 1 and not mine[-1].any()  # one zero <image> row
        else:
            assert torch.equal(mine, tensor), name
        checked += 1
    assert checked == len(original) > 200  # every tensor of the 30-layer LM
    assert not any(k.startswith("lm_head") for k in built)  # tied to the embeddings, as in SmolLM2


def test_processor_expands_each_image_tag_to_the_patch_count(tiny_vlm):
    model, processor = tiny_vlm
    template = get_template("llava", processor)
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id == 49152
    batch = template.encode_batch(
        ["What digit is this?", "compare <image> and <image>"], [[_image(0)], [_image(1), _image(2)]]
    )
    counts = (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert counts == [16, 32] and batch["pixel_values"].shape == (3, 3, 16, 16)
    assert model.config.image_seq_length == 16


def test_loads_as_llava_and_answers_image_and_text_questions(tiny_vlm):
    model, processor = tiny_vlm
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.model_type == "llava"
    template = get_template("llava", processor)
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    answers = inference(
        model,
        template,
        ["What digit is this?", "What is the capital of France?"],
        [[_image(3)], None],
        generation_config=config,
        progress=False,
    )
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    assert answers.errors == [None, None]
    # Text only, the VLM is SmolLM2: same prompt tokens, same greedy answer.
    lm, tokenizer = get_model_tokenizer()
    expected = inference(
        lm,
        get_template("smollm2-135m-instruct", tokenizer),
        ["What is the capital of France?"],
        generation_config=config,
        progress=False,
    )
    assert answers[1] == expected[0]


def test_recipe_change_builds_a_new_folder_and_keeps_the_old(tiny_build):
    folder, _ = tiny_build
    changed = VlmRecipe(**{**TINY, "seed": 1, "heldout_examples": 0, "pretrain_steps": 0, "steps": 1})
    other = build_vlm(changed, cache_root=folder.parent, progress=False)
    assert other != folder and other.name == changed.recipe_hash()
    assert read_build_info(other)["recipe"]["seed"] == 1 and read_build_info(folder)["recipe"]["seed"] == 0
    names = (
        "vision_tower.embeddings.patch_embedding.weight",
        "model.vision_tower.embeddings.patch_embedding.weight",
    )
    assert not torch.equal(
        _saved(load_file(str(other / "model.safetensors")), *names),
        _saved(load_file(str(folder / "model.safetensors")), *names),
    )


def _saved(state: dict[str, torch.Tensor], *names: str) -> torch.Tensor:
    """The tensor saved under the first of ``names`` present (checkpoint or module naming)."""
    for name in names:
        if name in state:
            return state[name]
    raise KeyError(f"none of {names} in the saved weights")


def test_failed_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    import lora_retriever.vlm.pretrain as pretrain

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pretrain, "pretrain_vision", fail)
    recipe = VlmRecipe(**TINY)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_vlm(recipe, cache_root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a finished VLM build"):
        read_build_info(tmp_path / recipe.recipe_hash())


def test_cli_prints_the_cache_folder_and_rejects_bad_flags(tmp_path, capsys):
    from lora_retriever.vlm.__main__ import main

    assert main(["path", "--cache_root", str(tmp_path), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / VlmRecipe(seed=3).recipe_hash())
    assert main(["build", "--cache_root", str(tmp_path), "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# The full recipe
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_build_identifies_held_out_digits():
    """The default recipe (~15 min on one thread the first time; cached afterwards) meets the digit target."""
    from lora_retriever.vlm.data import caption_data
    from lora_retriever.vlm.train import EVAL_BATCH_SIZE

    recipe = VlmRecipe()
    folder = build_vlm(recipe, progress=False)
    info = read_build_info(folder)
    assert info["heldout"]["per_domain"]["digits"] >= 0.9, info["heldout"]
    # The cached folder is the model that was evaluated: reloaded, it gives the recorded answers.
    recorded = info["heldout"]["examples"]
    heldout = caption_data("heldout", recipe.heldout_examples, recipe.seed).examples[: len(recorded)]
    model, processor = get_model_tokenizer("llava", folder)
    from transformers import GenerationConfig

    answers = inference(
        model,
        get_template("llava", processor),
        [q for _, q, _ in heldout],
        [[i] for i, _, _ in heldout],
        batch_size=EVAL_BATCH_SIZE,
        generation_config=GenerationConfig(max_new_tokens=info["heldout"]["max_new_tokens"], do_sample=False),
        progress=False,
    )
    assert [r["question"] for r in recorded] == [q for _, q, _ in heldout]
    assert list(answers) == [r["prediction"] for r in recorded]
