"""An image-only embedder: the vision tower of a local VLM (or a plain CLIP / SigLIP vision model).

Image-aware retrieval fuses scores, not vectors (DESIGN.md, "Image-aware retrieval is score-level fusion"):
``sim = a * cos(text_q, text_key) + (1 - a) * cos(image_q, image_key)``, so the image embedder needs no text
tower and no shared space with the text embedder. Any VLM's vision tower qualifies, including the small
LLaVA built in this repository (``lora_retriever.vlm``) and a user's LLaVA checkpoint.

An image's vector is the mean over its tokens of the features the VLM feeds its projector: the vision
tower's hidden state at ``config.vision_feature_layer`` (several layers are concatenated, as LLaVA does),
without the class token under the ``"default"`` select strategy; L2-normalised. For a plain
``CLIPVisionModel`` / ``SiglipVisionModel`` directory it is the mean of ``last_hidden_state``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lora_retriever.embedders.base import (
    Embedder,
    UnsupportedInputError,
    batch_starts,
    model_id_from_path,
    torch_dtype,
    warn_if_slow_dtype,
)
from lora_retriever.embedders.config import EmbedderConfig, validate_vision_dir

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["VisionTowerEmbedder"]

logger = logging.getLogger(__name__)


class VisionTowerEmbedder(Embedder):
    """Mean-pooled vision-tower features of a local LLaVA, CLIP-vision or SigLIP-vision directory.

    Loading a LLaVA directory loads the whole VLM once (transformers maps its checkpoint keys), keeps the
    vision tower and drops the rest.

    Args:
        config: ``backend="vision-tower"``; ``model_path`` a LLaVA folder (model + processor, as
            ``save_pretrained`` writes them) or a vision model folder with its image processor.

    Attributes:
        feature_layers: the hidden-state indices pooled (``None``: ``last_hidden_state``).
        drop_cls: whether the first (class) token is left out before pooling.

    Raises:
        ValueError / FileNotFoundError: ``model_path`` missing, not a vision model, or without an image
            processor (see ``validate_vision_dir``).
    """

    backend = "vision-tower"
    supports_images = True
    supports_texts = False
    default_instruction = ""

    def __init__(self, config: EmbedderConfig):
        super().__init__(config)
        if config.model_path is None:
            raise ValueError("backend='vision-tower' needs model_path (a local LLaVA or vision model folder)")
        path, model_type = validate_vision_dir(config.model_path)
        import torch
        from transformers import AutoImageProcessor, AutoModel

        warn_if_slow_dtype(config.device, config.dtype)
        dtype = torch_dtype(config.dtype)
        self.model_path = str(path)
        if model_type == "llava":
            from transformers import LlavaForConditionalGeneration

            vlm = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            self.tower = vlm.model.vision_tower
            layer = vlm.config.vision_feature_layer
            self.feature_layers: list[int] | None = [layer] if isinstance(layer, int) else list(layer)
            self.drop_cls = vlm.config.vision_feature_select_strategy == "default"
            del vlm
        else:
            self.tower = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            self.feature_layers = None
            self.drop_cls = False
        self.tower.to(torch.device(config.device)).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.model_id = config.model_id or model_id_from_path(path)
        hidden = int(self.tower.config.hidden_size)
        self.dim = hidden * (len(self.feature_layers) if self.feature_layers else 1)
        logger.info(
            "vision-tower embedder %s: %s, %d-d (%s)",
            self.model_id,
            type(self.tower).__name__,
            self.dim,
            "last hidden state" if self.feature_layers is None else f"hidden states {self.feature_layers}",
        )

    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        raise UnsupportedInputError(
            f"the vision-tower embedder ({self.model_id}) embeds images only, not texts; use it as the "
            "retriever's image_embedder (--image_embedder vision-tower) next to a text embedder"
        )

    def _encode_images(self, images: list[Image], batch_size: int, show_progress: bool) -> Any:
        import torch

        out = []
        for start in batch_starts(len(images), batch_size, show_progress, "image embeddings"):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.tower.device, dtype=self.tower.dtype)
            with torch.inference_mode():
                out.append(self._pool(pixels).float().cpu())
        return torch.cat(out)

    def _pool(self, pixels: Any) -> Any:
        """``[b, 3, H, W]`` pixels -> ``[b, dim]`` mean token features (not normalised)."""
        import torch

        if self.feature_layers is None:
            return self.tower(pixel_values=pixels).last_hidden_state.mean(dim=1)
        hidden = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        start = 1 if self.drop_cls else 0
        return torch.cat([hidden[i][:, start:].mean(dim=1) for i in self.feature_layers], dim=-1)
