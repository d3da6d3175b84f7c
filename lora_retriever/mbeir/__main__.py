"""M-BEIR-format data: ``python -m lora_retriever.mbeir validate|build|train|embed|index|retrieve|report``.

    python -m lora_retriever.mbeir validate DATA_ROOT                 # UniIR's layout (query/, cand_pool/, ...)
    python -m lora_retriever.mbeir validate --queries Q.jsonl --pools POOL.jsonl \\
        [--instructions I.tsv] [--data_root DIR]                      # single files
    python -m lora_retriever.mbeir build --out_dir data/mini_mbeir [--seed 0] [--overwrite]

``validate`` prints every problem, one per line (``file:line: error: kind: message``), then a summary; it
exits 1 when there is an error (warnings alone exit 0), 2 on a usage error (e.g. a file that does not exist).
``build`` writes the offline mini M-BEIR (see ``lora_retriever.mbeir.build``), validates it and prints the
counts per task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lora_retriever.cli.args import add_config_arguments, config_from_args
from lora_retriever.cli.errors import add_common_flags, run_cli
from lora_retriever.mbeir.build import MiniMBeirConfig, build_mini_mbeir
from lora_retriever.mbeir.commands import COMMANDS, add_commands
from lora_retriever.mbeir.tasks import SPLITS
from lora_retriever.mbeir.validate import validate_dataset, validate_files

EXIT_INVALID = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_retriever.mbeir",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="report every problem of M-BEIR files, with line numbers")
    check.add_argument(
        "root", nargs="?", default=None, help="an M-BEIR data root (query/, cand_pool/, instructions/)"
    )
    check.add_argument(
        "--queries", nargs="+", default=[], metavar="JSONL", help="query files (instead of a root)"
    )
    check.add_argument("--pools", nargs="+", default=[], metavar="JSONL", help="candidate pool files")
    check.add_argument("--instructions", nargs="+", default=[], metavar="TSV", help="instruction files")
    check.add_argument(
        "--data_root", default=None, help="folder image paths are relative to (with single files)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of lines")
    add_common_flags(check)

    build = commands.add_parser("build", help="write an offline mini M-BEIR from the project's task suites")
    add_config_arguments(build, MiniMBeirConfig)
    add_common_flags(build)
    add_commands(commands)  # train, embed, index, retrieve, report (lora_retriever.mbeir.commands)
    return parser


def _validate(args: argparse.Namespace) -> int:
    files = args.queries or args.pools or args.instructions
    if args.root and (files or args.data_root):
        raise ValueError("pass either a data root or --queries/--pools/--instructions/--data_root, not both")
    if not args.root and not files:
        raise ValueError("nothing to validate; pass a data root or --queries/--pools/--instructions")
    if args.root:
        report = validate_dataset(args.root)
    else:
        report = validate_files(args.queries, args.pools, args.instructions, args.data_root)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            print(problem)
        print(("invalid: " if report.errors else "valid: ") + report.summary())
    return EXIT_INVALID if report.errors else 0


def _build(args: argparse.Namespace) -> int:
    config = config_from_args(MiniMBeirConfig, args, progress=not args.quiet)
    manifest = build_mini_mbeir(config)
    print(f"{'task':<16} {'modalities':<20} " + " ".join(f"{s:>6}" for s in SPLITS) + f" {'test pool':>10}")
    for name, entry in manifest["tasks"].items():
        pair = f"{entry['query_modality']} -> {entry['cand_modality']}"
        counts = " ".join(f"{entry['splits'][s]['n_queries']:>6}" for s in SPLITS)
        print(f"{name:<16} {pair:<20} {counts} {entry['splits']['test']['n_candidates']:>10}")
    pools = ", ".join(f"{s} {e['n_candidates']}" for s, e in manifest["global_pools"].items())
    print(f"global pools: {pools}; images: {manifest['images']['n_images']}; wrote {config.out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    run = {"validate": _validate, "build": _build} | {name: run for name, (_, run) in COMMANDS.items()}
    return run_cli(build_parser(), lambda args: run[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
