"""Serve the packaged SmolLM2 and an adapter pool over an OpenAI-compatible HTTP API (LoraRetriever service).

Example (after ``make demo`` has built the demo pool):

    lora-retriever-serve                      # 127.0.0.1:8000, the demo pool
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "auto", "messages": [{"role": "user", "content": "What is the capital of Peru?"}]}'

``model`` is the base model, one adapter of the pool, "auto" (the top-k adapters retrieved for the input,
mixed) or "mixture" with an explicit {"adapters": [{"name": ..., "weight": ...}]}. Every setting is checked
before the model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_retriever.cli.args import command_parser, config_kwargs
from lora_retriever.cli.errors import run_cli
from lora_retriever.service.config import ServiceConfig
from lora_retriever.service.settings import add_settings_flags, load_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__, ServiceConfig)
    add_settings_flags(parser, ServiceConfig)  # --config FILE; flags > LORA_RETRIEVER_* > file > defaults
    parser.add_argument(
        "--new_key",
        metavar="SCOPE[:LABEL]",
        help="print a new API key (line 1: give it to the client) and its entry (line 2: configure it with "
        "--api_key, LORA_RETRIEVER_API_KEYS or --api_keys_file), then exit; scope read or admin",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _serve, argv)


def _serve(args: argparse.Namespace) -> int:
    from lora_retriever.service.server import serve

    if args.new_key is not None:
        from lora_retriever.service.auth import new_key

        scope, _, label = args.new_key.partition(":")
        key, entry = new_key(scope, label or None)
        print(key)
        print(entry)
        return 0
    config = load_config(ServiceConfig, cli=config_kwargs(ServiceConfig, args), config_file=args.config)
    serve(config, log_level="debug" if args.verbose or args.debug else "warning" if args.quiet else "info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
