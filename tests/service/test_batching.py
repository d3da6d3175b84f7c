"""Dynamic batching against a real server: the official openai client (chat, completion, streaming), concurrent
requests with different mixtures each equal to the same request sent alone, and errors kept to their request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

BASE = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of Peru?",
    "What is 23 + 19?",
    "Is the word 'lovely' positive or negative?",
    "Name a large animal.",
    "What is the capital of Norway?",
    "Write one word about the sea.",
]
# One mixture per concurrent request: base, single adapters, weighted mixtures (a negative weight too), auto.
MIXTURES = [
    {"model": BASE},
    {"model": "capitals"},
    {
        "model": "mixture",
        "adapters": [{"name": "arithmetic", "weight": 0.5}, {"name": "sentiment", "weight": 0.5}],
    },
    {
        "model": "mixture",
        "adapters": [{"name": "capitals", "weight": 1.2}, {"name": "sentiment", "weight": -0.4}],
    },
    {"model": "auto"},
    {"model": "auto", "top_k": 1},
]


def _chat(http, question, mixture, max_tokens=8):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **mixture}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_client_chat_completion_and_streaming(openai_client):
    chat = openai_client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8
    )
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.model_extra["adapters"][0]["name"] == "capitals"
    assert chat.usage.completion_tokens <= 8

    stream = openai_client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # the stream is the same answer
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert chunks[-1].model_extra["adapters"] == chat.model_extra["adapters"]

    completion = openai_client.completions.create(
        model="capitals", prompt="The capital of Spain is", max_tokens=5, extra_body={}
    )
    streamed = openai_client.completions.create(
        model="capitals", prompt="The capital of Spain is", max_tokens=5, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    mixed = openai_client.chat.completions.create(
        model="mixture",
        messages=[{"role": "user", "content": QUESTIONS[1]}],
        max_tokens=4,
        extra_body={"adapters": [{"name": "arithmetic", "weight": 1.0}]},
    )
    assert mixed.model_extra["adapters"][0]["name"] == "arithmetic"
    models = [m.id for m in openai_client.models.list()]
    assert BASE in models and "capitals" in models


def test_openai_client_sees_errors_as_exceptions(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert "unknown model" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=-3
        )


def test_concurrent_mixtures_equal_each_request_alone(http, engine):
    alone = [_chat(http, q, m) for q, m in zip(QUESTIONS, MIXTURES)]
    batches_before = engine.metrics.batch_size.count
    requests_before = engine.metrics.batch_size.sum
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda qm: _chat(http, *qm), zip(QUESTIONS, MIXTURES)))
    batches = engine.metrics.batch_size.count - batches_before
    assert engine.metrics.batch_size.sum - requests_before == len(QUESTIONS)
    assert batches < len(QUESTIONS)  # they were decoded together (fewer batches than requests)
    assert max(r["lora_retriever"]["batch_size"] for r in together) > 1
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], f"request {i}"
        assert a["adapters"] == b["adapters"]
    answers = [r["choices"][0]["message"]["content"] for r in alone]
    assert len(set(answers)) >= 4  # the mixtures really differ


def test_service_answer_equals_the_library_inference_path(http, engine):
    """Independent of the scheduler: swift.llm.inference with the same routing gives the same greedy answer."""
    from transformers import GenerationConfig

    from lora_retriever.retriever import RetrievedAdapter
    from lora_retriever.selection import routing_from_selections
    from swift.llm import get_template, inference

    mixture = [RetrievedAdapter("capitals", 0.6, 0.0), RetrievedAdapter("arithmetic", 0.4, 0.0)]
    body = _chat(
        http,
        QUESTIONS[4],
        {"model": "mixture", "adapters": [{"name": a.name, "weight": a.weight} for a in mixture]},
    )
    template = get_template(BASE, engine.tokenizer)
    with engine.model_lock:
        reference = inference(
            engine.model,
            template,
            [QUESTIONS[4]],
            routing=routing_from_selections([mixture], engine.pool.names),
            generation_config=GenerationConfig(max_new_tokens=8, do_sample=False),
            progress=False,
        )
    assert body["choices"][0]["message"]["content"].strip() == reference[0]


def test_max_tokens_and_stop_per_request_in_one_batch(http):
    full = _chat(http, QUESTIONS[3], {"model": BASE}, max_tokens=10)["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(3) as pool:
        short, long_, stopped = pool.map(
            lambda kw: _chat(http, QUESTIONS[3], {"model": BASE, **kw[1]}, max_tokens=kw[0]),
            [(3, {}), (10, {}), (10, {"stop": [full.split()[1]]})],
        )
    assert long_["choices"][0]["message"]["content"] == full
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    assert full.startswith(short["choices"][0]["message"]["content"])
    cut = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop" and full.startswith(cut) and len(cut) < len(full)


def test_a_failing_adapter_fails_only_its_request(http, engine, tmp_path):
    """An adapter whose weights file is corrupt fails at load time inside a batch; the others still answer."""
    from lora_retriever.service.admin import delete_adapter
    from lora_retriever.training.registry import register_adapter, write_adapter_key
    from tests.service.factories import linear_names, write_random_adapter

    registry = engine.config.registry_config
    registry.parent.mkdir(parents=True, exist_ok=True)
    path = write_random_adapter(
        engine.model.base_model, tmp_path / "broken", linear_names(engine.model.base_model, ("q_proj",))
    )
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    key = write_adapter_key(registry, "broken", [("0", "broken things")], embedder=engine.embedder)
    register_adapter(registry, {"lora_name": "broken", "lora_path": str(path), "embedding_path": str(key)})
    engine.reload_pool()
    try:
        jobs = [{"model": "broken"}, {"model": "capitals"}, {"model": BASE}]

        def send(mixture):
            body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4, **mixture}
            return http.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(3) as pool:
            broken, good, base = pool.map(send, jobs)
        assert broken.status_code == 500, broken.text
        assert (
            broken.json()["error"]["type"] == "server_error" and "broken" in broken.json()["error"]["message"]
        )
        assert good.status_code == 200 and base.status_code == 200
        assert good.json()["choices"][0]["message"]["content"]
    finally:
        delete_adapter(engine, "broken")


def test_client_disconnect_cancels_its_row(http, engine):
    """A stream abandoned after its first chunk stops decoding; the server keeps serving."""
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": QUESTIONS[5]}],
        "max_tokens": 200,
        "stream": True,
    }
    tokens_before = engine.metrics.generated_tokens.value()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break
    after = _chat(http, QUESTIONS[0], {"model": BASE}, max_tokens=2)
    assert after["choices"][0]["message"]["content"]
    assert engine.metrics.generated_tokens.value() - tokens_before < 150  # the abandoned row stopped early
