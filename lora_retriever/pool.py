"""Adapter pools: JSON configs listing LoRA adapters, their retrieval keys and metadata.

A pool config is a JSON list of entries::

    {"lora_name": "capitals", "lora_path": "adapters/capitals", "embedding_path": "keys/capitals.npy",
     "description": "country -> capital", "category": "geography", "samples_path": "data/capitals.jsonl"}

Relative paths resolve against the config file's folder; unknown fields are kept. An optional
``"image_embedding_path"`` names the adapter's image key (mean image embedding of its key samples, for
image-aware retrieval, ``lora_retriever.retriever``); adapters whose samples have no images have none.
``AdapterPool.from_configs`` validates every entry up front (adapter folder with config and weights, key files
readable and of one dimension and embedder, optionally the base model) and reports all problems at once;
``AdapterPool.validate`` runs the same checks on a pool in memory. Every write to a config goes through
``lora_retriever.pool_config.pool_transaction`` (locked, atomic; ``AdapterPool.save`` uses it too), and
``lora_retriever.pool_config.check_pool_writable`` checks up front that a config can be written.
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
from lora_retriever.pool_config import (
    PATH_FIELDS,
    config_relative_path,
    load_json_list,
    pool_transaction,
    resolve_config_path,
)
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["AdapterEntry", "AdapterPool", "PoolValidationError", "key_meta_path", "load_key", "load_key_meta"]

REQUIRED_FIELDS = ("lora_name", "lora_path")
KEY_MODALITIES = ("text", "image")
# modality -> (AdapterEntry attribute, what the key is called in messages)
_KEY_FIELDS = {"text": ("embedding_path", "key"), "image": ("image_embedding_path", "image key")}
KNOWN_FIELDS = (
    "lora_name",
    "lora_path",
    "embedding_path",
    "image_embedding_path",
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
    """``keys/capitals.npy`` -> ``keys/capitals.meta.json`` (model id, dim, samples, instruction, date);
    ``keys/capitals.image.npy`` -> ``keys/capitals.image.meta.json`` (only the final ``.npy`` is replaced)."""
    path = Path(embedding_path)
    if path.name.endswith(".npy"):
        return path.with_name(path.name[: -len(".npy")] + ".meta.json")
    return path.with_suffix(".meta.json")


@dataclass
class AdapterEntry:
    """One adapter of a pool. Paths are absolute; ``extra`` holds every field we don't interpret."""

    lora_name: str
    lora_path: Path
    embedding_path: Path | None = None
    image_embedding_path: Path | None = None
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
            image_embedding_path=paths["image_embedding_path"],
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
            return config_relative_path(path, relative_to) if relative_to is not None else str(path)

        data: dict[str, Any] = {"lora_name": self.lora_name, "lora_path": show(self.lora_path)}
        if self.embedding_path is not None:
            data["embedding_path"] = show(self.embedding_path)
        if self.image_embedding_path is not None:
            data["image_embedding_path"] = show(self.image_embedding_path)
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
        self._keys: dict[str, np.ndarray] = {}
        self._key_meta: dict[str, EmbeddingMeta | None] = {}

    # -- building -----------------------------------------------------------------------------------------

    @classmethod
    def from_configs(
        cls,
        config_paths: str | Path | Sequence[str | Path],
        *,
        require_keys: bool = True,
        defaults: Sequence[dict[str, Any]] | None = None,
        base_model: str | None = None,
        strict_base_model: bool = False,
    ) -> AdapterPool:
        """Load one or more pool config files, then validate everything at once (see ``validate``).

        Args:
            config_paths: one path or a list of paths to JSON pool configs.
            require_keys: also require each entry's ``embedding_path`` key file (False while building keys).
            defaults: per config file, fields to set on its entries when they lack them (e.g.
                ``{"lora_type": "app"}`` for ``--app_config``).
            base_model / strict_base_model: the model the adapters will be loaded into (see ``validate``).

        Raises:
            PoolValidationError: listing every problem found (unreadable config, missing fields, missing
                adapter dirs / weights / key files, duplicate names, key dimensions that differ, ...).
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
        found, warnings = pool._audit(require_keys, base_model, strict_base_model)
        if problems or found:
            raise PoolValidationError(problems + found)
        for warning in warnings:
            logger.warning(warning)
        return pool

    def validate(
        self, *, require_keys: bool = True, base_model: str | None = None, strict_base_model: bool = False
    ) -> list[str]:
        """Check every entry before any model is loaded; report every problem at once.

        Checked: unique names; the adapter folder exists, is a folder, and holds ``adapter_config.json``
        (valid JSON) and a weights file (``adapter_model.safetensors`` or legacy ``adapter_model.bin``); key
        files load as one finite vector, agree with their ``.meta.json`` (valid JSON, same ``dim``), share
        one dimension and one embedder; and, given ``base_model``, that each adapter was trained on it (the
        entry's ``base_model`` field, else its ``base_model_name_or_path``; names compared as
        ``Swift.from_pretrained`` compares them).

        Args:
            require_keys: every entry needs its key file (False while keys are being built).
            base_model: name or path of the model the adapters will be loaded into; None skips that check.
            strict_base_model: a base-model mismatch is a problem; by default it is a warning, as when
                ``Swift.from_pretrained`` loads such an adapter.

        Returns:
            The warnings (also logged): base-model mismatches when not strict.

        Raises:
            PoolValidationError: listing every problem.
        """
        problems, warnings = self._audit(require_keys, base_model, strict_base_model)
        if problems:
            raise PoolValidationError(problems)
        for warning in warnings:
            logger.warning(warning)
        return warnings

    def problems(self, *, require_keys: bool = True) -> list[str]:
        """Every problem with the entries (empty when the pool is usable); see ``validate``."""
        return self._audit(require_keys, None, False)[0]

    def _audit(
        self, require_keys: bool, base_model: str | None, strict_base_model: bool
    ) -> tuple[list[str], list[str]]:
        problems: list[str] = []
        warnings: list[str] = []
        seen: dict[str, AdapterEntry] = {}
        for entry in self.entries:
            where = _where(entry)
            if entry.lora_name in seen:
                problems.append(
                    f"duplicate lora_name {where}: also defined in {seen[entry.lora_name].source}"
                )
            seen[entry.lora_name] = entry
            adapter_problems, trained_on = _check_adapter_dir(entry.lora_path)
            problems.extend(f"{where}: {problem}" for problem in adapter_problems)
            mismatch = _base_model_mismatch(entry.base_model or trained_on, base_model)
            if mismatch:
                (problems if strict_base_model else warnings).append(f"{where}: {mismatch}")
        for modality in KEY_MODALITIES:
            problems.extend(self._audit_keys(modality, require_keys))
        return problems, warnings

    def _audit_keys(self, modality: str, require_keys: bool) -> list[str]:
        """Problems with the text or image key files: readable, one dimension, one embedder (and, for image
        keys, one fusion weight). A missing text key is a problem with ``require_keys``; a missing image
        key only if the entry names a file that isn't there."""
        attr, what = _KEY_FIELDS[modality]
        problems: list[str] = []
        dims: dict[int, list[str]] = {}
        metas: dict[str, EmbeddingMeta] = {}
        for entry in self.entries:
            where, path = _where(entry), getattr(entry, attr)
            if path is None:
                if require_keys and modality == "text":
                    problems.append(
                        f"{where}: no embedding_path (build keys with python -m lora_retriever.embed_pool)"
                    )
                continue
            if not path.is_file():
                if require_keys:
                    problems.append(f"{where}: {what} file {path} does not exist")
                continue
            try:
                key = load_key(path)
                meta = load_key_meta(path, key.shape[0])
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            dims.setdefault(key.shape[0], []).append(entry.lora_name)
            if meta is not None:
                metas[entry.lora_name] = meta
        if len(dims) > 1:
            summary = "; ".join(f"dim {d}: {names}" for d, names in sorted(dims.items()))
            problems.append(
                f"{what} dimensions differ within the pool ({summary}); rebuild them with one embedder"
            )
        elif len(metas) > 1:
            try:
                _common_meta(metas, what)
            except ValueError as err:
                problems.append(str(err))
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
        """``[N, dim]`` float32 L2-normalised text keys, in pool order (loaded once).

        Raises:
            FileNotFoundError: an entry has no key file (build keys with ``lora_retriever.embed_pool``).
        """
        if "text" not in self._keys:
            missing = [
                e.lora_name
                for e in self.entries
                if e.embedding_path is None or not e.embedding_path.is_file()
            ]
            if missing:
                raise FileNotFoundError(
                    f"no key file for {missing}; build keys with python -m lora_retriever.embed_pool"
                )
            self._keys["text"] = _normalised_rows([load_key(e.embedding_path) for e in self.entries])
        return self._keys["text"]

    def image_keys(self) -> np.ndarray | None:
        """``[N, dim_image]`` float32 image keys in pool order, L2-normalised; a zero row for an adapter
        without an image key (see ``image_key_mask``). ``None`` when no adapter has one (a text-only pool).

        Raises:
            FileNotFoundError: an entry names an image key file that does not exist.
            ValueError: image keys of different dimensions (``validate`` reports it up front).
        """
        if "image" not in self._keys:
            mask = self.image_key_mask()
            if not mask.any():
                return None
            missing = [
                e.lora_name
                for e, has in zip(self.entries, mask)
                if has and not e.image_embedding_path.is_file()
            ]
            if missing:
                raise FileNotFoundError(
                    f"image key files of {missing} do not exist; rebuild them with python -m "
                    "lora_retriever.embed_pool --image_embedder vision-tower --image_embedder_path DIR"
                )
            vectors = {i: load_key(e.image_embedding_path) for i, e in enumerate(self.entries) if mask[i]}
            dims = sorted({v.shape[0] for v in vectors.values()})
            if len(dims) > 1:
                raise ValueError(f"image key dimensions differ within the pool ({dims}); rebuild them")
            keys = np.zeros((len(self.entries), dims[0]), dtype=np.float32)
            rows = sorted(vectors)
            keys[rows] = _normalised_rows([vectors[i] for i in rows])
            self._keys["image"] = keys
        return self._keys["image"]

    def image_key_mask(self) -> np.ndarray:
        """``[N]`` bool: which adapters have an image key (``image_embedding_path`` set), in pool order."""
        return np.array([e.image_embedding_path is not None for e in self.entries], dtype=bool)

    def key_meta(self) -> EmbeddingMeta | None:
        """The identity of the embedder that made the pool's text keys (from their ``.meta.json`` files);
        ``None`` for legacy keys without metadata (then only the dimension can be checked).

        Raises:
            ValueError: two keys were made by incompatible embedders (model, dim, instruction or adapter).
        """
        return self._modality_meta("text")

    def image_key_meta(self) -> EmbeddingMeta | None:
        """The identity of the image embedder that made the pool's image keys, with the fusion weight
        ``text_weight`` they were built for; ``None`` when no adapter has an image key with metadata.

        Raises:
            ValueError: two image keys were made by incompatible embedders or for different fusion weights.
        """
        return self._modality_meta("image")

    def _modality_meta(self, modality: str) -> EmbeddingMeta | None:
        if modality not in self._key_meta:
            attr, what = _KEY_FIELDS[modality]
            metas = {}
            for e in self.entries:
                path = getattr(e, attr)
                meta = load_key_meta(path) if path else None
                if meta is not None:
                    metas[e.lora_name] = meta
            if not metas:
                if modality == "text":
                    logger.warning(
                        "pool keys have no .meta.json: the embedder that made them can't be checked"
                    )
                return None
            self._key_meta[modality] = _common_meta(metas, what)
        return self._key_meta[modality]

    def save(self, config_path: str | Path, *, lock_timeout: float = 120.0) -> None:
        """Replace the config's entries with this pool's (paths relative to its folder), through
        ``pool_transaction``: locked and atomic."""
        with pool_transaction(config_path, lock_timeout=lock_timeout) as entries:
            folder = resolve_config_path(config_path).parent
            entries[:] = [e.to_dict(relative_to=folder) for e in self.entries]


