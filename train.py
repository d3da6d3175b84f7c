#!/usr/bin/env python
"""Train a LoRA (or QLoRA) adapter on a JSON / JSONL dataset and optionally add it to an adapter pool.

Example (the packaged SmolLM2-135M-Instruct as the base model):

    python train.py --dataset_path data/addition.jsonl --output_dir adapters/addition \\
        --max_steps 80 --register_pool config/pool.json --task addition

Writes the PEFT adapter (adapter_config.json + adapter_model.safetensors), training_args.json,
metrics.json (train loss first/last, eval loss and perplexity before/after, ...), train.log and
checkpoint-<step>/ folders to --output_dir. Dataset records: {"input", "output"} (a JSON list,
{"data": [...]} or JSONL), or chat {"messages": [...], "images": [...]}.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data and output")
    data.add_argument(
        "--dataset_path", required=True, help="training data: JSON list, {'data': [...]} or JSONL"
    )
    data.add_argument(
        "--output_dir",
        default=None,
        help="where the adapter, metrics and checkpoints go (default: outputs/adapters/<adapter_name>)",
    )
    data.add_argument(
        "--adapter_name",
        default=None,
        help="the adapter's name / pool lora_name (default: the dataset's stem)",
    )
    data.add_argument(
        "--eval_split", type=float, default=0.1, help="fraction held out for eval (default 0.1)"
    )
    data.add_argument("--max_length", type=int, default=512, help="max tokens per example (default 512)")
    data.add_argument("--system", default=None, help="system prompt for records without their own")

    model = p.add_argument_group("model and LoRA")
    model.add_argument(
        "--model_type",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default, packaged), llama, qwen2, causal-lm, qwen2-vl, qwen2.5-vl, "
        "internvl, llava, or auto",
    )
    model.add_argument(
        "--model_path", default=None, help="local model directory (not needed for the default)"
    )
    model.add_argument("--lora_r", type=int, default=8, help="LoRA rank (default 8)")
    model.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    model.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    model.add_argument(
        "--target_modules",
        nargs="+",
        default=["all-linear"],
        help="module names to adapt (e.g. q_proj v_proj) or all-linear (default)",
    )
    model.add_argument(
        "--quantization",
        default="none",
        choices=["none", "nf4", "int8"],
        help="base model weights: fp32 (none), 4-bit NF4 (QLoRA) or int8, via bitsandbytes",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    model.add_argument("--device", default="cpu")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=3, help="passes over the training split (default 3)")
    optim.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs if > 0")
    optim.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW peak lr (default 2e-3)")
    optim.add_argument("--warmup_ratio", type=float, default=0.1, help="fraction of steps warming up (0.1)")
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    optim.add_argument("--batch_size", type=int, default=8, help="examples per forward pass (default 8)")
    optim.add_argument("--grad_accum", type=int, default=1, help="forward passes per optimizer step")
    optim.add_argument("--seed", type=int, default=42)

    run = p.add_argument_group("checkpoints and logging")
    run.add_argument("--save_steps", type=int, default=50, help="checkpoint every N steps (0 = never)")
    run.add_argument("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    run.add_argument(
        "--resume_from", default=None, help="a checkpoint-<step> folder, or auto (the newest in --output_dir)"
    )
    run.add_argument(
        "--overwrite_output_dir", action="store_true", help="delete old checkpoints in --output_dir first"
    )
    run.add_argument("--logging_steps", type=int, default=10, help="log the loss every N steps")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--quiet", action="store_true", help="warnings only on the console, no progress bars")
    run.add_argument("--debug", action="store_true", help="debug logging")

    pool = p.add_argument_group("adapter pool")
    pool.add_argument(
        "--register_pool", default=None, metavar="CONFIG", help="add the adapter to this pool config"
    )
    pool.add_argument("--num_key_samples", type=int, default=20, help="training samples in the key (20)")
    pool.add_argument("--description", default=None, help="pool entry description")
    pool.add_argument("--task", default=None, help="pool entry task")
    pool.add_argument("--category", default=None, help="pool entry category")
    pool.add_argument(
        "--copy_samples",
        action="store_true",
        help="copy the dataset to <pool folder>/samples/ instead of pointing samples_path at it",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    from swift.utils import get_logger

    for name in ("lora_retriever", "swift"):
        package_logger = get_logger(name, logging.DEBUG if args.debug else logging.INFO)
        for handler in package_logger.handlers:
            # The console gets warnings only with --quiet; train.log still gets everything.
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING if args.quiet else logging.NOTSET)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    from lora_retriever.training import TrainConfig, train

    options = dict(vars(args))
    for name in ("threads", "quiet", "debug"):
        options.pop(name)
    if options["output_dir"] is None:
        from pathlib import Path

        name = options["adapter_name"] or Path(options["dataset_path"]).stem
        options["output_dir"] = str(Path("outputs") / "adapters" / name)
    try:
        config = TrainConfig(**options, progress=not args.quiet)
    except ValueError as err:
        parser.error(str(err))
    metrics = train(config)
    print(_summary(config.output_dir, metrics))
    return 0


def _summary(output_dir: str, metrics: dict) -> str:
    def show(value) -> str:
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
