"""LoRA / QLoRA training: ``train(TrainConfig(...))`` -> a PEFT adapter, metrics, checkpoints, a pool entry.

A small loop rather than HF ``Trainer``, so every step is visible and resuming is exact:

* the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so step ``s`` always sees the same
  micro-batches, whether or not the run was interrupted before it;
* each optimizer step accumulates ``grad_accum`` micro-batches; the loss is the mean over the answer tokens
  of the whole step (``-100`` labels on the prompt), so accumulation equals one big batch;
* AdamW, linear warmup then linear decay to the last step, gradient clipping;
* a checkpoint (adapter, optimizer, scheduler, RNG states) every ``save_steps``; resuming restores all of
  them and continues with identical results.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_retriever.pool_config import check_pool_writable
from lora_retriever.training.checkpoint import (
    TrainerState,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lora_retriever.training.config import TrainConfig
from lora_retriever.training.data import (
    IGNORE_INDEX,
    EncodedExample,
    TrainRecord,
    collate,
    count_answer_tokens,
    encode_records,
    micro_batches_per_epoch,
    read_training_records,
    split_records,
)
from lora_retriever.training.model import add_lora, load_base_model
from lora_retriever.training.registry import register_trained_adapter
from lora_retriever.training.tensorboard import TENSORBOARD_DIR, ScalarWriter
from swift.utils import get_logger
from swift.utils.files import atomic_write, ensure_writable_dir

logger = get_logger(__name__)

__all__ = ["StepCallback", "evaluate_loss", "linear_schedule", "train"]

StepCallback = Callable[[int, float], None]
LOG_FILE = "train.log"
# Settings that change the trajectory: a resumed run with other values won't match an uninterrupted one.
_TRAJECTORY_FIELDS = (
    "dataset_path",
    "model_type",
    "model_path",
    "quantization",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "epochs",
    "max_steps",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "batch_size",
    "grad_accum",
    "max_length",
    "eval_split",
    "seed",
    "system",
)


def train(
    config: TrainConfig,
    *,
    embedder: Any = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train one adapter as ``config`` says; write it and its metrics to ``config.output_dir``.

    Args:
        config: the run's settings.
        embedder: the embedder for the retrieval key when ``config.register_pool`` is set (default: the
            packaged all-MiniLM-L6-v2).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (and its checkpoint).

    Returns:
        The metrics also written to ``metrics.json``.

    Raises:
        FileNotFoundError / DatasetError: bad dataset (see ``read_training_records``) or checkpoint.
        ValueError: no usable training example, or existing checkpoints in ``output_dir`` without
            ``resume_from`` / ``overwrite_output_dir``, or a ``register_pool`` config that isn't a JSON list.
        NotADirectoryError / PermissionError: ``output_dir`` or the ``register_pool`` folder can't be written.
    """
    # Validate before working: the output folder and the pool to register in are checked before the data is
    # read and the model loaded, so a mistake doesn't cost a training run.
    output_dir = ensure_writable_dir(config.output_dir, argument="output_dir")
    if config.register_pool:
        check_pool_writable(config.register_pool)
    checkpoint = _checkpoint_to_resume(config, output_dir)
    with _log_to_file(output_dir / LOG_FILE):
        logger.info("training adapter %r: %s", config.adapter_name, json.dumps(config.to_dict()))
        return _run(config, output_dir, checkpoint, embedder, on_step)


