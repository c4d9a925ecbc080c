"""Embeddings from token ids (OpenAI's token-array ``input``).

Token ids are the model's own: the MLX engine embeds them as given, and the
vector equals the text's when the ids are what the model's tokenizer makes of
that text.  Backends whose models tokenize differently (an upstream Ollama, a
cloud API) never receive them: the router skips them, and a model only they
serve is a 400 -- never a vector computed from other words.
"""

from __future__ import annotations

import base64
import math
import struct

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from backends import accept, errors
from backends.errors import InvalidArgument, Unavailable
from backends.ollama import OllamaBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import EmbedRequest
from gateway.app import create_app, start_http
from gateway.errors import ApiError
from gateway.openai import translate as atr
from mlxgate import limits
from mlxgate.config import Config, OllamaConfig, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from tests.fakes.ollama_fake import FakeOllama
from tests.fakes.scripted_backend import ScriptedBackend
from tests.mlx_fixtures import TEST_MODEL
from tests.test_mlx_engine import _tokenizer

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog."


# ---------------------------------------------------------------- the OpenAI front's parsing


@pytest.mark.parametrize(
    "value, texts, tokens",
    [
        ("hi", ["hi"], []),
        (["a", "b"], ["a", "b"], []),
        ([1, 2, 3], [], [[1, 2, 3]]),
        ([[1, 2, 3], [4, 5]], [], [[1, 2, 3], [4, 5]]),
    ],
)
def test_every_openai_input_shape_is_read(value, texts, tokens):
    p = atr.embeddings_request({"model": "m", "input": value})
    assert list(p.req.input) == texts
    assert [list(t.ids) for t in p.req.input_tokens] == tokens
    assert p.req.truncate is False  # /v1/embeddings refuses overlong inputs


@pytest.mark.parametrize(
    "value, says",
    [
        (["a", [1, 2]], "one kind only"),
        ([1, "a"], "one kind only"),
        ([[1, 2], 3], "one kind only"),
        ([[1, 2], []], "input[1]"),
        ([[1, 2], [3, "x"]], "input[1]"),
        ([[1, -5]], "-5"),
        ([1, 2**31], str(2**31)),
        ([True, False], "one kind only"),
        ([1.5], "one kind only"),
        ([], "non-empty"),
        ({"ids": [1]}, "token ids"),
    ],
)
def test_malformed_token_input_is_400(value, says):
    with pytest.raises(ApiError) as e:
        atr.embeddings_request({"model": "m", "input": value})
    assert e.value.status == 400 and e.value.param == "input"
    assert says in e.value.message


def test_completions_still_refuse_token_prompts():
    with pytest.raises(ApiError, match="token arrays are not supported") as e:
        atr.completion_request({"model": "m", "prompt": [[1, 2]]})
    assert e.value.param == "prompt"


# ---------------------------------------------------------------- contract


def test_the_contract_carries_token_ids_and_bounds_them():
    m = pb.EmbedRequest(model="m", input_tokens=[pb.TokenIds(ids=[1, 2]), pb.TokenIds(ids=[3])], truncate=False,
                        dimensions=8)
    back = accept.embed(m)
    assert (back.input_tokens, back.inputs, back.truncate, back.dimensions) == ([[1, 2], [3]], [], False, 8)

    both = pb.EmbedRequest(model="m", input=["x"], input_tokens=[pb.TokenIds(ids=[1])])
    with pytest.raises(InvalidArgument, match="exclusive"):
        accept.embed(both)
    with pytest.raises(InvalidArgument, match=r"input_tokens\[1\]: empty"):
        accept.embed(pb.EmbedRequest(model="m", input_tokens=[pb.TokenIds(ids=[1]), pb.TokenIds()]))
    many = pb.EmbedRequest(model="m", input_tokens=[pb.TokenIds(ids=[1])] * (limits.MAX_EMBED_INPUTS + 1))
    with pytest.raises(InvalidArgument, match="input_tokens: at most"):
        accept.embed(many)


def test_upstream_adapters_refuse_token_ids_themselves():
    """Defence in depth: an adapter called without the router still never sends ids upstream."""
    from backends.ollama import wire as ollama_wire

    with pytest.raises(InvalidArgument, match="token ids"):
        ollama_wire.embed_body(EmbedRequest(model="m", input_tokens=[[1, 2]]))
    assert OllamaBackend.takes_token_ids is False


# ---------------------------------------------------------------- MLX through the real stack, official client


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


def _unit(v: list[float]) -> bool:
    return math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)


async def test_openai_client_embeds_token_arrays(oai, stack):
    r = await oai.embeddings.create(model=stack.model, input=[[1, 2, 3], [4, 5]])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 64 and _unit(d.embedding) for d in r.data)
    assert r.usage.prompt_tokens == 5
    one = await oai.embeddings.create(model=stack.model, input=[1, 2, 3], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-5)


