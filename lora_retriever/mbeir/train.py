"""Train a universal retriever (CLIP-SF or CLIP-FF, :mod:`.models`) on an M-BEIR train split.

    python -m lora_retriever.mbeir train --data_root data/mini_mbeir --out_dir runs/mbeir/sf --fusion sf
    python -m lora_retriever.mbeir train ... --steps 0        # the untrained (zero-shot) retriever

Loss: in-batch InfoNCE from queries to candidates (UniIR §4.1, as CLIP): a batch of ``B`` training queries,
one positive each (drawn from its positives), logits ``exp(logit_scale) * q @ c.T`` and cross-entropy on the
diagonal. A candidate in the batch that is another positive of query ``i`` (two queries of one answer) is not
a negative of ``i``: its logit is masked out. With ``instruct`` (UniIR's *Instruct* setting) the query text is
prefixed with one of its task's prompts drawn at random; without it (*NoInstruct*) it is the bare query.

Trained: the LoRA on the text tower, the image tower, its projection, the FF fusion layers and the
temperature. Seeded; CPU; one thread unless ``--threads`` says otherwise; the run time, the CPU and the
losses are stored in the checkpoint's ``retriever_config.json`` under ``training``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lora_retriever.mbeir.config import RetrieverConfig, TrainConfig
from lora_retriever.mbeir.data import MBeirSplit, load_split
from lora_retriever.mbeir.models import UniversalRetriever, image_pixels, save_retriever
from lora_retriever.training.trainer import linear_schedule
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["TrainConfig", "train_retriever"]

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp of the inverse temperature


@dataclass
class _Example:
    text: str | None
    image: str | None  # path relative to the data root
    positives: frozenset[str]


class _TrainData:
    """The split's queries and candidates, with every image decoded once into one pixel tensor."""

    def __init__(self, data: MBeirSplit, image_size: int) -> None:
        self.data = data
        self.queries = [(task, q) for task in data.tasks.values() for q in task.queries]
        self.candidates = {c.did: c for task in data.tasks.values() for c in task.pool}
        paths = sorted(
            {q.query_img_path for _, q in self.queries if q.query_img_path}
            | {c.img_path for c in self.candidates.values() if c.img_path}
        )
        self.image_row = {path: i for i, path in enumerate(paths)}
        self.pixels = image_pixels([data.image(p) for p in paths], image_size)

    def batch(
        self, rows: np.ndarray, instruct: bool, rng: random.Random
    ) -> tuple[list[_Example], list[_Example]]:
        queries, positives = [], []
        for row in rows:
            task, query = self.queries[row]
            text = self.data.query_text(query, task.cand_modality, instruct, rng)
            pos = frozenset(query.pos_cand_list)
            queries.append(_Example(text, query.query_img_path or None, pos))
            cand = self.candidates[rng.choice(sorted(pos))]
            positives.append(_Example(cand.txt or None, cand.img_path or None, frozenset([cand.did])))
        return queries, positives

    def embed(self, model: UniversalRetriever, items: list[_Example]) -> torch.Tensor:
        rows = [self.image_row[it.image] for it in items if it.image]
        pixels = self.pixels[rows] if rows else None
        return model.embed([it.text for it in items], pixels, [it.image is not None for it in items])


def info_nce(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """In-batch InfoNCE, queries -> candidates.

    Args:
        q, c: ``[B, D]`` unit rows (query ``i``'s positive is candidate ``i``).
        scale: the log inverse temperature (a scalar).
        same: ``[B, B]`` bool, True where candidate ``j`` is also a positive of query ``i`` (masked out, except
            on the diagonal).

    Returns:
        The mean cross-entropy (a scalar).
    """
    logits = scale.clamp(max=MAX_LOGIT_SCALE).exp() * q @ c.T
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def train_retriever(config: TrainConfig, retriever: RetrieverConfig) -> dict[str, Any]:
    """Train and save a retriever; returns the training record stored with the checkpoint.

    Raises:
        FileNotFoundError / MBeirFormatError / ValueError: a bad data folder (validated before the model loads).
        FileExistsError: ``out_dir`` not empty without ``overwrite``.
    """
    from tqdm.auto import tqdm

    from swift.utils.machine import cpu_summary

    data = load_split(config.data_root, config.split)
    retriever.seed = config.seed
    started, cpu_started = time.perf_counter(), time.process_time()
    model = UniversalRetriever(retriever)
    train = _TrainData(data, retriever.image_size)
    if len(train.queries) < config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(train.queries)} training queries; lower it"
        )
    text_params = [p for p in model.text.parameters() if p.requires_grad]
    new_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("text.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": text_params, "lr": config.text_learning_rate},
            {"params": new_params, "lr": config.learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    warmup = math.ceil(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, max(config.steps, 1)))
    rng, order = random.Random(config.seed), np.random.default_rng([config.seed, 2])
    losses: list[float] = []
    model.train()
    bar = tqdm(
        range(config.steps), desc=f"train {retriever.fusion}", unit="step", disable=not config.progress
    )
    for _ in bar:
        rows = order.choice(len(train.queries), size=config.batch_size, replace=False)
        queries, positives = train.batch(rows, config.instruct, rng)
        same = torch.tensor([[p.positives <= q.positives for p in positives] for q in queries])
        loss = info_nce(train.embed(model, queries), train.embed(model, positives), model.logit_scale, same)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*text_params, *new_params], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", refresh=False)
    seconds = time.perf_counter() - started
    record = {
        **{k: v for k, v in asdict(config).items() if k not in ("out_dir", "overwrite", "progress")},
        "data_root": str(Path(config.data_root).expanduser()),
        "n_train_queries": len(train.queries),
        "loss_first": losses[0] if losses else None,
        "loss_last10": float(np.mean(losses[-10:])) if losses else None,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(
            time.process_time() - cpu_started, 1
        ),  # this process's CPU time: robust to sharing
        "threads": torch.get_num_threads(),
        "cpu": cpu_summary(),
    }
    save_retriever(model.eval(), config.out_dir, extra=record, overwrite=config.overwrite)
    logger.info(
        "trained a %s retriever in %.0f s (%d steps), saved to %s",
        retriever.fusion,
        seconds,
        config.steps,
        config.out_dir,
    )
    return record
