"""``python -m spectral_edit {edit,eval}``: thin argparse front ends of ``spectral_edit.pipeline``.

edit: decompose each LoRA update ``B·A`` by SVD, measure ``∂L/∂σ`` on calibration data, amplify / suppress
singular directions (``--mode``), write a normal PEFT adapter plus ``spectral_edit_meta.json``::

    python -m spectral_edit edit --base_model smollm2-135m-instruct --lora_path ADAPTER \\
        --calib_data calib.jsonl --out_dir EDITED --mode abs_select

eval: greedy generation and exact-match accuracy on a test file, written as JSON::

    python -m spectral_edit eval --base_model smollm2-135m-instruct --lora_dir EDITED --test_data test.jsonl

``--base_model`` is a local model directory (``--model_type auto|llama|qwen2|...``) or a ``swift.llm`` model
type (``smollm2-135m-instruct``, the packaged default). Data files: JSON list or JSONL of
``{"input"|"query": ..., "output"|"response": ...}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lora_retriever.cli.errors import add_common_flags, run_cli
from spectral_edit.edit import EDIT_MODES, GD_UPDATES, GRAD_NORMS, EditConfig
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES

__all__ = ["build_parser", "main"]

EVAL_OUTPUT_NAME = "eval_{stem}.json"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base_model",
        default=DEFAULT_MODEL_TYPE,
        help=f"local model directory or a swift.llm model type (default: {DEFAULT_MODEL_TYPE}, packaged).",
    )
    parser.add_argument(
        "--model_type",
        default="auto",
        choices=MODEL_TYPE_CHOICES,
        help="swift.llm model type of a --base_model directory (default: auto).",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu).")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars.")
    # --verbose / --quiet / --debug, and --threads (1 here: stable on shared CPUs; 0 keeps torch's default).
    add_common_flags(parser, threads=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spectral_edit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="edit a LoRA adapter's singular values from calibration gradients.")
    _add_model_args(edit)
    edit.add_argument(
        "--lora_path", required=True, help="PEFT / ms-swift adapter directory (or weights file)."
    )
    edit.add_argument("--out_dir", required=True, help="where to write the edited adapter (must be empty).")
    edit.add_argument(
        "--calib_data", default=None, help="calibration JSON/JSONL (required except for --mode random_index)."
    )
    edit.add_argument(
        "--mode", choices=EDIT_MODES, default="abs_select", help="edit mode (default: abs_select)."
    )
    edit.add_argument(
        "--num_calib", type=_positive_int, default=32, help="first N calibration records (default: 32)."
    )
    edit.add_argument(
        "--max_length", type=_positive_int, default=256, help="token limit per example (default: 256)."
    )
    edit.add_argument(
        "--batch_size", type=_positive_int, default=4, help="calibration batch size (default: 4)."
    )
    defaults = EditConfig()
    edit.add_argument(
        "--amp_frac", type=float, default=defaults.amp_frac, help="fraction of directions amplified."
    )
    edit.add_argument(
        "--sup_frac", type=float, default=defaults.sup_frac, help="fraction of directions suppressed."
    )
    edit.add_argument(
        "--amp_factor", type=float, default=defaults.amp_factor, help="multiplier of amplified sigma."
    )
    edit.add_argument(
        "--sup_factor", type=float, default=defaults.sup_factor, help="multiplier of suppressed sigma."
    )
    edit.add_argument(
        "--mid_factor", type=float, default=defaults.mid_factor, help="multiplier of the others."
    )
    edit.add_argument(
        "--preserve_l1", action="store_true", help="rescale edited sigma to the original L1 norm."
    )
    edit.add_argument("--eta", type=float, default=defaults.eta, help="gd step size (default: %(default)s).")
    edit.add_argument("--gd_update", choices=GD_UPDATES, default=defaults.gd_update, help="gd update rule.")
    edit.add_argument(
        "--grad_norm", choices=GRAD_NORMS, default=defaults.grad_norm, help="per-module g scaling."
    )
    edit.add_argument("--seed", type=int, default=defaults.seed, help="random_index seed (default: 0).")
    edit.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        help="edit only these modules (names or suffixes, e.g. v_proj).",
    )
    edit.add_argument(
        "--adapter_name", default=None, help="adapter to take from a multi-adapter weights file."
    )
    edit.add_argument("--overwrite", action="store_true", help="allow a non-empty --out_dir.")

    ev = sub.add_parser("eval", help="exact-match accuracy of a base model (+ adapter) on a test file.")
    _add_model_args(ev)
    ev.add_argument(
        "--lora_dir", default=None, help="PEFT adapter directory; omit to evaluate the base model."
    )
    ev.add_argument("--test_data", required=True, help="test JSON/JSONL of {input|query, output|response}.")
    ev.add_argument(
        "--num_test", type=_positive_int, default=None, help="first N test records (default: all)."
    )
    ev.add_argument(
        "--max_new_tokens", type=_positive_int, default=32, help="generation limit (default: 32)."
    )
    ev.add_argument("--batch_size", type=_positive_int, default=8, help="generation batch size (default: 8).")
    ev.add_argument(
        "--match",
        choices=("exact", "normalized"),
        default="exact",
        help="exact (stripped text) or normalized (the project's exact-match rule, lora_retriever.metrics.normalize_answer) (default: exact).",
    )
    ev.add_argument(
        "--output",
        default=None,
        help="result JSON (default: <lora_dir>/eval_<test file stem>.json; required without --lora_dir).",
    )
    return parser


def _edit(args: argparse.Namespace) -> int:
    from spectral_edit.pipeline import EditJob, run_edit

    config = EditConfig(
        mode=args.mode,
        amp_frac=args.amp_frac,
        sup_frac=args.sup_frac,
        amp_factor=args.amp_factor,
        sup_factor=args.sup_factor,
        mid_factor=args.mid_factor,
        preserve_l1=args.preserve_l1,
        eta=args.eta,
        gd_update=args.gd_update,
        grad_norm=args.grad_norm,
        seed=args.seed,
    )
    job = EditJob(
        base_model=args.base_model,
        lora_path=args.lora_path,
        out_dir=args.out_dir,
        config=config,
        calib_data=args.calib_data,
        model_type=args.model_type,
        num_calib=args.num_calib,
        max_length=args.max_length,
        batch_size=args.batch_size,
        target_modules=args.target_modules,
        adapter_name=args.adapter_name,
        device=args.device,
        overwrite=args.overwrite,
        progress=not (args.no_progress or args.quiet),
    )
    meta = run_edit(job)
    changed = sum(m["sigma_before"] != m["sigma_after"] for m in meta["modules"].values())
    print(
        f"edited {len(meta['modules'])} modules ({changed} changed), mode={config.mode}, "
        f"calibration examples={meta['calibration']['num_examples']} -> {args.out_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from spectral_edit.pipeline import EvalJob, evaluate

    output = args.output
    if output is None:
        if args.lora_dir is None:
            raise ValueError(
                "--output is required when --lora_dir is omitted (there is no adapter dir to write to)."
            )
        output = str(Path(args.lora_dir) / EVAL_OUTPUT_NAME.format(stem=Path(args.test_data).stem))
    job = EvalJob(
        base_model=args.base_model,
        test_data=args.test_data,
        output=output,
        lora_dir=args.lora_dir,
        model_type=args.model_type,
        num_test=args.num_test,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        match=args.match,
        device=args.device,
        progress=not (args.no_progress or args.quiet),
    )
    result = evaluate(job)
    summary = {k: result[k] for k in ("accuracy", "correct", "count")}
    print(json.dumps({**summary, "output": output}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; user errors print one ``error:`` line and return 2
    (``lora_retriever.cli.errors.run_cli``, like every entry point of the project)."""
    return run_cli(build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    return _edit(args) if args.command == "edit" else _eval(args)
