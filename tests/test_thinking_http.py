"""Thinking through the HTTP fronts: the official ``ollama`` and ``openai``
clients and raw NDJSON, against the real stack with the model's tokens forced
(keyed by the X-Request-Id the front passes down to the engine)."""

from __future__ import annotations

import json
import uuid

import aiohttp
import pytest
from ollama import AsyncClient
from openai import AsyncOpenAI, BadRequestError

from tests.test_mlx_engine import _tokenizer, forced_tokens  # noqa: F401 - fixture
from tests.test_thinking_engine import ANSWER, SAMPLE, THOUGHT

pytestmark = pytest.mark.timeout(60)

NO_THINK_PREFILL = "<think>\n\n</think>\n\n"


@pytest.fixture
async def force(stack, forced_tokens):  # noqa: F811
    """force(text) -> headers whose request will generate exactly ``text``."""
    tok = await _tokenizer(stack.backend)

    def make(text: str = SAMPLE) -> dict[str, str]:
        rid = uuid.uuid4().hex
        forced_tokens[rid] = tok.encode(text, add_special_tokens=False)
        return {"X-Request-Id": rid}

    return make


# ---------------------------------------------------------------- Ollama


async def test_ollama_client_chat_and_generate_carry_thinking(stack, force):
    msgs = [{"role": "user", "content": "6 x 7?"}]
    c = AsyncClient(host=stack.base, timeout=60, headers=force())
    r = await c.chat(model=stack.model, messages=msgs, think=True)
    assert r.message.thinking == THOUGHT and r.message.content == ANSWER

    c = AsyncClient(host=stack.base, timeout=60, headers=force())
    parts = [p async for p in await c.chat(model=stack.model, messages=msgs, think="high", stream=True)]
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == ANSWER
    assert sum(1 for p in parts if p.message.thinking) > 1  # streamed, not joined at the end

    c = AsyncClient(host=stack.base, timeout=60, headers=force())
    g = await c.generate(model=stack.model, prompt="6 x 7?", think=True)
    assert g.thinking == THOUGHT and g.response == ANSWER


async def test_ollama_think_false_prefills_and_drops(stack, force):
    msgs = [{"role": "user", "content": "6 x 7?"}]
    on = await AsyncClient(host=stack.base, headers=force()).chat(model=stack.model, messages=msgs)
    off = await AsyncClient(host=stack.base, headers=force()).chat(model=stack.model, messages=msgs, think=False)
    assert on.message.thinking == THOUGHT
    assert not off.message.thinking and off.message.content == ANSWER
    tok = await _tokenizer(stack.backend)
    assert off.prompt_eval_count == on.prompt_eval_count + len(tok.encode(NO_THINK_PREFILL, add_special_tokens=False))


async def test_ollama_raw_ndjson_has_thinking_only_when_non_empty(stack, force):
    async with aiohttp.ClientSession() as s:
        body = {
            "model": stack.model,
            "think": True,
            "messages": [
                {"role": "user", "content": "6 x 7?"},
                {"role": "assistant", "content": "42", "thinking": "easy"},
                {"role": "user", "content": "again?"},
            ],
        }
        async with s.post(f"{stack.base}/api/chat", json=body, headers=force()) as r:
            assert r.status == 200
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        thinking_lines = [x for x in lines if "thinking" in x["message"]]
        assert thinking_lines and all(x["message"]["thinking"] for x in thinking_lines)
        assert "".join(x["message"]["thinking"] for x in thinking_lines) == THOUGHT
        assert "".join(x["message"]["content"] for x in lines) == ANSWER
        assert not any("<think>" in json.dumps(x) or "</think>" in json.dumps(x) for x in lines)

        # A plain answer carries no thinking key at all.
        gen = {"model": stack.model, "prompt": "hi", "stream": False}
        async with s.post(f"{stack.base}/api/generate", json=gen, headers=force("Just text.")) as r:
            d = await r.json()
        assert d["response"] == "Just text." and "thinking" not in d
        gen["stream"] = True
        async with s.post(f"{stack.base}/api/generate", json=gen, headers=force()) as r:
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        assert "".join(x.get("thinking", "") for x in lines) == THOUGHT
        assert "".join(x["response"] for x in lines) == ANSWER

        for bad in ("extreme", 3, ["high"]):
            async with s.post(f"{stack.base}/api/generate", json={**gen, "think": bad}) as r:
                assert r.status == 400 and "think" in (await r.json())["error"]


# ---------------------------------------------------------------- OpenAI


async def test_openai_client_reasoning_content(stack, force):
    oa = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "6 x 7?"}]
    r = await oa.chat.completions.create(
        model=stack.model, messages=msgs, reasoning_effort="high", extra_headers=force()
    )
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.model_extra["reasoning_content"] == THOUGHT
    assert r.usage.completion_tokens == len((await _tokenizer(stack.backend)).encode(SAMPLE, add_special_tokens=False))

    stream = await oa.chat.completions.create(model=stack.model, messages=msgs, stream=True, extra_headers=force())
    reasoning, content = [], []
    async for ch in stream:
        for choice in ch.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == THOUGHT and "".join(content) == ANSWER
    assert sum(1 for x in reasoning if x) > 1

    plain = await oa.chat.completions.create(model=stack.model, messages=msgs, extra_headers=force("Only this."))
    assert plain.choices[0].message.content == "Only this."
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


async def test_openai_reasoning_effort_none_and_history(stack, force):
    oa = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0)
    msgs = [
        {"role": "user", "content": "6 x 7?"},
        {"role": "assistant", "content": "42", "reasoning_content": "easy"},
        {"role": "user", "content": "sure?"},
    ]
    on = await oa.chat.completions.create(model=stack.model, messages=msgs, extra_headers=force())
    off = await oa.chat.completions.create(
        model=stack.model, messages=msgs, reasoning_effort="none", extra_headers=force()
    )
    assert on.choices[0].message.model_extra["reasoning_content"] == THOUGHT
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert off.choices[0].message.content == ANSWER
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    with pytest.raises(BadRequestError) as e:
        await oa.chat.completions.create(model=stack.model, messages=msgs, reasoning_effort="max")
    assert "reasoning_effort" in str(e.value)
