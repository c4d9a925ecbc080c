"""Tokenize and detokenize end to end (the session's stack: front -> gRPC -> MLX on the
generated model), with the official ``openai`` and ``ollama`` clients as judges of
the counts a chat reports."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import ollama
import openai
import pytest

from backends.cloud.backend import CloudBackend
from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate import limits
from mlxgate.config import CloudProvider, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.openai_fake import FakeOpenAI
from tests.stack import MODEL

pytestmark = pytest.mark.timeout(120)

TEXTS = ["hello world", "Errors are reported with a clear message.", "naïve café — 東京 🙂", "  two  spaces\n\tand tab"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}]


async def _post(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, json=body) as r:
            return r.status, await r.json()


async def test_ollama_tokenize_then_detokenize_gives_the_text_back(stack) -> None:
    for text in TEXTS:
        status, tok = await _post(stack.base, "/api/tokenize", {"model": MODEL, "content": text})
        assert status == 200 and tok["model"] == MODEL and tok["tokens"], tok
        status, back = await _post(stack.base, "/api/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
        assert status == 200 and back == {"model": MODEL, "content": text}


async def test_vllm_tokenize_prompt(stack) -> None:
    status, with_bos = await _post(stack.base, "/tokenize", {"model": MODEL, "prompt": "hello world",
                                                              "return_token_strs": True})
    assert status == 200, with_bos
    status, plain = await _post(stack.base, "/tokenize", {"model": MODEL, "prompt": "hello world",
                                                           "add_special_tokens": False})
    assert status == 200 and "token_strs" not in plain
    assert with_bos["tokens"][1:] == plain["tokens"] and with_bos["token_strs"][0] == "<|begin_of_text|>"
    assert with_bos["count"] == len(with_bos["tokens"]) and with_bos["max_model_len"] == 2048
    assert len(with_bos["token_strs"]) == with_bos["count"]
    status, back = await _post(stack.base, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]})
    assert status == 200 and back == {"prompt": "hello world"}
    status, back = await _post(stack.base, "/detokenize", {"model": MODEL, "tokens": with_bos["tokens"]})
    assert back == {"prompt": "<|begin_of_text|>hello world"}  # special tokens kept, as vLLM does


async def test_a_chats_count_is_what_a_chat_request_reports(stack) -> None:
    status, tok = await _post(stack.base, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert status == 200, tok
    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="unused")
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert tok["count"] == done.usage.prompt_tokens
    answer = await ollama.AsyncClient(host=stack.base).chat(model=MODEL, messages=MESSAGES,
                                                            options={"num_predict": 1})
    assert tok["count"] == answer.prompt_eval_count
    # Without the generation prompt the chat ends with its last message.
    status, bare = await _post(stack.base, "/tokenize", {"model": MODEL, "messages": MESSAGES,
                                                          "add_generation_prompt": False})
    assert status == 200 and bare["count"] < tok["count"] and tok["tokens"][:bare["count"]] == bare["tokens"]


async def test_bounds_and_bad_ids_are_400_in_each_dialect(stack) -> None:
    status, data = await _post(stack.base, "/api/detokenize", {"model": MODEL, "tokens": [1, 10**6]})
    assert status == 400 and "tokens[1]" in data["error"] and "vocabulary" in data["error"], data
    status, data = await _post(stack.base, "/detokenize", {"model": MODEL, "tokens": [-5]})
    assert status == 400 and "tokens[0]" in data["error"]["message"], data
    assert data["error"]["type"] == "invalid_request_error"
    status, data = await _post(stack.base, "/detokenize",
                               {"model": MODEL, "tokens": [1] * (limits.MAX_DETOKENIZE_TOKENS + 1)})
    assert status == 400 and data["error"]["message"].startswith("tokens:"), data
    long = "word " * 5000  # beyond the 2,048-token context: refused, not tokenized whole
    status, data = await _post(stack.base, "/api/tokenize", {"model": MODEL, "content": long})
    assert status == 400 and "context length exceeded" in data["error"], data
    status, data = await _post(stack.base, "/tokenize", {"model": MODEL, "prompt": long})
    assert status == 400 and "context length exceeded" in data["error"]["message"], data
    status, data = await _post(stack.base, "/tokenize", {"model": MODEL})
    assert status == 400 and data["error"]["param"] == "prompt", data
    status, data = await _post(stack.base, "/api/tokenize", {"model": "nope", "content": "x"})
    assert status == 404 and "not found" in data["error"]


async def test_grpc_tokenize_and_detokenize(stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        res = await stub.Tokenize(pb.TokenizeRequest(model=MODEL, text="hello world", return_pieces=True))
        assert res.backend == "mlx" and res.context_length == 2048 and len(res.pieces) == len(res.tokens)
        back = await stub.Detokenize(pb.DetokenizeRequest(model=MODEL, tokens=res.tokens))
        assert back.text == "hello world"
        chat = pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")])
        counted = await stub.CountTokens(pb.CountTokensRequest(request=pb.GenerateRequest(model=MODEL, chat=chat)))
        res = await stub.Tokenize(pb.TokenizeRequest(model=MODEL, chat=chat))
        assert len(res.tokens) == counted.input_tokens
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Tokenize(pb.TokenizeRequest(model=MODEL))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text or chat" in e.value.details()


async def test_a_model_only_an_upstream_serves_cannot_be_tokenized(tmp_path) -> None:
    cloud = FakeOpenAI(models=["gpt-test"])
    await cloud.start()
    router = Router([CloudBackend(CloudProvider(name="fake", base_url=cloud.base_url, models=["gpt-test"]), {})])
    service = await start_inference_service(router, port=0)
    http = await start_http(create_app(ServerConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path)),
                                       service.target), "127.0.0.1", 0)
    try:
        for path, body in (("/api/tokenize", {"model": "gpt-test", "content": "x"}),
                           ("/detokenize", {"model": "gpt-test", "tokens": [1]})):
            status, data = await _post(http.url, path, body)
            message = data["error"] if isinstance(data["error"], str) else data["error"]["message"]
            assert status == 400 and "cannot tokenize" in message and "cloud:fake" in message, data
        assert not [p for p, _, _ in cloud.requests if "token" in p]
    finally:
        await http.stop()
        await service.stop(grace=0.5)
        await router.close()
        await cloud.stop()


async def test_trust_checks_apply(stack, tmp_path) -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=["tok-key"], data_dir=str(tmp_path))
    http = await start_http(create_app(cfg, stack.grpc_target), "127.0.0.1", 0)
    routes = (("/api/tokenize", {"model": MODEL, "content": "x"}, "ollama"),
              ("/api/detokenize", {"model": MODEL, "tokens": [1]}, "ollama"),
              ("/tokenize", {"model": MODEL, "prompt": "x"}, "openai"),
              ("/detokenize", {"model": MODEL, "tokens": [1]}, "openai"))
    try:
        async with aiohttp.ClientSession() as s:
            for path, body, dialect in routes:
                async with s.post(http.url + path, json=body) as r:
                    data = await r.json()
                    assert r.status == 401, (path, data)
                    assert isinstance(data["error"], str if dialect == "ollama" else dict)
                ok = {"Authorization": "Bearer tok-key"}
                async with s.post(http.url + path, json=body, headers=ok) as r:
                    assert r.status == 200, (path, await r.text())
                async with s.post(http.url + path, json=body, headers={**ok, "Host": "evil.example"}) as r:
                    assert r.status == 403
                async with s.post(http.url + path, json=body, headers={**ok, "Origin": "https://evil.example"}) as r:
                    assert r.status == 403
    finally:
        await http.stop()
