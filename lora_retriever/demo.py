"""``make demo``: the whole product on the embedded default, offline.

1. build the offline task suite (seeded, from data inside installed packages),
2. train one LoRA adapter per task on SmolLM2-135M-Instruct with ``train.py`` and register each in a pool
   config with its retrieval key (two trainings at a time, one thread each),
3. run ``infer_lora_retriever.py`` with the mixture of the top-3 retrieved adapters on the mixed-task test
   set, and print the per-task table.

Everything is cached under ``--work_dir``: a second run reuses the task files, adapters and keys and only
runs inference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from swift.utils import get_logger

logger = get_logger(__name__)

REPO = Path(__file__).resolve().parent.parent
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


def build_tasks(work_dir: Path, n_test: int, seed: int) -> Path:
    from lora_retriever.tasks import write_task_suite

    tasks_dir = work_dir / "tasks"
    manifest = tasks_dir / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("seed") == seed:
        logger.info("task suite: reusing %s", tasks_dir)
    else:
        write_task_suite(tasks_dir, seed=seed, n_test=n_test)
    return tasks_dir


RECIPE_STAMP = "demo_recipe.json"


def recipe(steps: int) -> dict:
    return {**TRAIN_ARGS, "max_steps": steps}


def train_command(task: str, tasks_dir: Path, pool_dir: Path, steps: int) -> list[str]:
    from lora_retriever.tasks import get_task

    args = [
        sys.executable,
        str(REPO / "train.py"),
        "--dataset_path",
        str(tasks_dir / task / "train.jsonl"),
        "--output_dir",
        str(pool_dir / task),
        "--adapter_name",
        task,
        "--max_steps",
        str(steps),
        "--register_pool",
        str(pool_dir / "pool.json"),
        "--description",
        get_task(task).description,
        "--task",
        task,
        "--threads",
        "1",
        "--save_steps",
        "0",
        "--quiet",
    ]
    for key, value in TRAIN_ARGS.items():
        args += [f"--{key}", str(value)]
    return args


def is_trained(pool_dir: Path, task: str, steps: int) -> bool:
    """A finished adapter trained with this recipe, registered in the pool with its key."""
    out = pool_dir / task
    stamp, config = out / RECIPE_STAMP, pool_dir / "pool.json"
    if not (out / "adapter_model.safetensors").is_file() or not stamp.is_file() or not config.is_file():
        return False
    if json.loads(stamp.read_text()) != recipe(steps):
        return False
    entries = {e["lora_name"]: e for e in json.loads(config.read_text())}
    return task in entries and (pool_dir / entries[task].get("embedding_path", "missing")).is_file()


def train_all(tasks: list[str], tasks_dir: Path, pool_dir: Path, steps: int, workers: int) -> None:
    from tqdm.auto import tqdm

    todo = [t for t in tasks if not is_trained(pool_dir, t, steps)]
    if not todo:
        logger.info("adapters: all %d reused from %s", len(tasks), pool_dir)
        return
    pool_dir.mkdir(parents=True, exist_ok=True)
    logger.info("training %d adapters (%d steps each, %d at a time): %s", len(todo), steps, workers, todo)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    failed = []
    with tqdm(total=len(todo), desc="training adapters", unit="adapter") as bar:
        while todo or running:
            while todo and len(running) < workers:
                task = todo.pop(0)
                (pool_dir / task / RECIPE_STAMP).unlink(missing_ok=True)  # stale until this training succeeds
                log = pool_dir / f"{task}.train.log"
                handle = log.open("w")
                proc = subprocess.Popen(
                    train_command(task, tasks_dir, pool_dir, steps),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
                running.append((task, proc, log))
            time.sleep(1.0)
            for item in list(running):
                task, proc, log = item
                if proc.poll() is not None:
                    running.remove(item)
                    bar.update(1)
                    if proc.returncode != 0:
                        failed.append(task)
                        logger.error("training %s failed (exit %d); see %s", task, proc.returncode, log)
                    else:
                        (pool_dir / task / RECIPE_STAMP).write_text(json.dumps(recipe(steps)))
    if failed:
        raise RuntimeError(f"training failed for {failed}; logs in {pool_dir}/<task>.train.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work_dir", default="data/demo", help="cache for tasks, adapters and keys")
    parser.add_argument("--output_dir", default="outputs/demo", help="where predictions and metrics go")
    parser.add_argument("--steps", type=int, default=50, help="training steps per adapter (batch 8)")
    parser.add_argument("--workers", type=int, default=2, help="trainings run at a time (one thread each)")
    parser.add_argument("--n_test", type=int, default=20, help="test items per task")
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--merge_method", default="mixture")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lora_retriever.pipeline import InferenceConfig, format_table, run_inference
    from lora_retriever.tasks import TASK_NAMES
    from swift.llm.model import smollm2_hf_dir

    start = time.perf_counter()
    work_dir = Path(args.work_dir).resolve()
    smollm2_hf_dir()  # convert the packaged GGUF once, before the trainings start in parallel
    tasks_dir = build_tasks(work_dir, args.n_test, args.seed)
    pool_dir = work_dir / "pool"
    train_all(list(TASK_NAMES), tasks_dir, pool_dir, args.steps, args.workers)
    config = InferenceConfig(
        test_data=str(tasks_dir / "test_mixed.jsonl"),
        pools=[str(pool_dir / "pool.json")],
        merge_method=args.merge_method,
        top_k=args.top_k,
        max_new_tokens=16,
        batch_size=16,
        output_dir=args.output_dir,
        seed=args.seed,
    )
    metrics = run_inference(config)
    print(format_table(metrics))
    print(
        f"\n{args.merge_method} of the top-{args.top_k} retrieved adapters, "
        f"{metrics['run']['num_samples']} test items, {len(TASK_NAMES)} task adapters"
    )
    print(f"predictions: {Path(args.output_dir) / 'predictions.jsonl'}")
    print(f"metrics:     {Path(args.output_dir) / 'metrics.json'}")
    print(f"adapters:    {pool_dir} (pool config: {pool_dir / 'pool.json'})")
    print(f"total time:  {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
