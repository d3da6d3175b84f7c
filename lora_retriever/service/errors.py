"""``ServiceError``: a request the service refuses, with the HTTP status and OpenAI error fields."""

from __future__ import annotations

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status``, OpenAI error ``type``, the offending ``param``, and
    response ``headers`` (e.g. ``WWW-Authenticate`` on a 401)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers
