"""Per-upstream timeouts that bound a hung upstream (issue 8, "Upstream timeouts").

Three hung upstreams -- one that never sends headers, one that sends headers
and then nothing, one that sends keep-alive lines but never a token -- and one
that stalls after its first token, each against the Ollama adapter and the
cloud adapter with short configured clocks; then through the router
(fallback before the first token), through the real gRPC service and HTTP
front in both dialects, and from the environment variables.

Timing assertions have generous upper bounds (the clock plus SLACK): what
they prove is "ended by the clock", not "ended fast".
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from types import SimpleNamespace
from typing import Optional

import aiohttp
import pytest

from backends.cloud import AnthropicBackend, CloudBackend
from backends.errors import DeadlineExceeded
from mlxgate_cli.factory import build_backends
from backends.http_upstream import UpstreamStream
from backends.ollama import OllamaBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import Chunk, Done, EmbedRequest
from gateway.app import create_app, start_http
from mlxgate.config import CloudProvider, Config, OllamaConfig, ServerConfig, UpstreamTimeouts
from mlxgate.config_load import load_config
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.ollama_fake import Fault, FakeOllama
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.streams import collect
from tests.request_builders import chat
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

#: Room for a busy machine on top of a clock, seconds.
SLACK = 3.0
#: How long a fake holds a request when nobody hangs up: far past every clock
#: here, so an adapter without working clocks fails the time bound.
HOLD = 8.0
FIRST = 0.4  # first_token_timeout in these tests
IDLE = 0.4  # idle_timeout in these tests
LONG = 20.0  # the clock that must not be the one that fires

HUNG = ["hang", "hang_after_headers", "keepalive"]


@pytest.fixture
async def ollama():
    f = FakeOllama()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def cloud():
    f = FakeOpenAI()
    await f.start()
    yield f
    await f.stop()


def ollama_backend(fake: FakeOllama, first: float = FIRST, idle: float = IDLE, connect: float = 2.0) -> OllamaBackend:
    return OllamaBackend(OllamaConfig(upstream=fake.url, connect_timeout=connect, first_token_timeout=first,
                                      idle_timeout=idle))


def cloud_backend(fake: FakeOpenAI, first: float = FIRST, idle: float = IDLE, connect: float = 2.0) -> CloudBackend:
    return CloudBackend(CloudProvider("acme", fake.base_url, connect_timeout=connect, first_token_timeout=first,
                                      idle_timeout=idle), {})


@pytest.fixture
async def claude():
    f = FakeAnthropic()
    await f.start()
    yield f
    await f.stop()


def anthropic_backend(fake: FakeAnthropic, first: float = FIRST, idle: float = IDLE,
                      connect: float = 2.0) -> AnthropicBackend:
    return AnthropicBackend(CloudProvider("claude", fake.base_url, kind="anthropic", connect_timeout=connect,
                                          first_token_timeout=first, idle_timeout=idle), {})


#: upstream kind -> (model it serves, events it sends before its first token
#: (the cloud's role-only delta), its first token)
UPSTREAMS = {"ollama": ("tiny", 0, "Hello"), "cloud": ("gpt-test", 1, "Hi")}
#: The adapter-level tests also run against the Anthropic adapter (message_start
#: and the text block's start come before its first token; its keep-alives are
#: ping events).
ADAPTERS = {**UPSTREAMS, "anthropic": ("claude-test", 2, "Hi")}


@pytest.fixture(params=list(ADAPTERS))
async def upstream(request, ollama, cloud, claude):
    """(kind, fake, make(first, idle) -> backend) for each adapter."""
    kind = request.param
    made = []
    makers = {"ollama": (ollama, ollama_backend), "cloud": (cloud, cloud_backend),
              "anthropic": (claude, anthropic_backend)}
    fake, maker = makers[kind]

    def make(first: float = FIRST, idle: float = IDLE, connect: float = 2.0):
        b = maker(fake, first, idle, connect)
        made.append(b)
        return b

    yield kind, fake, make
    for b in made:
        await b.close()


async def drain(agen) -> tuple[list, Optional[BaseException], float, Optional[float]]:
    """(events, the error that ended the stream, seconds to the end, seconds
    from the first chunk to the end)."""
    t0 = time.monotonic()
    first_at = None
    events: list = []
    try:
        async for ev in agen:
            if first_at is None:
                first_at = time.monotonic()
            events.append(ev)
    except DeadlineExceeded as e:
        end = time.monotonic()
        return events, e, end - t0, (end - first_at) if first_at is not None else None
    finally:
        await agen.aclose()
    end = time.monotonic()
    return events, None, end - t0, (end - first_at) if first_at is not None else None


async def assert_upstream_hung_up(fake) -> None:
    """The adapter closed the upstream response: the fake saw its client go (once)."""
    await asyncio.wait_for(fake.disconnected.wait(), SLACK)
    assert fake.disconnects == 1


# ------------------------------------------------------------------ the adapters


@pytest.mark.parametrize("mode", HUNG)
async def test_hung_upstream_before_the_first_token_ends_by_the_first_token_clock(upstream, mode):
    kind, fake, make = upstream
    model, _, _ = ADAPTERS[kind]
    backend = make(first=FIRST, idle=LONG)
    fake.fault = Fault(mode, delay=HOLD)
    events, err, took, _ = await drain(backend.generate(chat(model)))
    assert events == []
    assert isinstance(err, DeadlineExceeded) and err.retryable
    assert err.message == f"{backend.name}: no token within {FIRST:g} s of the request (first_token_timeout)"
    assert FIRST * 0.9 <= took < FIRST + SLACK
    await assert_upstream_hung_up(fake)


@pytest.mark.parametrize("keepalive", [0.0, 0.05], ids=["silent", "keep-alive-lines"])
async def test_stall_after_the_first_token_ends_the_stream_by_the_idle_clock(upstream, keepalive):
    kind, fake, make = upstream
    model, before, first_token = ADAPTERS[kind]
    backend = make(first=LONG, idle=IDLE)
    # one token (after the cloud's role-only delta), then nothing -- or only keep-alives
    fake.fault = Fault("stall", after=before + 1, delay=HOLD, interval=keepalive)
    events, err, _, since_first = await drain(backend.generate(chat(model)))
    assert [e.text for e in events] == [first_token]
    assert isinstance(err, DeadlineExceeded)
    assert err.message == f"{backend.name}: no token for {IDLE:g} s (idle_timeout)"
    assert since_first is not None and IDLE * 0.9 <= since_first < IDLE + SLACK
    await assert_upstream_hung_up(fake)


async def test_keepalive_lines_are_read_past_when_the_token_comes_in_time(upstream):
    """Keep-alives are not an error and not content: with clocks longer than
    the keep-alive phase, the answer comes through whole."""
    kind, fake, make = upstream
    model = ADAPTERS[kind][0]
    backend = make(first=LONG, idle=LONG)
    fake.fault = Fault("keepalive", delay=0.3, interval=0.02)
    events = await collect(backend.generate(chat(model)))
    assert isinstance(events[-1], Done)
    text = "".join(e.text for e in events if isinstance(e, Chunk))
    assert text == ("Hello, world!" if kind == "ollama" else "Hi there")
    assert fake.disconnects == 0


@pytest.mark.parametrize("kind", list(ADAPTERS))
async def test_the_fakes_really_send_keepalive_lines_and_no_token(kind, ollama, cloud, claude):
    """What the keep-alive tests rely on: the fake's wire during "keepalive"."""
    if kind == "anthropic":
        url = claude.base_url + "/v1/messages"
        body = {"model": "claude-test", "max_tokens": 5, "stream": True, "messages": [{"role": "user",
                                                                                      "content": "x"}]}
        claude.fault = Fault("keepalive", delay=0.3, interval=0.02, times=1)
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body, headers={"anthropic-version": "2023-06-01"}) as r:
                raw = await r.text()
        datas = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
        first_token = next(i for i, d in enumerate(datas) if d["type"] == "content_block_delta")
        kinds = [d["type"] for d in datas[:first_token]]
        assert kinds[0] == "message_start" and kinds[-1] == "content_block_start"
        assert kinds.count("ping") >= 5 and set(kinds[1:-1]) == {"ping"}
        return
    if kind == "ollama":
        url, body = ollama.url + "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        ollama.fault = Fault("keepalive", delay=0.3, interval=0.02, times=1)
    else:
        url, body = cloud.base_url + "/chat/completions", {"model": "gpt-test", "stream": True,
                                                             "messages": [{"role": "user", "content": "x"}]}
        cloud.fault = Fault("keepalive", delay=0.3, interval=0.02, times=1)
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body) as r:
            raw = await r.read()
    lines = raw.split(b"\n")
    first_token = next(i for i, line in enumerate(lines) if b"Hello" in line or b'"Hi"' in line)
    before = lines[:first_token]
    if kind == "ollama":
        assert before.count(b"") >= 3 and before.count(b"{}") >= 3
        assert all(line in (b"", b"{}") or json.loads(line)["message"]["content"] == "" for line in before)
    else:
        assert before.count(b": keep-alive") >= 5
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in before if line.startswith(b"data: ")]
        assert deltas == [{"role": "assistant", "content": ""}]


