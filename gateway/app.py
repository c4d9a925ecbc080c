"""The aiohttp application: the dialects (Ollama, OpenAI with its Responses
API, Anthropic, vLLM's rerank and tokenize) over one inference-service client.

``create_app(server_cfg, grpc_target)`` builds it; the gRPC channel is opened
and closed by a ``cleanup_ctx`` and stored under ``CLIENT_KEY``.  Middlewares
come from ``build_middlewares``: the overhead clock, then what callers (the
CLI's metrics layer) pass with ``extra_middlewares``; then the trust
middleware (``gateway/security.py``: Host, Origin/CORS, API keys), the first
one that may answer; then the drain and the error middleware.  The extra
ones run outside the trust middleware, so they see the final status of
every answer, refusals and errors included; they must only observe (never
read a body or call the service), since they run before the trust check.

Run it with ``start_http``, or pass ``handler_cancellation=True`` to your own
``web.AppRunner``: that is what makes a client disconnect cancel its handler,
whose ``finally`` (``generation.run``'s) cancels the gRPC call and so the
generation.

Shutdown (``gateway.drain``): ``begin_drain(app)`` makes new requests 503
while those in flight go on; ``wait_idle(app, timeout)`` waits for them;
``end_calls(app)`` ends the rest (their streams end with an error line).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional

import grpc
from aiohttp import web

from gateway import caller, imagefetch, model_list, openapi, overhead, usage
from gateway.anthropic import routes as anthropic_routes
from gateway.client import InferenceClient
from gateway.drain import DRAIN_KEY, Drain, drain_middleware
from gateway.errors import ApiError, Dialect, error_response, from_grpc, from_http, internal_error, request_dialect
from gateway.ollama import routes as ollama_routes
from gateway.openai import routes as openai_routes
from gateway.responses import routes as responses_routes
from gateway.responses import stored as responses_stored
from gateway.responses.store import FILENAME as RESPONSES_FILENAME
from gateway.responses.store import ResponseStore
from gateway.rerank import routes as rerank_routes
from gateway.security import TrustGuard
from gateway.serverlog import server_logger
from gateway.state import CLIENT_KEY, REQUEST_ID_HEADER, SERVER_CONFIG_KEY, request_id
from gateway.tokenize import routes as tokenize_routes
from mlxgate.config import ServerConfig
from mlxgate.keyring import every_secret, first
from mlxgate.limits import MAX_MESSAGES
from mlxgate.memory import trim_after_large

log = logging.getLogger(__name__)

#: The header Anthropic's API names its request id with.
ANTHROPIC_REQUEST_ID_HEADER = "request-id"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a status and a body in the caller's dialect."""
    dialect = request_dialect(request)
    rid = request_id(request)
    try:
        return await answer(request, handler, dialect, rid)
    finally:
        # A large body leaves large buffers behind: hand them back.
        trim_after_large(request.content_length or 0)


