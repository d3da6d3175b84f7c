"""Fine-tune the retriever on seen tasks, measure it on unseen ones: ``python -m lora_retriever.train_retriever``.

The LoraRetriever paper (Zhao et al. 2024, Sec. 4.1) trains its retriever contrastively on 40 % of its tasks
and shows it generalises to the other 60 %. This command does the same on a pool:

1. splits the pool's adapters (tasks) into *seen* (``--seen_fraction``, seeded by ``--split_seed``) and
   *unseen*;
2. trains a LoRA adapter on the sentence embedder (the packaged all-MiniLM-L6-v2 by default) with in-batch
   InfoNCE: each query is an instruction-prefixed training sample of a seen task, its positive another
   sample of the same task, the batch's other samples its negatives (another sample of the same task is
   masked out, not counted as a negative);
3. saves it as an ordinary PEFT adapter (``<output_dir>/embedder_adapter``), which the embedders load with
   ``EmbedderConfig(adapter_path=...)`` (``--embedder_adapter_path`` of ``lora-retriever-eval``);
4. rebuilds the pool's keys with the fine-tuned embedder into a copy of the pool config
   (``<output_dir>/pool/<name>.json``, same adapters, new text keys whose metadata names the embedder
   adapter; image keys are kept: the image embedder is unchanged);
5. reports adapter retrieval top-1/top-3 on the test queries (and their differently worded twins) of the
   unseen tasks and of the seen ones, before (base embedder, the pool's keys) and after, in
   ``<output_dir>/report.json`` and ``report.md``.

    python -m lora_retriever.train_retriever --pool data/pool20/pool/pool.json \\
        --test_data data/pool20/tasks/test_mixed.jsonl --test_alt data/pool20/tasks/test_mixed_alt.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_retriever.embedders.config import ImageRetrievalConfig
from swift.utils import get_logger

if TYPE_CHECKING:
    import torch

    from lora_retriever.pool import AdapterPool

__all__ = ["ADAPTER_DIR", "RetrieverTrainConfig", "info_nce", "main", "split_tasks", "train_retriever"]

logger = get_logger(__name__)

#: where the fine-tuned embedder adapter goes, inside ``output_dir``.
ADAPTER_DIR = "embedder_adapter"
REPORT_NAME = "report.json"


@dataclass
class RetrieverTrainConfig:
    """Settings of ``train_retriever``; each field's ``help`` is its flag's help."""

    pool: str = field(
        default="data/pool20/pool/pool.json",
        metadata={
            "help": "pool config whose adapters are the tasks (python -m lora_retriever.pool20 builds it)"
        },
    )
    test_data: str = field(
        default="data/pool20/tasks/test_mixed.jsonl",
        metadata={"help": "mixed-task test queries (each with its 'task') for retrieval before/after"},
    )
    test_alt: str | None = field(
        default="data/pool20/tasks/test_mixed_alt.jsonl",
        metadata={"help": "the same items worded differently ('' to skip)"},
    )
    output_dir: str = field(
        default="outputs/retriever",
        metadata={"help": "where the embedder adapter, the rebuilt pool and the report go"},
    )
    seen_fraction: float = field(
        default=0.4, metadata={"help": "share of the pool's tasks trained on (the paper's 40 %)"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the seen/unseen task split"})
    steps: int = field(default=200, metadata={"help": "training steps"})
    batch_size: int = field(default=32, metadata={"help": "query/positive pairs per step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the LoRA weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "key", "value", "dense"],
        metadata={"help": "embedder modules that get LoRA (BERT names; all linear layers by default)"},
    )
    scale: float = field(
        default=20.0, metadata={"help": "inverse temperature of the InfoNCE logits (cosine * scale)"}
    )
    num_samples: int = field(
        default=20, metadata={"help": "training samples per rebuilt key (as embed_pool)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the batches and the LoRA initialisation"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace the results of an earlier run in output_dir"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bars", "cli": False})
    image: ImageRetrievalConfig | None = field(
        default=None, metadata={"help": "image-aware retrieval (flags --image_embedder ...)", "cli": False}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.seen_fraction < 1.0:
            raise ValueError(
                f"seen_fraction must be in (0, 1), got {self.seen_fraction}; the paper trains on 0.4"
            )
        for name in ("steps", "batch_size", "lora_r", "lora_alpha", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the embedder modules to put LoRA on")
        self.test_alt = self.test_alt or None


def split_tasks(names: Sequence[str], seen_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of task (adapter) names into ``(seen, unseen)``, each in the order given.

    ``round(seen_fraction * n)`` tasks are seen, at least one and at most ``n - 1``.

    Raises:
        ValueError: fewer than two names.
    """
    if len(names) < 2:
        raise ValueError(f"a seen/unseen split needs at least 2 tasks, got {len(names)}: {list(names)}")
    n_seen = min(max(round(seen_fraction * len(names)), 1), len(names) - 1)
    chosen = set(random.Random(seed).sample(sorted(names), n_seen))
    return [n for n in names if n in chosen], [n for n in names if n not in chosen]