async def test_unary_calls_are_bounded_as_a_whole(cloud):
    backend = cloud_backend(cloud, first=0.3, connect=0.2)
    cloud.fault = Fault("hang", delay=HOLD)  # /embeddings sends nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            await backend.embed(EmbedRequest(model="gpt-test", inputs=["x"]))
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert info.value.message == "cloud:acme: no answer within 0.5 s (connect_timeout + first_token_timeout)"
        await assert_upstream_hung_up(cloud)
    finally:
        await backend.close()


async def test_connect_timeout_names_its_clock():
    """A listener whose accept backlog is full leaves new connections unanswered."""
    srv = socket.socket()
    fillers: list[socket.socket] = []
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        if select.select([], [fillers[-1]], [], 0.2)[1]:
            pytest.skip("this system completes connections past a full backlog")
        b = OllamaBackend(OllamaConfig(upstream=f"http://127.0.0.1:{port}", connect_timeout=0.3,
                                       first_token_timeout=LONG, idle_timeout=LONG))
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await collect(b.generate(chat("tiny")))
            assert time.monotonic() - t0 < 0.3 + SLACK
            assert info.value.message == "ollama: could not connect to upstream within 0.3 s (connect_timeout)"
        finally:
            await b.close()
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_time_the_caller_holds_the_stream_is_not_the_upstreams_silence():
    """An upstream that sends only as fast as it is read (backpressure) is not
    idle while the caller is busy with the previous token."""

    async def parts():
        yield b'{"response": "a", "done": false}\n'
        await asyncio.sleep(0.3)  # starts only once the caller reads again
        yield b'{"response": "b", "done": false}\n'

    async def post(url, **kwargs):
        return SimpleNamespace(status=200, content=SimpleNamespace(iter_any=parts), close=lambda: None)

    stream = UpstreamStream("up", UpstreamTimeouts(connect_timeout=1, first_token_timeout=1, idle_timeout=1))
    try:
        await stream.open(SimpleNamespace(post=post), "http://up/")
        lines = aiter(stream)
        assert b'"a"' in await anext(lines)
        stream.token()
        await asyncio.sleep(1.2)  # the caller holds the stream past idle_timeout
        assert b'"b"' in await anext(lines)
    finally:
        stream.close()


