"""RemoteBackend against real in-process gRPC services (port 0): the mlxgate.v1
contract over the hop, each gRPC status back to its BackendError, retry-after,
keys, request ids and deadlines in the metadata, cancellation, the token
clocks, and the health watch (serving, draining, unreachable, back again).

The services here run scripted backends, so each test is fast and exact; the
same backend against real `mlxgate service` processes on the generated model
is tests/test_remote_services.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Optional

import grpc
import pytest

from backends import accept, call_context
from backends.errors import (
    RETRYABLE_KEY,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    TakesNoImages,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_for_code,
    retry_trailers,
)
from backends.remote import HealthState, RemoteBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import Chunk, Done, EmbedRequest, GenerateRequest
from mlxgate.config import RemoteService
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.scripted_backend import ScriptedBackend
from tests.fakes.streams import collect
from tests.request_builders import chat
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

KEY = "sk-remote-hop-0123456789abcdef"


def remote(target: str, name: str = "a", key: str = KEY, **timeouts: float) -> RemoteBackend:
    r = RemoteBackend(RemoteService(name=name, target=target, key=key, **timeouts))
    r.backoff_min, r.backoff_max = 0.05, 0.2  # quick reconnects in tests
    return r


class Gated:
    """A backend whose stream waits where told, and says when it was closed."""

    name = "gated"

    def __init__(self, before_first: bool = False) -> None:
        self.before_first = before_first
        self.release = asyncio.Event()
        self.closed = asyncio.Event()
        self.started = asyncio.Event()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Any]:
        self.started.set()
        try:
            if self.before_first:
                await self.release.wait()
            yield Chunk(text="first")
            await self.release.wait()
            yield Done(completion_tokens=1)
        finally:
            self.closed.set()

    async def list_models(self) -> list:
        from backends.types import ModelInfo

        return [ModelInfo("m", "gated")]

    async def close(self) -> None:
        pass


@pytest.fixture
async def service():
    """A keyed service over a router with one scripted backend named "mlx"."""
    scripted = ScriptedBackend("mlx", ["m", "other"], text=["Hel", "lo"])
    router = Router([scripted])
    svc = await start_inference_service(router, port=0, api_keys=[KEY])
    yield svc, scripted
    await svc.stop(0)


# ------------------------------------------------------------------ the contract over the hop


async def test_generate_and_unary_calls_over_the_hop(service):
    svc, scripted = service
    r = remote(svc.target)
    try:
        events = await collect(r.generate(chat()))
        assert [e.text for e in events if isinstance(e, Chunk)] == ["Hel", "lo"]
        done = events[-1]
        assert isinstance(done, Done) and (done.backend, done.completion_tokens) == ("mlx", 2)
        # Through a router the answer is the remote's: backend "remote:a", model as the remote named it.
        front = Router([r])
        events = await collect(front.generate(chat()))
        assert (events[0].backend, events[-1].backend, events[-1].model) == ("remote:a", "remote:a", "m")

        models = await r.list_models()
        assert [(m.name, m.backend, m.fallbacks) for m in models] == [("m", "remote:a", []), ("other", "remote:a", [])]
        show = await r.show_model("m")
        assert (show.info.name, show.info.backend, show.context_length) == ("m", "remote:a", 128)
        emb = await r.embed(EmbedRequest(model="m", inputs=["a", "b"], request_id="e1"))
        assert emb.embeddings == [[1.0, 0.0], [1.0, 0.0]]
        load = await r.load_model("m", 60.0)
        assert (load.model, load.backend) == ("m", "remote:a")
        assert [(x.name, x.backend) for x in await r.list_running()] == [("m", "remote:a")]
        assert await r.unload_model("m") is True and await r.list_running() == []
        assert await r.unload_model("m") is False
    finally:
        await r.close()


@pytest.mark.parametrize(
    "raised, expected",
    [
        (InvalidArgument("mlx: bad option"), InvalidArgument),
        (Unavailable("mlx: out of memory"), Unavailable),
        (ResourceExhausted("mlx: server busy", retry_after=7), ResourceExhausted),
        (DeadlineExceeded("mlx: too slow"), DeadlineExceeded),
        (Unauthenticated("mlx: upstream key"), Unauthenticated),
        (PermissionDenied("mlx: not yours"), PermissionDenied),
        (Unimplemented("mlx: no such thing"), Unimplemented),
        (Internal("mlx: broke"), Unavailable),  # the remote's INTERNAL: another backend may answer
        (RuntimeError("boom"), Unavailable),  # a crash there is INTERNAL on the wire
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else x.__name__,
)
async def test_each_status_comes_back_as_its_error(service, raised, expected):
    svc, scripted = service
    scripted.fail = raised
    r = remote(svc.target)
    try:
        with pytest.raises(expected) as info:
            await collect(r.generate(chat()))
        assert info.value.message.startswith("remote:a: ")
        if isinstance(raised, ResourceExhausted):
            assert info.value.retry_after == 7  # from the retry-after trailer
        with pytest.raises(expected):
            await r.embed(EmbedRequest(model="m", inputs=["x"]))
    finally:
        await r.close()


async def test_unknown_model_and_a_failure_after_the_first_chunk(service):
    svc, scripted = service
    r = remote(svc.target)
    try:
        with pytest.raises(ModelNotFound, match="remote:a: model 'ghost' not found"):
            await collect(r.generate(chat("ghost")))
        scripted.fail, scripted.fail_after = Unavailable("mlx: died"), 1
        got = []
        with pytest.raises(Unavailable, match="died"):
            async for ev in r.generate(chat()):
                got.append(ev)
        assert [e.text for e in got] == ["Hel"]
    finally:
        await r.close()


def test_the_table_reversed_covers_every_code():
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        err = error_for_code(code, "x")
        # every code the service's table names comes back as the class bound to it
        if code in (InvalidArgument.code, ModelNotFound.code, Unavailable.code, ResourceExhausted.code,
                    DeadlineExceeded.code, Unauthenticated.code, PermissionDenied.code, Unimplemented.code):
            assert err.code is code
    assert isinstance(error_for_code(grpc.StatusCode.OUT_OF_RANGE, "x"), InvalidArgument)
    assert isinstance(error_for_code(grpc.StatusCode.CANCELLED, "x"), Unavailable)
    exhausted = error_for_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max")
    assert isinstance(exhausted, ResourceExhausted) and exhausted.retry_after is None


def test_a_retryable_kind_travels_in_a_trailer():
    """TakesNoImages is INVALID_ARGUMENT yet retryable: the service adds
    x-mlxgate-retryable, read back onto the same code."""
    err = TakesNoImages("m")
    assert retry_trailers(err) == ((RETRYABLE_KEY, "1"),)
    assert retry_trailers(InvalidArgument("x")) == () and retry_trailers(Unavailable("x")) == ()
    back = error_for_code(err.code, err.message, retryable=True)
    assert isinstance(back, InvalidArgument) and back.retryable
    assert not error_for_code(err.code, err.message).retryable


# ------------------------------------------------------------------ keys


async def test_keys(service):
    svc, _ = service
    without = remote(svc.target, key="")
    wrong = remote(svc.target, key="sk-wrong-key-0000000000000000")
    right = remote(svc.target)
    try:
        with pytest.raises(Unauthenticated, match="remote:a: missing API key"):
            await without.list_models()
        with pytest.raises(Unauthenticated, match="invalid API key") as info:
            await collect(wrong.generate(chat()))
        assert "sk-wrong" not in info.value.message
        assert [m.name for m in await right.list_models()] == ["m", "other"]
        assert KEY not in repr(right) and KEY not in repr(right.config)
        # The health watch needs no key.
        await eventually(lambda: without.health is HealthState.SERVING)
    finally:
        for r in (without, wrong, right):
            await r.close()


def test_key_env_is_preferred_and_the_shared_key_fills_in():
    cfg = RemoteService(name="a", target="h:1", key_env="STUDIO_KEY")
    assert RemoteBackend(cfg, {"STUDIO_KEY": "k1"}, shared_key="front")._metadata == (("authorization", "Bearer k1"),)
    assert RemoteBackend(cfg, {}, shared_key="front")._metadata == ()  # named but unset: none, with a warning
    assert RemoteBackend(RemoteService(target="h:1", key="k2"), shared_key="front")._metadata == (
        ("authorization", "Bearer k2"),)
    bare = RemoteBackend(RemoteService(target="h:1"), shared_key="front")
    assert bare._metadata == (("authorization", "Bearer front"),) and bare.name == "remote:h:1"


# ------------------------------------------------------------------ metadata: request ids and deadlines


class Recorder(pb_grpc.InferenceServiceServicer):
    """A bare InferenceService that records what each call carried."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        #: The messages themselves, by method.
        self.requests: dict[str, Any] = {}

    def _note(self, method: str, context: grpc.aio.ServicerContext, request_id: str = "") -> None:
        md = {k: v for k, v in context.invocation_metadata()}
        self.seen.append({"method": method, "x-request-id": md.get("x-request-id"),
                          "authorization": md.get("authorization"), "request_id": request_id,
                          "time_remaining": context.time_remaining()})

    async def Generate(self, request, context):
        self._note("Generate", context, request.request_id)
        self.requests["Generate"] = request
        yield pb.GenerateResponse(done=pb.Done(finish_reason=pb.FINISH_REASON_STOP))

    async def ListModels(self, request, context):
        self._note("ListModels", context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="m")])

    async def ShowModel(self, request, context):
        self._note("ShowModel", context)
        return pb.ShowModelResponse(model=pb.ModelInfo(name=request.model))

    async def Embed(self, request, context):
        self._note("Embed", context, request.request_id)
        self.requests["Embed"] = request
        return pb.EmbedResponse()


