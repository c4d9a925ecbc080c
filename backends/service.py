"""The gRPC inference service: proto in, one Backend (the router) behind it.

Handlers are thin: convert with ``from_pb``, call the backend, convert events
with ``to_pb``.  Backend errors become gRPC statuses carrying their message;
anything unexpected becomes INTERNAL with a generic message (the traceback is
logged, never sent).  When the client cancels, grpc.aio cancels the handler
task; ``aclosing`` then closes the backend's generator so the work stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Protocol, Sequence, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from google.protobuf import message_factory

from backends.base import Backend
from backends.errors import BackendError
from backends.gate import SERVICE_NAME, Gate, GateInterceptor, Malformed, deserializer
from backends.types import Done, EmbedRequest, GenerateRequest, keep_alive_from_pb
from mlxgate.config import ServerConfig
from mlxgate.ports import bind_error, bind_problem
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "InferenceServicer", "RunningService", "start_inference_service"]

T = TypeVar("T")


#: Trailing metadata key carrying ResourceExhausted.retry_after (whole seconds);
#: the HTTP front turns it into a Retry-After header.
RETRY_AFTER_KEY = "retry-after"


async def _abort(context: grpc.aio.ServicerContext, e: BackendError) -> None:
    """End the call with the error's status and message (and retry hint)."""
    retry_after = getattr(e, "retry_after", None)
    if retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(1, math.ceil(retry_after)))),))
    await context.abort(e.code, e.message)


async def _guard(context: grpc.aio.ServicerContext, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``; turn failures into a gRPC status with a clear message."""
    try:
        return await call()
    except BackendError as e:
        await _abort(context, e)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("%s failed", what)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {what}")
    raise AssertionError("unreachable")  # abort() always raises


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Maps the proto service onto one ``Backend``."""

    def __init__(self, backend: Backend, observer: Optional["GenerateObserver"] = None) -> None:
        self.backend = backend
        self.observer = observer

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        if request.WhichOneof("input") is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one of prompt or chat is required")
        try:
            req = GenerateRequest.from_pb(request)
        except BackendError as e:
            await context.abort(e.code, e.message)
        tracker = self.observer.start(req) if self.observer else None
        done: Optional[Done] = None
        error_code: Optional[str] = None
        cancelled = False
        try:
            async with contextlib.aclosing(self.backend.generate(req)) as events:
                async for event in events:
                    if isinstance(event, Done):
                        done = event
                    elif tracker is not None:
                        if event.backend:
                            tracker.answering(event.backend, event.model)
                        tracker.chunk(len(event.token_ids) or 1)
                    yield event.to_pb()
        except BackendError as e:
            # Before or after the first chunk alike: the status ends the stream
            # and carries the message; the front turns it into its dialect.
            error_code = e.code.name
            await _abort(context, e)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            error_code = grpc.StatusCode.INTERNAL.name
            log.exception("Generate failed (request %s)", req.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in Generate")
        finally:
            if tracker is not None:
                tracker.finish(done, error_code, cancelled)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        req = EmbedRequest.from_pb(request)
        result = await _guard(context, "Embed", lambda: self.backend.embed(req))
        return result.to_pb()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = await _guard(context, "ListModels", self.backend.list_models)
        return pb.ListModelsResponse(models=[m.to_pb() for m in models])

    async def ShowModel(
        self, request: pb.ShowModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShowModelResponse:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        show = await _guard(context, "ShowModel", lambda: self.backend.show_model(request.model))
        return show.to_pb()

    async def ListRunning(
        self, request: pb.ListRunningRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunningResponse:
        running = await _guard(context, "ListRunning", self.backend.list_running)
        return pb.ListRunningResponse(models=[m.to_pb() for m in running])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        keep_alive = keep_alive_from_pb(request)
        res = await _guard(context, "LoadModel", lambda: self.backend.load_model(request.model, keep_alive))
        return pb.LoadModelResponse(model=res.model, backend=res.backend, load_duration_ns=res.load_duration_ns)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required")
        was = await _guard(context, "UnloadModel", lambda: self.backend.unload_model(request.model))
        return pb.UnloadModelResponse(model=request.model, was_loaded=was)


class GenerateTracker(Protocol):
    def answering(self, backend: str, model: str) -> None: ...

    def chunk(self, n_tokens: int) -> None: ...

    def finish(self, done: Optional[Done], error_code: Optional[str], cancelled: bool) -> None: ...


class GenerateObserver(Protocol):
    """What the metrics layer implements; ``start`` is called once per Generate."""

    def start(self, req: GenerateRequest) -> GenerateTracker: ...


def _method_handlers(servicer: InferenceServicer, gate: Gate) -> grpc.GenericRpcHandler:
    """The service's handlers, as the generated code would build them, but
    parsing with ``gate.deserializer`` and running each call in ``gate.run``."""

    def unary(behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Any:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await gate.reject_malformed(request, context)
            return await gate.run(behaviour(request, context), context)

        return handle

    def stream(behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Any:
        # A coroutine writing with context.write (not an async generator), so
        # the whole stream runs inside gate.run and end_all() can end it.
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, Malformed):
                await gate.reject_malformed(request, context)

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

    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["InferenceService"].methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            stream(behaviour) if method.server_streaming else unary(behaviour),
            request_deserializer=deserializer(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


@dataclass
class RunningService:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    gate: Gate

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def begin_drain(self) -> None:
        """Health turns NOT_SERVING ("" and the service) and new calls get
        UNAVAILABLE; calls in flight go on."""
        self.gate.begin_drain()
        await self.health.enter_graceful_shutdown()

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
    max_message_bytes: int = ServerConfig.grpc_max_message_bytes,
    front_token: Optional[str] = None,
) -> RunningService:
    """Start the gRPC server; port 0 picks a free port, returned in the result.

    ``api_keys``: when any, InferenceService calls need ``authorization:
    Bearer <key>``.  ``max_message_bytes``: the largest message received or
    sent (larger ones end RESOURCE_EXHAUSTED).  ``front_token``: the token the
    in-process HTTP front sends, admitted while draining.  A port that cannot
    be bound raises ``mlxgate.ports.BindError`` (``PortInUse`` when taken).
    """
    gate = Gate(api_keys, front_token)
    server = grpc.aio.server(
        interceptors=[GateInterceptor(gate)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Exclusive port: a second server on it fails instead of sharing traffic.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((_method_handlers(InferenceServicer(backend, observer), gate),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    # Check first: grpc's own failure says only "Failed to bind" (and logs to stderr).
    problem = bind_problem(host, port)
    if problem is not None:
        raise bind_error("gRPC", host, port, problem)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise bind_error("gRPC", host, port, bind_problem(host, port))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("inference service listening on %s:%d", host, bound)
    return RunningService(server=server, port=bound, health=health_servicer, gate=gate)
