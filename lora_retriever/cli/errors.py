"""``run_cli``: the one wrapper every entry point runs in.

It parses the flags, sets the log level once (``--verbose`` / ``--quiet``), sets torch's CPU threads
(``--threads``) and runs the command. A user mistake — a bad path, a malformed file, an invalid setting, an
adapter that does not load — ends in one ``error: <message>`` on stderr and exit code 2, not a traceback;
``--debug`` shows the traceback instead (and debug logging).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from swift.utils import get_logger

__all__ = ["USER_ERRORS", "add_common_flags", "configure_logging", "run_cli"]

#: Errors that mean "the input is wrong": the project's own (``AdapterLoadError``, ``PoolValidationError``,
#: ``DatasetError`` are ``ValueError``s), config validation (``ValueError``), bad paths and permissions
#: (``OSError``: ``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``, ``FileExistsError``),
#: unreadable files (``UnicodeDecodeError`` and ``json.JSONDecodeError`` are ``ValueError``s) and a missing
#: optional dependency (our ``ImportError``s name the package to install).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
PACKAGES = ("lora_retriever", "swift", "spectral_edit")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_common_flags(parser: argparse.ArgumentParser, *, threads: int | None = None) -> None:
    """``--verbose`` / ``--quiet`` (log level, progress bars), ``--debug`` (tracebacks) and ``--threads``."""
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true", help="debug logging")
    verbosity.add_argument(
        "--quiet", action="store_true", help="warnings only on the console, no progress bars"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (and debug logging)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="torch CPU threads (0: torch's choice)" + (f" (default: {threads})" if threads else ""),
    )


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Set the project's log level once: DEBUG with ``verbose``, else INFO; ``quiet`` keeps the console to
    warnings while file handlers (e.g. a training run's ``train.log``) still get INFO."""
    for name in PACKAGES:
        package_logger = get_logger(name, logging.DEBUG if verbose else logging.INFO)
        for handler in package_logger.handlers:
            # The console handler get_logger attached (exactly a StreamHandler: not a FileHandler such as
            # train.log's, nor another tool's handler subclass, e.g. pytest's capture).
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING if quiet else logging.NOTSET)


def run_cli(
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` with ``parser`` (built with ``add_common_flags``) and run ``command(args)``.

    Returns:
        ``command``'s exit code (0 when it returns ``None``); 2 after a user error (one ``error:`` line on
        stderr), 130 after Ctrl-C. Bad flags exit 2 through argparse, as usual.
    """
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    configure_logging(verbose=debug or getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's choice), got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        code = command(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if code is None else code


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    # One "error:" line; a multi-problem message (e.g. a pool's) keeps its list, indented under it.
    return "\n  ".join(line for line in text.splitlines() if line.strip())