@pytest.fixture
async def recorder():
    rec = Recorder()
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield rec, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_request_ids_keys_and_the_callers_deadline_travel(recorder):
    rec, target = recorder
    # A front -> service (router over the remote backend) -> recorder: what the
    # front sent arrives at the recorder.
    hop = remote(target, first_token_timeout=300)
    svc = await start_inference_service(Router([hop]), port=0)
    try:
        async with grpc.aio.insecure_channel(svc.target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            req = pb.GenerateRequest(request_id="rid-gen-1", model="m",
                                     chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")]))
            _ = [x async for x in stub.Generate(req, timeout=30, metadata=(("x-request-id", "rid-gen-1"),))]
            await stub.ShowModel(pb.ShowModelRequest(model="m"), timeout=20,
                                 metadata=(("x-request-id", "rid-show-1"),))
            await stub.Embed(pb.EmbedRequest(model="m", input=["x"], request_id="rid-emb-1"), timeout=60)
        by = {s["method"]: s for s in rec.seen}
        gen, show, emb, listing = by["Generate"], by["ShowModel"], by["Embed"], by["ListModels"]
        assert (gen["request_id"], gen["x-request-id"]) == ("rid-gen-1", "rid-gen-1")
        assert show["x-request-id"] == "rid-show-1"  # a unary call's id comes from the caller's metadata
        assert (emb["request_id"], emb["x-request-id"]) == ("rid-emb-1", "rid-emb-1")
        assert gen["authorization"] == show["authorization"] == f"Bearer {KEY}"
        # The caller's remaining deadline (grpc rounds it up a little), not the remote's
        # own first-token clock (300 s).
        assert 20 < gen["time_remaining"] <= 31
        assert 10 < show["time_remaining"] <= 21
        assert 50 < emb["time_remaining"] <= 61
        # The model list the router caches for everyone is nobody's call: its
        # own id, and the remote's clocks (connect + first token), not a caller's deadline.
        assert listing["x-request-id"] not in ("rid-gen-1", "rid-show-1", "rid-emb-1")
        assert listing["time_remaining"] > 60
    finally:
        await svc.stop(0)
        await hop.close()


async def test_the_accepted_message_is_forwarded_as_it_came(recorder):
    """The remote gets the caller's own message, not one rebuilt from the
    domain request: JSON carried as text keeps its exact text (a rebuild would
    re-serialize it), and only the model name routing chose is set anew."""
    rec, target = recorder
    hop = remote(target, name="far")
    svc = await start_inference_service(Router([hop]), port=0)
    try:
        async with grpc.aio.insecure_channel(svc.target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            req = pb.GenerateRequest(
                request_id="rid-fwd-1", model="m",
                chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi", tool_calls=[
                    pb.ToolCall(name="f", arguments_json='{ "b" : 1,"a":2 }')])]),
                tools=[pb.Tool(name="f", parameters_json='{"type":"object" ,  "properties": {}}')],
                sampling=pb.SamplingParams(temperature=0.5, stop=["x"]))
            _ = [x async for x in stub.Generate(req, timeout=30)]
        assert rec.requests["Generate"] == req
        assert rec.requests["Generate"].tools[0].parameters_json == '{"type":"object" ,  "properties": {}}'
        # Routing's name for the model (an alias's target) replaces the caller's; the rest is as it came.
        emb = pb.EmbedRequest(model="public-name", input=["x"], dimensions=8)
        await hop.embed(dataclasses.replace(accept.embed(emb), model="m"))
        forwarded = rec.requests["Embed"]
        assert (forwarded.model, list(forwarded.input), forwarded.dimensions) == ("m", ["x"], 8)
        assert forwarded.request_id and emb.model == "public-name"  # a fresh id; the caller's message untouched
    finally:
        await svc.stop(0)
        await hop.close()


