"""The Anthropic cloud provider (``kind = "anthropic"``) against a fake that
replays Anthropic's wire format (tests/fakes/anthropic_fake.py): requests
built with the dialect's models, the SSE events read into Chunks and Done,
errors, key handling; then through the whole stack, where the router falls
back from the MLX engine to Claude for a model only Anthropic has, and the
official ``anthropic`` and ``openai`` SDKs talk to it through mlxgate."""

from __future__ import annotations

import base64
import json
import logging

import anthropic
import pytest
from openai import AsyncOpenAI

from backends.cloud import AnthropicBackend, CloudBackend, cloud_backend
from backends.errors import (
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from backends.routing import Router
from backends.service import start_inference_service
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
    ToolChoice,
)
from gateway.app import create_app, start_http
from mlxgate.config import CloudProvider, ServerConfig
from mlxgate.config_load import load_config
from tests.fakes.anthropic_fake import FakeAnthropic
from tests.fakes.ollama_fake import Fault
from tests.fakes.streams import collect
from tests.request_builders import chat

pytestmark = pytest.mark.timeout(60)

SECRET = "sk-ant-api03-TOPSECRET-0123456789abcdef"
CLAUDE = "claude-test"


@pytest.fixture
async def fake():
    f = FakeAnthropic(api_key=SECRET)
    await f.start()
    yield f
    await f.stop()


def make(fake: FakeAnthropic, key: str = SECRET, models: list[str] | None = None, **kw) -> AnthropicBackend:
    b = cloud_backend(CloudProvider(name="claude", kind="anthropic", base_url=fake.base_url,
                                    api_key_env="ANTHROPIC_API_KEY", models=models or [], **kw),
                      {"ANTHROPIC_API_KEY": key})
    assert isinstance(b, AnthropicBackend)
    return b


@pytest.fixture
async def claude(fake):
    b = make(fake)
    yield b
    await b.close()


# ---------------------------------------------------------------- requests


async def test_request_is_built_with_the_dialect_and_the_key_goes_in_x_api_key(claude, fake):
    png = b"\x89PNG\r\n\x1a\n pixels"
    req = chat(
        CLAUDE,
        messages=[
            Message("system", "be brief"),
            Message("user", "what is this?", images=[png]),
            Message("assistant", "Let me look.", thinking="hmm", tool_calls=[
                ToolCall("lookup", {"q": "x"}, id="toolu_9"), ToolCall("clock", {}, id="")]),
            Message("tool", "42", tool_name="lookup", tool_call_id="toolu_9"),
            Message("tool", "noon", tool_name="clock"),
            Message("user", "and?"),
            Message("system", "answer in French"),
        ],
        tools=[Tool("lookup", "Look up", {"type": "object", "properties": {"q": {"type": "string"}}}), Tool("clock")],
        tool_choice=ToolChoice("function", "lookup"),
        sampling=Sampling(temperature=0.5, top_p=0.8, top_k=40, seed=7, max_tokens=2000, stop=["END"],
                          presence_penalty=0.1, repeat_penalty=1.3),
        think=True,
    )
    await collect(claude.generate(req))
    path, body, headers = fake.requests[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == SECRET and "Authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert body["stream"] is True and body["model"] == CLAUDE and body["max_tokens"] == 2000
    assert (body["temperature"], body["top_p"], body["top_k"], body["stop_sequences"]) == (0.5, 0.8, 40, ["END"])
    assert not {"seed", "presence_penalty", "repeat_penalty", "metadata"} & set(body)  # no Anthropic equivalent
    assert body["system"] == "be brief\n\nanswer in French"
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["tool_choice"] == {"type": "tool", "name": "lookup"}
    assert body["tools"] == [
        {"name": "lookup", "description": "Look up", "input_schema": {"type": "object", "properties": {
            "q": {"type": "string"}}}},
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    user, assistant, results = body["messages"]
    assert user == {"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png).decode()}}]}
    # The reasoning in history is not sent (Anthropic needs its own signature on it).
    assert assistant == {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {"q": "x"}},
        {"type": "tool_use", "id": "toolu_2_1", "name": "clock", "input": {}}]}
    # Tool results and the next user text are one user turn (turns alternate).
    assert results == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": "42"},
        {"type": "tool_result", "tool_use_id": "toolu_2_1", "content": "noon"},
        {"type": "text", "text": "and?"}]}