# ------------------------------------------------------------------ through the router


@pytest.mark.parametrize("first", list(UPSTREAMS))
@pytest.mark.parametrize("mode", HUNG)
async def test_router_falls_back_when_the_first_backend_hangs_before_its_first_token(ollama, cloud, first, mode):
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.ollama = OllamaConfig(upstream=ollama.url, connect_timeout=2, first_token_timeout=FIRST, idle_timeout=LONG)
    cfg.cloud.providers = [CloudProvider("acme", cloud.base_url, connect_timeout=2, first_token_timeout=FIRST,
                                         idle_timeout=LONG)]
    order = ["ollama:tiny", "cloud:acme:gpt-test"]
    cfg.aliases = {"m": order if first == "ollama" else order[::-1]}
    hung, second = (ollama, cloud) if first == "ollama" else (cloud, ollama)
    hung.fault = Fault(mode, delay=HOLD)
    router = Router(build_backends(cfg, {}), cfg.router, cfg.aliases)
    try:
        t0 = time.monotonic()
        events = await collect(router.generate(chat("m")))
        assert time.monotonic() - t0 < FIRST + SLACK
        done = events[-1]
        assert isinstance(done, Done) and done.backend == ("cloud:acme" if first == "ollama" else "ollama")
        text = "".join(e.text for e in events if isinstance(e, Chunk))
        assert text == ("Hi there" if first == "ollama" else "Hello, world!")  # the second backend's answer
        await assert_upstream_hung_up(hung)
        assert second.disconnects == 0
    finally:
        await router.close()


# ------------------------------------------------------------------ through gRPC and the HTTP front


@pytest.fixture
async def front(ollama, cloud):
    """The real gRPC service and HTTP front over a router of the two adapters;
    "tiny" is only at Ollama and "gpt-test" only at the cloud, so nothing
    falls back."""
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.ollama = OllamaConfig(upstream=ollama.url, connect_timeout=2, first_token_timeout=FIRST, idle_timeout=IDLE)
    cfg.cloud.providers = [CloudProvider("acme", cloud.base_url, connect_timeout=2, first_token_timeout=FIRST,
                                         idle_timeout=IDLE)]
    router = Router(build_backends(cfg, {}), cfg.router, cfg.aliases)
    service = await start_inference_service(router, port=0)
    http = await start_http(create_app(ServerConfig(request_timeout=30), service.target))
    try:
        yield http.url
    finally:
        await http.stop()
        await service.stop(grace=0.5)
        await router.close()


