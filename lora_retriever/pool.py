"""Adapter pools: JSON configs listing LoRA adapters, their retrieval keys and metadata.

A pool config is a JSON list of entries::

    {"lora_name": "capitals", "lora_path": "adapters/capitals", "embedding_path": "keys/capitals.npy",
     "description": "country -> capital", "category": "geography", "samples_path": "data/capitals.jsonl"}

Relative paths resolve against the config file's folder; unknown fields are kept. ``AdapterPool`` validates
every entry up front and reports all problems at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.embedders.meta import EmbeddingMeta, check_compatible
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["AdapterEntry", "AdapterPool", "PoolValidationError", "key_meta_path"]

REQUIRED_FIELDS = ("lora_name", "lora_path")
PATH_FIELDS = ("lora_path", "embedding_path", "samples_path")
KNOWN_FIELDS = (
    "lora_name",
    "lora_path",
    "embedding_path",
    "description",
    "domain",
    "category",
    "base_model",
    "samples_path",
)


class PoolValidationError(ValueError):
    """One or more pool entries are unusable; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"adapter pool has {len(self.problems)} problem(s):\n{lines}")


def key_meta_path(embedding_path: str | Path) -> Path:
    """``keys/capitals.npy`` -> ``keys/capitals.meta.json`` (model id, dim, samples, instruction, date)."""
    path = Path(embedding_path)
    return path.with_name(path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name).with_suffix(
        ".meta.json"
    )


