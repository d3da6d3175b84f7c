"""``make demo-vlm``: build (or reuse) the small VLM, the multimodal task suite, app and category adapters
with text and image keys, then run the mixture of the top-3 retrieved adapters on the mixed multimodal test
set and print the per-task table.

A second run reuses the cached VLM, tasks, adapters and keys and only runs inference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.demo_vlm import DemoVlmConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, DemoVlmConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _demo_vlm, argv)


def _demo_vlm(args: argparse.Namespace) -> int:
    from lora_retriever.demo_vlm import run_demo_vlm
    from lora_retriever.pipeline import format_table

    config = config_from_args(DemoVlmConfig, args, progress=not args.quiet)
    metrics = run_demo_vlm(config)
    demo, out = metrics["demo"], Path(config.output_dir)
    print(format_table(metrics))
    print(
        f"\n{config.merge_method} of the top-{config.top_k} retrieved adapters (app + category pools, text and "
        f"image keys), {metrics['run']['num_samples']} test items, {metrics['run']['pool_size']} adapters"
    )
    print(f"VLM:         {demo['vlm_dir']}")
    print(f"predictions: {out / 'predictions.jsonl'}")
    print(f"metrics:     {out / 'metrics.json'}")
    print(f"total time:  {demo['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
