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
    """Every method of ``args.methods``, IID and OOD, on every pool kind; returns the results dict.

    Pools: ``args.pool`` alone (the text demo), or with ``--app_config`` / ``--category_config`` the kinds
    ``app``, ``category`` and ``all`` (both). A sample's own adapters are its task's app adapter and its
    category's adapter (``selection.own_adapters``): OOD excludes both; the oracle composes the most specific
    one the pool holds. Queries with images are embedded with the image embedder when one is given (score-level
    fusion, ``LoraRetrieverConfig.text_weight``), and retrieval is then reported per modality. A sample whose
    generation fails is recorded and counted wrong, never skipped.
    """
    import torch
    from transformers import GenerationConfig

    from lora_retriever.composition import FusionComposer, MixtureComposer
    from lora_retriever.data import read_samples
    from lora_retriever.embedders import EmbedderConfig, get_embedder
    from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig
    from lora_retriever.selection import own_adapters, select_adapters
    from lora_retriever.tasks.scoring import answer_score
    from swift.llm import get_model_tokenizer, get_template

    torch.manual_seed(args.seed)
    pools, union = _pools(args)
    samples = read_samples(args.test_data, limit=args.num_samples)
    alt = read_samples(args.test_alt, limit=args.num_samples) if args.test_alt else None
    if args.tasks:
        unknown = sorted(set(args.tasks) - {str(s.task) for s in samples})
        if unknown:
            raise ValueError(f"--tasks {unknown} have no test items in {args.test_data}; check the names")
        samples = [s for s in samples if s.task in args.tasks]
        alt = [s for s in alt if s.task in args.tasks] if alt is not None else None
    tasks = [s.task for s in samples]
    categories = [s.extra.get("category") for s in samples]
    for kind, pool in pools.items():
        missing = sorted({str(t) for t, c in zip(tasks, categories) if not own_adapters(pool, t, c)})
        if missing:
            raise ValueError(
                f"tasks {missing} have no own adapter in the {kind} pool (by name, 'task' or category)"
            )
    text_embedder = get_embedder(EmbedderConfig(adapter_path=args.embedder_adapter_path))
    image = args.image
    image_config = image.embedder_config() if image is not None else None
    image_embedder = get_embedder(image_config) if image_config is not None else None
    images = [s.load_images() for s in samples] if any(s.images for s in samples) else None
    alt_images = [s.load_images() for s in alt] if alt and any(s.images for s in alt) else None

    result: dict[str, Any] = {"retrieval": {}, "scores": {}, "settings": asdict(args)}
    retrievers, vectors = {}, {}
    for kind, pool in pools.items():
        retriever = LoraRetriever(
            LoraRetrieverConfig(top_k=args.top_k, text_weight=image.fusion_text_weight if image else None),
            pool=pool,
            embedder=text_embedder,
            image_embedder=image_embedder if pool.image_key_meta() is not None else None,
        )
        retriever.check_embedder()
        retrievers[kind] = retriever
        for wording, data, data_images in (("test", samples, images), ("test_alt", alt, alt_images)):
            if data is None:
                continue
            rows = retriever.embed_queries([s.query for s in data], data_images)
            if wording == "test":
                vectors[kind] = rows
            own = [own_adapters(pool, s.task, s.extra.get("category"))[0] for s in data]
            label = wording if len(pools) == 1 else f"{kind}:{wording}"
            result["retrieval"][label] = _retrieval_report(retriever, rows, own)

    model, processor = get_model_tokenizer(args.model_type, args.model_path)
    template = get_template(args.model_type, processor)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    common = dict(batch_size=args.batch_size, generation_config=gen)
    composers = {"mixture": MixtureComposer(model, template, union, **common)}
    shared = composers["mixture"].model  # one SwiftModel: each adapter loads once for every composer
    for kind in ("linear", "cat"):
        composers[kind] = FusionComposer(shared, template, union, method=kind, cache_size=64, **common)
    queries = [s.query for s in samples]
    for pool_kind, pool in pools.items():
        for method in args.methods:
            for setting in ("iid", "ood"):
                if setting == "ood" and method in ("base", "oracle"):
                    continue  # base has no adapter to exclude; oracle's only adapters are the excluded ones
                if method == "base" and pool_kind != next(iter(pools)):
                    continue  # the base model does not depend on the pool
                start = time.perf_counter()
                selection_method, composer_kind = METHODS[method]
                selections = select_adapters(
                    selection_method,
                    pool,
                    tasks=tasks,
                    categories=categories,
                    retriever=retrievers[pool_kind],
                    vectors=vectors[pool_kind],
                    ood=setting == "ood",
                    top_k=args.top_k,
                    weight_mode="uniform",
                )
                answers = composers[composer_kind].generate(queries, selections, images, on_error="isolate")
                correct = [
                    answer_score(s.task, a, s.response) if err is None else 0.0
                    for s, a, err in zip(samples, answers, answers.errors)
                ]
                label = f"{method}/{setting}" if len(pools) == 1 else f"{pool_kind}:{method}/{setting}"
                result["scores"][label] = {
                    "per_task": {
                        t: float(np.mean([c for c, s in zip(correct, samples) if s.task == t]))
                        for t in sorted(set(tasks))
                    },
                    "average": float(np.mean(correct)),
                    "failed": sum(err is not None for err in answers.errors),
                    "seconds": round(time.perf_counter() - start, 1),
                    "examples": [
                        {
                            "id": s.id,
                            "task": s.task,
                            "answer": a,
                            "reference": s.response,
                            "selected": [x.name for x in sel],
                        }
                        for s, a, sel in list(zip(samples, answers, selections))[:3]
                    ],
                }
                logger.info(
                    "%s: exact match %.3f (%.0f s)", label, np.mean(correct), time.perf_counter() - start
                )
    return result


