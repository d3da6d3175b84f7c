"""Write an offline task suite: ``python -m lora_retriever.tasks --out_dir DIR [--suite text|multimodal]
[--tasks ...] [--seed 0]``.

Per task: train.jsonl, keys.jsonl, test.jsonl, test_alt.jsonl; plus test_mixed.jsonl,
test_mixed_alt.jsonl and manifest.json (see ``lora_retriever.tasks.suite``). The multimodal suite also
writes the PNG images and per-category training data (see ``lora_retriever.tasks.multimodal.suite``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lora_retriever.tasks import multimodal
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
        "--suite", choices=("text", "multimodal"), default="text", help="which suite (default: text)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_NAMES + multimodal.MULTIMODAL_TASK_NAMES,
        default=None,
        metavar="TASK",
        help="tasks to write, all of the same suite (default: all of the suite). "
        f"text: {', '.join(TASK_NAMES)}; "
        f"multimodal: {', '.join(multimodal.MULTIMODAL_TASK_NAMES)}",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--n_train",
        type=int,
        default=None,
        help=f"training items per task (default: text {DEFAULT_N_TRAIN}, or all a smaller task has left; "
        f"multimodal {multimodal.DEFAULT_N_TRAIN})",
    )
    parser.add_argument("--n_keys", type=int, default=DEFAULT_N_KEYS, help="key samples per task")
    parser.add_argument(
        "--n_test",
        type=int,
        default=None,
        help=f"test subjects per task (default: text {DEFAULT_N_TEST}, "
        f"multimodal {multimodal.DEFAULT_N_TEST})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="multimodal: replace a non-empty --out_dir (else an error)"
    )
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    logging.getLogger("lora_retriever").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if args.suite == "multimodal":
            manifest = multimodal.write_multimodal_suite(
                args.out_dir,
                args.tasks or multimodal.MULTIMODAL_TASK_NAMES,
                seed=args.seed,
                n_train=multimodal.DEFAULT_N_TRAIN if args.n_train is None else args.n_train,
                n_keys=args.n_keys,
                n_test=multimodal.DEFAULT_N_TEST if args.n_test is None else args.n_test,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )
        else:
            manifest = write_task_suite(
                args.out_dir,
                args.tasks or TASK_NAMES,
                seed=args.seed,
                n_train=args.n_train,
                n_keys=args.n_keys,
                n_test=DEFAULT_N_TEST if args.n_test is None else args.n_test,
            )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f"{'task':<20} {'cluster':<14} " + " ".join(f"{s:>8}" for s in SPLIT_NAMES))
    for name, entry in manifest["tasks"].items():
        cluster = entry.get("cluster", entry.get("category", ""))  # multimodal tasks have categories
        print(f"{name:<20} {cluster:<14} " + " ".join(f"{entry['counts'][s]:>8}" for s in SPLIT_NAMES))
    print(f"wrote {args.out_dir} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
