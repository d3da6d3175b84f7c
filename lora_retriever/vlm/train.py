"""Stage 2 of the build: align the projector (and optionally the tower) through the frozen LM; held-out accuracy.

The loss is LLaVA's: next-token cross-entropy on the answer tokens of ``(image, question, answer)`` triples
rendered by the model's chat template. The projector learns at ``recipe.learning_rate``; the (stage-1) vision
tower only at ``recipe.tower_lr_scale`` times that (0 freezes it, as LLaVA's alignment stage does): measured
here, letting the LM's gradients reach the freshly pre-trained tower at the projector's rate undid what stage 1
had learnt (held-out digits 92 % -> 38 %), while a small fraction helped a little.

Why not ``lora_retriever.training.train``: that loop trains PEFT LoRA adapters read from a dataset file and
saves an adapter; here the trainable parameters are whole modules of the model (no adapter), the examples
are in memory, and the result is the model itself. The pieces that fit are shared: the template's
``encode_example`` (loss on the answer tokens only), the padding ``collate``, and ``linear_schedule``.

Two savings that don't change the loss:

* logits only at answer positions (``logits_to_keep``): the 49k-word output head is a fifth of SmolLM2's
  compute per token;
* the prompt's text before the first image (system prompt and user header, the same in every example) runs
  through the frozen LM once; every step continues from its cached keys/values. No gradient reaches those
  tokens anyway (nothing before them trains), so the loss and its gradients equal a full forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_retriever.training.data import IGNORE_INDEX, EncodedExample, collate
from lora_retriever.training.trainer import linear_schedule
from lora_retriever.vlm.recipe import VlmRecipe
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["EVAL_BATCH_SIZE", "Example", "align_vision", "encode_examples", "heldout_accuracy"]

#: Queries per ``generate`` call in ``heldout_accuracy`` (padding changes last bits: reproduce with the same size).
EVAL_BATCH_SIZE = 16

#: ``(image, question, answer)``: a PIL image, the question text, the expected short answer.
Example = tuple[Any, str, str]
StepCallback = Callable[[int, float], None]


def encode_examples(
    template: Any, examples: Sequence[Example], *, progress: bool = False
) -> list[EncodedExample]:
    """Encode ``(image, question, answer)`` triples with the VLM's template (image first, then the question).

    Returns:
        One example per triple: ``input_ids``, ``attention_mask``, ``labels`` ``[T]`` (``-100`` on the prompt)
        and ``pixel_values`` ``[1, 3, H, W]``.
    """
    from tqdm.auto import tqdm

    return [
        template.encode_example(question, answer, [image])
        for image, question, answer in tqdm(examples, desc="encode", unit="example", disable=not progress)
    ]


def align_vision(
    model: nn.Module,
    examples: Sequence[EncodedExample],
    recipe: VlmRecipe,
    *,
    pad_token_id: int,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train ``model``'s projector (and its vision tower when ``recipe.tower_lr_scale > 0``) for ``recipe.steps``
    AdamW steps; the LM stays frozen.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        examples: encoded examples (``encode_examples``).
        recipe: batch size, steps, learning rates, warmup, weight decay, clipping and the data-order seed.
        pad_token_id: the tokenizer's pad id (right padding).
        progress: show a progress bar with the loss.
        on_step: called as ``on_step(step, loss)`` after every step.

    Returns:
        The loss (mean over the answer tokens of the batch) of every step.

    Raises:
        ValueError: no examples.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("align_vision got no examples; pass at least one encoded example.")
    inner = model.model
    model.requires_grad_(False)
    groups = [(inner.multi_modal_projector, recipe.learning_rate)]
    if recipe.tower_lr_scale > 0:
        groups.append((inner.vision_tower, recipe.learning_rate * recipe.tower_lr_scale))
    trainable_modules = [module for module, _ in groups]
    for module in trainable_modules:
        module.requires_grad_(True)
    params = [p for module in trainable_modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": list(module.parameters()), "lr": lr} for module, lr in groups],
        weight_decay=recipe.weight_decay,
    )
    warmup = math.ceil(recipe.warmup_ratio * recipe.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, recipe.steps))
    prefix_len = _shared_prefix_length(examples, model.config.image_token_id)
    prefix_cache = _prefix_states(model, examples[0]["input_ids"][:prefix_len])
    per_epoch = math.ceil(len(examples) / recipe.batch_size)

    losses: list[float] = []
    model.eval()  # no dropout anywhere; the LM's eval mode is what inference sees
    for module in trainable_modules:
        module.train()
    started = time.perf_counter()
    bar = tqdm(total=recipe.steps, desc="align through the LM", unit="step", disable=not progress)
    with bar:
        for step in range(recipe.steps):
            epoch, index = divmod(step, per_epoch)
            order = np.random.default_rng([recipe.seed, epoch]).permutation(len(examples))
            batch = [examples[i] for i in order[index * recipe.batch_size : (index + 1) * recipe.batch_size]]
            loss = _answer_loss(model, collate(batch, pad_token_id), prefix_len, prefix_cache)
            loss.backward()
            if recipe.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=True)
            if on_step is not None:
                on_step(step + 1, losses[-1])
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "aligned %s: %d steps in %.0f s, loss %.4f -> %.4f",
        " + ".join(type(module).__name__ for module in trainable_modules),
        recipe.steps,
        time.perf_counter() - started,
        losses[0],
        float(np.mean(losses[-10:])),
    )
    return losses


def _shared_prefix_length(examples: Sequence[EncodedExample], image_token_id: int) -> int:
    """Tokens before the first image token that every example shares (0 if they differ at once)."""
    first = examples[0]["input_ids"]
    image_positions = (first == image_token_id).nonzero()
    length = int(image_positions[0]) if len(image_positions) else 0
    for example in examples[1:]:
        ids = example["input_ids"]
        same = ids[:length] == first[: min(length, ids.shape[0])]
        if not bool(same.all()):
            length = int((~same).nonzero()[0])
    return length


@torch.no_grad()
def _prefix_states(
    model: nn.Module, prefix_ids: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The frozen LM's keys/values for ``prefix_ids`` ``[P]``: per layer ``(k, v)`` ``[1, heads, P, head_dim]``."""
    if prefix_ids.numel() == 0:
        return ()
    output = model.model.language_model(input_ids=prefix_ids[None], use_cache=True)
    cache = output.cache
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _answer_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    prefix_len: int,
    prefix_states: tuple[tuple[torch.Tensor, torch.Tensor], ...],
) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of ``batch`` (``labels`` ``[B, T]``).

    Positions ``< prefix_len`` come from ``prefix_states`` (the shared prompt start); logits are computed only
    where the next token is an answer token.
    """
    from transformers import DynamicCache

    labels = batch.pop("labels")
    size = labels.shape[0]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts labels[t + 1]
    targets = labels[:, 1:][keep[:, :-1]]
    kwargs: dict[str, Any] = {}
    if prefix_len:
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(prefix_states):
            cache.update(keys.expand(size, -1, -1, -1), values.expand(size, -1, -1, -1), layer)
        length = labels.shape[1]
        kwargs = dict(
            cache=cache,
            position_ids=torch.arange(prefix_len, length)[None].expand(size, -1),
        )
        batch = {
            "input_ids": batch["input_ids"][:, prefix_len:],
            "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"],
        }
        keep = keep[:, prefix_len:]
    logits = model(**batch, **kwargs, logits_to_keep=keep, use_cache=False).logits  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), targets)


def heldout_accuracy(
    model: nn.Module,
    processor: Any,
    examples: Sequence[Example],
    domains: Sequence[str],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy answers to held-out triples through ``swift.llm.inference``, scored by exact match.

    Args:
        model / processor: the VLM (``LlavaForConditionalGeneration``) and its ``LlavaProcessor``.
        examples: ``(image, question, answer)`` triples.
        domains: the image domain of each example (``len(examples)`` names).

    Returns:
        ``{"accuracy": overall, "per_domain": {domain: accuracy}, "counts": {domain: n}, "max_new_tokens": the
        greedy budget used, "examples": [the first 10 {question, answer, prediction, domain}]}``.
    """
    from transformers import GenerationConfig

    from lora_retriever.metrics import exact_match
    from swift.llm import get_template, inference

    if len(domains) != len(examples):
        raise ValueError(
            f"domains has {len(domains)} entries for {len(examples)} examples; give one per example."
        )
    template = get_template("llava", processor)
    longest = max(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for _, _, a in examples)
    max_new_tokens = longest + 4  # room for the end-of-turn token and a little more
    answers = inference(
        model,
        template,
        [question for _, question, _ in examples],
        [[image] for image, _, _ in examples],
        batch_size=batch_size,
        generation_config=GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False),
        progress=progress,
    )
    correct: dict[str, list[float]] = {}
    for (_, _, answer), prediction, domain in zip(examples, answers, domains):
        correct.setdefault(domain, []).append(exact_match(prediction, answer))
    scores = [s for values in correct.values() for s in values]
    return {
        "accuracy": float(np.mean(scores)),
        "per_domain": {d: float(np.mean(v)) for d, v in sorted(correct.items())},
        "counts": {d: len(v) for d, v in sorted(correct.items())},
        "max_new_tokens": max_new_tokens,
        "examples": [
            {"question": q, "answer": a, "prediction": p, "domain": d}
            for (_, q, a), p, d in list(zip(examples, answers, domains))[:10]
        ],
    }
