"""A thin client of the inference service, as the HTTP handlers use it.

Every call carries a deadline (``request_timeout``) and the request id, both as
``x-request-id`` metadata and, where the proto has one, in the ``request_id``
field.  ``GenerateStream`` wraps the server stream: ``start()`` waits for the
first event so failures before any token surface as a gRPC status (and become
a proper HTTP status), iteration yields the ``pb.GenerateResponse`` messages
as they arrive (read in place, never converted), ``cancel()`` cancels the
RPC (the service then closes the backend's generator).

Calls also carry ``authorization: Bearer <key>`` when the configuration has
API keys (the front and an in-process service share them; a front started
with ``--grpc-target`` sends its own first key), and, from an in-process
front, the per-process token that lets its calls through while the service
drains.  ``end_calls()`` (shutdown, after the grace period) ends every call
still running: streams and unary calls fail with UNAVAILABLE "server
shutting down", which the handlers turn into their dialect's error.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, AsyncIterator, Awaitable, Optional, Protocol, Sequence

import grpc

from gateway.caller import on_behalf
from gateway.overhead import Overhead
from mlxgate.config import ServerConfig
from mlxgate.grpc_tls import channel_credentials
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Must match backends.gate.FRONT_TOKEN_KEY (the front does not import the service).
FRONT_TOKEN_KEY = "x-mlxgate-front"
SHUTTING_DOWN = "server shutting down"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _shutting_down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details=SHUTTING_DOWN)


def _ended_by_us(ended: bool) -> bool:
    """A CancelledError that came from ``end_calls`` rather than from this
    task being cancelled (a client disconnect)."""
    me = asyncio.current_task()
    return ended and (me is None or not me.cancelling())


def never_ready() -> bool:
    """``EventStream.ready`` of a stream that cannot tell (every event may have to be waited for)."""
    return False


class EventStream(Protocol):
    """What the generation driver (``gateway/generation.py``) and the stream
    writers consume; ``GenerateStream`` implements it."""

    async def start(self) -> pb.GenerateResponse: ...

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]: ...

    def ready(self) -> bool:
        """The next event (or the end) is already here: reading it will not wait."""
        ...

    def cancel(self) -> None: ...


class GenerateStream:
    """One Generate RPC (or another server stream read the same way: PullModel,
    CreateModel).  Use ``start()`` once, then iterate the rest."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, overhead: Optional[Overhead] = None) -> None:
        self._call = call
        self._overhead = overhead
        self._ended = False
        # The in-process channel's call says whether a message is waiting;
        # grpc.aio's cannot (so its streams are written event by event).
        self._ready = getattr(call, "ready", never_ready)

    async def _read(self) -> Any:
        try:
            msg = await self._call.read()
            if self._overhead is not None and msg is not grpc.aio.EOF:
                self._overhead.backend(msg.backend_seconds)
            return msg
        except asyncio.CancelledError:
            if _ended_by_us(self._ended):
                raise _shutting_down() from None
            raise

    def end(self) -> None:
        """Shutdown: fail the stream with UNAVAILABLE "server shutting down"."""
        if not self._call.done():
            self._ended = True
            self._call.cancel()

    async def start(self) -> pb.GenerateResponse:
        """The first event; raises ``grpc.aio.AioRpcError`` when the call failed."""
        msg = await self._read()
        if msg is grpc.aio.EOF:
            # The service always ends with Done; an empty stream breaks the contract.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, details="inference service ended the stream without a result"
            )
        ob = on_behalf()
        if ob is not None and ob.limited:
            ob.take_rate_headers(await self._call.initial_metadata())
        return msg

    async def _rest(self) -> AsyncIterator[pb.GenerateResponse]:
        while True:
            msg = await self._read()
            if msg is grpc.aio.EOF:
                return
            yield msg

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._rest()

    def ready(self) -> bool:
        return self._ready()

    def cancel(self) -> None:
        if not self._call.done():
            self._call.cancel()