def _pools(args: PaperEvalConfig) -> tuple[dict[str, Any], Any]:
    """The pools to evaluate (by kind) and their union (every adapter, loaded into one model)."""
    from lora_retriever.pool import AdapterPool
    from swift.llm.model import model_name_or_path

    base = model_name_or_path(args.model_type, args.model_path)
    if not (args.app_configs or args.category_configs):
        pool = AdapterPool.from_configs(args.pool, base_model=base)
        return {"pool": pool}, pool
    paths = list(args.app_configs) + list(args.category_configs)
    defaults = [{"lora_type": "app"}] * len(args.app_configs) + [{"lora_type": "category"}] * len(
        args.category_configs
    )
    union = AdapterPool.from_configs(paths, defaults=defaults, base_model=base)
    pools = {"app": union.filter("lora_type", "app"), "category": union.filter("lora_type", "category")}
    pools = {kind: pool for kind, pool in pools.items() if len(pool)}
    if len(pools) == 2:
        pools["all"] = union
    wanted = args.pool_kinds or list(pools)
    unknown = [k for k in wanted if k not in pools]
    if unknown:
        raise ValueError(f"--pool_kinds {unknown} have no adapters; available: {list(pools)}")
    return {k: pools[k] for k in wanted}, union


def _retrieval_report(retriever: Any, rows: Any, own: list[str]) -> dict[str, Any]:
    """Top-1/top-3 accuracy of the own adapter: fused scoring, plus text-only and image-only when the queries
    have both parts."""
    from lora_retriever.retriever import accuracy_by_modality

    if rows.text is not None and rows.image is not None:
        return accuracy_by_modality(retriever, rows, own)
    names = retriever.pool.names
    own_idx = [names.index(name) for name in own]
    sims = retriever.similarities(rows)
    return {f"top{k}": retrieval_accuracy(sims, own_idx, k) for k in (1, 3)}


def summary_table(result: dict[str, Any]) -> str:
    """Averages with one row per method and one column per pool kind and setting (``pool:method/setting``)."""
    cells: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for label, score in result["scores"].items():
        pool, _, column = label.rpartition(":")
        method, _, setting = column.partition("/")
        header = f"{pool} {setting.upper()}".strip()
        columns += [header] if header not in columns else []
        cells.setdefault(method, {})[header] = score["average"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method, row in cells.items():
        lines.append(
            f"| {method} | " + " | ".join(f"{row[c]:.3f}" if c in row else "–" for c in columns) + " |"
        )
    return "\n".join(lines) + "\n"


def markdown_table(result: dict[str, Any]) -> str:
    """Per-task exact match for every column (with several pool kinds, preceded by ``summary_table``), then
    the retriever's accuracy."""
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
    parts = []
    for wording, report in result["retrieval"].items():
        if "top1" in report:
            parts.append(f"{wording}: top-1 {report['top1']:.3f}, top-3 {report['top3']:.3f}")
        else:  # per modality
            parts.extend(
                f"{wording} {modality}: top-1 {v['top1']:.3f}, top-3 {v['top3']:.3f}"
                for modality, v in report.items()
            )
    retrieval = "; ".join(parts)
    summary = summary_table(result) + "\n" if any(":" in c for c in columns) else ""
    return (
        summary
        + "\n".join(lines)
        + f"\n\nRetriever accuracy (own adapter among the retrieved): {retrieval}\n"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # column labels are "method/setting", or "pool:method/setting" with several pool kinds (one panel each)
    by_pool: dict[str, dict[str, float]] = {}
    for label, score in result["scores"].items():
        pool, _, column = label.rpartition(":")
        by_pool.setdefault(pool, {})[column] = score["average"]
    fig, axes = plt.subplots(1, len(by_pool), figsize=(8 * len(by_pool), 3.5), squeeze=False)
    width = 0.38
    for ax, (pool, scores) in zip(axes[0], by_pool.items()):
        methods = list(dict.fromkeys(c.split("/")[0] for c in scores))
        for offset, setting in ((-width / 2, "iid"), (width / 2, "ood")):
            values = [scores.get(f"{m}/{setting}", np.nan) for m in methods]
            ax.bar(np.arange(len(methods)) + offset, values, width, label=setting.upper())
        ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
        ax.set_ylabel("exact match (average over tasks)")
        ax.set_ylim(0, 1)
        model = result["settings"].get("model_type", "")
        ax.set_title(f"LoraRetriever protocol, {model}" + (f", {pool} pool" if pool else ""))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_retriever.eval``: the ``lora-retriever-eval`` command (flags: ``PaperEvalConfig``)."""
    from lora_retriever.cli.eval import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