def _run(
    config: TrainConfig,
    output_dir: Path,
    checkpoint: Path | None,
    embedder: Any,
    on_step: StepCallback | None,
) -> dict[str, Any]:
    _seed_everything(config.seed)
    records = read_training_records(config.dataset_path)
    train_records, eval_records = split_records(records, config.eval_split, config.seed)
    logger.info("%d records: %d train, %d eval", len(records), len(train_records), len(eval_records))

    model, processor = load_base_model(
        config.model_type, config.model_path, quantization=config.quantization, device=config.device
    )
    templates = _template_cache(model.model_type, processor, config.system)
    pad_token_id = templates(None).tokenizer.pad_token_id
    train_examples, skipped = encode_records(
        train_records, templates, config.max_length, progress=config.progress, desc="encode train"
    )
    eval_examples, skipped_eval = encode_records(
        eval_records, templates, config.max_length, progress=config.progress, desc="encode eval"
    )
    if not train_examples:
        raise ValueError(
            f"no training example fits max_length={config.max_length} tokens; raise --max_length."
        )

    torch.manual_seed(config.seed)  # LoRA init depends on the seed only
    model = add_lora(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        quantized=config.quantization != "none",
        gradient_checkpointing=config.gradient_checkpointing,
    )
    trainable_params, all_params = model.get_nb_trainable_parameters()
    logger.info(
        "trainable params: %d of %d (%.3f%%)",
        trainable_params,
        all_params,
        100 * trainable_params / all_params,
    )

    micro_per_epoch = micro_batches_per_epoch(len(train_examples), config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))

    dataset_sha256 = _sha256(Path(config.dataset_path))
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        _check_resume(config, state, dataset_sha256, checkpoint)
        logger.info("resumed from %s at step %d of %d", checkpoint, state.step, total_steps)
    else:
        state = TrainerState(config=config.to_dict(), dataset_sha256=dataset_sha256)
        state.eval_loss_before = evaluate_loss(model, eval_examples, config.batch_size, pad_token_id)
        if state.eval_loss_before is not None:
            logger.info(
                "eval before training: loss %.4f, perplexity %.2f",
                state.eval_loss_before,
                _perplexity(state.eval_loss_before),
            )
    state.config = config.to_dict()
    _write_json(
        output_dir / "training_args.json",
        {
            "config": config.to_dict(),
            "resolved_model_type": model.model_type,
            "dataset_sha256": dataset_sha256,
            "num_train_examples": len(train_examples),
            "num_eval_examples": len(eval_examples),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "versions": _versions(),
        },
    )

    start_step, start_seconds = state.step, state.train_seconds
    # resumed: the steps after the checkpoint's are written again, so TensorBoard drops their old events
    board = ScalarWriter(output_dir / TENSORBOARD_DIR, purge_step=state.step + 1 if checkpoint else None)
    if checkpoint is None:
        board.add(
            0, {"eval/loss": state.eval_loss_before, "eval/perplexity": _perplexity(state.eval_loss_before)}
        )
    _train_steps(
        model,
        optimizer,
        scheduler,
        train_examples,
        state,
        config=config,
        output_dir=output_dir,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        pad_token_id=pad_token_id,
        on_step=on_step,
        board=board,
    )
    seconds = state.train_seconds - start_seconds

    eval_loss_after = evaluate_loss(model, eval_examples, config.batch_size, pad_token_id)
    if eval_loss_after is not None:
        logger.info(
            "eval after training: loss %.4f, perplexity %.2f", eval_loss_after, _perplexity(eval_loss_after)
        )
    board.add(state.step, {"eval/loss": eval_loss_after, "eval/perplexity": _perplexity(eval_loss_after)})
    board.close()
    model.save_pretrained(str(output_dir))
    logger.info("saved adapter to %s", output_dir)

    metrics = {
        "adapter_name": config.adapter_name,
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 4),
        "num_train_examples": len(train_examples),
        "num_eval_examples": len(eval_examples),
        "skipped_examples": skipped + skipped_eval,
        "train_loss_first": state.train_losses[0] if state.train_losses else None,
        "train_loss_last": state.train_losses[-1] if state.train_losses else None,
        "train_losses": state.train_losses,
        "eval_loss_before": state.eval_loss_before,
        "eval_perplexity_before": _perplexity(state.eval_loss_before),
        "eval_loss_after": eval_loss_after,
        "eval_perplexity_after": _perplexity(eval_loss_after),
        "train_seconds": round(state.train_seconds, 3),
        "seconds_per_step": round(seconds / (state.step - start_step), 4)
        if state.step > start_step
        else None,
        "trainable_params": trainable_params,
        "all_params": all_params,
        "resumed_from": None if checkpoint is None else str(checkpoint),
    }
    if config.register_pool:
        metrics["pool_entry"] = _register(config, output_dir, train_records, embedder)
    _write_json(output_dir / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of optimizer step ``s`` (0-based): ``(s+1)/warmup`` while warming up, then linear to ``1/...``.

    Unlike HF's schedule the first step doesn't run at lr 0 and the last step's lr is still positive.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    examples: Sequence[EncodedExample],
    state: TrainerState,
    *,
    config: TrainConfig,
    output_dir: Path,
    total_steps: int,
    steps_per_epoch: int,
    pad_token_id: int,
    on_step: StepCallback | None,
    board: ScalarWriter | None = None,
) -> None:
    from tqdm.auto import tqdm

    if state.step >= total_steps:
        logger.info("nothing to train: the checkpoint is at step %d of %d", state.step, total_steps)
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_per_epoch = micro_batches_per_epoch(len(examples), config.batch_size)
    device = next(p.device for p in trainable)
    model.train()
    base_seconds, started = state.train_seconds, time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not config.progress)
    with _redirect_logs_through(config.progress), bar:
        for step in range(state.step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            order = _epoch_order(len(examples), config.seed, epoch)
            first = index * config.grad_accum
            micro = range(first, min(first + config.grad_accum, micro_per_epoch))
            batches = [
                [examples[i] for i in order[m * config.batch_size : (m + 1) * config.batch_size]]
                for m in micro
            ]
            n_tokens = sum(count_answer_tokens(b) for b in batches)
            loss_sum = 0.0
            for batch in batches:
                inputs = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
                total, _ = _answer_token_loss(model, inputs)
                (total / n_tokens).backward()  # mean over the answer tokens of the whole step
                loss_sum += total.item()
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                if config.max_grad_norm > 0
                else None
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss = loss_sum / n_tokens
            state.step = step + 1
            state.train_losses.append(loss)
            state.train_seconds = base_seconds + time.perf_counter() - started
            bar.update(1)
            # refresh: draw a frame for every step with its loss (tqdm would skip frames within mininterval)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=True)
            if state.step % config.logging_steps == 0 or state.step in (1, total_steps):
                logger.info(
                    "step %d/%d epoch %d loss %.4f lr %.3e%s",
                    state.step,
                    total_steps,
                    epoch,
                    loss,
                    lr,
                    "" if grad_norm is None else f" grad_norm {grad_norm:.3f}",
                )
            if board is not None:
                board.add(
                    state.step, {"train/loss": loss, "train/learning_rate": lr, "train/grad_norm": grad_norm}
                )
            if config.save_steps and state.step % config.save_steps == 0:
                save_checkpoint(
                    output_dir, model, optimizer, scheduler, state, save_total_limit=config.save_total_limit
                )
            if on_step is not None:
                on_step(state.step, loss)
    model.eval()


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _answer_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens, and their count.

    ``inputs`` holds ``labels`` ``[batch, T]`` (``-100`` on the prompt and padding) besides the model inputs;
    logits at position ``t`` predict ``labels[:, t + 1]``. Only the positions that predict an answer token go
    through the LM head (``logits_to_keep`` as a boolean mask, where the model takes it): the head over the
    whole vocabulary at every prompt position was ~20 % of a step's work for nothing.
    """
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    if not _takes_logits_to_keep(model):
        logits = model(**inputs).logits
        total = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total, int((targets != IGNORE_INDEX).sum())
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    logits = model(**inputs, logits_to_keep=keep).logits  # [answer tokens, vocab]
    total = F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum")
    return total, int(keep.sum())


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the transformers model inside ``model`` (PEFT / Swift wrappers) has a ``logits_to_keep`` argument."""
    inner = model
    for _ in range(4):
        if "logits_to_keep" in inspect.signature(inner.forward).parameters:
            return True
        unwrapped = (
            inner.get_base_model() if hasattr(inner, "get_base_model") else getattr(inner, "model", None)
        )
        if not isinstance(unwrapped, nn.Module) or unwrapped is inner:
            return False
        inner = unwrapped
    return False


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, examples: Sequence[EncodedExample], batch_size: int, pad_token_id: int
) -> float | None:
    """Mean answer-token loss over ``examples`` (``None`` when there are none); the model is left in eval mode."""
    if not examples:
        return None
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        inputs = {
            k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()
        }
        batch_total, batch_count = _answer_token_loss(model, inputs)
        total += batch_total.item()
        count += batch_count
    return total / count


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


