"""Session fixtures of the service tests: the packaged SmolLM2, a 3-adapter pool with keys, an engine, and a
REAL uvicorn server on a free loopback port (started once, torn down at the end)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedder():
    from lora_retriever.embedders import EmbedderConfig, get_embedder

    return get_embedder(EmbedderConfig())


@pytest.fixture(scope="session")
def smollm2():
    from swift.llm import get_model_tokenizer

    return get_model_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def service_pool(smollm2, embedder, tmp_path_factory):
    """``pool.json`` of three random adapters (capitals, arithmetic, sentiment) on SmolLM2, with keys."""
    from tests.service.factories import build_pool

    model, _ = smollm2
    return build_pool(model, tmp_path_factory.mktemp("service_pool"), embedder, std=0.08)


@pytest.fixture(scope="session")
def engine(smollm2, embedder, service_pool, tmp_path_factory):
    from lora_retriever.service.config import ServiceConfig
    from lora_retriever.service.engine import Engine

    model, tokenizer = smollm2
    config = ServiceConfig(
        pools=[str(service_pool)],
        data_dir=str(tmp_path_factory.mktemp("service_data")),
        max_batch_size=8,
        max_wait_ms=50.0,
        default_max_tokens=8,
    )
    return Engine(config, model, tokenizer, embedder=embedder)


@pytest.fixture(scope="session")
def server(engine):
    from lora_retriever.service.server import ServerThread

    with ServerThread(engine) as running:
        yield running


@pytest.fixture(scope="session")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=900) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", timeout=900, max_retries=0)
