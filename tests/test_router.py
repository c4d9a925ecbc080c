"""The router: resolution, fallback before the first token, the fault matrix,
circuit breakers, listings, and the metrics hook.

Real adapters over real HTTP (fake upstream Ollama, fake OpenAI-compatible
cloud) for the fault matrix and the breaker; in-process scripted backends
where only the router's own logic is under test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import pytest

from backends.breaker import CircuitBreaker, State
from backends.cloud import CloudBackend
from backends.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from mlxgate_cli.factory import build_backends, build_router
from backends.ollama import OllamaBackend
from backends.routing import REASONS, Router
from backends.types import Chunk, Done, EmbedRequest
from mlxgate.config import CloudProvider, Config, OllamaConfig, RouterConfig
from tests.fakes.ollama_fake import Fault, FakeOllama
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.scripted_backend import ScriptedBackend
from tests.fakes.streams import collect
from tests.polling import eventually
from tests.request_builders import chat

pytestmark = pytest.mark.timeout(30)

SECRET = "sk-router-SECRET-00112233445566778899"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Recorder:
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    answers: list[tuple[str, str]] = field(default_factory=list)

    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None:
        assert reason in REASONS
        self.fallbacks.append((from_backend, to_backend, reason))

    def answered(self, backend: str, model: str) -> None:
        self.answers.append((backend, model))


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Chunk))


def config(**router) -> Config:
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.router = RouterConfig(**router)
    return cfg


# ------------------------------------------------------------------ real adapters over fake upstreams


@pytest.fixture
async def upstreams():
    ollama, cloud = FakeOllama(), FakeOpenAI(api_key=SECRET)
    await ollama.start()
    await cloud.start()
    yield ollama, cloud
    await ollama.stop()
    await cloud.stop()


#: The upstream clocks where a test is not about them: far above what a loaded
#: machine needs for a fake's answer, so only a test that shortens them on
#: purpose (and makes the fake hang far longer) ever sees one run out.
ROOMY_CLOCKS = {"first_token_timeout": 10.0, "idle_timeout": 10.0, "connect_timeout": 5.0}
#: Short clocks, for the tests about them (the fake then hangs for HANG_S).
SHORT_CLOCKS = {"first_token_timeout": 0.3, "idle_timeout": 0.3, "connect_timeout": 0.5}
#: A hang that outlasts any clock here (the fake ends it early when the client goes away).
HANG_S = 60.0


def http_router(ollama_url: str, cloud: FakeOpenAI, clock=time.monotonic, aliases=True,
                clocks: dict[str, float] = ROOMY_CLOCKS, **router) -> tuple:
    cfg = config(**router)
    cfg.ollama = OllamaConfig(upstream=ollama_url, **clocks)
    cfg.cloud.providers = [CloudProvider("acme", cloud.base_url, api_key_env="ACME_KEY")]
    if aliases:
        cfg.aliases = {"m": ["ollama:tiny", "cloud:acme:gpt-test"]}
    rec = Recorder()
    r = Router(build_backends(cfg, {"ACME_KEY": SECRET}), cfg.router, cfg.aliases, observer=rec, clock=clock)
    return r, rec


@dataclass
class Row:
    id: str
    fault: Fault | None = None
    refused: bool = False
    model: str = "m"
    # expected: the backend that answers and the fallback reason, or the error
    answered_by: str | None = None
    reason: str | None = None
    error: type | None = None
    chunks_before_error: list[str] | None = None
    #: seconds between the upstream's lines (lines written together arrive as one chunk)
    chunk_delay: float = 0.0
    clocks: dict[str, float] = field(default_factory=lambda: ROOMY_CLOCKS)


FAULT_MATRIX = [
    Row("connection-refused", refused=True, answered_by="cloud:acme", reason="UNAVAILABLE"),
    Row("http-500", Fault("status", 500, "runner died"), answered_by="cloud:acme", reason="UNAVAILABLE"),
    Row("429-retry-after", Fault("status", 429, "busy", retry_after="5"), answered_by="cloud:acme",
        reason="RESOURCE_EXHAUSTED"),
    Row("timeout-before-first-token", Fault("hang_after_headers", delay=HANG_S), answered_by="cloud:acme",
        reason="DEADLINE_EXCEEDED", clocks=SHORT_CLOCKS),
    Row("error-line-before-first-token", Fault("error_line", message="oom", after=0), answered_by="cloud:acme",
        reason="UNAVAILABLE"),
    Row("disconnect-mid-stream", Fault("disconnect", after=1), error=Unavailable, chunks_before_error=["Hello"]),
    Row("error-line-mid-stream", Fault("error_line", message="oom", after=2), error=Unavailable,
        chunks_before_error=["Hello", ","], chunk_delay=0.05),
    Row("bad-request-is-not-retried", Fault("status", 400, "bad option"), error=InvalidArgument,
        chunks_before_error=[]),
    Row("unknown-model-everywhere", model="ghost", error=ModelNotFound, chunks_before_error=[]),
    Row("healthy", answered_by="ollama"),
]


@pytest.mark.parametrize("row", FAULT_MATRIX, ids=[r.id for r in FAULT_MATRIX])
async def test_fault_matrix(upstreams, row: Row, held_port):
    ollama, cloud = upstreams
    url = held_port.url if row.refused else ollama.url
    ollama.fault = row.fault
    ollama.chunk_delay = row.chunk_delay
    router, rec = http_router(url, cloud, clocks=row.clocks)
    got: list = []
    try:
        if row.error is not None:
            with pytest.raises(row.error) as info:
                async for ev in router.generate(chat(row.model)):
                    got.append(ev)
            assert [e.text for e in got] == row.chunks_before_error
            # never a silent splice: the other backend was not asked
            assert [p for p, *_ in cloud.requests if p.endswith("completions")] == []
            assert rec.fallbacks == []
            if row.error is ModelNotFound:
                msg = info.value.message
                assert "'ghost' not found" in msg
                for name in ("tiny:latest", "other:7b", "gpt-test", "m"):
                    assert name in msg
        else:
            got = await collect(router.generate(chat(row.model)))
            done = got[-1]
            assert isinstance(done, Done) and done.backend == row.answered_by
            assert text_of(got) == ("Hi there" if row.answered_by == "cloud:acme" else "Hello, world!")
            if row.reason is None:
                assert rec.fallbacks == []
            else:
                assert rec.fallbacks == [("ollama", row.answered_by, row.reason)]
            assert rec.answers == [(row.answered_by, "gpt-test" if row.answered_by == "cloud:acme" else "tiny")]
    finally:
        await router.close()


async def test_default_order_without_aliases_and_latest_matching(upstreams):
    ollama, cloud = upstreams
    cloud.models = ["gpt-test", "tiny"]
    router, rec = http_router(ollama.url, cloud, aliases=False)
    try:
        targets = await router.targets("tiny")
        assert [(t.backend.name, t.model) for t in targets] == [("ollama", "tiny:latest"), ("cloud:acme", "tiny")]
        assert [(t.backend.name, t.model) for t in await router.targets("tiny:latest")] == [
            ("ollama", "tiny:latest"), ("cloud:acme", "tiny")]
        ollama.fault = Fault("status", 503, "busy")
        events = await collect(router.generate(chat("tiny:latest")))
        assert events[-1].backend == "cloud:acme" and events[-1].model == "tiny"
        assert rec.fallbacks == [("ollama", "cloud:acme", "RESOURCE_EXHAUSTED")]
        ollama.fault = None
        events = await collect(router.generate(chat("tiny")))
        assert events[-1].backend == "ollama" and events[-1].model == "tiny:latest"
    finally:
        await router.close()


async def test_cancelling_through_the_router_closes_the_upstream_request(upstreams):
    ollama, cloud = upstreams
    ollama.reply = [f"t{i} " for i in range(200)]
    ollama.chunk_delay = 0.02
    router, _ = http_router(ollama.url, cloud)
    try:
        agen = router.generate(chat("m"))
        assert (await anext(agen)).text == "t0 "
        await agen.aclose()
        await asyncio.wait_for(ollama.disconnected.wait(), 5)
        assert router.breaker_states()["ollama"] == "closed"
    finally:
        await router.close()


# ------------------------------------------------------------------ circuit breaker


async def test_breaker_opens_after_n_failures_then_skips_the_dead_backend_fast(upstreams):
    ollama, cloud = upstreams
    clock = FakeClock()
    router, rec = http_router(ollama.url, cloud, clock=clock, clocks=SHORT_CLOCKS, breaker_failures=2,
                              breaker_cooldown=30)
    ollama.fault = Fault("hang", delay=HANG_S)  # every request times out (0.3 s) before a token
    try:
        for _ in range(2):
            t0 = time.monotonic()
            events = await collect(router.generate(chat("m")))
            assert events[-1].backend == "cloud:acme"
            assert time.monotonic() - t0 >= 0.3  # paid the timeout
        assert router.breaker_states()["ollama"] == "open"
        asked = len([p for p in ollama.paths() if p == "/api/chat"])
        assert asked == 2

        events = await collect(router.generate(chat("m")))
        assert events[-1].backend == "cloud:acme"
        # No timeout paid: the dead backend was not even asked (counted, not timed).
        assert len([p for p in ollama.paths() if p == "/api/chat"]) == asked
        assert rec.fallbacks[-1] == ("ollama", "cloud:acme", "CIRCUIT_OPEN")

        # cool-down over: one probe; the upstream has recovered, so it closes the breaker
        ollama.fault = None
        clock.advance(31)
        assert router.breaker_states()["ollama"] == "half_open"
        events = await collect(router.generate(chat("m")))
        assert events[-1].backend == "ollama"
        assert router.breaker_states()["ollama"] == "closed"
        events = await collect(router.generate(chat("m")))
        assert events[-1].backend == "ollama"
    finally:
        await router.close()


async def test_half_open_lets_one_probe_through_and_a_failed_probe_reopens(upstreams):
    ollama, cloud = upstreams
    clock = FakeClock()
    router, _ = http_router(ollama.url, cloud, clock=clock, breaker_failures=1, breaker_cooldown=10)
    try:
        ollama.fault = Fault("status", 500, "down")
        assert (await collect(router.generate(chat("m"))))[-1].backend == "cloud:acme"
        assert router.breaker_states()["ollama"] == "open"

        # failed probe: open again for another cool-down
        clock.advance(11)
        n = len(ollama.paths())
        assert (await collect(router.generate(chat("m"))))[-1].backend == "cloud:acme"
        assert len(ollama.paths()) == n + 1  # the probe went out
        assert router.breaker_states()["ollama"] == "open"
        assert (await collect(router.generate(chat("m"))))[-1].backend == "cloud:acme"
        assert len(ollama.paths()) == n + 1  # and nothing else did

        # successful probe, slow to its first token: while it is out, others skip
        clock.advance(11)
        ollama.fault = Fault("hang_after_headers", delay=2.0)  # slow, but within its clock (10 s)
        before = len(ollama.paths())
        probe = asyncio.create_task(collect(router.generate(chat("m"))))
        await eventually(lambda: len(ollama.paths()) == before + 1, what="the probe reached the upstream")
        assert router.breaker_states()["ollama"] == "half_open"
        other = await collect(router.generate(chat("m")))
        assert other[-1].backend == "cloud:acme"
        assert (await probe)[-1].backend == "ollama"
        assert len(ollama.paths()) == before + 1  # only the probe reached the upstream
        assert router.breaker_states()["ollama"] == "closed"
    finally:
        await router.close()


def test_breaker_state_machine():
    clock = FakeClock()
    b = CircuitBreaker(failures=3, cooldown=5, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is State.CLOSED
    b.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state is State.OPEN and not b.allow()
    clock.advance(4.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.allow()  # the probe
    assert not b.allow()  # only one
    b.release()  # the probe ended without a verdict (cancelled)
    assert b.allow()
    b.record_failure()
    assert b.state is State.OPEN and not b.allow()
    clock.advance(5)
    assert b.allow()
    b.record_success()
    assert b.state is State.CLOSED and b.allow() and b.allow()


# ------------------------------------------------------------------ router logic (scripted backends)


def scripted_router(*backends, aliases=None, clock=time.monotonic, **router):
    cfg = config(**router)
    cfg.aliases = aliases or {}
    rec = Recorder()
    return Router(list(backends), cfg.router, cfg.aliases, observer=rec, clock=clock), rec


async def test_mlx_unavailable_falls_back_with_no_error_seen():
    mlx = ScriptedBackend("mlx", ["llama3.2"], fail=Unavailable("mlx: model failed to load: out of memory"))
    oll = ScriptedBackend("ollama", ["llama3.2:latest"])
    router, rec = scripted_router(mlx, oll)
    events = await collect(router.generate(chat("llama3.2")))
    assert text_of(events) == "from ollama"
    done = events[-1]
    assert (done.backend, done.model) == ("ollama", "llama3.2:latest")  # who answered, name at that backend
    assert mlx.calls == [("generate", "llama3.2")] and oll.calls == [("generate", "llama3.2:latest")]
    assert rec.fallbacks == [("mlx", "ollama", "UNAVAILABLE")]
    assert rec.answers == [("ollama", "llama3.2:latest")]


async def test_failure_after_first_chunk_is_reraised_not_spliced():
    mlx = ScriptedBackend("mlx", ["x"], text=["a", "b", "c"], fail=Unavailable("mlx: crashed"), fail_after=1)
    oll = ScriptedBackend("ollama", ["x"])
    router, rec = scripted_router(mlx, oll, breaker_failures=1)
    got = []
    with pytest.raises(Unavailable, match="crashed"):
        async for ev in router.generate(chat("x")):
            got.append(ev)
    assert [e.text for e in got] == ["a"]
    assert oll.calls == [] and rec.fallbacks == []
    assert router.breaker_states()["mlx"] == "open"  # dying mid-stream counts against the breaker


@pytest.mark.parametrize("error", [InvalidArgument("bad"), Unauthenticated("no key")], ids=["invalid", "unauth"])
async def test_non_retryable_errors_propagate_at_once(error):
    first = ScriptedBackend("mlx", ["x"], fail=error)
    second = ScriptedBackend("ollama", ["x"])
    router, _ = scripted_router(first, second)
    with pytest.raises(type(error)):
        await collect(router.generate(chat("x")))
    assert second.calls == []


async def test_retry_budget_limits_targets_tried():
    bs = [ScriptedBackend(n, ["x"], fail=Unavailable(f"{n} down")) for n in ("mlx", "ollama", "cloud:a")]
    router, rec = scripted_router(*bs, retry_budget=2)
    with pytest.raises(Unavailable, match="ollama down"):
        await collect(router.generate(chat("x")))
    assert [len(b.calls) for b in bs] == [1, 1, 0]
    assert rec.fallbacks == [("mlx", "ollama", "UNAVAILABLE")]


async def test_resource_exhausted_everywhere_keeps_retry_after():
    a = ScriptedBackend("ollama", ["x"], fail=ResourceExhausted("ollama busy", retry_after=3))
    b = ScriptedBackend("cloud:a", ["x"], fail=ResourceExhausted("cloud busy", retry_after=9))
    router, _ = scripted_router(a, b)
    with pytest.raises(ResourceExhausted) as info:
        await collect(router.generate(chat("x")))
    assert info.value.retry_after == 9


async def test_aliases_take_precedence_and_unknown_backends_are_skipped(caplog):
    mlx = ScriptedBackend("mlx", ["Llama-3B-4bit"])
    oll = ScriptedBackend("ollama", ["llama3.2:latest"])
    cloud = ScriptedBackend("cloud:openai", ["gpt-4o-mini"])
    aliases = {"llama3.2": ["cloud:nope:x", "cloud:openai:gpt-4o-mini", "mlx:Llama-3B-4bit", "ollama:llama3.2"]}
    router, _ = scripted_router(mlx, oll, cloud, aliases=aliases)
    with caplog.at_level(logging.WARNING):
        targets = await router.targets("llama3.2:latest")
    assert [(t.backend.name, t.model) for t in targets] == [
        ("cloud:openai", "gpt-4o-mini"), ("mlx", "Llama-3B-4bit"), ("ollama", "llama3.2")]
    assert "cloud:nope:x" in caplog.text
    events = await collect(router.generate(chat("llama3.2")))
    assert events[-1].backend == "cloud:openai" and events[-1].model == "gpt-4o-mini"


async def test_done_keeps_the_model_name_the_backend_reported():
    b = ScriptedBackend("mlx", ["x"], report_model="x-4bit-resolved")
    router, _ = scripted_router(b)
    done = (await collect(router.generate(chat("x"))))[-1]
    assert (done.backend, done.model) == ("mlx", "x-4bit-resolved")


async def test_list_models_union_fallbacks_aliases_and_failing_listing():
    mlx = ScriptedBackend("mlx", ["llama3.2", "qwen"])
    oll = ScriptedBackend("ollama", ["llama3.2:latest", "mistral:7b"])
    broken = ScriptedBackend("cloud:down", ["gpt"], list_error=Unavailable("cloud:down: cannot connect"))
    cloud = ScriptedBackend("cloud:a", ["gpt-4o", "llama3.2"])
    router, _ = scripted_router(mlx, oll, broken, cloud, aliases={"fast": ["ollama:mistral:7b", "cloud:a:gpt-4o"]})
    models = await router.list_models()
    by_name = {m.name: m for m in models}
    assert len(by_name) == len(models)  # no duplicates
    assert set(by_name) == {"llama3.2", "qwen", "mistral:7b", "gpt-4o", "fast"}
    assert (by_name["llama3.2"].backend, by_name["llama3.2"].fallbacks) == ("mlx", ["ollama", "cloud:a"])
    assert (by_name["qwen"].backend, by_name["qwen"].fallbacks) == ("mlx", [])
    assert (by_name["fast"].backend, by_name["fast"].fallbacks) == ("ollama", ["cloud:a"])
    assert by_name["fast"].size_bytes == len("mistral:7b")  # details copied from the target
    # a model only the broken backend has: not found, and the message says who could not be listed
    with pytest.raises(ModelNotFound, match="could not list: cloud:down"):
        await collect(router.generate(chat("gpt")))


async def test_model_lists_are_cached_for_the_ttl():
    clock = FakeClock()
    b = ScriptedBackend("ollama", ["x"])
    router, _ = scripted_router(b, clock=clock, model_list_ttl=10)
    await collect(router.generate(chat("x")))
    await router.list_models()
    await router.targets("x")
    assert b.list_calls == 1
    clock.advance(10.5)
    await router.targets("x")
    assert b.list_calls == 2
    # a failed listing is cached too: a dead backend is not asked on every request
    b.list_error = Unavailable("down")
    clock.advance(10.5)
    assert await router.targets("x") == []
    assert await router.targets("x") == []
    assert b.list_calls == 3


async def test_unary_calls_route_like_generate():
    mlx = ScriptedBackend("mlx", ["x"], fail=Unavailable("mlx: not loaded"))
    oll = ScriptedBackend("ollama", ["x:latest"])
    router, rec = scripted_router(mlx, oll)
    res = await router.embed(EmbedRequest(model="x", inputs=["a", "b"]))
    assert res.backend == "ollama" and len(res.embeddings) == 2
    show = await router.show_model("x")
    assert show.info.backend == "ollama" and show.info.fallbacks == ["mlx"]
    load = await router.load_model("x", 60)
    assert load.backend == "ollama"
    assert [(r.name, r.backend) for r in await router.list_running()] == [("x:latest", "ollama")]
    mlx.fail = None
    mlx.loaded.add("x")
    assert await router.unload_model("x") is True  # unloaded wherever it was resident
    assert await router.list_running() == []
    assert await router.unload_model("x") is False
    with pytest.raises(ModelNotFound, match="available models: x"):
        await router.embed(EmbedRequest(model="nope", inputs=["a"]))
    assert ("mlx", "ollama", "UNAVAILABLE") in rec.fallbacks


async def test_running_lists_an_alias_whose_target_is_loaded():
    """Open WebUI shows an alias as loaded only when /api/ps names it."""
    mlx = ScriptedBackend("mlx", ["tiny", "big"])
    oll = ScriptedBackend("ollama", ["tiny:latest", "llama3.2:latest"])
    router, _ = scripted_router(mlx, oll, aliases={
        "chat": ["mlx:tiny", "ollama:llama3.2"], "chat2:latest": ["ollama:llama3.2", "mlx:tiny"],
        "cold": ["mlx:big"], "tiny": ["ollama:tiny"]})
    assert await router.list_running() == []
    mlx.loaded.add("tiny")
    running = [(r.name, r.backend) for r in await router.list_running()]
    # "tiny" is already listed under its own name; "cold" is not loaded.
    assert running == [("tiny", "mlx"), ("chat", "mlx"), ("chat2:latest", "mlx")]
    oll.loaded.add("llama3.2:latest")
    running = [(r.name, r.backend) for r in await router.list_running()]
    # The first loaded target in the alias's order describes it.
    assert ("chat", "mlx") in running and ("chat2:latest", "ollama") in running


# ------------------------------------------------------------------ wiring


def test_factory_builds_backends_in_priority_order():
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.ollama.upstream = "http://127.0.0.1:1"
    cfg.cloud.providers = [CloudProvider("a", "http://127.0.0.1:2/v1"), CloudProvider("b", "http://127.0.0.1:3/v1")]
    router = build_router(cfg, {})
    assert [b.name for b in router.backends] == ["ollama", "cloud:a", "cloud:b"]
    assert isinstance(router.backends[0], OllamaBackend) and isinstance(router.backends[1], CloudBackend)
    assert router.mlx_backend is None


async def test_factory_includes_mlx_first_when_enabled(tmp_path):
    try:
        from backends.mlx import MLXBackend  # noqa: F401
    except ImportError:
        try:
            from backends.mlx.backend import MLXBackend  # noqa: F401
        except ImportError:
            pytest.skip("the MLX engine (backends.mlx) is not there yet")
    cfg = Config()
    cfg.mlx.models_dir = str(tmp_path)
    cfg.mlx.bootstrap_test_model = False
    cfg.ollama.upstream = "http://127.0.0.1:1"
    router = build_router(cfg, {})
    try:
        assert [b.name for b in router.backends] == ["mlx", "ollama"]
        assert router.mlx_backend is router.backends[0]
    finally:
        await router.close()


async def test_through_the_grpc_service(upstreams):
    """The router is the one Backend the gRPC service takes; fallback is invisible to clients."""
    from backends.service import start_inference_service
    from mlxgate.v1 import inference_pb2 as pb
    from mlxgate.v1 import inference_pb2_grpc as pb_grpc

    ollama, cloud = upstreams
    ollama.fault = Fault("status", 500, "down")
    router, _ = http_router(ollama.url, cloud)
    service = await start_inference_service(router)
    try:
        async with grpc.aio.insecure_channel(service.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            req = pb.GenerateRequest(model="m", chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER,
                                                                                            content="hi")]))
            replies = [r async for r in stub.Generate(req)]
            assert "".join(r.chunk.text for r in replies if r.WhichOneof("event") == "chunk") == "Hi there"
            assert replies[-1].done.backend == "cloud:acme"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                req.model = "ghost"
                _ = [r async for r in stub.Generate(req)]
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "gpt-test" in info.value.details()
            listed = await stub.ListModels(pb.ListModelsRequest())
            assert {m.name for m in listed.models} >= {"tiny:latest", "gpt-test", "m"}
    finally:
        await service.stop(0)
        await router.close()


async def test_keys_never_reach_router_errors_or_logs(upstreams, caplog):
    caplog.set_level(logging.DEBUG)
    _, cloud = upstreams
    wrong = "sk-router-WRONG-99887766554433221100"
    cfg = config()
    cfg.cloud.providers = [
        CloudProvider("listed", cloud.base_url, api_key_env="ACME_KEY", models=["gpt-test"]),
        CloudProvider("asks", cloud.base_url, api_key_env="ACME_KEY"),
    ]
    router = Router(build_backends(cfg, {"ACME_KEY": wrong}), cfg.router, cfg.aliases)
    try:
        # generate: the upstream answers 401 and echoes the key; non-retryable, so it propagates
        with pytest.raises(Unauthenticated) as info:
            await collect(router.generate(chat("gpt-test")))
        assert "Incorrect API key provided" in info.value.message
        # listing: /models answers 401 too; the router logs and skips that provider
        names = [m.name for m in await router.list_models()]
        assert names == ["gpt-test"]
        assert "listing models failed" in caplog.text
    finally:
        await router.close()
    sent = [h.get("Authorization") for _, _, h in cloud.requests]
    assert sent and all(a == f"Bearer {wrong}" for a in sent)  # the key really went out
    for blob in (info.value.message, str(info.value), caplog.text, repr(router), repr(router.backends)):
        assert wrong not in blob and wrong[-8:] not in blob


def test_deadline_exceeded_counts_against_the_breaker():
    # the router's notion of a health failure, pinned down
    from backends.breaker import is_health_failure as _is_health_failure

    assert _is_health_failure(DeadlineExceeded("x")) and _is_health_failure(Unavailable("x"))
    assert not _is_health_failure(ModelNotFound("x")) and not _is_health_failure(ResourceExhausted("x"))


async def test_real_mlx_engine_that_cannot_load_a_model_falls_back_to_ollama(tmp_path):
    """The MLX engine lists a model whose weights are broken: loading it fails
    (Unavailable), and the request is answered by the upstream Ollama that has
    it, with no error seen by the caller.  A healthy local model stays on MLX."""
    try:
        from backends.mlx.backend import MLXBackend
        from backends.mlx.testmodel import write_test_model
    except ImportError:
        pytest.skip("the MLX engine is not there yet")
    import shutil

    from mlxgate.config import MLXConfig

    good = write_test_model(tmp_path, "tiny-llama")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    mlx = MLXBackend(MLXConfig(models_dir=str(tmp_path), hf_cache=str(tmp_path / "no-hf"),
                               bootstrap_test_model=False, default_max_tokens=4))
    fake = FakeOllama(models=["broken:latest"])
    await fake.start()
    cfg = config()
    cfg.ollama = OllamaConfig(upstream=fake.url, first_token_timeout=5, idle_timeout=5)
    rec = Recorder()
    router = Router([mlx, OllamaBackend(cfg.ollama)], cfg.router, cfg.aliases, observer=rec)
    try:
        assert [t.backend.name for t in await router.targets("broken")] == ["mlx", "ollama"]
        events = await collect(router.generate(chat("broken")))
        assert text_of(events) == "Hello, world!"
        assert (events[-1].backend, events[-1].model) == ("ollama", "broken:latest")
        assert rec.fallbacks == [("mlx", "ollama", "UNAVAILABLE")]

        events = await collect(router.generate(chat("tiny-llama")))
        assert events[-1].backend == "mlx" and events[-1].completion_tokens > 0
        assert fake.paths().count("/api/chat") == 1
    finally:
        await router.close()
        await fake.stop()


async def test_a_hung_model_listing_does_not_hold_routing(monkeypatch):
    import backends.routing.catalogue as router_module

    monkeypatch.setattr(router_module, "LIST_TIMEOUT_S", 0.1)
    hung = ScriptedBackend("ollama", ["x"], list_delay=5.0)
    ok = ScriptedBackend("cloud:a", ["x"])
    router, _ = scripted_router(hung, ok, breaker_failures=1)
    t0 = time.monotonic()
    events = await collect(router.generate(chat("x")))
    assert time.monotonic() - t0 < 3.0  # far below the 5 s the listing would hang
    assert events[-1].backend == "cloud:a" and hung.calls == []
    assert router.breaker_states()["ollama"] == "open"  # a timed-out listing is a health failure
