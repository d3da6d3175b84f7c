"""The main job: read a test set, pick adapters per input, compose, generate, score, write results.

``infer_lora_retriever.py`` is a thin argparse front end over ``run_inference(InferenceConfig(...))``.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from lora_retriever.data import Sample, read_samples
from lora_retriever.embedders.config import DTYPES, EmbedderConfig, ImageRetrievalConfig
from lora_retriever.metrics import bleu, rouge_l
from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import WEIGHT_MODES, LoraRetriever, LoraRetrieverConfig, RetrievedAdapter
from lora_retriever.selection import SELECTION_METHODS, own_adapters, select_adapters
from lora_retriever.tasks.scoring import answer_score
from swift.llm.model import DEFAULT_MODEL_TYPE, MODEL_TYPE_CHOICES, model_name_or_path
from swift.utils import get_logger
from swift.utils.files import atomic_write_together, ensure_writable_dir

logger = get_logger(__name__)

__all__ = ["MERGE_METHODS", "InferenceConfig", "run_inference"]

MERGE_METHODS = tuple(SELECTION_METHODS)  # base, oracle, selection, mixture, fusion, uniform_all
_EMBEDDER_FIELDS = {f.name: f for f in fields(EmbedderConfig)}  # --embedder / --embedder_path: one help text


def _fusion_methods() -> list[str]:
    from lora_retriever.fusion import available_methods  # the registry: the one list of fusion methods

    return available_methods()


def _pool_configs(flag: str, help_text: str) -> Any:
    """A repeatable ``--<flag> CONFIG`` field: a list of pool config paths."""
    return field(
        default_factory=list, metadata={"help": f"{help_text} (repeatable)", "flag": flag, "action": "append"}
    )


@dataclass
class InferenceConfig:
    """Settings of one inference run; each field's ``help`` is also its ``lora-retriever-infer`` flag's help."""

    test_data: str = field(
        metadata={"help": "JSONL test set: {id, query, response, images, task} or chat {messages, images}"}
    )
    pools: list[str] = _pool_configs("pool", "adapter pool config JSON")
    app_configs: list[str] = _pool_configs("app_config", "pool config whose entries default to lora_type=app")
    category_configs: list[str] = _pool_configs(
        "category_config", "pool config whose entries default to lora_type=category"
    )
    model_type: str = field(
        default=DEFAULT_MODEL_TYPE,
        metadata={
            "help": f"base model type ({DEFAULT_MODEL_TYPE} is packaged; the others need --model_path; auto "
            "reads the directory's config.json)",
            "choices": MODEL_TYPE_CHOICES,
        },
    )
    model_path: str | None = field(
        default=None, metadata={"help": "local model directory (not needed for the packaged default)"}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "allow model code shipped inside a checkpoint's directory to run (internvl2 models, the "
            "jina-v4 embedder)"
        },
    )
    lora_type: str | None = field(
        default=None, metadata={"help": "keep only adapters with this lora_type, e.g. app or category (all)"}
    )
    top_k: int = field(default=3, metadata={"help": "adapters retrieved per input"})
    merge_method: str = field(
        default="mixture",
        metadata={
            "help": "how adapters are chosen and composed: mixture is the per-sample weighted sum of the top-k "
            "adapters' outputs, fusion merges them into one adapter (--combination_type); the others are "
            "described in lora_retriever.selection",
            "choices": MERGE_METHODS,
        },
    )
    composition_weight_mode: str = field(
        default="uniform",
        metadata={"help": "weights of the k adapters (uniform 1/k is the paper's)", "choices": WEIGHT_MODES},
    )
    combination_type: str = field(
        default="linear",
        metadata={
            "help": "fusion method for --merge_method fusion (linear is the paper's)",
            "choices": _fusion_methods,
        },
    )
    retrieval_temperature: float = field(default=1.0, metadata={"help": "temperature of the softmax weights"})
    ood: bool = field(
        default=False, metadata={"help": "out-of-domain: exclude each sample's own task adapter"}
    )
    embedder: str = field(
        default=_EMBEDDER_FIELDS["backend"].default, metadata=_EMBEDDER_FIELDS["backend"].metadata
    )
    embedder_path: str | None = field(default=None, metadata=_EMBEDDER_FIELDS["model_path"].metadata)
    batch_size: int = field(default=8, metadata={"help": "samples generated per batch"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation limit per answer"})
    seed: int = field(default=42, metadata={"help": "seeds python, numpy and torch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (fp32 on CPU)", "choices": DTYPES})
    output_dir: str = field(
        default="outputs/infer", metadata={"help": "where predictions.jsonl and metrics.json go"}
    )
    num_samples: int | None = field(default=None, metadata={"help": "only the first N samples"})
    show_similarities: bool = field(default=False, metadata={"help": "log query/adapter similarity tables"})
    progress: bool = field(default=True, metadata={"help": "show progress bars", "cli": False})
    image: ImageRetrievalConfig = field(
        default_factory=ImageRetrievalConfig,
        metadata={"help": "image-aware retrieval (its own flags: --image_embedder ...)", "cli": False},
    )

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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.model_type not in MODEL_TYPE_CHOICES:
            raise ValueError(f"model_type must be one of {MODEL_TYPE_CHOICES}, got {self.model_type!r}")
        if self.merge_method == "fusion" and self.combination_type not in _fusion_methods():
            raise ValueError(
                f"combination_type must be one of {_fusion_methods()}, got {self.combination_type!r}"
            )
        if not self.output_dir:
            raise ValueError("output_dir is empty; pass --output_dir DIR")
        if SELECTION_METHODS[self.merge_method] in ("top1", "topk"):
            self.embedder_config()  # validates the embedder settings (e.g. jina-v4's --trust_remote_code)

    def embedder_config(self) -> EmbedderConfig:
        """The retrieval embedder's ``EmbedderConfig`` (validated)."""
        return EmbedderConfig(
            backend=self.embedder,
            model_path=self.embedder_path,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
        )

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
    """Run the whole job; returns the metrics (also written to ``output_dir/metrics.json``).

    Everything that can be checked without the model is checked first (output folder writable, samples and
    their field types, pool entries with weights, keys and base model), so a mistake costs seconds.
    ``predictions.jsonl`` and ``metrics.json`` are written under temporary names and renamed together.
    """
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    out_dir = ensure_writable_dir(config.output_dir, argument="output_dir")
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
    _check_images_fit_the_model(samples, config.model_type)
    pool = _load_pool(config)
    # Images are decoded once, here, for both retrieval and generation.
    images = [s.load_images() for s in samples] if any(s.images for s in samples) else None
    selections, retrieved = _select(config, pool, samples, images)

    from transformers import GenerationConfig

    from swift.llm import get_model_tokenizer, get_template

    model, processor = get_model_tokenizer(
        config.model_type,
        config.model_path,
        dtype=getattr(torch, config.dtype),
        device=config.device,
        trust_remote_code=config.trust_remote_code,
    )
    template = get_template(config.model_type, processor)
    _warn_long_prompts(samples, template, model, config.max_new_tokens)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=False)
    composer = _composer(config, model, template, pool, generation)

    start = time.perf_counter()
    predictions = composer.generate([s.query for s in samples], selections, images, on_error="isolate")
    errors = predictions.errors
    elapsed = time.perf_counter() - start

    records = []
    for sample, sel, pred, err in zip(samples, selections, predictions, errors):
        records.append(
            {
                "id": sample.id,
                "task": sample.task,
                "category": sample.extra.get("category"),
                "query": sample.query,
                "selected": [{"name": a.name, "weight": a.weight, "similarity": a.similarity} for a in sel],
                "prediction": pred,
                "reference": sample.response,
                "error": err,
            }
        )
    metrics = score(records, pool, retrieved=retrieved and not config.ood, top_k=config.top_k)
    metrics["run"] = {
        **asdict(config),
        "seconds": round(elapsed, 2),
        "num_samples": len(samples),
        "pool_size": len(pool) if pool else 0,
    }
    atomic_write_together(
        {
            out_dir / "predictions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
            out_dir / "metrics.json": json.dumps(metrics, indent=2) + "\n",
        }
    )
    return metrics


