"""Request limits and bad input on a real server: bodies over the limit (declared or chunked) get a 413, every
malformed request a 4xx JSON error naming the field, and no name a client picks writes outside the data dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BASE = "smollm2-135m-instruct"


def chat_body(**fields) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def post_raw(http, path: str, text: str):
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


def assert_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    return error


@pytest.fixture
def small_bodies(engine):
    saved = engine.config.max_body_mb
    engine.config.max_body_mb = 0.01  # 10,485 bytes
    yield
    engine.config.max_body_mb = saved


def test_a_body_over_the_limit_is_refused_declared_or_chunked(http, small_bodies):
    big = chat_body(messages=[{"role": "user", "content": "x" * 20_000}])
    error = assert_error(http.post("/v1/chat/completions", json=big), 413, "body")
    assert "10485 bytes" in error["message"] and error["code"] == "body_too_large"
    data = json.dumps(big).encode()

    def chunks():  # no Content-Length: httpx sends it chunked, the server counts as it reads
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    response = http.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body")
    small = http.post(
        "/retrieve",
        content=chunks_of(json.dumps({"input": "What is 2 + 2?", "top_k": 1})),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 200, small.text  # a chunked body under the limit is served


def chunks_of(text: str):
    data = text.encode()
    return (data[i : i + 8] for i in range(0, len(data), 8))


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (
            '{"model": "mixture", "adapters": [{"name": "capitals", "weight": NaN}]',
            400,
            "body",
        ),  # malformed JSON
        (json.dumps(chat_body())[:-1] + ', "temperature": NaN}', 400, "temperature"),
        (
            json.dumps(chat_body(model="mixture"))[:-1]
            + ', "adapters": [{"name": "capitals", "weight": Infinity}]}',
            400,
            "adapters.0.weight",
        ),
        ("[]", 400, "body"),
        ('"hello"', 400, "body"),
        ("null", 400, "body"),
        (json.dumps(chat_body(messages="hi")), 400, "messages"),
        (json.dumps(chat_body(messages=[{"content": "hi"}])), 400, "messages.0.role"),
        (json.dumps(chat_body(messages=[{"role": "user"}])), 400, "messages.0.content"),
        (json.dumps(chat_body(messages=[{"role": "user", "content": 3}])), 400, "messages.0.content"),
        (
            json.dumps(chat_body(messages=[{"role": "user", "content": [{"text": "no type"}]}])),
            400,
            "messages.0.content.0.type",
        ),
        (json.dumps(chat_body(max_tokens=0)), 400, "max_tokens"),
        (json.dumps(chat_body(max_completion_tokens=-5)), 400, "max_completion_tokens"),
        (json.dumps(chat_body(max_tokens="many")), 400, "max_tokens"),
        (json.dumps(chat_body(seed=-1)), 400, "seed"),
        (json.dumps(chat_body(stop=["a", "b", "c", "d", "e"])), 400, "stop"),
        (
            json.dumps(chat_body(model="mixture", adapters=[{"name": "capitals", "weight": 1, "scale": 2}])),
            400,
            "adapters.0.scale",
        ),
        (
            json.dumps(
                chat_body(
                    model="mixture",
                    adapters=[{"name": "capitals", "weight": 1}, {"name": "capitals", "weight": 1}],
                )
            ),
            400,
            "adapters",
        ),
        (
            json.dumps(
                chat_body(
                    model="mixture",
                    adapters=[{"name": "capitals", "weight": 3}, {"name": "arithmetic", "weight": -3}],
                )
            ),
            400,
            "adapters",
        ),
        (json.dumps(chat_body(model="mixture", adapters=[])), 400, "adapters"),
        (
            json.dumps(
                chat_body(
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "what is this?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                            ],
                        }
                    ]
                )
            ),
            400,
            "messages.0.content",
        ),
    ],
)
def test_malformed_chat_requests_name_the_field(http, raw, status, param):
    assert_error(post_raw(http, "/v1/chat/completions", raw), status, param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": BASE, "prompt": [], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": BASE, "prompt": "", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, "model"),
        ("/retrieve", {"input": ["  "]}, "input"),
        ("/retrieve", {"input": "x", "top_k": 0}, "top_k"),
        ("/retrieve", {"input": "x", "weight_mode": "loud"}, "weight_mode"),
        ("/merge", {"name": "m", "adapters": [{"name": "capitals", "weight": 1}], "seed": 2**64}, "seed"),
        ("/merge", {"name": "m", "adapters": [{"name": "capitals", "weight": 1}], "density": 0}, "density"),
        ("/train", {"adapter_name": "t", "dataset_path": "/x.jsonl", "seed": 2**40}, "seed"),
        ("/train", {"adapter_name": "t", "dataset_path": "/x.jsonl", "lora_alpha": 0}, "lora_alpha"),
        ("/train", {"adapter_name": "t", "dataset_path": "/x.jsonl", "typo_field": 1}, "typo_field"),
    ],
)
def test_other_routes_name_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "/abs", "..", ".hidden", "name\n", "ok\x00x", "é", "x" * 101]
)
def test_no_name_a_client_picks_writes_outside_the_data_dir(http, engine, tmp_path, name):
    """Names become folder names under <data_dir>/adapters: anything but [A-Za-z0-9][A-Za-z0-9_-]* is refused
    by every route that writes (upload, merge, train, register) before it writes."""
    data_dir = Path(engine.config.data_dir)
    before = tree(data_dir)
    sample = tmp_path / "train.jsonl"
    sample.write_text(json.dumps({"input": "1 + 1", "output": "2"}) + "\n")
    responses = [
        http.post("/adapters/archive", params={"name": name, "samples": ["a"]}, content=b"x"),
        http.post("/merge", json={"name": name, "adapters": [{"name": "capitals", "weight": 1}]}),
        http.post("/train", json={"adapter_name": name, "dataset_path": str(sample)}),
        http.post("/adapters", json={"name": name, "path": str(tmp_path), "samples": ["a"]}),
    ]
    for response in responses:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] in ("name", "adapter_name"), response.text
    assert tree(data_dir) == before
    for escaped in (
        data_dir.parent / "escape",
        data_dir / "escape",
        Path("/abs"),
        data_dir / "adapters" / "a",
    ):
        assert not escaped.exists()


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if "journal" not in p.name)


def test_a_vanishing_temperature_decodes_greedily(http):
    """Found by the fuzz: temperature 1e-300 overflowed logits / temperature to inf (a 500); below
    ``MIN_TEMPERATURE`` decoding is greedy, so the answer equals temperature 0's."""
    greedy = http.post("/v1/chat/completions", json=chat_body(model="capitals", max_tokens=4, temperature=0))
    tiny = http.post(
        "/v1/chat/completions", json=chat_body(model="capitals", max_tokens=4, temperature=1e-300)
    )
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
