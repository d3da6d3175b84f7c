"""Universal multimodal retrievers in UniIR's two designs (Wei et al., "UniIR", 2023, §4.1), built from this
project's offline parts: CLIP-SF (score-level fusion) and CLIP-FF (feature-level fusion).

* **Text tower**: the packaged all-MiniLM-L6-v2 (a 6-layer BERT, 384-d), fine-tuned through a PEFT LoRA on its
  attention ``query`` / ``value`` projections; token states ``[B, T, 384]``.
* **Image tower**: a small ViT (``transformers.CLIPVisionModel`` built from a config, 2-D sin-cos patch
  positions as the VLM build's stage 1), trained here, with a linear map of its patch states into the text
  tower's width; patch tokens ``[B, P, 384]``.
* **SF** (score-level fusion): text vector ``t`` = the mean of the text tokens (MiniLM's own pooling), image
  vector ``v`` = the mean of the patch tokens, each L2-normalised; an item is ``t``, ``v``, or
  ``normalise(t + v)`` when it has both (UniIR's ``txt_emb + img_emb``: the inner product with a fused vector is
  the sum of the two modalities' scores, up to the final norm).
* **FF** (feature-level fusion): one small transformer over the concatenated text and patch tokens (plus a
  learned modality embedding), then the masked mean over the tokens present, normalised. Its residual
  branches start at zero (out-projections and modality embeddings zero-initialised), so an untrained FF is
  exactly MiniLM's embedding on a text-only item and the SF image vector on an image-only item; training moves
  it from there.

Every output is ``[B, dim]`` float32 with unit rows. Checkpoints: :func:`save_retriever` /
:func:`load_retriever` (``retriever_config.json`` + ``model.safetensors`` + ``text_adapter/``, an ordinary
PEFT adapter directory for the MiniLM text tower).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_retriever.mbeir.config import FUSIONS, RetrieverConfig
from swift.utils import get_logger
from swift.utils.files import replace_dir, temp_name

if TYPE_CHECKING:
    from PIL.Image import Image

logger = get_logger(__name__)

__all__ = [
    "CONFIG_NAME",
    "FUSIONS",
    "RetrieverConfig",
    "UniversalRetriever",
    "checkpoint_digest",
    "image_pixels",
    "read_checkpoint_meta",
    "load_retriever",
    "save_retriever",
    "text_width",
]

CONFIG_NAME = "retriever_config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_ADAPTER_DIR = "text_adapter"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# towers
# ----------------------------------------------------------------------------------------------------------


def _text_model_path(config: RetrieverConfig) -> Path:
    if config.text_model_path is not None:
        path = Path(config.text_model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text_model_path {str(path)!r} has no config.json; pass a local sentence-transformers / BERT "
                "folder, or none for the packaged all-MiniLM-L6-v2"
            )
        return path
    from lora_retriever.embedders.sentence_transformers import default_model_path

    return default_model_path()


def text_width(config: RetrieverConfig) -> int:
    """The text tower's width (the embedding dimension), read from its config without loading weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(_text_model_path(config)), local_files_only=True).hidden_size)


