"""The gRPC inference service: the server around the servicer
(``backends/servicer.py``: proto in, one Backend, the router, behind it).

``start_inference_service`` builds it: the gate (keys, admin keys, the
drain, malformed messages: ``backends/gate.py``) runs every call; the method
table (``method_handlers``) is what the gRPC server registers and what the
in-process channel (``backends/in_process_channel.py``) calls directly; each
call's deadline, request id and caller are set for the backends that call
further (``backends.call_context``); health and reflection are served beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from google.protobuf import message_factory

from backends import call_context
from backends.base import Backend
from backends.errors import RETRY_AFTER_KEY
from backends.gate import SERVICE_NAME, Gate, GateInterceptor, Malformed, deserializer, metadata_value
from backends.reflection import enable_reflection
from backends.servicer import GenerateObserver, InferenceServicer, ModelPuller
from backends.spend.service import DIALECT_KEY, SpendObserver
from mlxgate.config import ServerConfig
from mlxgate.keyring import KeyRing
from mlxgate.ports import bind_error, bind_problem
from mlxgate.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from backends.models.manage import ModelManagement

log = logging.getLogger(__name__)

__all__ = ["RETRY_AFTER_KEY", "SERVICE_NAME", "InferenceServicer", "RunningService", "start_inference_service"]


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _enter(context: grpc.aio.ServicerContext, gate: Gate) -> None:
    """The call's deadline, request id, whether another mlxgate forwarded
    it, and its caller's key name and dialect, for the router and backends
    that call further (``backends.call_context``); set in the call's task,
    where ``gate.run`` runs the work."""
    metadata = context.invocation_metadata()
    key = gate.identify(metadata) if gate.keyring.required else None
    call_context.enter(context.time_remaining(), metadata_value(metadata, "x-request-id"),
                       metadata_value(metadata, call_context.FORWARDED_KEY) == "1",
                       key.name if key is not None else "", (metadata_value(metadata, DIALECT_KEY) or "")[:16])


@dataclass(frozen=True)
class MethodHandler:
    """One InferenceService method as the service runs it: ``handle(request,
    context)`` (a stream writes with ``context.write``), its message types."""

    handle: Callable[[Any, Any], Awaitable[Any]]
    streaming: bool
    request_type: Any
    response_type: Any
    #: The request is a stream of messages (an upload).
    client_streaming: bool = False


def method_handlers(servicer: InferenceServicer, gate: Gate) -> dict[str, MethodHandler]:
    """The service's handlers by method name, as the generated code would
    build them, but each call running in ``gate.run``.  The gRPC server
    registers them (``_generic_handler``); the in-process channel
    (``backends.in_process_channel``) calls them directly."""

    def unary(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], empty: Any) -> Any:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                gate.reject_malformed(request, context)
                return empty()
            _enter(context, gate)
            result = await gate.run(behaviour(request, context), context)
            # A call ended with a status (refused, shut down) still returns a message.
            return empty() if result is None else result

        return handle

    def stream(behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Any:
        # A coroutine writing with context.write (not an async generator), so
        # the whole stream runs inside gate.run and end_all() can end it.
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, Malformed):
                gate.reject_malformed(request, context)
                return
            _enter(context, gate)

            async def pump() -> None:
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        try:
                            await context.write(response)
                        except asyncio.CancelledError:
                            # Cancelled while sending: the servicer waits at its
                            # yield; let it see the cancellation there, as at any
                            # of its own awaits (it counts it, the backend stops).
                            with contextlib.suppress(BaseException):
                                await responses.athrow(asyncio.CancelledError())
                            raise

            await gate.run(pump(), context)

        return handle

    def upload(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], empty: Any) -> Any:
        # A client stream (CreateBlob): the request is an async iterator of
        # messages, each possibly Malformed (the servicer checks).
        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            _enter(context, gate)
            result = await gate.run(behaviour(requests, context), context)
            return empty() if result is None else result

        return handle

    handlers: dict[str, MethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["InferenceService"].methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            handle = upload(behaviour, response_type)
        elif method.server_streaming:
            handle = stream(behaviour)
        else:
            handle = unary(behaviour, response_type)
        handlers[method.name] = MethodHandler(handle, method.server_streaming, request_type, response_type,
                                              method.client_streaming)
    return handlers


def _generic_handler(handlers: dict[str, MethodHandler]) -> grpc.GenericRpcHandler:
    """The handlers for the gRPC server, parsing with ``gate.deserializer``."""
    rpc: dict[str, grpc.RpcMethodHandler] = {}
    for name, h in handlers.items():
        if h.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        else:
            make = grpc.unary_stream_rpc_method_handler if h.streaming else grpc.unary_unary_rpc_method_handler
        rpc[name] = make(
            h.handle,
            request_deserializer=deserializer(h.request_type),
            response_serializer=h.response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, rpc)


@dataclass
class RunningService:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    gate: Gate
    handlers: dict[str, MethodHandler] = field(default_factory=dict)
    max_message_bytes: int = ServerConfig.grpc_max_message_bytes

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def local_stub(self) -> Any:
        """A stub calling this service's handlers in-process (``backends.in_process_channel``),
        for the HTTP front of the same process."""
        from backends.in_process_channel import LocalStub

        return LocalStub(self.handlers, self.gate, self.max_message_bytes)

    async def begin_drain(self) -> None:
        """Health turns NOT_SERVING ("" and the service) and new calls get
        UNAVAILABLE; calls in flight go on."""
        self.gate.begin_drain()
        await self.health.enter_graceful_shutdown()

    async def set_not_serving(self) -> None:
        """Health NOT_SERVING ("" and the service), new calls still answered
        (they fail over to whatever the router has left): the local engine
        is out of service (a distributed engine lost a rank)."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def wait_idle(self, timeout: Optional[float]) -> bool:
        return await self.gate.wait_idle(timeout)

    def end_calls(self) -> int:
        """End the calls still running with UNAVAILABLE "server shutting down"."""
        return self.gate.end_all()

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)


