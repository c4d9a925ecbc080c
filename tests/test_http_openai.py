"""OpenAI dialect over raw HTTP against the real stack: SSE framing and shapes."""

from __future__ import annotations

import base64
import json
import struct

import aiohttp


def parse_sse(raw: str) -> list[str]:
    """The data payloads of an SSE body; asserts the framing on the way."""
    assert raw.endswith("\n\n")
    events = raw.split("\n\n")[:-1]
    out = []
    for ev in events:
        assert ev.startswith("data: "), ev
        assert "\n" not in ev
        out.append(ev[len("data: "):])
    return out


async def test_chat_stream_sse_framing(stack):
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            assert r.headers["x-mlxgate-backend"] == "mlx"
            datas = parse_sse(await r.text())
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["system_fingerprint"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 6
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert finals[0]["backend"] == "mlx"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


async def test_chat_non_stream_shape(stack):
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4,
            "max_tokens": 50, "n": 2, "seed": 3, "logprobs": True, "top_logprobs": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.content_type == "application/json"
            assert r.headers["x-mlxgate-backend"] == "mlx"
            d = await r.json()
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    assert [c["index"] for c in d["choices"]] == [0, 1]
    for c in d["choices"]:
        assert c["finish_reason"] == "length"
        assert c["message"]["role"] == "assistant"
        assert len(c["logprobs"]["content"]) == 4
        assert len(c["logprobs"]["content"][0]["top_logprobs"]) == 2
    u = d["usage"]
    assert u["completion_tokens"] == 8 and u["total_tokens"] == u["prompt_tokens"] + 8
    assert u["prompt_tokens_details"]["cached_tokens"] >= 0


async def test_completions_prompts_times_n(stack):
    body = {"model": stack.model, "prompt": ["one", "two"], "n": 2, "max_tokens": 3, "logprobs": 1}
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/completions", json=body) as r:
            assert r.status == 200
            d = await r.json()
        async with s.post(stack.base + "/v1/completions", json={**body, "stream": True}) as r:
            datas = parse_sse(await r.text())
    assert d["object"] == "text_completion"
    assert [c["index"] for c in d["choices"]] == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["tokens"]) == 3 for c in d["choices"])
    assert d["usage"]["completion_tokens"] == 12
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(x) for x in datas[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1, 2, 3}
    assert all(c["object"] == "text_completion" for c in chunks)


async def test_embeddings_float_and_base64_agree(stack):
    async with aiohttp.ClientSession() as s:
        body = {"model": stack.model, "input": ["a b c", "x"]}
        async with s.post(stack.base + "/v1/embeddings", json=body) as r:
            f = await r.json()
        async with s.post(stack.base + "/v1/embeddings", json={**body, "encoding_format": "base64"}) as r:
            b = await r.json()
    assert f["object"] == "list" and [e["index"] for e in f["data"]] == [0, 1]
    vec = f["data"][0]["embedding"]
    raw = base64.b64decode(b["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vec]
    assert f["usage"]["prompt_tokens"] > 0


async def test_models_list_and_retrieve(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/v1/models") as r:
            d = await r.json()
        async with s.get(f"{stack.base}/v1/models/{stack.model}") as r:
            one = await r.json()
        async with s.get(f"{stack.base}/v1/models/{stack.model}:latest") as r:
            assert r.status == 200
            tagged = await r.json()
        async with s.get(f"{stack.base}/v1/models/org/no-such") as r:
            assert r.status == 404
            err = (await r.json())["error"]
    assert d["object"] == "list"
    assert {"id": stack.model, "object": "model", "owned_by": "mlx"}.items() <= next(
        m for m in d["data"] if m["id"] == stack.model
    ).items()
    assert one["id"] == stack.model and isinstance(one["created"], int)
    # OpenAI's list keeps plain ids; an Ollama-style name still finds the model.
    assert all(not m["id"].endswith(":latest") for m in d["data"])
    assert tagged == {**one, "id": f"{stack.model}:latest"}
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert "org/no-such" in err["message"]
