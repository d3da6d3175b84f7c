"""train.py and lora_retriever.training: data parsing, the training loop, QLoRA, exact resume, the pool registry.

Training runs use the tiny random Llama of ``tests.tiny_vlms`` (hidden 64, word-level tokenizer): a step
takes milliseconds. bitsandbytes' CPU backend quantises its 64 / 128-wide layers (NF4 blocks of 64 values;
widths of 32 work as well). The real SmolLM2 test is ``slow``.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_cli
from lora_retriever.training import DatasetError, TrainConfig, read_training_records, register_adapter, train
from lora_retriever.training.checkpoint import list_checkpoints
from lora_retriever.training.data import IGNORE_INDEX, collate, encode_records, split_records
from tests.tiny_vlms import save_tiny_llama, save_tiny_qwen2_vl
from tests.tolerances import SAME_SHAPES_ATOL

# Words of the tiny tokenizer's vocabulary, so nothing maps to <unk>.
MEMO = [
    ("what is the capital of france ?", "paris ."),
    ("compare cat and dog", "red cat and blue dog"),
    ("what is two plus one ?", "three"),
    ("describe this image", "a green cat"),
    ("you are a helpful assistant", "what is red ?"),
    ("what is the capital of paris ?", "france ."),
    ("compare red and blue", "green"),
    ("describe the dog", "a red dog"),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def memo_json(tmp_path: Path) -> Path:
    path = tmp_path / "memo.json"
    path.write_text(json.dumps([{"input": q, "output": a} for q, a in MEMO]))
    return path


def tiny_args(llama_dir: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_type",
        "llama",
        "--model_path",
        str(llama_dir),
        "--dataset_path",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--quiet",
        *extra,
    ]


def tiny_config(llama_dir: Path, dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        dataset_path=str(dataset),
        output_dir=str(output_dir),
        model_type="llama",
        model_path=str(llama_dir),
        learning_rate=1e-2,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 14, 15, 16, 17, 18, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- training


def test_cli_training_lowers_loss_and_writes_a_loadable_adapter(llama_dir, memo_json, tmp_path):
    from peft import PeftModel

    from swift.llm import get_model_tokenizer
    from swift.tuners import Swift

    out = tmp_path / "memo_adapter"
    argv = tiny_args(llama_dir, memo_json, out, "--max_steps", "40", "--learning_rate", "1e-2")
    assert train_cli.main([*argv, "--eval_split", "0", "--save_steps", "20", "--adapter_name", "memo"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and len(metrics["train_losses"]) == 40
    assert metrics["train_loss_first"] > 4.5  # ~ln(128): the random model knows nothing
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.8
    # all-linear, r=8, 2 blocks: q/o 64->64, k/v 64->32 (2 KV heads), gate/up/down 64<->128; not lm_head
    assert metrics["trainable_params"] == 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert metrics["eval_loss_before"] is None  # --eval_split 0
    args = json.loads((out / "training_args.json").read_text())
    assert args["config"]["adapter_name"] == "memo" and args["config"]["lora_r"] == 8
    assert args["total_steps"] == 40 and args["num_train_examples"] == len(MEMO)
    log = (out / "train.log").read_text()
    assert "step 40/40" in log and "saved adapter" in log
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-20", "checkpoint-40"]

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == llama_dir
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert (out / "adapter_model.safetensors").is_file()

    base, _ = get_model_tokenizer("llama", llama_dir)
    base_logits = logits_of(base)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    peft_logits = logits_of(peft_model)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter does something
    fresh, _ = get_model_tokenizer("llama", llama_dir)
    # .eval(): Swift.from_pretrained leaves its new LoRA layers in training mode (lora_dropout 0.05 would apply).
    swift_logits = logits_of(Swift.from_pretrained(fresh, out).eval())
    # same inputs through both, tiny model: the strict bound of tests/tolerances.py
    torch.testing.assert_close(swift_logits, peft_logits, atol=SAME_SHAPES_ATOL, rtol=0)


def test_eval_loss_and_perplexity_before_and_after(llama_dir, memo_json, tmp_path):
    metrics = train(
        tiny_config(llama_dir, memo_json, tmp_path / "out", max_steps=30, eval_split=0.25, batch_size=3)
    )
    assert metrics["num_train_examples"] == 6 and metrics["num_eval_examples"] == 2
    for when in ("before", "after"):
        assert metrics[f"eval_perplexity_{when}"] == pytest.approx(math.exp(metrics[f"eval_loss_{when}"]))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]  # the answers share words and format
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_progress_bar_shows_every_step_with_its_loss(llama_dir, memo_json, tmp_path, capsys):
    """The bar is redrawn after every optimizer step with the step's loss and lr (issue 8, point 8)."""
    seen: list[tuple[int, float]] = []
    metrics = train(
        tiny_config(llama_dir, memo_json, tmp_path / "out", max_steps=4, eval_split=0, progress=True),
        on_step=lambda step, loss: seen.append((step, loss)),
    )
    frames = re.findall(
        r"train:.*?(\d+)/4 \[[^\]]*loss=([0-9.]+), lr=([0-9.e+-]+)\]", capsys.readouterr().err
    )
    drawn = {int(step): float(loss) for step, loss, _ in frames}
    assert set(drawn) == {1, 2, 3, 4}, frames  # one frame per step, not one at the end
    for step, loss in seen:  # the bar shows each step's own loss (rounded to 4 places)
        assert drawn[step] == pytest.approx(loss, abs=1e-4)
    assert [loss for _, loss in seen] == metrics["train_losses"]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_and_saves_a_loadable_adapter(llama_dir, memo_json, tmp_path, quantization):
    from peft import PeftModel

    from lora_retriever.training.model import load_base_model
    from swift.llm import get_model_tokenizer

    out = tmp_path / quantization
    argv = tiny_args(llama_dir, memo_json, out, "--quantization", quantization, "--max_steps", "4")
    assert train_cli.main([*argv, "--eval_split", "0.25", "--save_steps", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(loss) for loss in metrics["train_losses"])
    assert math.isfinite(metrics["eval_loss_after"])
    assert json.loads((out / "training_args.json").read_text())["config"]["quantization"] == quantization
    assert f"with {quantization} quantization" in (out / "train.log").read_text()
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 7  # lora_A + lora_B on 7 linear layers x 2 blocks (lm_head excluded)
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)  # trained (B starts at 0)

    quantized_base, _ = load_base_model("llama", str(llama_dir), quantization=quantization)
    layer = quantized_base.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear4bit" if quantization == "nf4" else "Linear8bitLt")
    assert torch.isfinite(logits_of(PeftModel.from_pretrained(quantized_base, str(out)))).all()
    fp32_base, _ = get_model_tokenizer("llama", llama_dir)
    assert torch.isfinite(logits_of(PeftModel.from_pretrained(fp32_base, str(out)))).all()


