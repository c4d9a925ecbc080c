"""The official ``openai`` package against the real stack: the conformance judge."""

from __future__ import annotations

import json

import openai
import pytest
from openai import AsyncOpenAI


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]


async def test_chat_non_stream(oai, stack):
    r = await oai.chat.completions.create(model=stack.model, messages=MSGS, max_tokens=8, seed=1)
    assert r.object == "chat.completion"
    assert r.model == stack.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


async def test_chat_stream_with_usage(oai, stack):
    stream = await oai.chat.completions.create(
        model=stack.model, messages=MSGS, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert text


async def test_chat_n_choices_differ_by_seed(oai, stack):
    r = await oai.chat.completions.create(model=stack.model, messages=MSGS, max_tokens=12, n=3, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(12 for _ in r.choices)
    again = await oai.chat.completions.create(model=stack.model, messages=MSGS, max_tokens=12, n=3, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


async def test_chat_n_stream(oai, stack):
    stream = await oai.chat.completions.create(model=stack.model, messages=MSGS, max_tokens=4, n=2, stream=True)
    seen: dict[int, str] = {}
    async for c in stream:
        for ch in c.choices:
            if ch.finish_reason:
                seen[ch.index] = ch.finish_reason
    assert seen == {0: "length", 1: "length"}


async def test_json_mode(oai, stack):
    # The test model has random weights: JSON mode guarantees well-formed JSON
    # once the object closes, not that it closes within max_tokens.  Eight
    # seeded choices: every one that stopped must parse, and some must stop.
    r = await oai.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "Reply with a JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        n=8,
        seed=0,
    )
    stopped = [c for c in r.choices if c.finish_reason == "stop"]
    assert stopped
    for c in stopped:
        assert isinstance(json.loads(c.message.content), dict)
    assert all(c.message.content.lstrip().startswith("{") for c in r.choices)


async def test_json_schema(oai, stack):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = await oai.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": "ok?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        max_tokens=64,
    )
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


async def test_completions(oai, stack):
    r = await oai.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=6, logprobs=2)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert len(r.choices[0].logprobs.tokens) == 6
    stream = await oai.completions.create(model=stack.model, prompt="Once", max_tokens=4, stream=True)
    parts = [c async for c in stream]
    assert parts[-1].choices[0].finish_reason == "length"


async def test_embeddings_default_encoding(oai, stack):
    r = await oai.embeddings.create(model=stack.model, input=["hello world", "bye"])
    assert [d.index for d in r.data] == [0, 1]
    v = r.data[0].embedding
    assert isinstance(v, list) and len(v) > 8 and all(isinstance(x, float) for x in v)
    assert abs(sum(x * x for x in v) - 1.0) < 1e-3  # L2-normalised (base64 decoded correctly)
    floats = await oai.embeddings.create(model=stack.model, input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(v, abs=1e-6)
    short = await oai.embeddings.create(model=stack.model, input="hello", dimensions=4)
    assert len(short.data[0].embedding) == 4


async def test_models(oai, stack):
    models = [m async for m in oai.models.list()]
    ids = [m.id for m in models]
    assert stack.model in ids
    m = await oai.models.retrieve(stack.model)
    assert m.id == stack.model and m.owned_by == "mlx" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("no-such-model")


async def test_unknown_model_is_not_found(oai, stack):
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=4)
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=4, stream=True)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"n": 0}, {"top_p": 2}, {"max_tokens": 0}])
async def test_bad_parameters_are_bad_request(oai, stack, kw):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(model=stack.model, messages=MSGS, **kw)
    assert e.value.status_code == 400
    assert e.value.param == next(iter(kw))


async def test_largest_seed_with_n_wraps_instead_of_overflowing(oai, stack):
    r = await oai.chat.completions.create(model=stack.model, messages=MSGS, max_tokens=2, n=2, seed=2**63 - 1)
    assert [c.index for c in r.choices] == [0, 1]