async def test_defaults_and_the_dialects_own_rules(claude, fake):
    await collect(claude.generate(GenerateRequest(model=CLAUDE, prompt=Prompt("tell me", system="sys"),
                                                  format=OutputFormat("json"), think=False)))
    _, body, _ = fake.requests[-1]
    assert body["max_tokens"] == 4096  # Anthropic requires one; none was asked
    assert body["system"] == "sys" and body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "tell me"}]}]
    assert body["thinking"] == {"type": "disabled"}
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    await collect(claude.generate(chat(CLAUDE, tools=[Tool("t")], tool_choice=ToolChoice("required"),
                                       sampling=Sampling(max_tokens=1000), think=True)))
    _, body, _ = fake.requests[-1]
    assert body["tool_choice"] == {"type": "any"} and "thinking" not in body  # no room for a 1,024 budget
    n = len(fake.requests)
    with pytest.raises(InvalidArgument, match="temperature must be at most 1"):
        await collect(claude.generate(chat(CLAUDE, sampling=Sampling(temperature=1.5))))
    with pytest.raises(Unimplemented, match="suffix"):
        await collect(claude.generate(GenerateRequest(model=CLAUDE, prompt=Prompt("a", suffix="b"))))
    assert len(fake.requests) == n  # refused before leaving


# ---------------------------------------------------------------- answers


async def test_text_stream_usage_and_stop_sequence(claude, fake):
    events = await collect(claude.generate(chat(CLAUDE)))
    assert [e.text for e in events if isinstance(e, Chunk)] == ["Hi", " there"]
    done = events[-1]
    assert isinstance(done, Done) and (done.finish_reason, done.stop_sequence) == ("stop", "")
    assert (done.prompt_tokens, done.cached_prompt_tokens, done.completion_tokens) == (14, 3, 4)
    assert (done.backend, done.model) == ("cloud:claude", CLAUDE)
    fake.stop_sequence = "END"
    done = (await collect(claude.generate(chat(CLAUDE))))[-1]
    assert (done.finish_reason, done.stop_sequence) == ("stop", "END")


async def test_thinking_and_tool_calls_from_their_deltas(claude, fake):
    fake.thinking = ["Let me ", "think."]
    events = await collect(claude.generate(chat(CLAUDE, think=True, sampling=Sampling(max_tokens=3000))))
    assert "".join(e.thinking for e in events if isinstance(e, Chunk)) == "Let me think."
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == "Hi there"
    fake.tool_calls = [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"tz": "CET"}')]
    events = await collect(claude.generate(chat(CLAUDE, tools=[Tool("get_weather"), Tool("get_time")])))
    calls = [tc for e in events if isinstance(e, Chunk) for tc in e.tool_calls]
    assert [(c.name, c.arguments, c.id, c.index) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3}, "toolu_fake0", 0),
        ("get_time", {"tz": "CET"}, "toolu_fake1", 1),
    ]
    assert events[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "fault, error, retry_after",
    [
        (Fault("status", 400, "bad request"), InvalidArgument, None),
        (Fault("status", 403, "region not allowed"), PermissionDenied, None),
        (Fault("status", 429, "rate limited", retry_after="12"), ResourceExhausted, 12.0),
        (Fault("status", 529, "Overloaded"), ResourceExhausted, None),
        (Fault("status", 500, "oops"), Unavailable, None),
    ],
    ids=["400", "403", "429", "529", "500"],
)
async def test_http_errors_map_to_backend_errors(claude, fake, fault, error, retry_after):
    fake.fault = fault
    with pytest.raises(error) as info:
        await collect(claude.generate(chat(CLAUDE)))
    assert fault.message in info.value.message and info.value.message.startswith("cloud:claude: ")
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_unknown_model_error_event_and_disconnect(claude, fake):
    with pytest.raises(ModelNotFound, match="model: nope"):
        await collect(claude.generate(GenerateRequest(model="nope", messages=[Message("user", "x")])))
    fake.fault = Fault("error_event", after=3, message="Overloaded")
    got = []
    with pytest.raises(ResourceExhausted, match="Overloaded"):
        async for ev in claude.generate(chat(CLAUDE)):
            got.append(ev)
    assert [e.text for e in got] == ["Hi"]
    fake.fault = Fault("disconnect", after=3)
    with pytest.raises(Unavailable):
        await collect(claude.generate(chat(CLAUDE)))