def _check_images_fit_the_model(samples: Sequence[Sample], model_type: str) -> None:
    """Samples with images need a vision-language model: refuse them up front for a text-only model type."""
    from swift.llm.model import MODEL_TYPES

    info = MODEL_TYPES.get(model_type)
    with_images = [s.id for s in samples if s.images]
    if info is not None and not info.is_multimodal and with_images:
        raise ValueError(
            f"{len(with_images)} sample(s) carry images (e.g. {with_images[:5]}) but model_type {model_type!r} "
            "has no vision tower; pass a vision-language --model_type (e.g. llava, qwen2-vl) with --model_path, "
            "or drop the images from the test set"
        )


def _load_pool(config: InferenceConfig) -> AdapterPool | None:
    paths, defaults = config.pool_sources()
    if not paths:
        return None
    # The adapters' base model is checked against the model to load now, before it is loaded.
    base_model = model_name_or_path(config.model_type, config.model_path)
    pool = AdapterPool.from_configs(paths, defaults=defaults, base_model=base_model)
    return pool.filter("lora_type", config.lora_type)


def _warn_long_prompts(samples: Sequence[Sample], template: Any, model: Any, max_new_tokens: int) -> None:
    """Warn, naming the samples, when a text prompt plus ``max_new_tokens`` exceeds the model's context.

    Prompts with images are not measured (their image tokens are known only after the processor runs).
    """
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(text_config, "max_position_embeddings", None)
    if not context:
        return
    too_long = []
    text_only = [s for s in samples if not s.images]
    for start in range(0, len(text_only), 64):
        chunk = text_only[start : start + 64]
        lengths = template.encode_batch([s.query for s in chunk])["attention_mask"].sum(dim=1).tolist()
        too_long += [(s.id, n) for s, n in zip(chunk, lengths) if n + max_new_tokens > context]
    if too_long:
        shown = ", ".join(f"{sample_id} ({n} tokens)" for sample_id, n in too_long[:5])
        logger.warning(
            "%d prompt(s) plus --max_new_tokens %d exceed the model's context of %d tokens; their answers may be "
            "cut or degraded: %s%s",
            len(too_long),
            max_new_tokens,
            context,
            shown,
            ", ..." if len(too_long) > 5 else "",
        )


