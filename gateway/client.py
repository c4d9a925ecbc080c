"""A thin client of the inference service, as the HTTP handlers use it.

Every call carries a deadline (``request_timeout``) and the request id, both as
``x-request-id`` metadata and, where the proto has one, in the ``request_id``
field.  ``GenerateStream`` wraps the server stream: ``start()`` waits for the
first event so failures before any token surface as a gRPC status (and become
a proper HTTP status), iteration yields domain events, ``cancel()`` cancels the
RPC (the service then closes the backend's generator).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Optional, Protocol

import grpc

from backends.types import Event, event_from_pb
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class EventStream(Protocol):
    """What the stream writers consume; ``GenerateStream`` and test fakes implement it."""

    async def start(self) -> Event: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class GenerateStream:
    """One Generate RPC.  Use ``start()`` once, then iterate the rest."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._first: Optional[Event] = None

    async def start(self) -> Event:
        """The first event; raises ``grpc.aio.AioRpcError`` when the call failed."""
        msg = await self._call.read()
        if msg is grpc.aio.EOF:
            # The service always ends with Done; an empty stream breaks the contract.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, details="inference service ended the stream without a result"
            )
        self._first = event_from_pb(msg)
        return self._first

    async def _rest(self) -> AsyncIterator[Event]:
        while True:
            msg = await self._call.read()
            if msg is grpc.aio.EOF:
                return
            yield event_from_pb(msg)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._rest()

    def cancel(self) -> None:
        if not self._call.done():
            self._call.cancel()

    async def collect(self) -> list[Event]:
        """All events, the first included (non-streaming answers)."""
        events = [self._first] if self._first is not None else [await self.start()]
        async for ev in self:
            events.append(ev)
        return events


class InferenceClient:
    """The stub plus the deadline and request id every call gets."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self.channel = channel
        self.stub = pb_grpc.InferenceServiceStub(channel)
        self.timeout = timeout

    @classmethod
    def connect(cls, target: str, timeout: float) -> "InferenceClient":
        return cls(grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS), timeout)

    async def close(self) -> None:
        await self.channel.close()

    def _md(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id),)

    def generate(self, req: pb.GenerateRequest, request_id: str) -> GenerateStream:
        req.request_id = request_id
        call = self.stub.Generate(req, timeout=self.timeout, metadata=self._md(request_id))
        return GenerateStream(call)

    async def embed(self, req: pb.EmbedRequest, request_id: str) -> pb.EmbedResponse:
        req.request_id = request_id
        return await self.stub.Embed(req, timeout=self.timeout, metadata=self._md(request_id))

    async def list_models(self, request_id: str) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._md(request_id))

    async def show_model(self, model: str, request_id: str) -> pb.ShowModelResponse:
        return await self.stub.ShowModel(
            pb.ShowModelRequest(model=model), timeout=self.timeout, metadata=self._md(request_id)
        )

    async def list_running(self, request_id: str) -> pb.ListRunningResponse:
        return await self.stub.ListRunning(pb.ListRunningRequest(), timeout=self.timeout, metadata=self._md(request_id))

    async def load_model(self, req: pb.LoadModelRequest, request_id: str) -> pb.LoadModelResponse:
        return await self.stub.LoadModel(req, timeout=self.timeout, metadata=self._md(request_id))

    async def unload_model(self, model: str, request_id: str) -> pb.UnloadModelResponse:
        return await self.stub.UnloadModel(
            pb.UnloadModelRequest(model=model), timeout=self.timeout, metadata=self._md(request_id)
        )
