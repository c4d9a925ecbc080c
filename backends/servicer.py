"""The servicer: each InferenceService method onto one Backend (the router).

Handlers are thin: accept the request (``accept``: checked against the
contract and converted in one pass), call the backend, convert events with
``to_pb``.  Backend
errors become gRPC statuses carrying their (capped) message; anything
unexpected becomes INTERNAL with a generic message (the traceback is logged,
never sent).  When the client cancels, grpc.aio cancels the handler task;
``aclosing`` then closes the backend's generator so the work stops.  The
server around it (keys, drain, the method table) is ``backends/service.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional, Protocol, TypeVar

import grpc

from backends import accept
from backends.base import Backend
from backends.errors import RETRY_AFTER_KEY, BackendError, Internal, InvalidArgument, Unimplemented, retry_trailers
from backends.gate import Malformed
from backends.spend.service import SpendObserver, both
from backends.proto_values import keep_alive_from_pb
from backends.types import Done, GenerateRequest
from mlxgate.limits import clip
from mlxgate.memory import trim_after_large
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from backends.models.manage import ModelManagement

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")
R = TypeVar("R")


def _fail(context: grpc.aio.ServicerContext, e: BackendError) -> None:
    """Set the call's final status from a backend error (and its retry hint).

    The handler then returns.  ``context.abort()`` is not used: grpc.aio keeps
    the AbortError, and with it the request, alive after the call (seen as
    ~60 MB of RSS kept per aborted 25 MB request, grpcio 1.85); a status set
    on the context and a plain return keep nothing.
    """
    retry_after = getattr(e, "retry_after", None)
    trailers = tuple(getattr(e, "trailers", ())) + retry_trailers(e)  # a spend limit's kind, x-ratelimit-*
    if retry_after is not None:
        trailers = ((RETRY_AFTER_KEY, str(max(1, math.ceil(retry_after)))), *trailers)
    if trailers:
        context.set_trailing_metadata(trailers)
    context.set_code(e.code)
    # The message travels in gRPC metadata, which is bounded: an overlong one
    # would turn the answer into a transport error.
    context.set_details(clip(e.message))


async def _guard(
    context: grpc.aio.ServicerContext, what: str, call: Callable[[], Awaitable[T]]
) -> Optional[T]:
    """Run ``call``; on failure set a gRPC status with a clear message and return None."""
    try:
        return await call()
    except BackendError as e:
        _fail(context, e)
    except Exception:
        log.exception("%s failed", what)
        _fail(context, Internal(f"internal error in {what}"))
    return None


async def _streamed(context: grpc.aio.ServicerContext, what: str, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """``stream``'s items (a progress stream: pull, create); a failure ends
    the call with a clear status, as ``_guard`` does for a unary call."""
    try:
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item
    except BackendError as e:
        _fail(context, e)
    except Exception:
        log.exception("%s failed", what)
        _fail(context, Internal(f"internal error in {what}"))


def _checked(context: grpc.aio.ServicerContext, check: Callable[[], None]) -> bool:
    """Run a validation; False (status set) when the request is outside the contract."""
    try:
        check()
    except BackendError as e:
        _fail(context, e)
        return False
    return True


def _accepted(context: grpc.aio.ServicerContext, size: int, message: M,
              accepted: Callable[[M], T]) -> Optional[T]:
    """The domain request of a call's ``message`` (``size`` bytes), as the
    accept step gives it; None, with the status set and a large message's
    memory handed back, when it is outside the contract."""
    try:
        return accepted(message)
    except BackendError as e:
        _fail(context, e)
        trim_after_large(size)
        return None


async def _answered(context: grpc.aio.ServicerContext, size: int, what: str,
                    call: Callable[[], Awaitable[Any]], empty: R) -> R:
    """The reply of a unary call that was accepted: ``call``'s result as its
    message, or ``empty`` with the status set; then a large request's memory
    is handed back."""
    try:
        result = await _guard(context, what, call)
    finally:
        trim_after_large(size)
    return result.to_pb() if result is not None else empty


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Maps the proto service onto one ``Backend`` (and the model-management
    RPCs onto ``models``, when this process manages models: ``backends.models``)."""

    def __init__(self, backend: Backend, observer: Optional["GenerateObserver"] = None,
                 puller: Optional["ModelPuller"] = None, models: Optional["ModelManagement"] = None,
                 spend: Optional[SpendObserver] = None) -> None:
        self.backend = backend
        #: ``backends.models.pull.Puller`` (PullModel); None: no MLX engine here.
        self.puller = puller
        #: Copy, delete, create and blobs (``backends.models.manage``); None: no MLX engine here.
        self.models = models
        #: Usage, budgets and per-key limits (``backends/spend``); None: not kept.
        self.spend = spend
        self.observer = both(observer, spend)

    def _with_settings(self, req: GenerateRequest) -> GenerateRequest:
        """The accepted request with a managed model's own settings (system,
        parameters, messages) where the request gives none
        (``backends.models.settings``), for every caller alike."""
        stored = self.models.settings(req.model) if self.models is not None else None
        if stored is None:
            return req
        from backends.models.settings import apply

        return apply(req, stored)

    async def _admitted(self, context: grpc.aio.ServicerContext, model: str) -> bool:
        """The caller's key may use ``model`` now (``backends/spend``); else the status is set."""
        if self.spend is None:
            return True
        try:
            headers = self.spend.admit(model)
        except BackendError as e:
            _fail(context, e)
            return False
        if headers:
            await context.send_initial_metadata(tuple(headers.items()))
        return True

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        size = request.ByteSize()
        req = _accepted(context, size, request, lambda m: self._with_settings(accept.generate(m)))
        del request  # the domain request holds what is needed
        if req is None or not await self._admitted(context, req.model):
            return
        tracker = self.observer.start(req) if self.observer else None
        done: Optional[Done] = None
        error_code: Optional[str] = None
        cancelled = False
        try:
            async with contextlib.aclosing(self.backend.generate(req)) as events:
                # The time spent waiting on the backend travels with each event,
                # so the front can tell its own overhead from the backend's time.
                waited = 0.0
                next_event = events.__anext__
                while True:
                    t0 = time.perf_counter()
                    try:
                        event = await next_event()
                    except StopAsyncIteration:
                        break
                    waited += time.perf_counter() - t0
                    if isinstance(event, Done):
                        done = event
                    elif tracker is not None:
                        if event.backend:
                            tracker.answering(event.backend, event.model)
                        tracker.chunk(len(event.token_ids) or 1)
                    message = event.to_pb()
                    message.backend_seconds = waited
                    yield message
        except BackendError as e:
            # Before or after the first chunk alike: the status ends the stream
            # and carries the message; the front turns it into its dialect.
            error_code = e.code.name
            _fail(context, e)
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio cancels the handler's task (CancelledError here) or,
            # when the cancel lands while it writes a response, closes this
            # generator at its yield (GeneratorExit): a cancellation either way.
            cancelled = True
            raise
        except Exception:
            error_code = grpc.StatusCode.INTERNAL.name
            log.exception("Generate failed (request %s)", req.request_id)
            _fail(context, Internal("internal error in Generate"))
        finally:
            if tracker is not None:
                tracker.finish(done, error_code, cancelled)
            del req
            trim_after_large(size)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        size = request.ByteSize()
        req = _accepted(context, size, request, accept.embed)
        del request  # the domain request holds what is needed
        if req is None or not await self._admitted(context, req.model):
            return pb.EmbedResponse()

        async def embed() -> Any:
            result = await self.backend.embed(req)
            if self.spend is not None:
                self.spend.embedded(result)
            return result

        return await _answered(context, size, "Embed", embed, pb.EmbedResponse())

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        size = request.ByteSize()
        req = _accepted(context, size, request, lambda m: self._with_settings(accept.count_tokens(m)))
        del request
        if req is None:
            return pb.CountTokensResponse()
        return await _answered(context, size, "CountTokens", lambda: self.backend.count_tokens(req),
                               pb.CountTokensResponse())

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = await _guard(context, "ListModels", self.backend.list_models)
        return pb.ListModelsResponse(models=[m.to_pb() for m in models or []])

    async def ShowModel(
        self, request: pb.ShowModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShowModelResponse:
        if not _checked(context, lambda: accept.model(request.model)):
            return pb.ShowModelResponse()
        show = await _guard(context, "ShowModel", lambda: self.backend.show_model(request.model))
        return show.to_pb() if show is not None else pb.ShowModelResponse()

    async def ListRunning(
        self, request: pb.ListRunningRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunningResponse:
        running = await _guard(context, "ListRunning", self.backend.list_running)
        return pb.ListRunningResponse(models=[m.to_pb() for m in running or []])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        if not _checked(context, lambda: accept.model(request.model)):
            return pb.LoadModelResponse()
        try:
            keep_alive = keep_alive_from_pb(request)
        except BackendError as e:
            _fail(context, e)
            return pb.LoadModelResponse()
        res = await _guard(context, "LoadModel", lambda: self.backend.load_model(request.model, keep_alive))
        if res is None:
            return pb.LoadModelResponse()
        return res.to_pb()

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        if not _checked(context, lambda: accept.model(request.model)):
            return pb.UnloadModelResponse()
        was = await _guard(context, "UnloadModel", lambda: self.backend.unload_model(request.model))
        return pb.UnloadModelResponse(model=request.model, was_loaded=bool(was))

    # ---------------------------------------------------------------- model management

    def _managing(self) -> "ModelManagement":
        if self.models is None:
            raise Unimplemented("this service manages no models (its MLX engine is off)")
        return self.models

    async def _forget_loaded(self, name: str) -> None:
        """A name that changed meaning is unloaded, so its next use loads the new one."""
        with contextlib.suppress(Exception):
            await self.backend.unload_model(name)

    async def CopyModel(self, request: pb.CopyModelRequest, context: grpc.aio.ServicerContext) -> pb.CopyModelResponse:
        async def copy() -> str:
            name = await self._managing().copy(request.source, request.destination)
            await self._forget_loaded(name)
            return name

        name = await _guard(context, "CopyModel", copy)
        return pb.CopyModelResponse(model=name or "")

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        async def delete() -> str:
            name = await self._managing().delete(request.model)
            await self._forget_loaded(name)
            return name

        name = await _guard(context, "DeleteModel", delete)
        return pb.DeleteModelResponse(model=name or "")

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CreateModelProgress]:
        from backends.models.convert import create_spec

        async def steps() -> AsyncIterator[pb.CreateModelProgress]:
            spec = create_spec(request)
            async with contextlib.aclosing(self._managing().create(spec)) as progress:
                async for p in progress:
                    if p.status == "success":
                        await self._forget_loaded(spec.model)
                    yield pb.CreateModelProgress(status=p.status, digest=p.digest, total=p.total,
                                                 completed=p.completed)

        async with contextlib.aclosing(_streamed(context, "CreateModel", steps())) as messages:
            async for m in messages:
                yield m

    async def HasBlob(self, request: pb.HasBlobRequest, context: grpc.aio.ServicerContext) -> pb.HasBlobResponse:
        async def has() -> Optional[int]:
            return await asyncio.to_thread(self._managing().has_blob, request.digest)

        try:
            size = await has()
        except BackendError as e:
            _fail(context, e)
            return pb.HasBlobResponse()
        return pb.HasBlobResponse(exists=size is not None, size=size or 0)

    async def CreateBlob(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> pb.CreateBlobResponse:
        from backends.models.blobs import receive_blob

        first: dict[str, str] = {}

        async def chunks() -> AsyncIterator[bytes]:
            async for m in requests:
                if isinstance(m, Malformed):
                    raise InvalidArgument(f"malformed {m.type_name}: {m.reason}")
                if not first:
                    first["digest"] = m.digest
                elif m.digest and m.digest != first["digest"]:
                    raise InvalidArgument("digest changed within one upload")
                yield m.data

        async def upload() -> int:
            models = self._managing()
            stream = chunks()
            head = await anext(stream, None)
            if not first.get("digest"):
                raise InvalidArgument("digest is required in the first message")

            async def rest() -> AsyncIterator[bytes]:
                if head:
                    yield head
                async for data in stream:
                    yield data

            return await receive_blob(models.store, first["digest"], rest())

        size = await _guard(context, "CreateBlob", upload)
        if size is None:
            return pb.CreateBlobResponse()
        return pb.CreateBlobResponse(digest=first.get("digest", ""), size=size)

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullModelResponse]:
        if self.puller is None:
            _fail(context, Unimplemented("pulling models needs the MLX engine, which this service does not run"))
            return
        async with contextlib.aclosing(_streamed(context, "PullModel", self.puller.pull(request.model))) as lines:
            async for line in lines:
                yield line.to_pb()

    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        if isinstance(request, Malformed):  # pragma: no cover - the method handler answers those
            return pb.GetUsageResponse()
        spend = self.spend
        if spend is None:  # a service built without spend (tests, embedders): nothing recorded
            return pb.GetUsageResponse()
        res = await _guard(context, "GetUsage", lambda: spend.usage(request))
        return res if res is not None else pb.GetUsageResponse()

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        size = request.ByteSize()
        req = _accepted(context, size, request, accept.rerank)
        del request
        if req is None:
            return pb.RerankResponse()
        return await _answered(context, size, "Rerank", lambda: self.backend.rerank(req), pb.RerankResponse())

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        size = request.ByteSize()
        req = _accepted(context, size, request, accept.tokenize)
        del request
        if req is None:
            return pb.TokenizeResponse()
        return await _answered(context, size, "Tokenize", lambda: self.backend.tokenize(req), pb.TokenizeResponse())

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        size = request.ByteSize()
        req = _accepted(context, size, request, accept.detokenize)
        del request
        if req is None:
            return pb.DetokenizeResponse()
        return await _answered(context, size, "Detokenize", lambda: self.backend.detokenize(req),
                               pb.DetokenizeResponse())


class ModelPuller(Protocol):
    """What PullModel calls (``backends.models.pull.Puller``)."""

    def pull(self, name: str) -> AsyncIterator[Any]: ...


class GenerateTracker(Protocol):
    def answering(self, backend: str, model: str) -> None: ...

    def chunk(self, n_tokens: int) -> None: ...

    def finish(self, done: Optional[Done], error_code: Optional[str], cancelled: bool) -> None: ...


class GenerateObserver(Protocol):
    """What the metrics layer implements; ``start`` is called once per Generate."""

    def start(self, req: GenerateRequest) -> GenerateTracker: ...
