"""Train a LoRA (or QLoRA) adapter on a JSON / JSONL dataset and optionally add it to an adapter pool.

Example (the packaged SmolLM2-135M-Instruct as the base model):

    lora-retriever-train --dataset_path data/addition.jsonl --output_dir adapters/addition \\
        --max_steps 80 --register_pool config/pool.json --task addition

Writes the PEFT adapter (adapter_config.json + adapter_model.safetensors), training_args.json,
metrics.json (train loss first/last, eval loss and perplexity before/after, ...), train.log and
checkpoint-<step>/ folders to --output_dir. Dataset records: {"input", "output"} (a JSON list,
{"data": [...]} or JSONL), or chat {"messages": [...], "images": [...]}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.embedders.config import ImageRetrievalConfig
from lora_retriever.training.config import TrainConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, TrainConfig, ImageRetrievalConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _train, argv)


def _train(args: argparse.Namespace) -> int:
    from lora_retriever.training import train

    image = config_from_args(ImageRetrievalConfig, args)  # the image embedder's directory is checked here
    config = config_from_args(TrainConfig, args, image=image, progress=not args.quiet)
    metrics = train(config)
    print(summary(config.output_dir, metrics))
    return 0


def summary(output_dir: str, metrics: dict[str, Any]) -> str:
    """The lines printed after a run: where the adapter is, steps, and the losses before -> after."""

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"adapter:     {output_dir}  ({metrics['trainable_params']:,} trainable params)",
        f"steps:       {metrics['steps']}  ({metrics['train_seconds']:.1f} s)",
        f"train loss:  {show(metrics['train_loss_first'])} -> {show(metrics['train_loss_last'])}",
        f"eval loss:   {show(metrics['eval_loss_before'])} -> {show(metrics['eval_loss_after'])}",
        f"eval ppl:    {show(metrics['eval_perplexity_before'])} -> {show(metrics['eval_perplexity_after'])}",
    ]
    if "pool_entry" in metrics:
        lines.append(f"registered:  {metrics['pool_entry']['lora_name']!r} in the pool config")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
