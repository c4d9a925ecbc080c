"""The Anthropic Messages dialect on the wire: the SSE event sequence as
Anthropic defines it, pings, errors in Anthropic's shape and statuses from
every place that answers one (handlers, streams, the trust middleware,
aiohttp's own 404/405/413, the drain), and the CountTokens RPC behind
/v1/messages/count_tokens."""

from __future__ import annotations

import json

import aiohttp
from aiohttp.test_utils import make_mocked_request
import grpc
import pytest

from backends.errors import Unimplemented
from backends.mlx.output import StopStrings
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import GenerateRequest, Message, ModelInfo, TokenCount
from gateway import metrics
from gateway.anthropic import routes as anthropic_routes
from gateway.app import begin_drain, create_app, start_http
from mlxgate.config import ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.scripted_backend import ByModelNameBackend
from tests.request_builders import anthropic_body

pytestmark = pytest.mark.timeout(60)

MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", ""), json.loads(fields["data"])))
    return out


def check_sequence(events: list[tuple[str, dict]]) -> None:
    """Anthropic's grammar: message_start, then blocks (start, deltas, stop; one open at a
    time, indexes in order), then message_delta and message_stop; pings anywhere."""
    assert all(name == data["type"] for name, data in events), events
    kinds = [name for name, _ in events if name != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    open_index, next_index = None, 0
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert name == "ping", name
    assert open_index is None


# ---------------------------------------------------------------- the real stack


async def test_stream_event_sequence_and_headers(stack):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + MESSAGES, json=anthropic_body(stack.model, stream=True),
                          headers={"anthropic-version": "2023-06-01", "anthropic-beta": "whatever-2099-01-01"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-mlxgate-backend"] == "mlx" and r.headers["request-id"] == r.headers["X-Request-Id"]
            events = sse_events(await r.text())
    check_sequence(events)
    assert events[1] == ("ping", {"type": "ping"})  # as Anthropic's streams begin
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8 and delta["usage"]["input_tokens"] > 0


async def test_router_level_errors_are_anthropic_shaped(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + MESSAGES) as r:
            assert r.status == 405 and "POST" in r.headers["Allow"]
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.post(stack.base + "/v1/messages/batches", json={}) as r:
            err = await r.json()
            assert r.status == 404 and err["type"] == "error" and err["error"]["type"] == "not_found_error"
            assert "Message Batches API is not served" in err["error"]["message"]
        async with s.post(stack.base + MESSAGES, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.post(stack.base + MESSAGES, data=b"x" * (stack.server_cfg.max_body_bytes + 1)) as r:
            err = await r.json()
            assert r.status == 413 and err["error"]["type"] == "request_too_large"
        evil = {"Origin": "https://evil.example"}
        async with s.post(stack.base + MESSAGES, json=anthropic_body(stack.model), headers=evil) as r:
            assert r.status == 403 and (await r.json())["error"]["type"] == "permission_error"
        async with s.post(stack.base + MESSAGES, json=anthropic_body(stack.model, mcp_servers=[{"type": "url"}])) as r:
            assert r.status == 400 and "MCP connector" in (await r.json())["error"]["message"]
        # The OpenAI dialect keeps its own shape beside it.
        async with s.post(stack.base + "/v1/chat/completions", json={"model": "nope", "messages": []}) as r:
            assert r.status == 400 and set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_keys_are_checked_with_anthropic_bodies(stack):
    cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=["k1"])
    http = await start_http(create_app(cfg, stack.grpc_target), cfg.host, 0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(http.url + COUNT, json={"model": stack.model, "messages": [{"role": "user",
                                                                                        "content": "hi"}]}) as r:
                err = await r.json()
                assert r.status == 401 and err == {"type": "error", "error": {
                    "type": "authentication_error",
                    "message": "API key required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"}}
            for headers in ({"x-api-key": "k1"}, {"Authorization": "Bearer k1"}):
                async with s.post(http.url + COUNT, headers=headers, json={
                        "model": stack.model, "messages": [{"role": "user", "content": "hi"}]}) as r:
                    assert r.status == 200 and (await r.json())["input_tokens"] > 0
    finally:
        await http.stop()


async def test_the_drain_answers_529_overloaded(stack):
    app = create_app(ServerConfig(), stack.grpc_target)
    http = await start_http(app, "127.0.0.1", 0)
    try:
        begin_drain(app)
        async with aiohttp.ClientSession() as s:
            async with s.post(http.url + MESSAGES, json=anthropic_body(stack.model)) as r:
                err = await r.json()
                assert r.status == 529 and r.headers["Retry-After"] == "5"
                assert err["error"] == {"type": "overloaded_error", "message": "server shutting down; retry shortly"}
    finally:
        await http.stop()


async def test_count_tokens_over_grpc(stack):
    async with grpc.aio.insecure_channel(stack.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        req = pb.GenerateRequest(model=stack.model)
        req.chat.messages.add(role=pb.ROLE_USER, content="hello there")
        res = await stub.CountTokens(pb.CountTokensRequest(request=req))
        assert res.input_tokens > 3 and (res.backend, res.model) == ("mlx", stack.model)
        req.think = False  # the template's empty think block is counted
        assert (await stub.CountTokens(pb.CountTokensRequest(request=req))).input_tokens > res.input_tokens
        for bad, match in ((pb.CountTokensRequest(), "request is required"),
                           (pb.CountTokensRequest(request=pb.GenerateRequest(model=stack.model)), "prompt or chat")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CountTokens(bad)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details()


def test_metrics_label_the_anthropic_dialect():
    def label(path: str, **headers: str) -> str:
        return metrics.dialect_of(make_mocked_request("GET", path, headers=headers))

    assert label("/v1/messages") == label("/v1/messages/count_tokens") == "anthropic"
    assert label("/v1/models") == "openai" and label("/api/tags") == "ollama" and label("/openapi.json") == "other"
    # The paths both APIs serve: an Anthropic client sends anthropic-version.
    assert label("/v1/models", **{"anthropic-version": "2023-06-01"}) == "anthropic"
    assert label("/v1/models/m1", **{"anthropic-version": "2023-06-01"}) == "anthropic"
    assert label("/v1/chat/completions", **{"anthropic-version": "2023-06-01"}) == "openai"


def test_stop_strings_tell_which_one_matched():
    s = StopStrings(["END", "ST"])
    assert s.feed("abc S") == ("abc ", False)
    assert s.feed("TOP END") == ("", True) and s.matched == "ST"
    s = StopStrings(["aa", "a"])
    assert s.feed("xaa")[1] and s.matched == "aa"  # a tie at the same place: the first listed


# ---------------------------------------------------------------- a scripted backend


@pytest.fixture(scope="module")
async def scripted():
    service = await start_inference_service(ByModelNameBackend(retry_after=2.2, thinking="hmm"), port=0)
    http = await start_http(create_app(ServerConfig(request_timeout=30), service.target))
    yield http.url
    await http.stop()
    await service.stop(grace=0.5)


@pytest.mark.parametrize("model, status, kind, retry_after", [
    ("busy", 529, "overloaded_error", "3"),
    ("down", 529, "overloaded_error", None),
    ("slow", 504, "timeout_error", None),
    ("auth", 401, "authentication_error", None),
    ("bad", 400, "invalid_request_error", None),
    ("crash", 500, "api_error", None),
])
async def test_status_table(scripted, model, status, kind, retry_after):
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(scripted + MESSAGES, json=anthropic_body(model, stream=stream)) as r:
                err = await r.json()
                assert (r.status, err["type"], err["error"]["type"]) == (status, "error", kind)
                assert r.headers.get("Retry-After") == retry_after
    if model == "crash":
        assert "secret" not in err["error"]["message"] and "request id" in err["error"]["message"]


async def test_count_tokens_where_no_backend_can_count_is_400(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + COUNT, json={"model": "ok", "messages": [{"role": "user", "content": "x"}]}) as r:
            err = await r.json()
            assert r.status == 400 and err["error"]["type"] == "invalid_request_error"
            assert "cannot count" in err["error"]["message"]


async def test_an_error_after_the_stream_began_is_an_error_event(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + MESSAGES, json=anthropic_body("dies", stream=True)) as r:
            assert r.status == 200
            events = sse_events(await r.text())
    names = [n for n, _ in events]
    assert names[:5] == ["message_start", "ping", "content_block_start", "content_block_delta", "error"]
    assert "message_stop" not in names
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "backend went away mid-stream"}}


async def test_silence_gets_pings_and_blocks_follow_the_output(scripted, monkeypatch):
    monkeypatch.setattr(anthropic_routes, "PING_INTERVAL_S", 0.05)
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + MESSAGES, json=anthropic_body("pauses", stream=True)) as r:
            events = sse_events(await r.text())
    check_sequence(events)
    names = [n for n, _ in events]
    first_delta = names.index("content_block_delta")
    assert "ping" in names[first_delta:]  # during the pause, not only the opening one
    blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert blocks == [{"type": "text", "text": ""}, {"type": "thinking", "thinking": "", "signature": ""},
                      {"type": "text", "text": ""}]
    usage = events[-2][1]["usage"]
    assert usage == {"output_tokens": 2, "input_tokens": 5, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 4}


async def test_whole_answer_has_the_streamed_blocks(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + MESSAGES, json=anthropic_body("stops")) as r:
            m = await r.json()
    assert m["content"] == [{"type": "text", "text": "hello "},
                            {"type": "thinking", "thinking": "hmm", "signature": ""},
                            {"type": "text", "text": "world"}]
    assert (m["stop_reason"], m["stop_sequence"]) == ("stop_sequence", "STOP")
    assert m["usage"] == {"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 4}


# ---------------------------------------------------------------- the router


class _Counter:
    def __init__(self, name: str, n: int | None) -> None:
        self.name, self.n = name, n

    async def list_models(self):
        return [ModelInfo(name="m", backend=self.name)]

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        if self.n is None:
            raise Unimplemented(f"{self.name}: cannot count")
        return TokenCount(self.n)

    async def close(self):
        pass


async def test_router_asks_the_next_backend_that_can_count():
    router = Router([_Counter("ollama", None), _Counter("cloud:anthropic", 42)])
    res = await router.count_tokens(GenerateRequest(model="m", messages=[Message("user", "x")]))
    assert (res.input_tokens, res.backend, res.model) == (42, "cloud:anthropic", "m")
    alone = Router([_Counter("ollama", None)])
    with pytest.raises(Unimplemented, match="cannot count"):
        await alone.count_tokens(GenerateRequest(model="m", messages=[Message("user", "x")]))
