"""``BodyLimit``: request body size limits (ASGI middleware), whether the client declares a length or not.

A body whose ``Content-Length`` exceeds the route's limit gets a 413 before anything is read; a body sent
without one (chunked) is counted as it arrives and stops with ``BodyTooLarge`` (a 413) once it passes the limit,
so no route ever holds more than its limit in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodyLimit", "BodyTooLarge"]


class BodyTooLarge(HTTPException):
    """The body passed the route's limit while it was being read (FastAPI lets ``HTTPException`` through)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes; send a smaller body")
        self.limit = limit


class BodyLimit:
    """Limit request bodies to ``limit_for(path)`` bytes; ``error_body(message)`` is the JSON of a 413."""

    def __init__(self, app: Any, limit_for: Callable[[str], int], error_body: Callable[[str], dict]):
        self.app = app
        self.limit_for = limit_for
        self.error_body = error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            message = f"the request body of {int(length)} bytes exceeds the limit of {limit} bytes; send a smaller body"
            await _send_json(send, 413, self.error_body(message))
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
