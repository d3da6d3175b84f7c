"""Hot changes of the served pool: register a PEFT directory, delete an adapter, merge adapters into a new one.

Every change goes through the one pool writer (``pool_transaction``, via ``training.registry``) into the
service's own pool config (``<data_dir>/pool.json``); adapters are validated by loading them into the model
(every check ``Swift.from_pretrained`` makes) before they are registered, their retrieval key is written first
(``<data_dir>/keys/<name>.npy``), and the served pool is re-read afterwards. Nothing is written outside the
data directory; adapter files given by path are read, never moved or deleted.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_retriever.pool_config import pool_transaction, read_pool_entries
from lora_retriever.service.errors import ServiceError
from swift.utils import get_logger

if TYPE_CHECKING:
    from lora_retriever.service.engine import Engine

logger = get_logger(__name__)

__all__ = ["ADAPTER_NAME", "delete_adapter", "merge_adapters", "register_adapter"]

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")
MAX_KEY_SAMPLES = 1000


def check_new_name(engine: Engine, name: str) -> None:
    """A name a new adapter may take: safe as a file name, not taken.

    Raises:
        ServiceError: 400 for a bad name, 409 for a taken one.
    """
    from lora_retriever.service.engine import AUTO_MODEL, MIXTURE_MODEL

    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ServiceError(
            f"adapter name {name!r} must be 1-100 letters, digits, '_' or '-', starting with a letter or digit",
            param="name",
        )
    if name in engine.pool or name in engine.base_aliases or name in (AUTO_MODEL, MIXTURE_MODEL):
        raise ServiceError(
            f"the name {name!r} is taken; delete it first or choose another", status=409, param="name"
        )


def register_adapter(
    engine: Engine,
    name: str,
    path: str,
    *,
    samples: Sequence[str] | None = None,
    samples_path: str | None = None,
    description: str = "",
    pin: bool = False,
) -> dict[str, Any]:
    """Validate a server-side PEFT directory by loading it, build its retrieval key, register it.

    Raises:
        ServiceError: bad name (409 if taken), path or samples, or an adapter that doesn't load into the model.
    """
    from lora_retriever.embed_pool import read_sample_texts
    from lora_retriever.training.registry import write_adapter_key

    check_new_name(engine, name)
    adapter_dir = Path(path).expanduser()
    if not adapter_dir.is_absolute():
        raise ServiceError(f"path must be an absolute server-side directory, got {path!r}", param="path")
    if not adapter_dir.is_dir():
        raise ServiceError(f"path {path!r} is not a directory on the server", param="path")
    if (samples is None) == (samples_path is None):
        raise ServiceError(
            "give the adapter's key samples as samples (texts) or samples_path (a file on the server)",
            param="samples",
        )
    if samples_path is not None:
        try:
            texts = [t for _, t in read_sample_texts(samples_path)]
        except (OSError, ValueError) as err:
            raise ServiceError(f"samples_path {samples_path!r}: {err}", param="samples_path") from err
    else:
        texts = [t for t in samples if isinstance(t, str) and t.strip()]
    if not texts or len(texts) > MAX_KEY_SAMPLES:
        raise ServiceError(
            f"need 1..{MAX_KEY_SAMPLES} non-empty sample texts for the key, got {len(texts)}", param="samples"
        )

    def write_key() -> Path:
        with engine.embed_lock:
            return write_adapter_key(
                engine.config.registry_config,
                name,
                [(str(i), t) for i, t in enumerate(texts)],
                embedder=engine.embedder,
            )

    extra = {"samples_path": str(Path(samples_path).expanduser().absolute())} if samples_path else {}
    return _install(engine, name, adapter_dir, write_key, description, pin, extra)


def merge_adapters(
    engine: Engine,
    name: str,
    adapters: Sequence[tuple[str, float]],
    *,
    method: str = "cat",
    options: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Fuse pool adapters (``lora_retriever.merge``, a method of the fusion registry) into a new adapter under
    ``<data_dir>/adapters/<name>`` and register it; its key is the normalised weighted mean of the sources' keys.

    Raises:
        ServiceError: bad or taken name, unknown sources or method, bad weights or options.
    """
    from lora_retriever.fusion import available_methods
    from lora_retriever.merge import MergeConfig
    from lora_retriever.merge import merge_adapters as merge

    check_new_name(engine, name)
    if method not in available_methods():
        raise ServiceError(f"method must be one of {available_methods()}, got {method!r}", param="method")
    if not 1 <= len(adapters) <= engine.config.max_adapters_per_request:
        raise ServiceError(
            f"merge takes 1..{engine.config.max_adapters_per_request} adapters, got {len(adapters)}",
            param="adapters",
        )
    unknown = [n for n, _ in adapters if n not in engine.pool]
    if unknown:
        raise ServiceError(f"unknown adapter(s) {unknown}", status=404, param="adapters")
    weights = [float(w) for _, w in adapters]
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise ServiceError(f"weights must be finite and not all zero, got {weights}", param="adapters")
    entries = [engine.pool[n] for n, _ in adapters]
    out = Path(engine.config.data_dir).expanduser().absolute() / "adapters" / name
    base = next(iter(sorted(engine.base_aliases - {engine.base_name})), engine.base_name)
    try:
        config = MergeConfig(
            adapters=[str(e.lora_path) for e in entries],
            out=str(out),
            weights=weights,
            method=method,
            base_model_name_or_path=base,
            **(options or {}),
        )
        summary = merge(config)
    except (TypeError, ValueError, FileExistsError) as err:
        raise ServiceError(f"merge failed: {err}", param="adapters") from err

    def write_key() -> Path:
        from lora_retriever.embed_pool import write_key as write
        from lora_retriever.pool import key_meta_path
        from lora_retriever.pool_config import default_key_path

        keys = np.stack([engine.pool.keys()[engine.pool.names.index(e.lora_name)] for e in entries])
        mixed = (np.abs(np.asarray(weights))[:, None] * keys).sum(axis=0)
        mixed = (mixed / max(np.linalg.norm(mixed), 1e-12)).astype(np.float32)
        first_meta = key_meta_path(entries[0].embedding_path)
        meta = {
            **(engine.pool.key_meta().to_dict() if engine.pool.key_meta() else {}),
            "modality": "text",
            "fused_from": [e.lora_name for e in entries],
            "weights": weights,
            "source_meta": str(first_meta),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        path = default_key_path(engine.config.registry_config, name)
        write(path, mixed, meta)
        return path

    fields = {"fusion": {"method": method, "sources": summary["sources"], "weights": summary["weights"]}}
    return _install(engine, name, out, write_key, description or f"{method} merge", False, fields)


def _install(
    engine: Engine,
    name: str,
    adapter_dir: Path,
    write_key: Any,
    description: str,
    pin: bool,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Load (validates), write the key, add the entry, re-read the pool; undo everything on failure."""
    from lora_retriever.training.registry import register_adapter as add_entry

    registry = engine.config.registry_config
    registry.parent.mkdir(parents=True, exist_ok=True)
    with engine.model_lock:
        try:
            engine.model.load_adapter(adapter_dir, name)  # every check Swift.from_pretrained makes
        except (OSError, ValueError) as err:
            raise ServiceError(f"adapter at {str(adapter_dir)!r} does not load: {err}", param="path") from err
        engine.model.set_active_adapters(None)
        try:
            engine.cache.register_loaded(name, pinned=pin)
            entry = {
                "lora_name": name,
                "lora_path": str(adapter_dir.absolute()),
                "embedding_path": str(write_key()),
                "description": description,
                **fields,
            }
            stored = add_entry(registry, entry)
            engine.reload_pool()
        except Exception:
            engine.cache.unload(name)
            _remove_entry(engine, name)
            raise
    logger.info("registered adapter %r from %s", name, adapter_dir)
    return stored


def delete_adapter(engine: Engine, name: str) -> None:
    """Unload ``name`` and remove its entry from the pool config that holds it (its files are kept).

    Raises:
        ServiceError: 404 for an adapter the pool doesn't hold.
    """
    if name not in engine.pool:
        raise ServiceError(
            f"no adapter named {name!r}; the pool holds {engine.pool.names}", status=404, param="name"
        )
    with engine.model_lock:
        engine.cache.unload(name)
        _remove_entry(engine, name)
        engine.reload_pool()
    logger.info("deleted adapter %r", name)


def _remove_entry(engine: Engine, name: str) -> None:
    for config in engine.pool_sources():
        if any(e.get("lora_name") == name for e in read_pool_entries(config)):
            with pool_transaction(config) as entries:
                entries[:] = [e for e in entries if e.get("lora_name") != name]


# -- archive uploads -----------------------------------------------------------------------------------------

#: What an uploaded archive may hold at most (files, and bytes once unpacked).
MAX_ARCHIVE_MEMBERS = 64
MAX_UNPACKED_BYTES = 2 * 2**30


def unpack_adapter_archive(data: bytes, dest: Path, *, max_unpacked: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack a ``.tar``, ``.tar.gz`` or ``.zip`` of one PEFT adapter directory into ``dest`` (created new).

    Only regular files and folders are accepted: absolute paths, ``..`` components, links, devices and more
    than ``MAX_ARCHIVE_MEMBERS`` members are refused before anything is written; the unpacked size is capped.
    Files may sit at the top level or inside one folder; the folder holding ``adapter_config.json`` is returned.

    Raises:
        ServiceError: an unreadable or unsafe archive (400), or one that unpacks beyond ``max_unpacked`` (413).
    """
    import io
    import shutil
    import tarfile
    import zipfile

    members: list[tuple[str, int, Any]] = []  # (relative name, size, reader)
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            archive = zipfile.ZipFile(io.BytesIO(data))
            for info in archive.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                if mode not in (0, 0o100000, 0o040000):  # regular file or folder (or unknown: plain zip)
                    raise ServiceError(
                        f"archive member {info.filename!r} is a link or device; refused", param="body"
                    )
                if not info.is_dir():
                    members.append((info.filename, info.file_size, lambda i=info: archive.read(i)))
        else:
            archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            for info in archive.getmembers():
                if info.isdir():
                    continue
                if not info.isfile():
                    raise ServiceError(
                        f"archive member {info.name!r} is a link or device; refused", param="body"
                    )
                members.append((info.name, info.size, lambda i=info: archive.extractfile(i).read()))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ServiceError(
            f"the body is not a readable .tar, .tar.gz or .zip archive ({err})", param="body"
        ) from err
    if not members or len(members) > MAX_ARCHIVE_MEMBERS:
        raise ServiceError(
            f"the archive must hold 1..{MAX_ARCHIVE_MEMBERS} files, got {len(members)}", param="body"
        )
    for name, _, _ in members:
        parts = Path(name).parts
        if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or not parts:
            raise ServiceError(
                f"archive member {name!r} points outside the adapter folder; refused", param="body"
            )
    total = sum(size for _, size, _ in members)
    if total > max_unpacked:
        raise ServiceError(
            f"the archive unpacks to {total} bytes, above {max_unpacked}", status=413, param="body"
        )
    dest.mkdir(parents=True)
    try:
        for name, size, read in members:
            target = dest.joinpath(*Path(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            content = read()
            if len(content) != size:
                raise ServiceError(f"archive member {name!r} does not match its declared size", param="body")
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    configs = sorted(dest.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    if not configs:
        shutil.rmtree(dest, ignore_errors=True)
        raise ServiceError(
            "the archive holds no adapter_config.json: not a PEFT adapter directory", param="body"
        )
    return configs[0].parent


def register_archive(
    engine: Engine, name: str, data: bytes, *, samples: Sequence[str], description: str = ""
) -> dict[str, Any]:
    """Unpack an uploaded adapter archive under ``<data_dir>/adapters/<name>`` and register it (see
    ``register_adapter``); on any failure nothing is left behind.

    Raises:
        ServiceError: see ``unpack_adapter_archive`` and ``register_adapter``; 409 if the folder exists.
    """
    import shutil

    check_new_name(engine, name)
    dest = Path(engine.config.data_dir).expanduser().absolute() / "adapters" / name
    if dest.exists():
        raise ServiceError(
            f"{dest} already exists (an earlier adapter {name!r}?); choose another name",
            status=409,
            param="name",
        )
    folder = unpack_adapter_archive(data, dest)
    try:
        return register_adapter(engine, name, str(folder), samples=samples, description=description)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
