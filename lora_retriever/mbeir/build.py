"""Build an offline mini M-BEIR from the project's text and image task suites.

    from lora_retriever.mbeir import MiniMBeirConfig, build_mini_mbeir

    manifest = build_mini_mbeir(MiniMBeirConfig(out_dir="data/mini_mbeir", seed=0))
    # CLI: python -m lora_retriever.mbeir build --out_dir data/mini_mbeir [--seed 0] [--overwrite]

Layout of ``out_dir`` (UniIR's M-BEIR layout; ``<dataset>`` and ``task<k>`` as in :mod:`.tasks`)::

    query/<split>/mbeir_<dataset>_task<k>_<split>.jsonl                  queries (split: train, val, test)
    cand_pool/local/<split>/mbeir_<dataset>_task<k>_<split>_cand_pool.jsonl   each task's own pool
    cand_pool/global/mbeir_union_<split>_cand_pool.jsonl                  the union of a split's local pools
    instructions/query_instructions.tsv                                   prompts per dataset and modalities
    mbeir_images/<domain>_images/<hash>.png                               every image, once
    manifest.json                                                         seed, sizes, files, counts

Every positive of a query is in its local pool and in its split's global pool; ids are ``<dataset_id>:<n>``
and unique across splits (a text candidate shared by two splits, e.g. a currency code, keeps one ``did``).
The folder is written beside ``out_dir``, validated with :func:`~lora_retriever.mbeir.validate.validate_dataset`
and renamed into place only when valid. No dates or absolute paths are written: the same seed and package
versions give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_retriever.mbeir.formats import (
    MBeirCandidate,
    MBeirInstruction,
    MBeirQuery,
    modality_of,
    write_candidates,
    write_instructions,
    write_queries,
)
from lora_retriever.mbeir.problems import MBeirFormatError
from lora_retriever.mbeir.tasks import (
    MBEIR_TASK_NAMES,
    MBEIR_TASKS,
    SPLIT_PARTITIONS,
    SPLITS,
    Content,
    QueryDraft,
    SplitDraft,
    SplitRequest,
    TaskSpec,
)
from lora_retriever.mbeir.validate import MANIFEST_NAME, validate_dataset
from lora_retriever.tasks.multimodal import IMAGE_SIZE, ImageItem, get_domain
from lora_retriever.tasks.suite import _versions
from swift.utils import get_logger
from swift.utils.files import replace_dir, temp_name

logger = get_logger(__name__)

__all__ = ["INSTRUCTIONS_FILE", "MiniMBeirConfig", "build_mini_mbeir"]

INSTRUCTIONS_FILE = "instructions/query_instructions.tsv"


@dataclass
class MiniMBeirConfig:
    """What :func:`build_mini_mbeir` builds (each field is a flag of ``python -m lora_retriever.mbeir build``)."""

    out_dir: str = field(
        metadata={"help": "output folder (refused when it is not empty, unless --overwrite)"}
    )
    tasks: list[str] = field(
        default_factory=lambda: list(MBEIR_TASK_NAMES),
        metadata={
            "help": f"task types to build: {', '.join(MBEIR_TASK_NAMES)}",
            "choices": MBEIR_TASK_NAMES,
            "metavar": "TASK",
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of every draw (same seed, same bytes)"})
    n_train: int = field(default=64, metadata={"help": "train queries per task"})
    n_val: int = field(default=16, metadata={"help": "val queries per task"})
    n_test: int = field(default=32, metadata={"help": "test queries per task"})
    n_distractors: int = field(
        default=32, metadata={"help": "candidates per task and split beyond those a query needs"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty out_dir"})
    progress: bool = field(default=True, metadata={"help": "progress bars", "cli": False})

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, (str, Path)) or not str(self.out_dir).strip():
            raise ValueError(f"out_dir must be a folder path, got {self.out_dir!r}")
        for name in ("n_train", "n_val", "n_test", "n_distractors", "seed"):
            value = getattr(self, name)
            low = 0 if name in ("n_distractors", "seed") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.tasks = list(self.tasks)
        if not self.tasks:
            raise ValueError(f"tasks is empty; pick some of: {', '.join(MBEIR_TASK_NAMES)}")
        unknown = [t for t in self.tasks if t not in MBEIR_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(MBEIR_TASK_NAMES)}")
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"tasks lists {', '.join(repeated)} more than once; list each once")

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


def build_mini_mbeir(config: MiniMBeirConfig) -> dict[str, Any]:
    """Build the mini M-BEIR (layout: the module docstring) and return its manifest.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, and ``config.overwrite`` is false.
        ValueError: sizes a source cannot supply (e.g. more text queries than the task has facts; nothing
            is written then).
        RuntimeError: the built folder failed validation (a bug; the folder is not published).
    """
    out_dir = Path(config.out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not config.overwrite:
        raise FileExistsError(
            f"out_dir {str(out_dir)!r} exists and is not empty; pass --overwrite to replace it"
        )
    drafts = _draft_all(config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(out_dir)
    staging.mkdir()
    try:
        manifest = _write_all(staging, config, drafts)
        report = validate_dataset(staging)
        if not report.ok:
            raise RuntimeError(
                f"the built mini M-BEIR is invalid (a bug): {MBeirFormatError(report.problems)}"
            )
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "wrote a mini M-BEIR (%d tasks, %d queries, %d images, seed %d) to %s",
        len(config.tasks),
        sum(s["n_queries"] for t in manifest["tasks"].values() for s in t["splits"].values()),
        manifest["images"]["n_images"],
        config.seed,
        out_dir,
    )
    return manifest


def _draft_all(config: MiniMBeirConfig) -> dict[tuple[str, str], SplitDraft]:
    from tqdm.auto import tqdm

    sizes = (config.n_train, config.n_val, config.n_test)
    jobs = [(task, split) for task in config.tasks for split in SPLITS]
    drafts = {}
    for task, split in tqdm(jobs, desc="draw queries", unit="split", disable=not config.progress):
        request = SplitRequest(task, split, config.sizes[split], config.n_distractors, config.seed, sizes)
        draft = MBEIR_TASKS[task].build(request)
        # A builder lists positives first; the files must not tell which candidates they are by position.
        order = request.rng("file order")
        queries, pool = list(draft.queries), list(draft.pool)
        order.shuffle(queries)
        order.shuffle(pool)
        drafts[task, split] = SplitDraft(queries, pool)
    return drafts


class _Ids:
    """``<dataset_id>:<n>`` ids: one counter per dataset for queries, one for candidates; a candidate content
    seen again (same text and image) keeps its did."""

    def __init__(self) -> None:
        self._next_q: dict[int, int] = defaultdict(int)
        self._next_d: dict[int, int] = defaultdict(int)
        self._dids: dict[tuple[int, tuple], str] = {}

    def qid(self, dataset_id: int) -> str:
        self._next_q[dataset_id] += 1
        return f"{dataset_id}:{self._next_q[dataset_id]}"

    def did(self, dataset_id: int, content: Content) -> str:
        key = (dataset_id, content.key)
        if key not in self._dids:
            self._next_d[dataset_id] += 1
            self._dids[key] = f"{dataset_id}:{self._next_d[dataset_id]}"
        return self._dids[key]


def _image_path(item: ImageItem) -> str:
    digest = hashlib.sha256(f"{item.domain}:{item.key}".encode()).hexdigest()[:16]
    return f"mbeir_images/{item.domain}_images/{digest}.png"


def _src(source: Any) -> str:
    return json.dumps(source, sort_keys=True, ensure_ascii=False)


def _write_all(
    root: Path, config: MiniMBeirConfig, drafts: dict[tuple[str, str], SplitDraft]
) -> dict[str, Any]:
    ids = _Ids()
    images: dict[str, ImageItem] = {}
    images_by_split: dict[str, set[str]] = defaultdict(set)
    global_pools: dict[str, dict[str, MBeirCandidate]] = {split: {} for split in SPLITS}
    task_entries: dict[str, Any] = {}

    def candidate(spec: TaskSpec, content: Content, split: str) -> MBeirCandidate:
        img_path = None if content.image is None else _image_path(content.image)
        if content.image is not None:
            images[img_path] = content.image
            images_by_split[split].add(img_path)
        modality = modality_of(content.txt, img_path)
        return MBeirCandidate(
            ids.did(spec.dataset_id, content), content.txt, img_path, modality, _src(content.src)
        )

    def query(spec: TaskSpec, draft: QueryDraft, split: str, did_of: dict[tuple, str]) -> MBeirQuery:
        img_path = None if draft.image is None else _image_path(draft.image)
        if draft.image is not None:
            images[img_path] = draft.image
            images_by_split[split].add(img_path)
        modality = modality_of(draft.txt, img_path)
        if modality != spec.query_modality:  # a task builder's bug, not a user error
            raise RuntimeError(f"task {spec.name}: a {modality} query, expected {spec.query_modality}")
        positives = tuple(did_of[c.key] for c in draft.positives)
        return MBeirQuery(
            ids.qid(spec.dataset_id),
            draft.txt,
            img_path,
            modality,
            _src(draft.src),
            positives,
            (),
            spec.task_id,
        )

    for task in config.tasks:
        spec = MBEIR_TASKS[task]
        stem = f"mbeir_{spec.dataset}_task{spec.task_id}"
        splits = {}
        for split in SPLITS:
            draft = drafts[task, split]
            pool = [candidate(spec, c, split) for c in draft.pool]
            did_of = {c.key: p.did for c, p in zip(draft.pool, pool)}
            queries = [query(spec, q, split, did_of) for q in draft.queries]
            files = {
                "queries": f"query/{split}/{stem}_{split}.jsonl",
                "local_pool": f"cand_pool/local/{split}/{stem}_{split}_cand_pool.jsonl",
            }
            for rel in files.values():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_queries(root / files["queries"], queries)
            write_candidates(root / files["local_pool"], pool)
            for c in pool:
                global_pools[split].setdefault(c.did, c)
            splits[split] = {
                **files,
                "n_queries": len(queries),
                "n_candidates": len(pool),
                "n_positives": sum(len(q.pos_cand_list) for q in queries),
            }
        task_entries[task] = {
            "dataset": spec.dataset,
            "dataset_id": spec.dataset_id,
            "task_id": spec.task_id,
            "query_modality": spec.query_modality,
            "cand_modality": spec.cand_modality,
            "description": spec.description,
            "splits": splits,
        }

    global_entries = {}
    for split, pool in global_pools.items():
        rel = f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_candidates(root / rel, pool.values())
        global_entries[split] = {"file": rel, "n_candidates": len(pool)}

    specs = [MBEIR_TASKS[t] for t in config.tasks]
    (root / INSTRUCTIONS_FILE).parent.mkdir(parents=True, exist_ok=True)
    write_instructions(
        root / INSTRUCTIONS_FILE,
        [
            MBeirInstruction(s.query_modality, s.cand_modality, s.dataset, s.dataset_id, s.prompts)
            for s in specs
        ],
    )
    _write_images(root, images, config.progress)

    manifest = {
        "format": "M-BEIR (UniIR): query/, cand_pool/local/, cand_pool/global/, instructions/, mbeir_images/",
        "seed": config.seed,
        "requested": {f"n_{split}": n for split, n in config.sizes.items()}
        | {"n_distractors": config.n_distractors},
        "split_partitions": dict(SPLIT_PARTITIONS),
        "datasets": {s.dataset: s.dataset_id for s in specs},
        "tasks": task_entries,
        "global_pools": global_entries,
        "instructions": INSTRUCTIONS_FILE,
        "images": {
            "n_images": len(images),
            "image_size": IMAGE_SIZE,
            "by_split": {split: len(images_by_split[split]) for split in SPLITS},
        },
        "data_sources": _versions(sorted({d for s in specs for d in s.data_sources})),
    }
    (root / MANIFEST_NAME).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n"
    )
    return manifest


def _write_images(root: Path, images: dict[str, ImageItem], progress: bool) -> None:
    from tqdm.auto import tqdm

    for rel in tqdm(sorted(images), desc="render images", unit="image", disable=not progress):
        item = images[rel]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        get_domain(item.domain).render(item).save(root / rel, format="PNG")
