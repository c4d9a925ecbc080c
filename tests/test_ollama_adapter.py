"""OllamaBackend against a fake upstream Ollama that replays the documented wire format."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest

from backends.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
)
from backends.ollama import OllamaBackend
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
from mlxgate.config import OllamaConfig
from tests.fakes.ollama_fake import Fault, FakeOllama
from tests.fakes.streams import collect
from tests.request_builders import chat

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fake():
    f = FakeOllama()
    await f.start()
    yield f
    await f.stop()


#: Clocks far above what a loaded machine needs for the fake's answers.
ROOMY_CLOCKS = {"first_token_timeout": 10.0, "idle_timeout": 10.0, "connect_timeout": 5.0}
#: Short clocks, for the faults that outlast them (HANG_S).
SHORT_CLOCKS = {"first_token_timeout": 0.5, "idle_timeout": 0.5, "connect_timeout": 1.0}


@pytest.fixture
async def backend(fake):
    b = OllamaBackend(OllamaConfig(upstream=fake.url, **ROOMY_CLOCKS))
    yield b
    await b.close()


#: A hang that outlasts any clock here (the fake ends it early when the client goes away).
HANG_S = 60.0


# ------------------------------------------------------------------ streaming


async def test_chat_stream_translates_lines_and_final_statistics(backend, fake):
    fake.chunk_delay = 0.02  # one line per read: one chunk per line
    events = await collect(backend.generate(chat("tiny")))
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert [c.text for c in chunks] == ["Hello", ",", " world", "!"]
    done = events[-1]
    assert isinstance(done, Done) and sum(isinstance(e, Done) for e in events) == 1
    assert done.finish_reason == "stop"
    assert (done.prompt_tokens, done.completion_tokens) == (7, 4)
    assert (done.load_duration_ns, done.prompt_eval_duration_ns, done.eval_duration_ns, done.total_duration_ns) == (
        1_000_000, 1_500_000, 2_500_000, 5_000_000)
    assert done.backend == "ollama" and done.model == "tiny"
    assert fake.paths() == ["/api/chat"]


async def test_lines_that_arrive_together_go_on_as_one_chunk(backend, fake):
    """An upstream that writes many lines at once costs one message downstream, not one per token."""
    events = await collect(backend.generate(chat("tiny")))
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert [c.text for c in chunks] == ["Hello, world!"]
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == 4


async def test_chunks_arrive_before_the_stream_ends(backend, fake):
    fake.gate = asyncio.Event()
    agen = backend.generate(chat("tiny"))
    async with contextlib.aclosing(agen):
        first = await asyncio.wait_for(anext(agen), 5)  # upstream is paused after line 1
        assert isinstance(first, Chunk) and first.text == "Hello"
        fake.gate.set()
        rest = [ev async for ev in agen]
    assert isinstance(rest[-1], Done)


async def test_chat_request_translation(backend, fake):
    img = b"\x89PNG fake image"
    req = GenerateRequest(
        model="tiny",
        messages=[
            Message("system", "be brief"),
            Message("user", "weather?", images=[img]),
            Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris"})]),
            Message("tool", "sunny", tool_name="get_weather"),
        ],
        tools=[Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})],
        sampling=Sampling(temperature=0.2, top_p=0.9, top_k=20, min_p=0.05, seed=42, repeat_penalty=1.1,
                          repeat_last_n=33, presence_penalty=0.5, frequency_penalty=0.25, max_tokens=100,
                          stop=["\n\n"], num_ctx=2048),
        format=OutputFormat("json_schema", {"type": "object"}),
        keep_alive=60.0,
    )
    await collect(backend.generate(req))
    path, body = fake.requests[-1]
    assert path == "/api/chat"
    assert fake.request_ids[-1] == req.request_id
    assert body["stream"] is True and body["model"] == "tiny"
    assert body["options"] == {
        "temperature": 0.2, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 42, "repeat_penalty": 1.1,
        "repeat_last_n": 33, "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_predict": 100,
        "stop": ["\n\n"], "num_ctx": 2048,
    }
    assert body["format"] == {"type": "object"}
    assert body["keep_alive"] == 60.0
    assert body["messages"][1]["images"] == [base64.b64encode(img).decode()]
    # Ollama wants tool-call arguments as a JSON object, not a string
    assert body["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert body["messages"][3] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}
    assert body["tools"][0]["type"] == "function"
    assert body["tools"][0]["function"]["name"] == "get_weather"


async def test_prompt_request_translation_and_length_finish(backend, fake):
    req = GenerateRequest(
        model="tiny:latest",
        prompt=Prompt("def f(", suffix="return x", system="code", raw=True),
        sampling=Sampling(max_tokens=2),
        format=OutputFormat("json"),
    )
    events = await collect(backend.generate(req))
    path, body = fake.requests[-1]
    assert path == "/api/generate"
    assert (body["prompt"], body["suffix"], body["system"], body["raw"], body["format"]) == (
        "def f(", "return x", "code", True, "json")
    assert "keep_alive" not in body
    assert "".join(e.text for e in events if isinstance(e, Chunk)) == "Hello,"
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 2


async def test_tool_calls_become_toolcall_chunks(backend, fake):
    fake.tool_calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]
    fake.reply = []
    events = await collect(backend.generate(chat("tiny", tools=[Tool("get_weather")])))
    calls = [tc for e in events if isinstance(e, Chunk) for tc in e.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert events[-1].finish_reason == "tool_calls"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "fault, error, retry_after",
    [
        (Fault("status", 400, "invalid options"), InvalidArgument, None),
        (Fault("status", 429, "slow down", retry_after="7"), ResourceExhausted, 7.0),
        (Fault("status", 503, "server busy, please try again.  maximum pending requests exceeded",
               retry_after="2"), ResourceExhausted, 2.0),
        (Fault("status", 500, "llama runner process has terminated"), Unavailable, None),
        (Fault("status", 502, "bad gateway"), Unavailable, None),
        (Fault("hang", delay=HANG_S), DeadlineExceeded, None),
        (Fault("hang_after_headers", delay=HANG_S), DeadlineExceeded, None),
        (Fault("no_done"), Unavailable, None),
    ],
    ids=["400", "429", "503", "500", "502", "timeout-before-headers", "timeout-before-first-line", "no-done"],
)
async def test_upstream_failures_map_to_backend_errors(fake, fault, error, retry_after):
    clocks = SHORT_CLOCKS if fault.kind.startswith("hang") else ROOMY_CLOCKS
    backend = OllamaBackend(OllamaConfig(upstream=fake.url, **clocks))
    fake.fault = fault
    try:
        with pytest.raises(error) as info:
            await collect(backend.generate(chat("tiny")))
    finally:
        await backend.close()
    assert info.value.message.startswith("ollama: ")
    if fault.kind == "status":
        assert fault.message in info.value.message  # the upstream's {"error": ...} text is passed on
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_unknown_model_is_not_found(backend):
    with pytest.raises(ModelNotFound, match="not found"):
        await collect(backend.generate(chat("nope")))


async def test_connection_refused_is_unavailable(held_port):
    b = OllamaBackend(OllamaConfig(upstream=held_port.url, first_token_timeout=2, idle_timeout=2, connect_timeout=1))
    try:
        with pytest.raises(Unavailable, match="cannot connect"):
            await collect(b.generate(chat("tiny")))
        with pytest.raises(Unavailable):
            await b.list_models()
    finally:
        await b.close()


@pytest.mark.parametrize("kind", ["error_line", "disconnect"])
async def test_failure_after_first_chunk_ends_the_stream_with_an_error(backend, fake, kind):
    fake.fault = Fault(kind, message="runner crashed", after=2)
    fake.chunk_delay = 0.05  # the failure comes after the first chunks went out
    got = []
    with pytest.raises(Unavailable) as info:
        async for ev in backend.generate(chat("tiny")):
            got.append(ev)
    assert [e.text for e in got] == ["Hello", ","]
    if kind == "error_line":
        assert "runner crashed" in info.value.message


async def test_error_line_naming_a_missing_model_is_not_found(backend, fake):
    fake.fault = Fault("error_line", message='model "tiny" not found', after=0)
    with pytest.raises(ModelNotFound):
        await collect(backend.generate(chat("tiny")))


async def test_closing_the_generator_closes_the_upstream_request(backend, fake):
    fake.reply = [f"t{i} " for i in range(200)]
    fake.chunk_delay = 0.02
    agen = backend.generate(chat("tiny"))
    assert (await anext(agen)).text == "t0 "
    assert (await anext(agen)).text == "t1 "
    assert not fake.disconnected.is_set()
    await agen.aclose()
    await asyncio.wait_for(fake.disconnected.wait(), 5)


# ------------------------------------------------------------------ unary


async def test_list_models_show_and_embed(backend, fake):
    models = await backend.list_models()
    assert [m.name for m in models] == ["tiny:latest", "other:7b"]
    m = models[0]
    assert m.backend == "ollama" and m.size_bytes == 7365960935 and m.digest.startswith("9f438c")
    assert m.details.family == "llama" and m.details.quantization_level == "Q4_0"
    assert m.modified_at is not None and m.modified_at.year == 2024  # nanosecond RFC 3339 parsed

    show = await backend.show_model("tiny")
    assert show.context_length == 8192 and show.capabilities == ["completion", "tools"]
    assert show.chat_template == "{{ .Prompt }}" and show.license == "MIT"
    assert show.info.details.parameter_count == 8030261248
    with pytest.raises(ModelNotFound):
        await backend.show_model("nope")

    res = await backend.embed(EmbedRequest(model="tiny", inputs=["a b", "ccc"], dimensions=3))
    assert len(res.embeddings) == 2 and all(len(v) == 3 for v in res.embeddings)
    assert res.prompt_tokens == 3 and res.backend == "ollama"
    assert res.load_duration_ns == 1019500 and res.total_duration_ns == 14143917
    assert fake.requests[-1] == ("/api/embed", {"model": "tiny", "input": ["a b", "ccc"], "truncate": True,
                                                "dimensions": 3})


async def test_load_ps_unload(backend, fake):
    assert await backend.list_running() == []
    res = await backend.load_model("tiny", 120.0)
    assert res.backend == "ollama" and res.load_duration_ns == 1_000_000
    assert fake.requests[-1] == ("/api/generate", {"model": "tiny", "stream": False, "keep_alive": 120.0})
    running = await backend.list_running()
    assert [(r.name, r.backend, r.context_length) for r in running] == [("tiny:latest", "ollama", 4096)]
    assert running[0].expires_at is not None
    assert await backend.unload_model("tiny") is True
    assert fake.requests[-1] == ("/api/generate", {"model": "tiny", "keep_alive": 0, "stream": False})
    assert await backend.list_running() == []
    assert await backend.unload_model("tiny") is False
    with pytest.raises(ModelNotFound):
        await backend.load_model("nope", None)


async def test_the_fake_speaks_what_the_official_client_reads(fake):
    """Guards the fake itself: the official ``ollama`` client parses its streams."""
    import ollama

    client = ollama.AsyncClient(host=fake.url)
    parts = []
    final = None
    async for part in await client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True):
        parts.append(part.message.content)
        if part.done:
            final = part
    assert "".join(parts) == "Hello, world!"
    assert final is not None and final.eval_count == 4 and final.done_reason == "stop"
    listed = await client.list()
    assert [m.model for m in listed.models] == ["tiny:latest", "other:7b"]


# ------------------------------------------------------------------ a second mlxgate as the upstream


@pytest.fixture
async def via_mlxgate(stack):
    """OllamaBackend whose upstream is another mlxgate's Ollama front (tests/stack.py)."""
    b = OllamaBackend(OllamaConfig(upstream=stack.base, first_token_timeout=60, idle_timeout=60, connect_timeout=2))
    yield b
    await b.close()