async def test_token_ids_embed_like_the_text_they_encode(oai, stack):
    tok = await _tokenizer(stack.backend)
    ids = list(tok.encode(TEXT))  # what the engine itself makes of the text, special tokens included
    by_text = await oai.embeddings.create(model=stack.model, input=TEXT, encoding_format="float")
    by_ids = await oai.embeddings.create(model=stack.model, input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-5)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)


async def test_ids_outside_the_vocabulary_are_400_naming_the_input(oai, stack):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.embeddings.create(model=stack.model, input=[[1, 2], [3, 100_000]])
    message = e.value.body["message"]
    assert "input[1]" in message and "100000" in message and "vocabulary" in message
    with pytest.raises(openai.BadRequestError, match="one kind only"):
        await oai.embeddings.create(model=stack.model, input=["text", [1, 2]])


async def test_token_input_longer_than_the_context_is_400(oai, stack):
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]: 2100 tokens exceed .* context length 2048"):
        await oai.embeddings.create(model=stack.model, input=[[5] * 2100])


async def test_langchain_wire_shape(stack):
    """LangChain's OpenAIEmbeddings (check_embedding_ctx_length on, its default) posts
    lists of token-id lists with encoding_format base64; replayed on the wire."""
    tok = await _tokenizer(stack.backend)
    ids = [list(tok.encode(TEXT)), list(tok.encode("hello"))]
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/embeddings",
                          json={"input": ids, "model": stack.model, "encoding_format": "base64"}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        async with s.post(stack.base + "/v1/embeddings", json={"input": TEXT, "model": stack.model}) as r:
            text_vec = (await r.json())["data"][0]["embedding"]
    assert [d["index"] for d in answer["data"]] == [0, 1]
    raw = base64.b64decode(answer["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(vec) == pytest.approx(text_vec, abs=1e-5)


# ---------------------------------------------------------------- backends that cannot take ids


@pytest.fixture
async def with_upstream(mlx_backend):
    """A stack whose router has the MLX engine and an upstream Ollama (fake), with aliases."""
    fake = FakeOllama(models=["nomic-embed-text:latest"])
    await fake.start()
    cfg = Config()
    cfg.ollama = OllamaConfig(upstream=fake.url)
    cfg.aliases = {
        "remote-emb": ["ollama:nomic-embed-text:latest"],
        "local-first": [f"mlx:{TEST_MODEL}", "ollama:nomic-embed-text:latest"],
    }
    ollama = OllamaBackend(cfg.ollama)
    service = await start_inference_service(Router([mlx_backend, ollama], cfg.router, cfg.aliases), port=0)
    server_cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=60.0)
    http = await start_http(create_app(server_cfg, service.target), "127.0.0.1", 0)
    client = AsyncOpenAI(base_url=f"{http.url}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        yield client, fake
    finally:
        await client.close()
        await http.stop()
        await service.stop(grace=1.0)
        await ollama.close()  # not the router's close: the session's MLX backend lives on
        await fake.stop()


async def test_a_model_only_ollama_serves_refuses_token_ids(with_upstream):
    client, fake = with_upstream
    with pytest.raises(openai.BadRequestError) as e:
        await client.embeddings.create(model="remote-emb", input=[[1, 2, 3]])
    message = e.value.body["message"]
    assert "ollama" in message and "token ids" in message and "send the input as text" in message
    assert "/api/embed" not in fake.paths()
    r = await client.embeddings.create(model="remote-emb", input="hello", encoding_format="float")
    assert r.data[0].embedding == pytest.approx([0.05, 0.06, 0.07, 0.08])  # text still goes upstream
    assert fake.paths().count("/api/embed") == 1


async def test_an_alias_sends_token_ids_to_its_mlx_target_only(with_upstream):
    client, fake = with_upstream
    r = await client.embeddings.create(model="local-first", input=[[1, 2, 3]])
    assert len(r.data[0].embedding) == 64
    assert "/api/embed" not in fake.paths()


async def test_no_fallback_from_mlx_to_a_backend_that_cannot_take_ids():
    """When the engine fails, its own error is the answer: Ollama's model would read the ids as other words."""
    fake = FakeOllama(models=["emb:latest"])
    await fake.start()
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.ollama = OllamaConfig(upstream=fake.url)
    cfg.aliases = {"emb": ["mlx:emb", "ollama:emb:latest"]}
    mlx = ScriptedBackend("mlx", ["emb"], fail=Unavailable("mlx: model failed to load: out of memory"))
    mlx.takes_token_ids = True
    router = Router([mlx, OllamaBackend(cfg.ollama)], cfg.router, cfg.aliases)
    try:
        with pytest.raises(errors.Unavailable, match="out of memory"):
            await router.embed(EmbedRequest(model="emb", input_tokens=[[1, 2]]))
        assert mlx.calls == [("embed", "emb")] and "/api/embed" not in fake.paths()
        # Text falls back as before.
        res = await router.embed(EmbedRequest(model="emb", inputs=["hello"]))
        assert res.backend == "ollama"
    finally:
        await router.close()
        await fake.stop()
