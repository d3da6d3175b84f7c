"""``make demo``: build the offline task suite, train and register one adapter per task on the packaged
SmolLM2-135M-Instruct, then run the mixture of the top-3 retrieved adapters and print the per-task table.

A second run reuses the cached tasks, adapters and keys (under --work_dir) and only runs inference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.demo import DemoConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, DemoConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _demo, argv)


def _demo(args: argparse.Namespace) -> int:
    from lora_retriever.demo import run_demo
    from lora_retriever.pipeline import format_table

    config = config_from_args(DemoConfig, args, progress=not args.quiet)
    metrics = run_demo(config)
    demo, out, pool_dir = metrics["demo"], Path(config.output_dir), Path(metrics["demo"]["pool_dir"])
    print(format_table(metrics))
    print(
        f"\n{config.merge_method} of the top-{config.top_k} retrieved adapters, "
        f"{metrics['run']['num_samples']} test items, {demo['num_adapters']} task adapters"
    )
    print(f"predictions: {out / 'predictions.jsonl'}")
    print(f"metrics:     {out / 'metrics.json'}")
    print(f"adapters:    {pool_dir} (pool config: {pool_dir / 'pool.json'})")
    print(f"total time:  {demo['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
