"""A trained universal retriever behind the project's ``Embedder`` interface (backend ``"universal"``), so the
LoRA retriever can embed multimodal queries and adapter keys with it:

    from lora_retriever.embedders import get_embedder

    embedder = get_embedder("universal", model_path="runs/mbeir/sf")     # a 'train' checkpoint folder
    embedder.encode(texts=["what time is it?"], images=[clock])          # [1, 384], one space for all

Texts and images share one space. An item with text and an image: SF gives ``normalise(t + v)`` (the base
class's fusion with equal weights, which is SF's rule); FF runs its fusion layers over both at once. The model
id is ``mbeir-<fusion>-<digest>`` (:func:`retriever_id`), the one the ``embed`` / ``index`` steps store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_retriever.embedders.base import Embedder, batch_starts, l2_normalize
from lora_retriever.embedders.config import EmbedderConfig
from lora_retriever.mbeir.models import checkpoint_digest, load_retriever, read_checkpoint_meta

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["UniversalEmbedder", "retriever_id"]


def retriever_id(checkpoint: str | Path) -> str:
    """``mbeir-<fusion>-<digest of config and weights>``: the identity stored with a checkpoint's vectors."""
    fusion = read_checkpoint_meta(checkpoint)["config"]["fusion"]
    return f"mbeir-{fusion}-{checkpoint_digest(checkpoint)}"


class UniversalEmbedder(Embedder):
    """A CLIP-SF / CLIP-FF checkpoint (``python -m lora_retriever.mbeir train``) as an ``Embedder``.

    Args:
        config: ``backend="universal"``, ``model_path`` = the checkpoint folder. Instructions default to none
            (M-BEIR's task prompts are part of the query text; pass ``query_instruction`` to add one).

    Raises:
        ValueError / FileNotFoundError: no ``model_path``, not a checkpoint, or an ``adapter_path`` (the
            checkpoint carries its own text LoRA).
    """

    backend = "universal"
    supports_images = True
    default_instruction = ""

    def __init__(self, config: EmbedderConfig) -> None:
        super().__init__(config)
        if config.model_path is None:
            raise ValueError(
                "backend='universal' needs model_path: a checkpoint folder written by 'mbeir train'"
            )
        if config.adapter_path is not None:
            raise ValueError(
                f"adapter_path={config.adapter_path!r} is not supported with backend='universal': the checkpoint "
                "carries its text LoRA (text_adapter/); drop adapter_path"
            )
        import torch

        self.model_path = str(Path(config.model_path).expanduser())
        self.model = load_retriever(self.model_path).to(torch.device(config.device))
        self.fusion = self.model.config.fusion
        self.model_id = config.model_id or retriever_id(self.model_path)
        self.dim = self.model.dim

    def _run(
        self, texts: list[str | None], images: list[Image | None], batch_size: int, show_progress: bool
    ) -> Any:
        import torch

        out = []
        for start in batch_starts(len(texts), batch_size, show_progress, f"{self.backend} embeddings"):
            with torch.inference_mode():
                chunk = self.model.embed_items(
                    texts[start : start + batch_size], images[start : start + batch_size]
                )
            out.append(chunk.float().cpu().numpy())
        return np.concatenate(out)

    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        return self._run(list(texts), [None] * len(texts), batch_size, show_progress)

    def _encode_images(self, images: list[Image], batch_size: int, show_progress: bool) -> Any:
        return self._run([None] * len(images), list(images), batch_size, show_progress)

    def encode(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Image | Sequence[Image] | None] | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """As ``Embedder.encode``; SF with equal weights is its rule, FF embeds text and image jointly.

        Raises:
            ValueError: as ``Embedder.encode``, weights other than equal for SF, or an FF item with several
                images (FF reads one image per item).
        """
        if self.fusion == "sf" or texts is None or images is None:
            tw, iw = kwargs.get("text_weight"), kwargs.get("image_weight")
            if tw is not None and iw is not None and tw != iw:
                raise ValueError(f"CLIP-SF adds text and image vectors with equal weights; got {tw} and {iw}")
            return super().encode(texts, images, **kwargs)
        if len(texts) != len(images):
            raise ValueError(
                f"texts has {len(texts)} items but images has {len(images)}; give one entry per input"
            )
        items: list[Image | None] = []
        for i, entry in enumerate(images):
            if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
                if len(entry) > 1:
                    raise ValueError(
                        f"images[{i}] holds {len(entry)} images; CLIP-FF embeds one image per item"
                    )
                entry = entry[0] if entry else None
            items.append(entry)
        prefix = self.instruction(kwargs.get("role", "query"))
        prefixed = [prefix + t if t else None for t in texts]
        if any(t is None and im is None for t, im in zip(prefixed, items)):
            raise ValueError("every input needs a text or an image")
        out = self._run(
            prefixed, items, kwargs.get("batch_size") or self.batch_size, kwargs.get("show_progress", False)
        )
        return l2_normalize(out, f"{self.model_id} fused embeddings")
