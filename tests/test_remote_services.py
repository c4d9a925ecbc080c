"""Several machines behind one gateway, on loopback: two real `mlxgate service`
processes (sharing the generated test model's folder) and a front with both
as remote backends and no local engine.

The front is an in-process Stack (the composition `mlxgate serve` runs, with
MLX disabled and ``[[remote]]`` entries), so a test can look at its router;
one test runs `mlxgate serve` itself with MLXGATE_REMOTES and
MLXGATE_MLX_ENABLED=false.  The two shared services are keyed and survive
the module; the tests that stop a service (drain, SIGKILL) start their own
victim.  Streams that must stay open, or hang before their first token, come
from fake upstream Ollamas behind a service (tests/fakes/ollama_fake.py), so
nothing depends on how fast this machine generates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import aiohttp
import grpc
import pytest

from mlxgate.config import Config, RemoteService, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from mlxgate_cli.stack import Stack, start_stack
from tests.scrape import scrape
from tests.fakes.ollama_fake import Fault, FakeOllama
from tests.mlx_fixtures import TEST_MODEL
from tests.test_cli_serve import clean_env
from tests.test_shutdown import Proc, spawn
from tests.polling import eventually

pytestmark = pytest.mark.timeout(180)

KEY = "sk-fleet-0123456789abcdef"
AUTH = (("authorization", f"Bearer {KEY}"),)


# ------------------------------------------------------------------ processes


@dataclass
class Service:
    """One `mlxgate service` process."""

    proc: Proc
    target: str
    metrics_url: str

    async def metrics(self) -> dict[str, float]:
        return await scrape(self.metrics_url)

    async def call(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(self.target) as ch:
            return await getattr(pb_grpc.InferenceServiceStub(ch), method)(request, metadata=AUTH, timeout=60)


async def start_service(tmp: Path, models: Path, upstream: Optional[str] = None, **env: str) -> Service:
    args = ["service", "--grpc-port", "0", "--metrics-port", "0", "--models-dir", str(models)]
    if upstream:
        args += ["--ollama-upstream", upstream]
    p = await spawn(args, clean_env(tmp, MLXGATE_API_KEYS=KEY, MLXGATE_METRICS_PUBLIC="1", **env))
    assert p.proc.stdout is not None
    line = (await asyncio.wait_for(p.proc.stdout.readline(), 120)).decode()
    m = re.match(r"mlxgate: gRPC (\S+)\s+metrics (http://\S+)", line)
    if not m:
        p.kill()
        raise AssertionError(f"unexpected first line {line!r}; stderr: {await p.stderr_text()}")
    return Service(p, m.group(1), m.group(2) + "/metrics")


async def stop_service(s: Service) -> None:
    if s.proc.proc.returncode is None:
        s.proc.proc.send_signal(signal.SIGTERM)
        try:
            await s.proc.exit_status(30)
        finally:
            s.proc.kill()


@pytest.fixture(scope="module")
async def slow_upstream() -> AsyncIterator[FakeOllama]:
    """Service B's upstream: it has "slow" too (the model the SIGKILL test needs)."""
    fake = FakeOllama(models=["slow:latest"])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def fleet(tmp_path_factory, test_model_dir, slow_upstream) -> AsyncIterator[tuple[Service, Service]]:
    """Services A and B, keyed, both with the generated model's folder."""
    a = await start_service(tmp_path_factory.mktemp("svc-a"), test_model_dir)
    b = await start_service(tmp_path_factory.mktemp("svc-b"), test_model_dir, slow_upstream.url)
    try:
        yield a, b
    finally:
        await stop_service(a)
        await stop_service(b)


@contextlib.asynccontextmanager
async def front(*services: Service, key: str = KEY) -> AsyncIterator[Stack]:
    """The front `mlxgate serve` composes, in process: no local engine; the
    services as remotes remote:a, remote:b, ... in this order."""
    cfg = Config(server=ServerConfig(port=0, grpc_port=0, request_timeout=120))
    cfg.mlx.enabled = False
    cfg.remotes = [RemoteService(name=n, target=s.target, key=key) for n, s in zip("abc", services)]
    stack = await start_stack(cfg, env={})
    try:
        yield stack
    finally:
        await stack.stop()


def remote_of(stack: Stack, name: str) -> Any:
    assert stack.router is not None
    return stack.router.catalogue.by_name[f"remote:{name}"]


