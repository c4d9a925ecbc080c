"""No 512-token cap: a request without a limit runs until a stop or the context is full.

Ollama's default ``num_predict`` is -1 and long answers rely on it.  The
session's fixtures set ``default_max_tokens=32`` for speed, so this module
builds its own stack over an MLX backend with the configuration's default
(-1).  The generated model has random weights and rarely samples EOS, so an
answer with no limit runs to the context limit; a small ``num_ctx`` (700)
keeps that fast while still proving the answer passes 512 tokens.
"""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from openai import AsyncOpenAI

from backends.mlx.backend import MLXBackend
from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import MLXConfig, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.mlx_fixtures import TEST_MODEL

pytestmark = pytest.mark.timeout(120)

#: Above the old 512 cap with room to spare, small enough to generate in about a second.
NUM_CTX = 700
#: The generated model's own context length (testmodel.CONTEXT).
MODEL_CONTEXT = 2048


@pytest.fixture(scope="module")
async def unlimited(test_model_dir):
    """(HTTP base URL, gRPC target) of a stack whose MLX backend keeps the default limit."""
    cfg = MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "no-hf-cache"),
                    bootstrap_test_model=False)
    assert cfg.default_max_tokens == -1
    backend = MLXBackend(cfg)
    service = await start_inference_service(Router([backend]), port=0)
    server_cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0)
    http = await start_http(create_app(server_cfg, service.target), "127.0.0.1", 0)
    try:
        yield http.url, service.target
    finally:
        await http.stop()
        await service.stop(grace=1.0)
        await backend.close()


async def _post(base: str, path: str, body: dict) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()


def _fills(answer: dict, ctx: int) -> None:
    """An Ollama answer that ran to the context limit, past the old cap."""
    assert answer["done_reason"] == "length"
    assert answer["prompt_eval_count"] + answer["eval_count"] == ctx
    assert answer["eval_count"] > 512


@pytest.mark.parametrize("num_predict", [None, -1, -2])
async def test_ollama_generate_without_a_limit_fills_the_context(unlimited, num_predict):
    base, _ = unlimited
    options = {"num_ctx": NUM_CTX, "temperature": 0}
    if num_predict is not None:
        options["num_predict"] = num_predict
    answer = await _post(base, "/api/generate", {"model": TEST_MODEL, "prompt": "Tell me a long story",
                                                 "stream": False, "options": options})
    _fills(answer, NUM_CTX)


async def test_ollama_chat_without_a_limit_fills_the_context(unlimited):
    base, _ = unlimited
    answer = await _post(base, "/api/chat", {
        "model": TEST_MODEL, "messages": [{"role": "user", "content": "Tell me a long story"}], "stream": False,
        "options": {"num_ctx": NUM_CTX, "temperature": 0},
    })
    _fills(answer, NUM_CTX)


async def test_openai_without_max_tokens_is_bounded_by_the_context(unlimited):
    base, _ = unlimited
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=100) as oai:
        r = await oai.chat.completions.create(
            model=TEST_MODEL, messages=[{"role": "user", "content": "Tell me a long story"}], temperature=0
        )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens > 512
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MODEL_CONTEXT


async def test_grpc_without_max_tokens_fills_the_context(unlimited):
    _, target = unlimited
    req = pb.GenerateRequest(
        model=TEST_MODEL,
        chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Tell me a long story")]),
        sampling=pb.SamplingParams(num_ctx=NUM_CTX, temperature=0),
    )
    assert not req.sampling.HasField("max_tokens")
    async with grpc.aio.insecure_channel(target) as ch:
        events = [e async for e in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=100)]
    done = events[-1].done
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert done.completion_tokens > 512 and done.prompt_tokens + done.completion_tokens == NUM_CTX


async def test_an_explicit_no_limit_wins_over_a_configured_default(stack):
    """The session stack's default is 32 tokens; num_predict -1 (gRPC max_tokens -1) still fills the context."""
    small = 120
    body = {"model": stack.model, "prompt": "Tell me a long story", "stream": False,
            "options": {"num_ctx": small, "temperature": 0}}
    capped = await _post(stack.base, "/api/generate", body)
    assert capped["done_reason"] == "length" and capped["eval_count"] == 32
    body["options"]["num_predict"] = -1
    whole = await _post(stack.base, "/api/generate", body)
    assert whole["done_reason"] == "length"
    assert whole["prompt_eval_count"] + whole["eval_count"] == small
    assert whole["eval_count"] > 32
