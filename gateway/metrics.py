"""HTTP-side metrics: requests by dialect, route and status; in flight; duration.

The middleware labels a request with its route's *pattern* ("/v1/models/{id}"),
never the raw path, so label values stay bounded.  ``/metrics`` serves every
collector on the registry, the service's too when it runs in this process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import overhead
from gateway.errors import VLLM_PATHS, request_dialect
from mlxgate.prom import Children

log = logging.getLogger(__name__)

PREFIX = "mlxgate"
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dialect_of(request: web.BaseRequest) -> str:
    """The ``dialect`` label: the caller's dialect, "other" off the APIs' paths (/openapi.json)."""
    path = request.path
    if path.startswith("/v1/") or path == "/" or path.startswith("/api/") or path in VLLM_PATHS:
        return request_dialect(request)
    return "other"


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by dialect, route pattern and status code.",
            ["dialect", "route", "status"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight", "HTTP requests being served.", ["dialect"], registry=registry,
            # With several worker processes (prometheus_client's multiprocess
            # mode): the sum over the live ones.  Ignored in one process.
            multiprocess_mode="livesum",
        )
        self.duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "HTTP request duration until the last byte of the response.",
            ["dialect", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            f"{PREFIX}_gateway_overhead_seconds",
            "mlxgate's own time in a generating request: the time to the response's first byte "
            "minus the service's wait on the backend (gateway/overhead.py); also the "
            "x-mlxgate-overhead-ms response header.",
            ["dialect"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.c_requests = Children(self.requests)
        self.c_overhead = Children(self.overhead)
        for d in ("ollama", "openai", "anthropic"):
            self.c_overhead(d)  # a series from the start, so rate() has a zero to begin with
        self.c_in_flight = Children(self.in_flight)
        self.c_duration = Children(self.duration)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/metrics":
            return await handler(request)
        dialect = dialect_of(request)
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        status = 500
        in_flight = self.c_in_flight(dialect)
        in_flight.inc()
        started = time.monotonic()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            in_flight.dec()
            self.c_requests(dialect, route, str(status)).inc()
            self.c_duration(dialect, route).observe(time.monotonic() - started)
            spent = overhead.of(request)
            seconds = spent.settle() if spent is not None else None
            if seconds is not None:
                self.c_overhead(dialect).observe(seconds)


def metrics_handler(registry: CollectorRegistry) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def multiprocess_metrics_handler(
    multiproc_dir: str, fetch_more: Optional[Callable[[], Awaitable[bytes]]] = None
) -> Handler:
    """/metrics of one of several HTTP worker processes (``mlxgate serve
    --workers``): what ``fetch_more`` returns (the inference service's
    metrics, from the parent process), then every worker's HTTP metrics
    summed, from prometheus_client's multiprocess files in ``multiproc_dir``
    (whatever metrics ``HttpMetrics`` holds: counters and histograms add up,
    gauges by their ``multiprocess_mode``)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)

    async def handle(request: web.Request) -> web.Response:
        more = b""
        if fetch_more is not None:
            try:
                more = await fetch_more()
            except Exception as e:  # noqa: BLE001 - the parent is stopping, or gone: serve what is here
                log.warning("/metrics: the inference service's metrics could not be read: %s", e)
        body = more + generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def metrics_app(server_cfg, registry: CollectorRegistry) -> web.Application:
    """/metrics alone (``mlxgate service``'s metrics port), behind the same
    trust guard as the HTTP front: a key unless ``metrics_public``, the Host
    and Origin checks for the address it is bound to (``server_cfg.host``)."""
    from gateway.security import TrustGuard

    guard = TrustGuard(server_cfg)
    app = web.Application(middlewares=[guard.middleware])
    app.on_response_prepare.append(guard.on_response_prepare)
    app.router.add_get("/metrics", metrics_handler(registry))
    return app
