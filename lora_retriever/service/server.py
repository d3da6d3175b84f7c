"""Running the app under uvicorn: ``serve(config)`` (the command) and ``ServerThread`` (tests, benchmarks).

``ServerThread`` runs a real uvicorn server on a loopback port in a background thread of this process and
stops it cleanly, so tests and the load benchmark talk HTTP to exactly what ``lora-retriever-serve`` runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lora_retriever.service.config import ServiceConfig
from lora_retriever.service.engine import Engine
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["ServerThread", "serve"]


def serve(config: ServiceConfig, *, log_level: str = "info") -> None:
    """Validate, load the model, and serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from lora_retriever.service.app import create_app

    engine = Engine.from_config(config)
    engine.start()
    try:
        app = create_app(engine)
        logger.info(
            "serving %s with %d adapters on http://%s:%d (OpenAI base_url: http://%s:%d/v1)",
            engine.base_name,
            len(engine.pool),
            config.host,
            config.port,
            config.host,
            config.port,
        )
        uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()


class ServerThread:
    """A uvicorn server for ``engine`` on ``host``:``port`` (0: a free port) in a daemon thread.

    Use as a context manager, or ``start()`` / ``stop()``; ``url`` is ``http://host:port`` once started.
    The engine's scheduler is started and stopped with the server unless ``manage_engine=False``.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, *, manage_engine: bool = True):
        import uvicorn

        from lora_retriever.service.app import create_app

        self.engine = engine
        self.manage_engine = manage_engine
        config = uvicorn.Config(
            create_app(engine),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        if self.manage_engine:
            self.engine.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port} within {timeout:g} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        if self.manage_engine:
            self.engine.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
