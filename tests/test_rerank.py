"""Rerank end to end: HTTP front -> real gRPC service -> router -> MLX engine (and a cloud fake).

The generated models are the judges' material: ``tiny-embed`` (the
generated model, reranking by cosine as an embedding model) must put a
document identical to the query first; ``tiny-llama`` (reranking by the
probability of "yes") must give exactly the scores mlx-lm gives for the same
prompts, built here from Qwen3-Reranker's format.  The clients' shapes are
sent as LangChain's and LlamaIndex's Jina rerankers and Cohere's v2 client
send them (their packages are not installed: see the README).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from backends.cloud.backend import CloudBackend
from backends.mlx.backend import MLXBackend
from backends.mlx.testmodel import write_test_model
from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate import limits
from mlxgate.config import CloudProvider, MLXConfig, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.openai_fake import FakeOpenAI

pytestmark = pytest.mark.timeout(240)

CAUSAL, EMBED, CLOUD = "tiny-llama", "tiny-embed", "rerank-cloud"
KEY = "rerank-test-key"
DOCS = [
    "the cat sat on the mat",
    "def add(a, b): return a + b",
    "errors are reported with a clear message",
    "hello world",
    "the cat sat on the mat",
]


class Rig:
    def __init__(self, models: Path, base: str, keyed: str, target: str, cloud: FakeOpenAI) -> None:
        self.models, self.base, self.keyed, self.target, self.cloud = models, base, keyed, target, cloud


@pytest.fixture(scope="module")
async def rig(tmp_path_factory) -> Any:
    models = tmp_path_factory.mktemp("rerank-models")
    write_test_model(models, CAUSAL, seed=0)
    write_test_model(models, EMBED, seed=1)
    cloud = FakeOpenAI(models=[CLOUD])
    await cloud.start()
    mlx = MLXBackend(MLXConfig(models_dir=str(models), hf_cache=str(models / "no-hf"), bootstrap_test_model=False))
    router = Router([mlx, CloudBackend(CloudProvider(name="fake", base_url=cloud.base_url, models=[CLOUD]), {})])
    service = await start_inference_service(router, port=0)
    data = tmp_path_factory.mktemp("rerank-data")
    cfg = ServerConfig(host="127.0.0.1", port=0, max_body_bytes=8 * 1024 * 1024, data_dir=str(data))
    keyed_cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=[KEY], data_dir=str(data))
    http = await start_http(create_app(cfg, service.target), "127.0.0.1", 0)
    keyed = await start_http(create_app(keyed_cfg, service.target), "127.0.0.1", 0)
    try:
        yield Rig(models, http.url, keyed.url, service.target, cloud)
    finally:
        await keyed.stop()
        await http.stop()
        await service.stop(grace=1.0)
        await router.close()
        await cloud.stop()


async def _post(base: str, path: str, body: dict[str, Any], **kw: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, json=body, **kw) as r:
            return r.status, await r.json(), r.headers


async def _rerank(rig: Rig, body: dict[str, Any], path: str = "/v1/rerank") -> dict[str, Any]:
    status, data, _ = await _post(rig.base, path, body)
    assert status == 200, data
    return data


# ---------------------------------------------------------------- made to prefer


async def test_a_document_identical_to_the_query_ranks_first_by_cosine(rig) -> None:
    query = "errors are reported with a clear message"
    data = await _rerank(rig, {"model": EMBED, "query": query, "documents": DOCS})
    first = data["results"][0]
    assert first["index"] == 2 and first["document"] == {"text": query}
    assert first["relevance_score"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["relevance_score"] < 0.999 for r in data["results"][1:])


async def test_cosine_scores_are_those_of_the_embeddings_endpoint(rig) -> None:
    query = "hello"
    data = await _rerank(rig, {"model": EMBED, "query": query, "documents": DOCS})
    status, emb, _ = await _post(rig.base, "/api/embed", {"model": EMBED, "input": [query, *DOCS]})
    assert status == 200
    q, docs = emb["embeddings"][0], emb["embeddings"][1:]
    want = {i: (sum(a * b for a, b in zip(q, d)) + 1) / 2 for i, d in enumerate(docs)}
    got = {r["index"]: r["relevance_score"] for r in data["results"]}
    assert got == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------- the causal path


def _direct_scores(model_dir: Path, query: str, docs: list[str], instruction: str) -> list[float]:
    """P(yes) by mlx-lm itself: the judging prompt rendered with the model's
    chat template (Qwen3-Reranker's system line and pair format, thinking off), one
    forward pass per document, softmax over the logits of "no" and "yes"."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(model_dir))
    system = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
              'Note that the answer can only be "yes" or "no".')
    marker = "@@PAIR@@"
    # Thinking off: Qwen3-Reranker's prompt ends with an empty think block (this template writes one too).
    text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": marker}],
                                   add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prefix, suffix = text.split(marker)
    vocab = tok.get_vocab()
    yes = vocab["yes"] if "yes" in vocab else tok.encode("yes", add_special_tokens=False)[0]
    no = vocab["no"] if "no" in vocab else tok.encode("no", add_special_tokens=False)[0]
    out = []
    for doc in docs:
        pair = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
        ids = (tok.encode(prefix, add_special_tokens=False) + tok.encode(pair, add_special_tokens=False)
               + tok.encode(suffix, add_special_tokens=False))
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        p = mx.softmax(mx.stack([logits[no], logits[yes]]))[1]
        out.append(p.item())
    return out


