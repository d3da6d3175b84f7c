"""``Engine``: one model, its adapter pool and retriever, the adapter cache and the batching scheduler.

The HTTP app (``lora_retriever.service.app``) is a thin layer over these calls:

* ``resolve_adapters(model, adapters, text, top_k)``: what a request composes — the base model, one pool
  adapter, ``"auto"`` (the top-k retrieved for the input, ``LoraRetriever``) or an explicit weighted mixture —
  with each adapter's similarity to the input;
* ``encode_chat`` / ``encode_prompt``: prompt token ids (the tokenizer's chat template for chat requests);
* ``submit``: queue a ``GenerationRequest`` for the scheduler (dynamic batching, ``scheduler``);
* ``reload_pool``: re-read the pool configs after a hot change (``admin``: register, delete, merge).

Threads: the scheduler thread runs every batch under ``model_lock``; registration and deletion take the same
lock, so the model's adapter banks never change under a running batch. Embedding (retrieval) runs in the
HTTP server's worker threads under ``embed_lock``.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.pool import AdapterPool
from lora_retriever.pool_config import read_pool_entries, resolve_config_path
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, RetrievedAdapter
from lora_retriever.service.cache import AdapterBudgetError, AdapterCache
from lora_retriever.service.config import ServiceConfig
from lora_retriever.service.errors import ServiceError
from lora_retriever.service.metrics import ServiceMetrics
from lora_retriever.service.scheduler import GenerationRequest, RequestHandle, Scheduler, decode_batch
from swift.tuners import SwiftModel
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["AUTO_MODEL", "MIXTURE_MODEL", "Engine", "ServiceError"]

#: ``model`` value that retrieves the top-k adapters for the input and mixes them.
AUTO_MODEL = "auto"
#: ``model`` value for an explicit mixture given in ``adapters`` (the base model id works too).
MIXTURE_MODEL = "mixture"


class Engine:
    """The serving engine over one loaded model.

    Args:
        config: the service settings (budgets, batching, retrieval, pools, data dir).
        model: the base model (a transformers causal LM) or a ``SwiftModel``; adapters load into it.
        tokenizer: its tokenizer (chat template used for chat requests).
        embedder: the retrieval embedder (built from ``config.embedder_config()`` when ``None``).
    """

    def __init__(self, config: ServiceConfig, model: Any, tokenizer: Any, *, embedder: Any | None = None):
        self.config = config
        self.model = model if isinstance(model, SwiftModel) else SwiftModel(model)
        self.tokenizer = tokenizer
        self.metrics = ServiceMetrics()
        self.model_lock = threading.RLock()
        self.embed_lock = threading.Lock()
        self.base_name = config.served_model_name()
        base_config = getattr(self.model, "config", None)
        self.base_aliases = {self.base_name, str(getattr(base_config, "name_or_path", "") or self.base_name)}
        if embedder is None:
            from lora_retriever.embedders import get_embedder

            embedder = get_embedder(config.embedder_config())
        self.embedder = embedder
        self.pool = self._load_pool()
        self.retriever = self._build_retriever(self.pool)
        self.cache = AdapterCache(
            self.model,
            self._adapter_path,
            max_resident=config.max_resident_adapters,
            max_bytes=int(config.adapter_memory_mb * 2**20),
            metrics=self.metrics,
        )
        with self.model_lock:
            for name in config.pinned:
                if name not in self.pool:
                    raise ValueError(
                        f"--pin {name!r}: no such adapter in the pool; adapters: {self.pool.names}"
                    )
                self.cache.pin(name)
        self.scheduler = Scheduler(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_prepare_wait_ms=config.max_prepare_wait_ms,
            metrics=self.metrics,
        )

    @classmethod
    def from_config(cls, config: ServiceConfig) -> Engine:
        """Check the pools, then load the model and the embedder (the slow part)."""
        import torch

        from swift.llm import get_model_tokenizer

        check_startup(config)
        model, tokenizer = get_model_tokenizer(
            config.model_type, config.model_path, dtype=getattr(torch, config.dtype), device=config.device
        )
        return cls(config, model, tokenizer)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.cache.close()

    # -- pool ---------------------------------------------------------------------------------------------

    def pool_sources(self) -> list[Path]:
        registry = self.config.registry_config
        return [*self.config.pool_configs, *([registry] if registry.is_file() else [])]

    def _load_pool(self) -> AdapterPool:
        base = str(getattr(getattr(self.model, "config", None), "name_or_path", "") or "") or None
        return AdapterPool.from_configs(self.pool_sources(), base_model=base)

    def _build_retriever(self, pool: AdapterPool) -> LoraRetriever | None:
        if not len(pool):
            return None
        retriever = LoraRetriever(
            LoraRetrieverConfig(top_k=self.config.top_k, weight_mode=self.config.weight_mode, index="exact"),
            pool=pool,
            embedder=self.embedder,
        )
        retriever.check_embedder()
        return retriever

    def _adapter_path(self, name: str) -> Path:
        return self.pool[name].lora_path

    def reload_pool(self) -> None:
        """Re-read the pool configs (after a change) and rebuild the retriever."""
        pool = self._load_pool()
        retriever = self._build_retriever(pool)
        self.pool, self.retriever = pool, retriever

    def list_adapters(self) -> list[dict[str, Any]]:
        resident = set(self.cache.resident)
        pinned = self.cache.pinned
        registry = resolve_config_path(self.config.registry_config)
        return [
            {
                "name": entry.lora_name,
                "path": str(entry.lora_path),
                "description": entry.description,
                "resident": entry.lora_name in resident,
                "pinned": entry.lora_name in pinned,
                "registered": entry.source is not None and resolve_config_path(entry.source) == registry,
                "config": str(entry.source) if entry.source else None,
            }
            for entry in self.pool
        ]

    # -- requests -----------------------------------------------------------------------------------------

    def resolve_adapters(
        self,
        model: str,
        adapters: Sequence[tuple[str, float]] | None,
        text: str,
        *,
        top_k: int | None = None,
    ) -> list[RetrievedAdapter]:
        """What a request composes, with weights and similarities (runs the embedder: call it off the loop).

        Raises:
            ServiceError: unknown model or adapter, bad weights, ``top_k`` out of range, ``adapters`` with a
                ``model`` that isn't the base model or ``"mixture"``.
        """
        limit = self.config.max_adapters_per_request
        if top_k is not None and model != AUTO_MODEL:
            raise ServiceError(f'top_k applies to model "auto" only; got model {model!r}', param="top_k")
        if adapters is not None:
            if model not in (MIXTURE_MODEL, *self.base_aliases):
                raise ServiceError(
                    f'"adapters" gives an explicit mixture, so model must be "{MIXTURE_MODEL}" or the base model '
                    f"{self.base_name!r}; got {model!r}",
                    param="model",
                )
            return self._explicit(adapters, text)
        if model in self.base_aliases:
            return []
        if model == AUTO_MODEL:
            k = self.config.top_k if top_k is None else top_k
            if not 1 <= k <= limit:
                raise ServiceError(f"top_k must be in 1..{limit}, got {k}", param="top_k")
            return self._top_k([text], k, param="model")[0]
        if model in self.pool:
            return self._explicit([(model, 1.0)], text)
        raise ServiceError(
            f'unknown model {model!r}; use the base model {self.base_name!r}, "{AUTO_MODEL}", one of the pool\'s '
            f'adapters (GET /v1/models lists them) or an explicit mixture in "adapters"',
            status=404,
            param="model",
            code="model_not_found",
        )

    def _explicit(self, adapters: Sequence[tuple[str, float]], text: str) -> list[RetrievedAdapter]:
        limit = self.config.max_adapters_per_request
        if not adapters:
            raise ServiceError("adapters is empty; give at least one {name, weight}", param="adapters")
        if len(adapters) > limit:
            raise ServiceError(
                f"adapters holds {len(adapters)} entries; at most {limit} per request", param="adapters"
            )
        names = [name for name, _ in adapters]
        unknown = [n for n in names if n not in self.pool]
        if unknown:
            raise ServiceError(
                f"unknown adapter(s) {unknown}; the pool holds {self.pool.names}",
                status=404,
                param="adapters",
                code="adapter_not_found",
            )
        if len(set(names)) != len(names):
            raise ServiceError(f"adapters names an adapter twice: {names}; give each once", param="adapters")
        weights = [w for _, w in adapters]
        if not all(math.isfinite(w) for w in weights):
            raise ServiceError(f"adapter weights must be finite numbers, got {weights}", param="adapters")
        total = sum(abs(w) for w in weights)
        if total == 0:
            raise ServiceError("adapter weights are all zero; use the base model instead", param="adapters")
        if total > self.config.max_total_weight:
            raise ServiceError(
                f"adapter weights sum to {total:g} in absolute value, above the limit {self.config.max_total_weight:g}; "
                "mixtures usually sum to 1",
                param="adapters",
            )
        sims = self._similarities(text)
        return [RetrievedAdapter(n, float(w), sims.get(n, float("nan"))) for n, w in adapters]

    def _similarities(self, text: str) -> dict[str, float]:
        if self.retriever is None or not text.strip():
            return {}
        with self.embed_lock:
            retriever = self.retriever
            scores = retriever.similarities(retriever.embed_queries([text]))[0]
        return {name: float(s) for name, s in zip(retriever.pool.names, scores) if np.isfinite(s)}

    def retrieve(
        self, texts: Sequence[str], top_k: int | None, weight_mode: str | None
    ) -> list[list[RetrievedAdapter]]:
        """``POST /retrieve``: the top-k adapters for each text (call off the loop)."""
        k = self.config.top_k if top_k is None else top_k
        if not 1 <= k <= max(len(self.pool), 1):
            raise ServiceError(f"top_k must be in 1..{max(len(self.pool), 1)}, got {k}", param="top_k")
        return self._top_k(texts, k, weight_mode=weight_mode, param="input")

    def _top_k(
        self, texts: Sequence[str], k: int, *, weight_mode: str | None = None, param: str
    ) -> list[list[RetrievedAdapter]]:
        """The one retrieval path (``"auto"`` and ``/retrieve``): embed under the lock, search the keys."""
        retriever = self.retriever
        if retriever is None:
            raise ServiceError(
                "the pool is empty: nothing to retrieve; register an adapter first", param=param
            )
        with self.embed_lock:
            vectors = retriever.embed_queries(list(texts))
        return retriever.retrieve_vectors(vectors, k, weight_mode=weight_mode)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat prompt rendered by the tokenizer's chat template (generation prompt appended)."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            return self.encode_prompt(text)
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._check_length(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], "messages")

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ServiceError("prompt is empty; give some text to continue", param="prompt")
        return self._check_length(ids, "prompt")

    def _check_length(self, ids: list[int], param: str) -> list[int]:
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if context and len(ids) + 1 > context:
            raise ServiceError(
                f"the {param} is {len(ids)} tokens, beyond the model's context of {context}; shorten it",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue a request; its adapters start loading now where they can (``AdapterCache.prefetch``)."""
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if context and len(request.prompt_ids) + request.max_tokens > context:
            request.max_tokens = max(1, context - len(request.prompt_ids))
        handle = RequestHandle(request, loop)
        request._handle = handle
        self.cache.prefetch(a.name for a in request.adapters)
        self.scheduler.submit(handle)
        return handle

    def _run_batch(self, handles: list[RequestHandle]) -> None:
        """On the scheduler thread: load each request's adapters (a failure fails only that request), then
        decode the rest together; if ``generate`` fails, retry the requests that streamed nothing alone."""
        with self.model_lock:
            ready, acquired, later = [], [], []
            for handle in handles:
                if handle.cancelled.is_set():
                    handle.fail(asyncio.CancelledError())
                    continue
                names = [a.name for a in handle.request.adapters]
                try:
                    missing = [n for n in names if n not in self.pool]
                    if missing:
                        raise ServiceError(
                            f"adapter(s) {missing} were deleted from the pool", status=404, param="model"
                        )
                    self.cache.acquire(names)
                except AdapterBudgetError as err:
                    if ready or later:  # the batch's other adapters fill the cache: next batch
                        later.append(handle)
                    else:
                        handle.fail(ServiceError(str(err), status=500))
                    continue
                except Exception as err:
                    handle.fail(
                        err
                        if isinstance(err, ServiceError)
                        else ServiceError(f"{type(err).__name__}: {err}", status=500)
                    )
                    continue
                ready.append(handle)
                acquired.append(names)  # released per acquire call: each counts its adapters once
            if later:
                self.scheduler.requeue(later)
            try:
                self._decode_isolated(ready)
            finally:
                for names in acquired:
                    self.cache.release(names)

    def _decode_isolated(self, handles: list[RequestHandle]) -> None:
        if not handles:
            return
        order = self.pool.names
        try:
            decode_batch(self.model, self.tokenizer, handles, order, self.metrics)
            return
        except Exception as err:
            if len(handles) == 1:
                handles[0].fail(ServiceError(f"generation failed: {type(err).__name__}: {err}", status=500))
                return
            logger.warning("batch of %d failed (%s); retrying the requests one by one", len(handles), err)
        for handle in handles:
            if handle.finished:
                continue
            if handle.started:  # it already streamed text: a retry would repeat it
                handle.fail(
                    ServiceError("generation failed in a shared batch after streaming began", status=500)
                )
                continue
            self._decode_isolated([handle])

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.base_name,
            "adapters": len(self.pool),
            "queue_depth": self.scheduler.depth,
            "cache": self.cache.stats(),
        }


