"""The composition root: backends → router → gRPC service → HTTP front.

``Stack`` starts the pieces a Config asks for, drains them and stops them in
reverse order; ``mlxgate_cli/serve.py`` runs it until SIGINT/SIGTERM.  Tests
start the same Stack on port 0, so what they exercise is what ``mlxgate
serve`` runs.

Ports are checked before anything starts: a port that is taken raises
``mlxgate.ports.PortInUse`` (``mlxgate_cli.main`` prints its one line and exits 2).

Shutdown on SIGTERM/SIGINT (``Stack.drain``): gRPC health turns NOT_SERVING,
new gRPC calls get UNAVAILABLE and new HTTP requests 503 with Retry-After;
requests and streams in flight run on for up to ``server.shutdown_grace``
seconds, then are ended with an error; then the servers stop and the
backends close.  A second signal ends the wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry

from backends.metrics import BackendCollector, MemoryCollector, PullMetrics, ServiceMetrics
from backends.routing import REASONS
from backends.service import RunningService, start_inference_service
from backends.spend import Spend
from backends.spend.service import SpendObserver
from mlxgate.config import Config
from mlxgate.grpc_tls import server_credentials
from mlxgate.keyring import KeyRing
from mlxgate.ports import bind_error, check_free
from mlxgate_cli.shutdown import STOP_TIMEOUT, first_done

if TYPE_CHECKING:
    from backends.models.pull import Puller
    from backends.routing import Router
    from gateway.app import RunningHTTP

log = logging.getLogger(__name__)


def ensure_default_model(config: Config) -> None:
    """On a fresh machine there is no model: serve the generated test model
    from the data folder (``backends.mlx.bootstrap``; never the models dir)."""
    if not (config.mlx.enabled and config.mlx.bootstrap_test_model):
        return
    from backends.mlx.bootstrap import ensure_test_model

    ensure_test_model(config.mlx, config.data_path())


def log_notes(config: Config) -> None:
    """What loading the configuration noticed (an ignored OLLAMA_MODELS, ...)."""
    for note in config.notes:
        log.warning("%s", note)


@dataclass
class Stack:
    """The running pieces of one mlxgate process."""

    config: Config
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    router: Optional[Router] = None
    service: Optional[RunningService] = None
    http: Optional[RunningHTTP] = None
    #: ``mlxgate service``'s own /metrics server.
    metrics_http: Optional[RunningHTTP] = None
    service_metrics: Optional[ServiceMetrics] = None
    #: Pulls models into the MLX engine's store (PullModel); None without MLX.
    puller: Optional[Puller] = None
    #: Usage, budgets and per-key limits (``backends/spend``); its ledger is
    #: flushed by ``stop()`` after the service has stopped.
    spend: Optional[Spend] = None
    #: Lets the in-process front's gRPC calls through while the service drains.
    front_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def grpc_target(self) -> str:
        if self.service is not None:
            return f"{self.config.server.grpc_host}:{self.service.port}"
        assert self.config.server.grpc_target
        return self.config.server.grpc_target

    @property
    def http_url(self) -> str:
        assert self.http is not None
        return f"http://{self.config.server.host}:{self.http.port}"

    async def start_service(
        self,
        env: Mapping[str, str],
        process: str = "mlxgate",
        unix_path: Optional[str] = None,
        other_memory: Optional[Callable[[], Mapping[str, int]]] = None,
    ) -> None:
        """``process`` labels this process's memory: "mlxgate" (front and
        service together) or "service" (``mlxgate service``, or the parent of
        ``serve --workers``).  ``unix_path``: also listen there (the workers'
        channel); ``other_memory``: the workers' memory, by process label."""
        from mlxgate_cli.factory import build_model_management, build_puller, build_router

        self.service_metrics = ServiceMetrics(self.registry)
        keyring = KeyRing.from_server(self.config.server)
        self.spend = Spend(self.config, keyring, self.registry)
        await self.spend.start()
        self.router = build_router(self.config, env, observer=self.service_metrics, budgets=self.spend)
        self.service_metrics.init_backends([b.name for b in self.router.backends], self.router.fallback_orders(),
                                           reasons=REASONS)
        await self.router.start()  # remote services' health watches
        mlx = self.router.mlx_backend
        if mlx is not None:
            mlx.observer = self.service_metrics  # queue-wait histogram
        self.registry.register(
            MemoryCollector(process, mlx.memory_snapshot if mlx is not None else None, other_memory)
        )
        router = self.router
        self.registry.register(BackendCollector(lambda: router.in_flight, router.health))
        models = build_model_management(self.router)
        if models is not None:
            await models.start()
        self.puller = build_puller(self.config, self.router, observer=PullMetrics(self.registry), models=models)
        cfg = self.config.server
        self.service = await start_inference_service(
            self.router,
            host=cfg.grpc_host,
            port=cfg.grpc_port,
            observer=self.service_metrics,
            api_keys=cfg.api_keys,
            admin_keys=cfg.admin_keys,
            max_message_bytes=cfg.grpc_max_message_bytes,
            front_token=self.front_token,
            unix_path=unix_path,
            tls=server_credentials(cfg.grpc_tls_cert, cfg.grpc_tls_key) if cfg.grpc_tls_cert else None,
            puller=self.puller,
            models=models,
            keyring=keyring,
            spend=SpendObserver(self.spend),
        )
        if mlx is not None and getattr(mlx, "cluster", None) is not None:
            self._watch_cluster(mlx)

    def _watch_cluster(self, mlx) -> None:
        """A distributed MLX engine: its ranks on /metrics, and health
        NOT_SERVING once it loses one (``backends/mlx/distributed/``)."""
        from backends.metrics import DistributedCollector

        self.registry.register(DistributedCollector(mlx.distributed_status))
        loop = asyncio.get_running_loop()
        service = self.service

        def broken(reason: str) -> None:  # the watchdog's thread
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(service.set_not_serving()))

        mlx.cluster.on_broken.append(broken)
        if mlx.cluster.broken is not None:
            broken(mlx.cluster.broken)

    async def start_front(self) -> None:
        from gateway.app import create_app, start_http
        from gateway.metrics import HttpMetrics, metrics_handler

        http_metrics = HttpMetrics(self.registry)
        if self.service is None:
            # Front only: this process's memory still shows on its /metrics.
            self.registry.register(MemoryCollector("front", None))
        cfg = self.config.server
        in_process = self.service is not None and cfg.front_channel == "in-process"
        app = create_app(
            cfg,
            self.grpc_target,
            extra_middlewares=[http_metrics.middleware],
            front_token=self.front_token if self.service is not None else None,
            local_stub=self.service.local_stub() if in_process else None,
        )
        app.router.add_get("/metrics", metrics_handler(self.registry))
        try:
            self.http = await start_http(app, cfg.host, cfg.port, shutdown_timeout=STOP_TIMEOUT)
        except OSError as e:
            raise bind_error("HTTP", cfg.host, cfg.port, e) from None
        log.info("HTTP front on %s (gRPC service %s%s)", self.http_url, self.grpc_target,
                 ", called in-process" if in_process else "")

    async def drain(self, grace: float, hurry: Optional[asyncio.Event] = None) -> None:
        """Refuse new work, let what is in flight finish for up to ``grace``
        seconds (or until ``hurry`` is set), then end what is left with an
        error.  ``stop()`` follows."""
        from gateway.app import begin_drain, end_calls, wait_idle

        app = self.http.app if self.http is not None else None
        if app is not None:
            begin_drain(app)
        if self.service is not None:
            await self.service.begin_drain()
        log.info("shutting down: refusing new requests, waiting up to %.0f s for those in flight", grace)

        async def idle() -> None:
            if app is not None:
                await wait_idle(app, None)
            if self.service is not None:
                await self.service.wait_idle(None)

        started = time.monotonic()
        await first_done(asyncio.wait_for(idle(), grace), *([hurry.wait()] if hurry is not None else []))
        front_calls = end_calls(app) if app is not None else 0
        service_calls = self.service.end_calls() if self.service is not None else 0
        if front_calls or service_calls:
            log.warning(
                "shutdown: after %.1f s, ended the calls still running (%d of the HTTP front, %d on the service)",
                time.monotonic() - started,
                front_calls,
                service_calls,
            )
            # Let their handlers write the error lines.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(idle(), STOP_TIMEOUT)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        if self.service is not None:
            await self.service.stop(grace=STOP_TIMEOUT)
        if self.puller is not None:
            await self.puller.close()
        if self.router is not None:
            await self.router.close()
        if self.spend is not None:
            await self.spend.close()


def check_ports(config: Config, front: bool = True) -> None:
    """Fail before anything starts when a port is taken (``PortInUse``)."""
    s = config.server
    if front:
        check_free("HTTP", s.host, s.port)
    if not s.grpc_target:
        check_free("gRPC", s.grpc_host, s.grpc_port)


async def start_stack(config: Config, env: Mapping[str, str], front: bool = True) -> Stack:
    check_ports(config, front)
    log_notes(config)
    stack = Stack(config)
    try:
        if not config.server.grpc_target:
            ensure_default_model(config)
            await stack.start_service(env, process="mlxgate" if front else "service")
        if front:
            await stack.start_front()
    except BaseException:
        await stack.stop()
        raise
    return stack
