"""Crash-safe file writes: a reader sees the old file or the new one, never a partial one.

``atomic_write(path, data)`` writes to a temporary file beside ``path`` (same folder, so the rename can't
cross file systems), flushes and fsyncs it, renames it over ``path`` with ``os.replace`` and fsyncs the
folder so the rename itself survives a power cut. A crash at any point leaves the previous file intact.

The new file keeps the permission bits of the file it replaces; a new file gets ``0o666`` minus the umask
(``0o644`` usually), as ``open(path, "w")`` would give it — not ``tempfile.mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "atomic_write", "fsync_dir", "temp_name"]

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """``dir/.name.<random>.tmp``: hidden, beside ``path``, recognisable as a leftover of ``path``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def atomic_write(
    path: str | Path,
    data: bytes | str | Callable[[BinaryIO], None],
) -> Path:
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


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
