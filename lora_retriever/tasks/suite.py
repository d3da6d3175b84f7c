"""Write the task suite to disk: per-task JSONL splits, mixed test sets and a manifest.

Layout of ``out_dir``::

    <task>/train.jsonl      {"id", "task", "subject", "input", "output"}   training data
    <task>/keys.jsonl       same form                                      key samples for retrieval
    <task>/test.jsonl       {"id", "task", "subject", "query", "response"} test, training wordings
    <task>/test_alt.jsonl   same form                                      same subjects, other wordings
    test_mixed.jsonl        every task's test records, shuffled (seeded)
    test_mixed_alt.jsonl    the same shuffle applied to the test_alt records (row i <-> row i)
    manifest.json           seed, counts, clusters, templates, data-source package versions

The output holds no dates or absolute paths, so the same seed and package versions give identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_retriever.tasks.registry import TASK_NAMES, get_task
from lora_retriever.tasks.splits import (
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    SPLIT_NAMES,
    TaskRecord,
    TaskSplits,
    build_splits,
    task_rng,
)
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["MANIFEST_NAME", "write_task_suite"]

MANIFEST_NAME = "manifest.json"
MIXED_FILES = {"test": "test_mixed.jsonl", "test_alt": "test_mixed_alt.jsonl"}
_TEST_SPLITS = frozenset({"test", "test_alt"})


def write_task_suite(
    out_dir: str | Path,
    tasks: Sequence[str] = TASK_NAMES,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_keys: int = DEFAULT_N_KEYS,
    n_test: int = DEFAULT_N_TEST,
) -> dict[str, Any]:
    """Build every task's splits and write them (see the module docstring for the layout).

    Args:
        out_dir: output folder (created; existing suite files in it are overwritten).
        tasks: task names, written in this order (the mixed files follow it before shuffling).
        seed, n_train, n_keys, n_test: as in :func:`~lora_retriever.tasks.splits.build_splits`.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: no tasks, a task named twice or unknown, or counts a task cannot supply (nothing is
            written in that case: all splits are built before the first file is).
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty; pick some of: {', '.join(TASK_NAMES)}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"tasks lists {', '.join(duplicates)} more than once")
    all_splits = [build_splits(name, seed, n_train=n_train, n_keys=n_keys, n_test=n_test) for name in tasks]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_entries = {}
    for splits in all_splits:
        task = get_task(splits.task)
        files = {}
        for split in SPLIT_NAMES:
            rel = f"{splits.task}/{split}.jsonl"
            _write_jsonl(out_dir / rel, splits.split(split), test_form=split in _TEST_SPLITS)
            files[split] = rel
        task_entries[splits.task] = {
            "description": task.description,
            "cluster": task.cluster,
            "counts": splits.counts(),
            "files": files,
            "train_templates": list(task.train_templates),
            "alt_templates": list(task.alt_templates),
            "data_sources": _versions(task.data_sources),
        }
        logger.info("task %s: %s", splits.task, splits.counts())

    mixed_counts = _write_mixed(out_dir, all_splits, seed)
    manifest = {
        "seed": seed,
        "requested": {"n_train": n_train, "n_keys": n_keys, "n_test": n_test},
        "tasks": task_entries,
        "clusters": {
            cluster: [t for t in tasks if get_task(t).cluster == cluster]
            for cluster in dict.fromkeys(get_task(t).cluster for t in tasks)
        },
        "mixed": mixed_counts,
        "data_sources": _versions(sorted({s for t in tasks for s in get_task(t).data_sources})),
        "formats": {
            "train": ["id", "task", "subject", "input", "output"],
            "test": ["id", "task", "subject", "query", "response"],
        },
    }
    (out_dir / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n"
    )
    logger.info("wrote the task suite (%d tasks, seed %d) to %s", len(tasks), seed, out_dir)
    return manifest


def _write_mixed(out_dir: Path, all_splits: list[TaskSplits], seed: int) -> dict[str, int]:
    """All tasks' test and test_alt records under one seeded permutation, so the two files stay aligned."""
    test = [r for s in all_splits for r in s.test]
    test_alt = [r for s in all_splits for r in s.test_alt]
    order = list(range(len(test)))
    task_rng("mixed", seed, "order").shuffle(order)
    counts = {}
    for split, records in (("test", test), ("test_alt", test_alt)):
        _write_jsonl(out_dir / MIXED_FILES[split], [records[i] for i in order], test_form=True)
        counts[MIXED_FILES[split]] = len(records)
    return counts


def _write_jsonl(path: Path, records: Iterable[TaskRecord], *, test_form: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(r.to_test_record() if test_form else r.to_dict(), ensure_ascii=False) + "\n"
        for r in records
    ]
    path.write_text("".join(lines), encoding="utf-8", newline="\n")


def _versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of the data-source packages (``None`` for one that is missing)."""
    versions: dict[str, str | None] = {}
    for dist in distributions:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