async def test_yes_probabilities_equal_mlx_lm_on_the_same_prompts(rig) -> None:
    query, instruction = "what does add do?", "Find code that answers the question"
    data = await _rerank(rig, {"model": CAUSAL, "query": query, "documents": DOCS, "instruction": instruction})
    want = _direct_scores(rig.models / CAUSAL, query, DOCS, instruction)
    got = [None] * len(DOCS)
    for r in data["results"]:
        got[r["index"]] = r["relevance_score"]
    assert got == pytest.approx(want, abs=1e-4)
    # The default instruction is Qwen3-Reranker's.
    data = await _rerank(rig, {"model": CAUSAL, "query": query, "documents": DOCS[:2]})
    default = _direct_scores(rig.models / CAUSAL, query, DOCS[:2],
                             "Given a web search query, retrieve relevant passages that answer the query")
    assert sorted(r["relevance_score"] for r in data["results"]) == pytest.approx(sorted(default), abs=1e-4)


@pytest.mark.parametrize("model", [CAUSAL, EMBED])
async def test_results_are_sorted_bounded_by_top_n_and_index_the_request(rig, model) -> None:
    data = await _rerank(rig, {"model": model, "query": "the cat", "documents": DOCS})
    scores = [r["relevance_score"] for r in data["results"]]
    assert sorted(r["index"] for r in data["results"]) == list(range(len(DOCS)))
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in data["results"])
    # Identical documents score the same and keep the request's order (a stable sort).
    indices = [r["index"] for r in data["results"]]
    assert indices.index(0) + 1 == indices.index(4)
    assert data["model"] == model and data["usage"]["total_tokens"] > 0 and data["id"]
    top = await _rerank(rig, {"model": model, "query": "the cat", "documents": DOCS, "top_n": 2,
                              "return_documents": False}, path="/rerank")
    assert [(r["index"], r["relevance_score"]) for r in top["results"]] == \
        [(r["index"], r["relevance_score"]) for r in data["results"][:2]]
    assert all("document" not in r for r in top["results"])


async def test_a_document_longer_than_the_context_is_cut_not_refused(rig) -> None:
    long_doc = "lorem ipsum dolor sit amet " * 3000  # far beyond 2,048 tokens
    for model in (CAUSAL, EMBED):
        data = await _rerank(rig, {"model": model, "query": "lorem", "documents": [long_doc, "short"]})
        assert len(data["results"]) == 2
        assert data["usage"]["total_tokens"] <= 3 * 2048


# ---------------------------------------------------------------- bounds and errors


