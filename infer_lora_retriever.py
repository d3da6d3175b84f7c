#!/usr/bin/env python
"""Retrieve, compose, generate and score: the same command as ``lora-retriever-infer`` (``lora_retriever.cli.infer``)."""

import sys

from lora_retriever.cli.infer import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
