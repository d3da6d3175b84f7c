"""The LoraRetriever service on Ray Serve: replicas each holding an ``Engine``, the same OpenAI routes.

Each replica of the ``lora-retriever`` deployment loads its own ``Engine`` (the model, its pool and retriever,
an adapter cache within the budget) and serves the very app of ``create_app`` through ``serve.ingress``:
every route, error shape, API key check and limit is the embedded server's. Ray's proxy spreads the requests
over the replicas. Inside a replica, concurrent generation requests are coalesced by ``@serve.batch``
(``--max_batch_size``, a window of ``--max_wait_ms``) into one mixture batch, exactly as the embedded
scheduler does (``Engine._run_batch``: one ``generate`` with a routing row per request; requests with
different sampling settings run as separate batches).

Start (local single-node Ray; ``--address auto`` joins a cluster started with ``ray start``)::

    python -m lora_retriever.service.ray_app --pool POOL.json --num_replicas 2     # or: make serve-ray
    curl -s localhost:8000/v1/models

The service's settings resolve as ``lora-retriever serve`` resolves them (flags > ``LORA_RETRIEVER_*`` >
``--config FILE`` > defaults). A Serve config file (``serve deploy``) names
``lora_retriever.service.ray_app:build_app`` with the same
settings as ``args`` (``deploy/serve.yaml``; docs/deploy.md has the multi-node recipe).

What the deployment does not do: jobs (``/train``, ``/evaluate``: run them with ``lora-retriever-serve`` or
the CLIs; here they answer 404), and adapter registration, deletion and merges change the one replica that
took the request (with a shared ``--data_dir`` the others see the new adapter after a redeploy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lora_retriever.service.config import ServiceConfig
from lora_retriever.service.metrics import ServiceMetrics
from lora_retriever.service.scheduler import RequestHandle
from lora_retriever.service.settings import add_settings_flags, load_config
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["DEPLOYMENT_NAME", "RayServeConfig", "ServeBatchScheduler", "build_app", "main", "run"]

#: The Serve application and deployment name (``serve status`` shows it).
DEPLOYMENT_NAME = "lora-retriever"
#: Response header naming the replica that answered (``serve.get_replica_context().replica_tag``).
REPLICA_HEADER = "x-lora-retriever-replica"
_INSTALL = "the Ray Serve deployment needs ray[serve]; install it with: pip install -e '.[ray]'"


@dataclass
class RayServeConfig:
    """How the service is laid out on Ray (the service's own settings stay in ``ServiceConfig``)."""

    num_replicas: int = field(
        default=2, metadata={"help": "replicas of the deployment, each with its own model and adapter cache"}
    )
    replica_cpus: float = field(
        default=1.0,
        metadata={"help": "CPUs Ray reserves per replica; its torch threads = max(1, int(replica_cpus))"},
    )
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join ('auto': the one `ray start --head` started on this machine, or "
            "HOST:6379); default: start a local single-node cluster for this process"
        },
    )
    num_cpus: int | None = field(
        default=None, metadata={"help": "CPUs of the local cluster (default: all; ignored with --address)"}
    )
    object_store_mb: int | None = field(
        default=None,
        metadata={"help": "object store of the local cluster in MB (default: Ray's; ignored with --address)"},
    )

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_replicas, bool)
            or not isinstance(self.num_replicas, int)
            or self.num_replicas < 1
        ):
            raise ValueError(
                f"num_replicas must be a positive integer, got {self.num_replicas!r}; pass --num_replicas N"
            )
        if not self.replica_cpus > 0:
            raise ValueError(f"replica_cpus must be > 0, got {self.replica_cpus!r}; pass --replica_cpus N")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus!r}; pass --num_cpus N")
        if self.object_store_mb is not None and self.object_store_mb < 64:
            raise ValueError(
                f"object_store_mb must be >= 64 (Ray's minimum is about 75 MB), got {self.object_store_mb!r}"
            )

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.replica_cpus))


