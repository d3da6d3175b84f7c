"""swift.llm templates (left padding, prompt masking, image tags) and batched ``inference`` with mixtures."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from swift.llm import get_model_tokenizer, get_template, inference
from swift.llm.template import IGNORE_INDEX
from swift.tuners import LoraRouting, Swift
from tests.factories import make_lora_dir
from tests.tiny_vlms import VOCAB, build_tokenizer

pytest_plugins = ["tests.vlm_fixtures"]

QUERIES = [
    "paris",
    "what is the capital of france ?",
    "describe a red cat",
    "compare two and one plus one , what is green ?",
    "dog",
]
GREEDY = GenerationConfig(max_new_tokens=6, do_sample=False)
ADAPTERS = ("a", "b", "c")
MAPPING = torch.tensor(
    [
        [1.0, 0.0, 0.0],  # one adapter
        [0.5, 0.5, 0.0],
        [0.0, 0.0, 0.0],  # base model
        [0.2, -0.7, 1.3],  # negative weights are allowed
        [0.0, 1.0, 0.6],
    ]
)


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    model, tokenizer = get_model_tokenizer("llama", tiny_dirs["llama"])
    return model, get_template("llama", tokenizer)


@pytest.fixture(scope="module")
def qwen2_vl_template(tiny_dirs):
    _, processor = get_model_tokenizer("qwen2-vl", tiny_dirs["qwen2-vl"])
    return get_template("qwen2-vl", processor)


@pytest.fixture(scope="module")
def llama_pool(llama, tmp_path_factory):
    """(SwiftModel holding adapters a, b, c on q/v/o projections, untouched base copy, adapter dirs)."""
    model, _ = llama
    base = copy.deepcopy(model)
    root = tmp_path_factory.mktemp("llama_adapters")
    targets = (["q_proj", "v_proj"], ["q_proj", "o_proj"], ["v_proj", "up_proj"])
    dirs = [
        make_lora_dir(base, root / name, r=4, lora_alpha=8, target_modules=t, seed=i + 1, std=0.3)
        for i, (name, t) in enumerate(zip(ADAPTERS, targets))
    ]
    swift = Swift.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name=ADAPTERS[0])
    for name, adapter_dir in zip(ADAPTERS[1:], dirs[1:]):
        swift.load_adapter(adapter_dir, name)
    return swift, base, dirs


def _ids(*tokens: str) -> list[int]:
    return [VOCAB[t] for t in tokens]


# -- templates ---------------------------------------------------------------------------------------------


def test_template_renders_chatml_and_left_pads(llama):
    _, template = llama
    batch = template.encode_batch(["paris", "what is the capital of france ?"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    long_row = _ids("<|im_start|>", "user", "what", "is", "the", "capital", "of", "france", "?", "<|im_end|>")
    long_row += _ids("<|im_start|>", "assistant")
    assert ids[1].tolist() == long_row
    assert ids.shape == (2, 12)
    assert mask.sum(1).tolist() == [6, 12]
    # Row 0 has 6 pads on the LEFT, then its prompt; both rows end with the generation prompt.
    assert mask[0].tolist() == [0] * 6 + [1] * 6
    assert ids[0, :6].tolist() == [template.tokenizer.pad_token_id] * 6
    assert ids[0, 6:].tolist() == _ids(
        "<|im_start|>", "user", "paris", "<|im_end|>", "<|im_start|>", "assistant"
    )


def test_template_system_prompt(llama):
    _, tokenizer_template = llama
    template = get_template("llama", tokenizer_template.tokenizer, system="you are a helpful assistant")
    ids = template.encode_batch(["paris"])["input_ids"][0].tolist()
    assert ids[:8] == _ids("<|im_start|>", "system", "you", "are", "a", "helpful", "assistant", "<|im_end|>")
    assert len(ids) == 14


def test_tokenizer_without_chat_template_falls_back_with_warning(caplog):
    logger = logging.getLogger("swift.llm.template")
    logger.addHandler(caplog.handler)  # the swift logger doesn't propagate to the root logger
    try:
        template = get_template("llama", build_tokenizer(chat_template=None))
    finally:
        logger.removeHandler(caplog.handler)
    assert any("no chat template" in r.getMessage() for r in caplog.records)
    ids = template.encode_batch(["paris"])["input_ids"][0].tolist()
    assert ids == _ids("User", ":", "paris", "Assistant", ":")
    example = template.encode_example("paris", "france")
    assert example["input_ids"][-2:].tolist() == _ids("france", "<|im_end|>")
    assert (example["labels"] != IGNORE_INDEX).sum().item() == 2


def test_encode_example_masks_prompt_tokens(llama):
    _, template = llama
    prompt = template.encode_batch(["what is the capital of france ?"])["input_ids"][0]
    example = template.encode_example("what is the capital of france ?", "paris .")
    ids, labels = example["input_ids"], example["labels"]
    n = prompt.numel()
    assert ids.shape == labels.shape == example["attention_mask"].shape == (n + 3,)
    assert torch.equal(ids[:n], prompt)  # training sees exactly the inference prompt
    assert labels[:n].tolist() == [IGNORE_INDEX] * n
    assert labels[n:].tolist() == ids[n:].tolist() == _ids("paris", ".", "<|im_end|>")
    assert example["attention_mask"].tolist() == [1] * (n + 3)
    with pytest.raises(ValueError, match="non-empty"):
        template.encode_example("paris", " ")


def test_encode_example_with_image_extends_token_aligned_inputs(qwen2_vl_template):
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    example = qwen2_vl_template.encode_example("describe <image>", "a red cat", [image])
    n = example["input_ids"].numel()
    assert example["mm_token_type_ids"].shape == example["labels"].shape == (n,)
    assert (example["mm_token_type_ids"] == 1).sum().item() == 4  # 4x4 patches / merge 2x2
    assert (example["labels"] != IGNORE_INDEX).sum().item() == 4  # a red cat <|im_end|>
    assert example["pixel_values"].shape == (16, 3 * 2 * 4 * 4)
    assert example["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_image_tags_place_images_and_mismatch_raises(qwen2_vl_template, llama):
    red, blue = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    pad = VOCAB["<|image_pad|>"]
    # No tag: the image goes before the text.
    ids = qwen2_vl_template.encode_batch(["describe this image"], [[red]])["input_ids"][0].tolist()
    assert ids.index(pad) < ids.index(VOCAB["describe"])
    # A tag: the image goes where it is.
    ids = qwen2_vl_template.encode_batch(["describe <image> now"], [red])["input_ids"][0].tolist()
    assert ids.index(VOCAB["describe"]) < ids.index(pad)
    assert ids.count(pad) == 4
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) but 1 image"):
        qwen2_vl_template.encode_batch(["compare <image> and <image>"], [[red]])
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 0 image"):
        qwen2_vl_template.encode_batch(["describe <image>"])
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 2 image"):
        qwen2_vl_template.encode_batch(["describe <image>"], [[red, blue]])
    with pytest.raises(ValueError, match="images has 1 entries but there are 2 queries"):
        qwen2_vl_template.encode_batch(["a", "b"], [[red]])
    with pytest.raises(ValueError, match="image placeholder"):
        qwen2_vl_template.encode_batch(["sneaky <|image_pad|>"])
    _, text_template = llama
    with pytest.raises(ValueError, match="text-only model"):
        text_template.encode_batch(["describe"], [[red]])


def test_get_template_validates_arguments(llama, qwen2_vl_template):
    _, template = llama
    with pytest.raises(ValueError, match="no template for model_type 'gpt5'"):
        get_template("gpt5", template.tokenizer)
    with pytest.raises(ValueError, match="pass the processor"):
        get_template("qwen2-vl", template.tokenizer)
    # A processor given for a text model type is used through its tokenizer.
    assert get_template("qwen2", qwen2_vl_template.processor).tokenizer is qwen2_vl_template.tokenizer


# -- inference ---------------------------------------------------------------------------------------------


def test_inference_batched_equals_one_by_one(llama):
    model, template = llama
    batched = inference(model, template, QUERIES, batch_size=2, generation_config=GREEDY, progress=False)
    single = inference(model, template, QUERIES, batch_size=1, generation_config=GREEDY, progress=False)
    assert len(batched) == 5
    assert batched == single
    assert all(len(answer.split()) >= 3 for answer in batched)  # the tiny vocab always decodes to words
    # Default config: greedy, 64 new tokens at most.
    long = inference(model, template, QUERIES[:1], progress=False)
    assert 6 < len(template.tokenizer(long[0])["input_ids"]) <= 64


def test_inference_samples_when_asked(llama):
    model, template = llama
    sampling = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=5.0, top_k=0)
    greedy = inference(model, template, QUERIES, generation_config=GREEDY, progress=False)
    torch.manual_seed(1)
    first = inference(model, template, QUERIES, generation_config=sampling, progress=False)
    torch.manual_seed(1)
    second = inference(model, template, QUERIES, generation_config=sampling, progress=False)
    assert first == second
    assert first != greedy


def test_inference_progress_bar(llama, capsys):
    model, template = llama
    inference(model, template, QUERIES, batch_size=2, generation_config=GREEDY, progress=True)
    assert "3/3" in capsys.readouterr().err
    inference(model, template, QUERIES, batch_size=2, generation_config=GREEDY, progress=False)
    assert capsys.readouterr().err == ""


def test_inference_mixture_matches_each_query_alone_and_merged_weights(llama, llama_pool, merged_reference):
    _, template = llama
    swift, base, dirs = llama_pool
    kwargs = dict(adapter_names=ADAPTERS, generation_config=GREEDY, progress=False)
    batched = inference(swift, template, QUERIES, lora_mapping=MAPPING, batch_size=2, **kwargs)
    for i, query in enumerate(QUERIES):
        alone = inference(swift, template, [query], lora_mapping=MAPPING[i : i + 1], batch_size=1, **kwargs)
        merged = merged_reference(base, dirs, MAPPING[i].tolist())
        reference = inference(merged, template, [query], generation_config=GREEDY, progress=False)
        assert batched[i] == alone[0] == reference[0], f"query {i}"
    base_answers = inference(base, template, QUERIES, generation_config=GREEDY, progress=False)
    assert batched[2] == base_answers[2]  # zero routing row = base model
    assert sum(a != b for a, b in zip(batched, base_answers)) >= 3  # the adapters change the answers


def test_inference_sparse_routing_equals_dense_mapping(llama, llama_pool):
    """A LoraRouting built from sparse per-sample selections gives the dense mapping's answers."""
    _, template = llama
    swift, _, _ = llama_pool
    dense = inference(
        swift,
        template,
        QUERIES,
        lora_mapping=MAPPING,
        adapter_names=ADAPTERS,
        generation_config=GREEDY,
        batch_size=2,
        progress=False,
    )
    nonzero = [(row != 0).nonzero().flatten().tolist() for row in MAPPING]
    k = max(len(cols) for cols in nonzero)
    indices = torch.tensor([cols + [-1] * (k - len(cols)) for cols in nonzero])
    weights = torch.tensor(
        [[float(MAPPING[i, j]) if j >= 0 else 0.0 for j in row] for i, row in enumerate(indices.tolist())]
    )
    routing = LoraRouting.from_sparse(indices, weights, ADAPTERS)
    sparse = inference(
        swift, template, QUERIES, routing=routing, generation_config=GREEDY, batch_size=2, progress=False
    )
    assert list(sparse) == list(dense)
    assert sparse.errors == [None] * len(QUERIES)


