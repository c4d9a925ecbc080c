"""Ollama dialect over raw HTTP against the real stack (front + gRPC + MLX)."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
FINAL_INT_FIELDS = (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
)


async def test_root_get_and_head(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/") as r:
            assert r.status == 200
            assert r.content_type == "text/plain"
            assert await r.text() == "Ollama is running"
        async with s.head(stack.base + "/") as r:
            assert r.status == 200
            assert await r.read() == b""
        async with s.get(stack.base + "/api/version") as r:
            assert r.status == 200
            assert re.match(r"^\d+\.\d+\.\d+$", (await r.json())["version"])


async def test_generate_stream_is_ndjson(stack):
    async with aiohttp.ClientSession() as s:
        body = {"model": stack.model, "prompt": "Why is the sky blue?", "options": {"num_predict": 8, "seed": 1}}
        async with s.post(stack.base + "/api/generate", json=body) as r:
            assert r.status == 200
            assert r.content_type == "application/x-ndjson"
            assert r.headers["x-mlxgate-backend"] == "mlx"
            raw = await r.text()
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.splitlines()]
    assert len(lines) >= 2
    *chunks, final = lines
    for c in chunks:
        assert c["done"] is False and c["model"] == stack.model
        assert isinstance(c["response"], str)
        assert RFC3339_Z.match(c["created_at"])
    assert final["done"] is True
    assert final["done_reason"] == "length"
    assert final["response"] == ""
    assert final["eval_count"] == 8
    assert final["backend"] == "mlx"
    for k in FINAL_INT_FIELDS:
        assert isinstance(final[k], int), k
    assert final["prompt_eval_count"] > 0 and final["total_duration"] > 0


async def test_generate_non_stream_headers_and_request_id(stack):
    async with aiohttp.ClientSession() as s:
        body = {"model": stack.model, "prompt": "hello", "stream": False, "options": {"num_predict": 6}}
        async with s.post(stack.base + "/api/generate", json=body, headers={"X-Request-Id": "abc-123"}) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            assert r.headers["X-Request-Id"] == "abc-123"
            assert r.headers["x-mlxgate-backend"] == "mlx"
            d = await r.json()
        async with s.get(stack.base + "/api/tags") as r:
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    assert d["done"] is True and d["eval_count"] == 6 and d["done_reason"] == "length"
    assert isinstance(d["response"], str) and d["response"]
    assert "context" not in d


async def test_chat_stream_and_non_stream(stack):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        body = {"model": stack.model, "messages": msgs, "options": {"num_predict": 5}}
        async with s.post(stack.base + "/api/chat", json=body) as r:
            assert r.content_type == "application/x-ndjson"
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        async with s.post(stack.base + "/api/chat", json={**body, "stream": False}) as r:
            one = await r.json()
    assert all(x["message"]["role"] == "assistant" for x in lines)
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
    assert all(x["done"] is False for x in lines[:-1])
    assert one["message"]["role"] == "assistant" and one["message"]["content"]
    assert one["done_reason"] == "length" and one["eval_count"] == 5


async def test_load_and_unload_with_empty_prompt(stack):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/api/generate", json={"model": stack.model}) as r:
            d = await r.json()
            assert r.status == 200
        assert (d["done"], d["done_reason"], d["response"]) == (True, "load", "")
        async with s.get(stack.base + "/api/ps") as r:
            ps = await r.json()
        names = [m["name"] for m in ps["models"]]
        assert f"{stack.model}:latest" in names
        m = ps["models"][names.index(f"{stack.model}:latest")]
        assert m["model"] == m["name"]
        assert m["size"] > 0 and m["size_vram"] == m["size"] and m["context_length"] > 0
        assert RFC3339_Z.match(m["expires_at"])

        async with s.post(stack.base + "/api/chat", json={"model": stack.model, "messages": [], "keep_alive": 0}) as r:
            d = await r.json()
        assert (d["done_reason"], d["message"]) == ("unload", {"role": "assistant", "content": ""})
        async with s.get(stack.base + "/api/ps") as r:
            assert f"{stack.model}:latest" not in [m["name"] for m in (await r.json())["models"]]


async def test_embed_and_legacy_embeddings(stack):
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/api/embed", json={"model": stack.model, "input": ["cat", "dog"]}) as r:
            assert r.status == 200
            d = await r.json()
        async with s.post(stack.base + "/api/embeddings", json={"model": stack.model, "prompt": "cat"}) as r:
            legacy = await r.json()
        async with s.post(stack.base + "/api/embed", json={"model": stack.model, "input": "cat", "dimensions": 8}) as r:
            short = await r.json()
    assert d["model"] == stack.model and len(d["embeddings"]) == 2
    assert len(d["embeddings"][0]) == len(d["embeddings"][1]) > 8
    assert d["embeddings"][0] != d["embeddings"][1]
    assert d["prompt_eval_count"] > 0 and isinstance(d["total_duration"], int)
    assert legacy["embedding"] == pytest.approx(d["embeddings"][0], abs=1e-4)
    assert len(short["embeddings"][0]) == 8


async def test_tags_show(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/tags") as r:
            tags = await r.json()
        async with s.post(stack.base + "/api/show", json={"model": stack.model}) as r:
            show = await r.json()
        async with s.post(stack.base + "/api/show", json={"name": stack.model}) as r:
            assert r.status == 200
    m = next(m for m in tags["models"] if m["name"] == f"{stack.model}:latest")
    assert m["model"] == f"{stack.model}:latest" and m["size"] > 0 and RFC3339_Z.match(m["modified_at"])
    assert set(m["details"]) >= {"parent_model", "format", "family", "families", "parameter_size",
                                 "quantization_level"}
    assert "completion" in show["capabilities"]
    assert show["template"] and f"FROM {stack.model}:latest\n" in show["modelfile"]
    arch = show["model_info"]["general.architecture"]
    assert show["model_info"][f"{arch}.context_length"] > 0
    assert show["details"]["family"] == m["details"]["family"]


async def test_unknown_model_is_404(stack):
    async with aiohttp.ClientSession() as s:
        for path, body in (
            ("/api/generate", {"model": "no-such-model", "prompt": "x"}),
            ("/api/chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            ("/api/show", {"model": "no-such-model"}),
            ("/api/embed", {"model": "no-such-model", "input": "x"}),
        ):
            async with s.post(stack.base + path, json=body) as r:
                assert r.status == 404, path
                assert r.content_type == "application/json"
                d = await r.json()
                assert set(d) == {"error"} and "no-such-model" in d["error"]


async def test_push_is_501_with_help_and_a_service_without_models_says_so(stack):
    """The session's service is built without model management (no MLX store
    given): create, copy, delete and blobs answer 501 naming why; push is 501
    by design (pull there goes to an empty fake hub: tests/test_model_pull.py).
    The managing service: tests/test_model_manage.py."""
    async with aiohttp.ClientSession() as s:
        for method, path, body, needle in (
            ("POST", "/api/push", {"model": "x"}, "does not push"),
            ("POST", "/api/create", {"model": "x", "from": "y"}, "manages no models"),
            ("POST", "/api/copy", {"source": "x", "destination": "y"}, "manages no models"),
            ("DELETE", "/api/delete", {"model": "x"}, "manages no models"),
        ):
            async with s.request(method, stack.base + path, json=body) as r:
                assert r.status == 501, path
                assert needle in (await r.json())["error"]
        async with s.head(stack.base + "/api/blobs/sha256:" + "a" * 64) as r:
            assert r.status == 501
