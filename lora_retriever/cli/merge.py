"""Merge LoRA adapters into one PEFT adapter (``lora_retriever.merge``).

    lora-retriever-merge --adapters adapters/a adapters/b --weights 0.5 0.5 --method cat --out merged

Prints a JSON summary (sources, weights, rank, svd truncation error). Refuses a non-empty --out without
--overwrite, and always refuses an input adapter as --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lora_retriever.cli.args import command_parser, config_from_args
from lora_retriever.cli.errors import run_cli
from lora_retriever.merge import MergeConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    return command_parser(__doc__, MergeConfig)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _merge, argv)


def _merge(args: argparse.Namespace) -> int:
    from lora_retriever.merge import merge_adapters

    print(json.dumps(merge_adapters(config_from_args(MergeConfig, args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