async def generate(http: aiohttp.ClientSession, base: str, n: int = 2, **extra: Any) -> tuple[str, dict]:
    """One non-streamed /api/generate on the test model: (x-mlxgate-backend, body)."""
    body = {"model": TEST_MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": n}, **extra}
    async with http.post(f"{base}/api/generate", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-mlxgate-backend"], await r.json()


def fallbacks_from(stack: Stack, backend: str) -> float:
    total = 0.0
    for family in stack.registry.collect():
        for s in family.samples:
            if s.name == "mlxgate_fallbacks_total" and s.labels.get("from_backend") == backend:
                total += s.value
    return total


# ------------------------------------------------------------------ keys


async def test_a_keyed_service_refuses_a_front_without_its_key(fleet) -> None:
    a, b = fleet
    async with aiohttp.ClientSession() as http:
        async with front(a, b, key="") as st:
            async with http.get(f"{st.http_url}/api/tags") as r:
                assert (await r.json())["models"] == []  # neither would list its models
            async with http.post(f"{st.http_url}/api/generate", json={"model": TEST_MODEL, "prompt": "hi"}) as r:
                assert r.status == 404
                assert "could not list: remote:a, remote:b" in (await r.json())["error"]
        async with front(a, b) as st:
            async with http.get(f"{st.http_url}/api/tags") as r:
                tags = {m["name"]: m["backend"] for m in (await r.json())["models"]}
            # Listed once, by the first service that has it (Ollama clients key models by name).
            assert tags[f"{TEST_MODEL}:latest"] == "remote:a" and tags["slow:latest"] == "remote:b"
            backend, answer = await generate(http, st.http_url)
            assert backend.startswith("remote:") and answer["eval_count"] == 2


# ------------------------------------------------------------------ placement


async def test_requests_prefer_the_warm_service_then_spread_over_both(fleet) -> None:
    a, b = fleet
    for s in (a, b):
        await s.call("UnloadModel", pb.UnloadModelRequest(model=TEST_MODEL))
    await b.call("LoadModel", pb.LoadModelRequest(model=TEST_MODEL))  # warm on B only (second in order)
    async with front(a, b) as st, aiohttp.ClientSession() as http:
        # Sequential: every one goes to the warm service.
        for _ in range(3):
            backend, _ = await generate(http, st.http_url)
            assert backend == "remote:b"
        assert (await a.call("ListRunning", pb.ListRunningRequest())).models == []  # A never loaded it

        await a.call("LoadModel", pb.LoadModelRequest(model=TEST_MODEL))
        # /api/ps shows where it lives: one row per service that has it loaded.
        async with http.get(f"{st.http_url}/api/ps") as r:
            rows = [(m["name"], m["backend"]) for m in (await r.json())["models"]]
        assert sorted(rows) == [(f"{TEST_MODEL}:latest", "remote:a"), (f"{TEST_MODEL}:latest", "remote:b")]

        # Concurrent: both warm now, so the least loaded takes each; both get some.
        results = await asyncio.gather(*(generate(http, st.http_url, n=32) for _ in range(6)))
        by = [backend for backend, _ in results]
        assert by.count("remote:a") >= 1 and by.count("remote:b") >= 1, by
        assert all(body["done"] for _, body in results)
        assert st.router is not None and st.router.in_flight == {"remote:a": 0, "remote:b": 0}


# ------------------------------------------------------------------ cancellation


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


async def test_a_cancelled_http_stream_cancels_the_remote_generation(fleet) -> None:
    a, b = fleet
    async with front(a, b) as st, aiohttp.ClientSession() as http:
        before = {s.target: _sum(await s.metrics(), "mlxgate_cancellations_total", model=TEST_MODEL)
                  for s in (a, b)}
        body = {"model": TEST_MODEL, "prompt": "Tell me a long story", "options": {"num_predict": -1}}
        resp = await http.post(f"{st.http_url}/api/generate", json=body)
        assert resp.status == 200
        assert json.loads(await resp.content.readline())["done"] is False
        service = a if resp.headers["x-mlxgate-backend"] == "remote:a" else b
        resp.close()  # the client goes away mid-stream

        async def stopped() -> bool:
            m = await service.metrics()
            return (m.get("mlxgate_engine_active_sequences") == 0
                    and _sum(m, "mlxgate_cancellations_total", model=TEST_MODEL) == before[service.target] + 1)

        await eventually(stopped, what="the remote engine dropping the cancelled sequence")
        assert st.router is not None
        await eventually(lambda: st.router.in_flight == {"remote:a": 0, "remote:b": 0}, what="front in flight 0")


# ------------------------------------------------------------------ `mlxgate serve` in front


async def test_serve_with_remotes_and_no_local_engine(tmp_path, fleet) -> None:
    a, b = fleet
    env = clean_env(tmp_path, MLXGATE_MLX_ENABLED="false", MLXGATE_REMOTES=f"{a.target},{b.target}",
                    MLXGATE_API_KEYS=KEY)  # the front's own key, shared with the remotes
    p = await spawn(["serve", "--port", "0", "--grpc-port", "0"], env)
    try:
        assert p.proc.stdout is not None
        line = (await asyncio.wait_for(p.proc.stdout.readline(), 120)).decode()
        m = re.match(r"mlxgate: HTTP (http://\S+)", line)
        assert m, f"{line!r}: {await p.stderr_text() if not line else ''}"
        base = m.group(1)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.get(f"{base}/api/tags") as r:
                tags = {t["name"]: t["backend"] for t in (await r.json())["models"]}
            assert tags[f"{TEST_MODEL}:latest"] == f"remote:{a.target}"
            backend, answer = await generate(http, base)
            assert backend in (f"remote:{a.target}", f"remote:{b.target}") and answer["eval_count"] == 2
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            assert f'mlxgate_backend_serving{{backend="remote:{a.target}"}} 1.0' in text
        # No local engine: MLX was never loaded into the process.
        maps = Path(f"/proc/{p.proc.pid}/maps")
        if maps.exists():
            assert "libmlx" not in maps.read_text()
        p.proc.send_signal(signal.SIGTERM)
        assert await p.exit_status(30) == 0
        stderr = await p.stderr_text()
        assert "Traceback" not in stderr and KEY not in stderr
    finally:
        p.kill()


# ------------------------------------------------------------------ a draining service


async def test_a_draining_service_receives_nothing_new(tmp_path, test_model_dir, fleet) -> None:
    _, b = fleet
    gated = FakeOllama(models=["gated:latest"], reply=["x ", "y "], gate=asyncio.Event())
    await gated.start()
    victim = await start_service(tmp_path, test_model_dir, gated.url, MLXGATE_SHUTDOWN_GRACE="60")
    try:
        # Without the drain, the victim would get everything: first in order and the only warm one.
        await victim.call("LoadModel", pb.LoadModelRequest(model=TEST_MODEL))
        await b.call("UnloadModel", pb.UnloadModelRequest(model=TEST_MODEL))
        async with front(victim, b) as st, aiohttp.ClientSession() as http:
            await eventually(lambda: remote_of(st, "a").health.value == "serving", what="remote:a serving")
            # A stream the victim holds (its upstream waits after the first line).
            async with grpc.aio.insecure_channel(victim.target) as ch:
                held = pb_grpc.InferenceServiceStub(ch).Generate(pb.GenerateRequest(
                    model="gated", prompt=pb.PromptInput(prompt="hi")), metadata=AUTH)
                assert (await held.read()).WhichOneof("event") == "chunk"

                victim.proc.proc.send_signal(signal.SIGTERM)  # drain: NOT_SERVING, the stream goes on
                await eventually(lambda: remote_of(st, "a").health.value == "not_serving",
                                 what="front seeing the drain")
                results = [await generate(http, st.http_url) for _ in range(2)]
                results += await asyncio.gather(*(generate(http, st.http_url) for _ in range(3)))
                assert [backend for backend, _ in results] == ["remote:b"] * 5
                assert fallbacks_from(st, "remote:a") == 0  # not even tried
                m = await victim.metrics()  # still answering while it drains
                assert _sum(m, "mlxgate_generate_requests_total", model=TEST_MODEL) == 0

                gated.gate.set()  # the held stream ends normally, and the victim exits
                rest = []
                while (msg := await held.read()) is not grpc.aio.EOF:
                    rest.append(msg)
                assert rest[-1].WhichOneof("event") == "done"
        assert await victim.proc.exit_status(30) == 0
    finally:
        victim.proc.kill()
        gated.gate.set()
        await gated.stop()


# ------------------------------------------------------------------ a service killed before the first token


async def test_killing_a_service_before_the_first_token_falls_back(tmp_path, test_model_dir, fleet,
                                                                   slow_upstream) -> None:
    _, b = fleet
    hung = FakeOllama(models=["slow:latest"], fault=Fault("hang", delay=60))
    await hung.start()
    victim = await start_service(tmp_path, test_model_dir, hung.url)
    try:
        async with front(victim, b) as st, aiohttp.ClientSession() as http:
            await eventually(lambda: remote_of(st, "a").health.value == "serving", what="remote:a serving")
            assert st.router is not None
            assert [t.backend.name for t in await st.router.targets("slow")] == ["remote:a", "remote:b"]
            rid = "rid-killed-before-first-token"
            request = asyncio.ensure_future(http.post(f"{st.http_url}/api/chat", headers={"X-Request-Id": rid}, json={
                "model": "slow", "stream": False, "messages": [{"role": "user", "content": "hi"}]}))
            # The victim has it (its upstream holds it): no token yet.  Kill it.
            await eventually(lambda: "/api/chat" in hung.paths(), what="the request reaching the victim's upstream")
            victim.proc.proc.send_signal(signal.SIGKILL)
            resp = await asyncio.wait_for(request, 60)
            assert resp.status == 200, await resp.text()  # no error seen by the client
            assert resp.headers["x-mlxgate-backend"] == "remote:b"
            assert (await resp.json())["message"]["content"] == "Hello, world!"
            assert st.registry.get_sample_value(
                "mlxgate_fallbacks_total", {"from_backend": "remote:a", "to_backend": "remote:b",
                                            "reason": "UNAVAILABLE"}) == 1
            # The request id crossed both hops: front -> service -> its upstream.
            assert rid in hung.request_ids and rid in slow_upstream.request_ids
            await eventually(lambda: remote_of(st, "a").health.value == "unreachable", what="front seeing it gone")
    finally:
        victim.proc.kill()
        await hung.stop()