async def test_against_mlxgate_front_lists_streams_and_reports(via_mlxgate, stack):
    names = [m.name for m in await via_mlxgate.list_models()]
    assert any(n in (stack.model, f"{stack.model}:latest") for n in names)
    req = GenerateRequest(model=stack.model, messages=[Message("user", "hello")],
                          sampling=Sampling(temperature=0.0, max_tokens=5))
    events = await collect(via_mlxgate.generate(req))
    chunks, done = events[:-1], events[-1]
    assert chunks and all(isinstance(c, Chunk) for c in chunks)
    assert isinstance(done, Done) and done.backend == "ollama"
    assert done.finish_reason in ("stop", "length")
    assert done.prompt_tokens > 0 and 0 < done.completion_tokens <= 5
    assert done.eval_duration_ns > 0 and done.total_duration_ns > 0

    raw = await collect(via_mlxgate.generate(GenerateRequest(
        model=stack.model, prompt=Prompt("Once upon", raw=True), sampling=Sampling(temperature=0.0, max_tokens=3))))
    assert isinstance(raw[-1], Done) and raw[-1].completion_tokens == 3 and raw[-1].finish_reason == "length"


async def test_against_mlxgate_front_errors_and_unary_calls(via_mlxgate, stack):
    with pytest.raises(ModelNotFound):
        await collect(via_mlxgate.generate(chat("no-such-model")))
    show = await via_mlxgate.show_model(stack.model)
    assert show.context_length > 0 and "completion" in show.capabilities
    res = await via_mlxgate.embed(EmbedRequest(model=stack.model, inputs=["a", "b c"]))
    assert len(res.embeddings) == 2 and len(res.embeddings[0]) > 0
    await via_mlxgate.load_model(stack.model, 300.0)
    running = [r.name for r in await via_mlxgate.list_running()]
    assert any(n in (stack.model, f"{stack.model}:latest") for n in running)
