"""The LoraRetriever service: OpenAI-compatible serving of per-request adapter mixtures.

* ``config``: ``ServiceConfig`` (the flags of ``lora-retriever-serve``), startup checks;
* ``engine``: ``Engine`` — one model, its pool, retriever, adapter cache and batching scheduler;
* ``scheduler``: dynamic batching (concurrent requests, each with its own mixture, decoded in one batch);
* ``cache``: ``AdapterCache`` — resident adapters within a memory budget (LRU, pins, prefetch);
* ``app``: the FastAPI routes; ``server``: uvicorn (``serve``, ``ServerThread``); ``metrics``: Prometheus text.

Start it with ``lora-retriever-serve``, ``python -m lora_retriever.service`` or ``make serve``.
"""

from lora_retriever.service.config import ServiceConfig

__all__ = ["ServiceConfig"]
