"""Build adapter keys: ``python -m lora_retriever.embed_pool --pool CONFIG [--samples 20]``.

For every pool entry, read its training samples (``samples_path``), embed N of them (chosen with a fixed
seed) with the embedder's instruction prefix, and write the mean vector as ``<name>.npy`` next to a
``<name>.meta.json`` (model id, dim, instruction, sample ids, date). Entries without an ``embedding_path``
get ``<config folder>/keys/<name>.npy`` and the config is updated (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.pool import AdapterEntry, AdapterPool, key_meta_path
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["build_key", "embed_pool", "read_sample_texts"]


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


def write_key(entry: AdapterEntry, key: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``<name>.npy`` and ``<name>.meta.json`` (each via a temp file + rename)."""
    path = Path(entry.embedding_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.save(f, key))
    _atomic_write(key_meta_path(path), lambda f: f.write(json.dumps(meta, indent=2).encode()))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embed_pool(
    config_path: str | Path,
    embedder: Any,
    *,
    num_samples: int = 20,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> AdapterPool:
    """Build keys for the entries of one pool config (all, or ``names``); returns the updated pool.

    Raises:
        PoolValidationError / ValueError: bad config, an entry without ``samples_path``, unreadable samples.
    """
    from tqdm.auto import tqdm

    config_path = Path(config_path).resolve()
    pool = AdapterPool.from_configs(config_path, require_keys=False)
    todo = [e for e in pool if names is None or e.lora_name in names]
    missing = [e.lora_name for e in todo if e.samples_path is None]
    if missing:
        raise ValueError(
            f"entries {missing} have no samples_path: keys are built from the adapter's own samples"
        )
    meta_base = embedder.meta("query").to_dict()
    changed = False
    for entry in tqdm(todo, desc="adapter keys", disable=not progress):
        key, ids = build_key(embedder, read_sample_texts(entry.samples_path), num_samples, seed)
        if entry.embedding_path is None:
            entry.embedding_path = config_path.parent / "keys" / f"{entry.lora_name}.npy"
            changed = True
        write_key(
            entry,
            key,
            {
                **meta_base,
                "sample_ids": ids,
                "num_samples": len(ids),
                "seed": seed,
                "samples_path": str(entry.samples_path),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
    if changed:
        _atomic_write(config_path, lambda f: f.write(_config_json(pool, config_path).encode()))
    return AdapterPool.from_configs(config_path)


def _config_json(pool: AdapterPool, config_path: Path) -> str:
    return (
        json.dumps([e.to_dict(relative_to=config_path.parent) for e in pool], indent=2, ensure_ascii=False)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", required=True, action="append", help="pool config JSON (repeatable)")
    parser.add_argument("--samples", type=int, default=20, help="samples embedded per adapter (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the samples")
    parser.add_argument("--only", nargs="*", default=None, help="only these adapter names")
    parser.add_argument("--embedder", default="sentence-transformers", help="embedder backend")
    parser.add_argument("--embedder_path", default=None, help="local embedder dir (default: packaged MiniLM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    from lora_retriever.embedders import EmbedderConfig, get_embedder

    embedder = get_embedder(
        EmbedderConfig(backend=args.embedder, model_path=args.embedder_path, device=args.device)
    )
    for config in args.pool:
        pool = embed_pool(
            config,
            embedder,
            num_samples=args.samples,
            seed=args.seed,
            names=args.only,
            progress=not args.quiet,
        )
        print(f"{config}: {len(pool)} adapter keys ({embedder.model_id}, dim {embedder.dim})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