class InferenceClient:
    """The stub plus the deadline and request id every call gets."""

    def __init__(
        self,
        channel: Optional[grpc.aio.Channel],
        timeout: float,
        metadata: Sequence[tuple[str, str]] = (),
        stub: Any = None,
        admin_metadata: Optional[Sequence[tuple[str, str]]] = None,
    ) -> None:
        """``stub``: an object with the service's methods, called as
        ``InferenceServiceStub``'s are (the in-process service's local stub);
        default: the generated stub over ``channel``.  ``admin_metadata``:
        what the model-management calls carry instead of ``metadata`` (the
        front's admin key); default ``metadata``."""
        self.channel = channel
        self.stub = stub if stub is not None else pb_grpc.InferenceServiceStub(channel)
        self.timeout = timeout
        self._metadata = tuple(metadata)
        self._admin_metadata = tuple(metadata if admin_metadata is None else admin_metadata)
        self._streams: "weakref.WeakSet[GenerateStream]" = weakref.WeakSet()
        self._unary: dict[grpc.aio.UnaryUnaryCall, bool] = {}  # running call -> ended by end_calls()

    @classmethod
    def connect(
        cls,
        target: str,
        timeout: float,
        *,
        api_key: Optional[str] = None,
        admin_key: Optional[str] = None,
        max_message_bytes: int = ServerConfig.grpc_max_message_bytes,
        front_token: Optional[str] = None,
        local_stub: Any = None,
        tls_ca: str = "",
    ) -> "InferenceClient":
        """A client on a new channel.  ``api_key``: sent as ``authorization:
        Bearer``; ``admin_key``: sent instead on the model-management calls
        (the trust guard lets only admin callers reach them);
        ``front_token``: the in-process service's drain pass;
        ``tls_ca``: a PEM file of roots: the channel uses TLS, checked against them;
        ``local_stub``: the in-process service's stub, called instead of a
        channel to ``target`` (``backends.in_process_channel``)."""
        metadata = []
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        if front_token:
            metadata.append((FRONT_TOKEN_KEY, front_token))
        admin = metadata
        if admin_key:
            admin = [("authorization", f"Bearer {admin_key}"), *(kv for kv in metadata if kv[0] != "authorization")]
        if local_stub is not None:
            return cls(None, timeout, metadata, stub=local_stub, admin_metadata=admin)
        options = channel_options(max_message_bytes)
        if tls_ca:
            channel = grpc.aio.secure_channel(target, channel_credentials(tls_ca, "server.grpc_tls_ca"), options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        return cls(channel, timeout, metadata, admin_metadata=admin)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def end_calls(self) -> int:
        """Shutdown: every call still running fails with UNAVAILABLE "server
        shutting down"; returns how many were ended."""
        streams = [s for s in self._streams if not s._call.done()]
        for s in streams:
            s.end()
        for call in self._unary:
            self._unary[call] = True
            call.cancel()
        return len(streams) + len(self._unary)

    def _md(self, request_id: str) -> tuple[tuple[str, str], ...]:
        ob = on_behalf()
        if ob is None:
            return (("x-request-id", request_id), *self._metadata)
        return (("x-request-id", request_id), *self._metadata, *ob.metadata())

    async def _call(self, call: grpc.aio.UnaryUnaryCall) -> Any:
        self._unary[call] = False
        try:
            result = await call
            ob = on_behalf()
            if ob is not None and ob.limited:
                ob.take_rate_headers(await call.initial_metadata())
            return result
        except asyncio.CancelledError:
            if _ended_by_us(self._unary.get(call, False)):
                raise _shutting_down() from None
            raise
        finally:
            self._unary.pop(call, None)

    def generate(
        self, req: pb.GenerateRequest, request_id: str, overhead: Optional[Overhead] = None
    ) -> GenerateStream:
        """``overhead``: the request's clock (``gateway.overhead``), told the backend's wait."""
        req.request_id = request_id
        call = self.stub.Generate(req, timeout=self.timeout, metadata=self._md(request_id))
        stream = GenerateStream(call, overhead)
        self._streams.add(stream)
        return stream

    def pull_model(self, req: pb.PullModelRequest, request_id: str) -> GenerateStream:
        """A PullModel stream (read as a Generate one: ``start()``, then the
        rest).  No deadline: a download takes as long as it takes; the
        service's idle timeout on the hub and the client's presence bound it."""
        call = self.stub.PullModel(req, timeout=None, metadata=self._md(request_id))
        stream = GenerateStream(call)
        self._streams.add(stream)
        return stream

    def _unary_call(self, method: Any, req: Any, request_id: str) -> Awaitable[Any]:
        return self._call(method(req, timeout=self.timeout, metadata=self._md(request_id)))

    async def embed(self, req: pb.EmbedRequest, request_id: str) -> pb.EmbedResponse:
        req.request_id = request_id
        return await self._unary_call(self.stub.Embed, req, request_id)

    async def count_tokens(self, req: pb.GenerateRequest, request_id: str) -> pb.CountTokensResponse:
        req.request_id = request_id
        return await self._unary_call(self.stub.CountTokens, pb.CountTokensRequest(request=req), request_id)

    async def list_models(self, request_id: str) -> pb.ListModelsResponse:
        return await self._unary_call(self.stub.ListModels, pb.ListModelsRequest(), request_id)

    async def show_model(self, model: str, request_id: str) -> pb.ShowModelResponse:
        return await self._unary_call(self.stub.ShowModel, pb.ShowModelRequest(model=model), request_id)

    async def list_running(self, request_id: str) -> pb.ListRunningResponse:
        return await self._unary_call(self.stub.ListRunning, pb.ListRunningRequest(), request_id)

    async def load_model(self, req: pb.LoadModelRequest, request_id: str) -> pb.LoadModelResponse:
        return await self._unary_call(self.stub.LoadModel, req, request_id)

    async def get_usage(self, req: pb.GetUsageRequest, request_id: str) -> pb.GetUsageResponse:
        return await self._unary_call(self.stub.GetUsage, req, request_id)

    async def unload_model(self, model: str, request_id: str) -> pb.UnloadModelResponse:
        return await self._unary_call(self.stub.UnloadModel, pb.UnloadModelRequest(model=model), request_id)

    # ---------------------------------------------------------------- model management (the admin key)

    def _admin_md(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id), *self._admin_metadata)

    def _admin_call(self, method: Any, req: Any, request_id: str) -> Awaitable[Any]:
        return self._call(method(req, timeout=self.timeout, metadata=self._admin_md(request_id)))

    async def copy_model(self, source: str, destination: str, request_id: str) -> pb.CopyModelResponse:
        req = pb.CopyModelRequest(source=source, destination=destination)
        return await self._admin_call(self.stub.CopyModel, req, request_id)

    async def delete_model(self, model: str, request_id: str) -> pb.DeleteModelResponse:
        return await self._admin_call(self.stub.DeleteModel, pb.DeleteModelRequest(model=model), request_id)

    def create_model(self, req: pb.CreateModelRequest, request_id: str) -> GenerateStream:
        """The progress stream (read as a Generate one: ``start()``, then the
        rest); the caller cancels it when done."""
        return GenerateStream(self.stub.CreateModel(req, timeout=self.timeout, metadata=self._admin_md(request_id)))

    async def has_blob(self, digest: str, request_id: str) -> pb.HasBlobResponse:
        return await self._admin_call(self.stub.HasBlob, pb.HasBlobRequest(digest=digest), request_id)

    async def create_blob(self, digest: str, chunks: AsyncIterator[bytes], request_id: str) -> pb.CreateBlobResponse:
        """Upload a blob: one message per chunk, the digest in each."""

        async def messages() -> AsyncIterator[pb.CreateBlobRequest]:
            async for data in chunks:
                yield pb.CreateBlobRequest(digest=digest, data=data)

        return await self._call(self.stub.CreateBlob(messages(), timeout=self.timeout,
                                                     metadata=self._admin_md(request_id)))

    async def rerank(self, req: pb.RerankRequest, request_id: str) -> pb.RerankResponse:
        req.request_id = request_id
        return await self._unary_call(self.stub.Rerank, req, request_id)

    async def tokenize(self, req: pb.TokenizeRequest, request_id: str) -> pb.TokenizeResponse:
        req.request_id = request_id
        return await self._unary_call(self.stub.Tokenize, req, request_id)

    async def detokenize(self, req: pb.DetokenizeRequest, request_id: str) -> pb.DetokenizeResponse:
        req.request_id = request_id
        return await self._unary_call(self.stub.Detokenize, req, request_id)
