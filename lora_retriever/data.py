"""Test-set records: JSONL in single-turn or chat form, strictly parsed.

Single turn: ``{"id", "query", "response", "images": [...], "task"}``.
Chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...], "images": [...]}``; the
last user turn is the query and a final assistant turn the reference; earlier turns are kept as history.
``content`` is a string or a list of parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``; an image
part becomes an ``<image>`` tag). Image paths resolve against the JSONL file's folder; ``<image>`` tags mark
where images go.

Field types are checked as the file is read (``task`` a string or null, ``images`` a list of paths, ...), so
a bad record fails before any model is loaded, with the file, line and field in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swift.llm.template import IMAGE_TAG

__all__ = ["Sample", "load_image", "read_samples"]


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
        """The images as RGB PIL images (``load_image``: an unreadable file is an error naming it)."""
        return [load_image(p, where=f"sample {self.id}") for p in self.images]


def load_image(path: str | Path, where: str | None = None):
    """One image file as an RGB PIL image, decoded now (not lazily).

    Args:
        path: the image file.
        where: what names it (e.g. ``"sample 7"``), for the message.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a decodable image (truncated, corrupt, not an image), naming it and the fix.
    """
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(
            f"{prefix}image file {path} is unreadable ({err}); replace it with a valid image (PNG, JPEG, ...) "
            "or remove it from the data"
        ) from err


def read_samples(path: str | Path, *, limit: int | None = None, check_images: bool = True) -> list[Sample]:
    """Read a JSONL test set.

    Args:
        path: the JSONL file.
        limit: keep only the first ``limit`` records (``--num_samples``).
        check_images: fail early when an image file is missing.

    Raises:
        FileNotFoundError: the file, or an image it names, doesn't exist.
        ValueError: a line that isn't a JSON object, a record without a query, a field of the wrong type
            (names the file, the line number and the field), or a file that isn't UTF-8 text.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"test data {str(path)!r} does not exist")
    samples: list[Sample] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as err:
        raise ValueError(
            f"test data {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); pass a JSONL file"
        ) from err
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit is not None and len(samples) >= limit:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        sample = _to_sample(record, path, line_no)
        tags = sample.query.count(IMAGE_TAG)
        if tags and tags != len(sample.images):
            raise ValueError(
                f"{path}:{line_no}: the query has {tags} {IMAGE_TAG} tag(s) but the record gives "
                f"{len(sample.images)} image(s); use one {IMAGE_TAG} tag per image (or no tags to put all "
                "images before the text)"
            )
        if check_images:
            for image in sample.images:
                if not image.is_file():
                    raise FileNotFoundError(f"{path}:{line_no}: image file {image} does not exist")
        samples.append(sample)
    return samples


def _field(record: dict[str, Any], name: str, types: tuple[type, ...], where: str, expected: str) -> Any:
    """``record[name]`` if it is ``None`` or of one of ``types`` (not a bool); else a ValueError naming it."""
    value = record.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise ValueError(
            f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {json.dumps(value)[:60]}"
        )
    return value


def _to_sample(record: dict[str, Any], path: Path, line_no: int) -> Sample:
    where = f"{path}:{line_no}"
    images = _field(record, "images", (list, str), where, "a list of image file paths") or []
    if isinstance(images, str):
        images = [images]
    bad = [i for i in images if not isinstance(i, str) or not i]
    if bad:
        raise ValueError(
            f"{where}: field 'images' must be a list of image file paths, got an item {bad[0]!r}"
        )
    _field(record, "task", (str,), where, "a string or null")
    _field(record, "system", (str,), where, "a string or null")
    _field(record, "id", (str, int), where, "a string or a number")
    _field(record, "response", (str, int, float), where, "a string (or a number), or null")
    image_paths = [
        Path(i).expanduser() if Path(i).expanduser().is_absolute() else path.parent / i for i in images
    ]
    known = {"id", "query", "response", "images", "task", "messages", "system"}
    extra = {k: v for k, v in record.items() if k not in known}
    sample_id = f"line{line_no}" if record.get("id") is None else str(record["id"])
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
        role, content = message["role"], _content_text(message["content"], f"{path}:{line_no}: message {j}")
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


def _content_text(content: Any, where: str) -> str:
    """A message's ``content``: a string, or a list of text / image parts (an image part -> ``<image>``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where}: field 'content' must be a string or a list of parts, got {type(content).__name__}"
        )
    pieces = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_TAG)
        else:
            raise ValueError(
                f"{where}: content part {k} must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}, "
                f"got {json.dumps(part)[:60]}"
            )
    return "".join(pieces)
