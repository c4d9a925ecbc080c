"""Error answers: validation, routing, body size, and the gRPC status table.

Validation and routing run against the real stack.  The status table and
errors after a stream began need a backend that fails on demand; no real
backend does, so the scripted one (``ByModelNameBackend`` of
``tests/fakes/scripted_backend.py``) sits behind the *real* gRPC service
and the real front (only the backend is fake).
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from backends.service import start_inference_service
from gateway.app import create_app, start_http
from gateway.errors import OLLAMA_BUSY
from mlxgate.config import ServerConfig
from tests.fakes.scripted_backend import ByModelNameBackend

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- validation (real stack)


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/api/generate", b"{not json", 400, "invalid JSON"),
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", b"[1, 2]", 400, "JSON object"),
        ("/api/chat", {"model": "m", "messages": "hi"}, 400, "messages"),
        ("/api/generate", {"prompt": "hi"}, 400, "model is required"),
        ("/api/generate", {"model": "m", "prompt": "x", "options": {"temperature": "warm"}}, 400,
         "options.temperature"),
        ("/api/embed", {"model": "m", "input": [1, 2]}, 400, "input"),
        ("/api/generate", {"model": "m", "prompt": "x", "keep_alive": "forever"}, 400, "keep_alive"),
        # Out of the contract's integer ranges: a 400 naming the field, never a 500.
        ("/api/generate", {"model": "m", "prompt": "x", "options": {"seed": 1e23}}, 400, "options.seed"),
        ("/api/generate", {"model": "m", "prompt": "x", "options": {"num_predict": 10**10}}, 400,
         "options.num_predict"),
        ("/api/chat", {"model": "m", "messages": [], "options": {"num_ctx": 10**10}}, 400, "options.num_ctx"),
        ("/api/embed", {"model": "m", "input": "x", "dimensions": 10**10}, 400, "dimensions"),
    ],
)
async def test_ollama_validation(stack, path, body, status, needle):
    async with aiohttp.ClientSession() as s:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with s.post(stack.base + path, **kw) as r:
            assert r.status == status
            d = await r.json()
    assert set(d) == {"error"} and needle in d["error"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": {"role": "user"}}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3 * 10**9}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
    ],
)
async def test_openai_validation(stack, body, param):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + CHAT, json=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


async def test_completions_cap_prompts_times_n(stack):
    body = {"model": stack.model, "prompt": ["hi"] * 100, "n": 10, "max_tokens": 1}
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/completions", json=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert err["param"] == "n" and "1000" in err["message"]
    assert stack.backend.active_count == 0


async def test_openai_malformed_json(stack):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + CHAT, data=b'{"model": ') as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"} and "invalid JSON" in err["message"]


async def test_unknown_routes_and_methods_in_dialect_shape(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/nope") as r:
            assert r.status == 404
            assert "/api/nope" in (await r.json())["error"]
        async with s.post(stack.base + "/v1/nope", json={}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.get(stack.base + "/api/generate") as r:
            assert r.status == 405
            assert isinstance((await r.json())["error"], str)
        async with s.get(stack.base + CHAT) as r:
            assert r.status == 405
            assert isinstance((await r.json())["error"]["message"], str)


async def test_oversize_body_is_413_in_dialect_shape(stack):
    cfg = ServerConfig(max_body_bytes=2048)
    http = await start_http(create_app(cfg, stack.grpc_target))
    big = {"model": stack.model, "prompt": "x" * 5000}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(http.url + "/api/generate", json=big) as r:
                assert r.status == 413
                assert "too large" in (await r.json())["error"]
            async with s.post(http.url + "/v1/completions", json=big) as r:
                assert r.status == 413
                assert "too large" in (await r.json())["error"]["message"]
            small = {"model": stack.model, "prompt": "x", "stream": False, "options": {"num_predict": 2}}
            async with s.post(http.url + "/api/generate", json=small) as r:
                assert r.status == 200
    finally:
        await http.stop()


# ---------------------------------------------------------------- status table (scripted backend)


async def test_retry_after_reaches_both_dialects(scripted):
    """A backend's retry hint crosses gRPC (trailers) and becomes Retry-After."""
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/generate", json={"model": "busy", "prompt": "x"}) as r:
            assert (r.status, r.headers.get("Retry-After")) == (503, "7")
        body = {"model": "busy", "messages": [{"role": "user", "content": "x"}]}
        async with s.post(scripted + CHAT, json=body) as r:
            assert (r.status, r.headers.get("Retry-After")) == (429, "7")
        async with s.post(scripted + CHAT, json={**body, "model": "down"}) as r:
            assert r.status == 503 and "Retry-After" not in r.headers


@pytest.fixture(scope="module")
async def scripted():
    service = await start_inference_service(ByModelNameBackend(retry_after=6.2), port=0)
    http = await start_http(create_app(ServerConfig(request_timeout=30), service.target))
    yield http.url
    await http.stop()
    await service.stop(grace=0.5)


