"""Batched generation, optionally with a per-sample mixture of LoRA adapters (LoraRetriever, Sec. 3.3).

``inference(model, template, queries, routing=...)`` is the one batching level of the project: it encodes
the queries in batches (left padding) and runs ``generate`` for each batch inside ``lora_mixture_context``
with the batch's rows of the routing; for VLMs it also passes the vision row map built by
``vision_row_index``. With ``on_error="isolate"`` a failing batch is retried sample by sample, so one bad
input costs only itself (its error is kept in ``Answers.errors``).

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
from swift.tuners.lora_layers import LoraLinear, LoraRouting, lora_mixture_context
from swift.tuners.swift_model import SwiftModel
from swift.utils import get_logger

if TYPE_CHECKING:
    from transformers import GenerationConfig

logger = get_logger(__name__)

__all__ = ["Answers", "default_generation_config", "inference"]


def default_generation_config() -> GenerationConfig:
    """Greedy decoding of at most 64 new tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=64, do_sample=False)


class Answers(list):
    """The answers of ``inference`` (a ``list[str]``, input order) and, per answer, the error that replaced
    it (``None`` when it was generated; ``""`` stands in the list for a failed one)."""

    def __init__(self, answers: Sequence[str], errors: Sequence[str | None] | None = None):
        super().__init__(answers)
        self.errors: list[str | None] = list(errors) if errors is not None else [None] * len(answers)


def inference(
    model: nn.Module,
    template: Template,
    queries: Sequence[str],
    images: Sequence[QueryImages] | None = None,
    *,
    routing: LoraRouting | None = None,
    lora_mapping: torch.Tensor | None = None,
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 8,
    generation_config: GenerationConfig | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> Answers:
    """Generate one answer per query, in input order.

    Args:
        model: a transformers model or a ``SwiftModel`` (needed for a routing).
        template: from ``get_template`` for the model's type.
        queries: ``num_queries`` strings (``<image>`` tags mark image positions for VLMs).
        images: optional, one entry per query: a list of images, one image, or ``None``.
        routing: optional per-sample ``LoraRouting`` with ``num_queries`` rows. Without it a ``SwiftModel``
            applies its active adapters, as PEFT does.
        lora_mapping / adapter_names: the same routing as the paper's dense ``[num_queries, len(adapter_names)]``
            weight matrix (0 = adapter unused); converted once with ``LoraRouting.from_dense``.
        batch_size: queries per ``generate`` call.
        generation_config: defaults to greedy with ``max_new_tokens=64``; sampling if it sets ``do_sample``.
        on_error: ``"raise"`` (default), or ``"isolate"``: a failing batch is retried one query at a time and
            each query that still fails gets ``""`` with its error in ``Answers.errors``.
        progress: show a tqdm bar over batches.

    Returns:
        ``Answers``: ``num_queries`` answers (special tokens removed, whitespace stripped).

    Raises:
        ValueError: bad ``batch_size``, ``images``, ``on_error`` or routing (rows, both forms given, a model
            without LoRA layers, or adapters the model doesn't hold), or ``num_return_sequences > 1``.
    """
    if isinstance(queries, str):
        raise ValueError(
            f"queries must be a list of strings, got the string {queries[:40]!r}; wrap it in a list."
        )
    queries = list(queries)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if on_error not in ("raise", "isolate"):
        raise ValueError(f"on_error must be 'raise' or 'isolate', got {on_error!r}.")
    if images is not None and len(images) != len(queries):
        raise ValueError(
            f"images has {len(images)} entries but there are {len(queries)} queries; pass one entry per query."
        )
    routing = _check_routing(model, routing, lora_mapping, adapter_names, len(queries))
    config = _generation_config(model, template, generation_config)

    def run(start: int, stop: int) -> list[str]:
        batch_images = None if images is None else images[start:stop]
        return _generate_batch(model, template, queries[start:stop], batch_images, routing, start, config)

    answers: list[str] = []
    errors: list[str | None] = []
    starts = range(0, len(queries), batch_size)
    for start in tqdm(starts, desc="inference", unit="batch", disable=not progress):
        stop = min(start + batch_size, len(queries))
        if on_error == "raise":
            answers.extend(run(start, stop))
            errors.extend([None] * (stop - start))
            continue
        try:
            answers.extend(run(start, stop))
            errors.extend([None] * (stop - start))
        except Exception as err:  # isolate: retry one by one; every failure is recorded, none skipped
            logger.warning("batch of queries %d..%d failed (%s); retrying one by one", start, stop - 1, err)
            for i in range(start, stop):
                try:
                    answers.extend(run(i, i + 1))
                    errors.append(None)
                except Exception as one_err:
                    answers.append("")
                    errors.append(f"{type(one_err).__name__}: {one_err}")
                    logger.error("query %d failed: %s", i, errors[-1])
    return Answers(answers, errors)


def _generate_batch(
    model: nn.Module,
    template: Template,
    queries: list[str],
    images: Sequence[QueryImages] | None,
    routing: LoraRouting | None,
    offset: int,
    config: GenerationConfig,
) -> list[str]:
    """One ``generate`` call on ``queries`` (rows ``offset..`` of the routing)."""
    batch = template.encode_batch(queries, images)
    if routing is None:
        context = contextlib.nullcontext()
    else:
        rows = routing.rows(offset, offset + len(queries))
        row_index = vision_row_index(model, batch, len(queries)) if template.is_multimodal else None
        if isinstance(model, SwiftModel):
            context = model.mixture(rows, row_index=row_index)
        else:
            context = lora_mixture_context(rows, row_index=row_index)
    device = _model_device(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.inference_mode(), context:
        output = model.generate(**batch, generation_config=config)
    new_tokens = output[:, batch["input_ids"].shape[1] :]  # [batch, new]: left padding aligns the prompts
    return [template.decode(row) for row in new_tokens]


def _check_routing(
    model: nn.Module,
    routing: LoraRouting | None,
    lora_mapping: torch.Tensor | None,
    adapter_names: Sequence[str] | None,
    num_queries: int,
) -> LoraRouting | None:
    """The one validation of the routing: ``LoraRouting``'s constructors check names, shapes and values."""
    if routing is not None and lora_mapping is not None:
        raise ValueError("pass either routing=LoraRouting(...) or lora_mapping=..., not both.")
    if lora_mapping is not None:
        if adapter_names is None or isinstance(adapter_names, str):
            raise ValueError(
                f"lora_mapping needs adapter_names (a list with one name per column), got {adapter_names!r}."
            )
        routing = LoraRouting.from_dense(lora_mapping, adapter_names)
    elif adapter_names is not None:
        logger.warning("adapter_names given without lora_mapping; running without a mixture.")
    if routing is None:
        return None
    if routing.batch_size != num_queries:
        raise ValueError(
            f"the routing has {routing.batch_size} rows for {num_queries} queries; give one row per query."
        )
    if not any(isinstance(module, LoraLinear) for module in model.modules()):
        raise ValueError(
            f"a routing was given but {type(model).__name__} holds no LoRA layers; load the adapters with "
            "swift.Swift.from_pretrained first."
        )
    return routing


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
