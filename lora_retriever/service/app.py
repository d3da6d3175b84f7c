"""The HTTP app: OpenAI-compatible generation routes, adapters, retrieval, health and metrics.

``create_app(engine)`` builds the FastAPI app over a started ``Engine``:

=========================== ============================================================================
``POST /v1/chat/completions`` chat, OpenAI-compatible (``stream`` by SSE); ``model`` = base model, one adapter,
                              ``"auto"`` or ``"mixture"`` with ``adapters``
``POST /v1/completions``      plain completion of a prompt (a list of prompts gives one choice each)
``GET /v1/models``            the base model, ``auto``, and every pool adapter
``GET/POST /adapters``        list / register (a server-side PEFT directory; key built now), hot
``POST /adapters/archive``    upload a .tar/.tar.gz/.zip of a PEFT directory (size-limited, links refused)
``DELETE /adapters/{name}``   unload and unregister, hot
``POST /retrieve``            the top-k adapters for some texts
``POST /merge``               fuse adapters (a fusion method) into a new registered adapter
``POST /train``, ``/evaluate`` queue a job (worker process); ``GET /jobs``, ``GET /jobs/{id}``,
                              ``POST /jobs/{id}/cancel``, ``POST /jobs/{id}/resume``
``GET /health``, ``/metrics`` liveness (open to all) and Prometheus text
``GET /whoami``               the scope (and label) of the API key presented
=========================== ============================================================================

API keys (``auth``): with keys configured, every route but ``/health`` (and the OpenAPI docs) needs
``Authorization: Bearer <key>``; registering, uploading, deleting and merging adapters, training, evaluating
and cancelling or resuming jobs need the ``admin`` scope, everything else ``read``. Request bodies are capped
(``max_body_mb``; ``max_upload_mb`` for archives) whether or not the client declares their length.

Every generation response (and the last chunk of a stream) carries ``adapters``: the adapters, weights and
similarities actually used. Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status for anything the client can fix.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_retriever.retriever import RetrievedAdapter
from lora_retriever.service import admin
from lora_retriever.service.auth import ADMIN, READ, ApiKey, KeyRing
from lora_retriever.service.dashboard import mount_dashboard
from lora_retriever.service.engine import AUTO_MODEL, MIXTURE_MODEL, Engine
from lora_retriever.service.errors import ServiceError
from lora_retriever.service.jobs import JobRunner, evaluation_params, resume_params, training_params
from lora_retriever.service.limits import BodyLimit, BodyTooLarge
from lora_retriever.service.scheduler import Completion, GenerationRequest, RequestHandle, TextDelta
from lora_retriever.service.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EvaluateRequest,
    MergeRequest,
    RegisterAdapterRequest,
    RetrieveRequest,
    TrainRequest,
)
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["create_app", "error_body"]

UPLOAD_PATH = "/adapters/archive"
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="api_key",
    description="an API key of the server (scope read or admin): Authorization: Bearer <key>",
)


def error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _adapters_json(adapters: list[RetrievedAdapter]) -> list[dict[str, Any]]:
    def number(x: float) -> float | None:
        return None if x != x else round(float(x), 6)  # NaN (no key / no text) -> null

    return [
        {"name": a.name, "weight": round(float(a.weight), 6), "similarity": number(a.similarity)}
        for a in adapters
    ]


def create_app(engine: Engine, jobs: JobRunner | None = None, *, api_keys: KeyRing | None = None) -> FastAPI:
    """The FastAPI app over ``engine`` and, if given, a ``JobRunner`` (the caller starts and stops both).

    ``api_keys``: the accepted keys (default: those of ``engine.config``; an empty ``KeyRing`` turns auth off).
    """
    app = FastAPI(title="LoraRetriever service", version="0.1.0")
    app.state.engine = engine
    metrics = engine.metrics
    keys = KeyRing.from_config(engine.config) if api_keys is None else api_keys
    config = engine.config

    def body_limit(path: str) -> int:
        return int((config.max_upload_mb if path == UPLOAD_PATH else config.max_body_mb) * 2**20)

    app.add_middleware(
        BodyLimit,
        limit_for=body_limit,
        error_body=lambda message: error_body(message, param="body", code="body_too_large"),
    )

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.inc(endpoint=path, status=str(response.status_code))
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse(
            error_body(err.message, type_=err.type, param=err.param, code=err.code),
            status_code=err.status,
            headers=err.headers,
        )

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return JSONResponse(error_body(err.detail, param="body", code="body_too_large"), status_code=413)

    def scope_required(scope: str) -> Any:
        """A dependency: the presented key's entry (``None`` when auth is off), checked to grant ``scope``."""

        async def check(
            request: Request,
            _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],  # documents the scheme
        ) -> ApiKey | None:
            return keys.authorize(request.headers.get("authorization"), scope)

        return Depends(check)

    read_key = scope_required(READ)
    read, admin_only = [read_key], [scope_required(ADMIN)]

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        # The deepest error is the most specific (a union such as str | list reports one error per branch).
        first = max(err.errors(), key=lambda e: len(e.get("loc", ())), default={})
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error') or first.get('msg')})"
            return JSONResponse(error_body(message, param="body", code="invalid_json"), status_code=400)
        param = _param(first.get("loc", ()))
        message = f"{param}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", type_="server_error"), status_code=500)

    # -- generation -----------------------------------------------------------------------------------------

    async def prepare(
        body: ChatCompletionRequest | CompletionRequest, text: str, ids: list[int]
    ) -> GenerationRequest:
        adapters = await run_in_threadpool(
            engine.resolve_adapters, body.model, body.adapter_pairs(), text, top_k=body.top_k
        )
        limit = engine.config.max_tokens_limit
        max_tokens = (
            getattr(body, "max_completion_tokens", None)
            or body.max_tokens
            or engine.config.default_max_tokens
        )
        if max_tokens > limit:
            raise ServiceError(
                f"max_tokens {max_tokens} exceeds this server's limit of {limit}", param="max_tokens"
            )
        return GenerationRequest(
            prompt_ids=ids,
            adapters=adapters,
            max_tokens=max_tokens,
            temperature=body.sampling_temperature(),
            top_p=body.top_p,
            stop=tuple(body.stop_list()),
            seed=body.seed,
        )

    def submit(request: GenerationRequest) -> RequestHandle:
        import asyncio

        try:
            return engine.submit(request, asyncio.get_running_loop())
        except RuntimeError as err:
            raise ServiceError(str(err), status=503) from err

    def usage(done: list[Completion]) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in done)
        completion = sum(c.completion_tokens for c in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extension(request: GenerationRequest, done: Completion) -> dict[str, Any]:
        return {"batch_size": done.batch_size, "queue_ms": round(done.queue_seconds * 1000, 2)}

    @app.post("/v1/chat/completions", dependencies=read)
    async def chat_completions(body: ChatCompletionRequest):
        messages = []
        for i, message in enumerate(body.messages):
            if isinstance(message.content, list):
                bad = [p.type for p in message.content if p.type != "text"]
                if bad:
                    raise ServiceError(
                        f"messages[{i}] has content of type {bad[0]!r}, but {engine.base_name} is a text-only model; "
                        "send text parts only",
                        param=f"messages.{i}.content",
                    )
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": message.text()})
        user_texts = [m["content"] for m in messages if m["role"] == "user"]
        if not user_texts:
            raise ServiceError("messages holds no user message", param="messages")
        with engine.scheduler.preparing():  # a batch forming now waits for this request (max_prepare_wait_ms)
            ids = await run_in_threadpool(engine.encode_chat, messages)
            request = await prepare(body, user_texts[-1], ids)
            handle = submit(request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(_chat_chunks(handle, head, request, include_usage), handle)
        done = await _result(handle)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": _openai_reason(done),
                    "logprobs": None,
                }
            ],
            "usage": usage([done]),
            "adapters": _adapters_json(request.adapters),
            "lora_retriever": extension(request, done),
        }

    async def _chunks(
        handle: RequestHandle, base: dict, request: GenerationRequest, include_usage: bool, choice
    ):
        """Stream chunks: ``choice(text, finish_reason)`` shapes each; the last one carries the adapters used."""
        async for event in handle.events():
            if isinstance(event, TextDelta):
                yield {**base, "choices": [choice(event.text, None)]}
                continue
            last = {
                **base,
                "choices": [choice(None, _openai_reason(event))],
                "adapters": _adapters_json(request.adapters),
                "lora_retriever": extension(request, event),
            }
            if include_usage:
                last["usage"] = usage([event])
            yield last

    async def _chat_chunks(
        handle: RequestHandle, head: dict, request: GenerationRequest, include_usage: bool
    ):
        base = {**head, "object": "chat.completion.chunk"}
        yield {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }

        def choice(text: str | None, finish: str | None) -> dict:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}

        async for chunk in _chunks(handle, base, request, include_usage, choice):
            yield chunk

    @app.post("/v1/completions", dependencies=read)
    async def completions(body: CompletionRequest):
        prompts = body.prompts()
        if body.stream and len(prompts) > 1:
            raise ServiceError("stream takes one prompt; send one request per prompt", param="prompt")
        requests = []
        with engine.scheduler.preparing():
            for prompt in prompts:
                ids = await run_in_threadpool(engine.encode_prompt, prompt)
                requests.append(await prepare(body, prompt, ids))
            handles = [submit(r) for r in requests]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(_completion_chunks(handles[0], head, requests[0], include_usage), handles[0])
        done = [await _result(h) for h in handles]
        return {
            **head,
            "object": "text_completion",
            "choices": [
                {"index": i, "text": d.text, "finish_reason": _openai_reason(d), "logprobs": None}
                for i, d in enumerate(done)
            ],
            "usage": usage(done),
            "adapters": _adapters_json(requests[0].adapters),
            "choice_adapters": [_adapters_json(r.adapters) for r in requests],
            "lora_retriever": extension(requests[0], done[0]),
        }

    def _completion_chunks(
        handle: RequestHandle, head: dict, request: GenerationRequest, include_usage: bool
    ):
        def choice(text: str | None, finish: str | None) -> dict:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        return _chunks(handle, {**head, "object": "text_completion"}, request, include_usage, choice)

    @app.get("/v1/models", dependencies=read)
    async def models():
        created = int(time.time())
        data = [
            {
                "id": engine.base_name,
                "object": "model",
                "created": created,
                "owned_by": "lora-retriever",
                "kind": "base",
            },
            {
                "id": AUTO_MODEL,
                "object": "model",
                "created": created,
                "owned_by": "lora-retriever",
                "kind": "auto",
            },
            {
                "id": MIXTURE_MODEL,
                "object": "model",
                "created": created,
                "owned_by": "lora-retriever",
                "kind": "mixture",
            },
        ]
        data += [
            {
                "id": a["name"],
                "object": "model",
                "created": created,
                "owned_by": "lora-retriever",
                "kind": "adapter",
            }
            for a in engine.list_adapters()
        ]
        return {"object": "list", "data": data}

    # -- adapters and retrieval -------------------------------------------------------------------------------

    @app.get("/adapters", dependencies=read)
    async def list_adapters():
        return {"adapters": engine.list_adapters()}

    @app.post("/adapters", status_code=201, dependencies=admin_only)
    async def register_adapter(body: RegisterAdapterRequest):
        stored = await run_in_threadpool(
            lambda: admin.register_adapter(
                engine,
                body.name,
                body.path,
                samples=body.samples,
                samples_path=body.samples_path,
                description=body.description,
                pin=body.pin,
            )
        )
        return {"adapter": stored}

    @app.post(UPLOAD_PATH, status_code=201, dependencies=admin_only)
    async def upload_adapter(
        request: Request, name: str, samples: Annotated[list[str], Query()], description: str = ""
    ):
        """Body: a .tar / .tar.gz / .zip of one PEFT adapter directory (size-limited; links and paths that leave
        the folder are refused); ``samples`` (repeatable query parameter) are the texts its key embeds."""
        data = bytearray()
        async for chunk in request.stream():  # BodyLimit stops it past max_upload_mb
            data += chunk
        stored = await run_in_threadpool(
            lambda: admin.register_archive(
                engine, name, bytes(data), samples=samples, description=description
            )
        )
        return {"adapter": stored}

    @app.delete("/adapters/{name}", dependencies=admin_only)
    async def delete_adapter(name: str):
        await run_in_threadpool(admin.delete_adapter, engine, name)
        return {"deleted": name}

    @app.post("/merge", status_code=201, dependencies=admin_only)
    async def merge(body: MergeRequest):
        stored = await run_in_threadpool(
            lambda: admin.merge_adapters(
                engine,
                body.name,
                body.adapter_pairs(),
                method=body.method,
                options=body.options(),
                description=body.description,
            )
        )
        return {"adapter": stored}

    # -- jobs ---------------------------------------------------------------------------------------------------

    def runner() -> JobRunner:
        if jobs is None:
            raise ServiceError("this server runs no jobs (started without a job runner)", status=404)
        return jobs

    @app.post("/train", status_code=202, dependencies=admin_only)
    async def train(body: TrainRequest):
        params = await run_in_threadpool(training_params, engine, body)
        return runner().submit("train", params)

    @app.post("/evaluate", status_code=202, dependencies=admin_only)
    async def evaluate(body: EvaluateRequest):
        params = await run_in_threadpool(evaluation_params, engine, body)
        return runner().submit("evaluate", params)

    @app.get("/jobs", dependencies=read)
    async def list_jobs():
        return {"jobs": runner().store.list()}

    @app.get("/jobs/{job_id}", dependencies=read)
    async def get_job(job_id: str):
        job = runner().view(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id!r}", status=404, param="job_id")
        return job

    @app.post("/jobs/{job_id}/cancel", dependencies=admin_only)
    async def cancel_job(job_id: str):
        try:
            return await run_in_threadpool(runner().cancel, job_id)
        except KeyError:
            raise ServiceError(f"no job {job_id!r}", status=404, param="job_id") from None

    @app.post("/jobs/{job_id}/resume", status_code=202, dependencies=admin_only)
    async def resume_job(job_id: str):
        job = runner().store.get(job_id)
        if job is None:
            raise ServiceError(f"no job {job_id!r}", status=404, param="job_id")
        return runner().submit("train", resume_params(job))

    @app.post("/retrieve", dependencies=read)
    async def retrieve(body: RetrieveRequest):
        try:
            texts = body.texts()
        except ValueError as err:
            raise ServiceError(str(err), param="input") from err
        results = await run_in_threadpool(engine.retrieve, texts, body.top_k, body.weight_mode)
        return {"results": [{"input": t, "adapters": _adapters_json(r)} for t, r in zip(texts, results)]}

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/whoami")
    async def whoami(key: ApiKey | None = read_key):
        """The presented key's scope and label (``auth`` false: no keys are configured, every route is open)."""
        if key is None:
            return {"auth": False, "scope": ADMIN, "label": None}
        return {"auth": True, "scope": key.scope, "label": key.label}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=read)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    mount_dashboard(app, engine, jobs, auth=bool(keys), read=read, admin=admin_only)  # the pages at /ui/
    return app


