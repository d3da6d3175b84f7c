"""Crash-safe file writes: a reader sees the old file or the new one, never a partial one.

``atomic_write(path, data)`` writes to a temporary file beside ``path`` (same folder, so the rename can't
cross file systems), flushes and fsyncs it, renames it over ``path`` with ``os.replace`` and fsyncs the
folder so the rename itself survives a power cut. A crash at any point leaves the previous file intact.

The new file keeps the permission bits of the file it replaces; a new file gets ``0o666`` minus the umask
(``0o644`` usually), as ``open(path, "w")`` would give it — not ``tempfile.mkstemp``'s ``0o600``.

Outputs of a run: ``ensure_writable_dir`` checks the output folder before any work, ``atomic_write_together``
writes files that belong together (all written, then all renamed), ``replace_dir`` moves a finished folder
into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write",
    "atomic_write_together",
    "ensure_writable_dir",
    "fsync_dir",
    "replace_dir",
    "temp_name",
]

TEMP_SUFFIX = ".tmp"
FileData = bytes | str | Callable[[BinaryIO], None]


def temp_name(path: Path) -> Path:
    """``dir/.name.<random>.tmp``: hidden, beside ``path``, recognisable as a leftover of ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def atomic_write(path: str | Path, data: FileData) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + folder fsync).

    Args:
        path: the file to create or replace; its folder must exist.
        data: the bytes, a ``str`` (written as UTF-8), or a function that writes to the open binary file.

    Returns:
        ``path``.

    Raises:
        OSError: the folder is missing or not writable (nothing is changed, no temp file is left).
    """
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_together(files: Mapping[str | Path, FileData]) -> list[Path]:
    """Write several files that belong together (e.g. predictions and their metrics): every file is written
    and fsynced under a temporary name first, then all are renamed into place.

    A failure while writing changes none of them; the renames come last, one right after the other.

    Returns:
        The paths, in order.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            written.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {path.parent for _, path in written}:
        fsync_dir(folder)
    return [path for _, path in written]


def _write_temp(path: Path, data: FileData) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (fsynced, ``path``'s permission bits)."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    tmp = temp_name(path)
    # os.open applies the umask to 0o666, as open() would; O_EXCL: never write through someone else's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def ensure_writable_dir(path: str | Path, *, argument: str = "output_dir") -> Path:
    """Create the output folder ``path`` (and its parents) if missing and check a file can be created in it.

    Entry points call this before they load a model, so a bad output folder fails in a second, not after the
    work is done.

    Args:
        path: the folder.
        argument: the setting or flag it came from, named in the error.

    Returns:
        ``path`` with ``~`` expanded.

    Raises:
        NotADirectoryError: ``path`` or one of its parents is a file.
        PermissionError: the folder can't be created or written to.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise NotADirectoryError(f"{argument} {str(path)!r} is a file; pass a directory") from err
    except NotADirectoryError as err:
        raise NotADirectoryError(
            f"{argument} {str(path)!r} can't be created: a parent of it is a file; pass another directory"
        ) from err
    except OSError as err:
        raise PermissionError(
            f"{argument} {str(path)!r} can't be created ({err.strerror}); pass a directory you can write to"
        ) from err
    probe = temp_name(path / ".write-check")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{argument} {str(path)!r} is not writable ({err.strerror}); pass a directory you can write to"
        ) from err
    return path


def replace_dir(new_dir: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``new_dir`` to ``target`` (same file system), replacing ``target`` if it exists.

    The old ``target`` is moved aside first and deleted only after the new one is in place; if the move fails,
    the old one is put back.

    Returns:
        ``target``.
    """
    new_dir, target = Path(new_dir), Path(target)
    old = temp_name(target) if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(new_dir, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()
    return target


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)
