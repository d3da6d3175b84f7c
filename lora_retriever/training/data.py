"""Training data: strict parsing of JSON / JSONL records, the eval split, encoding and batching.

Accepted files (the format is read from the content, not the file name):

* a JSON list of records, or ``{"data": [...]}``;
* JSONL, one record per line.

A record is either ``{"input": ..., "output": ...}`` (``query`` / ``response`` are accepted as aliases), with
optional ``"system"``, ``"images"`` and ``"id"``, or a chat::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "<image> what is it?"},
                  {"role": "assistant", "content": "a cat"}], "images": ["img/cat.png"]}

with one user turn and its answer (an optional system turn first). ``<image>`` tags mark where images go;
image paths resolve against the data file's folder. Every problem is a ``DatasetError`` naming the record
(its index in a JSON list, its line in JSONL) and the missing field.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "DatasetError",
    "EncodedExample",
    "TrainRecord",
    "collate",
    "encode_records",
    "read_training_records",
    "split_records",
]

IGNORE_INDEX = -100  # label value the loss ignores (= swift.llm.template.IGNORE_INDEX)


class DatasetError(ValueError):
    """The training data file can't be used as it is; the message names the record and the fix."""


@dataclass
class TrainRecord:
    """One training example: a query (``<image>`` tags for VLMs), its answer, optional system and images.

    ``id`` is the record's ``"id"`` field, else its index in a JSON list (``"3"``) or its JSONL line
    (``"line4"``), as ``lora_retriever.embed_pool.read_sample_texts`` names samples.
    """

    id: str
    query: str
    response: str
    system: str | None = None
    images: list[Path] = field(default_factory=list)

    def load_images(self) -> list[Any]:
        """The images as RGB PIL images (``[]`` for a text record)."""
        if not self.images:
            return []
        from PIL import Image

        return [Image.open(path).convert("RGB") for path in self.images]


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read_training_records(path: str | Path) -> list[TrainRecord]:
    """Read and validate every record of a training file.

    Raises:
        FileNotFoundError: no such file, or an image a record names is missing.
        DatasetError: malformed JSON (with the JSONL line number), an unknown layout, a record without a
            required field (with its index or line and the field), or no records at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset_path {str(path)!r} does not exist; pass a JSON or JSONL file.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{path} is empty; it needs at least one {{'input', 'output'}} record.")
    raw = _parse(path, text)
    records = [_to_record(item, where, path) for where, item in raw]
    if not records:
        raise DatasetError(f"{path} holds no records; it needs at least one {{'input', 'output'}} record.")
    return records


def _parse(path: Path, text: str) -> list[tuple[str, Any]]:
    """``(where, item)`` pairs: ``where`` is ``"record 3"`` (JSON list) or ``"line 4"`` (JSONL)."""
    if path.suffix.lower() == ".jsonl":
        return _jsonl_items(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as doc_err:
        return _parse_jsonl(path, text, doc_err)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
        if not isinstance(data, list):
            raise DatasetError(
                f"{path}: 'data' must be a list of records, got {type(data).__name__}; unknown dataset format."
            )
    elif isinstance(data, dict) and _looks_like_record(data):
        return [("line 1", data)]  # a one-line JSONL file parses as one JSON object
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: unknown dataset format (a JSON {type(data).__name__}); expected a JSON list of records, "
            "{'data': [...]}, or JSONL with one record per line."
        )
    return [(f"record {index}", item) for index, item in enumerate(data)]


def _parse_jsonl(path: Path, text: str, doc_err: json.JSONDecodeError) -> list[tuple[str, Any]]:
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        first_item = json.loads(first)
    except json.JSONDecodeError:
        first_item = None
    if not isinstance(first_item, dict):
        # Not JSONL either: report the whole-document error (e.g. a broken JSON list) or the layout.
        raise DatasetError(
            f"{path}: unknown dataset format: not a JSON document ({doc_err.msg} at line {doc_err.lineno} "
            f"column {doc_err.colno}) and not JSONL (its first line is not a JSON object)."
        )
    return _jsonl_items(path, text)


def _jsonl_items(path: Path, text: str) -> list[tuple[str, Any]]:
    items = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path} line {line_no}: malformed JSON ({err.msg} at column {err.colno}); fix or remove the line."
            ) from err
    return items


def _looks_like_record(data: dict[str, Any]) -> bool:
    return any(key in data for key in ("input", "output", "query", "response", "messages"))


def _to_record(item: Any, where: str, path: Path) -> TrainRecord:
    if not isinstance(item, dict):
        raise DatasetError(
            f"{path} {where}: expected a JSON object, got {type(item).__name__}; unknown dataset format."
        )
    images = _image_paths(item, where, path)
    default_id = where.replace("record ", "").replace("line ", "line")
    record_id = str(item.get("id", default_id))
    if "messages" in item:
        query, response, system = _chat(item["messages"], where, path)
    else:
        query = _text_field(item, ("input", "query"), where, path)
        response = _text_field(item, ("output", "response"), where, path)
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise DatasetError(f"{path} {where}: 'system' must be a string, got {type(system).__name__}.")
    return TrainRecord(record_id, query, response, system, images)


def _text_field(item: dict[str, Any], names: Sequence[str], where: str, path: Path) -> str:
    for name in names:
        if name in item:
            value = item[name]
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(
                    f"{path} {where}: field {name!r} must be a non-empty string, got {value!r}."
                )
            return value
    raise DatasetError(
        f"{path} {where}: missing field {names[0]!r} (records need 'input' and 'output', or chat 'messages')."
    )


def _chat(messages: Any, where: str, path: Path) -> tuple[str, str, str | None]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            f"{path} {where}: 'messages' must be a non-empty list of {{role, content}} objects."
        )
    system = None
    turns: list[tuple[str, str]] = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(f"{path} {where}: message {j} must be an object with 'role' and 'content'.")
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError(f"{path} {where}: message {j} is missing field {key!r}.")
        role, content = message["role"], _content_text(message["content"], j, where, path)
        if role == "system" and j == 0:
            system = content
        elif role in ("user", "assistant"):
            turns.append((role, content))
        else:
            raise DatasetError(
                f"{path} {where}: message {j} has role {role!r}; use system (first only), user or assistant."
            )
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"]:
        raise DatasetError(
            f"{path} {where}: a chat record needs exactly one user turn followed by its assistant answer, "
            f"got roles {roles}; multi-turn history is not supported by the training template."
        )
    return turns[0][1], turns[1][1], system


def _content_text(content: Any, j: int, where: str, path: Path) -> str:
    """String content, or OpenAI-style parts (``{"type": "text"|"image"}``; images become ``<image>`` tags)."""
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image":
                parts.append("<image>")
            else:
                raise DatasetError(
                    f"{path} {where}: message {j} has a content part {part!r}; use {{'type': 'text', 'text': ...}} "
                    "or {'type': 'image'}."
                )
        content = "".join(parts)
    if not isinstance(content, str) or not content.strip():
        raise DatasetError(f"{path} {where}: message {j} 'content' must be non-empty text, got {content!r}.")
    return content


def _image_paths(item: dict[str, Any], where: str, path: Path) -> list[Path]:
    images = item.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DatasetError(f"{path} {where}: 'images' must be a list of image file paths.")
    resolved = []
    for image in images:
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else path.parent / image_path
        if not image_path.is_file():
            raise FileNotFoundError(f"{path} {where}: image file {image_path} does not exist.")
        resolved.append(image_path)
    return resolved


# ----------------------------------------------------------------------------------------------------------
# Split, encode, batch
# ----------------------------------------------------------------------------------------------------------


def split_records(
    records: Sequence[TrainRecord], eval_split: float, seed: int
) -> tuple[list[TrainRecord], list[TrainRecord]]:
    """Hold out ``round(eval_split * n)`` records (at least one when ``eval_split > 0``), chosen with ``seed``.

    Returns:
        ``(train, eval)``, each in file order.

    Raises:
        ValueError: nothing would be left to train on.
    """
    if eval_split <= 0:
        return list(records), []
    n_eval = max(1, round(eval_split * len(records)))
    if n_eval >= len(records):
        raise ValueError(
            f"eval_split={eval_split} holds out {n_eval} of {len(records)} records, leaving none to train on; "
            "add records or lower --eval_split (0 disables eval)."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held_out]
    evaluation = [r for i, r in enumerate(records) if i in held_out]
    return train, evaluation


EncodedExample = dict[str, torch.Tensor]


def encode_records(
    records: Sequence[TrainRecord],
    templates: Any,
    max_length: int,
    *,
    progress: bool = False,
    desc: str = "encode",
) -> tuple[list[EncodedExample], int]:
    """Encode records with their template; cut each to ``max_length`` tokens.

    Args:
        records: the records.
        templates: a callable ``system -> swift.llm Template`` (one template per system prompt).
        max_length: token budget per example; the answer's tail is cut first.
        progress: show a progress bar.

    Returns:
        ``(examples, skipped)``: each example holds ``input_ids``, ``attention_mask``, ``labels`` ``[T]`` (labels
        ``-100`` on the prompt) plus the processor's image tensors for VLMs; ``skipped`` counts records whose
        prompt alone fills ``max_length`` (they would train on nothing).
    """
    from tqdm.auto import tqdm

    examples: list[EncodedExample] = []
    skipped = 0
    for record in tqdm(records, desc=desc, unit="example", disable=not progress or len(records) < 200):
        template = templates(record.system)
        images = record.load_images()
        example = template.encode_example(record.query, record.response, images or None)
        prompt_len = int((example["labels"] == IGNORE_INDEX).sum())
        if prompt_len >= max_length:
            skipped += 1
            logger.warning(
                "record %s: its prompt has %d tokens >= max_length %d; skipped (raise --max_length).",
                record.id,
                prompt_len,
                max_length,
            )
            continue
        examples.append(_truncate(example, max_length))
    return examples, skipped


def _token_aligned(example: EncodedExample, key: str) -> bool:
    """1-D tensors as long as ``input_ids`` (labels, attention mask, mm_token_type_ids) are per token."""
    value = example[key]
    return value.dim() == 1 and value.shape[0] == example["input_ids"].shape[0]


def _truncate(example: EncodedExample, max_length: int) -> EncodedExample:
    if example["input_ids"].shape[0] <= max_length:
        return example
    return {k: v[:max_length] if _token_aligned(example, k) else v for k, v in example.items()}


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad per-token tensors to the longest example; concatenate the rest (image tensors) on dim 0.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[batch, T_max]`` (pad id / 0 / -100 on padding), other
        per-token tensors padded with 0, and e.g. ``pixel_values`` / ``image_grid_thw`` of the examples that
        have them, concatenated.
    """
    length = max(e["input_ids"].shape[0] for e in examples)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    keys = list(dict.fromkeys(k for e in examples for k in e))
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        having = [e for e in examples if key in e]
        if len(having) == len(examples) and all(_token_aligned(e, key) for e in examples):
            rows = [
                torch.nn.functional.pad(e[key], (0, length - e[key].shape[0]), value=pad_values.get(key, 0))
                for e in examples
            ]
            batch[key] = torch.stack(rows)
        else:
            batch[key] = torch.cat([e[key] for e in having])
    return batch


def count_answer_tokens(examples: Sequence[EncodedExample]) -> int:
    """Tokens the loss is computed on (next-token targets that are answer tokens)."""
    return sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in examples)


def micro_batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)