def _select(
    config: InferenceConfig, pool: AdapterPool | None, samples: Sequence[Sample], images: list | None
) -> tuple[list[list[RetrievedAdapter]], bool]:
    """Per sample, the adapters and weights to compose (``lora_retriever.selection``); and whether they came
    from retrieval."""
    method = config.merge_method
    if pool is None:
        return [[] for _ in samples], False
    tasks = [s.task for s in samples]
    categories = [s.extra.get("category") for s in samples]  # a category adapter is a sample's own too
    if SELECTION_METHODS[method] in ("none", "own", "all"):
        return select_adapters(method, pool, tasks=tasks, categories=categories, ood=config.ood), False
    retriever = LoraRetriever(
        LoraRetrieverConfig(
            top_k=config.top_k,
            weight_mode=config.composition_weight_mode,
            temperature=config.retrieval_temperature,
            embedder=config.embedder_config(),
            image_embedder=config.image.embedder_config(config.device),
            text_weight=config.image.fusion_text_weight,
        ),
        pool=pool,
    )
    if config.show_similarities:
        logger.info("similarities:\n%s", retriever.show_similarities([s.query for s in samples[:10]]))
    retriever.check_embedder()
    vectors = retriever.embed_queries([s.query for s in samples], images)
    selections = select_adapters(
        method,
        pool,
        tasks=tasks,
        categories=categories,
        retriever=retriever,
        vectors=vectors,
        ood=config.ood,
        top_k=config.top_k,
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
        "exact_match": _mean([answer_score(r["task"], p, t) for r, p, t in zip(scored, preds, refs)]),
        "rouge_l": _mean([rouge_l(p, t) for p, t in zip(preds, refs)]),
        "bleu": bleu(preds, refs) if scored else None,
    }
    if retrieved and pool is not None:
        # correct: the sample's own adapter (its task's, or its category's) is retrieved
        known = [(r, own_adapters(pool, r["task"], r.get("category"))) for r in records]
        known = [(r, own) for r, own in known if own]
        if known:
            out["retrieval_top1"] = _mean(
                [float(bool(r["selected"]) and r["selected"][0]["name"] in own) for r, own in known]
            )
            out["retrieval_topk"] = _mean(
                [float(bool(set(own) & {a["name"] for a in r["selected"]})) for r, own in known]
            )
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
