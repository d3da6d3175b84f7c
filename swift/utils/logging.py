"""Project loggers. Library code logs; entry points choose the level once."""

from __future__ import annotations

import logging

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "swift", level: int | None = None) -> logging.Logger:
    """Return a logger; attaches a stream handler to the package root once.

    Args:
        name: logger name, usually ``__name__``.
        level: optional level to set on the returned logger.
    """
    root_name = name.split(".")[0]
    root = logging.getLogger(root_name)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    logger = logging.getLogger(name)
    if level is not None:
        logger.setLevel(level)
    return logger
