"""Add a trained adapter to a pool config, safely when several trainings finish at once.

``register_adapter(config_path, entry)`` adds the entry, or replaces the one with the same ``lora_name``, in
a pool config (a JSON list, see ``lora_retriever.pool``). The read-modify-write runs under an exclusive
``fcntl.flock`` on a sidecar ``<config>.lock`` file, and the new JSON is written to a temporary file in the
same folder, fsynced, and moved over the config with ``os.replace``: readers see the old or the new file,
never a partial one; a crash leaves the old file intact; two concurrent registrations both survive.

``register_trained_adapter`` does both for a freshly trained adapter (``train.py --register_pool``).

``write_adapter_key`` builds an adapter's retrieval key (mean embedding of N of its samples) into
``<config folder>/keys/<name>.npy`` with its ``.meta.json``, as ``python -m lora_retriever.embed_pool`` does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["PATH_FIELDS", "config_lock", "register_adapter", "register_trained_adapter", "write_adapter_key"]

PATH_FIELDS = ("lora_path", "embedding_path", "samples_path")


@contextlib.contextmanager
def config_lock(config_path: str | Path, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive lock on ``<config_path>.lock`` (created if missing; never deleted).

    Raises:
        TimeoutError: another process held the lock for ``timeout`` seconds.
    """
    try:
        import fcntl
    except ImportError as err:  # Windows
        raise OSError("pool registration needs fcntl file locks (Linux / macOS).") from err
    lock_path = Path(config_path).with_name(Path(config_path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"could not lock {lock_path} within {timeout:.0f} s; another registration holds it."
                    ) from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def register_adapter(
    config_path: str | Path,
    entry: dict[str, Any],
    *,
    lock_timeout: float = 120.0,
) -> dict[str, Any]:
    """Add ``entry`` to the pool config, replacing an entry with the same ``lora_name``; atomic and locked.

    Args:
        config_path: the pool config JSON; created (with its folder) if missing.
        entry: at least ``lora_name`` and ``lora_path``; any other fields are stored as given. Path fields
            (``lora_path``, ``embedding_path``, ``samples_path``) may be absolute or relative to the current
            directory; they are stored relative to the config's folder, as pool configs hold them.
        lock_timeout: seconds to wait for a concurrent registration to finish.

    Returns:
        The entry as stored (relative paths).

    Raises:
        ValueError: ``entry`` lacks ``lora_name`` / ``lora_path``, or the existing config isn't a JSON list of
            objects (it is left untouched; fix or move it).
        TimeoutError: the lock wasn't obtained within ``lock_timeout``.
    """
    config_path = Path(config_path).expanduser().absolute()
    missing = [name for name in ("lora_name", "lora_path") if not entry.get(name)]
    if missing:
        raise ValueError(f"entry is missing {missing}; a pool entry needs lora_name and lora_path.")
    stored = _relative_paths(entry, config_path.parent)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    with config_lock(config_path, lock_timeout):
        entries = _read_entries(config_path)
        name = stored["lora_name"]
        positions = [i for i, e in enumerate(entries) if e.get("lora_name") == name]
        if positions:
            entries[positions[0]] = stored
            for index in reversed(positions[1:]):
                logger.warning(
                    "%s held %r more than once; dropping the duplicate at index %d", config_path, name, index
                )
                del entries[index]
            logger.info("replaced adapter %r in %s", name, config_path)
        else:
            entries.append(stored)
            logger.info("added adapter %r to %s (%d adapters)", name, config_path, len(entries))
        _atomic_write_text(config_path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")
    return stored


def _relative_paths(entry: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    stored = dict(entry)
    for name in PATH_FIELDS:
        value = stored.get(name)
        if value:
            absolute = Path(os.path.expanduser(str(value))).absolute()
            stored[name] = os.path.relpath(absolute, base_dir)
    return stored


def _read_entries(config_path: Path) -> list[dict[str, Any]]:
    if not config_path.exists():
        return []
    text = config_path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"pool config {config_path} is not valid JSON ({err}); it was left untouched. Fix or move it, then "
            "register again."
        ) from err
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ValueError(
            f"pool config {config_path} must be a JSON list of adapter objects; it was left untouched."
        )
    return data


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, and ``os.replace`` it over ``path``."""
    mode = path.stat().st_mode & 0o777 if path.exists() else _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_adapter_key(
    config_path: str | Path,
    lora_name: str,
    samples: Sequence[tuple[str, str]],
    *,
    embedder: Any,
    num_samples: int = 20,
    seed: int = 0,
    samples_path: str | Path | None = None,
) -> Path:
    """Embed ``num_samples`` of ``samples`` into ``<config folder>/keys/<lora_name>.npy`` (+ ``.meta.json``).

    Args:
        config_path: the pool config the key belongs to.
        lora_name: the adapter's name (the key file's name).
        samples: ``(sample id, input text)`` pairs, e.g. the training split.
        embedder: a ``lora_retriever.embedders.Embedder`` (keys are built with ``encode_queries``).
        num_samples: samples averaged into the key (all if fewer).
        seed: chooses the samples.
        samples_path: recorded in the metadata.

    Returns:
        The key file's path.
    """
    from lora_retriever.embed_pool import build_key, write_key
    from lora_retriever.pool import AdapterEntry

    key_path = Path(config_path).expanduser().absolute().parent / "keys" / f"{lora_name}.npy"
    key, ids = build_key(embedder, samples, num_samples, seed)
    meta = {
        **embedder.meta("query").to_dict(),
        "sample_ids": ids,
        "num_samples": len(ids),
        "seed": seed,
        "samples_path": None if samples_path is None else str(samples_path),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_key(AdapterEntry(lora_name=lora_name, lora_path=Path("."), embedding_path=key_path), key, meta)
    logger.info("wrote the retrieval key of %r (%d samples) to %s", lora_name, len(ids), key_path)
    return key_path


def register_trained_adapter(
    config_path: str | Path,
    *,
    lora_name: str,
    lora_path: str | Path,
    samples: Sequence[tuple[str, str]],
    samples_path: str | Path,
    embedder: Any,
    num_key_samples: int = 20,
    seed: int = 0,
    copy_samples: bool = False,
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the adapter's retrieval key, then add (or replace) its pool entry; the entry comes last, so the
    config never names a key that isn't there yet.

    Args:
        config_path: the pool config JSON.
        lora_name / lora_path: the adapter's name and folder.
        samples: ``(sample id, input text)`` pairs to build the key from (the training split); empty texts
            (image-only queries) are left out.
        samples_path: the training data file; the entry points at it, or at a copy in
            ``<config folder>/samples/<lora_name><suffix>`` with ``copy_samples``.
        embedder: embeds the key samples (``encode_queries``).
        num_key_samples / seed: how many samples go into the key, and which.
        fields: more entry fields (``description``, ``task``, ``category``, ``base_model``, ...).

    Returns:
        The entry as stored.

    Raises:
        ValueError: no sample has text to embed.
    """
    config_path = Path(config_path).expanduser().absolute()
    samples_path = Path(samples_path).expanduser().absolute()
    if copy_samples:
        samples_path = _copy_file(
            samples_path, config_path.parent / "samples" / f"{lora_name}{samples_path.suffix}"
        )
    texts = [(sample_id, text) for sample_id, text in samples if text.strip()]
    if not texts:
        raise ValueError(
            f"no sample of {lora_name!r} has text to embed into a retrieval key (image-only queries?); build its "
            "key another way and call register_adapter."
        )
    key_path = write_adapter_key(
        config_path,
        lora_name,
        texts,
        embedder=embedder,
        num_samples=num_key_samples,
        seed=seed,
        samples_path=samples_path,
    )
    entry = {
        "lora_name": lora_name,
        "lora_path": str(Path(lora_path).expanduser().absolute()),
        "embedding_path": str(key_path),
        "samples_path": str(samples_path),
        **(fields or {}),
    }
    return register_adapter(config_path, entry)


def _copy_file(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` through a temp file + rename (never a half-copied file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
