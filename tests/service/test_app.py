"""The HTTP routes against a real uvicorn server: OpenAI shapes, adapters reported, errors, adapters admin."""

from __future__ import annotations

import math

import pytest

CAPITAL = "What is the capital of Peru?"


def chat(http, model="smollm2-135m-instruct", content=CAPITAL, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}
    return http.post("/v1/chat/completions", json=body)


def test_health_models_and_adapters(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2-135m-instruct" and health["adapters"] == 3
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids[:3] == ["smollm2-135m-instruct", "auto", "mixture"]
    assert set(ids[3:]) == {"capitals", "arithmetic", "sentiment"}
    adapters = {a["name"]: a for a in http.get("/adapters").json()["adapters"]}
    assert set(adapters) == {"capitals", "arithmetic", "sentiment"}
    assert not any(a["registered"] for a in adapters.values())


def test_auto_retrieves_the_matching_adapter_and_reports_it(http):
    response = chat(http, "auto", extra_top_k=None)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    used = body["adapters"]
    assert [a["name"] for a in used][0] == "capitals"  # the capital question retrieves the capitals key first
    assert len(used) == 3 and math.isclose(sum(a["weight"] for a in used), 1.0, abs_tol=1e-5)
    sims = [a["similarity"] for a in used]
    assert sims == sorted(sims, reverse=True) and sims[0] > 0.3
    assert body["usage"]["completion_tokens"] <= 6
    top1 = chat(http, "auto", top_k=1).json()["adapters"]
    assert [(a["name"], a["weight"]) for a in top1] == [("capitals", 1.0)]


def test_retrieve_matches_auto(http):
    results = http.post("/retrieve", json={"input": [CAPITAL, "What is 3 + 4?"], "top_k": 2}).json()[
        "results"
    ]
    assert [a["name"] for a in results[0]["adapters"]][0] == "capitals"
    assert [a["name"] for a in results[1]["adapters"]][0] == "arithmetic"
    assert all(len(r["adapters"]) == 2 for r in results)


def test_explicit_mixture_and_single_adapter_report_weights_and_similarities(http):
    body = chat(
        http,
        "mixture",
        adapters=[{"name": "arithmetic", "weight": 0.7}, {"name": "sentiment", "weight": 0.3}],
    ).json()
    assert [(a["name"], a["weight"]) for a in body["adapters"]] == [("arithmetic", 0.7), ("sentiment", 0.3)]
    assert all(-1 <= a["similarity"] <= 1 for a in body["adapters"])
    single = chat(http, "capitals").json()
    assert [(a["name"], a["weight"]) for a in single["adapters"]] == [("capitals", 1.0)]
    assert chat(http).json()["adapters"] == []  # the base model


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"model": "mixture", "adapters": [{"name": "nope", "weight": 1}]}, 404, "adapters"),
        ({"model": "mixture", "adapters": [{"name": "capitals", "weight": 0}]}, 400, "adapters"),
        ({"model": "mixture", "adapters": [{"name": "capitals", "weight": 9}]}, 400, "adapters"),
        ({"model": "capitals", "adapters": [{"name": "capitals", "weight": 1}]}, 400, "model"),
        ({"model": "auto", "top_k": 99}, 400, "top_k"),
        ({"max_tokens": -1}, 400, "max_tokens"),
        ({"max_tokens": 100000}, 400, "max_tokens"),
        ({"temperature": 7}, 400, "temperature"),
        ({"n": 2}, 400, "n"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
            400,
            "messages.0.content",
        ),
        ({"messages": [{"role": "system", "content": "be brief"}]}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(http, body, status, param):
    full = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **body,
    }
    response = http.post("/v1/chat/completions", json=full)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route(http):
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert http.get("/v2/nothing").status_code == 404