async def start_inference_service(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    observer: Optional[GenerateObserver] = None,
    *,
    api_keys: Sequence[str] = (),
    admin_keys: Sequence[str] = (),
    max_message_bytes: int = ServerConfig.grpc_max_message_bytes,
    front_token: Optional[str] = None,
    unix_path: Optional[str] = None,
    tls: Optional[grpc.ServerCredentials] = None,
    puller: Optional[ModelPuller] = None,
    models: Optional["ModelManagement"] = None,
    keyring: Optional[KeyRing] = None,
    spend: Optional[SpendObserver] = None,
) -> RunningService:
    """Start the gRPC server; port 0 picks a free port, returned in the result.

    ``api_keys``: when any, InferenceService calls need ``authorization:
    Bearer <key>``; ``admin_keys`` are valid too, and the only keys the
    model-management methods take (``mlxgate.admin``).  ``max_message_bytes``:
    the largest message received or sent (larger ones end RESOURCE_EXHAUSTED).  ``front_token``: the token the
    in-process HTTP front sends, admitted while draining.  ``unix_path``:
    also listen on this Unix-domain socket (``mlxgate serve --workers``: the
    fronts in the worker processes call through it), made readable and
    writable by this user only.  ``tls``: the TCP port speaks TLS with these
    credentials (``mlxgate.grpc_tls``; the Unix socket stays plaintext).
    ``puller``: serves PullModel (``backends.models.pull.Puller``);
    ``models``: the model management the copy/delete/create/blob methods use
    (``backends.models.manage``); None: they answer UNIMPLEMENTED.
    ``keyring``: the key table (default: ``api_keys`` and ``admin_keys``);
    ``spend``: usage, budgets and per-key limits (``backends/spend``).  A
    port that cannot be bound raises ``mlxgate.ports.BindError``
    (``PortInUse`` when taken).
    """
    gate = Gate(api_keys, front_token, keyring if keyring is not None else KeyRing.of(api_keys, admin_keys))
    server = grpc.aio.server(
        interceptors=[GateInterceptor(gate)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Exclusive port: a second server on it fails instead of sharing traffic.
            ("grpc.so_reuseport", 0),
            # Let clients check the connection with HTTP/2 pings every 10 s or
            # more, also while no call runs: a front's remote backend pings
            # every 30 s (backends/remote).  grpc's default (one per 5 minutes
            # without data) answers such pings with GOAWAY "too_many_pings",
            # which fails the calls on the connection.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    handlers = method_handlers(InferenceServicer(backend, observer, puller, models, spend), gate)
    server.add_generic_rpc_handlers((_generic_handler(handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), gate.malformed_warning
    )
    # Check first: grpc's own failure says only "Failed to bind" (and logs to stderr).
    problem = bind_problem(host, port)
    if problem is not None:
        raise bind_error("gRPC", host, port, problem)
    try:
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise bind_error("gRPC", host, port, bind_problem(host, port))
    if unix_path is not None:
        # Owner only: the socket admits the fronts' drain pass (front_token).
        with _umask(0o177):
            if server.add_insecure_port(f"unix:{unix_path}") == 0:
                raise RuntimeError(f"cannot listen for gRPC on unix:{unix_path}")
    await server.start()
    if unix_path is not None and os.path.exists(unix_path):
        os.chmod(unix_path, 0o600)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("inference service listening on %s:%d%s", host, bound, " (TLS)" if tls is not None else "")
    return RunningService(server=server, port=bound, health=health_servicer, gate=gate, handlers=handlers,
                          max_message_bytes=max_message_bytes)