@dataclass
class AdapterEntry:
    """One adapter of a pool. Paths are absolute; ``extra`` holds every field we don't interpret."""

    lora_name: str
    lora_path: Path
    embedding_path: Path | None = None
    description: str = ""
    domain: str | None = None
    category: str | None = None
    base_model: str | None = None
    samples_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the config file it came from

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path, source: Path | None = None) -> AdapterEntry:
        paths = {k: _resolve(data[k], base_dir) if data.get(k) else None for k in PATH_FIELDS}
        return cls(
            lora_name=str(data["lora_name"]),
            lora_path=paths["lora_path"],
            embedding_path=paths["embedding_path"],
            description=str(data.get("description", "")),
            domain=data.get("domain"),
            category=data.get("category"),
            base_model=data.get("base_model"),
            samples_path=paths["samples_path"],
            extra={k: v for k, v in data.items() if k not in KNOWN_FIELDS},
            source=source,
        )

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The JSON form; paths relative to ``relative_to`` when given (as a config file stores them)."""

        def show(path: Path | None) -> str | None:
            if path is None:
                return None
            return os.path.relpath(path, relative_to) if relative_to is not None else str(path)

        data: dict[str, Any] = {"lora_name": self.lora_name, "lora_path": show(self.lora_path)}
        if self.embedding_path is not None:
            data["embedding_path"] = show(self.embedding_path)
        data["description"] = self.description
        for name in ("domain", "category", "base_model"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.samples_path is not None:
            data["samples_path"] = show(self.samples_path)
        data.update(self.extra)
        return data

    def get(self, field_name: str, default: Any = None) -> Any:
        """A known attribute or an extra field, by name."""
        if field_name in KNOWN_FIELDS:
            value = getattr(self, field_name)
            return default if value is None else value
        return self.extra.get(field_name, default)


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else (base_dir / path).resolve()


class AdapterPool:
    """An ordered, validated collection of adapters with retrieval keys.

    Args:
        entries: the adapters, in order (names must be unique).
    """

    def __init__(self, entries: Sequence[AdapterEntry]):
        self.entries = list(entries)
        self._by_name = {e.lora_name: e for e in self.entries}
        self._keys: np.ndarray | None = None
        self._key_meta: EmbeddingMeta | None = None

    # -- building -----------------------------------------------------------------------------------------

    @classmethod
    def from_configs(
        cls,
        config_paths: str | Path | Sequence[str | Path],
        *,
        require_keys: bool = True,
        defaults: Sequence[dict[str, Any]] | None = None,
    ) -> AdapterPool:
        """Load one or more pool config files, then validate everything at once.

        Args:
            config_paths: one path or a list of paths to JSON pool configs.
            require_keys: also require each entry's ``embedding_path`` key file (False while building keys).
            defaults: per config file, fields to set on its entries when they lack them (e.g.
                ``{"lora_type": "app"}`` for ``--app_config``).

        Raises:
            PoolValidationError: listing every problem found (unreadable config, missing fields, missing
                adapter dirs / key files, duplicate names, key dimensions that differ, ...).
        """
        paths = [config_paths] if isinstance(config_paths, str | Path) else list(config_paths)
        if not paths:
            raise ValueError("no pool config given; pass at least one JSON pool config (--pool CONFIG).")
        problems: list[str] = []
        entries: list[AdapterEntry] = []
        for i, raw_path in enumerate(paths):
            path = Path(raw_path).expanduser().resolve()
            extra_defaults = (defaults[i] if defaults and i < len(defaults) else None) or {}
            entries.extend(_read_config(path, problems, extra_defaults))
        pool = cls(entries)
        problems.extend(pool.problems(require_keys=require_keys))
        if problems:
            raise PoolValidationError(problems)
        return pool

    def problems(self, *, require_keys: bool = True) -> list[str]:
        """Every problem with the entries (empty when the pool is usable)."""
        problems = []
        seen: dict[str, AdapterEntry] = {}
        dims: dict[int, list[str]] = {}
        for entry in self.entries:
            where = f"{entry.lora_name!r}" + (f" ({entry.source})" if entry.source else "")
            if entry.lora_name in seen:
                problems.append(
                    f"duplicate lora_name {where}: also defined in {seen[entry.lora_name].source}"
                )
            seen[entry.lora_name] = entry
            if not entry.lora_path.is_dir():
                problems.append(f"{where}: adapter directory {entry.lora_path} does not exist")
            elif not (entry.lora_path / "adapter_config.json").is_file():
                problems.append(f"{where}: {entry.lora_path} has no adapter_config.json")
            if entry.embedding_path is None:
                if require_keys:
                    problems.append(
                        f"{where}: no embedding_path (build keys with python -m lora_retriever.embed_pool)"
                    )
                continue
            if not entry.embedding_path.is_file():
                if require_keys:
                    problems.append(f"{where}: key file {entry.embedding_path} does not exist")
                continue
            try:
                key = load_key(entry.embedding_path)
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            dims.setdefault(key.shape[0], []).append(entry.lora_name)
        if len(dims) > 1:
            summary = "; ".join(f"dim {d}: {names}" for d, names in sorted(dims.items()))
            problems.append(
                f"key dimensions differ within the pool ({summary}); rebuild keys with one embedder"
            )
        return problems

    # -- access -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[AdapterEntry]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> AdapterEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no adapter named {name!r} in the pool; known: {self.names[:20]}") from None

    @property
    def names(self) -> list[str]:
        return [e.lora_name for e in self.entries]

    def filter(self, field_name: str, value: str | None) -> AdapterPool:
        """Entries whose ``field_name`` equals ``value`` (``None`` or ``"all"`` keeps everything).

        Raises:
            ValueError: nothing matches (lists the values present).
        """
        if value in (None, "all"):
            return self
        kept = [e for e in self.entries if str(e.get(field_name)) == value]
        if not kept:
            present = sorted({str(e.get(field_name)) for e in self.entries})
            raise ValueError(f"no adapter has {field_name}={value!r}; values in the pool: {present}")
        return AdapterPool(kept)

    def keys(self) -> np.ndarray:
        """``[N, dim]`` float32 L2-normalised keys, in pool order (loaded once)."""
        if self._keys is None:
            missing = [
                e.lora_name
                for e in self.entries
                if e.embedding_path is None or not e.embedding_path.is_file()
            ]
            if missing:
                raise FileNotFoundError(
                    f"no key file for {missing}; build keys with python -m lora_retriever.embed_pool"
                )
            keys = np.stack([load_key(e.embedding_path) for e in self.entries]).astype(np.float32)
            norms = np.linalg.norm(keys, axis=1, keepdims=True)
            self._keys = keys / np.maximum(norms, 1e-12)
        return self._keys

    def key_meta(self) -> EmbeddingMeta | None:
        """The identity of the embedder that made the pool's keys (from their ``.meta.json`` files);
        ``None`` for legacy keys without metadata (then only the dimension can be checked).

        Raises:
            ValueError: two keys were made by incompatible embedders (model, dim, instruction or adapter).
        """
        if self._key_meta is None:
            metas = {}
            for e in self.entries:
                meta_path = key_meta_path(e.embedding_path) if e.embedding_path else None
                if meta_path is not None and meta_path.is_file():
                    metas[e.lora_name] = EmbeddingMeta.from_dict(json.loads(meta_path.read_text()))
            if not metas:
                logger.warning("pool keys have no .meta.json: the embedder that made them can't be checked")
                return None
            (first_name, first), *rest = metas.items()
            for name, meta in rest:
                check_compatible(first, meta, f"keys of {first_name!r} vs {name!r}")
            self._key_meta = first
        return self._key_meta

    def save(self, config_path: str | Path) -> None:
        """Write the pool as a config file (paths relative to its folder)."""
        path = Path(config_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = [e.to_dict(relative_to=path.parent.resolve()) for e in self.entries]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def load_key(path: Path) -> np.ndarray:
    """Read a key ``.npy``: ``[dim]`` or ``[1, dim]`` floats, finite and non-zero.

    Raises:
        ValueError: the file isn't a single finite, non-zero vector.
    """
    try:
        key = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"key file {path} is not a readable .npy array ({err})") from err
    if key.ndim == 2 and key.shape[0] == 1:
        key = key[0]
    if key.ndim != 1 or not np.issubdtype(key.dtype, np.floating):
        raise ValueError(f"key file {path} must hold one float vector [dim], got {key.dtype} {key.shape}")
    if not np.isfinite(key).all() or not np.any(key):
        raise ValueError(f"key file {path} holds NaN/inf or is all zeros")
    return key.astype(np.float32)


def _read_config(path: Path, problems: list[str], defaults: dict[str, Any]) -> list[AdapterEntry]:
    if not path.is_file():
        problems.append(f"pool config {path} does not exist")
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        problems.append(f"pool config {path} is not valid JSON: {err}")
        return []
    if not isinstance(data, list):
        problems.append(
            f"pool config {path} must be a JSON list of adapter entries, got {type(data).__name__}"
        )
        return []
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            problems.append(f"{path} entry {i}: expected an object, got {type(item).__name__}")
            continue
        missing = [f for f in REQUIRED_FIELDS if not item.get(f)]
        if missing:
            problems.append(f"{path} entry {i}: missing field(s) {missing}")
            continue
        entries.append(AdapterEntry.from_dict({**defaults, **item}, path.parent, source=path))
    return entries
