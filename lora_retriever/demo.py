"""``make demo``: the whole product on the embedded default, offline (``run_demo(DemoConfig())``).

1. build the offline task suite (seeded, from data inside installed packages),
2. train one LoRA adapter per task on SmolLM2-135M-Instruct through ``lora_retriever.training.train`` and
   register each in a pool config with its retrieval key — two trainings at a time, each in its own process
   with one thread, their steps relayed to one progress bar,
3. run the mixture of the top-3 retrieved adapters on the mixed-task test set (``run_inference``) and return
   the per-task metrics.

Everything is cached under ``work_dir``: a second run reuses the task files, adapters and keys and only runs
inference. Only library code runs (no script of the repository), so the demo works from an installed package.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_retriever.pipeline import MERGE_METHODS
from lora_retriever.training.config import TrainConfig
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES
from swift.utils import get_logger
from swift.utils.files import atomic_write, ensure_writable_dir

if TYPE_CHECKING:
    from lora_retriever.pool20 import PoolBuildConfig

logger = get_logger(__name__)

__all__ = [
    "RECIPE_STAMP",
    "TRAIN_ARGS",
    "DemoConfig",
    "build_task_pool",
    "DemoSettings",
    "is_cached",
    "is_trained",
    "recipe",
    "run_demo",
    "train_all",
    "train_config",
]

TRAIN_ARGS = {  # the exact recipe every demo adapter is trained with (recorded in training_args.json)
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": "all-linear",
    "learning_rate": 2e-3,
    "batch_size": 8,
    "max_length": 96,
    "eval_split": 0.1,
    "seed": 0,
}
RECIPE_STAMP = "demo_recipe.json"
POLL_SECONDS = 0.5


@dataclass
class DemoSettings:
    """What every demo takes: where its cache and outputs go, the training and retrieval settings."""

    work_dir: str = field(default="data/demo", metadata={"help": "cache for the tasks, adapters and keys"})
    output_dir: str = field(default="outputs/demo", metadata={"help": "where predictions and metrics go"})
    steps: int = field(default=50, metadata={"help": "training steps per adapter (batch 8)"})
    workers: int = field(default=2, metadata={"help": "trainings run at a time, one thread each"})
    n_test: int = field(default=20, metadata={"help": "test items per task"})
    top_k: int = field(default=3, metadata={"help": "adapters retrieved per input"})
    merge_method: str = field(
        default="mixture", metadata={"help": "how the retrieved adapters are used", "choices": MERGE_METHODS}
    )
    seed: int = field(default=0, metadata={"help": "seed of the task suite and the inference run"})
    progress: bool = field(default=True, metadata={"help": "show progress bars", "cli": False})

    def __post_init__(self) -> None:
        for name in ("steps", "workers", "n_test", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; pass --{name} N")


@dataclass
class DemoConfig(DemoSettings):
    """Settings of ``make demo``; each field's ``help`` is its ``lora-retriever-demo`` flag's help."""

    model_type: str = field(
        default=DEFAULT_MODEL_TYPE, metadata={"help": "base model type", "choices": MODEL_TYPE_CHOICES}
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local base model directory (not needed for the packaged default)"}
    )


def build_tasks(work_dir: Path, n_test: int, seed: int, tasks: Sequence[str] | None = None) -> Path:
    """Write the task suite of ``tasks`` (default: the demo's seven, ``DEMO_TASK_NAMES``) to
    ``work_dir/tasks``, or reuse the one there if it was written with the same tasks, seed and ``n_test``."""
    from lora_retriever.tasks import DEMO_TASK_NAMES, write_task_suite

    tasks = list(DEMO_TASK_NAMES if tasks is None else tasks)
    tasks_dir = work_dir / "tasks"
    manifest_path = tasks_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if (
        manifest.get("seed") == seed
        and list(manifest.get("tasks", ())) == tasks
        and manifest.get("requested", {}).get("n_test") == n_test
    ):
        logger.info("task suite: reusing %s", tasks_dir)
    else:
        write_task_suite(tasks_dir, tasks, seed=seed, n_test=n_test)
    return tasks_dir


def recipe(steps: int, model_type: str = DEFAULT_MODEL_TYPE, model_path: str | None = None) -> dict[str, Any]:
    """What a cached adapter must have been trained with to be reused (the base model only if not the default)."""
    model = (
        {} if (model_type, model_path) == (DEFAULT_MODEL_TYPE, None) else {"model": [model_type, model_path]}
    )
    return {**TRAIN_ARGS, "max_steps": steps, **model}


def train_config(
    task: str,
    tasks_dir: Path,
    pool_dir: Path,
    steps: int,
    *,
    model_type: str = DEFAULT_MODEL_TYPE,
    model_path: str | None = None,
) -> TrainConfig:
    """The ``TrainConfig`` of one demo adapter: the recipe, registered in ``pool_dir/pool.json``."""
    from lora_retriever.tasks import get_task

    return TrainConfig(
        dataset_path=str(tasks_dir / task / "train.jsonl"),
        output_dir=str(pool_dir / task),
        adapter_name=task,
        model_type=model_type,
        model_path=model_path,
        max_steps=steps,
        register_pool=str(pool_dir / "pool.json"),
        description=get_task(task).description,
        task=task,
        save_steps=0,
        progress=False,  # the demo shows one bar for all its trainings
        **TRAIN_ARGS,
    )


def is_trained(pool_dir: Path, task: str, stamp: dict[str, Any]) -> bool:
    """A finished adapter trained with this recipe, registered in the pool with its key."""
    return is_cached(pool_dir / task, pool_dir / "pool.json", task, stamp)


def is_cached(adapter_dir: Path, pool_config: Path, name: str, stamp: dict[str, Any]) -> bool:
    """``adapter_dir`` holds a finished adapter trained with the recipe ``stamp``, registered as ``name`` in
    ``pool_config`` with every key its entry names (text, and image when it has one)."""
    stamp_path = adapter_dir / RECIPE_STAMP
    if not (adapter_dir / "adapter_model.safetensors").is_file() or not stamp_path.is_file():
        return False
    if not pool_config.is_file() or json.loads(stamp_path.read_text()) != stamp:
        return False
    entries = {e["lora_name"]: e for e in json.loads(pool_config.read_text())}
    if name not in entries:
        return False
    keys = [entries[name].get("embedding_path", "missing"), entries[name].get("image_embedding_path")]
    return all((pool_config.parent / key).is_file() for key in keys if key is not None)


def train_all(
    configs: list[TrainConfig],
    workers: int,
    *,
    on_trained: Callable[[TrainConfig], None] | None = None,
    progress: bool = True,
) -> None:
    """Train ``configs`` (one adapter each), ``workers`` at a time; one bar advances with every step.

    With one worker the trainings run here, one after the other; with more, each runs in its own process
    (one torch thread) writing its console output to ``<output_dir>.train.log``, and sends its steps back.
    ``on_trained(config)`` is called as soon as an adapter is done (so a later failure keeps it).

    Raises:
        ChildProcessError: a training process failed (names its log).
    """
    from tqdm.auto import tqdm

    total = sum(c.max_steps for c in configs)
    done = on_trained or (lambda config: None)
    with tqdm(total=total, desc="training adapters", unit="step", disable=not progress) as bar:
        relay = _StepRelay(bar, {c.adapter_name: c.max_steps for c in configs})
        if workers == 1 or len(configs) == 1:
            _train_here(configs, relay, done)
        else:
            _train_in_processes(configs, workers, relay, done)


class _StepRelay:
    """Moves the bar as the trainings report ``(adapter, step, loss)``; the postfix shows each one's step."""

    def __init__(self, bar: Any, steps: dict[str, int]) -> None:
        self.bar, self.steps, self.done, self.losses = bar, steps, dict.fromkeys(steps, 0), {}

    def __call__(self, name: str, step: int, loss: float | None = None) -> None:
        if step > self.done[name]:
            self.bar.update(step - self.done[name])
            self.done[name] = step
        if loss is not None:
            self.losses[name] = loss
        running = [n for n in self.steps if 0 < self.done[n] < self.steps[n]]
        self.bar.set_postfix_str(
            ", ".join(
                f"{n} {self.done[n]}/{self.steps[n]} loss {self.losses.get(n, float('nan')):.3f}"
                for n in running
            )
        )

    def for_adapter(self, name: str) -> Callable[[int, float], None]:
        return lambda step, loss: self(name, step, loss)


def _train_here(configs: list[TrainConfig], relay: _StepRelay, done: Callable[[TrainConfig], None]) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.training import train

    embedder = get_embedder(EmbedderConfig(device=configs[0].device))  # one embedder for every key
    with logging_redirect_tqdm(loggers=[get_logger("lora_retriever"), get_logger("swift")]):
        for config in configs:
            train(config, embedder=embedder, on_step=relay.for_adapter(config.adapter_name))
            relay(config.adapter_name, config.max_steps)
            done(config)


def _train_in_processes(
    configs: list[TrainConfig], workers: int, relay: _StepRelay, done: Callable[[TrainConfig], None]
) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
    steps = context.Queue()
    todo, running, failed = list(configs), {}, []
    while todo or running:
        while todo and len(running) < workers:
            config = todo.pop(0)
            log = log_path(config)
            log.parent.mkdir(parents=True, exist_ok=True)
            process = context.Process(
                target=_train_child, args=(config, str(log), steps), name=f"train-{config.adapter_name}"
            )
            process.start()
            running[config.adapter_name] = (process, config, log)
        try:
            relay(*steps.get(timeout=POLL_SECONDS))
            while True:
                relay(*steps.get_nowait())
        except queue.Empty:
            pass
        for name, (process, config, log) in list(running.items()):
            if process.exitcode is None:
                continue
            process.join()
            del running[name]
            if process.exitcode == 0:
                relay(name, config.max_steps)
                done(config)
            else:
                failed.append((name, process.exitcode, log))
                logger.error("training %s failed (exit %d); see %s", name, process.exitcode, log)
    if failed:
        raise ChildProcessError(
            "training failed for "
            + ", ".join(f"{name} (exit {code}, log: {log})" for name, code, log in failed)
        )


def log_path(config: TrainConfig) -> Path:
    """Where a training process's console output goes: ``<output_dir>.train.log`` beside the adapter."""
    out = Path(config.output_dir)
    return out.with_name(f"{out.name}.train.log")


def _train_child(config: TrainConfig, log: str, steps: Any) -> None:
    """One training in its own process: console output to ``log``, one torch thread, steps to ``steps``."""
    import torch

    from lora_retriever.training import train

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)  # two trainings on two cores
    train(config, on_step=lambda step, loss: steps.put((config.adapter_name, step, loss)))


