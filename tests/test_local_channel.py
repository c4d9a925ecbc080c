"""The in-process channel (``backends/in_process_channel.py``) behaves as the gRPC channel.

``mlxgate serve``'s front calls its own service through ``LocalStub``; every
other front and client goes over gRPC.  Each scenario here is run through a
real ``grpc.aio`` stub on the service's port and through the local stub of
the same service, and must give the same messages, status code and details:
answers, every error of the status table, a handler that crashes, deadlines,
keys, the drain, message sizes.  Then what only the local channel does on
its own: flow control (a slow reader holds the backend back) and a reader
that goes away cancels the backend's generator.  The HTTP front is checked on
top: the same request gives the same HTTP answer over either channel.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional

import aiohttp
import grpc
import pytest

from backends.errors import DeadlineExceeded, PermissionDenied, ResourceExhausted, Unavailable
from backends.gate import FRONT_TOKEN_KEY
from backends.in_process_channel import WINDOW
from backends.service import RunningService, start_inference_service
from backends.types import Chunk, Done, Event, GenerateRequest
from gateway.app import create_app, start_http
from mlxgate.config import ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.polling import eventually

KEY = "sk-local-channel"
FRONT_TOKEN = "front-pass"
MAX_BYTES = 64 * 1024


class Backend:
    """Answers by model name; counts what its generators did."""

    name = "scripted"

    def __init__(self) -> None:
        self.yielded = 0
        self.closed = 0
        self.started = 0

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        self.started += 1
        before = {"busy": ResourceExhausted("queue is full", retry_after=6.2),
                  "down": Unavailable("backend is down"), "slow": DeadlineExceeded("took too long"),
                  "denied": PermissionDenied("not allowed")}
        if req.model in before:
            raise before[req.model]
        if req.model == "crash":
            raise RuntimeError("secret internals")
        try:
            if req.model == "hang":
                await asyncio.sleep(3600)
            if req.model == "many":
                for i in range(10 * WINDOW):
                    self.yielded += 1
                    yield Chunk(text=f"t{i} ")
            if req.model == "big":
                yield Chunk(text="x" * (2 * MAX_BYTES))
            yield Chunk(text="hello ")
            if req.model == "dies":
                raise Unavailable("backend went away mid-stream")
            yield Chunk(text="world")
            yield Done(finish_reason="stop", prompt_tokens=2, completion_tokens=2, backend=self.name, model=req.model)
        finally:
            self.closed += 1

    async def embed(self, req: Any) -> Any:
        raise ResourceExhausted("embed queue full")

    async def count_tokens(self, req: Any) -> Any:
        raise Unavailable("no tokenizer")

    async def list_models(self) -> list:
        return []

    async def show_model(self, name: str) -> Any:
        raise Unavailable("no")

    async def list_running(self) -> list:
        return []

    async def load_model(self, name: str, keep_alive: Optional[float]) -> Any:
        raise Unavailable("cannot load")

    async def unload_model(self, name: str) -> bool:
        return False

    async def close(self) -> None:
        pass


class Service:
    def __init__(self, backend: Backend, running: RunningService) -> None:
        self.backend = backend
        self.running = running
        self.channel = grpc.aio.insecure_channel(running.target)
        self.stubs = {"grpc": pb_grpc.InferenceServiceStub(self.channel), "local": running.local_stub()}


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    backend = Backend()
    running = await start_inference_service(backend, port=0, api_keys=[KEY], max_message_bytes=MAX_BYTES,
                                            front_token=FRONT_TOKEN)
    s = Service(backend, running)
    yield s
    await s.channel.close()
    await running.stop(grace=0.5)


AUTH = (("authorization", f"Bearer {KEY}"),)


def gen(model: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id="r1", model=model, prompt=pb.PromptInput(prompt="hi"))


async def stream(stub: Any, request: Any, timeout: Optional[float] = 10, metadata: Any = AUTH) -> tuple:
    """(messages, code, details) of a Generate call."""
    call = stub.Generate(request, timeout=timeout, metadata=metadata)
    messages = []
    try:
        while (m := await call.read()) is not grpc.aio.EOF:
            assert m.backend_seconds > 0  # the service's wait on the backend, which differs per call
            m.backend_seconds = 0
            messages.append(m.SerializeToString(deterministic=True))
        return messages, grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        return messages, e.code(), e.details()


async def unary(method: Any, request: Any, timeout: Optional[float] = 10, metadata: Any = AUTH) -> tuple:
    try:
        answer = await method(request, timeout=timeout, metadata=metadata)
        return answer.SerializeToString(deterministic=True), grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        return None, e.code(), e.details()


async def both(service: Service, call: Any) -> dict:
    return {name: await call(stub) for name, stub in service.stubs.items()}


@pytest.mark.parametrize("model", ["ok", "busy", "down", "slow", "denied", "crash", "dies", "big"])
async def test_generate_same_over_both_channels(service, model) -> None:
    out = await both(service, lambda stub: stream(stub, gen(model)))
    assert out["local"] == out["grpc"], out
    if model == "ok":
        assert out["local"][1] == grpc.StatusCode.OK and len(out["local"][0]) == 3
    else:
        assert out["local"][1] != grpc.StatusCode.OK


async def test_unary_methods_same_over_both_channels(service) -> None:
    for method, request in [("Embed", pb.EmbedRequest(model="m", input=["x"])),
                            ("ListModels", pb.ListModelsRequest()), ("ListRunning", pb.ListRunningRequest()),
                            ("LoadModel", pb.LoadModelRequest(model="m")),
                            ("ShowModel", pb.ShowModelRequest(model="m")),
                            ("CountTokens", pb.CountTokensRequest(request=gen("m")))]:
        out = await both(service, lambda stub, m=method, r=request: unary(getattr(stub, m), r))
        assert out["local"] == out["grpc"], (method, out)


async def test_invalid_request_same_over_both_channels(service) -> None:
    bad = gen("ok")
    bad.sampling.temperature = -1
    out = await both(service, lambda stub: stream(stub, bad))
    assert out["local"] == out["grpc"] and out["local"][1] == grpc.StatusCode.INVALID_ARGUMENT


async def test_keys_same_over_both_channels(service) -> None:
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        out = await both(service, lambda stub, md=metadata: stream(stub, gen("ok"), metadata=md))
        assert out["local"] == out["grpc"] and out["local"][1] == grpc.StatusCode.UNAUTHENTICATED


async def test_deadline_same_over_both_channels(service) -> None:
    out = await both(service, lambda stub: stream(stub, gen("hang"), timeout=0.3))
    assert out["local"][1:] == out["grpc"][1:] == (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    # both handlers were cancelled and closed the generator
    await eventually(lambda: service.backend.closed == 2, what="both generators closed")


async def test_oversized_request_refused_over_both_channels(service) -> None:
    big = pb.GenerateRequest(request_id="r1", model="ok", prompt=pb.PromptInput(prompt="x" * (2 * MAX_BYTES)))
    out = await both(service, lambda stub: stream(stub, big))
    assert out["local"][1] == out["grpc"][1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in out["local"][2]


async def test_drain_same_over_both_channels(service) -> None:
    await service.running.begin_drain()
    out = await both(service, lambda stub: stream(stub, gen("ok")))
    assert out["local"] == out["grpc"] and out["local"][1] == grpc.StatusCode.UNAVAILABLE
    # The front's pass still gets through while draining.
    pass_md = AUTH + ((FRONT_TOKEN_KEY, FRONT_TOKEN),)
    out = await both(service, lambda stub: stream(stub, gen("ok"), metadata=pass_md))
    assert out["local"] == out["grpc"] and out["local"][1] == grpc.StatusCode.OK


async def test_slow_reader_holds_the_backend_back(service) -> None:
    call = service.stubs["local"].Generate(gen("many"), timeout=10, metadata=AUTH)
    await call.read()
    await asyncio.sleep(0.3)
    assert service.backend.yielded <= WINDOW + 2  # not the 10 * WINDOW it would make unread
    n = 1
    while await call.read() is not grpc.aio.EOF:
        n += 1
    assert service.backend.yielded == 10 * WINDOW and n == 10 * WINDOW + 3


async def test_cancelled_reader_closes_the_generator(service) -> None:
    started = service.backend.started
    call = service.stubs["local"].Generate(gen("hang"), timeout=10, metadata=AUTH)
    reader = asyncio.ensure_future(call.read())
    await eventually(lambda: service.backend.started == started + 1, what="the generator started")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await eventually(lambda: service.backend.closed == 1, what="the generator closed")
    assert call.cancelled()


async def test_http_front_same_over_both_channels(service) -> None:
    cfg = ServerConfig(request_timeout=30, api_keys=[KEY])
    fronts = [await start_http(create_app(cfg, service.running.target)),
              await start_http(create_app(cfg, service.running.target, local_stub=service.running.local_stub()))]
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as s:
            for model in ["ok", "busy", "down", "crash", "dies", "big"]:
                seen = []
                for front in fronts:
                    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
                    async with s.post(front.url + "/v1/chat/completions", json=body) as r:
                        text = await r.text()
                        seen.append((r.status, r.headers.get("Retry-After"), _without_ids(text)))
                assert seen[0] == seen[1], (model, seen)
    finally:
        for front in fronts:
            await front.stop()


def _without_ids(text: str) -> str:
    import re

    text = re.sub(r"request id [0-9a-f]+", "request id", text)
    return re.sub(r'"(id|created|system_fingerprint)":("[^"]*"|\d+)', "", text)


async def _http_chunks(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The body as the server wrote it: one item per HTTP chunk (a write of the front's)."""
    chunks, part = [], b""
    async for data, end_of_chunk in resp.content.iter_chunks():
        part += data
        if end_of_chunk and part:
            chunks.append(part)
            part = b""
    return chunks + ([part] if part else [])


async def test_http_front_writes_the_first_token_at_once_and_the_rest_together(service) -> None:
    """Over the local channel the first event is written as soon as it is
    made (with the headers), and the events already here after it go out as
    one write with the stream's end; over gRPC the front cannot tell what is
    here and writes event by event."""
    cfg = ServerConfig(request_timeout=30, api_keys=[KEY])
    fronts = {"grpc": await start_http(create_app(cfg, service.running.target)),
              "local": await start_http(create_app(cfg, service.running.target,
                                                   local_stub=service.running.local_stub()))}
    body = {"model": "ok", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    writes = {}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            for name, front in fronts.items():
                async with s.post(front.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    writes[name] = await _http_chunks(r)
    finally:
        for front in fronts.values():
            await front.stop()
    first, rest = writes["local"]
    assert b'"role":"assistant"' in first and b'"content":"hello "' in first and b"world" not in first
    assert b'"content":"world"' in rest and b'"finish_reason":"stop"' in rest and rest.endswith(b"data: [DONE]\n\n")
    assert b"".join(writes["local"]).count(b"data: ") == b"".join(writes["grpc"]).count(b"data: ") == 5
    assert len(writes["grpc"]) == 4  # the role and the first text: one write, as over the local channel
