"""The pool config file: its raw entries and the one locked, atomic way to change it.

Every write to a pool config goes through ``pool_transaction``: an exclusive ``fcntl.flock`` on the sibling
``<config>.lock``, a fresh read of the config under the lock, the caller's edit of the raw entries, then an
atomic rewrite (``swift.utils.files.atomic_write``: temp file + fsync + rename + folder fsync; the file keeps
its permission bits). Concurrent writers (trainings registering adapters, ``embed_pool``, ``AdapterPool.save``)
never lose each other's entries; a writer that dies at any moment leaves the previous file intact, and the
kernel releases its lock. ``check_pool_writable`` checks up front that a config can be created or updated.

Entries are kept as stored: paths relative to the config's folder stay relative, unknown fields are kept.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swift.utils import get_logger
from swift.utils.files import TEMP_SUFFIX, atomic_write

logger = get_logger(__name__)

__all__ = [
    "PATH_FIELDS",
    "check_pool_writable",
    "config_relative_path",
    "default_key_path",
    "load_json_list",
    "pool_lock",
    "pool_transaction",
    "read_pool_entries",
    "resolve_config_path",
    "stored_entry",
]

PATH_FIELDS = ("lora_path", "embedding_path", "image_embedding_path", "samples_path")


def load_json_list(path: Path) -> list[Any]:
    """The config's JSON list ("" or whitespace only = an empty pool, as a config being created is).

    Raises:
        ValueError: not valid JSON / UTF-8, or not a list.
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else []
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"pool config {path} is not valid JSON ({err}); fix or move it") from err
    if not isinstance(data, list):
        raise ValueError(
            f"pool config {path} must be a JSON list of adapter entries, got {type(data).__name__}"
        )
    return data


def read_pool_entries(config_path: str | Path) -> list[dict[str, Any]]:
    """A config's raw entries, as stored (relative paths, every field); ``[]`` if the file is missing.

    Raises:
        ValueError: the file isn't a JSON list of objects.
    """
    path = resolve_config_path(config_path)
    if not path.exists():
        return []
    data = load_json_list(path)
    bad = [i for i, item in enumerate(data) if not isinstance(item, dict)]
    if bad:
        raise ValueError(
            f"pool config {path} must be a JSON list of adapter objects; entries {bad} are not objects"
        )
    return data


@contextlib.contextmanager
def pool_lock(config_path: str | Path, timeout: float = 120.0) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<config>.lock`` (created if missing, never deleted: deleting it
    would let two writers lock two different files). The kernel drops the lock when its holder dies.

    Yields:
        The lock file's path.

    Raises:
        TimeoutError: another writer held the lock for ``timeout`` seconds.
        OSError: no ``fcntl`` (Windows), or the lock file can't be created.
    """
    try:
        import fcntl
    except ImportError as err:
        raise OSError("writing a pool config needs fcntl file locks (Linux / macOS).") from err
    lock_path = _lock_path(resolve_config_path(config_path))
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
                        f"could not lock {lock_path} within {timeout:g} s: another process is writing the "
                        "pool config; retry when it is done (or raise the lock timeout)."
                    ) from None
                time.sleep(0.01)
        try:
            yield lock_path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def pool_transaction(
    config_path: str | Path, *, lock_timeout: float = 120.0
) -> Iterator[list[dict[str, Any]]]:
    """The one way to change a pool config: edit the yielded entries in place; they are written on exit.

    Under ``pool_lock``: leftover temp files of dead writers are removed, the config is read afresh (so
    changes made since the caller last read it are kept), the block edits the raw entries (paths as stored,
    relative to the config's folder; unknown fields untouched), and if they changed they are written with
    ``atomic_write`` (the file keeps its permission bits). An exception in the block writes nothing.

    Example::

        with pool_transaction("config/pool.json") as entries:
            entries.append({"lora_name": "x", "lora_path": "adapters/x"})

    Raises:
        ValueError: the existing config isn't a JSON list of objects (it is left untouched), or the block
            left something other than a list of objects.
        TimeoutError: see ``pool_lock``.
    """
    path = resolve_config_path(config_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pool_lock(path, lock_timeout):
        _remove_leftover_temp_files(path)
        entries = read_pool_entries(path)
        before = copy.deepcopy(entries)
        yield entries
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"pool entries for {path} must stay a list of dicts; nothing was written")
        if entries != before:
            atomic_write(path, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def check_pool_writable(config_path: str | Path) -> Path:
    """Check, before any work, that ``pool_transaction`` can update ``config_path`` (``--register_pool``).

    The config may be missing (it will be created, with its folders) or a JSON list of objects; its folder
    (or the nearest existing ancestor) must be writable, and so must an existing lock file.

    Returns:
        The config's absolute path.

    Raises:
        ValueError: the path is a folder, or the existing config isn't a JSON list of objects.
        NotADirectoryError: a parent of the path is a file.
        PermissionError: the folder or the lock file is not writable.
    """
    path = resolve_config_path(config_path)
    if path.is_dir():
        raise ValueError(f"pool config {path} is a directory; pass a JSON file such as {path / 'pool.json'}")
    if path.exists():
        read_pool_entries(path)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"pool config {path}: {folder} is a file, so the folder can't be created")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"pool config {path}: folder {folder} is not writable; choose a writable location for the pool"
        )
    lock_path = _lock_path(path)
    if lock_path.exists() and not os.access(lock_path, os.R_OK | os.W_OK):
        raise PermissionError(
            f"pool config {path}: lock file {lock_path} is not writable; fix its permissions"
        )
    return path


def config_relative_path(path: str | Path, config_dir: str | Path) -> str:
    """How a config in ``config_dir`` stores ``path`` (absolute, or relative to the current directory):
    relative to ``config_dir``, which is how it is read back."""
    absolute = os.path.abspath(os.path.expanduser(str(path)))
    return os.path.relpath(absolute, os.path.realpath(config_dir))


def stored_entry(entry: dict[str, Any], config_path: str | Path) -> dict[str, Any]:
    """``entry`` as the config stores it: path fields (absolute, or relative to the current directory)
    made relative to the config's folder; other fields as given."""
    folder = resolve_config_path(config_path).parent
    return {k: config_relative_path(v, folder) if k in PATH_FIELDS and v else v for k, v in entry.items()}


def default_key_path(config_path: str | Path, lora_name: str, modality: str = "text") -> Path:
    """Where an adapter's key goes when its entry names none: ``<config folder>/keys/<lora_name>.npy`` for
    the text key, ``<config folder>/keys/<lora_name>.image.npy`` for the image key (``modality="image"``).

    Raises:
        ValueError: ``modality`` is not ``"text"`` or ``"image"``.
    """
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    suffix = ".npy" if modality == "text" else ".image.npy"
    return resolve_config_path(config_path).parent / "keys" / f"{lora_name}{suffix}"


def resolve_config_path(config_path: str | Path) -> Path:
    """The config's absolute, symlink-free path: a symlinked config is updated where it lives, and every
    writer locks the same lock file."""
    return Path(config_path).expanduser().resolve()


def _lock_path(config_file: Path) -> Path:
    return config_file.with_name(config_file.name + ".lock")


def _remove_leftover_temp_files(config_file: Path) -> None:
    # Only a lock holder writes temp files of the config, so any found under the lock belong to a dead writer.
    for leftover in config_file.parent.glob(f".{glob.escape(config_file.name)}.*{TEMP_SUFFIX}"):
        logger.info("removing %s, left by a pool writer that died mid-write", leftover)
        leftover.unlink(missing_ok=True)
