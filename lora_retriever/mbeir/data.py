"""One split of an M-BEIR folder, loaded for training, embedding and scoring: its tasks (query file + local
pool), its global pool, its instructions and its images; validated before anything is embedded.

UniIR's layout (:mod:`.build` writes it; a UniIR download has it too)::

    query/<split>/<stem>_<split>.jsonl                                   a task's queries
    cand_pool/local/<split>/<stem>_<split>_cand_pool.jsonl               its local pool
    cand_pool/global/mbeir_union_<split>_cand_pool.jsonl                 the split's global pool
    instructions/*.tsv                                                   the prompts

A task's name is the builder's (``manifest.json``) when there is one, else the query file's stem.

Instructions (UniIR, §3.2): a query's text is prefixed with its task's prompt, looked up by the query's
dataset and its (query modality, candidate modality); an image-only query gets the prompt as its text. Training
draws one of the prompts at random; evaluation uses the first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from lora_retriever.mbeir.formats import (
    MBeirCandidate,
    MBeirInstruction,
    MBeirQuery,
    read_candidates,
    read_instructions,
    read_queries,
)
from lora_retriever.mbeir.problems import MBeirFormatError
from lora_retriever.mbeir.validate import MANIFEST_NAME, validate_files

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["MBeirSplit", "TaskData", "global_pool_file", "load_split"]


def global_pool_file(root: Path, split: str) -> Path:
    return root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"


@dataclass
class TaskData:
    """One task of a split: its queries, its local pool and the candidate modality it retrieves."""

    name: str
    queries_file: Path
    pool_file: Path
    queries: list[MBeirQuery]
    pool: list[MBeirCandidate]

    @cached_property
    def cand_modality(self) -> str:
        """The modality of the task's positives (one per task in M-BEIR)."""
        by_did = {c.did: c.modality for c in self.pool}
        kinds = {by_did[d] for q in self.queries for d in q.pos_cand_list if d in by_did}
        if len(kinds) != 1:
            raise ValueError(
                f"task {self.name}: positives of several modalities {sorted(kinds)}; expected one"
            )
        return kinds.pop()


@dataclass
class MBeirSplit:
    """One split of an M-BEIR folder (see the module docstring)."""

    root: Path
    split: str
    tasks: dict[str, TaskData]
    global_pool_file: Path
    global_pool: list[MBeirCandidate]
    instructions: dict[tuple[int, str, str], MBeirInstruction]

    def image(self, rel_path: str) -> Image:
        """The image at ``rel_path`` (relative to the data root), as RGB."""
        from PIL import Image as PILImage

        with PILImage.open(self.root / rel_path) as image:
            return image.convert("RGB")

    def prompt(self, query: MBeirQuery, cand_modality: str, rng: random.Random | None = None) -> str:
        """The query's instruction: a random prompt with ``rng``, else the first.

        Raises:
            ValueError: no instruction row for the query's dataset and modalities.
        """
        key = (query.dataset_id, query.query_modality, cand_modality)
        if key not in self.instructions:
            raise ValueError(
                f"query {query.qid}: no instruction row for dataset {key[0]}, {key[1]} -> {key[2]}; add one to "
                f"{self.root / 'instructions'} or run without instructions (--no_instruct)"
            )
        prompts = self.instructions[key].prompts
        return rng.choice(prompts) if rng is not None else prompts[0]

    def query_text(
        self, query: MBeirQuery, cand_modality: str, instruct: bool, rng: random.Random | None = None
    ) -> str | None:
        """The text the encoder reads for ``query``: ``"<prompt> <query text>"`` with ``instruct``."""
        if not instruct:
            return query.query_txt or None
        prompt = self.prompt(query, cand_modality, rng)
        return f"{prompt} {query.query_txt}" if query.query_txt else prompt


def _task_files(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        entries = json.loads(manifest.read_text(encoding="utf-8"))["tasks"]
        return [
            (name, root / e["splits"][split]["queries"], root / e["splits"][split]["local_pool"])
            for name, e in entries.items()
            if split in e["splits"]
        ]
    found = []
    for queries in sorted((root / "query" / split).glob(f"*_{split}.jsonl")):
        stem = queries.name[: -len(".jsonl")]
        found.append((stem, queries, root / "cand_pool" / "local" / split / f"{stem}_cand_pool.jsonl"))
    return found


def load_split(root: str | Path, split: str = "test", tasks: list[str] | None = None) -> MBeirSplit:
    """Load and validate one split of an M-BEIR folder.

    Args:
        root: the data root.
        split: ``train``, ``val`` or ``test`` (a UniIR download has ``test`` and ``train``).
        tasks: task names to keep (default: all).

    Raises:
        FileNotFoundError: no such folder, no query file for ``split``, or a missing pool.
        MBeirFormatError: the files have errors (every problem listed, with its file and line).
        ValueError: an unknown task name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"M-BEIR data root {str(root)!r} is not a folder; build one with 'build --out_dir'"
        )
    files = _task_files(root, split)
    if not files:
        raise FileNotFoundError(f"no query files for split {split!r} under {root / 'query' / split}")
    names = [name for name, _, _ in files]
    unknown = sorted(set(tasks or []) - set(names))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in {root} ({split}); known: {', '.join(names)}")
    files = [f for f in files if tasks is None or f[0] in tasks]
    global_file = global_pool_file(root, split)
    pools = [pool for _, _, pool in files] + [global_file]
    for pool in pools:
        if not pool.is_file():
            raise FileNotFoundError(
                f"candidate pool {str(pool)!r} is missing; the folder is not UniIR's layout"
            )
    instruction_files = sorted((root / "instructions").glob("*.tsv"))
    report = validate_files(
        [q for _, q, _ in files],
        pools,
        instruction_files,
        root,
        pools_of={q: [p, global_file] for _, q, p in files},
    )
    if not report.ok:
        raise MBeirFormatError(report.problems, f"M-BEIR split {split!r} of {root}")
    instructions = {i.key: i for path in instruction_files for i in read_instructions(path)}
    return MBeirSplit(
        root=root,
        split=split,
        tasks={name: TaskData(name, q, p, read_queries(q), read_candidates(p)) for name, q, p in files},
        global_pool_file=global_file,
        global_pool=read_candidates(global_file),
        instructions=instructions,
    )