async def test_without_a_caller_deadline_unary_calls_get_connect_plus_first_token(recorder):
    rec, target = recorder
    r = remote(target, connect_timeout=2, first_token_timeout=5)
    try:
        assert call_context.remaining() is None
        await r.list_models()
        (seen,) = rec.seen
        assert 5 < seen["time_remaining"] <= 8 and len(seen["x-request-id"]) == 32  # a fresh id
        await collect(r.generate(chat(request_id="rid-2")))
        assert rec.seen[-1]["time_remaining"] is None  # streams: the token clocks bound them
    finally:
        await r.close()


# ------------------------------------------------------------------ cancellation and clocks


async def test_closing_the_stream_cancels_the_remote_generation():
    gated = Gated()
    svc = await start_inference_service(Router([gated]), port=0)
    r = remote(svc.target, key="")
    try:
        stream = r.generate(chat())
        assert (await anext(stream)).text == "first"
        await stream.aclose()
        await asyncio.wait_for(gated.closed.wait(), 10)  # the remote's generator was closed
    finally:
        await r.close()
        await svc.stop(0)


@pytest.mark.parametrize("where", ["first_token", "idle"])
async def test_the_token_clocks_end_a_silent_remote(where):
    gated = Gated(before_first=where == "first_token")
    svc = await start_inference_service(Router([gated]), port=0)
    # The clock under test is short; the other one generous (a loaded machine).
    clocks = {"first_token_timeout": 0.5, "idle_timeout": 30} if where == "first_token" else {
        "first_token_timeout": 30, "idle_timeout": 0.5}
    r = remote(svc.target, key="", **clocks)
    try:
        got = []
        with pytest.raises(DeadlineExceeded, match=f"{where}_timeout"):
            async for ev in r.generate(chat()):
                got.append(ev)
        assert len(got) == (0 if where == "first_token" else 1)
        await asyncio.wait_for(gated.closed.wait(), 10)  # and the remote stopped
    finally:
        await r.close()
        await svc.stop(0)