def build_task_pool(
    config: DemoConfig | PoolBuildConfig, tasks: Sequence[str]
) -> tuple[Path, Path, list[str]]:
    """In ``config.work_dir``: the task suite of ``tasks`` (``build_tasks``) and their adapters, trained with
    the demo's recipe (``train_all``) and registered with their keys in ``pool/pool.json``. Adapters already
    there with the same recipe are reused; each new one gets its recipe stamp as soon as its training
    succeeds, so an interrupted build resumes.

    Returns:
        ``(tasks_dir, pool_dir, tasks trained now)``.
    """
    from swift.llm.model import smollm2_hf_dir

    work_dir = ensure_writable_dir(config.work_dir, argument="work_dir").resolve()
    if config.model_type == DEFAULT_MODEL_TYPE and config.model_path is None:
        smollm2_hf_dir()  # convert the packaged GGUF once, before the trainings start in parallel
    tasks_dir = build_tasks(work_dir, config.n_test, config.seed, tasks)
    pool_dir = work_dir / "pool"
    stamp = recipe(config.steps, config.model_type, config.model_path)
    todo = [t for t in tasks if not is_trained(pool_dir, t, stamp)]
    if not todo:
        logger.info("adapters: all %d reused from %s", len(tasks), pool_dir)
        return tasks_dir, pool_dir, todo
    pool_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "training %d adapters (%d steps each, %d at a time): %s",
        len(todo),
        config.steps,
        config.workers,
        todo,
    )
    for task in todo:
        (pool_dir / task / RECIPE_STAMP).unlink(missing_ok=True)  # stale until this training succeeds
    configs = [
        train_config(
            t, tasks_dir, pool_dir, config.steps, model_type=config.model_type, model_path=config.model_path
        )
        for t in todo
    ]
    train_all(
        configs,
        config.workers,
        on_trained=lambda c: atomic_write(Path(c.output_dir) / RECIPE_STAMP, json.dumps(stamp)),
        progress=config.progress,
    )
    return tasks_dir, pool_dir, todo


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Build the tasks, train and register the adapters that aren't cached, then run inference.

    Returns:
        The inference metrics, plus ``demo`` (pool folder, seconds, number of adapters).
    """
    from lora_retriever.pipeline import InferenceConfig, run_inference
    from lora_retriever.tasks import DEMO_TASK_NAMES

    start = time.perf_counter()
    ensure_writable_dir(config.work_dir, argument="work_dir")
    ensure_writable_dir(config.output_dir, argument="output_dir")
    tasks_dir, pool_dir, todo = build_task_pool(config, DEMO_TASK_NAMES)
    metrics = run_inference(
        InferenceConfig(
            test_data=str(tasks_dir / "test_mixed.jsonl"),
            pools=[str(pool_dir / "pool.json")],
            model_type=config.model_type,
            model_path=config.model_path,
            merge_method=config.merge_method,
            top_k=config.top_k,
            max_new_tokens=16,
            batch_size=16,
            output_dir=config.output_dir,
            seed=config.seed,
            progress=config.progress,
        )
    )
    metrics["demo"] = {
        "pool_dir": str(pool_dir),
        "num_adapters": len(DEMO_TASK_NAMES),
        "trained": todo,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.demo``: the ``lora-retriever-demo`` command."""
    from lora_retriever.cli.demo import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
