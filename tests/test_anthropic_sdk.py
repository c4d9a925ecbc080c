"""The official ``anthropic`` Python SDK against the real stack (front -> gRPC
service -> MLX engine on the generated model): the conformance judge of the
Anthropic Messages dialect.

Where the answer's text matters, the model's tokens are forced (keyed by the
X-Request-Id the front passes down, as in the thinking tests); elsewhere the
random model's gibberish is fine and only the shapes are judged.
"""

from __future__ import annotations

import json
import uuid

import anthropic
import pytest
from anthropic import AsyncAnthropic

from gateway.app import create_app, start_http
from mlxgate.config import ServerConfig
from tests.images import b64, png
from tests.test_mlx_engine import _tokenizer, forced_tokens  # noqa: F401 - fixture
from tests.test_thinking_engine import ANSWER, SAMPLE, THOUGHT
from tests.test_tool_choice import SCHEMAS, TIME_PARAMS, WEATHER_PARAMS, valid

pytestmark = pytest.mark.timeout(120)

HI = [{"role": "user", "content": "hi"}]
TOOLS = [
    {"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER_PARAMS},
    {"name": "get_time", "description": "Current time in a zone", "input_schema": TIME_PARAMS},
]


def client(stack, **kw) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=stack.base, api_key="x", max_retries=0, **kw)


@pytest.fixture
async def force(stack, forced_tokens):  # noqa: F811
    """force(text) -> headers whose request will generate exactly ``text``."""
    tok = await _tokenizer(stack.backend)

    def make(text: str = SAMPLE) -> dict[str, str]:
        rid = uuid.uuid4().hex
        forced_tokens[rid] = tok.encode(text, add_special_tokens=False)
        return {"X-Request-Id": rid}

    return make


def comparable(m: anthropic.types.Message) -> dict:
    """A message without what legitimately differs between two runs: its id,
    and how the prompt tokens split between fresh and cached (the second run of
    a prompt finds it in the prompt cache)."""
    d = m.model_dump()
    d.pop("id")
    u = d["usage"]
    u["input_tokens"] += u.pop("cache_read_input_tokens")
    return d


# ---------------------------------------------------------------- messages.create


async def test_create_with_system_and_turns(stack):
    c = client(stack)
    r = await c.messages.with_raw_response.create(
        model=stack.model, max_tokens=6, system="You are terse.",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "you?"}]}],
    )
    assert r.headers["x-mlxgate-backend"] == "mlx" and r.headers["request-id"] == r.headers["x-request-id"]
    m = await r.parse()
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == stack.model
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 6 and m.usage.input_tokens > 0
    assert m.usage.cache_creation_input_tokens == 0 and m.usage.cache_read_input_tokens is not None
    # The system prompt and every turn reached the template: each adds tokens.
    n_all = (await c.messages.count_tokens(model=stack.model, system="You are terse.", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And you?"}])).input_tokens
    n_less = (await c.messages.count_tokens(model=stack.model, messages=[{"role": "user", "content": "And you?"}]))
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n_all > n_less.input_tokens


async def test_stop_sequences_and_stop_reasons(stack, force):
    c = client(stack)
    m = await c.messages.create(model=stack.model, max_tokens=50, messages=HI, stop_sequences=["zzz", "STOP"],
                                extra_headers=force("Hello there STOP and more"))
    assert m.content[0].text == "Hello there " and (m.stop_reason, m.stop_sequence) == ("stop_sequence", "STOP")
    m = await c.messages.create(model=stack.model, max_tokens=50, messages=HI, extra_headers=force("Just this."))
    assert m.content[0].text == "Just this." and (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    m = await c.messages.create(model=stack.model, max_tokens=2, messages=HI, extra_headers=force("Just this."))
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    # max_tokens 0: nothing generated (Anthropic's "warm the cache" request).
    m = await c.messages.create(model=stack.model, max_tokens=0, messages=HI)
    assert (m.content, m.stop_reason, m.usage.output_tokens) == ([], "max_tokens", 0)


async def test_sampling_extensions_via_extra_body(stack):
    # The SDK no longer types temperature/top_p/top_k; they are part of the API and travel in the body.
    c = client(stack)
    m = await c.messages.create(model=stack.model, max_tokens=4, messages=HI,
                                extra_body={"temperature": 0, "top_k": 5, "top_p": 0.5, "metadata": {"user_id": "u"}})
    assert m.usage.output_tokens == 4
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI, extra_body={"temperature": 1.5})
    assert e.value.type == "invalid_request_error" and "temperature must be at most 1" in e.value.api_message


# ---------------------------------------------------------------- messages.stream


async def test_stream_rebuilds_the_whole_message(stack, force):
    c = client(stack)
    whole = await c.messages.create(model=stack.model, max_tokens=40, messages=HI,
                                    extra_headers=force("One two three."))
    async with c.messages.stream(model=stack.model, max_tokens=40, messages=HI,
                                 extra_headers=force("One two three.")) as s:
        texts = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert "".join(texts) == "One two three." and len(texts) > 1  # streamed, not joined at the end
    assert comparable(final) == comparable(whole)
    assert final.id != whole.id and final.id.startswith("msg_")


async def test_stream_with_a_stop_sequence_and_max_tokens(stack, force):
    c = client(stack)
    async with c.messages.stream(model=stack.model, max_tokens=50, messages=HI, stop_sequences=["STOP"],
                                 extra_headers=force("Hello there STOP and more")) as s:
        final = await s.get_final_message()
    assert final.content[0].text == "Hello there " and (final.stop_reason, final.stop_sequence) == (
        "stop_sequence", "STOP")
    async with c.messages.stream(model=stack.model, max_tokens=3, messages=HI) as s:
        final = await s.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3 and final.usage.input_tokens > 0


# ---------------------------------------------------------------- thinking


async def test_thinking_blocks(stack, force):
    c = client(stack)
    kw = dict(model=stack.model, max_tokens=2000, messages=[{"role": "user", "content": "6 x 7?"}],
              thinking={"type": "enabled", "budget_tokens": 1024})
    m = await c.messages.create(**kw, extra_headers=force())
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert (m.content[0].thinking, m.content[0].signature, m.content[1].text) == (THOUGHT, "", ANSWER)
    async with c.messages.stream(**kw, extra_headers=force()) as s:
        kinds = [ev.type async for ev in s]
        final = await s.get_final_message()
    assert comparable(final) == comparable(m)
    assert kinds.count("thinking") > 1  # thinking_delta events, streamed
    # Thinking disabled: the template is asked not to think and no thinking block comes back.
    off = await c.messages.create(**{**kw, "thinking": {"type": "disabled"}}, extra_headers=force())
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == ANSWER
    # Thinking given back in history (with our empty signature) is accepted.
    again = await c.messages.create(
        model=stack.model, max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "6 x 7?"}, {"role": "assistant", "content": m.content},
                  {"role": "user", "content": "and 6 x 8?"}],
    )
    assert again.usage.output_tokens == 4


