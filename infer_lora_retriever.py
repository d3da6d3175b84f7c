#!/usr/bin/env python
"""Retrieve LoRA adapters per input, compose them, generate, and score a JSONL test set.

Example (after building a pool and its keys):

    python infer_lora_retriever.py --test_data data/test.jsonl --pool config/pool.json \\
        --top_k 3 --merge_method mixture --output_dir outputs/mixture
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--test_data", required=True, help="JSONL test set (query/response/images/task or messages)"
    )
    p.add_argument(
        "--model_type",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default, packaged), llama, qwen2, qwen2-vl, qwen2.5-vl, internvl, "
        "llava, internvl2, or auto",
    )
    p.add_argument(
        "--model_path", default=None, help="local model directory (not needed for the default model)"
    )
    p.add_argument("--pool", action="append", default=[], help="adapter pool config JSON (repeatable)")
    p.add_argument(
        "--app_config",
        action="append",
        default=[],
        help="pool config whose entries default to lora_type=app (repeatable)",
    )
    p.add_argument(
        "--category_config",
        action="append",
        default=[],
        help="pool config whose entries default to lora_type=category (repeatable)",
    )
    p.add_argument(
        "--lora_type", default="all", help="keep adapters with this lora_type (app, category, all)"
    )
    p.add_argument("--top_k", type=int, default=3, help="adapters retrieved per input (default 3)")
    p.add_argument(
        "--merge_method", default="mixture", choices=["mixture", "fusion", "selection", "base", "oracle"]
    )
    p.add_argument(
        "--composition_weight_mode",
        default="uniform",
        choices=["uniform", "softmax", "similarity"],
        help="weights of the k adapters (uniform 1/k is the paper's)",
    )
    p.add_argument(
        "--combination_type",
        default="linear",
        choices=["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"],
        help="fusion method for --merge_method fusion (linear is the paper's)",
    )
    p.add_argument("--retrieval_temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--ood", action="store_true", help="out-of-domain: exclude each sample's own task adapter")
    p.add_argument(
        "--embedder",
        default="sentence-transformers",
        choices=["sentence-transformers", "jina-v4", "clip", "auto"],
        help="retrieval embedder backend",
    )
    p.add_argument(
        "--embedder_path",
        default=None,
        help="local embedder directory (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--output_dir", default="outputs/infer", help="where predictions.jsonl and metrics.json go"
    )
    p.add_argument("--num_samples", type=int, default=None, help="only the first N samples")
    p.add_argument("--show_similarities", action="store_true", help="log query/adapter similarity tables")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lora_retriever.pipeline import InferenceConfig, format_table, run_inference
    from swift.utils import get_logger

    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    get_logger("lora_retriever", level)
    get_logger("swift", level)
    options = vars(args)
    config = InferenceConfig(
        test_data=options.pop("test_data"),
        pools=options.pop("pool"),
        app_configs=options.pop("app_config"),
        category_configs=options.pop("category_config"),
        progress=not options.pop("quiet"),
        **{k: v for k, v in options.items() if k != "debug"},
    )
    metrics = run_inference(config)
    print(format_table(metrics))
    print(
        f"\npredictions: {config.output_dir}/predictions.jsonl\nmetrics:     {config.output_dir}/metrics.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