def test_completions_with_several_prompts(http):
    body = http.post(
        "/v1/completions",
        json={"model": "auto", "prompt": ["The capital of Italy is", "12 + 7 ="], "max_tokens": 4},
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [a[0]["name"] for a in body["choice_adapters"]] == ["capitals", "arithmetic"]


def test_register_retrieve_and_delete_an_adapter_hot(http, smollm2, tmp_path, engine):
    from tests.service.factories import linear_names, write_random_adapter

    model, _ = smollm2
    path = write_random_adapter(
        engine.model.base_model,
        tmp_path / "colors",
        linear_names(engine.model.base_model, ("q_proj",)),
        seed=42,
    )
    samples = ["What color is the sky?", "Name a warm colour.", "Mix blue and yellow: which colour?"]
    created = http.post("/adapters", json={"name": "colors", "path": str(path), "samples": samples})
    assert created.status_code == 201, created.text
    assert (engine.config.registry_config.parent / "keys" / "colors.npy").is_file()
    top = http.post(
        "/retrieve", json={"input": "What colour do you get from red and white?", "top_k": 1}
    ).json()
    assert top["results"][0]["adapters"][0]["name"] == "colors"
    answer = chat(http, "colors", content="What colour is grass?")
    assert answer.status_code == 200 and answer.json()["adapters"][0]["name"] == "colors"
    assert (
        http.post("/adapters", json={"name": "colors", "path": str(path), "samples": samples}).status_code
        == 409
    )
    assert http.delete("/adapters/colors").status_code == 200
    assert chat(http, "colors").status_code == 404
    assert "colors" not in [a["name"] for a in http.get("/adapters").json()["adapters"]]
    assert "colors" not in engine.model.adapter_names
    assert http.delete("/adapters/colors").status_code == 404


def test_register_refuses_bad_adapters(http, tmp_path, engine):
    from tests.service.factories import linear_names, write_random_adapter

    (tmp_path / "empty").mkdir()
    cases = {
        "relative path": ({"name": "x1", "path": "relative/dir", "samples": ["a"]}, "path"),
        "no adapter files": ({"name": "x2", "path": str(tmp_path / "empty"), "samples": ["a"]}, "path"),
        "bad name": ({"name": "../evil", "path": str(tmp_path / "empty"), "samples": ["a"]}, "name"),
        "no samples": ({"name": "x3", "path": str(tmp_path / "empty")}, "samples"),
    }
    for label, (body, param) in cases.items():
        response = http.post("/adapters", json=body)
        assert response.status_code == 400, label
        assert response.json()["error"]["param"] == param, label
    # An adapter of another shape (a tiny model's) fails the load checks; nothing is registered.
    from tests.factories import tiny_causal_lm

    tiny = tiny_causal_lm()
    wrong = write_random_adapter(tiny, tmp_path / "wrong", linear_names(tiny, ("q_proj",)))
    response = http.post("/adapters", json={"name": "wrong", "path": str(wrong), "samples": ["a"]})
    assert response.status_code == 400 and "does not load" in response.json()["error"]["message"]
    assert "wrong" not in engine.model.adapter_names and "wrong" not in engine.pool


def test_metrics_are_prometheus_text(http):
    chat(http, "auto")
    text = http.get("/metrics").text
    assert 'lora_retriever_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for series in (
        "lora_retriever_batch_size_bucket",
        "lora_retriever_queue_wait_seconds_count",
        "lora_retriever_tokens_per_second",
        "lora_retriever_adapter_cache_hits_total",
        "lora_retriever_adapter_cache_evictions_total",
    ):
        assert series in text


def test_merge_cat_equals_the_mixture_and_is_registered(http, engine):
    """``POST /merge`` with ``cat`` (exact: sum of w * s * B A) serves the same answer as the mixture itself."""
    from lora_retriever.service.admin import delete_adapter

    sources = [{"name": "capitals", "weight": 0.6}, {"name": "arithmetic", "weight": 0.4}]
    created = http.post("/merge", json={"name": "capmath", "adapters": sources, "method": "cat"})
    assert created.status_code == 201, created.text
    assert created.json()["adapter"]["fusion"]["method"] == "cat"
    try:
        question = "What is the capital of Chile?"
        fused = chat(http, "capmath", content=question).json()
        mixed = chat(http, "mixture", content=question, adapters=sources).json()
        assert fused["choices"][0]["message"]["content"] == mixed["choices"][0]["message"]["content"]
        assert (
            engine.config.registry_config.parent / "adapters" / "capmath" / "adapter_model.safetensors"
        ).is_file()
        sims = {
            a["name"]: a["similarity"]
            for a in http.post("/retrieve", json={"input": question, "top_k": 4}).json()["results"][0][
                "adapters"
            ]
        }
        assert "capmath" in sims
        assert http.post("/merge", json={"name": "capmath", "adapters": sources}).status_code == 409
        bad = http.post("/merge", json={"name": "m2", "adapters": sources, "method": "magic"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "method"
        missing = http.post("/merge", json={"name": "m2", "adapters": [{"name": "nope", "weight": 1}]})
        assert missing.status_code == 404
    finally:
        delete_adapter(engine, "capmath")
