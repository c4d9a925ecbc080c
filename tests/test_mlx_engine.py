"""The MLX engine, with real MLX on the generated tiny model (random weights).

Random weights make gibberish, so tests check structure, counts and
determinism rather than content; where content matters (tool calls) a test
forces the tokens with a logits processor and says so.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time

import pytest

from backends import accept, errors
from backends.mlx.backend import MLXBackend
from backends.mlx.output import SequenceOutput, StopStrings
from backends.mlx.testmodel import write_test_model
from backends.mlx.toolcalls import ToolCallSplitter
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
)
from mlxgate.config import MLXConfig
from mlxgate.v1 import inference_pb2 as pb
from tests import request_builders
from tests.polling import eventually

MODEL = "tiny-llama"

pytestmark = pytest.mark.timeout(60)


def chat(text="Hello! How are you?", **sampling) -> GenerateRequest:
    """The shared builder's chat with this module's model, prompt and keywords for Sampling."""
    return request_builders.chat(MODEL, text, sampling=sampling)


async def collect(backend, req):
    chunks, done = [], None
    async for ev in backend.generate(req):
        assert done is None, "nothing may follow Done"
        if isinstance(ev, Done):
            done = ev
        else:
            assert isinstance(ev, Chunk)
            chunks.append(ev)
    assert done is not None
    return chunks, done


def text_of(chunks):
    return "".join(c.text for c in chunks)


def ids_of(chunks):
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture
def forced_tokens(mlx_backend, monkeypatch):
    """Make chosen requests emit exactly the given token ids, then EOS.

    A test seam over ``Engine.processors_for``: the forcing processor is added
    after the real ones, so the whole real path (batching, detokenizing,
    splitting, parsing, finish reason) still runs.
    """
    import mlx.core as mx

    engine = mlx_backend.engine
    plans: dict[str, list[int]] = {}
    original = engine.processors_for

    def processors_for(seq):
        procs = original(seq)
        if seq.request_id in plans:
            forced = plans[seq.request_id]
            eos = min(seq.lm.eos_token_ids)
            start = len(seq.prompt_ids)

            def force(tokens, logits):
                i = tokens.shape[0] - start
                want = forced[i] if i < len(forced) else eos
                hit = mx.arange(logits.shape[-1])[None] == want
                return mx.where(hit, mx.zeros_like(logits), mx.full(logits.shape, -1e9, dtype=logits.dtype))

            procs.append(force)
        return procs

    monkeypatch.setattr(engine, "processors_for", processors_for)
    return plans


# ---------------------------------------------------------------- streaming basics


async def test_stream_is_chunks_then_one_done(mlx_backend):
    chunks, done = await collect(mlx_backend, chat(temperature=0, max_tokens=12))
    assert chunks and all(isinstance(c, Chunk) for c in chunks)
    assert done.backend == "mlx" and done.model == MODEL
    assert done.finish_reason in ("length", "stop")
    assert done.completion_tokens == len(ids_of(chunks)) > 0
    assert done.prompt_tokens > 10
    # Earlier requests on this shared backend may have left a reusable prefix
    # (the chat template's header at least); test_prompt_cache.py checks the count.
    assert 0 <= done.cached_prompt_tokens < done.prompt_tokens
    assert done.total_duration_ns >= done.eval_duration_ns > 0
    assert done.prompt_eval_duration_ns > 0
    assert mlx_backend.active_count == 0


async def test_max_tokens_gives_length_with_exactly_that_many_tokens(mlx_backend):
    chunks, done = await collect(mlx_backend, chat(temperature=0, max_tokens=7))
    assert done.finish_reason == "length"
    assert done.completion_tokens == 7
    assert len(ids_of(chunks)) == 7


async def test_default_max_tokens_comes_from_config(mlx_backend):
    _, done = await collect(mlx_backend, chat(temperature=0))
    assert done.finish_reason == "length"
    assert done.completion_tokens == mlx_backend.config.default_max_tokens


async def test_stop_string_ends_text_before_it(mlx_backend):
    chunks, _ = await collect(mlx_backend, chat(temperature=0, max_tokens=40))
    full = text_of(chunks)
    # A stop string from the middle of what greedy decoding produces.
    stop = next(
        full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].strip()
    )
    expected = full[: full.find(stop)]
    chunks2, done2 = await collect(mlx_backend, chat(temperature=0, max_tokens=40, stop=[stop, "never-there"]))
    assert done2.finish_reason == "stop"
    assert text_of(chunks2) == expected
    assert stop not in text_of(chunks2)
    assert done2.completion_tokens < 40


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["STOP"])
    assert s.feed("Hel") == ("Hel", False)
    assert s.feed("lo ST") == ("lo ", False)  # "ST" might start STOP
    assert s.feed("ART ") == ("START ", False)  # it did not
    assert s.feed("and S") == ("and ", False)
    assert s.feed("TOP more") == ("", True)


# ---------------------------------------------------------------- seeds


async def test_same_seed_same_output_other_seed_differs(mlx_backend):
    a, _ = await collect(mlx_backend, chat(temperature=1.0, seed=42, max_tokens=16))
    b, _ = await collect(mlx_backend, chat(temperature=1.0, seed=42, max_tokens=16))
    c, _ = await collect(mlx_backend, chat(temperature=1.0, seed=43, max_tokens=16))
    assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
    assert ids_of(a) != ids_of(c)


async def test_seed_is_independent_of_batch_neighbours(mlx_backend):
    alone, _ = await collect(mlx_backend, chat("Tell me a story", temperature=1.0, seed=7, max_tokens=12))
    results = await asyncio.gather(
        collect(mlx_backend, chat("Tell me a story", temperature=1.0, seed=7, max_tokens=12)),
        collect(mlx_backend, chat("What is the weather like in Paris?", temperature=1.0, max_tokens=20)),
        collect(mlx_backend, chat("Count from one to ten", temperature=0.5, max_tokens=20)),
    )
    assert ids_of(results[0][0]) == ids_of(alone)


# ---------------------------------------------------------------- batching and cancellation


async def test_eight_concurrent_streams_complete_and_share_batches(mlx_backend):
    before = mlx_backend.multi_seq_steps
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    results = await asyncio.gather(*(collect(mlx_backend, chat(p, temperature=0.7, max_tokens=16)) for p in prompts))
    assert len(results) == 8
    for chunks, done in results:
        assert done.finish_reason in ("length", "stop")
        assert done.completion_tokens == len(ids_of(chunks))
    assert mlx_backend.multi_seq_steps > before
    assert mlx_backend.max_batch_seen >= 4
    assert mlx_backend.active_count == 0


async def test_closing_the_stream_removes_the_sequence(mlx_backend):
    gen = mlx_backend.generate(chat(temperature=0.8, max_tokens=1500))
    for _ in range(3):
        assert isinstance(await gen.__anext__(), Chunk)
    assert mlx_backend.active_count == 1
    await gen.aclose()
    await eventually(lambda: mlx_backend.active_count == 0)
    produced = mlx_backend.stats.generated_tokens
    await asyncio.sleep(0.2)
    assert mlx_backend.stats.generated_tokens == produced, "a cancelled sequence kept decoding"


async def test_cancelled_task_removes_the_sequence(mlx_backend):
    started = asyncio.Event()

    async def consume():
        async for ev in mlx_backend.generate(chat(temperature=0.8, max_tokens=1500)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: mlx_backend.active_count == 0)


async def test_queued_request_cancelled_never_prefills(test_model_dir):
    backend = MLXBackend(
        MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none"), max_batch_size=1)
    )
    try:
        first = backend.generate(chat(temperature=0.8, max_tokens=1500))
        assert isinstance(await first.__anext__(), Chunk)
        assert backend.stats.prefills == 1

        async def queued():
            async for _ in backend.generate(chat("another one", temperature=0.8, max_tokens=10)):
                pass

        task = asyncio.create_task(queued())
        await eventually(lambda: backend.active_count == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: backend.active_count == 1)
        async for _ in first:
            pass
        assert backend.active_count == 0
        assert backend.stats.prefills == 1, "the cancelled queued request was prefilled"
        assert backend.stats.max_batch_seen == 1
    finally:
        await backend.close()


async def test_requests_beyond_max_pending_are_refused_as_busy(test_model_dir):
    backend = MLXBackend(
        MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none"), max_pending=1)
    )
    try:
        first = backend.generate(chat(temperature=0.8, max_tokens=1500))
        assert isinstance(await first.__anext__(), Chunk)
        with pytest.raises(errors.ResourceExhausted, match="busy") as ei:
            await collect(backend, chat("second", max_tokens=2))
        assert ei.value.retry_after is not None
        await first.aclose()
        await eventually(lambda: backend.active_count == 0)
        chunks, done = await collect(backend, chat("third", max_tokens=2))
        assert done.completion_tokens == 2
    finally:
        await backend.close()


# ---------------------------------------------------------------- model lifecycle


async def test_keep_alive_zero_unloads_after_the_request(mlx_backend):
    req = chat(temperature=0, max_tokens=3)
    req.keep_alive = 0
    await collect(mlx_backend, req)
    assert [m.name for m in await mlx_backend.list_running()] == []


async def test_keep_alive_negative_never_expires_positive_does(mlx_backend):
    await mlx_backend.load_model(MODEL, -1)
    running = await mlx_backend.list_running()
    assert [(m.name, m.expires_at) for m in running] == [(MODEL, None)]
    assert running[0].size_bytes > 100_000
    await asyncio.sleep(1.2)
    assert [m.name for m in await mlx_backend.list_running()] == [MODEL]

    await mlx_backend.load_model(MODEL, 0.3)
    (m,) = await mlx_backend.list_running()
    assert m.expires_at is not None
    await eventually(lambda: not mlx_backend._manager.loaded())
    assert await mlx_backend.list_running() == []

    await mlx_backend.load_model(MODEL, None)  # default keep_alive
    (m,) = await mlx_backend.list_running()
    assert m.expires_at is not None
    assert await mlx_backend.unload_model(MODEL) is True
    assert await mlx_backend.list_running() == []
    assert await mlx_backend.unload_model(MODEL) is False


async def test_load_model_with_zero_keep_alive_unloads(mlx_backend):
    await mlx_backend.load_model(MODEL, None)
    assert [m.name for m in await mlx_backend.list_running()] == [MODEL]
    await mlx_backend.load_model(MODEL, 0)
    assert await mlx_backend.list_running() == []


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, test_model_dir):
    root = tmp_path_factory.mktemp("two-models")
    shutil.copytree(test_model_dir / MODEL, root / "tiny-a")
    write_test_model(root, "tiny-b", seed=1, fim=False)
    return root


async def test_lru_evicts_with_max_loaded_models_one(two_models):
    backend = MLXBackend(MLXConfig(models_dir=str(two_models), hf_cache=str(two_models / "none"), max_loaded_models=1))
    try:
        a = GenerateRequest(model="tiny-a", prompt=Prompt("hi"), sampling=Sampling(max_tokens=2))
        b = GenerateRequest(model="Tiny-B:latest", prompt=Prompt("hi"), sampling=Sampling(max_tokens=2))
        await collect(backend, a)
        assert [m.name for m in await backend.list_running()] == ["tiny-a"]
        _, done = await collect(backend, b)
        assert done.model == "tiny-b" and done.load_duration_ns > 0
        assert [m.name for m in await backend.list_running()] == ["tiny-b"]
        _, done = await collect(backend, a)
        assert [m.name for m in await backend.list_running()] == ["tiny-a"]
        assert backend.load_count == 3
    finally:
        await backend.close()


async def test_busy_model_is_not_evicted(two_models):
    backend = MLXBackend(MLXConfig(models_dir=str(two_models), hf_cache=str(two_models / "none"), max_loaded_models=1))
    try:
        gen = backend.generate(GenerateRequest(model="tiny-a", prompt=Prompt("hi"), sampling=Sampling(max_tokens=400)))
        await gen.__anext__()
        _, done = await collect(
            backend, GenerateRequest(model="tiny-b", prompt=Prompt("x"), sampling=Sampling(max_tokens=2))
        )
        assert done.finish_reason == "length"
        # tiny-b was loaded beside the busy tiny-a (over the limit), then, idle, evicted first.
        assert backend.load_count == 2
        assert [m.name for m in await backend.list_running()] == ["tiny-a"]
        async for _ in gen:
            pass
        assert [m.name for m in await backend.list_running()] == ["tiny-a"]
    finally:
        await backend.close()


async def test_concurrent_cold_requests_load_once(test_model_dir):
    backend = MLXBackend(MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none")))
    try:
        results = await asyncio.gather(*(collect(backend, chat(max_tokens=3)) for _ in range(6)))
        assert len(results) == 6
        assert backend.load_count == 1
        assert sum(1 for _, d in results if d.load_duration_ns > 0) >= 1
    finally:
        await backend.close()


async def test_unknown_model_names_the_models_that_exist(mlx_backend):
    with pytest.raises(errors.ModelNotFound) as e:
        async for _ in mlx_backend.generate(GenerateRequest(model="nope", prompt=Prompt("hi"))):
            pass
    assert "nope" in e.value.message and MODEL in e.value.message
    with pytest.raises(errors.ModelNotFound):
        await mlx_backend.show_model("nope")


async def test_names_are_case_insensitive_with_latest(mlx_backend):
    _, done = await collect(mlx_backend, GenerateRequest(model="TINY-Llama:latest", prompt=Prompt("hi")))
    assert done.model == MODEL


async def test_hugging_face_cache_layout(tmp_path, test_model_dir):
    snap = tmp_path / "hub" / "models--acme--Tiny-HF" / "snapshots" / "abc123"
    shutil.copytree(test_model_dir / MODEL, snap)
    (tmp_path / "hub" / "models--acme--Tiny-HF" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--Tiny-HF" / "refs" / "main").write_text("abc123")
    backend = MLXBackend(
        MLXConfig(models_dir=str(tmp_path / "empty"), hf_cache=str(tmp_path / "hub"), bootstrap_test_model=False)
    )
    try:
        assert [m.name for m in await backend.list_models()] == ["acme/Tiny-HF"]
        _, done = await collect(backend, GenerateRequest(model="acme/tiny-hf", prompt=Prompt("hi")))
        assert done.model == "acme/Tiny-HF"
    finally:
        await backend.close()


async def test_bootstrap_serves_the_test_model_from_the_data_dir_only_when_there_is_none(tmp_path, test_model_dir):
    from backends.mlx.bootstrap import ensure_test_model

    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    cfg = MLXConfig(models_dir=str(models), hf_cache=str(tmp_path / "none"))
    path = ensure_test_model(cfg, data)
    assert path == data / "test-models" / "tiny-llama" and (path / "config.json").is_file()
    assert cfg.test_models_dir == str(data / "test-models") and list(models.iterdir()) == []
    backend = MLXBackend(cfg)
    try:
        assert [m.name for m in await backend.list_models()] == ["tiny-llama"]
        shutil.copytree(test_model_dir / MODEL, models / "mine")  # a model of the user's: it wins
        assert [m.name for m in await backend.list_models()] == ["mine", "tiny-llama"]
    finally:
        await backend.close()
    # With a model of the user's, the next start serves only theirs.
    again = MLXConfig(models_dir=str(models), hf_cache=str(tmp_path / "none"))
    assert ensure_test_model(again, data) is None and again.test_models_dir is None
    off = MLXConfig(models_dir=str(tmp_path / "empty"), hf_cache=str(tmp_path / "none"), bootstrap_test_model=False)
    assert ensure_test_model(off, data) is None


async def test_list_and_show_describe_the_model(mlx_backend):
    (info,) = [m for m in await mlx_backend.list_models() if m.name == MODEL]
    assert info.backend == "mlx" and info.size_bytes > 100_000 and len(info.digest) == 64
    assert info.modified_at is not None
    d = info.details
    assert (d.family, d.format, d.quantization_level) == ("llama", "mlx", "F32")
    assert d.parameter_count > 100_000 and d.parameter_size.endswith("K")
    show = await mlx_backend.show_model(MODEL)
    assert show.context_length == 2048
    assert set(show.capabilities) == {"completion", "tools", "embedding", "insert", "thinking"}
    assert "<tool_call>" in show.chat_template
    assert show.config["model_type"] == "llama"


# ---------------------------------------------------------------- validation and context


def pb_chat(text="Hello! How are you?", **sampling) -> pb.GenerateRequest:
    """chat() as a gRPC caller sends it."""
    return request_builders.pb_chat(MODEL, text, **sampling)


# Parameter ranges are the contract's, checked once at the service boundary
# (backends/accept.py) for every backend; the engine no longer repeats them.
@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.5),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 2.0),
        ("repeat_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("num_ctx", 0),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_them(field, value):
    with pytest.raises(errors.InvalidArgument) as e:
        accept.generate(pb_chat(**{field: value}))
    assert field in e.value.message


def test_too_many_top_logprobs_is_invalid():
    req = pb_chat()
    req.top_logprobs = 21
    with pytest.raises(errors.InvalidArgument, match="top_logprobs"):
        accept.generate(req)


async def test_top_p_zero_is_greedy(mlx_backend):
    """top_p 0 keeps only the most likely token (OpenAI's and Ollama's reading): the
    contract accepts it and the sampler decodes greedily, whatever the temperature."""
    accept.generate(pb_chat(top_p=0.0))
    greedy, _ = await collect(mlx_backend, chat("Tell me a story", temperature=0, max_tokens=8))
    for seed in (1, 2):
        chunks, _ = await collect(mlx_backend, chat("Tell me a story", temperature=1.5, top_p=0.0, seed=seed,
                                                    max_tokens=8))
        assert text_of(chunks) == text_of(greedy)


async def test_context_length_exceeded(mlx_backend):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 5
    with pytest.raises(errors.InvalidArgument, match="context length exceeded"):
        async for _ in mlx_backend.generate(chat(long_prompt, num_ctx=16)):
            pass
    # max_tokens, unset or larger than the room left, is clamped to that room.
    _, probe = await collect(mlx_backend, chat("hi", max_tokens=1))
    _, done = await collect(mlx_backend, chat("hi", temperature=0, num_ctx=probe.prompt_tokens + 5))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    _, done = await collect(mlx_backend, chat("hi", temperature=0, num_ctx=probe.prompt_tokens + 5, max_tokens=10**6))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    assert mlx_backend.active_count == 0


async def test_raw_prompt_skips_the_template_and_suffix_needs_fim(mlx_backend, two_models):
    _, templated = await collect(
        mlx_backend, GenerateRequest(model=MODEL, prompt=Prompt("hello"), sampling=Sampling(max_tokens=1))
    )
    _, raw = await collect(
        mlx_backend, GenerateRequest(model=MODEL, prompt=Prompt("hello", raw=True), sampling=Sampling(max_tokens=1))
    )
    assert raw.prompt_tokens < templated.prompt_tokens
    assert raw.prompt_tokens == 2  # BOS + "hello"
    chunks, done = await collect(
        mlx_backend,
        GenerateRequest(
            model=MODEL, prompt=Prompt("def add(a, b):", suffix="\n    return c"), sampling=Sampling(max_tokens=4)
        ),
    )
    assert done.completion_tokens == 4
    backend = MLXBackend(MLXConfig(models_dir=str(two_models), hf_cache=str(two_models / "none")))
    try:
        with pytest.raises(errors.InvalidArgument, match="does not support insert"):
            async for _ in backend.generate(GenerateRequest(model="tiny-b", prompt=Prompt("a", suffix="b"))):
                pass
    finally:
        await backend.close()


async def test_empty_prompt_just_loads(mlx_backend):
    await mlx_backend.load_model(MODEL, 0)
    chunks, done = await collect(mlx_backend, GenerateRequest(model=MODEL, prompt=Prompt("")))
    assert chunks == [] and done.completion_tokens == 0 and done.load_duration_ns > 0
    assert [m.name for m in await mlx_backend.list_running()] == [MODEL]


# ---------------------------------------------------------------- constrained output


async def test_json_mode_gives_valid_json(mlx_backend):
    for seed in (1, 2):
        req = chat("Give me JSON", temperature=0.7, seed=seed, max_tokens=300)
        req.format = OutputFormat("json")
        chunks, done = await collect(mlx_backend, req)
        assert done.finish_reason == "stop", text_of(chunks)
        assert isinstance(json.loads(text_of(chunks)), dict)


async def test_json_schema_output_matches_the_schema(mlx_backend):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    }
    for seed in (1, 2, 3):
        req = chat("Describe a person", temperature=1.0, seed=seed, max_tokens=200)
        req.format = OutputFormat("json_schema", schema)
        chunks, done = await collect(mlx_backend, req)
        assert done.finish_reason == "stop"
        obj = json.loads(text_of(chunks))
        assert set(obj) == {"name", "age", "pet"}
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
        assert obj["pet"] in ("cat", "dog")


async def test_invalid_schema_is_invalid_argument(mlx_backend):
    req = chat()
    req.format = OutputFormat("json_schema", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(errors.InvalidArgument, match="format"):
        async for _ in mlx_backend.generate(req):
            pass


# ---------------------------------------------------------------- logprobs


async def test_logprobs_for_every_token_with_top_alternatives(mlx_backend):
    req = chat(temperature=0, max_tokens=6)
    req.logprobs, req.top_logprobs = True, 3
    chunks, done = await collect(mlx_backend, req)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == ids_of(chunks)
    for lp in lps:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert lp.top[0].token_id == lp.token_id and math.isclose(lp.top[0].logprob, lp.logprob)
    chunks, _ = await collect(mlx_backend, chat(temperature=0, max_tokens=3))
    assert all(not c.logprobs for c in chunks)


# ---------------------------------------------------------------- tool calls


WEATHER = Tool("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
CALL_TEXT = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


async def _tokenizer(mlx_backend):
    await mlx_backend.load_model(MODEL, None)
    (lm,) = [m for m in mlx_backend._manager.loaded() if m.name == MODEL]
    return lm.tokenizer


async def test_tool_call_splitter_on_real_tokens(mlx_backend):
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(CALL_TEXT, add_special_tokens=False)
    splitter = ToolCallSplitter(tok.tool_call_start, tok.tool_call_end, tok.tool_parser, [WEATHER.to_template_dict()])
    out = SequenceOutput(tok.detokenizer, tok.eos_token_ids, [], splitter)
    chunks = []
    for t in ids:
        new, stop = out.add(t)
        chunks += new
        assert not stop
    chunks += out.finish()
    assert text_of(chunks) == "Sure. "
    calls = [tc for c in chunks for tc in c.tool_calls]
    assert [(c.name, c.arguments, c.index) for c in calls] == [("get_weather", {"city": "Paris"}, 0)]
    assert calls[0].id.startswith("call_")
    assert ids_of(chunks) == ids


async def test_model_tool_call_is_parsed_end_to_end(mlx_backend, forced_tokens):
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(CALL_TEXT, add_special_tokens=False)
    req = GenerateRequest(
        model=MODEL, messages=[Message("user", "Weather in Paris?")], tools=[WEATHER], sampling=Sampling(max_tokens=100)
    )
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert done.finish_reason == "tool_calls"
    assert text_of(chunks) == "Sure. "
    calls = [tc for c in chunks for tc in c.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert done.completion_tokens == len(ids)

    # Without tools in the request, the same tokens are plain text.
    plain = GenerateRequest(model=MODEL, messages=[Message("user", "x")], sampling=Sampling(max_tokens=100))
    forced_tokens[plain.request_id] = ids
    chunks, done = await collect(mlx_backend, plain)
    assert done.finish_reason == "stop"
    assert text_of(chunks) == CALL_TEXT


async def test_a_failing_sequence_does_not_stop_the_others(mlx_backend, monkeypatch):
    engine = mlx_backend.engine
    original = engine.processors_for
    doomed = chat("fail me", temperature=0.5, max_tokens=50)

    def processors_for(seq):
        procs = original(seq)
        if seq.request_id == doomed.request_id:
            start = len(seq.prompt_ids)

            def boom(tokens, logits):
                if tokens.shape[0] - start >= 3:
                    raise RuntimeError("injected failure")
                return logits

            procs.append(boom)
        return procs

    monkeypatch.setattr(engine, "processors_for", processors_for)

    async def run_doomed():
        got = []
        with pytest.raises(errors.Unavailable, match="injected failure"):
            async for ev in mlx_backend.generate(doomed):
                got.append(ev)
        return got

    got, (chunks, done) = await asyncio.gather(run_doomed(), collect(mlx_backend, chat(temperature=0.5, max_tokens=30)))
    assert 0 < len(got) <= 3
    assert done.finish_reason == "length" and done.completion_tokens == 30
    assert mlx_backend.active_count == 0


# ---------------------------------------------------------------- embeddings


async def test_embeddings_are_normalised_and_deterministic(mlx_backend):
    r1 = await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=["hello world", "a different text"]))
    r2 = await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=["hello world"]))
    assert r1.backend == "mlx" and r1.model == MODEL and r1.prompt_tokens > 4
    assert len(r1.embeddings) == 2 and len(r1.embeddings[0]) == 64
    for v in r1.embeddings:
        assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)
    assert r1.embeddings[0] == pytest.approx(r2.embeddings[0], abs=1e-6)
    assert r1.embeddings[0] != pytest.approx(r1.embeddings[1], abs=1e-3)

    small = await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=["hello world"], dimensions=16))
    assert len(small.embeddings[0]) == 16
    assert math.isclose(sum(x * x for x in small.embeddings[0]), 1.0, rel_tol=1e-4)
    # Beyond the model's size (64): the whole vector (the contract follows Ollama here).
    whole = await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=["hello world"], dimensions=65))
    assert whole.embeddings[0] == pytest.approx(r2.embeddings[0], abs=1e-6)


async def test_embedding_truncation(mlx_backend):
    long_text = "hello world " * 1200  # more than 2048 tokens
    with pytest.raises(errors.InvalidArgument, match="truncate"):
        await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=[long_text], truncate=False))
    r = await mlx_backend.embed(EmbedRequest(model=MODEL, inputs=[long_text], truncate=True))
    assert r.prompt_tokens == 2048
    assert math.isclose(sum(x * x for x in r.embeddings[0]), 1.0, rel_tol=1e-4)


# ---------------------------------------------------------------- robustness and integration


async def test_a_model_that_fails_to_load_is_unavailable_and_others_still_work(tmp_path, test_model_dir):
    shutil.copytree(test_model_dir / MODEL, tmp_path / "good")
    shutil.copytree(test_model_dir / MODEL, tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    backend = MLXBackend(MLXConfig(models_dir=str(tmp_path), hf_cache=str(tmp_path / "none")))
    try:
        with pytest.raises(errors.Unavailable, match="broken"):
            async for _ in backend.generate(GenerateRequest(model="broken", prompt=Prompt("hi"))):
                pass
        _, done = await collect(
            backend, GenerateRequest(model="good", prompt=Prompt("hi"), sampling=Sampling(max_tokens=2))
        )
        assert done.completion_tokens == 2
        assert backend.active_count == 0
    finally:
        await backend.close()


async def test_images_are_refused(mlx_backend):
    req = GenerateRequest(model=MODEL, messages=[Message("user", "what is this?", images=[b"\x89PNG"])])
    with pytest.raises(errors.InvalidArgument, match="does not take images"):
        async for _ in mlx_backend.generate(req):
            pass


async def test_tools_reach_the_chat_template(mlx_backend):
    _, without = await collect(mlx_backend, chat("weather?", max_tokens=1))
    req = chat("weather?", max_tokens=1)
    req.tools = [WEATHER]
    _, with_tools = await collect(mlx_backend, req)
    assert with_tools.prompt_tokens > without.prompt_tokens + 20


async def test_cold_load_does_not_block_the_event_loop(test_model_dir):
    backend = MLXBackend(MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none")))
    gaps, stop = [], asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        _, done = await collect(backend, chat(max_tokens=2))
    finally:
        stop.set()
        await task
        await backend.close()
    assert done.load_duration_ns > 0
    assert max(gaps) < max(0.05, done.load_duration_ns / 1e9 / 2), (max(gaps), done.load_duration_ns)


async def test_memory_snapshot_and_queue_wait_observer(mlx_backend):
    waits = []

    class Observer:
        def observe_queue_wait(self, model, seconds):
            waits.append((model, seconds))

    mlx_backend.observer = Observer()
    try:
        req = chat(max_tokens=2)
        req.keep_alive = -1  # each request sets the model's keep_alive, as in Ollama
        await collect(mlx_backend, req)
    finally:
        mlx_backend.observer = None
    assert len(waits) == 1 and waits[0][0] == MODEL and 0 <= waits[0][1] < 5
    # The MLX thread refreshes its memory figures every 0.25 s: wait for one taken after the request.
    await eventually(lambda: mlx_backend.memory_snapshot().model_expiry == {MODEL: None}
                     and mlx_backend.memory_snapshot().active_sequences == 0)
    snap = mlx_backend.memory_snapshot()
    assert snap.model_bytes[MODEL] > 100_000
    assert snap.model_expiry == {MODEL: None}
    assert snap.active_bytes > 0 and snap.peak_bytes >= snap.active_bytes
    assert snap.active_sequences == 0
    await mlx_backend.load_model(MODEL, None)


async def test_penalties_and_filters_change_sampling(mlx_backend):
    plain, _ = await collect(mlx_backend, chat(temperature=0, max_tokens=30))
    penalised, _ = await collect(mlx_backend, chat(temperature=0, max_tokens=30, repeat_penalty=3.0))
    assert ids_of(plain) != ids_of(penalised)
    # top_k=1 makes any temperature greedy.
    top1, done = await collect(mlx_backend, chat(temperature=1.5, top_k=1, top_p=0.9, min_p=0.05, max_tokens=30))
    assert ids_of(top1) == ids_of(plain) and done.completion_tokens == 30
