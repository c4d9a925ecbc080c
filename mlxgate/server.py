"""Process composition: backends → router → gRPC service → HTTP front.

``Stack`` starts the pieces a Config asks for and stops them in reverse
order; ``serve`` runs it until SIGINT/SIGTERM.  Tests start the same Stack on
port 0, so what they exercise is what ``mlxgate serve`` runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry

from backends.metrics import MemoryCollector, ServiceMetrics
from backends.service import RunningService, start_inference_service
from mlxgate.config import Config

if TYPE_CHECKING:
    from backends.router import Router
    from gateway.app import RunningHTTP

log = logging.getLogger(__name__)


def ensure_default_model(config: Config) -> None:
    """On a fresh machine the models directory is empty: write the small test
    model there so ``make run`` has something to serve."""
    if not (config.mlx.enabled and config.mlx.bootstrap_test_model):
        return
    models = config.models_path()
    if models.is_dir() and any((p / "config.json").is_file() for p in models.iterdir()):
        return
    from backends.mlx.testmodel import write_test_model

    log.warning("no models in %s: writing the small test model there (random weights)", models)
    write_test_model(models)


@dataclass
class Stack:
    """The running pieces of one mlxgate process."""

    config: Config
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    router: Optional[Router] = None
    service: Optional[RunningService] = None
    http: Optional[RunningHTTP] = None
    service_metrics: Optional[ServiceMetrics] = None

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

    async def start_service(self, env: Mapping[str, str], process: str = "mlxgate") -> None:
        """``process`` labels this process's memory: "mlxgate" (front and
        service together) or "service" (``mlxgate service``)."""
        from backends.factory import build_router

        self.service_metrics = ServiceMetrics(self.registry)
        self.router = build_router(self.config, env, observer=self.service_metrics)
        mlx = self.router.mlx_backend
        if mlx is not None:
            mlx.observer = self.service_metrics  # queue-wait histogram
        self.registry.register(MemoryCollector(process, mlx.memory_snapshot if mlx is not None else None))
        self.service = await start_inference_service(
            self.router,
            host=self.config.server.grpc_host,
            port=self.config.server.grpc_port,
            observer=self.service_metrics,
        )

    async def start_front(self) -> None:
        from gateway.app import create_app, start_http
        from gateway.metrics import HttpMetrics, metrics_handler

        http_metrics = HttpMetrics(self.registry)
        if self.service is None:
            # Front only: this process's memory still shows on its /metrics.
            self.registry.register(MemoryCollector("front", None))
        app = create_app(self.config.server, self.grpc_target, extra_middlewares=[http_metrics.middleware])
        app.router.add_get("/metrics", metrics_handler(self.registry))
        self.http = await start_http(app, self.config.server.host, self.config.server.port)
        log.info("HTTP front on %s (gRPC service %s)", self.http_url, self.grpc_target)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.service is not None:
            await self.service.stop(grace=2.0)
        if self.router is not None:
            await self.router.close()


async def start_stack(config: Config, env: Mapping[str, str], front: bool = True) -> Stack:
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


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(config: Config, env: Mapping[str, str]) -> None:
    """``mlxgate serve``: front and (unless --grpc-target) the service."""
    stack = await start_stack(config, env)
    print(f"mlxgate: HTTP {stack.http_url}  gRPC {stack.grpc_target}", flush=True)
    try:
        await _until_signalled()
    finally:
        await stack.stop()


async def serve_service_only(config: Config, env: Mapping[str, str]) -> None:
    """``mlxgate service``: the gRPC service with /metrics on its own port."""
    from prometheus_client import start_http_server

    config.server.grpc_target = None
    stack = await start_stack(config, env, front=False)
    start_http_server(config.server.metrics_port, addr=config.server.grpc_host, registry=stack.registry)
    print(
        f"mlxgate: gRPC {stack.grpc_target}  metrics http://{config.server.grpc_host}:{config.server.metrics_port}",
        flush=True,
    )
    try:
        await _until_signalled()
    finally:
        await stack.stop()