async def test_time_the_caller_holds_the_stream_is_not_the_remotes_silence(service):
    svc, scripted = service
    r = remote(svc.target, idle_timeout=1.0)
    try:
        got = []
        async for ev in r.generate(chat()):
            got.append(ev)
            if len(got) == 1:
                await asyncio.sleep(1.5)  # a slow client, longer than the idle clock
        assert isinstance(got[-1], Done)
    finally:
        await r.close()


# ------------------------------------------------------------------ health


async def test_health_serving_draining_unreachable_and_back(held_port):
    port = held_port.port  # held while the service is gone too, so that it comes back on it
    scripted = ScriptedBackend("mlx", ["m"])
    svc = await start_inference_service(Router([scripted]), port=port)
    a = remote(f"127.0.0.1:{port}", key="")
    other = ScriptedBackend("remote:b", ["m"], is_engine=True)
    front = Router([a, other])
    svc2: Optional[Any] = None
    try:
        await front.start()
        await eventually(lambda: a.health is HealthState.SERVING)
        assert front.health() == {"remote:a": True, "remote:b": True}
        assert (await collect(front.generate(chat())))[-1].backend == "remote:a"

        # A refusal for shutting down says as much as the watch would.
        svc.gate.begin_drain()
        with pytest.raises(Unavailable, match="shutting down"):
            await a.list_models()
        assert a.health is HealthState.NOT_SERVING
        svc.gate.draining = False  # (only the gate drained: health never changed, so
        a.health = HealthState.SERVING  # the watch has nothing to say; put it back by hand)

        await svc.begin_drain()  # SIGTERM's first step: NOT_SERVING
        await eventually(lambda: a.health is HealthState.NOT_SERVING)
        assert a.serving is False and front.health()["remote:a"] is False
        calls_before = len(scripted.calls)
        assert (await collect(front.generate(chat())))[-1].backend == "remote:b"
        assert len(scripted.calls) == calls_before  # nothing new reached it

        await svc.stop(0)
        await eventually(lambda: a.health is HealthState.UNREACHABLE)
        assert a.serving is False

        svc2 = await start_inference_service(Router([scripted]), port=port)  # back, same address
        await eventually(lambda: a.health is HealthState.SERVING)
        assert a.times_serving == 2
        assert (await collect(a.generate(chat())))[-1].completion_tokens == 2
    finally:
        await front.close()
        if svc2 is not None:
            await svc2.stop(0)
        await svc.stop(0)
    assert a._watch_task is None and a._channel is None  # close ended the watch
    with pytest.raises(Unavailable, match="closed"):
        await a.list_models()


