"""CloudBackend against a real OpenAI-compatible server (mlx_lm.server on the
generated test model) and, for faults, tool-call deltas and key handling,
against a fake that replays the OpenAI wire format."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from backends.cloud import CloudBackend
from backends.errors import (
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from backends.types import (
    Chunk,
    Done,
    EmbedRequest,
    GenerateRequest,
    Message,
    OutputFormat,
    Prompt,
    Sampling,
    Tool,
    ToolCall,
)
from mlxgate.config import CloudProvider
from tests.fakes.ollama_fake import Fault
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.streams import collect
from tests.ports import HeldPort
from tests.mlx_lm_server import ServerDidNotStart, launch_mlx_lm_server

pytestmark = pytest.mark.timeout(60)

SECRET = "sk-live-TOPSECRET-0123456789abcdef"



# ------------------------------------------------------------------ a real server: mlx_lm.server


@pytest.fixture(scope="session")
def mlx_lm_server(tmp_path_factory):
    """``mlx_lm.server`` serving the generated test model on a free port.

    Yields (base_url, model id as its /v1/models lists it); the subprocess is
    terminated (then killed) at the end of the session."""
    from backends.mlx.testmodel import write_test_model

    root = tmp_path_factory.mktemp("mlx-lm-server")
    model_dir = write_test_model(root / "models")
    hf_cache = root / "hf-cache"  # empty: nothing from the hub, no network
    hf_cache.mkdir()
    held = HeldPort()  # until the server is gone: no one else gets the port meanwhile
    port = held.port
    env = dict(os.environ, HF_HUB_CACHE=str(hf_cache))
    try:
        proc = launch_mlx_lm_server(model_dir, port, root / "server.log", env, "--max-tokens", "16", timeout=60)
    except ServerDidNotStart as e:
        held.close()
        pytest.fail(str(e))
    try:
        yield f"http://127.0.0.1:{port}/v1", str(Path(model_dir).resolve())
    finally:
        held.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
async def real(mlx_lm_server):
    base_url, _ = mlx_lm_server
    b = CloudBackend(CloudProvider(name="mlxlm", base_url=base_url, api_key_env="MLXLM_KEY", first_token_timeout=30,
                                   idle_timeout=30),
                     {"MLXLM_KEY": SECRET})
    yield b
    await b.close()


async def test_real_server_lists_models_from_its_models_endpoint(real, mlx_lm_server):
    _, model_id = mlx_lm_server
    models = await real.list_models()
    assert model_id in [m.name for m in models]
    assert all(m.backend == "cloud:mlxlm" for m in models)


async def test_real_server_chat_streams_chunks_then_done_with_usage(real, mlx_lm_server):
    _, model_id = mlx_lm_server
    req = GenerateRequest(model=model_id, messages=[Message("user", "hello there")],
                          sampling=Sampling(temperature=0.0, max_tokens=6))
    events = await collect(real.generate(req))
    chunks = [e for e in events if isinstance(e, Chunk)]
    done = events[-1]
    assert chunks and all(isinstance(c, Chunk) for c in events[:-1])
    assert isinstance(done, Done) and done.backend == "cloud:mlxlm" and done.model == model_id
    assert done.finish_reason in ("stop", "length")
    # include_usage: the counts come from the server's final usage event
    assert done.prompt_tokens > 0
    assert 0 < done.completion_tokens <= 6
    assert "".join(c.text for c in chunks)


async def test_real_server_raw_prompt_uses_completions(real, mlx_lm_server):
    _, model_id = mlx_lm_server
    req = GenerateRequest(model=model_id, prompt=Prompt("Once upon a time", raw=True),
                          sampling=Sampling(temperature=0.0, max_tokens=4))
    events = await collect(real.generate(req))
    assert isinstance(events[-1], Done)
    assert events[-1].completion_tokens == 4 and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events if isinstance(e, Chunk))


async def test_real_server_unknown_model_and_missing_endpoint(real):
    with pytest.raises(ModelNotFound):
        await collect(real.generate(GenerateRequest(model="no-such-model", messages=[Message("user", "x")])))
    # mlx_lm.server has no /v1/embeddings: a bare 404 page means the endpoint, not the model
    with pytest.raises(Unimplemented):
        await real.embed(EmbedRequest(model="whatever", inputs=["x"]))


# ------------------------------------------------------------------ the fake


@pytest.fixture
async def fake():
    f = FakeOpenAI(api_key=SECRET)
    await f.start()
    yield f
    await f.stop()


def make(fake: FakeOpenAI, key: str = SECRET, models: list[str] | None = None) -> CloudBackend:
    return CloudBackend(
        CloudProvider(name="acme", base_url=fake.base_url, api_key_env="ACME_API_KEY", models=models or []),
        {"ACME_API_KEY": key},
    )


@pytest.fixture
async def cloud(fake):
    b = make(fake)
    yield b
    await b.close()


async def test_request_translation_and_bearer_key(cloud, fake):
    img = b"\xff\xd8\xff jpeg bytes"
    req = GenerateRequest(
        model="gpt-test",
        messages=[
            Message("system", "be brief"),
            Message("user", "what is this?", images=[img, img], image_details=["low", "auto"]),
            Message("assistant", "", tool_calls=[ToolCall("lookup", {"q": "x"}, id="call_9")]),
            Message("tool", "42", tool_name="lookup", tool_call_id="call_9"),
        ],
        tools=[Tool("lookup", "Look up", {"type": "object"})],
        sampling=Sampling(temperature=0.5, top_p=0.8, top_k=40, seed=7, max_tokens=20, stop=["END"],
                          presence_penalty=0.1, frequency_penalty=0.2, repeat_penalty=1.3),
        format=OutputFormat("json_schema", {"type": "object"}),
    )
    await collect(cloud.generate(req))
    path, body, headers = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"], body["stop"]) == (
        0.5, 0.8, 7, 20, ["END"])
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.1, 0.2)
    assert "top_k" not in body and "repeat_penalty" not in body  # not OpenAI fields
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": {"type": "object"}}}
    user = body["messages"][1]["content"]
    assert user[0] == {"type": "text", "text": "what is this?"}
    assert user[1]["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(img).decode()
    assert user[1]["image_url"]["detail"] == "low" and "detail" not in user[2]["image_url"]  # auto: left out
    call = body["messages"][2]["tool_calls"][0]
    assert call["id"] == "call_9" and json.loads(call["function"]["arguments"]) == {"q": "x"}
    assert body["messages"][3] == {"role": "tool", "content": "42", "tool_call_id": "call_9", "name": "lookup"}
    assert body["tools"] == [{"type": "function", "function": {"name": "lookup", "description": "Look up",
                                                                "parameters": {"type": "object"}}}]


async def test_streamed_tool_call_deltas_are_accumulated(cloud, fake):
    fake.tool_calls = [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"tz": "CET"}')]
    events = await collect(cloud.generate(GenerateRequest(
        model="gpt-test", messages=[Message("user", "weather?")], tools=[Tool("get_weather"), Tool("get_time")])))
    calls = [tc for e in events if isinstance(e, Chunk) for tc in e.tool_calls]
    assert [(c.name, c.arguments, c.id, c.index) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3}, "call_0", 0),
        ("get_time", {"tz": "CET"}, "call_1", 1),
    ]
    done = events[-1]
    assert done.finish_reason == "tool_calls"
    assert (done.prompt_tokens, done.cached_prompt_tokens) == (11, 3)


async def test_text_stream_and_usage(cloud):
    events = await collect(cloud.generate(GenerateRequest(model="gpt-test", messages=[Message("user", "hi")])))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["Hi", " there"]
    assert events[-1].finish_reason == "stop" and events[-1].prompt_tokens == 11


async def test_non_raw_prompt_goes_to_chat_raw_prompt_to_completions(cloud, fake):
    await collect(cloud.generate(GenerateRequest(model="gpt-test", prompt=Prompt("tell me", system="sys"))))
    path, body, _ = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "tell me"}]
    events = await collect(cloud.generate(GenerateRequest(model="gpt-test", prompt=Prompt("abc", raw=True))))
    path, body, _ = fake.requests[-1]
    assert path == "/v1/completions" and body["prompt"] == "abc"
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 2


@pytest.mark.parametrize(
    "fault, error, retry_after",
    [
        (Fault("status", 400, "bad request"), InvalidArgument, None),
        (Fault("status", 403, "region not allowed"), PermissionDenied, None),
        (Fault("status", 429, "rate limited", retry_after="12"), ResourceExhausted, 12.0),
        (Fault("status", 500, "oops"), Unavailable, None),
        (Fault("status", 502, "bad gateway"), Unavailable, None),
    ],
    ids=["400", "403", "429", "500", "502"],
)
async def test_http_errors_map_to_backend_errors(cloud, fake, fault, error, retry_after):
    fake.fault = fault
    with pytest.raises(error) as info:
        await collect(cloud.generate(GenerateRequest(model="gpt-test", messages=[Message("user", "x")])))
    assert fault.message in info.value.message and info.value.message.startswith("cloud:acme: ")
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_unknown_model_and_disconnect(cloud, fake):
    with pytest.raises(ModelNotFound, match="does not exist"):
        await collect(cloud.generate(GenerateRequest(model="nope", messages=[Message("user", "x")])))
    fake.fault = Fault("disconnect", after=2)
    got = []
    with pytest.raises(Unavailable):
        async for ev in cloud.generate(GenerateRequest(model="gpt-test", messages=[Message("user", "x")])):
            got.append(ev)
    assert [e.text for e in got] == ["Hi"]


async def test_connection_refused_is_unavailable(held_port):
    b = CloudBackend(CloudProvider(name="down", base_url=f"{held_port.url}/v1"), {})
    try:
        with pytest.raises(Unavailable, match="cannot connect"):
            await collect(b.generate(GenerateRequest(model="m", messages=[Message("user", "x")])))
    finally:
        await b.close()


async def test_configured_models_and_embeddings(fake):
    b = make(fake, models=["a", "b"])
    try:
        assert [m.name for m in await b.list_models()] == ["a", "b"]
        assert fake.requests == []  # configured list: /models not asked
    finally:
        await b.close()
    b = make(fake)
    try:
        assert [m.name for m in await b.list_models()] == ["gpt-test"]
        res = await b.embed(EmbedRequest(model="gpt-test", inputs=["a", "bbb"]))
        assert res.embeddings == [[1.0, 0.5, -0.5], [3.0, 0.5, -0.5]]  # put back in input order
        assert res.prompt_tokens == 2 and res.backend == "cloud:acme"
        assert (await b.show_model("gpt-test")).info.name == "gpt-test"
        with pytest.raises(ModelNotFound):
            await b.show_model("nope")
    finally:
        await b.close()


async def test_key_never_appears_in_errors_logs_or_repr(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-live-WRONGKEY-fedcba9876543210"
    b = make(fake, key=wrong)
    try:
        errors = []
        with pytest.raises(Unauthenticated) as info:
            await collect(b.generate(GenerateRequest(model="gpt-test", messages=[Message("user", "x")])))
        errors.append(info.value)
        with pytest.raises(Unauthenticated) as info:
            await b.list_models()
        errors.append(info.value)
        with pytest.raises(Unauthenticated) as info:
            await b.embed(EmbedRequest(model="gpt-test", inputs=["x"]))
        errors.append(info.value)
        # the upstream really did get the key, and really did echo it back
        assert fake.requests[0][2]["Authorization"] == f"Bearer {wrong}"
        for e in errors:
            assert "Incorrect API key provided" in e.message
            for text in (str(e), e.message, repr(e.args)):
                assert wrong not in text and wrong[-8:] not in text
        for text in (repr(b), str(b), caplog.text):
            assert wrong not in text and wrong[-8:] not in text
    finally:
        await b.close()


async def test_closing_the_generator_closes_the_upstream_request(cloud, fake):
    fake.reply = [f"t{i} " for i in range(200)]
    fake.chunk_delay = 0.02
    agen = cloud.generate(GenerateRequest(model="gpt-test", messages=[Message("user", "x")]))
    assert (await anext(agen)).text == "t0 "
    assert not fake.disconnected.is_set()
    await agen.aclose()
    await asyncio.wait_for(fake.disconnected.wait(), 5)


async def test_events_that_arrive_together_go_on_as_one_chunk(cloud, fake):
    """An upstream that sends its answer in one write costs one message downstream (one
    gRPC message and one SSE frame), not one per token; spaced out, each event is its own chunk."""
    req = GenerateRequest(model="gpt-test", messages=[Message("user", "hi")])
    fake.one_write = True
    events = await collect(cloud.generate(req))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["Hi there"]
    assert events[-1].finish_reason == "stop" and events[-1].prompt_tokens == 11
    fake.one_write, fake.chunk_delay = False, 0.02
    events = await collect(cloud.generate(req))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["Hi", " there"]