# ----------------------------------------------------------------------------------------------------------
# Resume, registration, files
# ----------------------------------------------------------------------------------------------------------


def _checkpoint_to_resume(config: TrainConfig, output_dir: Path) -> Path | None:
    existing = list_checkpoints(output_dir)
    if config.resume_from == "auto":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("--resume_from auto: no checkpoint in %s; training from the start", output_dir)
        return latest
    if config.resume_from:
        path = Path(config.resume_from).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"resume_from {str(path)!r} is not a checkpoint folder; pass output_dir/checkpoint-<step> or auto."
            )
        return path
    if existing:
        if not config.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} already holds checkpoints ({existing[-1].name}, ...); pass --resume_from auto to "
                "continue that run, or --overwrite_output_dir to start over."
            )
        for path in existing:
            shutil.rmtree(path)
        logger.warning(
            "removed %d old checkpoints from %s (--overwrite_output_dir)", len(existing), output_dir
        )
    return None


def _check_resume(config: TrainConfig, state: TrainerState, dataset_sha256: str, checkpoint: Path) -> None:
    old = state.config
    changed = [
        f"{name}: {old.get(name)!r} -> {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if name in old and old[name] != getattr(config, name)
    ]
    if state.dataset_sha256 and state.dataset_sha256 != dataset_sha256:
        changed.append("the dataset file's contents")
    if changed:
        logger.warning(
            "resuming from %s with different settings (%s); the result won't match an uninterrupted run.",
            checkpoint,
            "; ".join(changed),
        )