async def test_nothing_listening_is_unreachable_and_unavailable(held_port):
    r = remote(held_port.address, key="")
    try:
        with pytest.raises(Unavailable, match="remote:a: "):
            await r.list_models()
        await eventually(lambda: r.health is HealthState.UNREACHABLE)
    finally:
        await r.close()


async def test_a_server_without_the_contract_is_unimplemented():
    """An older or other gRPC server: a method it lacks is UNIMPLEMENTED
    (retryable: the router moves on), and without a health service the
    remote's health stays unknown (it is still tried)."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    r = remote(f"127.0.0.1:{port}", key="")
    try:
        with pytest.raises(Unimplemented):
            await r.list_models()
        with pytest.raises(Unimplemented):
            await collect(r.generate(chat()))
        await asyncio.sleep(0.3)
        assert r.health is HealthState.UNKNOWN and r.serving
    finally:
        await r.close()
        await server.stop(0)


# ------------------------------------------------------------------ one hop only


async def test_a_forwarded_call_is_served_without_remotes():
    """Fronts that list each other as remotes: a call that came from another
    mlxgate is served by the service's own backends only, and its model list
    shows only what that machine serves itself."""
    far = await start_inference_service(Router([ScriptedBackend("mlx", ["only-far"])]), port=0)
    hop_to_far = remote(far.target, name="far", key="")
    middle = await start_inference_service(Router([ScriptedBackend("mlx", ["m"]), hop_to_far]), port=0)
    front = remote(middle.target, name="middle", key="")
    try:
        # A client of the middle service sees both ...
        async with grpc.aio.insecure_channel(middle.target) as ch:
            listed = await pb_grpc.InferenceServiceStub(ch).ListModels(pb.ListModelsRequest())
        assert [(m.name, m.backend) for m in listed.models] == [("m", "mlx"), ("only-far", "remote:far")]
        # ... another mlxgate's remote backend only what the middle serves itself.
        assert [m.name for m in await front.list_models()] == ["m"]
        with pytest.raises(ModelNotFound) as info:
            await collect(front.generate(chat("only-far")))
        assert "remote:far" not in info.value.message
        assert (await collect(front.generate(chat("m"))))[-1].backend == "mlx"
        assert [r.backend for r in await front.list_running()] == []
    finally:
        await front.close()
        await middle.stop(0)
        await hop_to_far.close()
        await far.stop(0)
