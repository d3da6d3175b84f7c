"""``Engine``: one model, its adapter pool and retriever, the adapter cache and the batching scheduler.

The HTTP app (``lora_retriever.service.app``) is a thin layer over these calls:

* ``resolve_adapters(model, adapters, text, top_k)``: what a request composes — the base model, one pool
  adapter, ``"auto"`` (the top-k retrieved for the input, ``LoraRetriever``) or an explicit weighted mixture —
  with each adapter's similarity to the input;
* ``encode_chat`` / ``encode_prompt``: prompt token ids (the tokenizer's chat template for chat requests);
* ``submit``: queue a ``GenerationRequest`` for the scheduler (dynamic batching, ``scheduler``);
* ``register_adapter`` / ``delete_adapter``: hot changes of the pool through the one pool writer
  (``pool_transaction``), keys built on registration; the served pool is rebuilt after each change.

Threads: the scheduler thread runs every batch under ``model_lock``; registration and deletion take the same
lock, so the model's adapter banks never change under a running batch. Embedding (retrieval) runs in the
HTTP server's worker threads under ``embed_lock``.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_retriever.pool import AdapterPool
from lora_retriever.pool_config import pool_transaction, read_pool_entries, resolve_config_path
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, RetrievedAdapter
from lora_retriever.service.cache import AdapterCache
from lora_retriever.service.config import ServiceConfig
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
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")
MAX_KEY_SAMPLES = 1000


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status``, OpenAI error ``type``, the offending ``param``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = "invalid_request_error" if status < 500 else "server_error"


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

    def _pool_sources(self) -> list[Path]:
        registry = self.config.registry_config
        return [*self.config.pool_configs, *([registry] if registry.is_file() else [])]

    def _load_pool(self) -> AdapterPool:
        base = str(getattr(getattr(self.model, "config", None), "name_or_path", "") or "") or None
        return AdapterPool.from_configs(self._pool_sources(), base_model=base)

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
            if self.retriever is None:
                raise ServiceError(
                    'model "auto" needs adapters, but the pool is empty; register one first', param="model"
                )
            with self.embed_lock:
                retriever = self.retriever
                vectors = retriever.embed_queries([text])
                return retriever.retrieve_vectors(vectors, k)[0]
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
        if self.retriever is None:
            raise ServiceError(
                "the pool is empty: nothing to retrieve; register an adapter first", param="input"
            )
        with self.embed_lock:
            retriever = self.retriever
            return retriever.retrieve_vectors(
                retriever.embed_queries(list(texts)), k, weight_mode=weight_mode
            )

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
            ready, acquired = [], []
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
                except Exception as err:
                    handle.fail(
                        err
                        if isinstance(err, ServiceError)
                        else ServiceError(f"{type(err).__name__}: {err}", status=500)
                    )
                    continue
                ready.append(handle)
                acquired.extend(names)
            try:
                self._decode_isolated(ready)
            finally:
                self.cache.release(acquired)

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

    # -- adapters (admin) ---------------------------------------------------------------------------------

    def register_adapter(
        self,
        name: str,
        path: str,
        *,
        samples: Sequence[str] | None = None,
        samples_path: str | None = None,
        description: str = "",
        pin: bool = False,
    ) -> dict[str, Any]:
        """Validate a PEFT directory by loading it, build its retrieval key, add it to the registry config.

        Raises:
            ServiceError: bad name (409 if taken), path, samples, or an adapter that doesn't load into the model.
        """
        from lora_retriever.embed_pool import read_sample_texts
        from lora_retriever.training.registry import register_adapter, write_adapter_key

        if not ADAPTER_NAME.match(name or ""):
            raise ServiceError(
                f"adapter name {name!r} must be 1-100 letters, digits, '_' or '-', starting with a letter or digit",
                param="name",
            )
        if name in self.pool or name in self.base_aliases or name in (AUTO_MODEL, MIXTURE_MODEL):
            raise ServiceError(
                f"the name {name!r} is taken; delete it first or choose another", status=409, param="name"
            )
        adapter_dir = Path(path).expanduser()
        if not adapter_dir.is_absolute():
            raise ServiceError(f"path must be an absolute server-side directory, got {path!r}", param="path")
        if not adapter_dir.is_dir():
            raise ServiceError(f"path {path!r} is not a directory on the server", param="path")
        if (samples is None) == (samples_path is None):
            raise ServiceError(
                "give the adapter's key samples as samples (texts) or samples_path (a file on the server)",
                param="samples",
            )
        if samples_path is not None:
            try:
                texts = [t for _, t in read_sample_texts(samples_path)]
            except (OSError, ValueError) as err:
                raise ServiceError(f"samples_path {samples_path!r}: {err}", param="samples_path") from err
        else:
            texts = [t for t in samples if isinstance(t, str) and t.strip()]
        if not texts or len(texts) > MAX_KEY_SAMPLES:
            raise ServiceError(
                f"need 1..{MAX_KEY_SAMPLES} non-empty sample texts for the key, got {len(texts)}",
                param="samples",
            )
        registry = self.config.registry_config
        registry.parent.mkdir(parents=True, exist_ok=True)
        with self.model_lock:
            try:
                self.model.load_adapter(adapter_dir, name)  # every check Swift.from_pretrained makes
            except (OSError, ValueError) as err:
                raise ServiceError(f"adapter at {path!r} does not load: {err}", param="path") from err
            self.model.set_active_adapters(None)
            try:
                self.cache.register_loaded(name, pinned=pin)
                with self.embed_lock:
                    key_path = write_adapter_key(
                        registry, name, [(str(i), t) for i, t in enumerate(texts)], embedder=self.embedder
                    )
                entry = {
                    "lora_name": name,
                    "lora_path": str(adapter_dir.absolute()),
                    "embedding_path": str(key_path),
                    "description": description,
                }
                if samples_path is not None:
                    entry["samples_path"] = str(Path(samples_path).expanduser().absolute())
                stored = register_adapter(registry, entry)
                self.reload_pool()
            except Exception:
                self.cache.unload(name)
                self._remove_entry(name)
                raise
        logger.info("registered adapter %r from %s", name, adapter_dir)
        return stored

    def delete_adapter(self, name: str) -> None:
        """Unload ``name`` and remove its entry from the pool config that holds it (files are kept).

        Raises:
            ServiceError: 404 for an adapter the pool doesn't hold.
        """
        if name not in self.pool:
            raise ServiceError(
                f"no adapter named {name!r}; the pool holds {self.pool.names}", status=404, param="name"
            )
        with self.model_lock:
            self.cache.unload(name)
            self._remove_entry(name)
            self.reload_pool()
        logger.info("deleted adapter %r", name)

    def _remove_entry(self, name: str) -> None:
        for config in self._pool_sources():
            if any(e.get("lora_name") == name for e in read_pool_entries(config)):
                with pool_transaction(config) as entries:
                    entries[:] = [e for e in entries if e.get("lora_name") != name]

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.base_name,
            "adapters": len(self.pool),
            "resident_adapters": len(self.cache.resident),
            "queue_depth": self.scheduler.depth,
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
