"""Build adapter keys: ``python -m lora_retriever.embed_pool --pool CONFIG [--samples 20]``.

For every pool entry, read its training samples (``samples_path``), embed N of them (chosen with a fixed
seed) with the embedder's instruction prefix, and write the mean vector as ``<name>.npy`` next to a
``<name>.meta.json`` (model id, dim, instruction, sample ids, date), each atomically. Entries without an
``embedding_path`` get ``<config folder>/keys/<name>.npy``, recorded in the config through the one pool writer
(``lora_retriever.pool_config.pool_transaction``), which re-reads the config under its lock: adapters
registered while the keys were being built are kept.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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

__all__ = ["build_key", "embed_key", "embed_pool", "read_sample_texts", "write_key"]


def read_sample_texts(path: str | Path) -> list[tuple[str, str]]:
    """``(sample id, input text)`` pairs from a training/test file.

    Accepts a JSON list of ``{"input"|"query", ...}``, ``{"data": [...]}``, or JSONL of the same or of chat
    ``messages`` (the last user turn is the input).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a record without an input (names its index or line).
    """
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
        text_in = _input_text(record)
        if text_in is None:
            raise ValueError(f"{path} record {where}: no 'input', 'query' or user message to embed")
        sample_id = str(record.get("id", where)) if isinstance(record, dict) else where
        out.append((sample_id, text_in))
    return out


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
    return None


def build_key(
    embedder: Any, samples: Sequence[tuple[str, str]], n: int, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Mean (then normalised) embedding of ``n`` samples chosen with ``seed``; returns ``(key, sample ids)``."""
    if not samples:
        raise ValueError("no samples to build a key from")
    chosen = random.Random(seed).sample(list(samples), min(n, len(samples)))
    vectors = embedder.encode_queries([t for _, t in chosen])
    key = vectors.mean(axis=0)
    key = key / max(float(np.linalg.norm(key)), 1e-12)
    return key.astype(np.float32), [i for i, _ in chosen]


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
    samples: Sequence[tuple[str, str]],
    *,
    num_samples: int = 20,
    seed: int = 0,
    samples_path: str | Path | None = None,
) -> list[str]:
    """Build one adapter's key from ``samples`` (``build_key``) and write it with its metadata (``write_key``).

    Returns:
        The ids of the samples averaged into the key.
    """
    key, ids = build_key(embedder, samples, num_samples, seed)
    meta = {
        **embedder.meta("query").to_dict(),
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
    num_samples: int = 20,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: bool = True,
    lock_timeout: float = 120.0,
) -> AdapterPool:
    """Build keys for the entries of one pool config (all, or ``names``); returns the updated pool.

    Every input is checked before the first key is embedded (names known, samples present and readable).
    Key paths chosen for entries that had none are written into the config under its lock, after a fresh read:
    entries added or changed meanwhile (e.g. by a training's ``--register_pool``) are kept.

    Raises:
        PoolValidationError / ValueError: bad config, unknown ``names``, an entry without ``samples_path``,
            unreadable samples (every such entry named at once).
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
            samples[entry.lora_name] = read_sample_texts(entry.samples_path)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{entry.lora_name!r}: {err}")
            continue
        if not samples[entry.lora_name]:
            problems.append(f"{entry.lora_name!r}: samples file {entry.samples_path} holds no records")
    if problems:
        raise ValueError(
            f"cannot build the keys of {config_path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    new_paths: dict[str, Path] = {}
    for entry in tqdm(todo, desc="adapter keys", disable=not progress):
        key_path = entry.embedding_path or default_key_path(config_path, entry.lora_name)
        embed_key(
            key_path,
            embedder,
            samples[entry.lora_name],
            num_samples=num_samples,
            seed=seed,
            samples_path=entry.samples_path,
        )
        if entry.embedding_path is None:
            new_paths[entry.lora_name] = key_path
    if new_paths:
        _record_key_paths(config_path, new_paths, lock_timeout)
    return AdapterPool.from_configs(config_path)


def _record_key_paths(config_path: Path, key_paths: dict[str, Path], lock_timeout: float) -> None:
    """Set ``embedding_path`` of the named entries that still have none, in the config as it is now."""
    pending = dict(key_paths)
    with pool_transaction(config_path, lock_timeout=lock_timeout) as entries:
        for entry in entries:
            key_path = pending.pop(entry.get("lora_name"), None)
            if key_path is None:
                continue
            if entry.get("embedding_path"):
                logger.warning(
                    "%r got embedding_path %s while its key was being built; keeping it (the new key is at %s)",
                    entry["lora_name"],
                    entry["embedding_path"],
                    key_path,
                )
            else:
                entry["embedding_path"] = config_relative_path(key_path, config_path.parent)
    for name, key_path in pending.items():
        logger.warning(
            "%r left %s while its key was being built; its key %s is unused", name, config_path, key_path
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.embed_pool``: the ``lora-retriever-embed-pool`` command."""
    from lora_retriever.cli.embed_pool import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
