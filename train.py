#!/usr/bin/env python
"""Train a LoRA / QLoRA adapter: the same command as ``lora-retriever-train`` (``lora_retriever.cli.train``)."""

import sys

from lora_retriever.cli.train import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