async def answer(request: web.Request, handler: Handler, dialect: Dialect, rid: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        if e.status >= 500:
            log.warning("%s %s -> %s (request %s): %s", request.method, request.path, e.status, rid, e.message)
        return error_response(e, dialect)
    except grpc.aio.AioRpcError as e:
        err = from_grpc(e, rid)
        log.info("%s %s -> %s (request %s): %s", request.method, request.path, err.status, rid, e.code())
        return error_response(err, dialect)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(from_http(e, request.path), dialect)
    except ConnectionResetError:
        log.info("client went away (request %s)", rid)
        raise
    except Exception:
        log.exception("%s %s failed (request %s)", request.method, request.path, rid)
        return error_response(internal_error(rid), dialect)


def build_middlewares(guard: TrustGuard, extra: Iterable[Middleware] = ()) -> list[Middleware]:
    """Outermost first: the overhead clock, extra (metrics, ...), the trust guard, the drain, the error middleware.

    The guard is first of those that answer (who may call is decided before
    anything else, even during a drain); observers sit outside it so that
    refusals are counted (see ``gateway.security``)."""
    return [overhead.middleware, *extra, guard.middleware, drain_middleware, error_middleware]


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request_id(request)
    response.headers[REQUEST_ID_HEADER] = rid
    if request_dialect(request) == "anthropic":
        # Anthropic's SDKs read the id from "request-id" (APIStatusError.request_id).
        response.headers[ANTHROPIC_REQUEST_ID_HEADER] = rid


def _client_ctx(
    server_cfg: ServerConfig, grpc_target: str, front_token: Optional[str], local_stub: Any
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        c = InferenceClient.connect(
            grpc_target,
            server_cfg.request_timeout,
            api_key=first(every_secret(server_cfg)),
            admin_key=first(server_cfg.admin_keys),
            max_message_bytes=server_cfg.grpc_max_message_bytes,
            front_token=front_token,
            local_stub=local_stub,
            # TLS for a service elsewhere (grpc_target), never for this process's own one.
            tls_ca=server_cfg.grpc_tls_ca if server_cfg.grpc_target else "",
        )
        app[CLIENT_KEY] = c
        try:
            yield
        finally:
            await c.close()

    return ctx


def _store_ctx(store: ResponseStore) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await store.close()

    return ctx


def responses_store(server_cfg: ServerConfig) -> ResponseStore:
    """The Responses API's store under the data directory (opened on first use)."""
    return ResponseStore(
        server_cfg.data_path() / RESPONSES_FILENAME,
        max_count=server_cfg.responses_max_count,
        max_bytes=server_cfg.responses_max_bytes,
        # A stored conversation costs what the same history sent in one body would.
        max_history_bytes=server_cfg.max_body_bytes,
        max_history_items=2 * MAX_MESSAGES,
    )


def create_app(
    server_cfg: ServerConfig,
    grpc_target: str,
    extra_middlewares: Optional[Iterable[Middleware]] = None,
    front_token: Optional[str] = None,
    local_stub: Any = None,
) -> web.Application:
    """``front_token``: sent on every gRPC call so an in-process service
    that is draining still serves the requests this front already accepted.
    ``local_stub``: the in-process service's stub (``backends.in_process_channel``, given
    by the composition root): calls go to it instead of a channel to
    ``grpc_target``."""
    guard = TrustGuard(server_cfg)
    app = web.Application(
        middlewares=build_middlewares(guard, extra_middlewares or ()),
        client_max_size=server_cfg.max_body_bytes,
    )
    app[SERVER_CONFIG_KEY] = server_cfg
    app[DRAIN_KEY] = Drain()
    app.cleanup_ctx.append(_client_ctx(server_cfg, grpc_target, front_token, local_stub))
    imagefetch.install(app, server_cfg)
    store = responses_store(server_cfg)
    app[responses_stored.STORE_KEY] = store
    app.cleanup_ctx.append(_store_ctx(store))
    app.on_response_prepare.append(_echo_request_id)
    app.on_response_prepare.append(overhead.on_response_prepare)
    app.on_response_prepare.append(guard.on_response_prepare)
    app.on_response_prepare.append(caller.on_response_prepare)
    ollama_routes.add_routes(app)
    openai_routes.add_routes(app)
    model_list.add_routes(app)
    responses_routes.add_routes(app)
    anthropic_routes.add_routes(app)
    usage.add_routes(app)
    rerank_routes.add_routes(app)
    tokenize_routes.add_routes(app)
    openapi.add_routes(app)
    return app


def begin_drain(app: web.Application) -> None:
    """New requests get 503 + Retry-After; requests in flight go on."""
    app[DRAIN_KEY].begin()


async def wait_idle(app: web.Application, timeout: Optional[float]) -> bool:
    """Wait for the requests in flight; False when ``timeout`` passed first."""
    return await app[DRAIN_KEY].wait_idle(timeout)


def end_calls(app: web.Application) -> int:
    """End every gRPC call still running (UNAVAILABLE "server shutting down"):
    streams end with their dialect's error line, other requests answer 503."""
    c = app.get(CLIENT_KEY)
    return c.end_calls() if c is not None else 0


@dataclass
class RunningHTTP:
    runner: web.AppRunner
    port: int

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def idle_timeout(app: web.Application) -> float:
    """aiohttp's ``keepalive_timeout`` for ``app``: it runs from the moment a
    connection opens and after each answer, and closes a connection whose
    next request has not fully arrived by then (a client that stalls while
    sending headers included)."""
    cfg = app.get(SERVER_CONFIG_KEY)
    return cfg.http_idle_timeout if cfg is not None else ServerConfig.http_idle_timeout


async def start_http(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 60.0
) -> RunningHTTP:
    """Serve ``app``; port 0 picks a free port, returned in the result.

    ``shutdown_timeout``: how long ``stop()`` lets handlers still running
    finish before cancelling them.  A connection without a whole request
    (stalled headers, or idle between requests) is closed after the app's
    ``http_idle_timeout``.  A request aiohttp cannot parse is answered 400
    with one WARNING line (``gateway.serverlog``).  A failed bind (``OSError``) is raised after the
    runner is cleaned up.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=idle_timeout(app), logger=server_logger())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            bound = addr[1]
            break
    log.info("HTTP front listening on %s:%d", host, bound)
    return RunningHTTP(runner=runner, port=bound)
