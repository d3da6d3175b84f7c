"""The LoraRetriever paper's protocol at small scale: ``python -m lora_retriever.eval``.

Zhao et al. 2024 ("LoraRetriever: Input-Aware LoRA Retrieval and Composition for Mixed Tasks in the Wild",
Sec. 4) compare, on a mixed-task test set: the base model, perfect selection (each sample's own adapter),
retrieval + selection (top-1), retrieval + mixture (top-3), retrieval + fusion (top-3, A and B averaged),
and an AdapterSoup-style uniform mixture of all adapters; in-domain (IID: every adapter available) and
out-of-domain (OOD: each sample's own adapter excluded, so the others must transfer). We add exact `cat`
fusion, and the retriever's top-1/top-3 accuracy on two differently worded query sets.

Works on the demo pool (``make demo`` builds it): one model load, one embedding pass, every method.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from swift.utils import get_logger

if TYPE_CHECKING:
    from lora_retriever.cli.eval import PaperEvalConfig

logger = get_logger(__name__)

# column of the table -> (selection method of ``lora_retriever.selection``, composer: mixture or a fusion method)
METHODS = {
    "base": ("base", "mixture"),
    "oracle": ("oracle", "mixture"),
    "selection": ("selection", "mixture"),
    "mixture": ("mixture", "mixture"),
    "fusion_linear": ("fusion", "linear"),
    "fusion_cat": ("fusion", "cat"),
    "uniform_all": ("uniform_all", "mixture"),
}


def retrieval_accuracy(sims: np.ndarray, own: list[int], k: int) -> float:
    """Fraction of queries whose own adapter (column ``own[i]`` of ``sims [n, N]``) ranks in the top ``k``."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return float(np.mean([j in row for j, row in zip(own, top)]))


def run(args: PaperEvalConfig) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    from lora_retriever.composition import FusionComposer, MixtureComposer
    from lora_retriever.data import read_samples
    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.pool import AdapterPool
    from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig
    from lora_retriever.selection import select_adapters, task_adapter
    from lora_retriever.tasks import is_correct
    from swift.llm import get_model_tokenizer, get_template
    from swift.llm.model import model_name_or_path

    torch.manual_seed(args.seed)
    pool = AdapterPool.from_configs(
        args.pool, base_model=model_name_or_path(args.model_type, args.model_path)
    )
    names = pool.names
    retriever = LoraRetriever(
        LoraRetrieverConfig(top_k=args.top_k), pool=pool, embedder=get_embedder(EmbedderConfig())
    )
    retriever.check_embedder()
    samples = read_samples(args.test_data, limit=args.num_samples)
    alt = read_samples(args.test_alt, limit=args.num_samples) if args.test_alt else None
    own = [s.task for s in samples]
    missing = sorted({t for t in own if task_adapter(pool, t) is None})
    if missing:
        raise ValueError(f"tasks {missing} have no adapter in {args.pool} (by name or 'task' field)")
    vectors = retriever.embed_queries([s.query for s in samples])
    result: dict[str, Any] = {"retrieval": {}, "scores": {}, "settings": asdict(args)}
    for wording, rows, data in (("test", vectors, samples), ("test_alt", None, alt)):
        if data is None:
            continue
        rows = rows if rows is not None else retriever.embed_queries([s.query for s in data])
        own_idx = [names.index(task_adapter(pool, s.task)) for s in data]
        result["retrieval"][wording] = {
            f"top{k}": retrieval_accuracy(retriever.similarities(rows), own_idx, k) for k in (1, 3)
        }

    model, tokenizer = get_model_tokenizer(args.model_type, args.model_path)
    template = get_template(args.model_type, tokenizer)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    composers = {
        "mixture": MixtureComposer(model, template, pool, batch_size=args.batch_size, generation_config=gen),
    }
    shared = composers["mixture"].model  # one SwiftModel: the pool's adapters load once for every composer
    for kind in ("linear", "cat"):
        composers[kind] = FusionComposer(
            shared,
            template,
            pool,
            method=kind,
            batch_size=args.batch_size,
            generation_config=gen,
            cache_size=64,
        )
    queries = [s.query for s in samples]
    for method in args.methods:
        for setting in ("iid", "ood"):
            if setting == "ood" and method in ("base", "oracle"):
                continue  # base has no adapter to exclude; oracle's only adapter is the excluded one
            start = time.perf_counter()
            selection_method, composer_kind = METHODS[method]
            selections = select_adapters(
                selection_method,
                pool,
                tasks=own,
                retriever=retriever,
                vectors=vectors,
                ood=setting == "ood",
                top_k=args.top_k,
                weight_mode="uniform",
            )
            composer = composers[composer_kind]
            answers = composer.generate(queries, selections)
            correct = [is_correct(s.task, a, s.response) for s, a in zip(samples, answers)]
            per_task = {
                t: float(np.mean([c for c, s in zip(correct, samples) if s.task == t]))
                for t in sorted(set(own))
            }
            result["scores"][f"{method}/{setting}"] = {
                "per_task": per_task,
                "average": float(np.mean(correct)),
                "seconds": round(time.perf_counter() - start, 1),
            }
            logger.info(
                "%s/%s: exact match %.3f (%.0f s)",
                method,
                setting,
                np.mean(correct),
                time.perf_counter() - start,
            )
            examples = [
                {
                    "id": s.id,
                    "task": s.task,
                    "answer": a,
                    "reference": s.response,
                    "selected": [x.name for x in sel],
                }
                for s, a, sel in list(zip(samples, answers, selections))[:3]
            ]
            result["scores"][f"{method}/{setting}"]["examples"] = examples
    return result


def markdown_table(result: dict[str, Any]) -> str:
    columns = list(result["scores"])
    tasks = sorted(next(iter(result["scores"].values()))["per_task"])
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in tasks:
        lines.append(
            f"| {task} | "
            + " | ".join(f"{result['scores'][c]['per_task'][task]:.2f}" for c in columns)
            + " |"
        )
    lines.append(
        "| **average** | " + " | ".join(f"**{result['scores'][c]['average']:.3f}**" for c in columns) + " |"
    )
    retrieval = ", ".join(
        f"{w}: top-1 {v['top1']:.3f}, top-3 {v['top3']:.3f}" for w, v in result["retrieval"].items()
    )
    return "\n".join(lines) + f"\n\nRetriever accuracy (own adapter among the retrieved): {retrieval}\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(c.split("/")[0] for c in result["scores"]))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for offset, setting in ((-width / 2, "iid"), (width / 2, "ood")):
        values = [result["scores"].get(f"{m}/{setting}", {}).get("average", np.nan) for m in methods]
        ax.bar(np.arange(len(methods)) + offset, values, width, label=setting.upper())
    ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
    ax.set_ylabel("exact match (average over tasks)")
    ax.set_title("LoraRetriever protocol on the offline task suite (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.eval``: the ``lora-retriever-eval`` command (flags: ``PaperEvalConfig``)."""
    from lora_retriever.cli.eval import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