# ---------------------------------------------------------------- tools


async def test_tool_choice_any_forces_a_valid_call_then_a_tool_result_turn(stack):
    c = client(stack)
    ask = [{"role": "user", "content": "What's the weather in Paris, and the time?"}]
    m = await c.messages.create(model=stack.model, max_tokens=200, messages=ask, tools=TOOLS,
                                tool_choice={"type": "any"}, extra_body={"temperature": 1.0})
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    call = m.content[0]
    assert call.id.startswith("toolu_") and call.name in SCHEMAS and valid(SCHEMAS[call.name], call.input)
    # The tool's result goes back; the conversation goes on.
    history = [*ask, {"role": "assistant", "content": m.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}]
    r = await c.messages.create(model=stack.model, max_tokens=4, messages=history, tools=TOOLS)
    assert r.usage.output_tokens == 4 and r.stop_reason in ("max_tokens", "end_turn", "tool_use")
    with_result = await c.messages.count_tokens(model=stack.model, messages=history, tools=TOOLS)
    without = await c.messages.count_tokens(model=stack.model, messages=history[:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id}]}], tools=TOOLS)
    assert with_result.input_tokens > without.input_tokens  # the result's text reached the prompt


async def test_streamed_named_tool_call_accumulates_its_input(stack):
    c = client(stack)
    async with c.messages.stream(
        model=stack.model, max_tokens=200, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Oslo?"}], extra_body={"temperature": 1.0},
    ) as s:
        events = [ev async for ev in s]
        final = await s.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].name == "get_weather" and valid(WEATHER_PARAMS, final.content[0].input)
    deltas = [ev for ev in events if ev.type == "input_json"]
    assert deltas and json.loads("".join(d.partial_json for d in deltas)) == final.content[0].input


async def test_a_forced_call_with_an_output_format_is_a_call(stack):
    """output_config.format shapes the text; a forced answer is a tool_use, so it does not apply."""
    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"], "additionalProperties": False}}
    m = await client(stack).messages.create(model=stack.model, max_tokens=200, messages=HI, tools=TOOLS,
                                            tool_choice={"type": "any"}, extra_body={"output_config": {"format": fmt}})
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    assert valid({t["name"]: t["input_schema"] for t in TOOLS}[m.content[0].name], m.content[0].input)


async def test_tool_choice_errors(stack):
    c = client(stack)
    with pytest.raises(anthropic.BadRequestError, match="not in tools"):
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.BadRequestError, match='"any" needs tools'):
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI, tool_choice={"type": "any"})
    with pytest.raises(anthropic.BadRequestError, match="server tool 'web_search_20250305' is not supported"):
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI,
                                tools=[{"type": "web_search_20250305", "name": "web_search"}])
    # "none" drops the tools: the prompt is the one without them.
    none = await c.messages.count_tokens(model=stack.model, messages=HI, tools=TOOLS, tool_choice={"type": "none"})
    bare = await c.messages.count_tokens(model=stack.model, messages=HI)
    assert none.input_tokens == bare.input_tokens


# ---------------------------------------------------------------- count_tokens