@pytest.mark.parametrize(
    "model, ollama_status, openai_status, openai_type",
    [
        ("busy", 503, 429, "rate_limit_error"),
        ("down", 503, 503, "server_error"),
        ("slow", 504, 504, "server_error"),
        ("auth", 401, 401, "authentication_error"),
        ("denied", 403, 403, "permission_error"),
        ("unimpl", 501, 501, "invalid_request_error"),
    ],
)
async def test_status_table_before_first_token(scripted, model, ollama_status, openai_status, openai_type):
    async with aiohttp.ClientSession() as s:
        # Streaming requests too: the front waits for the first event, so these are real statuses.
        async with s.post(scripted + "/api/generate", json={"model": model, "prompt": "x"}) as r:
            assert r.status == ollama_status
            o = await r.json()
        async with s.post(scripted + CHAT, json={"model": model, "stream": True,
                                                 "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == openai_status
            assert r.content_type == "application/json"
            a = (await r.json())["error"]
    assert a["type"] == openai_type
    if model == "busy":
        assert o["error"] == OLLAMA_BUSY
        assert a["message"] == "queue is full"
    else:
        assert o["error"] == a["message"] != ""


async def test_internal_errors_are_generic(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/generate", json={"model": "crash", "prompt": "x"}) as r:
            assert r.status == 500
            text = await r.text()
            rid = r.headers["X-Request-Id"]
    assert "secret" not in text and ".key" not in text
    assert rid in json.loads(text)["error"]


async def test_ndjson_error_is_last_line_after_stream_began(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/chat", json={"model": "dies", "messages": [
                {"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert lines[0]["message"]["content"] == "hello "
    assert lines[-1] == {"error": "backend went away mid-stream"}
    assert not any(x.get("done") for x in lines)


async def test_sse_error_is_last_event_without_done(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + CHAT, json={"model": "dies", "stream": True,
                                                 "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            raw = await r.text()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["message"] == "backend went away mid-stream"
    assert last["error"]["type"] == "server_error"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "hello "


async def test_every_whole_answer_names_the_backend_of_its_done(scripted):
    """Without a router only the Done names the backend (not the first chunk):
    every dialect's whole answer takes the header from it (gateway.generation)."""
    user = [{"role": "user", "content": "x"}]
    bodies = {
        "/api/generate": {"model": "fine", "prompt": "x", "stream": False},
        "/api/chat": {"model": "fine", "messages": user, "stream": False},
        CHAT: {"model": "fine", "messages": user},
        "/v1/completions": {"model": "fine", "prompt": "x", "n": 2},
        "/v1/messages": {"model": "fine", "max_tokens": 8, "messages": user},
        "/v1/responses": {"model": "fine", "input": "x", "store": False},
    }
    async with aiohttp.ClientSession() as s:
        for path, body in bodies.items():
            async with s.post(scripted + path, json=body) as r:
                assert r.status == 200, (path, await r.text())
                assert r.headers.get("x-mlxgate-backend") == "scripted", path
                assert "hello world" in await r.text(), path


async def test_done_with_error_becomes_error(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/generate", json={"model": "done-error", "prompt": "x"}) as r:
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        async with s.post(scripted + "/api/generate", json={"model": "done-error", "prompt": "x",
                                                            "stream": False}) as r:
            assert r.status == 500
            assert (await r.json())["error"] == "engine failed mid-way"
        async with s.post(scripted + "/api/generate", json={"model": "fine", "prompt": "x", "stream": False}) as r:
            assert r.status == 200
            assert (await r.json())["response"] == "hello world"
            assert r.headers["x-mlxgate-backend"] == "scripted"
    assert lines[-1] == {"error": "engine failed mid-way"}


async def test_unary_errors_and_load_path(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/embed", json={"model": "m", "input": "x"}) as r:
            assert r.status == 503 and (await r.json())["error"] == OLLAMA_BUSY
        async with s.post(scripted + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 429 and (await r.json())["error"]["message"] == "embed queue full"
        async with s.post(scripted + "/api/generate", json={"model": "m"}) as r:
            assert r.status == 503 and (await r.json())["error"] == "cannot load"
        async with s.post(scripted + "/api/show", json={"model": "m"}) as r:
            assert r.status == 501


async def test_failure_reported_before_any_token_is_a_status_even_when_streaming(scripted):
    async with aiohttp.ClientSession() as s:
        async with s.post(scripted + "/api/generate", json={"model": "fails-first", "prompt": "x"}) as r:
            assert r.status == 500 and r.content_type == "application/json"
            assert (await r.json())["error"] == "could not start"
        async with s.post(scripted + CHAT, json={"model": "fails-first", "stream": True,
                                                 "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 500
            assert (await r.json())["error"]["message"] == "could not start"
