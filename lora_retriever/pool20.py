"""Build the full text pool: ``python -m lora_retriever.pool20 [--work_dir data/pool20] [--workers 1 --threads 1]``.

1. writes the whole offline task suite (``TASK_NAMES``: 20 tasks in 6 clusters of related tasks) to
   ``<work_dir>/tasks``,
2. trains one LoRA adapter per task on SmolLM2-135M-Instruct with ``make demo``'s recipe and machinery
   (``lora_retriever.demo.build_task_pool``: worker processes, one progress bar) and registers each with its
   retrieval key in ``<work_dir>/pool/pool.json``.

Resumable: the tasks, and every adapter already trained with the same recipe, are reused, so an interrupted
build picks up where it stopped. The run time is printed with the CPU it ran on. Then run the paper's protocol
on the full pool:

    python -m lora_retriever.eval --pool data/pool20/pool/pool.json \\
        --test_data data/pool20/tasks/test_mixed.jsonl --test_alt data/pool20/tasks/test_mixed_alt.jsonl \\
        --output_dir outputs/pool20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_retriever.tasks.registry import TASK_NAMES
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "PoolBuildConfig",
    "build_pool",
    "cluster_scores",
    "cluster_table",
    "eval_command",
    "main",
    "retrieval_by_cluster",
]


@dataclass
class PoolBuildConfig:
    """Settings of the full-pool build; each field's ``help`` is its flag's help."""

    work_dir: str = field(default="data/pool20", metadata={"help": "cache for the tasks, adapters and keys"})
    tasks: list[str] = field(
        default_factory=lambda: list(TASK_NAMES),
        metadata={"help": "tasks of the pool", "choices": TASK_NAMES, "metavar": "TASK"},
    )
    steps: int = field(default=50, metadata={"help": "training steps per adapter (batch 8), as make demo"})
    workers: int = field(default=2, metadata={"help": "trainings run at a time, one thread each"})
    n_test: int = field(default=20, metadata={"help": "test items per task, as make demo"})
    seed: int = field(default=0, metadata={"help": "seed of the task suite"})
    model_type: str = field(
        default=DEFAULT_MODEL_TYPE, metadata={"help": "base model type", "choices": MODEL_TYPE_CHOICES}
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local base model directory (not needed for the packaged default)"}
    )
    report_retrieval: bool = field(
        default=False,
        metadata={
            "help": "then measure retrieval by cluster on the mixed test sets (test and test_alt) and write "
            "<work_dir>/retrieval.json; it needs only the keys, which do not depend on --steps"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show the progress bar", "cli": False})

    def __post_init__(self) -> None:
        for name in ("steps", "workers", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; pass --{name} N")
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or not self.tasks:
            raise ValueError(
                f"tasks {unknown or '[]'} are not text tasks; pick from: {', '.join(TASK_NAMES)}"
            )
        repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"tasks lists {', '.join(repeated)} more than once; name each task once")


def build_pool(config: PoolBuildConfig) -> dict[str, Any]:
    """Write the task suite and train and register the adapters the pool lacks (see the module docstring).

    Returns:
        ``{"pool_config", "tasks_dir", "tasks", "trained", "reused", "seconds", "cpu"}``: ``trained`` are
        the adapters trained by this call, ``reused`` the ones found in the cache; with
        ``report_retrieval``, also ``"retrieval"``: ``retrieval_by_cluster`` of each mixed test set, by
        wording (also written to ``<work_dir>/retrieval.json``).

    Raises:
        ValueError: ``work_dir`` is not a writable folder.
        ChildProcessError: a training failed (the adapters finished before it are kept).
    """
    from lora_retriever.demo import build_task_pool
    from swift.utils.files import atomic_write
    from swift.utils.machine import cpu_summary

    start = time.perf_counter()
    tasks_dir, pool_dir, trained = build_task_pool(config, config.tasks)
    summary = {
        "pool_config": str(pool_dir / "pool.json"),
        "tasks_dir": str(tasks_dir),
        "tasks": list(config.tasks),
        "trained": trained,
        "reused": [t for t in config.tasks if t not in trained],
        "seconds": round(time.perf_counter() - start, 1),
        "cpu": cpu_summary(),
    }
    if config.report_retrieval:
        summary["retrieval"] = {
            wording: retrieval_by_cluster(pool_dir / "pool.json", tasks_dir / f"{name}.jsonl")
            for wording, name in (("test", "test_mixed"), ("test_alt", "test_mixed_alt"))
        }
        atomic_write(tasks_dir.parent / "retrieval.json", json.dumps(summary["retrieval"], indent=2) + "\n")
    return summary


def eval_command(summary: dict[str, Any], output_dir: str = "outputs/pool20") -> str:
    """The ``python -m lora_retriever.eval`` command line that runs the paper's protocol on a built pool."""
    tasks_dir = summary["tasks_dir"]
    return (
        f"python -m lora_retriever.eval --pool {summary['pool_config']} "
        f"--test_data {tasks_dir}/test_mixed.jsonl --test_alt {tasks_dir}/test_mixed_alt.jsonl "
        f"--output_dir {output_dir}"
    )


