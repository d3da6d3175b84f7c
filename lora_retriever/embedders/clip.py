"""A transformers CLIP model from a local folder: text and image towers projected into one space.

Text vectors are ``CLIPModel.get_text_features`` (the projected end-of-text token), image vectors
``get_image_features`` (the projected class token); both L2-normalised, so text-image cosine is what CLIP
was trained to score. No query/document prompts and, by default, no instruction prefix (CLIP was not
trained with one and has a 77-token text window).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_retriever.embedders.adapter import LoraAdapterMixin
from lora_retriever.embedders.base import (
    Embedder,
    batch_starts,
    model_id_from_path,
    torch_dtype,
    warn_if_slow_dtype,
)
from lora_retriever.embedders.config import EmbedderConfig

if TYPE_CHECKING:
    from PIL.Image import Image
    from torch import nn

__all__ = ["ClipEmbedder"]

logger = logging.getLogger(__name__)


class ClipEmbedder(LoraAdapterMixin, Embedder):
    """CLIP (``CLIPModel`` + ``CLIPProcessor``) from a local directory.

    Args:
        config: ``backend="clip"`` with ``model_path`` a folder written by ``CLIPModel.save_pretrained`` and
            ``CLIPProcessor.save_pretrained``.

    Raises:
        ValueError: ``model_path`` is missing.
        FileNotFoundError: ``model_path`` is not a directory with a ``config.json``.
    """

    backend = "clip"
    supports_images = True
    default_instruction = ""

    def __init__(self, config: EmbedderConfig):
        super().__init__(config)
        if config.model_path is None:
            raise ValueError(
                "backend='clip' needs model_path: a local folder with a CLIP model and its processor "
                "(CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)"
            )
        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP model_path {str(path)!r} is not a model directory (no config.json); pass a folder "
                "written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
            )
        import torch
        from transformers import CLIPModel, CLIPProcessor

        warn_if_slow_dtype(config.device, config.dtype)
        self.model_path = str(path)
        self.model = CLIPModel.from_pretrained(
            str(path), dtype=torch_dtype(config.dtype), local_files_only=True
        )
        self.model.to(torch.device(config.device)).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        self.model_id = config.model_id or model_id_from_path(path)
        self.dim = int(self.model.config.projection_dim)
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)
        if config.adapter_path is not None:
            self.load_adapter(config.adapter_path)

    def _adapter_target(self) -> nn.Module:
        return self.model

    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        import torch

        out = []
        for start in batch_starts(len(texts), batch_size, show_progress, "CLIP texts"):
            enc = self.processor.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            ).to(self.model.device)
            with torch.inference_mode():
                out.append(_features(self.model.get_text_features(**enc)).float().cpu())
        return torch.cat(out)

    def _encode_images(self, images: list[Image], batch_size: int, show_progress: bool) -> Any:
        import torch

        out = []
        for start in batch_starts(len(images), batch_size, show_progress, "CLIP images"):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.model.device, dtype=self.model.dtype)
            with torch.inference_mode():
                out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(out)


def _features(out: Any) -> Any:
    """transformers 5 returns a ModelOutput whose ``pooler_output`` holds the projected features; older
    versions return the tensor itself."""
    return out if hasattr(out, "detach") else out.pooler_output
