"""``make demo-vlm``: LoraRetriever on the small VLM built here, with app- and category-level adapter pools.

1. build (or reuse) the small LLaVA-style VLM (``lora_retriever.vlm``: SmolLM2-135M-Instruct + a small
   vision transformer trained here; an ordinary ``LlavaForConditionalGeneration`` directory),
2. write the multimodal task suite (``lora_retriever.tasks.multimodal``: images of digits, photo crops and
   app screens; instructions that alone don't identify the task),
3. train one **app** adapter per task and one **category** adapter per category (the union of its tasks'
   data) with the library's trainer, in worker processes, each registered with a text key and an image key
   (the VLM's vision tower, mean-pooled); app adapters of ``vision_adapters`` also adapt the vision tower and
   the projector (``all-linear``), the others only the language model (``all-linear-lm``),
4. run the mixture of the top-k retrieved adapters (score-level fusion of text and image similarity) over
   both pools on the mixed multimodal test set, and return the per-task metrics.

Everything is cached under ``work_dir`` (the VLM in ``$LORA_RETRIEVER_CACHE``): a second run only runs
inference.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_retriever.demo import RECIPE_STAMP, DemoSettings, is_cached, train_all
from lora_retriever.embedders.config import ImageRetrievalConfig
from lora_retriever.training.config import TrainConfig
from swift.utils import get_logger
from swift.utils.files import atomic_write, ensure_writable_dir

logger = get_logger(__name__)

__all__ = ["VLM_TRAIN_ARGS", "DemoVlmConfig", "adapter_configs", "run_demo_vlm"]

VLM_TRAIN_ARGS = {  # every demo-vlm adapter's recipe (recorded in training_args.json and the reuse stamp)
    "lora_r": 8,
    "lora_alpha": 16,
    "learning_rate": 2e-3,
    "batch_size": 4,  # a step through SmolLM2 costs ~2 s per 4 examples here: 15 adapters x 40 steps fit ~10 min
    "max_length": 192,
    "eval_split": 0.1,
    "seed": 0,
}


def _default_vision_adapters() -> list[str]:
    return ["photo_source", "clock_hour"]


@dataclass
class DemoVlmConfig(DemoSettings):
    """Settings of ``make demo-vlm``; each field's ``help`` is its ``lora-retriever-demo-vlm`` flag's help."""

    work_dir: str = field(
        default="data/demo_vlm", metadata={"help": "cache for the task suite, adapters and keys"}
    )
    output_dir: str = field(default="outputs/demo_vlm", metadata={"help": "where predictions and metrics go"})
    steps: int = field(default=40, metadata={"help": "training steps per adapter (batch 4)"})
    vision_adapters: list[str] = field(
        default_factory=_default_vision_adapters,
        metadata={"help": "app adapters that also adapt the vision tower and projector"},
    )
    vlm_path: str | None = field(
        default=None,
        metadata={"help": "a built VLM directory to use (default: build or reuse the cached one)"},
    )

    def __post_init__(self) -> None:
        from lora_retriever.tasks.multimodal import MULTIMODAL_TASK_NAMES

        super().__post_init__()
        unknown = sorted(set(self.vision_adapters) - set(MULTIMODAL_TASK_NAMES))
        if unknown:
            raise ValueError(
                f"--vision_adapters {unknown} are not tasks of the multimodal suite; choose from "
                f"{list(MULTIMODAL_TASK_NAMES)}"
            )


def adapter_configs(
    tasks_dir: Path, pool_dir: Path, vlm_dir: Path, config: DemoVlmConfig
) -> list[tuple[TrainConfig, Path, dict[str, Any]]]:
    """Every demo adapter: ``(TrainConfig, its pool config, its reuse stamp)`` — one app adapter per task,
    one category adapter per category."""
    from lora_retriever.tasks.multimodal import CATEGORIES, get_multimodal_task

    image = ImageRetrievalConfig(image_embedder="vision-tower", image_embedder_path=str(vlm_dir))
    common = dict(
        model_type="llava",
        model_path=str(vlm_dir),
        max_steps=config.steps,
        save_steps=0,
        progress=False,  # one bar for all the trainings
        image=image,
        **VLM_TRAIN_ARGS,
    )
    out = []
    for category, tasks in CATEGORIES.items():
        for task in tasks:
            targets = ["all-linear"] if task in config.vision_adapters else ["all-linear-lm"]
            train = TrainConfig(
                dataset_path=str(tasks_dir / task / "train.jsonl"),
                output_dir=str(pool_dir / "app" / task),
                adapter_name=task,
                register_pool=str(pool_dir / "app.json"),
                description=get_multimodal_task(task).description,
                task=task,
                category=category,
                target_modules=targets,
                **common,
            )
            out.append((train, pool_dir / "app.json", _stamp(config, vlm_dir, targets)))
    for category, tasks in CATEGORIES.items():
        train = TrainConfig(
            dataset_path=str(tasks_dir / "categories" / category / "train.jsonl"),
            output_dir=str(pool_dir / "category" / category),
            adapter_name=category,
            register_pool=str(pool_dir / "category.json"),
            description=f"category {category}: " + ", ".join(tasks),
            category=category,
            target_modules=["all-linear-lm"],
            **common,
        )
        out.append((train, pool_dir / "category.json", _stamp(config, vlm_dir, ["all-linear-lm"])))
    return out


def _stamp(config: DemoVlmConfig, vlm_dir: Path, targets: list[str]) -> dict[str, Any]:
    """What a cached adapter must have been trained with to be reused (the suite's version too: a VLM given
    with ``--vlm_path`` keeps its name when the suite's images change)."""
    from lora_retriever.tasks.multimodal.suite import SUITE_VERSION

    return {
        **VLM_TRAIN_ARGS,
        "max_steps": config.steps,
        "target_modules": targets,
        "vlm": vlm_dir.name,
        "suite_version": SUITE_VERSION,
    }


def build_suite(work_dir: Path, n_test: int, seed: int, progress: bool) -> Path:
    from lora_retriever.tasks.multimodal import write_multimodal_suite
    from lora_retriever.tasks.multimodal.suite import SUITE_VERSION

    tasks_dir = work_dir / "tasks"
    manifest = tasks_dir / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        if (
            written.get("suite_version") == SUITE_VERSION
            and written.get("seed") == seed
            and written.get("requested", {}).get("n_test") == n_test
        ):
            logger.info("multimodal task suite: reusing %s", tasks_dir)
            return tasks_dir
    write_multimodal_suite(tasks_dir, seed=seed, n_test=n_test, overwrite=True, progress=progress)
    return tasks_dir


def run_demo_vlm(config: DemoVlmConfig) -> dict[str, Any]:
    """Build (or reuse) the VLM, the suite and the adapters, then run inference over the app and category
    pools. Returns the inference metrics plus ``demo`` (VLM and pool folders, seconds, adapters trained)."""
    from lora_retriever.pipeline import InferenceConfig, run_inference

    start = time.perf_counter()
    work_dir = ensure_writable_dir(config.work_dir, argument="work_dir").resolve()
    ensure_writable_dir(config.output_dir, argument="output_dir")
    vlm_dir = Path(config.vlm_path).expanduser().resolve() if config.vlm_path else _built_vlm(config.progress)
    tasks_dir = build_suite(work_dir, config.n_test, config.seed, config.progress)
    pool_dir = work_dir / "pool"
    todo = [
        (train, stamp)
        for train, pool_config, stamp in adapter_configs(tasks_dir, pool_dir, vlm_dir, config)
        if not is_cached(Path(train.output_dir), pool_config, train.adapter_name, stamp)
    ]
    if todo:
        logger.info(
            "training %d adapters (%d steps each, %d at a time): %s",
            len(todo),
            config.steps,
            config.workers,
            [t.adapter_name for t, _ in todo],
        )
        stamps = {t.adapter_name: stamp for t, stamp in todo}
        for train, _ in todo:
            (Path(train.output_dir) / RECIPE_STAMP).unlink(missing_ok=True)  # stale until it succeeds
        train_all(
            [t for t, _ in todo],
            config.workers,
            on_trained=lambda c: atomic_write(
                Path(c.output_dir) / RECIPE_STAMP, json.dumps(stamps[c.adapter_name])
            ),
            progress=config.progress,
        )
    image = ImageRetrievalConfig(image_embedder="vision-tower", image_embedder_path=str(vlm_dir))
    metrics = run_inference(
        InferenceConfig(
            test_data=str(tasks_dir / "test_mixed.jsonl"),
            app_configs=[str(pool_dir / "app.json")],
            category_configs=[str(pool_dir / "category.json")],
            model_type="llava",
            model_path=str(vlm_dir),
            merge_method=config.merge_method,
            top_k=config.top_k,
            max_new_tokens=8,
            batch_size=16,
            output_dir=config.output_dir,
            seed=config.seed,
            image=image,
            progress=config.progress,
        )
    )
    metrics["demo"] = {
        "vlm_dir": str(vlm_dir),
        "pool_dir": str(pool_dir),
        "trained": [t.adapter_name for t, _ in todo],
        "seconds": round(time.perf_counter() - start, 1),
    }
    return metrics


def _built_vlm(progress: bool) -> Path:
    """The cached VLM directory of the default recipe (built on first use)."""
    from lora_retriever.vlm import build_vlm

    return Path(build_vlm(progress=progress))


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.demo_vlm``: the ``lora-retriever-demo-vlm`` command."""
    from lora_retriever.cli.demo_vlm import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