def test_inference_isolates_a_failing_query(llama, llama_pool):
    """on_error="isolate": the failing query gets "" and its error; the others are the answers they get alone."""
    _, template = llama
    swift, _, _ = llama_pool
    queries = list(QUERIES)
    queries[1] = 123  # not a string: fails to encode
    kwargs = dict(lora_mapping=MAPPING, adapter_names=ADAPTERS, generation_config=GREEDY, progress=False)
    with pytest.raises(ValueError):
        inference(swift, template, queries, batch_size=2, **kwargs)
    answers = inference(swift, template, queries, batch_size=2, on_error="isolate", **kwargs)
    expected = inference(swift, template, QUERIES, batch_size=2, **kwargs)
    assert answers[1] == "" and "ValueError" in answers.errors[1]
    assert [a for i, a in enumerate(answers) if i != 1] == [a for i, a in enumerate(expected) if i != 1]
    assert [e for i, e in enumerate(answers.errors) if i != 1] == [None] * (len(QUERIES) - 1)


def test_inference_validates_arguments(llama, llama_pool):
    model, template = llama
    swift, _, _ = llama_pool
    with pytest.raises(ValueError, match="the routing has 4 rows for 5 queries"):
        inference(swift, template, QUERIES, lora_mapping=MAPPING[:4], adapter_names=ADAPTERS, progress=False)
    with pytest.raises(ValueError, match=r"shape \[batch, len\(adapter_names\)\] = \[batch, 2\]"):
        inference(swift, template, QUERIES, lora_mapping=MAPPING, adapter_names=ADAPTERS[:2], progress=False)
    routing = LoraRouting.from_dense(MAPPING, ADAPTERS)
    with pytest.raises(ValueError, match="not both"):
        inference(swift, template, QUERIES, routing=routing, lora_mapping=MAPPING, adapter_names=ADAPTERS)
    with pytest.raises(ValueError, match="on_error must be"):
        inference(swift, template, QUERIES, on_error="skip", progress=False)
    with pytest.raises(ValueError, match="needs adapter_names"):
        inference(swift, template, QUERIES, lora_mapping=MAPPING, progress=False)
    with pytest.raises(ValueError, match="holds no LoRA layers"):
        inference(model, template, QUERIES, lora_mapping=MAPPING, adapter_names=ADAPTERS, progress=False)
    with pytest.raises(ValueError, match="not loaded"):
        inference(
            swift, template, QUERIES, lora_mapping=MAPPING, adapter_names=("a", "b", "zz"), progress=False
        )
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inference(model, template, QUERIES, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="wrap it in a list"):
        inference(model, template, "paris", progress=False)
    several = GenerationConfig(max_new_tokens=2, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences=2"):
        inference(model, template, QUERIES, generation_config=several, progress=False)
