"""Running the app under uvicorn: ``serve(config)`` (the command) and ``ServerThread`` (tests, benchmarks).

``ServerThread`` runs a real uvicorn server on a loopback port in a background thread of this process and
stops it cleanly, so tests and the load benchmark talk HTTP to exactly what ``lora-retriever-serve`` runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from lora_retriever.service.auth import KeyRing
from lora_retriever.service.config import ServiceConfig, is_loopback
from lora_retriever.service.engine import Engine
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["ServerThread", "make_job_runner", "serve"]


def serve(config: ServiceConfig, *, log_level: str = "info") -> None:
    """Validate (the API keys too), load the model, and serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from lora_retriever.service.app import create_app

    keys = KeyRing.from_config(config)
    if not keys:
        logger.warning(
            "no API keys configured: every route, training and adapter deletion included, is open to anyone who "
            "can reach %s:%d%s; `lora-retriever-serve --new_key admin` prints a key to configure",
            config.host,
            config.port,
            "" if is_loopback(config.host) else " (--allow_no_auth on a non-loopback host)",
        )
    else:
        logger.info(
            "API keys: %d configured (%s)", len(keys), ", ".join(sorted({k.scope for k in keys.keys}))
        )
    engine = Engine.from_config(config)
    jobs = make_job_runner(engine)
    engine.start()
    jobs.start()
    try:
        app = create_app(engine, jobs, api_keys=keys)
        url = f"http://{config.host}:{config.port}"
        logger.info(
            "serving %s with %d adapters on %s (OpenAI base_url: %s/v1; dashboard: %s/ui/)",
            engine.base_name,
            len(engine.pool),
            url,
            url,
            url,
        )
        uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        jobs.stop()
        engine.stop()


def make_job_runner(engine: Engine) -> Any:
    """The ``JobRunner`` of ``engine``'s data directory: a finished training is registered in the service's pool
    config by the training itself, so the engine only re-reads its pools."""
    from lora_retriever.service.jobs import JobRunner, JobStore

    def after(job: dict[str, Any]) -> None:
        if job["kind"] == "train":
            with engine.model_lock:
                engine.reload_pool()

    return JobRunner(
        JobStore(engine.config.data_dir), max_workers=engine.config.job_workers, on_finished=after
    )


class ServerThread:
    """A uvicorn server for ``engine`` on ``host``:``port`` (0: a free port) in a daemon thread.

    Use as a context manager, or ``start()`` / ``stop()``; ``url`` is ``http://host:port`` once started.
    The engine's scheduler is started and stopped with the server unless ``manage_engine=False``; ``api_keys``
    as ``create_app`` takes them (default: the engine config's).
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        manage_engine: bool = True,
        jobs: Any | None = None,
        api_keys: KeyRing | None = None,
    ):
        import uvicorn

        from lora_retriever.service.app import create_app

        self.engine = engine
        self.manage_engine = manage_engine
        self.jobs = jobs
        config = uvicorn.Config(
            create_app(engine, jobs, api_keys=api_keys),
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
        if self.jobs is not None:
            self.jobs.start()
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
        if self.jobs is not None:
            self.jobs.stop()
        if self.manage_engine:
            self.engine.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
