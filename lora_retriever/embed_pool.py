"""Build adapter keys: ``python -m lora_retriever.embed_pool --pool CONFIG [--samples 20]``.

For every pool entry, read its training samples (``samples_path``), embed N of them (chosen with a fixed
seed) with the embedder's instruction prefix, and write the mean vector as ``<name>.npy`` next to a
``<name>.meta.json`` (model id, dim, instruction, sample ids, date), each atomically. Entries without an
``embedding_path`` get ``<config folder>/keys/<name>.npy``, recorded in the config through the one pool writer
(``lora_retriever.pool_config.pool_transaction``), which re-reads the config under its lock: adapters
registered while the keys were being built are kept.

With an image embedder (``--image_embedder vision-tower --image_embedder_path DIR``), an adapter whose
samples carry images also gets an image key: the mean over N samples with images of each sample's mean image
embedding, normalised, in ``<name>.image.npy`` (``image_embedding_path``) with its ``.meta.json`` (which also
records the fusion ``text_weight`` the pool is built for). Adapters without images get no image key.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.index import DEFAULT_TEXT_WEIGHT
from lora_retriever.pool import AdapterPool, key_meta_path
from lora_retriever.pool_config import (
    config_relative_path,
    default_key_path,
    pool_transaction,
    resolve_config_path,
)
from swift.utils import get_logger
from swift.utils.files import atomic_write_together

logger = get_logger(__name__)

__all__ = [
    "KeySample",
    "build_image_key",
    "build_key",
    "choose_samples",
    "embed_key",
    "embed_pool",
    "read_key_samples",
    "read_sample_texts",
    "write_key",
]

KEY_FIELDS = {"text": "embedding_path", "image": "image_embedding_path"}  # modality -> pool entry field


@dataclass(frozen=True)
class KeySample:
    """One sample an adapter key may be built from: its id, its text (``<image>`` tags removed; ``None``
    for an image-only sample) and its image files (resolved against the samples file's folder)."""

    id: str
    text: str | None
    images: tuple[Path, ...] = ()


def read_key_samples(path: str | Path) -> list[KeySample]:
    """The samples of a training/test file, with their texts and image files.

    Accepts a JSON list of ``{"input"|"query", "images"?, ...}``, ``{"data": [...]}``, or JSONL of the same
    or of chat ``messages`` (the last user turn is the input; string content or a list of text/image parts).
    Sample ids: the record's ``"id"``, else its index in a JSON list (``"3"``) or its JSONL line (``"line4"``).

    Raises:
        FileNotFoundError: no such file, or an image file a record names is missing (names both).
        ValueError: a record with neither an input text nor images, or malformed ``images`` (names its index
            or line).
    """
    from lora_retriever.embedders import retrieval_text

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    data: Any = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSONL
    if data is None:
        records: list[tuple[str, Any]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line{line_no}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from err
    else:
        items = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list or {{'data': [...]}}")
        records = [(str(i), item) for i, item in enumerate(items)]
    out = []
    for where, record in records:
        sample_text = retrieval_text(_input_text(record))
        images = _image_files(record, path, where)
        if sample_text is None and not images:
            raise ValueError(f"{path} record {where}: no 'input', 'query', user message or images to embed")
        sample_id = str(record.get("id", where)) if isinstance(record, dict) else where
        out.append(KeySample(sample_id, sample_text, images))
    return out


def read_sample_texts(path: str | Path) -> list[tuple[str, str]]:
    """``(sample id, input text)`` of the samples of a file that have text (see ``read_key_samples``)."""
    return [(sample.id, sample.text) for sample in read_key_samples(path) if sample.text is not None]


def _input_text(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for key in ("input", "query", "instruction"):
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key]
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
        if users and isinstance(users[-1], list):  # content parts: the text parts, in order
            return " ".join(
                p["text"] for p in users[-1] if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return None


def _image_files(record: Any, path: Path, where: str) -> tuple[Path, ...]:
    """The record's image files, resolved and checked by the training data reader's one rule."""
    from lora_retriever.training.data import _image_paths

    return tuple(_image_paths(record, f"record {where}", path)) if isinstance(record, dict) else ()


def choose_samples(samples: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """``n`` of ``samples`` (all if fewer) chosen with ``seed``: the one rule for text and image keys, so
    both keys of an adapter whose samples all have text and images average the same samples."""
    return random.Random(seed).sample(list(samples), min(n, len(samples)))


def build_key(
    embedder: Any, samples: Sequence[tuple[str, str]], n: int, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Mean (then normalised) embedding of ``n`` samples chosen with ``seed``; returns ``(key, sample ids)``."""
    if not samples:
        raise ValueError("no samples to build a key from")
    chosen = choose_samples(samples, n, seed)
    vectors = embedder.encode_queries([t for _, t in chosen])
    return _unit(vectors.mean(axis=0)), [i for i, _ in chosen]


def build_image_key(
    image_embedder: Any, samples: Sequence[tuple[str, Sequence[Path]]], n: int, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """An image key: ``n`` samples chosen with ``seed``; each sample's vector is the mean of its images'
    normalised embeddings, renormalised; the key is the mean of those, normalised.

    Args:
        image_embedder: an embedder with ``encode_images``.
        samples: ``(sample id, image files)`` pairs, each with at least one image.

    Returns:
        ``(key [dim], sample ids)``.

    Raises:
        ValueError: no samples, a sample without images, or an unreadable image file (named).
    """
    from lora_retriever.data import load_image
    from lora_retriever.embedders import l2_normalize

    if not samples:
        raise ValueError("no samples with images to build an image key from")
    chosen = choose_samples(samples, n, seed)
    bare = [sample_id for sample_id, files in chosen if not files]
    if bare:
        raise ValueError(
            f"samples {bare[:10]} have no images; an image key is built from samples with images"
        )
    flat = image_embedder.encode_images([load_image(f) for _, files in chosen for f in files])
    bounds = np.cumsum([0] + [len(files) for _, files in chosen])
    per_sample = l2_normalize(np.stack([flat[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))
    return _unit(per_sample.mean(axis=0)), [i for i, _ in chosen]


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def write_key(path: str | Path, key: np.ndarray, meta: dict[str, Any]) -> None:
    """Write the key ``path`` (``.npy``) and its ``.meta.json`` together, atomically, with normal permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_together(
        {path: lambda f: np.save(f, key), key_meta_path(path): json.dumps(meta, indent=2) + "\n"}
    )


def embed_key(
    key_path: str | Path,
    embedder: Any,
    samples: Sequence[tuple[str, str]] | Sequence[tuple[str, Sequence[Path]]],
    *,
    modality: str = "text",
    num_samples: int = 20,
    seed: int = 0,
    samples_path: str | Path | None = None,
    text_weight: float | None = None,
) -> list[str]:
    """Build one adapter's key from ``samples`` and write it with its metadata (``write_key``).

    Args:
        key_path: the ``.npy`` to write (its ``.meta.json`` goes beside it).
        embedder: the text embedder (``modality="text"``) or the image embedder (``"image"``).
        samples: ``(sample id, text)`` pairs for a text key (``build_key``), ``(sample id, image files)`` for
            an image key (``build_image_key``).
        num_samples / seed: how many samples go into the key, and which (``choose_samples``).
        samples_path: recorded in the metadata.
        text_weight: image keys only: the fusion weight ``a`` the pool is built for (default 0.7, the seed's),
            recorded in the metadata; the retriever uses it unless told otherwise.

    Returns:
        The ids of the samples averaged into the key.

    Raises:
        ValueError: unknown ``modality``, or no usable samples.
    """
    if modality == "text":
        key, ids = build_key(embedder, samples, num_samples, seed)
        extra: dict[str, Any] = {}
    elif modality == "image":
        key, ids = build_image_key(embedder, samples, num_samples, seed)
        extra = {"text_weight": DEFAULT_TEXT_WEIGHT if text_weight is None else float(text_weight)}
    else:
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    meta = {
        **embedder.meta("query").to_dict(),
        **extra,
        "modality": modality,
        "sample_ids": ids,
        "num_samples": len(ids),
        "seed": seed,
        "samples_path": None if samples_path is None else str(samples_path),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_key(key_path, key, meta)
    return ids


def embed_pool(
    config_path: str | Path,
    embedder: Any,
    *,
    image_embedder: Any | None = None,
    text_weight: float | None = None,
    num_samples: int = 20,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: bool = True,
    lock_timeout: float = 120.0,
) -> AdapterPool:
    """Build keys for the entries of one pool config (all, or ``names``); returns the updated pool.

    Every input is checked before the first key is embedded (names known, samples present and readable,
    image files present). Key paths chosen for entries that had none are written into the config under its
    lock, after a fresh read: entries added or changed meanwhile (e.g. by a training's ``--register_pool``)
    are kept.

    Args:
        config_path: the pool config.
        embedder: the text embedder (every entry gets a text key from its samples with text).
        image_embedder: an image embedder (e.g. ``vision-tower``): entries whose samples carry images also
            get an image key (``image_embedding_path``); ``None``: text keys only.
        text_weight: the fusion weight recorded with the image keys (default 0.7).
        num_samples / seed: samples per key, and which (the same rule for both keys).
        names: only these entries.

    Raises:
        PoolValidationError / ValueError: bad config, unknown ``names``, an entry without ``samples_path``,
            unreadable samples, an entry without any sample text (every such entry named at once).
        FileNotFoundError: an image file a sample names is missing (inside the problems list).
    """
    from tqdm.auto import tqdm

    config_path = resolve_config_path(config_path)
    pool = AdapterPool.from_configs(config_path, require_keys=False)
    unknown = sorted(set(names or ()) - set(pool.names))
    if unknown:
        raise ValueError(
            f"adapter names {unknown} (--only) are not in {config_path}; its adapters: {pool.names}"
        )
    todo = [e for e in pool if names is None or e.lora_name in names]
    problems, samples = [], {}
    for entry in todo:
        if entry.samples_path is None:
            problems.append(f"{entry.lora_name!r} has no samples_path (keys are built from its own samples)")
            continue
        try:
            samples[entry.lora_name] = read_key_samples(entry.samples_path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{entry.lora_name!r}: {err}")
            continue
        if not samples[entry.lora_name]:
            problems.append(f"{entry.lora_name!r}: samples file {entry.samples_path} holds no records")
        elif not any(sample.text for sample in samples[entry.lora_name]):
            problems.append(
                f"{entry.lora_name!r}: samples file {entry.samples_path} holds no sample with text (image-only); "
                "a text key needs some"
            )
    if problems:
        raise ValueError(
            f"cannot build the keys of {config_path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    new_paths: dict[str, dict[str, Path]] = {field: {} for field in KEY_FIELDS.values()}
    for entry in tqdm(todo, desc="adapter keys", disable=not progress):
        entry_samples = samples[entry.lora_name]
        keys = {"text": (embedder, [(s.id, s.text) for s in entry_samples if s.text])}
        with_images = [(s.id, s.images) for s in entry_samples if s.images]
        if image_embedder is not None and with_images:
            keys["image"] = (image_embedder, with_images)
        elif image_embedder is not None:
            logger.info("%r: its samples have no images, so it gets no image key", entry.lora_name)
        for modality, (key_embedder, key_samples) in keys.items():
            field = KEY_FIELDS[modality]
            key_path = getattr(entry, field) or default_key_path(config_path, entry.lora_name, modality)
            embed_key(
                key_path,
                key_embedder,
                key_samples,
                modality=modality,
                num_samples=num_samples,
                seed=seed,
                samples_path=entry.samples_path,
                text_weight=text_weight,
            )
            if getattr(entry, field) is None:
                new_paths[field][entry.lora_name] = key_path
    if any(new_paths.values()):
        _record_key_paths(config_path, new_paths, lock_timeout)
    return AdapterPool.from_configs(config_path)


def _record_key_paths(config_path: Path, key_paths: dict[str, dict[str, Path]], lock_timeout: float) -> None:
    """Set ``field`` (``embedding_path`` / ``image_embedding_path``) of the named entries that still have
    none, in the config as it is now (``key_paths``: field -> adapter name -> key file)."""
    pending = {(field, name): path for field, paths in key_paths.items() for name, path in paths.items()}
    with pool_transaction(config_path, lock_timeout=lock_timeout) as entries:
        for entry in entries:
            for field in KEY_FIELDS.values():
                key_path = pending.pop((field, entry.get("lora_name")), None)
                if key_path is None:
                    continue
                if entry.get(field):
                    logger.warning(
                        "%r got %s %s while its key was being built; keeping it (the new key is at %s)",
                        entry["lora_name"],
                        field,
                        entry[field],
                        key_path,
                    )
                else:
                    entry[field] = config_relative_path(key_path, config_path.parent)
    for (_, name), key_path in pending.items():
        logger.warning(
            "%r left %s while its key was being built; its key %s is unused", name, config_path, key_path
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.embed_pool``: the ``lora-retriever-embed-pool`` command."""
    from lora_retriever.cli.embed_pool import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
