"""Test-set reading (single-turn and chat JSONL, strict errors) and the answer metrics."""

from __future__ import annotations

import json
import re

import pytest

from lora_retriever.data import read_samples
from lora_retriever.metrics import bleu, exact_match, rouge_l


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_single_turn_and_chat_records(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"id": "q1", "query": "Capital of France?", "response": "Paris", "task": "capitals", "extra": 1},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "<image> what?"},
                    {"role": "assistant", "content": "a cat"},
                ],
                "images": ["img.png"],
                "task": "vqa",
            },
        ],
    )
    first, chat = read_samples(path)
    assert (first.id, first.query, first.response, first.task, first.extra) == (
        "q1",
        "Capital of France?",
        "Paris",
        "capitals",
        {"extra": 1},
    )
    assert chat.id == "line2" and chat.query == "<image> what?" and chat.response == "a cat"
    assert chat.system == "Be brief." and chat.history == [("hi", "hello")]
    assert chat.images == [tmp_path / "img.png"]
    assert len(read_samples(path, limit=1)) == 1


def test_malformed_line_names_its_number(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "ok"}, "", '{"query": "broken"'])
    with pytest.raises(ValueError, match=r"t\.jsonl:3: malformed JSON"):
        read_samples(path)


def test_field_types_are_checked_as_the_file_is_read(tmp_path):
    """A wrong type is an error naming the file, the line and the field, before any model is loaded (a numeric
    task used to crash the scoring after generation)."""
    ok = {"query": "q", "task": "t"}
    cases = [
        ({"query": "q", "task": 3}, "field 'task' must be a string or null, got int 3"),
        (
            {"query": "q", "images": "a.png b.png".split() + [7]},
            "field 'images' must be a list of image file paths",
        ),
        ({"query": "q", "images": {"a": 1}}, "field 'images' must be a list of image file paths, got dict"),
        ({"query": "q", "system": ["x"]}, "field 'system' must be a string or null"),
        ({"query": "q", "response": {"a": 1}}, "field 'response' must be a string"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "message 0: field 'content' must be a string or a list",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "message 0: content part 0 must be",
        ),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "t.jsonl", [ok, record])
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
            read_samples(path)
    (tmp_path / "t.jsonl").write_bytes(b'{"query": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_samples(tmp_path / "t.jsonl")


def test_chat_content_as_a_list_of_parts(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    parts = [{"type": "image"}, {"type": "text", "text": " what is this?"}]
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": parts},
                    {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
                ],
                "images": ["img.png"],
                "response": 42,
                "id": 7,
            }
        ],
    )
    (sample,) = read_samples(path)
    assert sample.query == "<image> what is this?" and sample.response == "a cat" and sample.id == "7"


def test_missing_query_and_missing_image(tmp_path):
    with pytest.raises(ValueError, match=r":1: record has no 'query'"):
        read_samples(write_jsonl(tmp_path / "a.jsonl", [{"response": "x"}]))
    with pytest.raises(FileNotFoundError, match="image file .*nope.png does not exist"):
        read_samples(write_jsonl(tmp_path / "b.jsonl", [{"query": "q", "images": ["nope.png"]}]))
    with pytest.raises(ValueError, match="must end with a user turn"):
        read_samples(
            write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
        )


def test_metrics():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("It is Paris", "Paris") == 0.0
    assert exact_match("Answer: **Côte d’Ivoire**\nbecause...", "Côte d'Ivoire") == 1.0
    assert exact_match("", "") == 0.0  # an empty reference matches nothing


def test_one_exact_match_rule_for_cli_paper_protocol_and_spectral_edit():
    """The CLI's metric, the task suite's is_correct and spectral_edit's --match normalized agree."""
    from lora_retriever.tasks import is_correct
    from spectral_edit.pipeline import answer_form

    cases = [
        ("Paris.", "paris"),
        ("It is Paris", "Paris"),
        ("  'Lima'\nmore text", "Lima"),
        ("Final answer: 42", "42"),
        ("Équateur", "Equateur"),
        ("", "x"),
    ]
    for prediction, reference in cases:
        cli = exact_match(prediction, reference) == 1.0
        paper = is_correct("capital", prediction, reference)
        spectral = answer_form(prediction, "normalized") == answer_form(reference, "normalized") and bool(
            answer_form(reference, "normalized")
        )
        assert cli == paper == spectral, (prediction, reference)
    assert rouge_l("the capital is paris", "paris") == pytest.approx(2 * (1 / 4) * 1 / (1 / 4 + 1))
    assert rouge_l("a b c d", "a x c d") == pytest.approx(0.75)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert bleu(["dog"], ["the cat sat on the mat"]) == 0.0
    partial = bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert 0.3 < partial < 1.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_image_tags_must_match_the_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"query": "<image> and <image>?", "images": ["a.png"]}) + "\n")
    with pytest.raises(
        ValueError, match=r"t\.jsonl:1: the query has 2 <image> tag\(s\) but the record gives 1"
    ):
        read_samples(path)
    path.write_text(json.dumps({"query": "no tag: images go first", "images": ["a.png"]}) + "\n")
    assert read_samples(path)[0].images == [tmp_path / "a.png"]
