"""jina-embeddings-v4 from a local snapshot: text (query/passage prompts) and images in one space.

jina-embeddings-v4 (Qwen2.5-VL-3B + task LoRAs, ~3.8 B parameters, CC-BY-NC-4.0) ships its model class as
remote code in its repository, so it loads with ``AutoModel.from_pretrained(path, trust_remote_code=True)``
and is used through the methods its model card documents::

    model.encode_text(texts=[...], task="retrieval", prompt_name="query" | "passage")
    model.encode_image(images=[...], task="retrieval")

Both return single-vector embeddings (2048-d unless truncated). It needs ``peft`` and ``torchvision``
(its own dependencies). The loading code is written from that documented API but is NOT exercised by this
project's tests: no weights exist on the development machines (and the model is too large for them). The
tests cover the path checks, the directory detection and the ``auto`` fallback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_retriever.embedders.base import Embedder, model_id_from_path, torch_dtype, warn_if_slow_dtype
from lora_retriever.embedders.config import EmbedderConfig

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["JINA_TASK", "JinaV4Embedder", "is_jina_v4_dir"]

logger = logging.getLogger(__name__)

#: The jina-v4 task LoRA used for retrieval (the others are "text-matching" and "code").
JINA_TASK = "retrieval"
_PROMPT_NAMES = {"query": "query", "document": "passage"}


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_jina_v4_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a local jina-embeddings-v4 directory, judged by its ``config.json``
    (architecture ``JinaEmbeddingsV4Model``, an ``auto_map`` into ``*jina_embeddings_v4*`` modules, or a
    jina-embeddings-v4 ``model_type``)."""
    if path is None:
        return False
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    config = _read_config(path)
    if config is None:
        return False
    architectures = config.get("architectures") or []
    if any("JinaEmbeddingsV4" in str(a) for a in architectures):
        return True
    auto_map = config.get("auto_map") or {}
    if isinstance(auto_map, dict) and any("jina_embeddings_v4" in str(v) for v in auto_map.values()):
        return True
    model_type = str(config.get("model_type", "")).replace("_", "-").lower()
    return model_type in {"jina-embeddings-v4", "jinaembeddingsv4"}


class JinaV4Embedder(Embedder):
    """jina-embeddings-v4 (task ``"retrieval"``) from a local directory; untested here (see module doc).

    Queries use jina's ``"query"`` prompt, documents its ``"passage"`` prompt; our instruction prefix is
    empty by default since the model has its own prompts.

    Args:
        config: ``backend="jina-v4"`` with ``model_path`` a full local snapshot.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: ``model_path`` is not a jina-embeddings-v4 directory.
        ImportError: ``peft``/``torchvision`` (needed by the model's code) are missing.
        RuntimeError: transformers could not load the model (message names the path and what's needed).
    """

    backend = "jina-v4"
    supports_images = True
    default_instruction = ""

    def __init__(self, config: EmbedderConfig):
        super().__init__(config)
        path = Path(config.model_path or "")
        if config.model_path is None or not path.exists():
            raise FileNotFoundError(
                f"jina-embeddings-v4 model_path {config.model_path!r} does not exist; download the model "
                "repository jinaai/jina-embeddings-v4 (config.json, its *.py remote code, safetensors) to a "
                "local folder and pass that folder, or use backend='auto' to fall back to the packaged "
                "sentence-transformers model"
            )
        if not is_jina_v4_dir(path):
            raise ValueError(
                f"model_path {str(path)!r} is not a jina-embeddings-v4 directory (its config.json does not "
                "name JinaEmbeddingsV4Model); pass a local snapshot of jinaai/jina-embeddings-v4, or another "
                "backend ('sentence-transformers', 'clip') for other models"
            )
        for dep, hint in (("peft", "pip install peft"), ("torchvision", "pip install torchvision")):
            try:
                __import__(dep)
            except ImportError as err:
                raise ImportError(f"jina-embeddings-v4's model code needs {dep}: {hint}") from err
        from transformers import AutoModel

        warn_if_slow_dtype(config.device, config.dtype)
        self.model_path = str(path)
        try:
            model = AutoModel.from_pretrained(
                str(path), trust_remote_code=True, dtype=torch_dtype(config.dtype), local_files_only=True
            )
        except Exception as err:  # remote code can fail in many ways; name the path and what's expected
            raise RuntimeError(
                f"could not load jina-embeddings-v4 from {path}: {type(err).__name__}: {err}. Expected a full "
                "local snapshot (config.json, the repository's *.py model code, weights) loadable with "
                "AutoModel.from_pretrained(path, trust_remote_code=True)"
            ) from err
        for method in ("encode_text", "encode_image"):
            if not callable(getattr(model, method, None)):
                raise RuntimeError(
                    f"the model loaded from {path} ({type(model).__name__}) has no {method}(); it is not the "
                    "jina-embeddings-v4 remote-code model"
                )
        self.model = model.to(config.device).eval()
        self.model_id = config.model_id or _jina_model_id(path)
        # The dimension is whatever the model returns (2048 unless the snapshot truncates): probe once.
        probe = self.model.encode_text(texts=["probe"], task=JINA_TASK, prompt_name="query", batch_size=1)
        self.dim = int(_first_vector_len(probe))

    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        return self.model.encode_text(
            texts=texts, task=JINA_TASK, prompt_name=_PROMPT_NAMES[role], batch_size=batch_size
        )

    def _encode_images(self, images: list[Image], batch_size: int, show_progress: bool) -> Any:
        return self.model.encode_image(images=images, task=JINA_TASK, batch_size=batch_size)


def _jina_model_id(path: Path) -> str:
    name = model_id_from_path(path)
    config = _read_config(path) or {}
    source = str(config.get("_name_or_path") or "")
    return source if "jina-embeddings-v4" in source and not Path(source).is_absolute() else name


def _first_vector_len(out: Any) -> int:
    """Length of the first vector of a list of vectors or a ``[n, dim]`` tensor/array."""
    return int(out[0].shape[-1])
