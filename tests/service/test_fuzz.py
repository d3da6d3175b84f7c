"""Fuzz the OpenAPI schema with schemathesis against a real uvicorn server (an admin key, so every route is
reached): whatever a client sends, valid or not, the answer is never a 5xx. Bounded: a few examples per route,
generation capped at 2 new tokens, and no job runner (a valid ``/train`` would be answered 404, not run)."""

from __future__ import annotations

import json
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (schemathesis brings hypothesis)

from lora_retriever.service.auth import KeyRing, new_key  # noqa: E402

MAX_TOKENS = 2
MODELS = ("auto", "capitals", "smollm2-135m-instruct")
#: Examples per route and generation mode (valid / invalid data); the whole run takes a few minutes.
EXAMPLES = 6


@pytest.fixture(scope="module")
def admin_key():
    return new_key("admin")


@pytest.fixture(scope="module")
def fuzz_url(engine, server, admin_key):
    from lora_retriever.service.server import ServerThread

    ring = KeyRing.from_entries([admin_key[1]], "fuzz")
    with ServerThread(engine, manage_engine=False, api_keys=ring) as running:
        yield running.url


def steer_generation(body, n: int, positive: bool) -> None:
    """Keep generation short (any token budget becomes at most ``MAX_TOKENS``; none set: ``MAX_TOKENS``) and,
    for valid cases, make most of them reach the model: random model names would all stop at the 404, so the
    model is cycled through the served ones and every other case gets a real question; every other field stays
    as generated (sampling, stop strings, streaming, seeds, extension fields)."""
    if not isinstance(body, dict):
        return
    if positive and ("messages" in body or "prompt" in body):
        body["model"] = MODELS[n % len(MODELS)]
        body.pop("adapters", None)
        if body["model"] != "auto":
            body.pop("top_k", None)
        if n % 2 == 0 and "messages" in body:
            body["messages"] = [{"role": "user", "content": "What is the capital of Peru?"}]
        elif n % 2 == 0:
            body["prompt"] = "The capital of Peru is"
    for field in ("max_tokens", "max_completion_tokens"):
        if (
            isinstance(body.get(field), int)
            and not isinstance(body[field], bool)
            and body[field] > MAX_TOKENS
        ):
            body[field] = MAX_TOKENS
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", MAX_TOKENS)


def fuzz(operation, positive: bool, url: str, headers: dict, counter: list[int]) -> str | None:
    """Run ``EXAMPLES`` generated cases of one operation; the first failure found (not shrunk), or ``None``."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    mode = GenerationMode.POSITIVE if positive else GenerationMode.NEGATIVE

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        counter[0] += 1
        steer_generation(case.body, counter[0], positive)
        response = case.call(base_url=url, headers=headers, timeout=600)
        sent = (case.method, case.formatted_path, case.query, case.body)
        assert response.status_code < 500, (*sent, response.text)
        if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
            error = response.json()["error"]
            assert error["message"] and error["type"], (*sent, error)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (a route without parameters or body)
        assert not positive, operation.label
    except Exception as err:  # an AssertionError, or hypothesis's report of one it could not reproduce
        return f"{type(err).__name__}: {err}"[:3000]
    return None


def test_no_request_gets_a_server_error(fuzz_url, admin_key):
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    headers = {"Authorization": f"Bearer {admin_key[0]}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    counter = [0]
    failures, seconds = {}, {}
    for op in operations:
        for positive in (True, False):
            name = f"{op.label} ({'valid' if positive else 'invalid'})"
            started = time.perf_counter()
            failure = fuzz(op, positive, fuzz_url, headers, counter)
            seconds[name] = time.perf_counter() - started
            if failure is not None:
                failures[name] = failure
    print(
        "fuzz seconds:",
        json.dumps({k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}),
    )
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert counter[0] >= len(operations) * EXAMPLES