async def test_count_tokens_is_the_prompt_a_message_uses(stack):
    c = client(stack)
    kw = dict(model=stack.model, system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
              messages=[{"role": "user", "content": "What is the weather like in Paris?"}], tools=TOOLS)
    n = await c.messages.count_tokens(**kw)
    m = await c.messages.create(**kw, max_tokens=1)
    assert isinstance(n, anthropic.types.MessageTokensCount)
    assert n.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    tok = await _tokenizer(stack.backend)
    assert n.input_tokens > len(tok.encode("Be brief.\n\nBe kind.What is the weather like in Paris?"))


async def test_system_role_messages_join_the_system_prompt(stack):
    """Claude Code sends a system-role message after the first user turn; it is
    counted (and generated) as if it were part of ``system``."""
    c = client(stack)
    hoisted = await c.messages.count_tokens(model=stack.model, system="Be brief.", messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": [{"type": "text", "text": "Be kind."}]}])
    joined = await c.messages.count_tokens(model=stack.model, system="Be brief.\n\nBe kind.", messages=HI)
    assert hoisted.input_tokens == joined.input_tokens
    with pytest.raises(anthropic.BadRequestError, match="system messages hold text blocks only"):
        await c.messages.count_tokens(model=stack.model, messages=[*HI, {"role": "system", "content": [
            {"type": "tool_result", "tool_use_id": "x"}]}])


async def test_count_tokens_of_an_input_beyond_the_context_is_refused(stack):
    c = client(stack)
    with pytest.raises(anthropic.BadRequestError, match="context length exceeded") as e:
        await c.messages.count_tokens(model=stack.model, messages=[{"role": "user", "content": "word " * 150_000}])
    assert e.value.type == "invalid_request_error"


# ---------------------------------------------------------------- errors


async def test_error_classes(stack, monkeypatch):
    c = client(stack)
    with pytest.raises(anthropic.NotFoundError) as nf:
        await c.messages.create(model="no-such-model", max_tokens=4, messages=HI)
    assert nf.value.type == "not_found_error" and "no-such-model" in nf.value.api_message
    assert nf.value.request_id  # the request-id header
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.count_tokens(model="no-such-model", messages=HI)
    with pytest.raises(anthropic.BadRequestError) as bad:
        # (a timeout given: the SDK derives its default one from max_tokens)
        await c.messages.create(model=stack.model, max_tokens=anthropic.omit, messages=HI, timeout=30)
    assert bad.value.type == "invalid_request_error" and bad.value.api_message == "max_tokens is required"
    with pytest.raises(anthropic.BadRequestError, match="thinking.budget_tokens must be at least 1024"):
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI,
                                thinking={"type": "enabled", "budget_tokens": 100})
    # Busy: the engine's queue is full -> 529 overloaded_error, with Retry-After.
    monkeypatch.setattr(stack.backend.config, "max_pending", 0)
    with pytest.raises(anthropic.OverloadedError) as busy:
        await c.messages.create(model=stack.model, max_tokens=4, messages=HI)
    assert busy.value.status_code == 529 and busy.value.type == "overloaded_error"
    assert busy.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.OverloadedError):
        async with c.messages.stream(model=stack.model, max_tokens=4, messages=HI) as s:
            await s.get_final_message()


async def test_images_are_refused_as_the_chat_dialect_refuses_them(stack):
    c = client(stack)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png())}}
    with pytest.raises(anthropic.BadRequestError, match="does not take images"):
        await c.messages.create(model=stack.model, max_tokens=4,
                                messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}])
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    with pytest.raises(anthropic.BadRequestError, match="MLXGATE_FETCH_IMAGE_URLS=1"):
        await c.messages.create(model=stack.model, max_tokens=4, messages=[{"role": "user", "content": [url]}])
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError, match="type 'document' are not supported"):
        await c.messages.create(model=stack.model, max_tokens=4, messages=[{"role": "user", "content": [doc]}])


async def test_api_keys_x_api_key_and_origin(stack):
    cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=["sk-local-1"], request_timeout=60)
    http = await start_http(create_app(cfg, stack.grpc_target), cfg.host, 0)
    try:
        ok = AsyncAnthropic(base_url=http.url, api_key="sk-local-1", max_retries=0)  # sends x-api-key
        m = await ok.messages.create(model=stack.model, max_tokens=2, messages=HI)
        assert m.usage.output_tokens == 2
        wrong = AsyncAnthropic(base_url=http.url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            await wrong.messages.create(model=stack.model, max_tokens=2, messages=HI)
        assert e.value.type == "authentication_error" and e.value.api_message == "invalid API key"
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.count_tokens(model=stack.model, messages=HI)
        evil = AsyncAnthropic(base_url=http.url, api_key="sk-local-1", max_retries=0,
                              default_headers={"Origin": "https://evil.example"})
        with pytest.raises(anthropic.PermissionDeniedError) as e:
            await evil.messages.create(model=stack.model, max_tokens=2, messages=HI)
        assert e.value.type == "permission_error" and "Origin" in e.value.api_message
    finally:
        await http.stop()