async def test_count_tokens_models_and_no_embeddings(fake):
    b = make(fake, models=["a", "b"])
    try:
        assert [m.name for m in await b.list_models()] == ["a", "b"]
        assert fake.requests == []  # configured list: /v1/models not asked
        res = await b.count_tokens(chat(CLAUDE, messages=[Message("system", "s"), Message("user", "hi")],
                                        tools=[Tool("t")]))
        assert (res.input_tokens, res.backend) == (42, "cloud:claude")
        path, body, headers = fake.requests[-1]
        assert path == "/v1/messages/count_tokens" and headers["x-api-key"] == SECRET
        assert body == {"model": CLAUDE, "system": "s", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], "tools": [{"name": "t", "input_schema": {
                "type": "object", "properties": {}}}]}
        with pytest.raises(Unimplemented, match="no embeddings"):
            await b.embed(EmbedRequest(model=CLAUDE, inputs=["x"]))
    finally:
        await b.close()
    fake.models, fake.page_size = ["c1", "c2", "c3"], 2
    b = make(fake)
    try:
        assert [m.name for m in await b.list_models()] == ["c1", "c2", "c3"]  # two pages
        assert [p for p, _, _ in fake.requests[-2:]] == ["/v1/models?limit=1000", "/v1/models?limit=1000&after_id=c2"]
    finally:
        await b.close()