class TextTower(nn.Module):
    """MiniLM (or another BERT-style encoder) with an optional LoRA: texts -> token states ``[B, T, D]``."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = _text_model_path(config)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        encoder.requires_grad_(False)
        if config.lora_r:
            from peft import LoraConfig, get_peft_model

            n_layers = int(encoder.config.num_hidden_layers)
            if config.lora_layers > n_layers:
                raise ValueError(
                    f"lora_layers {config.lora_layers} exceeds the text tower's {n_layers} layers"
                )
            top = list(range(n_layers - config.lora_layers, n_layers)) if config.lora_layers else None
            lora = LoraConfig(
                layers_to_transform=top,
                layers_pattern="layer" if top else None,
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
                lora_dropout=0.0,
                bias="none",
            )
            encoder = get_peft_model(encoder, lora)
        self.encoder = encoder
        self.max_tokens = config.max_text_tokens
        self.width = int(encoder.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, each ``[B, T]``, padded to the longest text."""
        out = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ids and mask -> ``[B, T, D]`` last hidden states."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class ImageTower(nn.Module):
    """A small ViT and a linear map into the text width: pixels ``[B, 3, S, S]`` -> patch tokens ``[B, P, D]``."""

    def __init__(self, config: RetrieverConfig, width: int) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from lora_retriever.vlm.pretrain import init_position_embeddings

        vision = CLIPVisionConfig(
            hidden_size=config.vision_hidden_size,
            intermediate_size=config.vision_intermediate_size,
            num_hidden_layers=config.vision_layers,
            num_attention_heads=config.vision_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=3,
        )
        self.vit = CLIPVisionModel(vision)
        init_position_embeddings(self.vit)
        self.proj = nn.Linear(config.vision_hidden_size, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        states = self.vit(pixel_values=pixels).last_hidden_state  # [B, 1 + P, H]
        return self.proj(states[:, 1:])  # the patches, without the class token


class FusionEncoder(nn.Module):
    """CLIP-FF's fusion: a transformer over ``[text tokens | patch tokens]``, then the masked mean.

    Residual branches (attention out-projections, second MLP linears) and the modality embeddings start at
    zero: the untrained encoder is the identity, so its output is the plain masked mean of the input tokens.
    """

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion_heads {heads} must divide the text width {width}")
        self.modality = nn.Embedding(2, width)  # 0: text token, 1: image token
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        with torch.no_grad():
            self.modality.weight.zero_()
            for block in self.layers.layers:
                block.self_attn.out_proj.weight.zero_()
                block.self_attn.out_proj.bias.zero_()
                block.linear2.weight.zero_()
                block.linear2.bias.zero_()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, D]``, ``mask [B, L]`` (1 = present), ``kinds [B, L]`` (0 text, 1 image) -> ``[B, D]``
        (not normalised)."""
        hidden = self.layers(tokens + self.modality(kinds), src_key_padding_mask=~mask.bool())
        return masked_mean(hidden, mask)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` and ``[B, L]`` -> the mean of each row's present tokens ``[B, D]``."""
    mask = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def image_pixels(images: list[Image], size: int) -> torch.Tensor:
    """PIL images -> ``[B, 3, size, size]`` float32 in ``[-1, 1]`` (bilinear resize, RGB)."""
    from PIL import Image as PILImage

    if not images:
        return torch.zeros(0, 3, size, size)
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), PILImage.Resampling.BILINEAR), dtype=np.float32)
        for im in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (pixels - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------------------
# the retriever
# ----------------------------------------------------------------------------------------------------------


class UniversalRetriever(nn.Module):
    """One encoder for queries and candidates of every modality (text, image, or both).

    Attributes:
        config: its :class:`RetrieverConfig`.
        dim: the embedding width (the text tower's: 384 for MiniLM).
        logit_scale: log of the InfoNCE inverse temperature (learned, as CLIP's; starts at ``log(1/0.05)``).
    """

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.config = config
        torch.manual_seed(config.seed)
        self.text = TextTower(config)
        self.dim = self.text.width
        self.image = ImageTower(config, self.dim)
        self.fusion = (
            FusionEncoder(self.dim, config.fusion_layers, config.fusion_heads)
            if config.fusion == "ff"
            else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.05)))

    def embed(
        self, texts: list[str | None], pixels: torch.Tensor | None, has_image: list[bool]
    ) -> torch.Tensor:
        """Embed ``B`` items.

        Args:
            texts: ``B`` entries, a string or ``None`` (no text).
            pixels: ``[n_images, 3, S, S]`` for the items with ``has_image`` (in order), or ``None`` if none.
            has_image: ``B`` flags.

        Returns:
            ``[B, dim]`` unit rows.

        Raises:
            ValueError: an item with neither text nor image, or a pixel count that disagrees with ``has_image``.
        """
        n = len(texts)
        if len(has_image) != n:
            raise ValueError(f"texts has {n} items but has_image {len(has_image)}; give one flag per item")
        text_idx = [i for i, t in enumerate(texts) if t]
        image_idx = [i for i in range(n) if has_image[i]]
        empty = sorted(set(range(n)) - set(text_idx) - set(image_idx))
        if empty:
            raise ValueError(f"items {empty[:10]} have neither text nor image; every item needs one")
        n_pixels = 0 if pixels is None else len(pixels)
        if n_pixels != len(image_idx):
            raise ValueError(f"{len(image_idx)} items have an image but {n_pixels} images were given")
        device = self.logit_scale.device
        text_tokens = text_mask = image_tokens = None
        if text_idx:
            batch = self.text.tokenize([texts[i] for i in text_idx])
            text_mask = batch["attention_mask"].to(device)
            text_tokens = self.text(batch["input_ids"].to(device), text_mask)
        if image_idx:
            image_tokens = self.image(pixels.to(device))
        if self.fusion is None:
            out = torch.zeros(n, self.dim, device=device)
            if text_idx:
                out = out.index_add(
                    0, torch.tensor(text_idx), F.normalize(masked_mean(text_tokens, text_mask), dim=-1)
                )
            if image_idx:
                out = out.index_add(0, torch.tensor(image_idx), F.normalize(image_tokens.mean(dim=1), dim=-1))
            return F.normalize(out, dim=-1)
        return F.normalize(self._fuse(n, text_idx, text_tokens, text_mask, image_idx, image_tokens), dim=-1)

    def _fuse(
        self,
        n: int,
        text_idx: list[int],
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        image_idx: list[int],
        image_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """The FF joint sequence ``[text tokens (T) | patch tokens (P)]`` per item, absent parts masked out."""
        device = self.logit_scale.device
        t_len = 0 if text_tokens is None else text_tokens.shape[1]
        p_len = 0 if image_tokens is None else image_tokens.shape[1]
        tokens = torch.zeros(n, t_len + p_len, self.dim, device=device)
        mask = torch.zeros(n, t_len + p_len, dtype=torch.long, device=device)
        kinds = torch.zeros(n, t_len + p_len, dtype=torch.long, device=device)
        kinds[:, t_len:] = 1
        if text_idx:
            rows = torch.tensor(text_idx, device=device)
            tokens[rows, :t_len] = text_tokens
            mask[rows, :t_len] = text_mask
        if image_idx:
            rows = torch.tensor(image_idx, device=device)
            tokens[rows, t_len:] = image_tokens
            mask[rows, t_len:] = 1
        return self.fusion(tokens, mask, kinds)

    def embed_items(self, texts: list[str | None], images: list[Image | None]) -> torch.Tensor:
        """Embed items given as texts and PIL images (``None`` where absent): ``[B, dim]`` unit rows."""
        present = [im for im in images if im is not None]
        pixels = image_pixels(present, self.config.image_size) if present else None
        return self.embed(texts, pixels, [im is not None for im in images])


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------


def _own_state(model: UniversalRetriever) -> dict[str, torch.Tensor]:
    """Everything but the text tower (its base weights are the packaged model's; its LoRA is a PEFT dir)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("text.")}


def save_retriever(
    model: UniversalRetriever,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/{retriever_config.json, model.safetensors, text_adapter/}`` (staged, then renamed).

    ``extra`` (e.g. the training run's settings and losses) is stored under ``"training"`` in the config file.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"checkpoint folder {str(out_dir)!r} is not empty; pass --overwrite to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(out_dir)
    staging.mkdir()
    try:
        save_file(_own_state(model), str(staging / WEIGHTS_NAME))
        if model.config.lora_r:
            model.text.encoder.save_pretrained(str(staging / TEXT_ADAPTER_DIR))
        meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "training": extra or {}}
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def checkpoint_digest(path: str | Path) -> str:
    """A short hash of a checkpoint's weights and config: two checkpoints with one digest embed alike."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / CONFIG_NAME, path / WEIGHTS_NAME, *sorted((path / TEXT_ADAPTER_DIR).glob("*"))]
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            data = file.read_bytes()
            if file.name == CONFIG_NAME:  # the training log (times) does not change the weights
                data = json.dumps(json.loads(data)["config"], sort_keys=True).encode()
            digest.update(data)
    return digest.hexdigest()[:12]


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``retriever_config.json``.

    Raises:
        FileNotFoundError: not a checkpoint folder.
        ValueError: an unreadable or newer-format config.
    """
    path = Path(path).expanduser()
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a retriever checkpoint (no {CONFIG_NAME}); pass a folder written by "
            "'python -m lora_retriever.mbeir train'"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return meta


def load_retriever(path: str | Path) -> UniversalRetriever:
    """Rebuild a retriever from :func:`save_retriever`'s folder (eval mode).

    Raises:
        FileNotFoundError / ValueError: not a checkpoint, or weights that do not fit its config.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    meta = read_checkpoint_meta(path)
    config = RetrieverConfig.from_dict(meta["config"])
    model = UniversalRetriever(config)
    if config.lora_r:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file as load_adapter

        adapter = path / TEXT_ADAPTER_DIR / "adapter_model.safetensors"
        if not adapter.is_file():
            raise FileNotFoundError(
                f"checkpoint {str(path)!r} lacks {TEXT_ADAPTER_DIR}/adapter_model.safetensors"
            )
        result = set_peft_model_state_dict(model.text.encoder, load_adapter(str(adapter)))
        if result.unexpected_keys:
            raise ValueError(
                f"{adapter}: weights that fit no text tower module: {result.unexpected_keys[:5]}"
            )
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
    missing = [k for k in missing if not k.startswith("text.")]
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS_NAME} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()
