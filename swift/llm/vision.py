"""Row maps for vision towers under a per-sample LoRA mixture.

Inside ``lora_mixture_context`` a text layer maps activation rows to samples by the batch dimension. A
vision tower does not see the text batch: its rows are images, tiles or patches of all samples together.
``vision_row_index`` reads the processor outputs and returns, for each vision module prefix, the sample
(batch position) of every leading row that module's linear layers receive:

* Qwen2-VL / Qwen2.5-VL (``model.visual``): the blocks see 2-D ``[sum_i t_i*h_i*w_i, dim]`` patch rows, images
  one after another in prompt order; the merger (``model.visual.merger``) views them as
  ``[sum_i t_i*h_i*w_i / m**2, m**2 * dim]`` (``m = spatial_merge_size``). Qwen2.5-VL reorders rows into
  attention windows before the blocks (``get_vision_window_index``) and un-permutes only after the merger; we
  apply the same permutation to the row map. It only moves rows within an image, so every row keeps its sample,
  but following it keeps the map right by construction.
* LLaVA / InternVL (``model.vision_tower``, ``model.multi_modal_projector``): 3-D
  ``[num_images_or_tiles, patches, dim]``; every image (LLaVA) or tile (InternVL) puts the same number of
  image tokens into its sample's ``input_ids``, so a row's sample follows from counting those tokens per row.

Which sample an image belongs to comes from ``input_ids``: the processor expands each image into its image
tokens in order, so walking the batch rows and consuming each image's token count assigns images to samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["VISION_LAYOUTS", "vision_row_index"]

# HF config.model_type -> how its vision tower lays out rows.
VISION_LAYOUTS: dict[str, str] = {
    "qwen2_vl": "patches",
    "qwen2_5_vl": "windowed_patches",
    "llava": "tiles",
    "internvl": "tiles",
}


def vision_row_index(model: nn.Module, inputs: Mapping[str, Any], batch_size: int) -> dict[str, torch.Tensor]:
    """Sample index of every row each vision module sees, for ``lora_mixture_context(row_index=...)``.

    Args:
        model: the VLM (a transformers model or a ``SwiftModel`` around one).
        inputs: the processor outputs for the batch: ``input_ids [batch, T]`` and ``pixel_values`` (Qwen:
            ``[sum patches, C*t*p*p]`` with ``image_grid_thw [num_images, 3]``; LLaVA/InternVL:
            ``[num_images_or_tiles, C, H, W]``).
        batch_size: number of samples the routing has (rows of ``input_ids``).

    Returns:
        ``{module_prefix: LongTensor [rows]}``; empty when the batch has no images.

    Raises:
        ValueError: an unsupported model, video inputs, ``input_ids`` missing or with another batch size, or
            image tokens that don't add up to the images/tiles in ``pixel_values``.
    """
    base = _unwrap(model)
    config = getattr(base, "config", None)
    hf_type = getattr(config, "model_type", None)
    layout = VISION_LAYOUTS.get(hf_type)
    if layout is None:
        raise ValueError(
            f"vision_row_index does not know the vision layout of model_type {hf_type!r}; supported: "
            f"{sorted(VISION_LAYOUTS)}."
        )
    if inputs.get("pixel_values_videos") is not None:
        raise ValueError(
            "video inputs (pixel_values_videos) are not supported under a LoRA mixture: the vision tower runs "
            "a second time for them with rows this map doesn't describe. Pass images only."
        )
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return {}
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != batch_size:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(
            f"vision_row_index needs input_ids of shape [batch_size={batch_size}, T] to assign images to samples, "
            f"got {shape}."
        )
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        raise ValueError(f"{type(base).__name__}.config has no image_token_id; cannot find image tokens.")
    tokens_per_sample = (input_ids.detach().cpu() == image_token_id).sum(dim=1)  # [batch]

    if layout in ("patches", "windowed_patches"):
        return _qwen_rows(
            base, config, inputs, pixel_values, tokens_per_sample, windowed=layout == "windowed_patches"
        )
    return _tile_rows(base, pixel_values, tokens_per_sample)


def _qwen_rows(
    base: nn.Module,
    config: Any,
    inputs: Mapping[str, Any],
    pixel_values: torch.Tensor,
    tokens_per_sample: torch.Tensor,
    *,
    windowed: bool,
) -> dict[str, torch.Tensor]:
    grid = inputs.get("image_grid_thw")
    if grid is None:
        raise ValueError(
            "Qwen-VL inputs with pixel_values need image_grid_thw [num_images, 3] (t, h, w per image)."
        )
    grid = torch.as_tensor(grid).detach().cpu().long()
    vision_config = config.vision_config
    merge = int(vision_config.spatial_merge_size)
    unit = merge * merge
    patches_per_image = grid.prod(dim=-1)  # [num_images]
    if int(patches_per_image.sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw describes {int(patches_per_image.sum())} patches but pixel_values has "
            f"{pixel_values.shape[0]} rows; pass the processor outputs unchanged."
        )
    merged_per_image = patches_per_image // unit  # tokens each image puts into input_ids
    image_sample = _assign_images(merged_per_image, tokens_per_sample)
    merged_rows = image_sample.repeat_interleave(merged_per_image)  # [sum patches / unit]
    if windowed:
        from transformers.vision_utils import get_vision_window_index

        # The blocks and the merger run in window order (the merger output is un-permuted afterwards).
        window_index, _ = get_vision_window_index(
            grid,
            spatial_merge_size=merge,
            window_size=int(vision_config.window_size),
            patch_size=int(vision_config.patch_size),
        )
        merged_rows = merged_rows[window_index.cpu()]
    patch_rows = merged_rows.repeat_interleave(unit)  # a merge unit's m*m patches are consecutive rows
    visual = _find_module(base, "visual")
    merger = f"{visual}.merger"
    _require_module(base, merger)
    return {visual: patch_rows, merger: merged_rows}


def _tile_rows(
    base: nn.Module, pixel_values: torch.Tensor, tokens_per_sample: torch.Tensor
) -> dict[str, torch.Tensor]:
    rows = pixel_values.shape[0]
    total = int(tokens_per_sample.sum())
    if rows == 0 or total % rows:
        raise ValueError(
            f"input_ids hold {total} image tokens for {rows} images/tiles in pixel_values; every image or tile "
            "must add the same number of image tokens. Pass the processor outputs unchanged."
        )
    per_row = total // rows
    if bool((tokens_per_sample % per_row).any()):
        raise ValueError(
            f"image tokens per sample {tokens_per_sample.tolist()} are not multiples of {per_row} tokens per "
            "image/tile; the batch's input_ids don't match its pixel_values."
        )
    samples = torch.arange(tokens_per_sample.shape[0]).repeat_interleave(tokens_per_sample // per_row)
    tower = _find_module(base, "vision_tower")
    projector = _find_module(base, "multi_modal_projector")
    return {tower: samples, projector: samples.clone()}


def _assign_images(tokens_per_image: torch.Tensor, tokens_per_sample: torch.Tensor) -> torch.Tensor:
    """Sample of each image: images come in prompt order, each taking its tokens from the current sample.

    Args:
        tokens_per_image: ``[num_images]`` image tokens each image expands to.
        tokens_per_sample: ``[batch]`` image tokens in each row of ``input_ids``.

    Returns:
        ``[num_images]`` long tensor of sample indices.
    """
    remaining = tokens_per_sample.tolist()
    sample = 0
    owners = []
    for count in tokens_per_image.tolist():
        while sample < len(remaining) and remaining[sample] == 0:
            sample += 1
        if sample == len(remaining) or remaining[sample] < count:
            raise ValueError(
                f"image tokens per sample {tokens_per_sample.tolist()} don't match the images' token counts "
                f"{tokens_per_image.tolist()}; pass the processor outputs for this batch unchanged."
            )
        remaining[sample] -= count
        owners.append(sample)
    if any(remaining):
        raise ValueError(
            f"input_ids hold image tokens {tokens_per_sample.tolist()} per sample but the images account for "
            f"{tokens_per_image.tolist()}; some image tokens have no image."
        )
    return torch.tensor(owners, dtype=torch.long)


def _unwrap(model: nn.Module) -> nn.Module:
    from swift.tuners.swift_model import SwiftModel

    # Only SwiftModel: transformers models also have a `base_model` attribute (their inner model).
    return model.base_model if isinstance(model, SwiftModel) else model


def _find_module(base: nn.Module, leaf: str) -> str:
    """Full name of the outermost sub-module called ``leaf`` (LoraLinear names are relative to ``base``)."""
    names = [name for name, _ in base.named_modules() if name.rsplit(".", 1)[-1] == leaf]
    if not names:
        raise ValueError(f"{type(base).__name__} has no sub-module named {leaf!r}; is it a supported VLM?")
    return min(names, key=len)


def _require_module(base: nn.Module, name: str) -> None:
    try:
        base.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{type(base).__name__} has no sub-module {name!r}; is it a supported VLM?") from err
