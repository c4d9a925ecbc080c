"""The gRPC service's door, in process on port 0: API keys, malformed messages,
message size limits, the drain flag, exclusive ports."""

from __future__ import annotations

import logging
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backends.gate import FRONT_TOKEN_KEY, MALFORMED_LOG_INTERVAL, RateLimitedWarning
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from gateway.errors import error_response, from_grpc
from mlxgate.config import ServerConfig
from mlxgate.ports import PortInUse
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.scripted_backend import ScriptedBackend
from tests.reflection_client import v1_reflection_call

MODEL = "m"
KEYS = ("key-one", "key-two")
SERVICE = "/mlxgate.v1.InferenceService/"


def bearer(key: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {key}"),)


@pytest.fixture
async def open_service():
    svc = await start_inference_service(ScriptedBackend("mlx", [MODEL]), port=0, front_token="front-secret")
    yield svc
    await svc.stop(0)


@pytest.fixture
async def keyed_service():
    svc = await start_inference_service(ScriptedBackend("mlx", [MODEL]), port=0, api_keys=KEYS)
    yield svc
    await svc.stop(0)


# ---------------------------------------------------------------- malformed messages

MALFORMED = [
    b"\xff\xff\xff\xff",  # not a valid tag
    b"\x0a\x05ab",  # a length-delimited field running past the end
    b"\x0a\x02\xff\xfe",  # field 1 (model, a string) that is not UTF-8; ListModelsRequest has no field 1
]


async def test_malformed_messages_are_invalid_argument_with_no_traceback(open_service, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    async with grpc.aio.insecure_channel(open_service.target) as ch:
        generate = ch.unary_stream(SERVICE + "Generate")  # raw bytes in, raw bytes out
        list_models = ch.unary_unary(SERVICE + "ListModels")
        embed = ch.unary_unary(SERVICE + "Embed")
        for i in range(50):
            data = MALFORMED[i % len(MALFORMED)]
            for kind, call in (("GenerateRequest", None), ("ListModelsRequest", list_models), ("EmbedRequest", embed)):
                if kind == "ListModelsRequest" and data == MALFORMED[2]:
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    if call is None:
                        async for _ in generate(data):
                            pass
                    else:
                        await call(data)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, data, ei.value.details())
                assert ei.value.details().startswith(f"malformed {kind}")
        # The service still answers well-formed calls.
        stub = pb_grpc.InferenceServiceStub(ch)
        assert [m.name for m in (await stub.ListModels(pb.ListModelsRequest())).models] == [MODEL]
    elapsed = time.monotonic() - started
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    warnings = [r for r in caplog.records if r.name == "backends.gate" and r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 1 + elapsed // MALFORMED_LOG_INTERVAL  # for 134 malformed calls
    assert all("\n" not in r.getMessage() for r in warnings)


def test_rate_limited_warning_counts_what_it_suppressed(caplog) -> None:
    now = [100.0]
    warn = RateLimitedWarning(logging.getLogger("test.rate"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.rate"):
        assert warn("bad %s", "one")
        for _ in range(5):
            now[0] += 1.0
            assert not warn("bad %s", "again")
        now[0] += 10.0
        assert warn("bad %s", "later")
    assert [r.getMessage() for r in caplog.records] == ["bad one", "bad later (5 more since the last such warning)"]


# ---------------------------------------------------------------- API keys


async def test_keys_are_required_on_every_inference_method(keyed_service, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(keyed_service.target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        refused = [
            ((), "missing API key"),
            (bearer("wrong-key"), "invalid API key"),
            (bearer(KEYS[0], "Basic"), "invalid API key"),
            (bearer(KEYS[0] + "x"), "invalid API key"),
        ]
        for metadata, message in refused:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert (ei.value.code(), ei.value.details().split(":")[0]) == (grpc.StatusCode.UNAUTHENTICATED, message)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in stub.Generate(pb.GenerateRequest(model=MODEL), metadata=metadata):
                    pass
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Embed(pb.EmbedRequest(model=MODEL, input=["a"]), metadata=metadata)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED

        for metadata in (bearer(KEYS[0]), bearer(KEYS[1]), bearer(KEYS[1], "bearer")):
            res = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert [m.name for m in res.models] == [MODEL]
        events = [e async for e in stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt=pb.PromptInput(prompt="hi")), metadata=bearer(KEYS[1]))]
        assert events[-1].WhichOneof("event") == "done"

        # Health and reflection stay open.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def list_services():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = [
            s.name
            async for resp in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(list_services())
            for s in resp.list_services_response.service
        ]
        assert "mlxgate.v1.InferenceService" in names
        request, call = v1_reflection_call(ch)  # reflection v1 too

        async def list_services_v1():
            yield request(list_services="")

        assert "mlxgate.v1.InferenceService" in [
            s.name async for resp in call(list_services_v1()) for s in resp.list_services_response.service
        ]
    assert not any(k in caplog.text for k in KEYS)


async def test_the_http_front_sends_its_first_key(keyed_service) -> None:
    for keys, status in ((list(KEYS), 200), ([], 401)):
        cfg = ServerConfig(port=0, api_keys=keys)
        http = await start_http(create_app(cfg, keyed_service.target), "127.0.0.1", 0)
        try:
            # The HTTP side wants the key too when keys are set (gateway/security.py).
            headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
            async with aiohttp.ClientSession() as s, s.get(http.url + "/api/tags", headers=headers) as r:
                assert r.status == status, await r.text()
                if status == 200:
                    assert [m["name"] for m in (await r.json())["models"]] == [f"{MODEL}:latest"]
        finally:
            await http.stop()


# ---------------------------------------------------------------- draining


async def test_draining_refuses_new_calls_except_the_in_process_front(open_service) -> None:
    async with grpc.aio.insecure_channel(open_service.target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        await open_service.begin_drain()
        for metadata in ((), ((FRONT_TOKEN_KEY, "guessed"),)):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert (ei.value.code(), ei.value.details()) == (grpc.StatusCode.UNAVAILABLE, "server shutting down")
        res = await stub.ListModels(pb.ListModelsRequest(), metadata=((FRONT_TOKEN_KEY, "front-secret"),))
        assert [m.name for m in res.models] == [MODEL]
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "mlxgate.v1.InferenceService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------- message size


async def test_oversize_messages_are_resource_exhausted_and_413_over_http() -> None:
    limit = 64 * 1024
    svc = await start_inference_service(ScriptedBackend("mlx", [MODEL]), port=0, max_message_bytes=limit)
    big = "x" * (2 * limit)
    try:
        # The service's own receive limit (the caller allows more).
        async with grpc.aio.insecure_channel(
            svc.target, options=[("grpc.max_send_message_length", 4 * limit)]
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await pb_grpc.InferenceServiceStub(ch).Embed(pb.EmbedRequest(model=MODEL, input=[big]))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in ei.value.details()

        # Through the HTTP front: 413 in both dialects, never 429 or "server busy";
        # once from the front's own channel limit, once from the service's.
        for front_limit in (limit, 4 * limit):
            cfg = ServerConfig(port=0, max_body_bytes=1024 * 1024, grpc_max_message_bytes=front_limit)
            http = await start_http(create_app(cfg, svc.target), "127.0.0.1", 0)
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(http.url + "/api/generate", json={"model": MODEL, "prompt": big}) as r:
                        assert r.status == 413, await r.text()
                        body = await r.json()
                        assert isinstance(body["error"], str) and "too large" in body["error"]
                    async with s.post(http.url + "/v1/completions", json={"model": MODEL, "prompt": big}) as r:
                        assert r.status == 413, await r.text()
                        err = (await r.json())["error"]
                        assert err["type"] == "invalid_request_error" and "too large" in err["message"]
                        assert "Retry-After" not in r.headers
            finally:
                await http.stop()
    finally:
        await svc.stop(0)


def test_only_the_size_limit_is_413_busy_stays_busy() -> None:
    size = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, details="CLIENT: Sent message larger than max (2000 vs. 1000)"
    )
    assert from_grpc(size).status == 413
    assert error_response(from_grpc(size), "ollama").status == 413
    busy = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, trailing_metadata=grpc.aio.Metadata(("retry-after", "3")),
        details="queue is full",
    )
    assert error_response(from_grpc(busy), "ollama").status == 503
    assert error_response(from_grpc(busy), "openai").status == 429


# ---------------------------------------------------------------- ports


async def test_a_second_service_on_the_same_port_fails(open_service) -> None:
    with pytest.raises(PortInUse) as ei:
        await start_inference_service(ScriptedBackend("mlx", [MODEL]), port=open_service.port)
    assert f"port {open_service.port} is already in use" in str(ei.value)
    assert "\n" not in str(ei.value)
    # SO_REUSEPORT is off on our socket: not even a server that asks for
    # port sharing (grpcio's default) can bind next to it.
    other = grpc.aio.server()
    try:
        with pytest.raises(RuntimeError):
            if other.add_insecure_port(f"127.0.0.1:{open_service.port}") == 0:
                raise RuntimeError("not bound")
    finally:
        await other.stop(0)


def test_the_ollama_port_message_names_ollama() -> None:
    msg = str(PortInUse("HTTP", "127.0.0.1", 11434))
    assert "11434" in msg and "ollama serve" in msg and "Ollama app" in msg and "\n" not in msg
    assert "Ollama" not in str(PortInUse("gRPC", "127.0.0.1", 50051))


async def test_malformed_reflection_requests_are_invalid_argument_without_tracebacks(open_service, caplog) -> None:
    """Reflection is open to anyone; its malformed requests get the same treatment as InferenceService's."""
    async with grpc.aio.insecure_channel(open_service.target) as ch:
        for name in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
            call = ch.stream_stream(f"/{name}/ServerReflectionInfo", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
            for _ in range(10):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    async for _ in call(iter([b"\xff\xff\xff"])):
                        pass
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