def _param(loc: tuple) -> str:
    """The field a validation error names, dotted (``messages.0.content``): pydantic's location without the
    ``body`` root and the union-branch tags it inserts (``str``, ``list[ContentPart]``); ``body`` for the whole."""
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or (re.fullmatch(r"[a-z_][a-z0-9_]*", str(p)) and p not in _TYPE_TAGS)
    ]
    return ".".join(parts) or "body"


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _openai_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


async def _result(handle: RequestHandle) -> Completion:
    try:
        return await handle.result()
    except BaseException:
        handle.cancel()
        raise


def _sse(chunks: AsyncIterator[dict], handle: RequestHandle) -> StreamingResponse:
    """Server-sent events: one ``data: <json>`` per chunk, ``data: [DONE]`` at the end; an error after the stream
    began is sent as an ``error`` object (the status is already 200). A client that disconnects cancels its
    request: its row of the batch stops at the next decode step."""

    async def body():
        handle_error = None
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ServiceError as err:
            handle_error = error_body(err.message, type_=err.type, param=err.param, code=err.code)
        except Exception as err:  # the stream has begun: report, don't drop the connection silently
            logger.exception("stream failed")
            handle_error = error_body(f"{type(err).__name__}: {err}", type_="server_error")
        finally:
            if not handle.finished:
                handle.cancel()
        if handle_error is not None:
            yield f"data: {json.dumps(handle_error)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
