"""Batched generation, optionally with a per-sample mixture of LoRA adapters (LoraRetriever, Sec. 3.3).

``inference(model, template, queries, lora_mapping=..., adapter_names=...)`` encodes the queries in batches
(left padding), and runs ``generate`` for each batch inside ``lora_mixture_context`` with the batch's rows of
the routing matrix; for VLMs it also passes the vision row map built by ``vision_row_index``.

Beam search works under a mixture: text layers map the ``num_beams`` copies of a sample back to it, and
transformers 5 runs the vision encoder once on the unexpanded batch (before ``generate`` expands its inputs),
so the vision row map stays that of the batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from swift.llm.template import QueryImages, Template
from swift.llm.vision import vision_row_index
from swift.tuners.lora_layers import LoraLinear, lora_mixture_context
from swift.tuners.swift_model import SwiftModel
from swift.utils import get_logger

if TYPE_CHECKING:
    from transformers import GenerationConfig

logger = get_logger(__name__)

__all__ = ["default_generation_config", "inference"]


def default_generation_config() -> GenerationConfig:
    """Greedy decoding of at most 64 new tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=64, do_sample=False)


def inference(
    model: nn.Module,
    template: Template,
    queries: Sequence[str],
    images: Sequence[QueryImages] | None = None,
    *,
    lora_mapping: torch.Tensor | None = None,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 8,
    generation_config: GenerationConfig | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate one answer per query, in input order.

    Args:
        model: a transformers model or a ``SwiftModel`` (needed for ``lora_mapping``).
        template: from ``get_template`` for the model's type.
        queries: ``num_queries`` strings (``<image>`` tags mark image positions for VLMs).
        images: optional, one entry per query: a list of images, one image, or ``None``.
        lora_mapping: optional dense ``[num_queries, len(adapter_names)]`` routing weights (0 = adapter unused).
            Without it a ``SwiftModel`` applies its active adapters, as PEFT does.
        adapter_names: the adapter of each ``lora_mapping`` column.
        batch_size: queries per ``generate`` call.
        generation_config: defaults to greedy with ``max_new_tokens=64``; sampling if it sets ``do_sample``.
        progress: show a tqdm bar over batches.

    Returns:
        ``num_queries`` answers (special tokens removed, whitespace stripped).

    Raises:
        ValueError: bad ``batch_size``, ``images`` or ``lora_mapping`` (shape, missing ``adapter_names``, a
            model without LoRA layers, or adapters the model doesn't hold), or ``num_return_sequences > 1``.
    """
    if isinstance(queries, str):
        raise ValueError(
            f"queries must be a list of strings, got the string {queries[:40]!r}; wrap it in a list."
        )
    queries = list(queries)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if images is not None and len(images) != len(queries):
        raise ValueError(
            f"images has {len(images)} entries but there are {len(queries)} queries; pass one entry per query."
        )
    mapping = _check_mapping(model, lora_mapping, adapter_names, len(queries))
    config = _generation_config(model, template, generation_config)
    device = _model_device(model)

    answers: list[str] = []
    starts = range(0, len(queries), batch_size)
    for start in tqdm(starts, desc="inference", unit="batch", disable=not progress):
        stop = min(start + batch_size, len(queries))
        batch = template.encode_batch(queries[start:stop], None if images is None else images[start:stop])
        row_index = None
        if mapping is not None and template.is_multimodal:
            row_index = vision_row_index(model, batch, stop - start)
        batch = {key: value.to(device) for key, value in batch.items()}
        if mapping is None:
            routing = contextlib.nullcontext()
        elif isinstance(model, SwiftModel):
            routing = model.mixture(mapping[start:stop], adapter_names, row_index=row_index)
        else:
            routing = lora_mixture_context(mapping[start:stop], adapter_names, row_index=row_index)
        with torch.inference_mode(), routing:
            output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # [batch, new]: left padding aligns the prompts
        answers.extend(template.decode(row) for row in new_tokens)
    return answers


def _check_mapping(
    model: nn.Module,
    lora_mapping: torch.Tensor | None,
    adapter_names: Sequence[str] | None,
    num_queries: int,
) -> torch.Tensor | None:
    if lora_mapping is None:
        if adapter_names is not None:
            logger.warning("adapter_names given without lora_mapping; running without a mixture.")
        return None
    if adapter_names is None or isinstance(adapter_names, str):
        raise ValueError(
            f"lora_mapping needs adapter_names (a list with one name per column), got {adapter_names!r}."
        )
    mapping = torch.as_tensor(lora_mapping)
    if mapping.dim() != 2 or mapping.shape != (num_queries, len(adapter_names)):
        raise ValueError(
            f"lora_mapping must have shape [num_queries, len(adapter_names)] = [{num_queries}, "
            f"{len(adapter_names)}], got {tuple(mapping.shape)}."
        )
    if not any(isinstance(module, LoraLinear) for module in model.modules()):
        raise ValueError(
            f"lora_mapping was given but {type(model).__name__} holds no LoRA layers; load the adapters with "
            "swift.Swift.from_pretrained first."
        )
    return mapping


def _generation_config(
    model: nn.Module, template: Template, generation_config: GenerationConfig | None
) -> GenerationConfig:
    config = default_generation_config() if generation_config is None else copy.deepcopy(generation_config)
    if (config.num_return_sequences or 1) > 1:
        raise ValueError(
            f"inference returns one answer per query; got num_return_sequences={config.num_return_sequences}. "
            "Set it to 1 (beam search with num_beams > 1 is fine)."
        )
    tokenizer = template.tokenizer
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        model_config = getattr(model, "generation_config", None)
        eos = getattr(model_config, "eos_token_id", None)
        config.eos_token_id = eos if eos is not None else tokenizer.eos_token_id
    return config


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
