"""The main job: read a test set, pick adapters per input, compose, generate, score, write results.

``infer_lora_retriever.py`` is a thin argparse front end over ``run_inference(InferenceConfig(...))``.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_retriever.data import Sample, read_samples
from lora_retriever.metrics import bleu, exact_match, rouge_l
from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import WEIGHT_MODES, LoraRetriever, LoraRetrieverConfig, RetrievedAdapter
from lora_retriever.selection import SELECTION_METHODS, select_adapters, task_adapter
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["MERGE_METHODS", "InferenceConfig", "run_inference"]

MERGE_METHODS = tuple(SELECTION_METHODS)  # base, oracle, selection, mixture, fusion, uniform_all


@dataclass
class InferenceConfig:
    """Settings of one inference run (see ``infer_lora_retriever.py --help`` for each flag)."""

    test_data: str
    pools: list[str] = field(default_factory=list)
    app_configs: list[str] = field(default_factory=list)
    category_configs: list[str] = field(default_factory=list)
    model_type: str = "smollm2-135m-instruct"
    model_path: str | None = None
    lora_type: str | None = None
    top_k: int = 3
    merge_method: str = "mixture"
    composition_weight_mode: str = "uniform"
    combination_type: str = "linear"
    retrieval_temperature: float = 1.0
    ood: bool = False
    embedder: str = "sentence-transformers"
    embedder_path: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    seed: int = 42
    device: str = "cpu"
    dtype: str = "float32"
    output_dir: str = "outputs/infer"
    num_samples: int | None = None
    show_similarities: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.merge_method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {MERGE_METHODS}, got {self.merge_method!r}")
        if self.composition_weight_mode not in WEIGHT_MODES:
            raise ValueError(
                f"composition_weight_mode must be one of {WEIGHT_MODES}, got {self.composition_weight_mode!r}"
            )
        if self.top_k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("top_k, batch_size and max_new_tokens must be >= 1")
        if self.merge_method != "base" and not (self.pools or self.app_configs or self.category_configs):
            raise ValueError(f"merge_method {self.merge_method!r} needs an adapter pool: pass --pool CONFIG")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def pool_sources(self) -> tuple[list[str], list[dict[str, Any]]]:
        """Config paths and, per path, the default ``lora_type`` its entries get."""
        paths = list(self.pools) + list(self.app_configs) + list(self.category_configs)
        defaults = (
            [{}] * len(self.pools)
            + [{"lora_type": "app"}] * len(self.app_configs)
            + [{"lora_type": "category"}] * len(self.category_configs)
        )
        return paths, defaults


def run_inference(config: InferenceConfig) -> dict[str, Any]:
    """Run the whole job; returns the metrics (also written to ``output_dir/metrics.json``)."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    samples = read_samples(config.test_data, limit=config.num_samples)
    if not samples:
        raise ValueError(f"{config.test_data} holds no samples")
    with_context = sum(bool(s.system or s.history) for s in samples)
    if with_context:
        logger.warning(
            "%d chat sample(s) carry a system prompt or earlier turns; generation uses only the last user turn "
            "(multi-turn prompts are not supported yet)",
            with_context,
        )
    pool = _load_pool(config)
    # Images are decoded once, here, for both retrieval and generation.
    images = [s.load_images() for s in samples] if any(s.images for s in samples) else None
    selections, retrieved = _select(config, pool, samples, images)

    from transformers import GenerationConfig

    from swift.llm import get_model_tokenizer, get_template

    model, processor = get_model_tokenizer(
        config.model_type, config.model_path, dtype=getattr(torch, config.dtype), device=config.device
    )
    template = get_template(config.model_type, processor)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=False)
    composer = _composer(config, model, template, pool, generation)

    start = time.perf_counter()
    predictions = composer.generate([s.query for s in samples], selections, images, on_error="isolate")
    errors = predictions.errors
    elapsed = time.perf_counter() - start

    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for sample, sel, pred, err in zip(samples, selections, predictions, errors):
        records.append(
            {
                "id": sample.id,
                "task": sample.task,
                "query": sample.query,
                "selected": [{"name": a.name, "weight": a.weight, "similarity": a.similarity} for a in sel],
                "prediction": pred,
                "reference": sample.response,
                "error": err,
            }
        )
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    metrics = score(records, pool, retrieved=retrieved and not config.ood, top_k=config.top_k)
    metrics["run"] = {
        **asdict(config),
        "seconds": round(elapsed, 2),
        "num_samples": len(samples),
        "pool_size": len(pool) if pool else 0,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _load_pool(config: InferenceConfig) -> AdapterPool | None:
    paths, defaults = config.pool_sources()
    if not paths:
        return None
    pool = AdapterPool.from_configs(paths, defaults=defaults)
    return pool.filter("lora_type", config.lora_type)


def _select(
    config: InferenceConfig, pool: AdapterPool | None, samples: Sequence[Sample], images: list | None
) -> tuple[list[list[RetrievedAdapter]], bool]:
    """Per sample, the adapters and weights to compose (``lora_retriever.selection``); and whether they came
    from retrieval."""
    method = config.merge_method
    if pool is None:
        return [[] for _ in samples], False
    tasks = [s.task for s in samples]
    if SELECTION_METHODS[method] in ("none", "own", "all"):
        return select_adapters(method, pool, tasks=tasks, ood=config.ood), False
    from lora_retriever.embedders import EmbedderConfig

    embedder = EmbedderConfig(backend=config.embedder, model_path=config.embedder_path, device=config.device)
    retriever = LoraRetriever(
        LoraRetrieverConfig(
            top_k=config.top_k,
            weight_mode=config.composition_weight_mode,
            temperature=config.retrieval_temperature,
            embedder=embedder,
        ),
        pool=pool,
    )
    if config.show_similarities:
        logger.info("similarities:\n%s", retriever.show_similarities([s.query for s in samples[:10]]))
    if images is not None and not getattr(retriever.embedder, "supports_images", False):
        logger.warning("embedder %s is text-only: images are ignored for retrieval", retriever.embedder.model_id)
        images = None
    retriever.check_embedder()
    vectors = retriever.embed_queries([s.query for s in samples], images)
    selections = select_adapters(
        method, pool, tasks=tasks, retriever=retriever, vectors=vectors, ood=config.ood, top_k=config.top_k
    )
    return selections, True


def _composer(config, model, template, pool, generation):
    from lora_retriever.composition import FusionComposer, MixtureComposer

    common = dict(batch_size=config.batch_size, generation_config=generation, progress=config.progress)
    if config.merge_method == "fusion":
        return FusionComposer(model, template, pool, method=config.combination_type, **common)
    return MixtureComposer(model, template, pool or AdapterPool([]), **common)


def score(
    records: Sequence[dict[str, Any]], pool: AdapterPool | None, *, retrieved: bool, top_k: int
) -> dict[str, Any]:
    """Per-task and overall metrics: exact match, ROUGE-L, BLEU, failures, retrieval top-1/top-k accuracy."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"] or "(none)"].append(record)
    tasks = {name: _score_group(group, pool, retrieved) for name, group in sorted(by_task.items())}
    overall = _score_group(records, pool, retrieved)
    return {"tasks": tasks, "overall": overall, "top_k": top_k}


def _score_group(
    records: Sequence[dict[str, Any]], pool: AdapterPool | None, retrieved: bool
) -> dict[str, Any]:
    scored = [r for r in records if r["reference"] is not None]
    preds = [r["prediction"] if r["error"] is None else "" for r in scored]
    refs = [r["reference"] for r in scored]
    out: dict[str, Any] = {
        "n": len(records),
        "failed": sum(r["error"] is not None for r in records),
        "exact_match": _mean([exact_match(p, t) for p, t in zip(preds, refs)]),
        "rouge_l": _mean([rouge_l(p, t) for p, t in zip(preds, refs)]),
        "bleu": bleu(preds, refs) if scored else None,
    }
    if retrieved and pool is not None:
        known = [(r, task_adapter(pool, r["task"])) for r in records]
        known = [(r, name) for r, name in known if name]
        if known:
            out["retrieval_top1"] = _mean(
                [float(bool(r["selected"]) and r["selected"][0]["name"] == n) for r, n in known]
            )
            out["retrieval_topk"] = _mean([float(n in [a["name"] for a in r["selected"]]) for r, n in known])
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def format_table(metrics: dict[str, Any]) -> str:
    """The per-task table printed at the end of a run."""
    cols = ["n", "failed", "exact_match", "rouge_l", "bleu", "retrieval_top1", "retrieval_topk"]
    header = f"{'task':<24}" + "".join(f"{c:>16}" for c in cols)
    lines = [header, "-" * len(header)]
    rows = list(metrics["tasks"].items()) + [("OVERALL", metrics["overall"])]
    for name, row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-':>16}" if v is None else f"{v:>16d}" if isinstance(v, int) else f"{v:>16.3f}")
        lines.append(f"{name[:24]:<24}" + "".join(cells))
    return "\n".join(lines)
