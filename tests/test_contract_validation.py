"""One validation, at the service boundary, for every backend.

A gRPC client sending values outside the contract (mlxgate/limits.py and the
ranges in the .proto) gets INVALID_ARGUMENT naming the field whatever backend
the model lives on: here a fake upstream Ollama and a fake OpenAI-compatible
cloud, behind the real adapters, router and service.  The fakes are never
called (not even to list models: the request is refused before routing).
"""

from __future__ import annotations

import json
import math

import grpc
import pytest

from backends.service import start_inference_service
from mlxgate import limits
from mlxgate.config import CloudProvider, Config, OllamaConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from mlxgate_cli.factory import build_router
from tests.fakes.ollama_fake import FakeOllama
from tests.fakes.openai_fake import FakeOpenAI
from tests.request_builders import pb_chat

pytestmark = pytest.mark.timeout(60)

KEY = "sk-contract-test"
OLLAMA_MODEL, CLOUD_MODEL = "tiny", "gpt-test"


@pytest.fixture
async def served():
    ollama, cloud = FakeOllama(), FakeOpenAI(api_key=KEY)
    await ollama.start()
    await cloud.start()
    cfg = Config()
    cfg.mlx.enabled = False
    cfg.ollama = OllamaConfig(upstream=ollama.url, first_token_timeout=5, idle_timeout=5, connect_timeout=2)
    cfg.cloud.providers = [CloudProvider("acme", cloud.base_url, api_key_env="ACME_KEY")]
    router = build_router(cfg, {"ACME_KEY": KEY})
    service = await start_inference_service(router, port=0)
    channel = grpc.aio.insecure_channel(service.target)
    try:
        yield pb_grpc.InferenceServiceStub(channel), ollama, cloud
    finally:
        await channel.close()
        await service.stop(0)
        await router.close()
        await ollama.stop()
        await cloud.stop()


def _edit(**kw):
    """A request change, applied to a fresh chat request."""

    def apply(req: pb.GenerateRequest) -> pb.GenerateRequest:
        for path, value in kw.items():
            value(req) if callable(value) else setattr(req, path, value)
        return req

    return apply


def _tools(n: int, name_len: int = 4) -> object:
    def add(req: pb.GenerateRequest) -> None:
        req.tools.extend(pb.Tool(name=f"t{i}".ljust(name_len, "x"), parameters_json="{}") for i in range(n))

    return add


#: (the field the message must name, a change that puts the request outside the contract)
OUT_OF_RANGE = [
    ("temperature", lambda m: pb_chat(m, temperature=-1)),
    ("temperature", lambda m: pb_chat(m, temperature=math.nan)),
    ("top_p", lambda m: pb_chat(m, top_p=1.5)),
    ("top_p", lambda m: pb_chat(m, top_p=-0.1)),
    ("top_k", lambda m: pb_chat(m, top_k=-1)),
    ("min_p", lambda m: pb_chat(m, min_p=2)),
    ("repeat_penalty", lambda m: pb_chat(m, repeat_penalty=0)),
    ("repeat_last_n", lambda m: pb_chat(m, repeat_last_n=-2)),
    ("presence_penalty", lambda m: pb_chat(m, presence_penalty=2.5)),
    ("frequency_penalty", lambda m: pb_chat(m, frequency_penalty=-3)),
    ("num_ctx", lambda m: pb_chat(m, num_ctx=0)),
    ("stop", lambda m: pb_chat(m, stop=["x"] * (limits.MAX_STOP_SEQUENCES + 1))),
    ("stop[0]", lambda m: pb_chat(m, stop=["x" * (limits.MAX_STOP_CHARS + 1)])),
    ("top_logprobs", lambda m: _edit(top_logprobs=limits.MAX_TOP_LOGPROBS + 1)(pb_chat(m))),
    ("model", lambda m: pb_chat("m" * (limits.MAX_MODEL_NAME_CHARS + 1))),
    ("request_id", lambda m: _edit(request_id="bad id!")(pb_chat(m))),
    ("tools", lambda m: _edit(t=_tools(limits.MAX_TOOLS + 1))(pb_chat(m))),
    ("tools[0].name", lambda m: _edit(t=_tools(1, limits.MAX_TOOL_NAME_CHARS + 1))(pb_chat(m))),
    ("messages", lambda m: _edit(x=lambda r: r.chat.messages.extend(
        [pb.ChatMessage(role=pb.ROLE_USER, content="x")] * limits.MAX_MESSAGES))(pb_chat(m))),
    ("messages[1].role", lambda m: _edit(x=lambda r: r.chat.messages.add(content="no role"))(pb_chat(m))),
    ("images", lambda m: _edit(x=lambda r: r.chat.messages[0].images.extend([b"i"] * (limits.MAX_IMAGES + 1)))(
        pb_chat(m))),
    ("arguments_json", lambda m: _edit(x=lambda r: r.chat.messages.add(
        role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(name="f", arguments_json="[1, 2]")]))(pb_chat(m))),
    ("tool_calls", lambda m: _edit(x=lambda r: r.chat.messages.add(
        role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(name="f")] * (limits.MAX_TOOL_CALLS + 1)))(pb_chat(m))),
    ("json_schema", lambda m: _edit(x=lambda r: r.format.CopyFrom(
        pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema="{not json")))(pb_chat(m))),
    ("tool_choice", lambda m: _edit(x=lambda r: r.tool_choice.CopyFrom(
        pb.ToolChoice(mode=pb.TOOL_CHOICE_FUNCTION, function_name="missing")))(pb_chat(m))),
]


def _upstream_calls(ollama: FakeOllama, cloud: FakeOpenAI) -> list[str]:
    return [p for p, *_ in ollama.requests] + [p for p, *_ in cloud.requests]


@pytest.mark.parametrize("model", [OLLAMA_MODEL, CLOUD_MODEL])
async def test_out_of_range_requests_are_refused_before_any_backend(served, model) -> None:
    stub, ollama, cloud = served
    for field, build in OUT_OF_RANGE:
        req = build(model)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Generate(req, timeout=20):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
        assert field in e.value.details(), (field, e.value.details())
    for req, field in (
        (pb.EmbedRequest(model=model, input=["x"] * (limits.MAX_EMBED_INPUTS + 1)), "input"),
        (pb.EmbedRequest(model=model, input=["x"], dimensions=-1), "dimensions"),
        (pb.EmbedRequest(model="", input=["x"]), "model"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Embed(req, timeout=20)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    assert _upstream_calls(ollama, cloud) == [], "a refused request reached an upstream"

    # The same model, inside the contract, is answered by that upstream (so the
    # refusals above were not a routing accident).
    replies = [r async for r in stub.Generate(pb_chat(model, temperature=0.5, top_p=0.0, max_tokens=4), timeout=20)]
    assert replies[-1].done.backend == ("ollama" if model == OLLAMA_MODEL else "cloud:acme")
    sent = [body for path, body, *_ in ollama.requests + cloud.requests if path.endswith(("/chat", "/completions"))]
    assert sent and json.dumps(sent[-1]).count("top_p") == 1
