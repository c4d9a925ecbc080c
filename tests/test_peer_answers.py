"""Answers that follow the peers' contracts and servers (issue 24), judged by the official
``ollama`` and ``openai`` clients where a client can send the request, by raw HTTP where not.

1. Responses usage carries ``input_tokens_details.cache_write_tokens`` (required by OpenAI's
   spec): created, retrieved and streamed (and when a stored response predates the field);
2. ``/api/embed`` with ``input: ""`` is no input: 200, ``embeddings: []``, as Ollama;
3. ``/api/embed`` with ``dimensions`` beyond the model's size is the whole vector (Ollama),
   while ``/v1/embeddings`` keeps OpenAI's 400;
4. a deprecated ``role: "function"`` message (and an assistant's ``function_call``) in chat
   completions history is the tool result (and call) it is;
5. ``/v1/completions`` with ``prompt: null`` (nullable in OpenAI's spec) is answered;
6. Ollama chat history with an assistant tool call lacking ``function`` or a name is taken,
   the call dropped and logged once;
7. Ollama ``options.num_ctx`` below Ollama's minimum is raised to it, and the log says so.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import aiohttp
import openai
import pytest
from ollama import AsyncClient
from openai import AsyncOpenAI

from mlxgate.dialects.ollama import MIN_NUM_CTX

#: The generated model's hidden size (tests/mlx_fixtures.py): its embedding size.
EMBEDDING_SIZE = 64


@pytest.fixture
def ollama_client(stack) -> AsyncClient:
    return AsyncClient(host=stack.base, timeout=60)


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


async def _post(stack, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + path, json=body) as r:
            return r.status, await r.json()


# ---------------------------------------------------------------- 1. Responses usage


def _usage_details(usage) -> tuple[int, int]:
    d = usage.input_tokens_details
    return d.cached_tokens, d.cache_write_tokens


async def test_responses_usage_has_every_required_field(oai, stack):
    r = await oai.responses.create(model=stack.model, input="Say hi", max_output_tokens=3)
    # The SDK model requires the field; model_fields_set tells it came on the wire.
    assert "cache_write_tokens" in r.usage.input_tokens_details.model_fields_set
    assert _usage_details(r.usage)[1] == 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    got = await oai.responses.retrieve(r.id)
    assert got.usage == r.usage
    events = [e async for e in await oai.responses.create(model=stack.model, input="Hi", max_output_tokens=3,
                                                          stream=True)]
    final = events[-1].response
    assert events[-1].type == "response.incomplete"
    assert "cache_write_tokens" in final.usage.input_tokens_details.model_fields_set
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


async def test_a_response_stored_before_the_field_is_retrieved_with_it(oai, stack):
    r = await oai.responses.create(model=stack.model, input="Say hi", max_output_tokens=2)
    # As an earlier version stored it: the field removed from the stored JSON.
    db = sqlite3.connect(Path(stack.server_cfg.data_dir) / "responses.sqlite3")
    try:
        (blob,) = db.execute("SELECT response FROM responses WHERE id = ?", (r.id,)).fetchone()
        old = bytes(blob).replace(b',"cache_write_tokens":0', b"")
        assert old != bytes(blob)
        db.execute("UPDATE responses SET response = ? WHERE id = ?", (old, r.id))
        db.commit()
    finally:
        db.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{stack.base}/v1/responses/{r.id}") as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["usage"]["input_tokens_details"] == {"cached_tokens": r.usage.input_tokens_details.cached_tokens,
                                                     "cache_write_tokens": 0}
    assert body["output"] == [o.model_dump(mode="json", exclude_unset=True) for o in r.output]


# ---------------------------------------------------------------- 2, 3. /api/embed


async def test_ollama_embed_of_an_empty_string_is_no_input(ollama_client, stack):
    r = await ollama_client.embed(model=stack.model, input="")
    assert r.embeddings == [] and r.model == stack.model
    # An empty string among others is still named (Ollama's handler embeds it; nothing to embed here).
    status, body = await _post(stack, "/api/embed", {"model": stack.model, "input": ["a", ""]})
    assert status == 400 and "input[1]" in body["error"]


async def test_ollama_embed_dimensions_beyond_the_model_give_the_whole_vector(ollama_client, stack):
    whole = await ollama_client.embed(model=stack.model, input="hello world")
    beyond = await ollama_client.embed(model=stack.model, input="hello world", dimensions=EMBEDDING_SIZE + 1000)
    assert len(whole.embeddings[0]) == EMBEDDING_SIZE
    assert beyond.embeddings[0] == pytest.approx(whole.embeddings[0], abs=1e-6)
    cut = await ollama_client.embed(model=stack.model, input="hello world", dimensions=8)
    assert len(cut.embeddings[0]) == 8
    assert sum(x * x for x in cut.embeddings[0]) == pytest.approx(1.0, rel=1e-4)


async def test_openai_embeddings_dimensions_beyond_the_model_stay_400(oai, stack):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.embeddings.create(model=stack.model, input="hello", dimensions=EMBEDDING_SIZE + 1)
    err = e.value.body
    assert err["param"] == "dimensions" and err["type"] == "invalid_request_error"
    assert f"embedding size {EMBEDDING_SIZE}" in err["message"]
    same = await oai.embeddings.create(model=stack.model, input="hello", dimensions=EMBEDDING_SIZE)
    assert len(same.data[0].embedding) == EMBEDDING_SIZE


# ---------------------------------------------------------------- 4, 5. OpenAI chat and completions


async def test_openai_deprecated_function_message_is_a_tool_result(oai, stack):
    history = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "12 C and raining"},
    ]
    r = await oai.chat.completions.create(model=stack.model, messages=history, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # The result reaches the prompt: a longer result is more prompt tokens.
    longer = [*history[:2], {**history[2], "content": "12 C and raining, wind from the north-west"}]
    r2 = await oai.chat.completions.create(model=stack.model, messages=longer, max_tokens=1)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


async def test_openai_completions_prompt_null_is_answered(oai, stack):
    r = await oai.completions.create(model=stack.model, prompt=None, max_tokens=4)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length")
    status, body = await _post(stack, "/v1/completions", {"model": stack.model, "max_tokens": 4})
    assert status == 400 and body["error"]["param"] == "prompt"


# ---------------------------------------------------------------- 6, 7. Ollama chat history and num_ctx


async def test_ollama_history_tool_calls_without_a_function_are_dropped(ollama_client, stack, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.ollama.translate")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "", "arguments": {}}},
                        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "12 C", "tool_name": "get_weather"},
    ]
    # The client sends an empty name (its types require a function) ...
    r = await ollama_client.chat(model=stack.model, messages=history, tools=tools, options={"num_predict": 2})
    assert r.done and r.eval_count == 2
    # ... raw HTTP a call with no function at all, and one with a null name.
    raw = [history[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}, {"function": {"name": None}}]},
           history[2]]
    status, body = await _post(stack, "/api/chat", {"model": stack.model, "messages": raw, "stream": False,
                                                    "options": {"num_predict": 2}})
    assert status == 200 and body["done"] and body["eval_count"] == 2
    dropped = [r for r in caplog.records if "dropping assistant tool calls" in r.getMessage()]
    assert len(dropped) <= 1  # once per process (an earlier test may have logged it already)
    # Still refused: what a caller states itself, such as arguments that are not an object.
    bad = [history[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]
    status, body = await _post(stack, "/api/chat", {"model": stack.model, "messages": bad, "stream": False})
    assert status == 400 and "arguments" in body["error"]


async def test_ollama_num_ctx_below_the_minimum_is_raised_to_it(ollama_client, stack, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.ollama.translate")
    # A raw prompt of a token or two: it and the answer fit the 4-token context.
    r = await ollama_client.generate(model=stack.model, prompt="Hi", raw=True, options={"num_ctx": 0, "num_predict": 9})
    assert r.done and 0 < r.prompt_eval_count + r.eval_count <= MIN_NUM_CTX
    assert any(f"num_ctx 0 is below the minimum context: using num_ctx {MIN_NUM_CTX}" in rec.getMessage()
               for rec in caplog.records)
    r = await ollama_client.generate(model=stack.model, prompt="Hi", raw=True, options={"num_ctx": -5})
    assert r.done and r.done_reason == "length" and r.prompt_eval_count + r.eval_count == MIN_NUM_CTX
