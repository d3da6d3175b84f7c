"""Where built artefacts (converted models, indexes) live: ``$LORA_RETRIEVER_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORA_RETRIEVER_CACHE"


def cache_dir(*parts: str) -> Path:
    """The user cache directory (``$LORA_RETRIEVER_CACHE``, default ``~/.cache/lora_retriever``).

    The directory (joined with ``parts``) is created if missing.
    """
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "lora_retriever")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