def check_startup(config: ServiceConfig) -> None:
    """Everything checked before the model loads: pool configs present and valid, data dir writable.

    Raises:
        FileNotFoundError: a pool config is missing (for the demo pool: names the command that builds it).
        PoolValidationError / ValueError / PermissionError: as ``AdapterPool.from_configs`` and
            ``ensure_writable_dir`` raise them.
    """
    from lora_retriever.service.config import DEMO_POOL
    from swift.llm.model import model_name_or_path
    from swift.utils.files import ensure_writable_dir

    for path in config.pool_configs:
        if not path.is_file():
            if not config.pools:
                raise FileNotFoundError(
                    f"the demo pool {DEMO_POOL} is not built (looked in {path}); build it once with `make demo` "
                    "(or `lora-retriever-demo`, which trains its task adapters), or serve another pool with --pool CONFIG"
                )
            raise FileNotFoundError(f"pool config {path} does not exist; check --pool")
    ensure_writable_dir(config.data_dir, argument="data_dir")
    registry = config.registry_config
    sources = [*config.pool_configs, *([registry] if registry.is_file() else [])]
    AdapterPool.from_configs(sources, base_model=model_name_or_path(config.model_type, config.model_path))
    for name in config.pinned:
        if not any(e.get("lora_name") == name for s in sources for e in read_pool_entries(s)):
            raise ValueError(f"--pin {name!r}: no such adapter in the served pools")
