"""UniIR's third step: retrieve each task's queries from its local pool and from the global pool, and score.

    python -m lora_retriever.mbeir retrieve --data_root D --embeddings runs/sf/embeddings/test \\
        --kind flat --out runs/sf/test.json

Per task: Recall@1/5/10 in the local pool and in the global pool (:func:`~.score.recall_at_k`), and the global
pool's modality violation@10 (:func:`~.score.modality_violation`); their means over the tasks. The positives
and modalities come from the (validated) data; the vectors from ``embed``, the indexes from ``index``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_retriever.mbeir.data import load_split
from lora_retriever.mbeir.embed import RUN_NAME, load_embeddings
from lora_retriever.mbeir.index import KINDS, PoolIndex, index_folder
from lora_retriever.mbeir.score import modality_violation, recall_at_k
from swift.utils import get_logger
from swift.utils.files import atomic_write

logger = get_logger(__name__)

__all__ = ["RetrieveConfig", "retrieve_split"]


@dataclass
class RetrieveConfig:
    """What :func:`retrieve_split` scores (each field is a flag of ``python -m lora_retriever.mbeir retrieve``)."""

    data_root: str = field(metadata={"help": "M-BEIR folder the embeddings were made from"})
    embeddings: str = field(metadata={"help": "an 'embed' split folder (queries/, local/, global/)"})
    out: str = field(metadata={"help": "results JSON to write"})
    kind: str = field(
        default="flat", metadata={"help": "which built index to search", "choices": tuple(KINDS)}
    )
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Recall@k cut-offs"})
    violation_k: int = field(default=10, metadata={"help": "top-k of the modality-violation rate"})

    def __post_init__(self) -> None:
        self.ks = sorted(set(self.ks))
        if not self.ks or self.ks[0] < 1 or self.violation_k < 1:
            raise ValueError(f"ks and violation_k must be >= 1, got {self.ks} and {self.violation_k}")


def retrieve_split(config: RetrieveConfig) -> dict[str, Any]:
    """Retrieve and score every task of the embedded split; writes and returns the results.

    Returns:
        ``{"split", "encoder", "kind", "tasks": {task: {"local": {"recall@k": ...}, "global": {...,
        "modality_violation@k"}, "query_modality", "cand_modality", "n_queries"}}, "mean": {...}, "seconds"}``.

    Raises:
        FileNotFoundError: missing embeddings or indexes (run 'embed' and 'index').
        ValueError: queries and an index from different encoders (both named).
    """
    root = Path(config.embeddings).expanduser()
    split_name = root.name
    data = load_split(config.data_root, split_name)
    started = time.perf_counter()
    k = max(*config.ks, config.violation_k)
    global_index = PoolIndex(index_folder(root / "global" / "union", config.kind))
    modality_of = {c.did: c.modality for c in data.global_pool}
    tasks: dict[str, Any] = {}
    for name, task in data.tasks.items():
        queries = load_embeddings(root / "queries" / name)
        if queries.ids != [q.qid for q in task.queries]:
            raise ValueError(
                f"{root / 'queries' / name} is stale (its qids differ from {task.queries_file}); rerun 'embed'"
            )
        positives = [q.pos_cand_list for q in task.queries]
        local_index = PoolIndex(index_folder(root / "local" / name, config.kind))
        entry: dict[str, Any] = {
            "query_modality": task.queries[0].query_modality,
            "cand_modality": task.cand_modality,
            "n_queries": len(task.queries),
        }
        for pool, index in (("local", local_index), ("global", global_index)):
            _, ranked = index.search(queries.vectors, k, queries.meta)
            entry[pool] = {f"recall@{c}": recall_at_k(ranked, positives, c) for c in config.ks}
            entry[pool]["n_candidates"] = len(index.ids)
            if pool == "global":
                entry[pool][f"modality_violation@{config.violation_k}"] = modality_violation(
                    ranked, modality_of, task.cand_modality, config.violation_k
                )
        tasks[name] = entry
    mean = {
        pool: {
            m: sum(t[pool][m] for t in tasks.values()) / len(tasks)
            for m in entry[pool]
            if m != "n_candidates"
        }
        for pool in ("local", "global")
    }  # the unweighted mean over tasks, as UniIR's average row
    result = {
        "split": split_name,
        "data_root": str(Path(config.data_root).expanduser()),
        "encoder": global_index.meta.to_dict(),
        "query_encoder": queries.meta.to_dict(),
        "kind": config.kind,
        "tasks": tasks,
        "mean": mean,
        "retrieve_seconds": round(time.perf_counter() - started, 2),
    }
    if (root / RUN_NAME).is_file():  # the checkpoint, its training record and the embedding run
        result["run"] = json.loads((root / RUN_NAME).read_text(encoding="utf-8"))
    out = Path(config.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result
