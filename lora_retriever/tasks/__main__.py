"""Write the offline task suite: ``python -m lora_retriever.tasks --out_dir DIR [--tasks ...] [--seed 0]``.

Per task: train.jsonl, keys.jsonl, test.jsonl, test_alt.jsonl; plus test_mixed.jsonl,
test_mixed_alt.jsonl and manifest.json (see ``lora_retriever.tasks.suite``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lora_retriever.tasks.registry import TASK_NAMES
from lora_retriever.tasks.splits import DEFAULT_N_KEYS, DEFAULT_N_TEST, DEFAULT_N_TRAIN, SPLIT_NAMES
from lora_retriever.tasks.suite import write_task_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_retriever.tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out_dir", required=True, help="output folder (created)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES,
        default=list(TASK_NAMES),
        help="tasks to write (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--n_train",
        type=int,
        default=None,
        help=f"training items per task (default: {DEFAULT_N_TRAIN}, or all a smaller task has left)",
    )
    parser.add_argument("--n_keys", type=int, default=DEFAULT_N_KEYS, help="key samples per task")
    parser.add_argument("--n_test", type=int, default=DEFAULT_N_TEST, help="test subjects per task")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    logging.getLogger("lora_retriever").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        manifest = write_task_suite(
            args.out_dir,
            args.tasks,
            seed=args.seed,
            n_train=args.n_train,
            n_keys=args.n_keys,
            n_test=args.n_test,
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"{'task':<12} " + " ".join(f"{s:>8}" for s in SPLIT_NAMES))
    for name, entry in manifest["tasks"].items():
        print(f"{name:<12} " + " ".join(f"{entry['counts'][s]:>8}" for s in SPLIT_NAMES))
    print(f"wrote {args.out_dir} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