class _Crash(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(llama_dir, memo_json, tmp_path):
    # Dropout on, 2 micro-batches per step, epochs of 2 steps: RNG, accumulation and epoch order all matter.
    settings = dict(max_steps=6, save_steps=3, batch_size=2, grad_accum=2, eval_split=0.25, lora_dropout=0.1)
    full = train(tiny_config(llama_dir, memo_json, tmp_path / "full", **settings))

    def crash_in_step_4(step: int, loss: float) -> None:
        if step == 4:
            raise _Crash("simulated crash after step 4, before its checkpoint")

    part = tmp_path / "part"
    with pytest.raises(_Crash):
        train(tiny_config(llama_dir, memo_json, part, **settings), on_step=crash_in_step_4)
    assert [p.name for p in list_checkpoints(part)] == ["checkpoint-3"]
    assert not (part / "adapter_model.safetensors").exists()
    assert "training stopped" in (part / "train.log").read_text()
    checkpoint = part / "checkpoint-3"
    for name in (
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "trainer_state.json",
    ):
        assert (checkpoint / name).is_file()
    with pytest.raises(ValueError, match="--resume_from auto"):  # won't silently restart over checkpoints
        train(tiny_config(llama_dir, memo_json, part, **settings))

    argv = tiny_args(llama_dir, memo_json, part, "--learning_rate", "1e-2", "--lora_dropout", "0.1")
    argv += [
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--eval_split",
        "0.25",
    ]
    assert train_cli.main([*argv, "--resume_from", "auto"]) == 0
    resumed = json.loads((part / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(checkpoint)
    assert resumed["train_losses"] == pytest.approx(full["train_losses"], abs=1e-6)
    assert resumed["eval_loss_before"] == full["eval_loss_before"]
    expected = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    got = load_file(str(part / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_resume_from_a_missing_checkpoint_is_an_error(llama_dir, memo_json, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train(tiny_config(llama_dir, memo_json, tmp_path / "out", resume_from=str(tmp_path / "nope")))


def test_chat_records_with_images_train_a_vlm(tmp_path):
    from PIL import Image

    from swift.llm import get_model_tokenizer
    from swift.tuners import Swift

    model_dir = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    for colour in ("red", "blue"):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{colour}.png")
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": " describe this image"}],
                },
                {"role": "assistant", "content": f"a {colour} cat"},
            ],
            "images": [f"{colour}.png"],
        }
        for colour in ("red", "blue")
    ]
    records.append(
        {
            "messages": [
                {"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "what is the capital of france ?"},
                {"role": "assistant", "content": "paris"},
            ]
        }
    )
    dataset = tmp_path / "vlm.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out"
    config = TrainConfig(
        dataset_path=str(dataset),
        output_dir=str(out),
        model_type="qwen2-vl",
        model_path=str(model_dir),
        max_steps=3,
        batch_size=3,
        eval_split=0,
        save_steps=0,
        progress=False,
    )
    metrics = train(config)
    assert len(metrics["train_losses"]) == 3 and all(math.isfinite(x) for x in metrics["train_losses"])
    model, _ = get_model_tokenizer("qwen2-vl", model_dir)
    assert len(list(Swift.from_pretrained(model, out).lora_layers())) > 0


def test_vlm_adapter_registers_with_an_image_key(tmp_path):
    """--register_pool with --image_embedder: the entry gets a text key and an image key (mean vision-tower
    embedding of the key samples' images), both validated when the pool loads."""
    import numpy as np
    from PIL import Image

    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.pool import AdapterPool, key_meta_path
    from tests.tiny_vlms import save_tiny_llava

    model_dir = save_tiny_llava(tmp_path / "llava")
    colours = ("red", "blue", "green", "white")
    for colour in colours:
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{colour}.png")
    records = [
        {
            "id": colour,
            "messages": [
                {"role": "user", "content": "<image> what colour is this?"},
                {"role": "assistant", "content": colour},
            ],
            "images": [f"{colour}.png"],
        }
        for colour in colours
    ]
    dataset = tmp_path / "colours.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pool_path = tmp_path / "pool" / "pool.json"
    argv = [
        "--dataset_path", str(dataset), "--output_dir", str(tmp_path / "out"), "--model_type", "llava",
        "--model_path", str(model_dir), "--max_steps", "2", "--batch_size", "2", "--eval_split", "0",
        "--save_steps", "0", "--register_pool", str(pool_path), "--num_key_samples", "3",
        "--image_embedder", "vision-tower", "--image_embedder_path", str(model_dir), "--quiet",
    ]  # fmt: skip
    assert train_cli.main(argv) == 0
    (entry,) = json.loads(pool_path.read_text())
    assert entry["image_embedding_path"] == "keys/colours.image.npy"
    meta = json.loads(key_meta_path(pool_path.parent / entry["image_embedding_path"]).read_text())
    assert meta["num_samples"] == 3 and set(meta["sample_ids"]) <= set(colours)
    vision = get_embedder(EmbedderConfig(backend="vision-tower", model_path=str(model_dir)))
    per_sample = vision.encode_images(
        [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in meta["sample_ids"]]
    )
    expected = per_sample.mean(axis=0)
    expected /= np.linalg.norm(expected)
    pool = AdapterPool.from_configs(pool_path)
    np.testing.assert_allclose(pool.image_keys()[0], expected, atol=1e-5)  # same images, same batch shapes
    assert pool.image_key_meta().model_id == vision.model_id

    # all-linear adapts the vision tower and the projector too; all-linear-lm only the language model
    from swift.llm import get_model_tokenizer
    from swift.tuners import Swift

    def tower_layers(adapter_dir: Path) -> tuple[int, int]:
        model, _ = get_model_tokenizer("llava", model_dir)
        layers = [name for name, _ in Swift.from_pretrained(model, adapter_dir).lora_layers()]
        vision = sum("vision_tower" in n or "multi_modal_projector" in n for n in layers)
        return vision, len(layers) - vision

    assert all(n > 0 for n in tower_layers(tmp_path / "out"))
    lm_only = [
        *argv[:3],
        str(tmp_path / "lm_only"),
        *argv[4:12],
        "--target_modules",
        "all-linear-lm",
        "--quiet",
    ]
    assert train_cli.main(lm_only) == 0
    vision, language = tower_layers(tmp_path / "lm_only")
    assert vision == 0 and language > 0


# ---------------------------------------------------------------------------------------------- data


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_accepted_layout_parses(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")  # existence is checked at parse time, contents when encoding
    pairs = [{"input": "q0", "output": "a0"}, {"query": "q1", "response": "a1", "system": "s", "id": "x"}]
    as_list = read_training_records(write(tmp_path / "list.json", json.dumps(pairs)))
    as_data = read_training_records(write(tmp_path / "data.json", json.dumps({"data": pairs})))
    as_jsonl = read_training_records(
        write(tmp_path / "lines.jsonl", "\n".join(json.dumps(p) for p in pairs) + "\n\n")
    )
    for records in (as_list, as_data, as_jsonl):
        assert [(r.query, r.response) for r in records] == [("q0", "a0"), ("q1", "a1")]
        assert records[1].system == "s" and records[1].id == "x"
    assert as_list[0].id == "0" and as_jsonl[0].id == "line1"  # as embed_pool.read_sample_texts names them
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "<image> what is it?"},
            {"role": "assistant", "content": "a cat"},
        ],
        "images": ["img.png"],
    }
    (record,) = read_training_records(write(tmp_path / "chat.jsonl", json.dumps(chat)))
    assert (record.query, record.response, record.system) == ("<image> what is it?", "a cat", "be brief")
    assert record.images == [tmp_path / "img.png"]


BAD_DATASETS = [
    (
        "missing_output.json",
        json.dumps([{"input": "a", "output": "b"}] * 2 + [{"input": "c"}]),
        "record 2: missing field 'output'",
    ),
    (
        "missing_input.jsonl",
        '{"input": "a", "output": "b"}\n\n{"output": "c"}\n',
        "line 3: missing field 'input'",
    ),
    (
        "blank_output.json",
        json.dumps({"data": [{"input": "a", "output": "  "}]}),
        "record 0: field 'output' must be",
    ),
    (
        "malformed.jsonl",
        '{"input": "a", "output": "b"}\n{"input": "c", "output": \n',
        "line 2: malformed JSON",
    ),
    ("bad_first_line.jsonl", '{"input": \n{"input": "a", "output": "b"}\n', "line 1: malformed JSON"),
    ("empty.json", "  \n", "is empty"),
    ("empty_list.json", "[]", "holds no records"),
    ("empty_data.json", '{"data": []}', "holds no records"),
    ("object.json", '{"rows": [{"input": "a", "output": "b"}]}', "unknown dataset format"),
    ("data_not_list.json", '{"data": {"input": "a"}}', "unknown dataset format"),
    ("strings.json", '["a", "b"]', "record 0: expected a JSON object"),
    ("table.csv", "input,output\na,b\n", "unknown dataset format"),
    ("broken_list.json", '[{"input": "a", "output": "b"},\n', "unknown dataset format"),
    (
        "no_answer.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "line 1: a chat record needs",
    ),
    (
        "multi_turn.jsonl",
        json.dumps({"messages": [{"role": r, "content": "x"} for r in ("user", "assistant") * 2]}),
        "multi-turn",
    ),
    (
        "no_content.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),
        "message 1 is missing field 'content'",
    ),
    (
        "bad_role.jsonl",
        json.dumps({"messages": [{"role": "tool", "content": "q"}]}),
        "message 0 has role 'tool'",
    ),
    (
        "bad_images.jsonl",
        json.dumps({"input": "a", "output": "b", "images": [1]}),
        "line 1: 'images' must be",
    ),
]


@pytest.mark.parametrize("name, text, message", BAD_DATASETS, ids=[case[0] for case in BAD_DATASETS])
def test_bad_dataset_is_an_error_naming_the_record_and_field(tmp_path, name, text, message):
    with pytest.raises(DatasetError, match=message):
        read_training_records(write(tmp_path / name, text))


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_training_records(tmp_path / "absent.json")
    record = {"input": "a", "output": "b", "images": ["gone.png"]}
    with pytest.raises(FileNotFoundError, match=r"record 0: image file .*gone.png"):
        read_training_records(write(tmp_path / "d.json", json.dumps([record])))


def test_cli_reports_a_bad_dataset_before_loading_a_model(tmp_path, capsys):
    # The model path does not exist: had the model been loaded first, the error would name it instead.
    bad = write(tmp_path / "bad.jsonl", '{"input": "a", "output": "b"}\n{"input": "c"}\n')
    argv = ["--model_type", "llama", "--model_path", str(tmp_path / "no_model"), "--dataset_path", str(bad)]
    assert train_cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2: missing field 'output'" in err and "Traceback" not in err
    with pytest.raises(DatasetError, match="line 2: missing field 'output'"):  # --debug: the exception itself
        train_cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--quiet", "--debug"])


def test_split_is_seeded_and_leaves_training_data():
    from lora_retriever.training.data import TrainRecord

    records = [TrainRecord(str(i), f"q{i}", f"a{i}") for i in range(20)]
    train_a, eval_a = split_records(records, 0.25, seed=1)
    train_b, eval_b = split_records(records, 0.25, seed=1)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 5 and len(train_a) == 15
    assert split_records(records, 0.25, seed=2)[1] != eval_a
    assert len(split_records(records[:2], 0.1, seed=0)[1]) == 1  # at least one eval record
    assert split_records(records, 0.0, seed=0) == (records, [])
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_records(records[:1], 0.5, seed=0)


def test_encoding_masks_the_prompt_and_collate_pads(llama_dir):
    from lora_retriever.training.data import TrainRecord
    from swift.llm import get_model_tokenizer, get_template

    _, tokenizer = get_model_tokenizer("llama", llama_dir)
    template = get_template("llama", tokenizer)
    records = [
        TrainRecord("0", "what is the capital of france ?", "paris ."),
        TrainRecord("1", "compare", "red"),
    ]
    examples, skipped = encode_records(records, lambda system: template, max_length=64)
    assert skipped == 0
    for example, record in zip(examples, records):
        answer = example["input_ids"][example["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == record.response
    batch = collate(examples, tokenizer.pad_token_id)
    longest = max(e["input_ids"].shape[0] for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = int(examples[1]["input_ids"].shape[0])
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][1, short:] == 0
    ).all()

    prompt_len = int((examples[0]["labels"] == IGNORE_INDEX).sum())
    cut, _ = encode_records(records[:1], lambda system: template, max_length=prompt_len + 1)
    assert cut[0]["input_ids"].shape[0] == prompt_len + 1  # the answer's tail goes first
    none, skipped = encode_records(records[:1], lambda system: template, max_length=prompt_len)
    assert none == [] and skipped == 1  # a prompt filling max_length leaves nothing to learn


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_answer_loss_keeps_only_answer_logits_and_equals_the_full_loss(kind, llama_dir, tmp_path):
    """The LM head runs on the answer positions only; the loss equals cross-entropy over full logits."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from lora_retriever.training.trainer import _answer_token_loss, _takes_logits_to_keep
    from swift.llm import get_model_tokenizer, get_template
    from tests.tiny_vlms import save_tiny_llava

    model_dir = llama_dir if kind == "llama" else save_tiny_llava(tmp_path / "llava")
    model, processor = get_model_tokenizer(kind, model_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    template = get_template(kind, processor)
    queries = ["what is the capital of france ?", "describe this image"]
    images = [None, [Image.new("RGB", (16, 16), "red")]] if kind == "llava" else None
    if kind == "llava":
        queries[1] = "<image> " + queries[1]
    batch = template.encode_batch(queries, images)
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] - 3] = IGNORE_INDEX  # the last 3 tokens are "answers"
    labels[0, -1] = IGNORE_INDEX  # rows with different answer positions
    assert _takes_logits_to_keep(model)
    calls = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    total, count = _answer_token_loss(model, {**batch, "labels": labels})
    hook.remove()
    assert count == 5 and calls == [torch.Size([5, head.in_features])]  # answer-predicting positions only
    with torch.no_grad():
        full = model(**batch).logits
    reference = F.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    assert abs(total.item() - reference.item()) <= SAME_SHAPES_ATOL * max(1.0, abs(reference.item()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora_r": 0}, "lora_r"),
        ({"quantization": "fp8"}, "quantization"),
        ({"eval_split": 1.0}, "eval_split"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"target_modules": ["all-linear", "q_proj"]}, "all-linear"),
        ({"adapter_name": "a.b"}, "adapter_name"),
        ({"save_steps": -1}, "save_steps"),
    ],
)
def test_config_validation_names_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset_path="d.json", output_dir="out", **overrides)


def test_cli_rejects_bad_flags(tmp_path, capsys):
    assert train_cli.main(["--dataset_path", "d.json", "--output_dir", str(tmp_path), "--lora_r", "0"]) == 2
    assert capsys.readouterr().err == "error: lora_r must be a positive integer, got 0.\n"
    with pytest.raises(SystemExit):  # not a choice: argparse's own usage error
        train_cli.main(["--dataset_path", "d.json", "--quantization", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    config = TrainConfig(dataset_path="data/capitals.jsonl", max_steps=-1)
    assert config.adapter_name == "capitals" and config.max_steps is None
    assert Path(config.output_dir) == Path("outputs") / "adapters" / "capitals"  # the documented default


# ---------------------------------------------------------------------------------------------- pool registry


def test_training_registers_the_adapter_with_a_key(llama_dir, memo_json, tmp_path):
    from lora_retriever.pool import AdapterPool, key_meta_path

    pool_path = tmp_path / "pool" / "pool.json"
    out = tmp_path / "adapters" / "memo"
    argv = tiny_args(
        llama_dir, memo_json, out, "--max_steps", "2", "--eval_split", "0.25", "--save_steps", "0"
    )
    argv += [
        "--register_pool",
        str(pool_path),
        "--num_key_samples",
        "4",
        "--task",
        "memo",
        "--category",
        "toy",
    ]
    assert train_cli.main([*argv, "--description", "memorised answers", "--copy_samples"]) == 0

    (entry,) = json.loads(pool_path.read_text())
    assert entry["lora_name"] == "memo" and entry["lora_path"] == "../adapters/memo"
    assert entry["embedding_path"] == "keys/memo.npy" and entry["samples_path"] == "samples/memo.json"
    assert (entry["task"], entry["category"], entry["description"]) == ("memo", "toy", "memorised answers")
    assert (pool_path.parent / "samples" / "memo.json").read_bytes() == memo_json.read_bytes()
    meta = json.loads(key_meta_path(pool_path.parent / "keys" / "memo.npy").read_text())
    train_ids = {r.id for r in split_records(read_training_records(memo_json), 0.25, seed=42)[0]}
    assert meta["num_samples"] == 4 and set(meta["sample_ids"]) <= train_ids
    assert meta["model_id"] == "all-MiniLM-L6-v2"
    pool = AdapterPool.from_configs(pool_path)  # keys required: the entry is complete
    assert pool.names == ["memo"] and pool.keys().shape == (1, 384)
    assert pool["memo"].lora_path == out.resolve()
    assert pool.key_meta().model_id == "all-MiniLM-L6-v2"

    stored = register_adapter(pool_path, {**pool["memo"].to_dict(), "description": "replaced"})
    assert stored["lora_path"] == "../adapters/memo"  # absolute in, relative to the config out
    (entry,) = json.loads(pool_path.read_text())
    assert entry["description"] == "replaced"


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_addition_adapter_beats_the_base_model(tmp_path):
    """~40 steps of batch 8 on 2-digit addition (answer: the bare sum); exact match on held-out sums."""
    from transformers import GenerationConfig

    from lora_retriever.metrics import exact_match
    from swift.llm import get_model_tokenizer, get_template, inference
    from swift.tuners import Swift

    rng = random.Random(0)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < 360:
        pairs.add((rng.randint(10, 99), rng.randint(10, 99)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    train_pairs, test_pairs = ordered[:320], ordered[320:]
    dataset = tmp_path / "addition.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"input": f"What is {a} + {b}?", "output": str(a + b)}) + "\n" for a, b in train_pairs
        )
    )
    out = tmp_path / "addition"
    argv = [
        "--dataset_path",
        str(dataset),
        "--output_dir",
        str(out),
        "--max_steps",
        "40",
        "--batch_size",
        "8",
    ]
    assert train_cli.main([*argv, "--eval_split", "0.1", "--save_steps", "0", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] / 2

    model, tokenizer = get_model_tokenizer()
    template = get_template(model.model_type, tokenizer)
    queries = [f"What is {a} + {b}?" for a, b in test_pairs]
    references = [str(a + b) for a, b in test_pairs]
    greedy = GenerationConfig(max_new_tokens=16, do_sample=False)

    def accuracy(m: torch.nn.Module) -> float:
        answers = inference(m, template, queries, generation_config=greedy, progress=False)
        return sum(exact_match(p, r) for p, r in zip(answers, references)) / len(references)

    base_em = accuracy(model)
    adapter_em = accuracy(Swift.from_pretrained(model, out).eval())  # eval(): no lora_dropout
    print(f"exact match on {len(queries)} held-out sums: base {base_em:.2f}, adapter {adapter_em:.2f}")
    assert adapter_em >= base_em + 0.3
