"""Test-set records: JSONL in single-turn or chat form, strictly parsed.

Single turn: ``{"id", "query", "response", "images": [...], "task"}``.
Chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "images": [...]}``; the
last user turn is the query and a final assistant turn the reference; earlier turns are kept as history.
Image paths resolve against the JSONL file's folder; ``<image>`` tags mark where images go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Sample", "read_samples"]


@dataclass
class Sample:
    """One test input with its reference and (when known) its task."""

    id: str
    query: str
    response: str | None = None
    images: list[Path] = field(default_factory=list)
    task: str | None = None
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def load_images(self):
        """The images as RGB PIL images."""
        from PIL import Image

        return [Image.open(p).convert("RGB") for p in self.images]


def read_samples(path: str | Path, *, limit: int | None = None, check_images: bool = True) -> list[Sample]:
    """Read a JSONL test set.

    Args:
        path: the JSONL file.
        limit: keep only the first ``limit`` records (``--num_samples``).
        check_images: fail early when an image file is missing.

    Raises:
        FileNotFoundError: the file, or an image it names, doesn't exist.
        ValueError: a line that isn't a JSON object, or a record without a query (names the line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"test data {str(path)!r} does not exist")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and len(samples) >= limit:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            sample = _to_sample(record, path, line_no)
            if check_images:
                for image in sample.images:
                    if not image.is_file():
                        raise FileNotFoundError(f"{path}:{line_no}: image file {image} does not exist")
            samples.append(sample)
    return samples


def _to_sample(record: dict[str, Any], path: Path, line_no: int) -> Sample:
    images = record.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{path}:{line_no}: 'images' must be a list of file paths")
    image_paths = [
        Path(i).expanduser() if Path(i).expanduser().is_absolute() else path.parent / i for i in images
    ]
    known = {"id", "query", "response", "images", "task", "messages", "system"}
    extra = {k: v for k, v in record.items() if k not in known}
    sample_id = str(record.get("id", f"line{line_no}"))
    if "messages" in record:
        return _chat_sample(record, path, line_no, sample_id, image_paths, extra)
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"{path}:{line_no}: record has no 'query' (or 'messages'); each line needs one")
    response = record.get("response")
    return Sample(
        sample_id,
        query,
        None if response is None else str(response),
        image_paths,
        record.get("task"),
        record.get("system"),
        [],
        extra,
    )


def _chat_sample(record, path, line_no, sample_id, image_paths, extra) -> Sample:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{path}:{line_no}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    system = None
    turns: list[tuple[str, str]] = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{path}:{line_no}: message {j} needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role in ("user", "assistant"):
            turns.append((role, content))
        else:
            raise ValueError(
                f"{path}:{line_no}: message {j} has unknown role {role!r} (system/user/assistant)"
            )
    response = None
    if turns and turns[-1][0] == "assistant":
        response = turns.pop()[1]
    if not turns or turns[-1][0] != "user":
        raise ValueError(
            f"{path}:{line_no}: the conversation must end with a user turn (plus an optional answer)"
        )
    query = turns.pop()[1]
    history = []
    for (r1, c1), (r2, c2) in zip(turns[::2], turns[1::2]):
        if (r1, r2) != ("user", "assistant"):
            raise ValueError(f"{path}:{line_no}: history turns must alternate user/assistant")
        history.append((c1, c2))
    return Sample(sample_id, query, response, image_paths, record.get("task"), system, history, extra)