class ServeBatchScheduler:
    """The ``Scheduler`` interface ``Engine`` and the app use, with ``@serve.batch`` doing the coalescing.

    ``submit`` (on the replica's event loop) queues a request into a ``serve.batch`` handler; each batch Ray
    forms (``max_batch_size`` requests at most, ``max_wait_ms`` after the first) is split by sampling settings
    (``GenerationRequest.batch_key``) and run by ``run_batch`` (``Engine._run_batch``) in a worker thread, so
    the loop keeps streaming tokens and accepting requests meanwhile. Requests the engine hands back
    (``requeue``: their adapters did not fit the cache next to the batch's) join the next batch.
    """

    def __init__(self, run_batch: Any, *, max_batch_size: int, max_wait_ms: float, metrics: ServiceMetrics):
        from ray import serve

        self.run_batch = run_batch
        self.metrics = metrics
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000.0)(
            self._decode
        )
        self._tasks: set[asyncio.Task] = set()
        self._pending = 0
        self._stopping = False

    def start(self) -> None:
        """Nothing to start: Ray runs the batching on the replica's event loop."""

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True

    @property
    def depth(self) -> int:
        return self._pending

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """``serve.batch`` has one window (``max_wait_ms``); there is no preparation wait to extend."""
        yield

    def submit(self, handle: RequestHandle) -> None:
        """Queue ``handle`` (called on its event loop, from a route)."""
        if self._stopping:
            raise RuntimeError("the replica is shutting down; retry later")
        self._pending += 1
        self.metrics.queue_depth.set(self._pending)
        task = asyncio.get_running_loop().create_task(self._batched(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def requeue(self, handles: Sequence[RequestHandle]) -> None:
        """Called from the batch's worker thread: submit ``handles`` again on their loop."""
        for handle in handles:
            handle.loop.call_soon_threadsafe(self.submit, handle)

    async def _decode(self, handles: list[RequestHandle]) -> list[None]:
        self._pending -= len(handles)
        self.metrics.queue_depth.set(self._pending)
        groups: dict[tuple, list[RequestHandle]] = {}
        for handle in handles:
            groups.setdefault(handle.request.batch_key(), []).append(handle)
        for group in groups.values():
            try:
                await asyncio.to_thread(self.run_batch, group)
            except BaseException as err:  # fail what is still open; the next batch runs as usual
                logger.exception("batch of %d request(s) failed", len(group))
                for handle in group:
                    if not handle.finished:
                        handle.fail(err)
        return [None] * len(handles)


class LoraRetrieverReplica:
    """One replica: an ``Engine`` from ``config`` (``Engine.from_config``) whose scheduler is a
    ``ServeBatchScheduler``, and ``create_app(engine)`` as its ASGI app (``__serve_build_asgi_app__``)."""

    def __init__(self, config: ServiceConfig, torch_threads: int = 1):
        import torch

        from lora_retriever.service.engine import Engine

        torch.set_num_threads(torch_threads)
        self.engine = Engine.from_config(config)
        # The engine built a thread scheduler it never started; batching here is Ray's.
        self.engine.scheduler = ServeBatchScheduler(
            self.engine._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            metrics=self.engine.metrics,
        )
        self.engine.start()
        logger.info("replica ready: %s with %d adapters", self.engine.base_name, len(self.engine.pool))

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from lora_retriever.service.app import create_app

        app = create_app(self.engine)
        replica = str(serve.get_replica_context().replica_tag)

        @app.middleware("http")
        async def name_replica(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def application(service: ServiceConfig, layout: RayServeConfig) -> Any:
    """The Serve application: ``layout.num_replicas`` replicas of ``LoraRetrieverReplica`` over ``service``."""
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(_INSTALL) from err

    deployment = serve.deployment(
        serve.ingress()(LoraRetrieverReplica),
        name=DEPLOYMENT_NAME,
        num_replicas=layout.num_replicas,
        ray_actor_options={"num_cpus": layout.replica_cpus},
        # Requests a replica takes at once: enough to fill two batches (one decoding, one forming).
        max_ongoing_requests=2 * service.max_batch_size,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=20,
    )
    return deployment.bind(service, layout.torch_threads)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path:
    lora_retriever.service.ray_app:build_app``): ``args`` holds ``ServiceConfig`` and ``RayServeConfig`` fields
    by name (``address``, ``num_cpus`` and ``object_store_mb`` do not apply: the cluster exists already).

    Raises:
        ValueError: an unknown setting, or an invalid value (as the configs validate them).
    """
    service_names = {f.name for f in fields(ServiceConfig)}
    layout_names = {f.name for f in fields(RayServeConfig)}
    unknown = sorted(set(args) - service_names - layout_names)
    if unknown:
        raise ValueError(
            f"build_app args: unknown setting(s) {unknown}; use ServiceConfig or RayServeConfig field names "
            "(the flags of `python -m lora_retriever.service.ray_app --help`, without the dashes)"
        )
    # The environment and $LORA_RETRIEVER_CONFIG apply here too; ``args`` wins over them, as flags do.
    service = load_config(ServiceConfig, cli={k: v for k, v in args.items() if k in service_names})
    layout = RayServeConfig(**{k: v for k, v in args.items() if k in layout_names})
    return application(service, layout)


def run(service: ServiceConfig, layout: RayServeConfig, *, blocking: bool = True) -> str:
    """Check the settings, join or start a Ray cluster, and run the application; returns the base URL.

    With ``blocking``, serve until interrupted, then shut Serve down (and the local cluster, if started here).
    """
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise ImportError(_INSTALL) from err
    from lora_retriever.service.engine import check_startup

    check_startup(service)  # before Ray starts: a bad pool or data dir is one line, not a replica crash loop
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if not ray.is_initialized():
        local = {} if layout.address else {"num_cpus": layout.num_cpus, "include_dashboard": False}
        if layout.object_store_mb and not layout.address:
            local["object_store_memory"] = layout.object_store_mb * 2**20
        ray.init(address=layout.address, **local)
    serve.start(http_options={"host": service.host, "port": service.port})
    url = f"http://{service.host}:{service.port}"
    serve.run(application(service, layout), name=DEPLOYMENT_NAME, route_prefix="/")
    logger.info(
        "serving %d replica(s) of %s on %s (OpenAI base_url: %s/v1)",
        layout.num_replicas,
        service.served_model_name(),
        url,
        url,
    )
    if blocking:
        try:
            while True:  # until Ctrl-C / SIGTERM
                time.sleep(3600)
        finally:
            serve.shutdown()
            if not layout.address:
                ray.shutdown()
    return url


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``ServiceConfig`` (with ``--config FILE`` and ``LORA_RETRIEVER_*``, as ``lora-retriever serve``)
    and of ``RayServeConfig``."""
    from lora_retriever.cli.args import command_parser

    parser = command_parser(__doc__, ServiceConfig, RayServeConfig)
    add_settings_flags(parser, ServiceConfig)  # flags > LORA_RETRIEVER_* > --config file > defaults
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[ServiceConfig, RayServeConfig]:
    """The service's settings resolved as the embedded server resolves them, and the Ray layout from its flags."""
    from lora_retriever.cli.args import config_from_args, config_kwargs

    service = load_config(ServiceConfig, cli=config_kwargs(ServiceConfig, args), config_file=args.config)
    return service, config_from_args(RayServeConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    from lora_retriever.cli.errors import run_cli

    def command(args: argparse.Namespace) -> int:
        run(*configs_from_args(args))
        return 0

    return run_cli(build_parser(), command, argv)


if __name__ == "__main__":
    sys.exit(main())