def _requests(kind: str) -> dict:
    model = UPSTREAMS[kind][0]
    msgs = [{"role": "user", "content": "x"}]
    return {"ollama": ("/api/chat", {"model": model, "messages": msgs}),
            "openai": ("/v1/chat/completions", {"model": model, "messages": msgs, "stream": True})}


@pytest.mark.parametrize("kind", list(UPSTREAMS))
async def test_front_answers_504_in_each_dialect_when_no_token_comes(front, ollama, cloud, kind):
    fake = ollama if kind == "ollama" else cloud
    fake.fault = Fault("keepalive", delay=HOLD)
    who = "ollama" if kind == "ollama" else "cloud:acme"
    want = f"{who}: no token within {FIRST:g} s of the request (first_token_timeout)"
    reqs = _requests(kind)
    async with aiohttp.ClientSession() as s:
        for dialect in ("ollama", "openai"):
            path, body = reqs[dialect]
            t0 = time.monotonic()
            async with s.post(front + path, json=body) as r:
                assert r.status == 504
                assert r.content_type == "application/json"
                data = await r.json()
            assert time.monotonic() - t0 < FIRST + SLACK
            if dialect == "ollama":
                assert data == {"error": want}
            else:
                assert data["error"]["message"] == want and data["error"]["type"] == "server_error"
    await eventually(lambda: fake.disconnects == 2, what="both requests hung up on the upstream")


@pytest.mark.parametrize("kind", list(UPSTREAMS))
async def test_front_ends_the_stream_with_the_idle_error_after_the_first_token(front, ollama, cloud, kind):
    fake = ollama if kind == "ollama" else cloud
    _, before, first_token = UPSTREAMS[kind]
    fake.fault = Fault("stall", after=before + 1, delay=HOLD, interval=0.05)
    who = "ollama" if kind == "ollama" else "cloud:acme"
    want = f"{who}: no token for {IDLE:g} s (idle_timeout)"
    reqs = _requests(kind)
    async with aiohttp.ClientSession() as s:
        path, body = reqs["ollama"]
        async with s.post(front + path, json=body) as r:
            assert r.status == 200
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        assert lines[0]["message"]["content"] == first_token
        assert lines[-1] == {"error": want}
        assert not any(x.get("done") for x in lines)

        path, body = reqs["openai"]
        async with s.post(front + path, json=body) as r:
            assert r.status == 200
            raw = await r.text()
    events = [e for e in raw.split("\n\n") if e.startswith("data: ")]
    assert "data: [DONE]" not in events
    last = json.loads(events[-1][len("data: "):])
    assert last["error"]["message"] == want and last["error"]["type"] == "server_error"
    contents = [json.loads(e[len("data: "):])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert first_token in contents
    await eventually(lambda: fake.disconnects == 2, what="both requests hung up on the upstream")


# ------------------------------------------------------------------ configuration


async def test_env_defaults_reach_the_adapters(ollama, cloud):
    env = {
        "MLXGATE_CONNECT_TIMEOUT": "2",
        "MLXGATE_FIRST_TOKEN_TIMEOUT": "0.3",
        "MLXGATE_IDLE_TIMEOUT": "0.7",
        "MLXGATE_MLX_ENABLED": "0",
        "OLLAMA_UPSTREAM": ollama.url,
        "OPENAI_BASE_URL": cloud.base_url,
        "OPENAI_API_KEY": "sk-test",
    }
    cfg = load_config(env=env)
    backends = build_backends(cfg, env)
    try:
        assert [b.name for b in backends] == ["ollama", "cloud:openai"]
        for b in backends:
            assert b.timeouts == UpstreamTimeouts(connect_timeout=2.0, first_token_timeout=0.3, idle_timeout=0.7)
        cloud.fault = Fault("keepalive", delay=HOLD)
        events, err, took, _ = await drain(backends[1].generate(chat("gpt-test")))
        assert events == [] and isinstance(err, DeadlineExceeded)
        assert err.message == "cloud:openai: no token within 0.3 s of the request (first_token_timeout)"
        assert took < 0.3 + SLACK
    finally:
        for b in backends:
            await b.close()
