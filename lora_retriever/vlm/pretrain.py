"""Stage 1 of the build: pre-train the vision tower on the training triples, without the language model.

LLaVA starts from a vision encoder that was trained elsewhere; ours starts from random weights, and learning
it only through the frozen LM costs a full SmolLM2 forward and backward pass per example (~0.2 s here) —
far too slow for a vision transformer, which needs tens of thousands of examples. So the tower first learns
to see with a cheap stand-in for the LM (a few ms per example): a small question-conditioned classifier that
reads the tower's patch features and picks the answer among the training answers. The question enters as
the mean of its SmolLM2 input embeddings (frozen). The classifier is thrown away afterwards; stage 2
(``train.align_vision``) then trains the projector through the frozen LM, as LLaVA does.

Two choices make the small ViT learn from a few thousand images (measured in docs/decisions.md):

* the patch position embeddings start as 2-D sin-cos (``init_position_embeddings``): with the default small
  random init the tower ignored where things are for hundreds of steps (a pin's quadrant stayed at chance);
* random shifts of a few pixels and pixel noise (``recipe.pretrain_shift`` / ``pretrain_noise``): without them
  the tower memorises the 875 training digits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_retriever.training.trainer import linear_schedule
from lora_retriever.vlm.data import CaptionData
from lora_retriever.vlm.recipe import VlmRecipe
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["init_position_embeddings", "pretrain_vision", "sincos_position_embeddings"]


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos position embeddings (as in MAE, He et al. 2021, Sec. A.1) ``[grid * grid, dim]``, row-major.

    Half of the dimensions encode the row, half the column, each as sines and cosines of geometric
    frequencies; every entry is in ``[-1, 1]``.

    Raises:
        ValueError: ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = [fn(axis.reshape(-1, 1) * omega) for axis in (rows, cols) for fn in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def init_position_embeddings(tower: nn.Module) -> None:
    """Set a CLIP / SigLIP vision tower's patch position embeddings to 2-D sin-cos (a CLIP CLS position: zeros).

    Raises:
        ValueError: the tower has no ``embeddings.position_embedding`` or its size isn't a square grid.
    """
    embeddings = next(
        (
            m
            for name, m in tower.named_modules()
            if name.endswith("embeddings") and hasattr(m, "position_embedding")
        ),
        None,
    )
    if embeddings is None:
        raise ValueError(
            f"{type(tower).__name__} has no embeddings.position_embedding; pass a CLIP or SigLIP vision tower."
        )
    weight = embeddings.position_embedding.weight  # [positions, width]
    patches = embeddings.num_patches
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{patches} patches don't form a square grid; use a square image size.")
    weight.zero_()
    weight[weight.shape[0] - patches :] = sincos_position_embeddings(grid, weight.shape[1])


class AnswerHead(nn.Module):
    """Picks an answer from the tower's patch features and the question (stage 1 only).

    Args:
        width: the tower's hidden size.
        question_dim: the width of the question vector (the LM's embedding size).
        num_answers: the distinct training answers.
        hidden: the classifier MLP's width.
    """

    def __init__(self, width: int, question_dim: int, num_answers: int, hidden: int = 512) -> None:
        super().__init__()
        self.width = width
        self.question = nn.Linear(question_dim, width)
        self.mlp = nn.Sequential(nn.Linear(3 * width, hidden), nn.GELU(), nn.Linear(hidden, num_answers))

    def forward(self, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """``features [B, N, width]``, ``question [B, question_dim]`` -> answer logits ``[B, num_answers]``.

        The question attends over the patches (one softmax pooling) and the MLP reads that, the mean patch
        and the question.
        """
        query = self.question(question)  # [B, width]
        weights = torch.softmax(torch.einsum("bnd,bd->bn", features, query) / math.sqrt(self.width), dim=-1)
        attended = torch.einsum("bn,bnd->bd", weights, features)
        return self.mlp(torch.cat([attended, features.mean(dim=1), query], dim=-1))


def pretrain_vision(
    model: nn.Module,
    processor: Any,
    train: CaptionData,
    recipe: VlmRecipe,
    *,
    heldout: CaptionData | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model``'s vision tower for ``recipe.pretrain_steps`` steps with an answer classifier on top.

    Args:
        model: the composed ``LlavaForConditionalGeneration`` (its tower is trained in place; the LM is read
            only for its input embeddings).
        processor: its ``LlavaProcessor`` (image processor and tokenizer).
        train: the training triples.
        recipe: ``pretrain_*`` settings, the seed and the feature selection of the composed config.
        heldout: optional triples to report the classifier's accuracy on (answers unseen in training count
            as wrong).
        progress: show a progress bar with the loss.

    Returns:
        ``{"steps", "loss_first", "loss_last10", "train_accuracy_last10", "heldout_accuracy", "targets"}``
        (``heldout_accuracy`` is ``None`` without ``heldout``; 0 steps returns at once).
    """
    from tqdm.auto import tqdm

    result: dict[str, Any] = {"steps": recipe.pretrain_steps}
    if recipe.pretrain_steps == 0:
        return result
    tower = model.model.vision_tower
    pixels, questions = _inputs(model, processor, train.examples)
    torch.manual_seed(recipe.seed)
    targets = {a: i for i, a in enumerate(sorted({a for _, _, a in train.examples}))}
    head = AnswerHead(tower.config.hidden_size, questions.shape[1], len(targets))
    labels = torch.tensor([targets[a] for _, _, a in train.examples])
    params = [*tower.parameters(), *head.parameters()]
    tower.requires_grad_(True)
    tower.train()
    optimizer = torch.optim.AdamW(
        params, lr=recipe.pretrain_learning_rate, weight_decay=recipe.pretrain_weight_decay
    )
    warmup = math.ceil(recipe.warmup_ratio * recipe.pretrain_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, recipe.pretrain_steps))
    rng = np.random.default_rng([recipe.seed, 1])
    losses, hits = [], []
    started = time.perf_counter()
    bar = tqdm(range(recipe.pretrain_steps), desc="pre-train vision", unit="step", disable=not progress)
    for _ in bar:
        index = torch.from_numpy(rng.integers(0, len(labels), recipe.pretrain_batch_size))
        batch = _shift(pixels[index], recipe.pretrain_shift, rng)
        if recipe.pretrain_noise:
            batch = batch + recipe.pretrain_noise * torch.randn_like(batch)
        logits = head(_features(model, batch), questions[index])
        loss = F.cross_entropy(logits, labels[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        hits.append(float((logits.argmax(-1) == labels[index]).float().mean()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{np.mean(hits[-20:]):.2f}", refresh=False)
    tower.eval()
    result.update(
        loss_first=losses[0],
        loss_last10=float(np.mean(losses[-10:])),
        train_accuracy_last10=float(np.mean(hits[-10:])),
        targets=len(set(targets.values())),
        seconds=round(time.perf_counter() - started, 1),
        heldout_accuracy=None if heldout is None else _accuracy(model, processor, head, heldout, targets),
    )
    logger.info("pre-trained the vision tower: %s", result)
    return result


def _inputs(
    model: nn.Module, processor: Any, examples: Sequence[tuple[Any, str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values ``[n, 3, H, W]`` (the processor's) and question vectors ``[n, lm_width]``."""
    pixels = torch.cat(
        [
            processor.image_processor(
                images=[image for image, _, _ in examples[i : i + 256]], return_tensors="pt"
            )["pixel_values"]
            for i in range(0, len(examples), 256)
        ]
    )
    embed = model.get_input_embeddings().weight.detach()
    vectors: dict[str, torch.Tensor] = {}
    for _, question, _ in examples:
        if question not in vectors:
            ids = processor.tokenizer(question, add_special_tokens=False)["input_ids"]
            vectors[question] = embed[ids].mean(dim=0)
    return pixels, torch.stack([vectors[q] for _, q, _ in examples])


def _features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA hands its projector: the selected layer, CLS dropped for "default"."""
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[
        config.vision_feature_layer
    ]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def _shift(pixels: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Each image moved by up to ``shift`` pixels in x and y, edges repeated."""
    if shift == 0:
        return pixels
    size = pixels.shape[-1]
    padded = F.pad(pixels, (shift, shift, shift, shift), mode="replicate")
    offsets = rng.integers(0, 2 * shift + 1, size=(pixels.shape[0], 2))
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)])


@torch.no_grad()
def _accuracy(
    model: nn.Module,
    processor: Any,
    head: AnswerHead,
    data: CaptionData,
    targets: dict[str, int],
) -> dict[str, float]:
    """Per-domain accuracy of the stage-1 head (an answer without a target counts as wrong)."""
    pixels, questions = _inputs(model, processor, data.examples)
    predicted = torch.cat(
        [
            head(_features(model, pixels[i : i + 128]), questions[i : i + 128]).argmax(-1)
            for i in range(0, len(pixels), 128)
        ]
    )
    correct: dict[str, list[bool]] = {}
    for (_, _, answer), guess, domain in zip(data.examples, predicted.tolist(), data.domains):
        correct.setdefault(domain, []).append(targets.get(answer) == guess)
    return {domain: float(np.mean(values)) for domain, values in sorted(correct.items())}
