"""Write the multimodal task suite to disk: PNG images, per-task and per-category JSONL, mixed test sets,
a manifest.

Layout of ``out_dir``::

    images/<task>/<split>-<i>.png   the images (test_alt records point at their test record's image)
    <task>/train.jsonl              chat form {"id", "task", "category", "messages": [user, assistant],
                                    "images": ["../images/..."]}: training data (lora_retriever.training)
    <task>/keys.jsonl               same form: key samples (embedded into the app adapter's key)
    <task>/test.jsonl               {"id", "task", "category", "domain", "query", "images", "response"}
    <task>/test_alt.jsonl           same images as test.jsonl, the task's alternative wordings
    categories/<category>/train.jsonl   the union of its tasks' training records, shuffled (seeded)
    categories/<category>/keys.jsonl    n_keys key samples dealt evenly from its tasks' keys
    test_mixed.jsonl                every task's test records, shuffled (seeded)
    test_mixed_alt.jsonl            the same shuffle applied to the test_alt records (row i <-> row i)
    manifest.json                   suite version, seed, counts, image size, tasks, categories, wordings,
                                    package versions

Image paths are relative to the JSONL file's folder (how the readers resolve them). The output holds no
dates or absolute paths: the same seed and package versions (scikit-learn, Pillow) give identical bytes.
Pool configs are not written here: they name trained adapters.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lora_retriever.tasks.multimodal.domains import IMAGE_SIZE, PARTITION_SHARES
from lora_retriever.tasks.multimodal.partition import rng_for
from lora_retriever.tasks.multimodal.registry import MULTIMODAL_TASK_NAMES, get_domain, get_multimodal_task
from lora_retriever.tasks.multimodal.splits import (
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    SPLIT_NAMES,
    ImageRecord,
    ImageTaskSplits,
    build_image_splits,
)
from lora_retriever.tasks.suite import _versions
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["MANIFEST_NAME", "MIXED_FILES", "SUITE_VERSION", "write_multimodal_suite"]

MANIFEST_NAME = "manifest.json"
#: Bump when the same seed and counts would write other images, questions or answers (a cached suite, and
#: what was trained on it, is stale then). 2: legible screens (one-digit counter, work-week calendar, wide
#: hour hand).
SUITE_VERSION = 2
MIXED_FILES = {"test": "test_mixed.jsonl", "test_alt": "test_mixed_alt.jsonl"}
DATA_SOURCES = ("scikit-learn", "pillow")  # the digits and photos, and the PNG encoder
_TEST_SPLITS = frozenset({"test", "test_alt"})


def write_multimodal_suite(
    out_dir: str | Path,
    tasks: Sequence[str] = MULTIMODAL_TASK_NAMES,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_keys: int = DEFAULT_N_KEYS,
    n_test: int = DEFAULT_N_TEST,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build every task's splits and write them (see the module docstring for the layout).

    Everything is written to a temporary folder beside ``out_dir`` and renamed into place when complete,
    so an interrupted run leaves no half-written suite.

    Args:
        out_dir: output folder.
        tasks: task names (``MULTIMODAL_TASK_NAMES``), written in this order; categories hold the listed
            tasks of each category.
        seed, n_train, n_keys, n_test: as in :func:`.splits.build_image_splits`.
        overwrite: replace an existing non-empty ``out_dir`` (otherwise that is an error).
        progress: show a progress bar while the images are written.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: no tasks, a task named twice or unknown, or counts a task cannot supply (nothing is
            written then: all splits are built before the first file is).
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is false.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks is empty; pick some of: {', '.join(MULTIMODAL_TASK_NAMES)}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"tasks lists {', '.join(duplicates)} more than once")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"out_dir {str(out_dir)!r} exists and is not empty; pass overwrite=True (--overwrite)"
        )
    all_splits = [build_image_splits(t, seed, n_train=n_train, n_keys=n_keys, n_test=n_test) for t in tasks]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_dir(out_dir, "partial")
    try:
        manifest = _write_all(
            staging, all_splits, seed, {"n_train": n_train, "n_keys": n_keys, "n_test": n_test}, progress
        )
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote the multimodal suite (%d tasks, seed %d) to %s", len(tasks), seed, out_dir)
    return manifest


def _write_all(
    root: Path, all_splits: list[ImageTaskSplits], seed: int, requested: dict[str, int], progress: bool
) -> dict[str, Any]:
    image_paths = _write_images(root, all_splits, progress)  # record id -> path relative to root
    task_entries: dict[str, Any] = {}
    for splits in all_splits:
        task = get_multimodal_task(splits.task)
        files = {}
        for split in SPLIT_NAMES:
            rel = f"{task.name}/{split}.jsonl"
            _write_jsonl(root, rel, splits.split(split), image_paths, test_form=split in _TEST_SPLITS)
            files[split] = rel
        task_entries[task.name] = {
            "description": task.description,
            "category": task.category,
            "domain": task.domain,
            "scoring": task.scoring,
            "counts": splits.counts(),
            "files": files,
            "train_templates": list(task.train_templates),
            "alt_templates": list(task.alt_templates),
        }
    categories = _write_categories(root, all_splits, image_paths, seed, requested["n_keys"])
    mixed = _write_mixed(root, all_splits, image_paths, seed)
    manifest = {
        "suite": "multimodal",
        "suite_version": SUITE_VERSION,
        "seed": seed,
        "requested": requested,
        "image_size": IMAGE_SIZE,
        "partition_shares": PARTITION_SHARES,
        "domains": {
            name: get_domain(name).description
            for name in dict.fromkeys(e["domain"] for e in task_entries.values())
        },
        "tasks": task_entries,
        "categories": categories,
        "mixed": mixed,
        "data_sources": _versions(DATA_SOURCES),
        "formats": {
            "train": ["id", "task", "category", "messages", "images"],
            "test": ["id", "task", "category", "domain", "query", "images", "response"],
        },
    }
    (root / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n"
    )
    return manifest


def _write_images(root: Path, all_splits: list[ImageTaskSplits], progress: bool) -> dict[str, str]:
    """Render and save each record's image once; ``test_alt`` records share their ``test`` twin's file."""
    from tqdm.auto import tqdm

    jobs = [(s.task, r) for s in all_splits for split in ("train", "keys", "test") for r in s.split(split)]
    paths: dict[str, str] = {}
    for task, record in tqdm(jobs, desc="render images", unit="image", disable=not progress):
        rel = f"images/{task}/{record.id.removeprefix(task + '-')}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        record.render().save(root / rel, format="PNG")
        paths[record.id] = rel
    for splits in all_splits:
        for test, alt in zip(splits.test, splits.test_alt):
            paths[alt.id] = paths[test.id]
    return paths


def _write_categories(
    root: Path, all_splits: list[ImageTaskSplits], image_paths: dict[str, str], seed: int, n_keys: int
) -> dict[str, Any]:
    """Per category: the union of its tasks' training records (shuffled) and ``n_keys`` key samples dealt
    round-robin from its tasks' keys (so each task is equally represented in the category's key)."""
    by_category: dict[str, list[ImageTaskSplits]] = {}
    for splits in all_splits:
        by_category.setdefault(get_multimodal_task(splits.task).category, []).append(splits)
    entries = {}
    for category, members in by_category.items():
        train = [r for s in members for r in s.train]
        rng_for("category", category, seed, "order").shuffle(train)
        dealt = [
            s.keys[i] for i in range(max(len(s.keys) for s in members)) for s in members if i < len(s.keys)
        ]
        keys = dealt[:n_keys]
        files = {"train": f"categories/{category}/train.jsonl", "keys": f"categories/{category}/keys.jsonl"}
        _write_jsonl(root, files["train"], train, image_paths, test_form=False)
        _write_jsonl(root, files["keys"], keys, image_paths, test_form=False)
        entries[category] = {
            "tasks": [s.task for s in members],
            "counts": {"train": len(train), "keys": len(keys)},
            "files": files,
        }
    return entries


def _write_mixed(
    root: Path, all_splits: list[ImageTaskSplits], image_paths: dict[str, str], seed: int
) -> dict[str, int]:
    """All tasks' test and test_alt records under one seeded permutation, so the two files stay aligned."""
    test = [r for s in all_splits for r in s.test]
    test_alt = [r for s in all_splits for r in s.test_alt]
    order = list(range(len(test)))
    rng_for("mixed", seed, "order").shuffle(order)
    counts = {}
    for split, records in (("test", test), ("test_alt", test_alt)):
        _write_jsonl(root, MIXED_FILES[split], [records[i] for i in order], image_paths, test_form=True)
        counts[MIXED_FILES[split]] = len(records)
    return counts


def _write_jsonl(
    root: Path, rel: str, records: Iterable[ImageRecord], image_paths: dict[str, str], *, test_form: bool
) -> None:
    """One JSON line per record at ``root/rel``; image paths are made relative to the file's folder."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    up = "../" * rel.count("/")
    lines = [
        json.dumps(
            record.to_test(up + image_paths[record.id])
            if test_form
            else record.to_chat(up + image_paths[record.id]),
            ensure_ascii=False,
        )
        + "\n"
        for record in records
    ]
    path.write_text("".join(lines), encoding="utf-8", newline="\n")


def _fresh_dir(out_dir: Path, purpose: str) -> Path:
    """A new empty folder beside ``out_dir`` (same file system: renames are atomic; default permissions)."""
    path = out_dir.with_name(f".{out_dir.name}.{purpose}-{uuid.uuid4().hex[:12]}")
    path.mkdir()
    return path


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``out_dir``; an existing ``out_dir`` is removed only after
    the new one is in place (the caller checked ``overwrite``)."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
    out_dir.rename(old)
    staging.rename(out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