async def test_bounds_are_400_naming_the_field(rig) -> None:
    too_many = ["x"] * (limits.MAX_RERANK_DOCUMENTS + 1)
    status, data, _ = await _post(rig.base, "/v1/rerank", {"model": CAUSAL, "query": "q", "documents": too_many})
    assert status == 400 and data["error"]["message"].startswith("documents:"), data
    # Every document cut to the context, all together beyond the token bound: refused before any forward pass.
    big = ["word " * 4000] * (limits.MAX_RERANK_TOKENS // 2000 + 2)
    for model in (CAUSAL, EMBED):
        status, data, _ = await _post(rig.base, "/v2/rerank", {"model": model, "query": "q", "documents": big})
        assert status == 400 and data["error"]["message"].startswith("documents:"), data
        assert str(limits.MAX_RERANK_TOKENS) in data["error"]["message"]
    status, data, _ = await _post(rig.base, "/rerank", {"model": CAUSAL, "query": "q " * 5000, "documents": ["d"]})
    assert status == 400 and data["error"]["message"].startswith("query:"), data
    for body, field in (({"model": CAUSAL, "query": "q", "documents": ["a", ""]}, "documents[1]"),
                        ({"model": CAUSAL, "query": "", "documents": ["a"]}, "query"),
                        ({"model": CAUSAL, "query": "q", "documents": []}, "documents"),
                        ({"model": CAUSAL, "query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
                        ({"model": CAUSAL, "query": "q", "documents": [{"txt": "a"}]}, "documents[0]")):
        status, data, _ = await _post(rig.base, "/v1/rerank", body)
        assert status == 400 and field in data["error"]["message"], (body, data)
        assert data["error"]["type"] == "invalid_request_error"
    status, data, _ = await _post(rig.base, "/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]})
    assert status == 404 and data["error"]["code"] == "model_not_found"


async def test_trust_checks_apply(rig) -> None:
    body = {"model": CAUSAL, "query": "q", "documents": ["a"]}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        status, data, headers = await _post(rig.keyed, path, body)
        assert status == 401 and data["error"]["type"] == "authentication_error", (path, data)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, data, _ = await _post(rig.keyed, path, body, headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200, data
        status, data, _ = await _post(rig.keyed, path, body,
                                      headers={"Authorization": f"Bearer {KEY}", "Host": "evil.example"})
        assert status == 403, data
        status, data, _ = await _post(rig.keyed, path, body, headers={"Authorization": f"Bearer {KEY}",
                                                                     "Origin": "https://evil.example"})
        assert status == 403, data


# ---------------------------------------------------------------- routing and gRPC


async def test_a_cloud_model_is_reranked_by_the_providers_rerank(rig) -> None:
    status, data, headers = await _post(rig.base, "/v1/rerank", {
        "model": CLOUD, "query": "red apple", "documents": ["a green pear", "a red apple", "red"], "top_n": 2})
    assert status == 200, data
    assert headers["x-mlxgate-backend"] == "cloud:fake"
    assert [(r["index"], r["relevance_score"]) for r in data["results"]] == [(1, 1.0), (2, 0.5)]
    assert data["results"][0]["document"] == {"text": "a red apple"}
    path, sent, _ = rig.cloud.requests[-1]
    assert path == "/v1/rerank" and sent["documents"] == ["a green pear", "a red apple", "red"]
    assert sent["top_n"] == 2 and "instruction" not in sent


async def test_grpc_rerank_answers_as_the_front(rig) -> None:
    async with grpc.aio.insecure_channel(rig.target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        res = await stub.Rerank(pb.RerankRequest(model=EMBED, query="hello world", documents=DOCS, top_n=3))
        assert res.backend == "mlx" and res.method == "cosine" and res.model == EMBED
        assert [r.index for r in res.results][0] == 3 and len(res.results) == 3
        assert math.isclose(res.results[0].relevance_score, 1.0, abs_tol=1e-5)
        res = await stub.Rerank(pb.RerankRequest(model=CAUSAL, query="q", documents=["a", "b"]))
        assert res.method == "yes_probability" and len(res.results) == 2
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Rerank(pb.RerankRequest(model=CAUSAL, query="q", documents=["a"], top_n=-1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_n" in e.value.details()


# ---------------------------------------------------------------- the clients' shapes


async def test_the_shapes_rag_clients_send(rig) -> None:
    """What LangChain's ``JinaRerank`` and LlamaIndex's ``JinaRerank`` post
    to ``{base}/v1/rerank`` (model, query, documents as strings, top_n) and
    read back (results[].index, results[].relevance_score), and what Cohere's
    v2 client posts to ``/v2/rerank``."""
    auth = {"Authorization": f"Bearer {KEY}", "Accept-Encoding": "identity"}
    docs = ["hello world", "the cat sat on the mat", "errors"]
    for path, body in (
        ("/v1/rerank", {"query": "hello world", "documents": docs, "model": EMBED, "top_n": 2}),
        ("/v1/rerank", {"model": EMBED, "query": "hello world", "documents": docs, "top_n": 2}),
        ("/v2/rerank", {"model": EMBED, "query": "hello world", "documents": docs, "top_n": 2}),
    ):
        status, data, _ = await _post(rig.keyed, path, body, headers=auth)
        assert status == 200, data
        picked = [docs[r["index"]] for r in data["results"]]
        assert picked[0] == "hello world" and len(picked) == 2
        assert all(isinstance(r["relevance_score"], float) for r in data["results"])