async def test_key_never_appears_in_errors_logs_or_repr(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-ant-api03-WRONGKEY-fedcba9876543210"
    b = make(fake, key=wrong)
    try:
        errors = []
        for call in (lambda: collect(b.generate(chat(CLAUDE))), b.list_models, lambda: b.count_tokens(chat(CLAUDE))):
            with pytest.raises(Unauthenticated) as info:
                await call()
            errors.append(info.value)
        assert fake.requests[0][2]["x-api-key"] == wrong  # the upstream got it, and echoed it back
        for e in errors:
            assert "invalid x-api-key" in e.message
            for text in (str(e), e.message, repr(e.args)):
                assert wrong not in text and wrong[-8:] not in text
        for text in (repr(b), str(b), caplog.text):
            assert wrong not in text and wrong[-8:] not in text
    finally:
        await b.close()


# ---------------------------------------------------------------- configuration


def test_environment_adds_an_anthropic_provider():
    cfg = load_config(env={"ANTHROPIC_API_KEY": "k", "MLXGATE_ANTHROPIC_MODELS": "claude-a, claude-b"})
    (p,) = cfg.cloud.providers
    assert (p.name, p.kind, p.base_url, p.api_key_env, p.models) == (
        "anthropic", "anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY", ["claude-a", "claude-b"])
    cfg = load_config(env={"ANTHROPIC_BASE_URL": "https://proxy.example", "OPENAI_API_KEY": "k"})
    assert [(p.name, p.kind, p.base_url) for p in cfg.cloud.providers] == [
        ("openai", "openai", "https://api.openai.com/v1"), ("anthropic", "anthropic", "https://proxy.example")]
    assert isinstance(cloud_backend(cfg.cloud.providers[0], {}), CloudBackend)
    assert isinstance(cloud_backend(cfg.cloud.providers[1], {}), AnthropicBackend)


def test_kind_is_checked_and_a_provider_pointing_here_is_dropped(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[[cloud.providers]]\nname = "x"\nbase_url = "https://x"\nkind = "gemini"\n')
    with pytest.raises(ValueError, match="kind must be one of openai, anthropic, got 'gemini'"):
        load_config(toml, env={})
    # Claude Code's ANTHROPIC_BASE_URL exported in the shell that runs mlxgate: not a provider.
    cfg = load_config(env={"ANTHROPIC_BASE_URL": "http://localhost:11434", "ANTHROPIC_API_KEY": "x"})
    assert cfg.cloud.providers == [] and "own address" in cfg.notes[-1]
    cfg = load_config(env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:8080", "MLXGATE_PORT": "8080"})
    assert cfg.cloud.providers == []
    cfg = load_config(env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:8081", "MLXGATE_PORT": "8080"})
    assert len(cfg.cloud.providers) == 1


# ---------------------------------------------------------------- through mlxgate


@pytest.fixture
async def gateway(mlx_backend, fake):
    """MLX first, Claude last, as ``mlxgate serve`` composes them."""
    claude = make(fake)
    router = Router([mlx_backend, claude])
    service = await start_inference_service(router, port=0)
    http = await start_http(create_app(ServerConfig(request_timeout=30), service.target))
    yield http.url
    await http.stop()
    await service.stop(grace=0.5)
    await claude.close()


async def test_anthropic_sdk_through_mlxgate_falls_back_to_claude(gateway, fake, caplog):
    caplog.set_level(logging.DEBUG)
    c = anthropic.AsyncAnthropic(base_url=gateway, api_key="local", max_retries=0)
    r = await c.messages.with_raw_response.create(model=CLAUDE, max_tokens=50, messages=[
        {"role": "user", "content": "hi"}])
    assert r.headers["x-mlxgate-backend"] == "cloud:claude"  # the MLX engine does not have it
    m = await r.parse()
    assert m.content[0].text == "Hi there" and m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (11, 3)
    # mlxgate's own caller key is not Anthropic's: the provider's key went upstream.
    assert fake.requests[-1][2]["x-api-key"] == SECRET
    async with c.messages.stream(model=CLAUDE, max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert final.content[0].text == "Hi there"
    fake.tool_calls = [("get_weather", '{"city": "Oslo"}')]
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    async with c.messages.stream(model=CLAUDE, max_tokens=50, tools=tools, tool_choice={"type": "any"},
                                 messages=[{"role": "user", "content": "weather?"}]) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Oslo"}
    assert fake.requests[-1][1]["tool_choice"] == {"type": "any"}
    n = await c.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens == 42
    # Another dialect onto the same provider.
    oa = AsyncOpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0)
    chat_answer = await oa.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}])
    assert chat_answer.choices[0].message.content == "Hi there"
    assert chat_answer.usage.prompt_tokens == 14 and chat_answer.usage.prompt_tokens_details.cached_tokens == 3
    # An overloaded Claude is the caller's 529; a wrong key upstream is a 401 without the key.
    fake.fault = Fault("status", 529, "Overloaded", times=1)
    with pytest.raises(anthropic.OverloadedError):
        await c.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    fake.api_key = "sk-ant-other-key-00000000000000"
    with pytest.raises(anthropic.AuthenticationError) as e:
        await c.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert "invalid x-api-key" in e.value.api_message
    assert SECRET not in e.value.api_message and SECRET[-8:] not in e.value.api_message
    assert SECRET not in caplog.text and SECRET[-8:] not in caplog.text
    json.dumps(final.model_dump())  # a plain, serialisable message


async def test_pings_do_not_keep_a_silent_claude_alive_through_the_front(fake):
    """A Claude that only sends pings is ended by the first-token clock; the
    caller gets Anthropic's 504 timeout_error, and the upstream is hung up on."""
    claude = make(fake, first_token_timeout=0.4, idle_timeout=0.4, connect_timeout=2.0)
    service = await start_inference_service(Router([claude]), port=0)
    http = await start_http(create_app(ServerConfig(request_timeout=30), service.target))
    try:
        fake.fault = Fault("keepalive", delay=8.0, interval=0.02)
        c = anthropic.AsyncAnthropic(base_url=http.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.GatewayTimeoutError) as e:
            await c.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert e.value.type == "timeout_error"
        assert e.value.api_message == "cloud:claude: no token within 0.4 s of the request (first_token_timeout)"
        fake.fault = Fault("stall", after=3, delay=8.0, interval=0.02)  # "Hi", then only pings
        async with c.messages.stream(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
            with pytest.raises(anthropic.APIStatusError, match="idle_timeout"):
                await s.get_final_message()
        assert s.current_message_snapshot.content[0].text == "Hi"
    finally:
        await http.stop()
        await service.stop(grace=0.5)
        await claude.close()