def info_nce(q: torch.Tensor, p: torch.Tensor, same: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between unit rows ``q`` and ``p`` (``[B, D]``; row ``i``'s positive is
    ``p[i]``); ``same[i, j]`` True where ``j`` is of ``i``'s task: masked out except on the diagonal."""
    import torch
    import torch.nn.functional as F

    logits = scale * q @ p.T
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(q), device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_retriever(config: RetrieverTrainConfig) -> dict[str, Any]:
    """Split, measure, train, save, rebuild keys, measure again; returns the report (also written).

    Raises:
        FileNotFoundError / ValueError / PoolValidationError: a bad pool, test file or setting (checked before
            the embedder loads).
        FileExistsError: ``output_dir`` holds an earlier run and ``overwrite`` is off.
    """
    from lora_retriever.data import read_samples
    from lora_retriever.embed_pool import embed_pool, read_key_samples
    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.pool import AdapterPool
    from lora_retriever.pool_config import default_key_path, resolve_config_path
    from lora_retriever.selection import task_adapter
    from swift.utils.files import ensure_writable_dir
    from swift.utils.machine import cpu_summary

    # ---- validate everything before a model loads
    pool_path = resolve_config_path(config.pool)
    pool = AdapterPool.from_configs(pool_path)
    texts: dict[str, list[str]] = {}
    problems = []
    for entry in pool:
        if entry.samples_path is None:
            problems.append(
                f"{entry.lora_name!r} has no samples_path (its training samples are the positives)"
            )
            continue
        texts[entry.lora_name] = [s.text for s in read_key_samples(entry.samples_path) if s.text]
        if len(texts[entry.lora_name]) < 2:
            problems.append(f"{entry.lora_name!r}: fewer than 2 samples with text in {entry.samples_path}")
    if problems:
        raise ValueError(
            f"cannot train a retriever on {pool_path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    queries = {"test": read_samples(config.test_data)}
    if config.test_alt:
        queries["test_alt"] = read_samples(config.test_alt)
    for wording, samples in queries.items():
        unknown = sorted({str(s.task) for s in samples if task_adapter(pool, s.task) is None})
        if unknown:
            raise ValueError(
                f"{wording} queries of tasks {unknown} have no adapter in {pool_path}; pass the test set of "
                "this pool (--test_data / --test_alt)"
            )
    out = ensure_writable_dir(config.output_dir, argument="output_dir")
    earlier = [p for p in (out / ADAPTER_DIR, out / "pool", out / REPORT_NAME) if p.exists()]
    if earlier and not config.overwrite:
        raise FileExistsError(
            f"output_dir {out} holds an earlier run ({', '.join(p.name for p in earlier)}); pass --overwrite "
            "to replace it, or another --output_dir"
        )
    image_config = config.image.embedder_config() if config.image is not None else None
    seen, unseen = split_tasks(pool.names, config.seen_fraction, config.split_seed)
    logger.info("tasks seen in training (%d): %s; unseen (%d): %s", len(seen), seen, len(unseen), unseen)

    # ---- before: the base embedder and the pool's own keys
    embedder = get_embedder(EmbedderConfig())
    image_embedder = get_embedder(image_config) if image_config is not None else None
    own = {w: [task_adapter(pool, s.task) for s in samples] for w, samples in queries.items()}
    before = _retrieval(pool, embedder, image_embedder, config, queries, own, seen, unseen)

    # ---- train
    started, cpu_started = time.perf_counter(), time.process_time()
    losses = _train(embedder, {name: texts[name] for name in seen}, config)
    adapter_dir = out / ADAPTER_DIR
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    # ---- the saved adapter through the product's path, then keys rebuilt with it
    embedder = get_embedder(EmbedderConfig(adapter_path=str(adapter_dir)))
    new_config = out / "pool" / pool_path.name
    entries = [dataclasses.replace(e, embedding_path=default_key_path(new_config, e.lora_name)) for e in pool]
    AdapterPool(entries).save(new_config)
    new_pool = embed_pool(
        new_config, embedder, num_samples=config.num_samples, seed=0, progress=config.progress
    )
    after = _retrieval(new_pool, embedder, image_embedder, config, queries, own, seen, unseen)

    report = {
        "settings": {k: v for k, v in asdict(config).items() if k not in ("progress", "image")},
        "image_embedder": asdict(config.image) if config.image is not None else None,
        "pool": str(pool_path),
        "seen": seen,
        "unseen": unseen,
        "embedder_adapter": str(adapter_dir),
        "rebuilt_pool": str(new_config),
        "training": {
            "pairs": sum(len(texts[n]) for n in seen),
            "loss_first": losses[0],
            "loss_last10": float(np.mean(losses[-10:])),
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
        },
        "retrieval": {"before": before, "after": after},
        "cpu": cpu_summary(),
    }
    from swift.utils.files import atomic_write_together

    atomic_write_together(
        {out / REPORT_NAME: json.dumps(report, indent=2) + "\n", out / "report.md": report_markdown(report)}
    )
    return report


def _train(embedder: Any, texts: dict[str, list[str]], config: RetrieverTrainConfig) -> list[float]:
    """LoRA on the embedder's transformer, InfoNCE over same-task pairs; saves ``<output_dir>/embedder_adapter``
    and restores the base model. Returns the loss of every step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from lora_retriever.training.trainer import linear_schedule

    torch.manual_seed(config.seed)
    target = embedder._adapter_target()
    peft_model = get_peft_model(
        target,
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,
            bias="none",
        ),
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # the trainer's: 10 % warm-up, then linear decay
        optimizer, linear_schedule(max(1, config.steps // 10), config.steps)
    )
    tasks = list(texts)
    rng = random.Random(config.seed)
    prefix = embedder.instruction("query")
    st_model = embedder.model
    st_model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="train retriever", unit="step", disable=not config.progress)
    for _ in bar:
        batch_tasks = [rng.choice(tasks) for _ in range(config.batch_size)]
        pairs = [rng.sample(texts[t], 2) for t in batch_tasks]
        q = _embed(st_model, [prefix + a for a, _ in pairs])
        p = _embed(st_model, [prefix + b for _, b in pairs])
        # not negatives: another sample of the same task, or one with the very same text (tasks of a
        # multimodal pool share wordings, told apart only by their images: a text encoder can't split them)
        same = torch.tensor(
            [
                [ta == tb or qa == pb for tb, (_, pb) in zip(batch_tasks, pairs)]
                for ta, (qa, _) in zip(batch_tasks, pairs)
            ]
        )
        loss = info_nce(q, p, same, config.scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", refresh=False)
    st_model.eval()
    adapter_dir = Path(config.output_dir).expanduser() / ADAPTER_DIR
    if adapter_dir.exists():
        import shutil

        shutil.rmtree(adapter_dir)  # an earlier run's, replaced under --overwrite (checked by the caller)
    peft_model.save_pretrained(str(adapter_dir))
    peft_model.unload()  # the base model again: the adapter is loaded back through the embedder's own path
    logger.info(
        "trained the retriever's LoRA for %d steps: loss %.3f -> %.3f; saved %s",
        config.steps,
        losses[0],
        float(np.mean(losses[-10:])),
        adapter_dir,
    )
    return losses


def _embed(st_model: Any, texts: list[str]) -> torch.Tensor:
    """Unit sentence embeddings with gradients (the forward ``SentenceTransformer.encode`` runs)."""
    import torch.nn.functional as F

    features = st_model.preprocess(texts)  # sentence-transformers >= 6 (``tokenize`` before)
    return F.normalize(st_model(features)["sentence_embedding"], dim=-1)


def _retrieval(
    pool: AdapterPool,
    embedder: Any,
    image_embedder: Any,
    config: RetrieverTrainConfig,
    queries: dict[str, list[Any]],
    own: dict[str, list[str]],
    seen: list[str],
    unseen: list[str],
) -> dict[str, Any]:
    """Top-1/top-3 of the own adapter among the whole pool, over the unseen and the seen tasks' queries, per
    wording, plus per task."""
    from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, pool_similarities

    scores_images = image_embedder is not None and pool.image_key_meta() is not None
    retriever = LoraRetriever(
        LoraRetrieverConfig(top_k=3, text_weight=config.image.fusion_text_weight if config.image else None),
        pool=pool,
        embedder=embedder,
        image_embedder=image_embedder if scores_images else None,
    )
    retriever.check_embedder()
    names = pool.names
    report: dict[str, Any] = {}
    for wording, samples in queries.items():
        images = (
            [s.load_images() for s in samples] if scores_images and any(s.images for s in samples) else None
        )
        vectors = retriever.embed_queries([s.query for s in samples], images)
        sims = {"fused": retriever.similarities(vectors)}
        if images is not None:  # each part alone too: what the text embedder's training changed
            sims |= {
                "text": pool_similarities(pool, vectors, 1.0),
                "image": pool_similarities(pool, vectors, 0.0),
            }
        own_idx = np.array([names.index(name) for name in own[wording]])

        report[wording] = {
            "per_task": {
                task: _accuracy(
                    sims, own_idx, np.array([i for i, name in enumerate(own[wording]) if name == task])
                )
                for task in dict.fromkeys(own[wording])
            }
        }
        for group, members in (("unseen", unseen), ("seen", seen)):
            rows = np.array([i for i, name in enumerate(own[wording]) if name in members])
            if len(rows):
                report[wording][group] = _accuracy(sims, own_idx, rows)
    return report


def _accuracy(sims: dict[str, np.ndarray], own_idx: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Top-1/top-3 of the queries ``rows`` on the fused scores, and per part (``text``, ``image``) when given."""
    from lora_retriever.eval import retrieval_accuracy

    def top(part: str) -> dict[str, float]:
        return {f"top{k}": retrieval_accuracy(sims[part][rows], list(own_idx[rows]), k) for k in (1, 3)}

    return top("fused") | {part: top(part) for part in ("text", "image") if part in sims} | {"n": len(rows)}


def report_markdown(report: dict[str, Any]) -> str:
    """The before/after table (rows: unseen / seen tasks × wording; columns: top-1 and top-3)."""
    before, after = report["retrieval"]["before"], report["retrieval"]["after"]
    lines = [
        f"Seen tasks ({len(report['seen'])}): {', '.join(report['seen'])}",
        f"Unseen tasks ({len(report['unseen'])}): {', '.join(report['unseen'])}",
        "",
        "| tasks | queries | n | top-1 before | top-1 after | top-3 before | top-3 after |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for group in ("unseen", "seen"):
        for wording in before:
            b, a = before[wording].get(group), after[wording].get(group)
            if b is None:
                continue
            lines.append(
                f"| {group} | {wording} | {b['n']} | {b['top1']:.3f} | {a['top1']:.3f} | {b['top3']:.3f} | "
                f"{a['top3']:.3f} |"
            )
            if "text" in b:  # a multimodal pool: the text part alone (the part training changes)
                lines.append(
                    f"| {group}, text only | {wording} | {b['n']} | {b['text']['top1']:.3f} | "
                    f"{a['text']['top1']:.3f} | {b['text']['top3']:.3f} | {a['text']['top3']:.3f} |"
                )
    training = report["training"]
    lines += [
        "",
        f"Training: {report['settings']['steps']} steps of {report['settings']['batch_size']} pairs, loss "
        f"{training['loss_first']:.3f} -> {training['loss_last10']:.3f}, {training['seconds']} s "
        f"({training['cpu_seconds']} CPU-s) on {report['cpu']}.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from lora_retriever.cli.args import command_parser

    return command_parser(__doc__, RetrieverTrainConfig, ImageRetrievalConfig)


def main(argv: Sequence[str] | None = None) -> int:
    from lora_retriever.cli.errors import run_cli

    return run_cli(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from lora_retriever.cli.args import config_from_args

    image = config_from_args(ImageRetrievalConfig, args)
    config = config_from_args(
        RetrieverTrainConfig,
        args,
        image=image if image.image_embedder is not None else None,
        progress=not args.quiet,
    )
    report = train_retriever(config)
    print(report_markdown(report))
    print(f"written: {Path(config.output_dir) / REPORT_NAME}, embedder adapter {report['embedder_adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