def _register(
    config: TrainConfig, output_dir: Path, train_records: Sequence[TrainRecord], embedder: Any
) -> dict[str, Any]:
    if embedder is None:
        from lora_retriever.embedders import EmbedderConfig, get_embedder

        embedder = get_embedder(EmbedderConfig(device=config.device))
    fields = {
        "description": config.description or "",
        "base_model": config.model_path or config.model_type,
        "task": config.task,
        "category": config.category,
    }
    image_config = config.image.embedder_config(config.device)
    image_embedder = None
    if image_config is not None:
        from lora_retriever.embedders import get_embedder

        image_embedder = get_embedder(image_config)
    return register_trained_adapter(
        config.register_pool,
        lora_name=config.adapter_name,
        lora_path=output_dir,
        samples=[(r.id, r.query.replace("<image>", " ").strip()) for r in train_records],
        samples_path=config.dataset_path,
        embedder=embedder,
        num_key_samples=config.num_key_samples,
        seed=config.seed,
        copy_samples=config.copy_samples,
        fields={k: v for k, v in fields.items() if v is not None},
        image_embedder=image_embedder,
        image_samples=[(r.id, r.images) for r in train_records if r.images],
        text_weight=config.image.fusion_text_weight,
    )


def _template_cache(
    model_type: str, processor: Any, default_system: str | None
) -> Callable[[str | None], Any]:
    """``system -> Template``: one ``swift.llm`` template per distinct system prompt."""
    from swift.llm import get_template

    cache: dict[str | None, Any] = {}

    def template_for(system: str | None) -> Any:
        system = system if system is not None else default_system
        if system not in cache:
            cache[system] = get_template(model_type, processor, system=system)
        return cache[system]

    return template_for


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Copy the project's log records (``lora_retriever.*``, ``swift.*``) to ``path`` while training."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [get_logger("lora_retriever"), get_logger("swift")]
    for package_logger in loggers:
        package_logger.addHandler(handler)
    try:
        yield
    except BaseException:
        # The traceback goes to train.log only; the console shows it once, when the exception ends the program.
        handler.handle(
            logger.makeRecord(
                logger.name, logging.ERROR, __file__, 0, "training stopped:", (), sys.exc_info()
            )
        )
        raise
    finally:
        for package_logger in loggers:
            package_logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def _redirect_logs_through(enabled: bool) -> Iterator[None]:
    """Route console log lines through tqdm so they don't break the progress bar."""
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger("lora_retriever"), logging.getLogger("swift")]):
        yield
