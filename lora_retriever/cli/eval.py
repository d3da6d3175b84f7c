"""The LoraRetriever paper's protocol on a pool (``lora_retriever.eval``): every method, in and out of domain.

    lora-retriever-eval --pool data/demo/pool/pool.json --test_data data/demo/tasks/test_mixed.jsonl
    lora-retriever-eval --suite multimodal     # the app + category pools make demo-vlm builds, on its VLM

Writes table.md, results.json and results.png to --output_dir (together, when the run is complete); the
defaults are the pool and test sets ``make demo`` builds (``--suite multimodal``: ``make demo-vlm``'s pools,
test sets and VLM, with its vision tower as the image embedder; flags given explicitly win).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.embedders.config import ImageRetrievalConfig
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES

__all__ = ["PaperEvalConfig", "build_parser", "main"]


def _methods() -> list[str]:
    from lora_retriever.eval import METHODS

    return list(METHODS)


@dataclass
class PaperEvalConfig:
    """Settings of ``lora_retriever.eval.run``; each field's ``help`` is its flag's help."""

    suite: str = field(
        default="text",
        metadata={
            "help": "whose defaults to use: text (make demo's pool) or multimodal (make demo-vlm's app and "
            "category pools, test sets and VLM)",
            "choices": ("text", "multimodal"),
        },
    )
    pool: str = field(
        default="data/demo/pool/pool.json", metadata={"help": "pool config (make demo builds it)"}
    )
    app_configs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "pool config of app (task) adapters (repeatable; with --category_config: pools app, "
            "category and all instead of --pool)",
            "flag": "app_config",
            "action": "append",
        },
    )
    category_configs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "pool config of category adapters (repeatable)",
            "flag": "category_config",
            "action": "append",
        },
    )
    pool_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "which of the pools app, category, all to run (default: every one available)",
            "choices": ("app", "category", "all"),
        },
    )
    test_data: str = field(
        default="data/demo/tasks/test_mixed.jsonl", metadata={"help": "mixed-task test set"}
    )
    test_alt: str | None = field(
        default="data/demo/tasks/test_mixed_alt.jsonl",
        metadata={"help": "the same items, worded differently, for the retriever's accuracy ('' to skip)"},
    )
    model_type: str = field(
        default=DEFAULT_MODEL_TYPE, metadata={"help": "base model type", "choices": MODEL_TYPE_CHOICES}
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local model directory (not needed for the default)"}
    )
    methods: list[str] = field(
        default_factory=_methods, metadata={"help": "table columns (methods) to run", "choices": _methods}
    )
    top_k: int = field(default=3, metadata={"help": "adapters per sample for mixture and fusion"})
    num_samples: int | None = field(default=None, metadata={"help": "only the first N test samples"})
    batch_size: int = field(default=16, metadata={"help": "samples generated per batch"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation limit per answer"})
    seed: int = field(default=0, metadata={"help": "torch seed"})
    output_dir: str = field(
        default="outputs/paper_protocol", metadata={"help": "where table.md, results.json and results.png go"}
    )
    embedder_adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "a PEFT LoRA adapter on the text embedder (python -m lora_retriever.train_retriever writes "
            "one); the pool's keys must have been built with it"
        },
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": "only the test items of these tasks (default: every task)"}
    )
    image: ImageRetrievalConfig | None = field(
        default=None, metadata={"help": "image-aware retrieval (flags --image_embedder ...)", "cli": False}
    )

    def __post_init__(self) -> None:
        if self.embedder_adapter_path is not None:
            from lora_retriever.embedders.config import validate_adapter_path

            self.embedder_adapter_path = str(validate_adapter_path(self.embedder_adapter_path))
        for name in ("top_k", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, PaperEvalConfig, ImageRetrievalConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _evaluate, argv)


def _evaluate(args: argparse.Namespace) -> int:
    from lora_retriever.eval import markdown_table, plot, run
    from swift.utils.files import atomic_write_together, ensure_writable_dir

    if args.suite == "multimodal":
        _multimodal_defaults(args)
    image = config_from_args(ImageRetrievalConfig, args)  # the image embedder's directory is checked here
    config = config_from_args(PaperEvalConfig, args, image=image)
    # Validate before working: the output folder, and matplotlib for the plot written at the very end.
    out = ensure_writable_dir(config.output_dir, argument="output_dir")
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the results plot needs matplotlib: pip install matplotlib (or the [plots] extra)")
    result = run(config)
    table = markdown_table(result)
    atomic_write_together(
        {
            out / "results.json": json.dumps(result, indent=2) + "\n",
            out / "table.md": table,
            out / "results.png": lambda f: plot(result, f),
        }
    )
    print(table)
    print(f"written: {out / 'table.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


def _multimodal_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left at their text defaults with ``make demo-vlm``'s pools, test sets and built VLM."""
    from pathlib import Path

    from lora_retriever.demo_vlm import DemoVlmConfig
    from lora_retriever.vlm import read_build_info, vlm_dir

    defaults = {f.name: f.default for f in PaperEvalConfig.__dataclass_fields__.values()}
    work = Path(DemoVlmConfig.__dataclass_fields__["work_dir"].default)
    if not (args.app_configs or args.category_configs):
        args.app_configs = [str(work / "pool" / "app.json")]
        args.category_configs = [str(work / "pool" / "category.json")]
        for path in args.app_configs + args.category_configs:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"--suite multimodal: {path} does not exist; `make demo-vlm` builds it."
                )
    if args.test_data == defaults["test_data"]:
        args.test_data = str(work / "tasks" / "test_mixed.jsonl")
    if args.test_alt == defaults["test_alt"]:
        args.test_alt = str(work / "tasks" / "test_mixed_alt.jsonl")
    if args.model_type == defaults["model_type"]:
        args.model_type = "llava"
    if args.model_path is None:
        folder = vlm_dir()
        read_build_info(folder)  # a finished build, or an error naming the command that builds it
        args.model_path = str(folder)
    if args.image_embedder is None and args.image_embedder_path is None:
        args.image_embedder, args.image_embedder_path = "vision-tower", args.model_path
    if args.output_dir == defaults["output_dir"]:
        args.output_dir = "outputs/multimodal_protocol"


if __name__ == "__main__":
    sys.exit(main())
