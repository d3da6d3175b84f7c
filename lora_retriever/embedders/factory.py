"""``get_embedder``: an ``EmbedderConfig`` (or a backend name) in, a loaded ``Embedder`` out.

Backends are imported only when built: ``sentence_transformers`` alone takes seconds to import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from lora_retriever.embedders.base import Embedder
from lora_retriever.embedders.config import EmbedderConfig

__all__ = ["get_embedder", "resolve_backend"]

logger = logging.getLogger(__name__)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def resolve_backend(config: EmbedderConfig) -> EmbedderConfig:
    """Turn ``backend="auto"`` into a concrete backend (other backends are returned unchanged).

    ``auto``: a jina-embeddings-v4 ``model_path`` -> ``jina-v4``; a CLIP folder -> ``clip``; a
    sentence-transformers folder -> ``sentence-transformers`` with it; anything else (no path, a missing
    path, an unknown folder) -> a logged warning and the packaged sentence-transformers default.
    """
    if config.backend != "auto":
        return config
    from lora_retriever.embedders.jina import is_jina_v4_dir

    path = Path(config.model_path) if config.model_path else None
    if path is not None and is_jina_v4_dir(path):
        if config.adapter_path is not None:
            raise ValueError(
                f"adapter_path={config.adapter_path!r} is not supported with jina-embeddings-v4 "
                f"({path}); drop it or pick a sentence-transformers/clip model"
            )
        logger.info("embedder backend auto: %s is jina-embeddings-v4", path)
        return dataclasses.replace(config, backend="jina-v4")  # validation asks for trust_remote_code
    if path is not None and path.is_dir() and _model_type(path) == "clip":
        logger.info("embedder backend auto: %s is a CLIP model", path)
        return dataclasses.replace(config, backend="clip")
    if path is not None and (path / "modules.json").is_file():
        logger.info("embedder backend auto: %s is a sentence-transformers model", path)
        return dataclasses.replace(config, backend="sentence-transformers")
    if path is None:
        reason = "no model_path was given"
    elif not path.exists():
        reason = f"model_path {str(path)!r} does not exist"
    else:
        reason = f"model_path {str(path)!r} is not a jina-embeddings-v4, CLIP or sentence-transformers folder"
    logger.warning(
        "embedder backend auto: %s, so jina-embeddings-v4 is not used; falling back to the packaged "
        "sentence-transformers all-MiniLM-L6-v2 (text only, 384-d). Pass model_path=<local jina-embeddings-v4 "
        "dir> to use jina.",
        reason,
    )
    return dataclasses.replace(config, backend="sentence-transformers", model_path=None, model_id=None)


def get_embedder(
    config: EmbedderConfig | dict[str, Any] | str = "sentence-transformers", **overrides: Any
) -> Embedder:
    """Build and load an embedder.

    Args:
        config: an ``EmbedderConfig``, a dict of its fields, or a backend name
            (``"sentence-transformers"``, ``"jina-v4"``, ``"clip"``, ``"vision-tower"``, ``"universal"``,
            ``"auto"``).
        **overrides: ``EmbedderConfig`` fields replacing the config's (validated again).

    Returns:
        The loaded ``Embedder`` (with its adapter loaded if ``adapter_path`` is set).

    Raises:
        ValueError: invalid config or override (see ``EmbedderConfig``).
        FileNotFoundError: the model directory is missing.
        ImportError: the backend's library is not installed (with the install command).
    """
    if isinstance(config, str):
        config = EmbedderConfig.from_dict({"backend": config, **overrides})
    elif isinstance(config, dict):
        config = EmbedderConfig.from_dict({**config, **overrides})
    elif isinstance(config, EmbedderConfig):
        if overrides:
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(EmbedderConfig)})
            if unknown:
                raise ValueError(f"unknown EmbedderConfig overrides {unknown}")
            config = dataclasses.replace(config, **overrides)
    else:
        raise ValueError(
            f"get_embedder needs an EmbedderConfig, a dict or a backend name, got {type(config).__name__}"
        )
    config = resolve_backend(config)
    if config.backend == "sentence-transformers":
        from lora_retriever.embedders.sentence_transformers import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(config)
    if config.backend == "clip":
        from lora_retriever.embedders.clip import ClipEmbedder

        return ClipEmbedder(config)
    if config.backend == "jina-v4":
        from lora_retriever.embedders.jina import JinaV4Embedder

        return JinaV4Embedder(config)
    if config.backend == "vision-tower":
        from lora_retriever.embedders.vision import VisionTowerEmbedder

        return VisionTowerEmbedder(config)
    if config.backend == "universal":  # a CLIP-SF / CLIP-FF checkpoint (python -m lora_retriever.mbeir train)
        from lora_retriever.mbeir.embedder import UniversalEmbedder

        return UniversalEmbedder(config)
    raise AssertionError(f"unreachable backend {config.backend!r}")  # EmbedderConfig validated it
