"""The Ray Serve deployment (slow): a local single-node Ray cluster with 2 replicas serves the same answers,
adapters and errors as the embedded server, over real HTTP through Ray's proxy."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
# base model, one adapter, an explicit mixture, retrieval: each asked two questions
MIXTURES = [
    {"model": BASE},
    {"model": "capitals"},
    {
        "model": "mixture",
        "adapters": [{"name": "arithmetic", "weight": 0.5}, {"name": "sentiment", "weight": 0.5}],
    },
    {"model": "auto", "top_k": 2},
]
QUESTIONS = ["What is the capital of Peru?", "What is 23 + 19?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(service_pool, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="needs ray[serve]: pip install -e '.[ray]'")
    import ray
    from ray import serve

    from lora_retriever.service.config import ServiceConfig
    from lora_retriever.service.ray_app import RayServeConfig, run

    service = ServiceConfig(
        pools=[str(service_pool)],
        data_dir=str(tmp_path_factory.mktemp("ray_data")),
        port=_free_port(),
        max_batch_size=8,
        max_wait_ms=50.0,
        default_max_tokens=8,
    )
    layout = RayServeConfig(num_replicas=2, replica_cpus=1, num_cpus=2, object_store_mb=100)
    try:
        yield run(service, layout, blocking=False)
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(client, body):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_two_replicas_answer_as_the_embedded_server(ray_url, http):
    import httpx
    from ray import serve

    bodies = [
        {"messages": [{"role": "user", "content": q}], "max_tokens": 8, **m}
        for q in QUESTIONS
        for m in MIXTURES
    ]
    embedded = [_ask(http, body).json() for body in bodies]
    with httpx.Client(base_url=ray_url, timeout=600) as client:
        with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: batched inside replicas, spread over both
            responses = list(pool.map(lambda body: _ask(client, body), bodies))
        for got, want in zip((r.json() for r in responses), embedded):
            assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
            assert got["adapters"] == want["adapters"]  # names, weights and similarities
            assert got["usage"] == want["usage"]
        assert len({r.headers["x-lora-retriever-replica"] for r in responses}) == 2

        stream = client.post("/v1/chat/completions", json={**bodies[1], "stream": True})
        chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == embedded[1]["choices"][0]["message"]["content"]

        bad = {"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}
        got, want = client.post("/v1/chat/completions", json=bad), http.post("/v1/chat/completions", json=bad)
        assert got.status_code == want.status_code == 404 and got.json() == want.json()

    status = serve.status().applications["lora-retriever"]
    assert status.deployments["lora-retriever"].replica_states == {"RUNNING": 2}