def retrieval_by_cluster(pool_config: str | Path, test_data: str | Path, top_k: int = 3) -> dict[str, Any]:
    """Where the retriever's picks land, per cluster of the queries' tasks (the packaged embedder, the
    pool's keys, every query of ``test_data``).

    Returns ``{"by_cluster": ..., "top1_confusions": [{"task", "retrieved", "n"}, ...]}`` (the top-1 misses,
    commonest first). ``by_cluster`` has, per cluster and ``"all"``: ``n``, ``top1`` (own adapter ranked first), ``top1_cluster`` (first pick from the
    own cluster), ``topk`` (own adapter among the top ``top_k``), ``topk_cluster`` (share of the top ``top_k``
    from the own cluster) and ``ood_topk_cluster`` (the same with the own adapter excluded, as the paper's
    out-of-domain setting retrieves: how much of an OOD mixture comes from related adapters).

    Raises:
        ValueError: fewer than 2 adapters, or a query's task or an adapter that is not a task of the suite.
    """
    import numpy as np

    from lora_retriever.data import read_samples
    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.pool import AdapterPool
    from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig
    from lora_retriever.tasks import get_task

    pool = AdapterPool.from_configs(pool_config)
    retriever = LoraRetriever(
        LoraRetrieverConfig(top_k=top_k), pool=pool, embedder=get_embedder(EmbedderConfig())
    )
    retriever.check_embedder()
    samples = read_samples(test_data)
    names = list(pool.names)
    if len(names) < 2:
        raise ValueError(f"{pool_config} has {len(names)} adapter(s); retrieval by cluster needs at least 2")
    adapter_cluster = np.array([get_task(name).cluster for name in names])
    sims = retriever.similarities(retriever.embed_queries([s.query for s in samples]))
    own = np.array([names.index(s.task) if s.task in names else -1 for s in samples])
    if (own < 0).any():
        raise ValueError(
            f"test_data has tasks {sorted({s.task for s, o in zip(samples, own) if o < 0})} with no "
            f"adapter in {pool_config}; build the pool for every task of the test set"
        )
    cluster = np.array([get_task(s.task).cluster for s in samples])
    ranked = np.argsort(-sims, axis=1, kind="stable")
    ood = sims.copy()
    ood[np.arange(len(own)), own] = -np.inf
    ood_ranked = np.argsort(-ood, axis=1, kind="stable")[:, : min(top_k, len(names) - 1)]  # never the own
    rows = {
        "top1": ranked[:, 0] == own,
        "top1_cluster": adapter_cluster[ranked[:, 0]] == cluster,
        "topk": (ranked[:, :top_k] == own[:, None]).any(axis=1),
        "topk_cluster": (adapter_cluster[ranked[:, :top_k]] == cluster[:, None]).mean(axis=1),
        "ood_topk_cluster": (adapter_cluster[ood_ranked] == cluster[:, None]).mean(axis=1),
    }
    groups = {"all": np.ones(len(samples), bool)} | {c: cluster == c for c in dict.fromkeys(cluster)}
    misses = Counter((s.task, names[j]) for s, j in zip(samples, ranked[:, 0]) if names[j] != s.task)
    return {
        "by_cluster": {
            group: {"n": int(mask.sum())} | {k: round(float(v[mask].mean()), 4) for k, v in rows.items()}
            for group, mask in groups.items()
        },
        "top1_confusions": [{"task": a, "retrieved": b, "n": n} for (a, b), n in misses.most_common()],
    }


def cluster_scores(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per-cluster averages of a ``lora_retriever.eval`` result: ``{column: {cluster: mean over its tasks}}``
    (the tasks of a cluster weigh equally; a column's tasks must all be tasks of the suite)."""
    from lora_retriever.tasks import get_task

    out: dict[str, dict[str, float]] = {}
    for column, score in result["scores"].items():
        by_cluster: dict[str, list[float]] = {}
        for task, value in score["per_task"].items():
            by_cluster.setdefault(get_task(task).cluster, []).append(value)
        out[column] = {c: sum(v) / len(v) for c, v in by_cluster.items()}
    return out


def cluster_table(result: dict[str, Any]) -> str:
    """``cluster_scores`` as a markdown table (rows: clusters, columns: the result's methods/settings)."""
    from lora_retriever.tasks import CLUSTERS

    scores = cluster_scores(result)
    columns = list(scores)
    clusters = [c for c in CLUSTERS if c in next(iter(scores.values()), {})]
    lines = ["| cluster | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {c} | " + " | ".join(f"{scores[col][c]:.2f}" for col in columns) + " |" for c in clusters]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from lora_retriever.cli.args import command_parser

    return command_parser(__doc__, PoolBuildConfig)


def main(argv: Sequence[str] | None = None) -> int:
    from lora_retriever.cli.errors import run_cli

    return run_cli(build_parser(), _build, argv)


def _build(args: argparse.Namespace) -> int:
    from lora_retriever.cli.args import config_from_args

    summary = build_pool(config_from_args(PoolBuildConfig, args, progress=not args.quiet))
    print(
        f"pool: {summary['pool_config']} ({len(summary['tasks'])} adapters: "
        f"{len(summary['trained'])} trained now, {len(summary['reused'])} reused)"
    )
    print(f"time: {summary['seconds']:.0f} s on {summary['cpu']}")
    for wording, report in summary.get("retrieval", {}).items():
        print(f"\nretrieval by cluster, {wording} queries (own = the item's own adapter; OOD: own excluded)")
        print(
            f"{'cluster':<14} {'n':>4} {'top1':>6} {'top1 in cluster':>16} {'top3':>6} {'OOD top3 in cluster':>20}"
        )
        for group, row in report["by_cluster"].items():
            print(
                f"{group:<14} {row['n']:>4} {row['top1']:>6.3f} {row['top1_cluster']:>16.3f} "
                f"{row['topk']:>6.3f} {row['ood_topk_cluster']:>20.3f}"
            )
    print(f"next: {eval_command(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
