"""Process lifecycle against real `python -m mlxgate_cli` processes: the drain on
SIGTERM, the grace period running out, keys shared by the front and the
service, and ports that are taken.

Streams that must stay in flight while the test looks come from a fake
upstream Ollama whose stream waits on an event after its first line (the
fake runs on this test's event loop, so everything here is asyncio), so
nothing depends on how fast the machine generates.  One stream runs on the
generated MLX model as well.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.service import SERVICE_NAME
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.ollama_fake import FakeOllama
from tests.mlx_fixtures import TEST_MODEL
from tests.test_cli_serve import clean_env
from tests.polling import eventually

#: The fake upstream's model: its streams wait on ``fake.gate`` after the first line.
GATED = "gated"
KEY = "sk-test-lifecycle"


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    stderr: "asyncio.Task[bytes]"
    http: str = ""
    grpc_target: str = ""

    async def exit_status(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stderr_text(self) -> str:
        return (await asyncio.wait_for(self.stderr, 10)).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def spawn(args: list[str], env: dict[str, str]) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlxgate_cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert proc.stderr is not None
    return Proc(proc, asyncio.ensure_future(proc.stderr.read()))


async def start(args: list[str], env: dict[str, str]) -> Proc:
    """Start the process and read the line it prints once it listens."""
    p = await spawn(args, env)
    assert p.proc.stdout is not None
    line = (await asyncio.wait_for(p.proc.stdout.readline(), 120)).decode()
    if not line:
        p.kill()
        raise AssertionError(f"process ended before listening; stderr: {await p.stderr_text()}")
    m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line) or re.match(r"mlxgate: gRPC (\S+)", line)
    assert m, f"unexpected first line {line!r}"
    if m.lastindex == 2:
        p.http, p.grpc_target = m.group(1), m.group(2)
    else:
        p.grpc_target = m.group(1)
    return p


@pytest.fixture
async def fake() -> Any:
    f = FakeOllama(models=[f"{GATED}:latest"], reply=[f"piece{i} " for i in range(8)], gate=asyncio.Event())
    await f.start()
    yield f
    f.gate.set()
    await f.stop()


def serve_args(models: Path, upstream: str) -> list[str]:
    return ["serve", "--port", "0", "--grpc-port", "0", "--models-dir", str(models), "--ollama-upstream", upstream]


async def health_status(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return resp.status


async def wait_not_serving(target: str) -> None:
    """The signal is handled asynchronously: poll (generously) for NOT_SERVING."""
    async def not_serving() -> bool:
        return await health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually(not_serving, 20, "health NOT_SERVING")


async def read_lines(resp: aiohttp.ClientResponse) -> list[str]:
    return [line.decode().strip() async for line in resp.content if line.strip()]


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    """The remaining messages of a stream already read with ``read()``."""
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


def generate_request(model: str, **sampling: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, prompt=pb.PromptInput(prompt="hi", raw=True), sampling=pb.SamplingParams(**sampling)
    )


async def test_sigterm_drains_streams_and_refuses_new_work(tmp_path, test_model_dir, fake) -> None:
    p = await start(serve_args(test_model_dir, fake.url), clean_env(tmp_path))
    try:
        async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(p.grpc_target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            # In flight before the signal: an HTTP NDJSON stream and a gRPC
            # stream on the gated upstream model, an HTTP stream on MLX.
            chat = await http.post(f"{p.http}/api/chat", json={
                "model": GATED, "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status == 200
            assert json.loads(await chat.content.readline())["done"] is False
            grpc_stream = stub.Generate(generate_request(GATED))
            assert (await grpc_stream.read()).WhichOneof("event") == "chunk"
            mlx = await http.post(f"{p.http}/api/generate", json={
                "model": TEST_MODEL, "prompt": "hi", "options": {"num_predict": 600, "temperature": 0}})
            assert mlx.status == 200
            assert json.loads(await mlx.content.readline())["done"] is False

            p.proc.send_signal(signal.SIGTERM)
            await wait_not_serving(p.grpc_target)
            assert await health_status(p.grpc_target, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING

            # New HTTP requests: 503 + Retry-After, in each dialect's shape.
            async with http.get(f"{p.http}/api/tags") as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
                body = await r.json()
                assert isinstance(body["error"], str) and "shutting down" in body["error"]
            async with http.post(f"{p.http}/v1/chat/completions", json={
                    "model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
                err = (await r.json())["error"]
                assert "shutting down" in err["message"] and err["type"] == "server_error"

            # New gRPC calls: UNAVAILABLE.
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in stub.Generate(generate_request(TEST_MODEL, max_tokens=2), timeout=10):
                    pass
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in ei.value.details()
            assert p.proc.returncode is None  # still draining

            # The streams in flight run to their normal end.
            fake.gate.set()
            lines = await read_lines(chat)
            assert json.loads(lines[-1])["done"] is True and not any("error" in json.loads(x) for x in lines)
            events = await read_rest(grpc_stream)
            assert events[-1].WhichOneof("event") == "done"
            # The 7 remaining pieces (lines that arrive together travel as one chunk).
            text = "".join(e.chunk.text for e in events if e.WhichOneof("event") == "chunk")
            assert text == "".join(f"piece{i} " for i in range(1, 8)), text
            lines = await read_lines(mlx)
            last = json.loads(lines[-1])
            assert last["done"] is True and last["eval_count"] == 600, last

        assert await p.exit_status(30) == 0
        assert "Traceback" not in await p.stderr_text()
    finally:
        p.kill()


async def test_streams_outliving_the_grace_period_end_with_an_error(tmp_path, test_model_dir, fake) -> None:
    env = clean_env(tmp_path, MLXGATE_SHUTDOWN_GRACE="1")
    p = await start(serve_args(test_model_dir, fake.url), env)
    try:
        async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(p.grpc_target) as ch:
            ndjson = await http.post(f"{p.http}/api/generate", json={"model": GATED, "prompt": "hi"})
            assert json.loads(await ndjson.content.readline())["done"] is False
            sse = await http.post(f"{p.http}/v1/chat/completions", json={
                "model": GATED, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert (await sse.content.readline()).startswith(b"data: {")
            grpc_stream = pb_grpc.InferenceServiceStub(ch).Generate(generate_request(GATED))
            assert (await grpc_stream.read()).WhichOneof("event") == "chunk"

            started = asyncio.get_running_loop().time()
            p.proc.send_signal(signal.SIGTERM)
            # The gate never opens: after the grace period every stream ends with an error.
            last = json.loads((await read_lines(ndjson))[-1])
            assert "shutting down" in last["error"]
            sse_events = [x for x in await read_lines(sse) if x.startswith("data: ")]
            assert sse_events[-1] != "data: [DONE]"
            assert "shutting down" in json.loads(sse_events[-1][len("data: "):])["error"]["message"]
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await read_rest(grpc_stream)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ei.value.details() == "server shutting down"

        assert await p.exit_status(30) == 0
        assert asyncio.get_running_loop().time() - started < 1 + 15  # grace + generous slack
        assert "Traceback" not in await p.stderr_text()
    finally:
        p.kill()


async def test_a_second_signal_ends_the_drain_at_once(tmp_path, test_model_dir, fake) -> None:
    p = await start(serve_args(test_model_dir, fake.url), clean_env(tmp_path))  # default grace: 30 s
    try:
        async with aiohttp.ClientSession() as http:
            ndjson = await http.post(f"{p.http}/api/generate", json={"model": GATED, "prompt": "hi"})
            assert json.loads(await ndjson.content.readline())["done"] is False
            started = asyncio.get_running_loop().time()
            p.proc.send_signal(signal.SIGTERM)
            await wait_not_serving(p.grpc_target)
            p.proc.send_signal(signal.SIGINT)
            last = json.loads((await read_lines(ndjson))[-1])
            assert "shutting down" in last["error"]
        assert await p.exit_status(30) == 0
        assert asyncio.get_running_loop().time() - started < 25  # well before the 30 s grace
        assert "Traceback" not in await p.stderr_text()
    finally:
        p.kill()


async def test_service_alone_drains_grpc(tmp_path, test_model_dir, fake) -> None:
    p = await start(
        ["service", "--grpc-port", "0", "--metrics-port", "0", "--models-dir", str(test_model_dir),
         "--ollama-upstream", fake.url],
        clean_env(tmp_path),
    )
    try:
        async with grpc.aio.insecure_channel(p.grpc_target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            stream = stub.Generate(generate_request(GATED))
            assert (await stream.read()).WhichOneof("event") == "chunk"
            p.proc.send_signal(signal.SIGTERM)
            await wait_not_serving(p.grpc_target)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            fake.gate.set()
            events = await read_rest(stream)
            assert events[-1].WhichOneof("event") == "done"
        assert await p.exit_status(30) == 0
        assert "Traceback" not in await p.stderr_text()
    finally:
        p.kill()


async def test_serve_with_api_keys_front_and_service_share_them(tmp_path, test_model_dir, fake) -> None:
    p = await start(serve_args(test_model_dir, fake.url), clean_env(tmp_path, MLXGATE_API_KEYS=f"other-key,{KEY}"))
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            # The front reaches the keyed service: its calls carry the (first) key.
            async with http.get(f"{p.http}/api/tags") as r:
                assert r.status == 200
                assert f"{TEST_MODEL}:latest" in [m["name"] for m in (await r.json())["models"]]
            async with http.post(f"{p.http}/api/generate", json={
                    "model": TEST_MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}) as r:
                assert r.status == 200 and (await r.json())["eval_count"] == 3
        async with grpc.aio.insecure_channel(p.grpc_target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            res = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {KEY}"),))
            assert TEST_MODEL in [m.name for m in res.models]
            assert await health_status(p.grpc_target) == health_pb2.HealthCheckResponse.SERVING
        p.proc.send_signal(signal.SIGTERM)
        assert await p.exit_status(30) == 0
        stderr = await p.stderr_text()
        assert KEY not in stderr and "other-key" not in stderr
    finally:
        p.kill()


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("which", ["gRPC", "HTTP"])
async def test_a_busy_port_is_one_line_and_exit_status_2(tmp_path, test_model_dir, which) -> None:
    with _listening_socket() as busy:
        port = str(busy.getsockname()[1])
        args = ["serve", "--models-dir", str(test_model_dir), "--log-level", "WARNING"]
        args += ["--port", "0", "--grpc-port", port] if which == "gRPC" else ["--port", port, "--grpc-port", "0"]
        p = await spawn(args, clean_env(tmp_path))
        try:
            assert await p.exit_status(60) == 2
            stderr = await p.stderr_text()
        finally:
            p.kill()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("mlxgate: ") and which in lines[0] and port in lines[0] and "in use" in lines[0]


async def test_second_serve_on_the_same_grpc_port_fails(tmp_path, test_model_dir, fake) -> None:
    first = await start(serve_args(test_model_dir, fake.url), clean_env(tmp_path))
    try:
        grpc_port = first.grpc_target.rsplit(":", 1)[1]
        second = await spawn(
            ["serve", "--port", "0", "--grpc-port", grpc_port, "--models-dir", str(test_model_dir)],
            clean_env(tmp_path),
        )
        try:
            assert await second.exit_status(60) == 2
            assert f"port {grpc_port} is already in use" in await second.stderr_text()
        finally:
            second.kill()
        first.proc.send_signal(signal.SIGTERM)
        assert await first.exit_status(30) == 0
    finally:
        first.kill()

