"""Calibration / test data: ``{"input"|"query", "output"|"response"}`` records -> padded training batches.

Files are a JSON list of objects or JSON Lines (one object a line). ``encode_calibration`` uses a
``swift.llm`` template's ``encode_example`` (labels ``-100`` on the prompt), truncates to ``max_length``, and
``collate`` right-pads (``labels`` ``-100`` and ``attention_mask`` 0 on padding).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectral_edit.hooks import IGNORE_INDEX

logger = logging.getLogger(__name__)

__all__ = ["QAPair", "batch_examples", "collate", "encode_calibration", "read_qa_pairs"]

QUERY_KEYS = ("input", "query")
RESPONSE_KEYS = ("output", "response")


@dataclass(frozen=True)
class QAPair:
    """One record: the user query and the reference response."""

    query: str
    response: str


def _records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON list ({err.msg} at line {err.lineno}).") from err
        return list(data)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{line_no}: malformed JSON line ({err.msg} at column {err.colno})."
            ) from err
    return records


def _field(record: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        value = record.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}.")
            return value
    raise ValueError(f"{where}: the record has none of {list(keys)}; its keys are {sorted(record)}.")


def read_qa_pairs(path: str | Path, *, limit: int | None = None) -> list[QAPair]:
    """Read a JSON list / JSONL file of ``{"input"|"query": str, "output"|"response": str}`` records.

    Args:
        path: the file.
        limit: keep the first ``limit`` records (``None``: all).

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed JSON, a record without query/response, an empty file, or ``limit < 1``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass a JSON / JSONL file.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    pairs = []
    for index, record in enumerate(_records(path)):
        if limit is not None and len(pairs) >= limit:
            break
        where = f"{path} record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        pairs.append(QAPair(_field(record, QUERY_KEYS, where), _field(record, RESPONSE_KEYS, where)))
    if not pairs:
        raise ValueError(
            f"{path} holds no records; it needs at least one {{'input': ..., 'output': ...}} object."
        )
    return pairs


def encode_calibration(
    template: Any, pairs: Sequence[QAPair], *, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """``template.encode_example`` for each pair, truncated to ``max_length`` tokens.

    Examples left without any answer token after truncation are dropped with a warning.

    Raises:
        ValueError: ``max_length < 2``, no pairs, or no example keeps an answer token.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}.")
    if not pairs:
        raise ValueError("no calibration pairs; pass at least one record.")
    examples, truncated, dropped = [], 0, 0
    for pair in pairs:
        example = template.encode_example(pair.query, pair.response)
        if example["input_ids"].shape[0] > max_length:
            truncated += 1
            example = {
                k: v[:max_length]
                for k, v in example.items()
                if k in ("input_ids", "attention_mask", "labels")
            }
        if not bool((example["labels"][1:] != IGNORE_INDEX).any()):
            dropped += 1
            continue
        examples.append({k: example[k] for k in ("input_ids", "attention_mask", "labels") if k in example})
    if truncated:
        logger.warning(
            "%d of %d calibration examples truncated to max_length=%d", truncated, len(pairs), max_length
        )
    if dropped:
        logger.warning("%d calibration examples dropped: no answer token left within max_length", dropped)
    if not examples:
        raise ValueError(
            f"no calibration example keeps an answer token within max_length={max_length}; raise --max_length."
        )
    return examples


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``[T_i]`` examples to ``[batch, T_max]`` (labels ``-100``, attention 0 on padding)."""
    length = max(e["input_ids"].shape[0] for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = example["input_ids"].shape[0]
        batch["input_ids"][row, :n] = example["input_ids"]
        batch["attention_mask"][row, :n] = example.get("attention_mask", torch.ones(n, dtype=torch.long))
        batch["labels"][row, :n] = example["labels"]
    return batch


def batch_examples(
    examples: Sequence[dict[str, torch.Tensor]], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of ``batch_size`` examples, each collated.

    Raises:
        ValueError: ``batch_size < 1``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]
