"""Retrieve LoRA adapters per input, compose them, generate, and score a JSONL test set.

Example (after ``make demo`` has built a pool and its keys):

    lora-retriever-infer --test_data data/demo/tasks/test_mixed.jsonl --pool data/demo/pool/pool.json \\
        --top_k 3 --merge_method mixture --output_dir outputs/mixture

Checks the output folder, the test set and the pool before loading a model; writes predictions.jsonl and
metrics.json to --output_dir (together, when the run is complete) and prints the per-task table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.embedders.config import ImageRetrievalConfig
from lora_retriever.pipeline import InferenceConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, InferenceConfig, ImageRetrievalConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _infer, argv)


def _infer(args: argparse.Namespace) -> int:
    from lora_retriever.pipeline import format_table, run_inference

    image = config_from_args(ImageRetrievalConfig, args)  # the image embedder's directory is checked here
    config = config_from_args(InferenceConfig, args, image=image, progress=not args.quiet)
    metrics = run_inference(config)
    out = Path(config.output_dir)
    print(format_table(metrics))
    print(f"\npredictions: {out / 'predictions.jsonl'}\nmetrics:     {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