def _where(entry: AdapterEntry) -> str:
    return f"{entry.lora_name!r}" + (f" ({entry.source})" if entry.source else "")


def _normalised_rows(vectors: Sequence[np.ndarray]) -> np.ndarray:
    keys = np.stack(vectors).astype(np.float32)
    return keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)


def _common_meta(metas: dict[str, EmbeddingMeta], what: str) -> EmbeddingMeta:
    """The one identity shared by every key's metadata (``{adapter name: meta}``, non-empty).

    Raises:
        ValueError: two keys were made by incompatible embedders, or for different fusion weights.
    """
    (first_name, first), *rest = metas.items()
    for name, meta in rest:
        check_compatible(first, meta, f"{what}s of {first_name!r} vs {name!r}")
        if meta.text_weight != first.text_weight:
            raise ValueError(
                f"{what}s of {first_name!r} vs {name!r} were built for different fusion weights (text_weight "
                f"{first.text_weight} vs {meta.text_weight}); rebuild them with one --text_weight"
            )
    return first


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


def load_key_meta(key_path: Path, dim: int | None = None) -> EmbeddingMeta | None:
    """The ``.meta.json`` beside a key file (``None`` for legacy keys without one).

    Raises:
        ValueError: the metadata isn't valid JSON, lacks ``model_id`` / ``dim``, or names another ``dim``.
    """
    meta_path = key_meta_path(key_path)
    if not meta_path.is_file():
        return None
    fix = "rebuild the keys with python -m lora_retriever.embed_pool"
    try:
        meta = EmbeddingMeta.from_dict(json.loads(meta_path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"key metadata {meta_path} is unreadable ({err}); {fix}") from err
    if dim is not None and meta.dim != dim:
        raise ValueError(
            f"key file {key_path} holds a {dim}-d vector but {meta_path} says dim {meta.dim}; {fix}"
        )
    return meta


def _check_adapter_dir(path: Path) -> tuple[list[str], str | None]:
    """Problems with an adapter folder, and the ``base_model_name_or_path`` its config names."""
    from swift.tuners.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

    if not path.exists():
        return [f"adapter directory {path} does not exist"], None
    if not path.is_dir():
        return [
            f"adapter path {path} is not a directory; lora_path must name the folder that holds "
            f"{CONFIG_NAME} and {SAFETENSORS_NAME}"
        ], None
    problems, trained_on = [], None
    config = path / CONFIG_NAME
    if not config.is_file():
        problems.append(f"{path} has no {CONFIG_NAME}")
    else:
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            data = None
            problems.append(f"{config} is not valid JSON ({err})")
        if isinstance(data, dict):
            trained_on = data.get("base_model_name_or_path")
        elif data is not None:
            problems.append(f"{config} must hold a JSON object, got {type(data).__name__}")
    if not (path / SAFETENSORS_NAME).is_file() and not (path / BIN_NAME).is_file():
        problems.append(
            f"{path} has no weights file ({SAFETENSORS_NAME} or legacy {BIN_NAME}); did its training finish?"
        )
    return problems, trained_on


def _base_model_mismatch(trained_on: str | None, loaded: str | None) -> str | None:
    if not trained_on or not loaded:
        return None
    from swift.tuners.swift_model import _model_name  # the one rule Swift.from_pretrained applies

    if _model_name(trained_on) == _model_name(loaded):
        return None
    return (
        f"adapter was trained on {trained_on!r} but the model to load is {loaded!r}; its outputs may be "
        "meaningless (load the model it was trained on, or leave it out of the pool)"
    )


def _read_config(path: Path, problems: list[str], defaults: dict[str, Any]) -> list[AdapterEntry]:
    if not path.is_file():
        problems.append(f"pool config {path} does not exist")
        return []
    try:
        data = load_json_list(path)
    except ValueError as err:
        problems.append(str(err))
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
