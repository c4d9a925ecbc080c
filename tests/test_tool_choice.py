"""Forced tool calls: tool_choice "required" / a named function.

The test model has random weights, so nothing here forces tokens: the
grammar the MLX engine builds for the model's tool-call format (mlx-lm's
json_tools) is what must make every answer one well-formed call to an
allowed tool with arguments matching that tool's schema.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from openai import AsyncOpenAI

from backends import errors
from backends.mlx import constrain
from backends.mlx.backend import MLXBackend
from backends.types import (
    GenerateRequest,
    Message,
    OutputFormat,
    Sampling,
    Tool,
    ToolChoice,
)
from mlxgate.config import MLXConfig
from mlxgate.v1 import inference_pb2 as pb
from tests.test_mlx_engine import collect

MODEL = "tiny-llama"

pytestmark = pytest.mark.timeout(120)

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}, "seconds": {"type": "boolean"}},
    "required": ["zone"],
    "additionalProperties": False,
}
WEATHER = Tool("get_weather", "Weather in a city", WEATHER_PARAMS)
TIME = Tool("get_time", "Current time in a zone", TIME_PARAMS)
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}


def valid(schema: dict, args: dict) -> bool:
    """Just enough JSON-schema checking for the two schemas above."""
    if not isinstance(args, dict) or not set(schema["required"]) <= set(args) <= set(schema["properties"]):
        return False
    for k, v in args.items():
        prop = schema["properties"][k]
        if "enum" in prop and v not in prop["enum"]:
            return False
        if prop.get("type") == "string" and not (isinstance(v, str) and len(v) <= prop["maxLength"]):
            return False
        if prop.get("type") == "boolean" and not isinstance(v, bool):
            return False
    return True


def request(choice: ToolChoice, seed: int, tools=(WEATHER, TIME), **kw) -> GenerateRequest:
    return GenerateRequest(
        model=MODEL,
        messages=[Message("user", "What's the weather in Paris, and the time?")],
        tools=list(tools),
        tool_choice=choice,
        sampling=Sampling(temperature=1.0, seed=seed, max_tokens=200),
        **kw,
    )


# ---------------------------------------------------------------- grammar


def test_grammar_accepts_calls_and_rejects_others(test_model_dir):
    import llguidance.hf
    from mlx_lm.tokenizer_utils import load

    tok = load(test_model_dir / MODEL)
    assert constrain.tool_parser_name(tok) == "json_tools"
    lltok = llguidance.hf.from_tokenizer(tok._tokenizer, eos_token=sorted(tok.eos_token_ids))
    refs = Tool("refs", "", {"$defs": {"N": {"type": "integer"}}, "type": "object",
                             "properties": {"n": {"$ref": "#/$defs/N"}}, "required": ["n"]})
    odd = Tool('od"d', "", {})
    grammar = constrain.tool_call_grammar(
        [WEATHER, refs, odd], tok.tool_call_start, tok.tool_call_end, tok.tool_call_start_tokens,
        tok.tool_call_end_tokens,
    )

    def accepts(text: str) -> bool:
        m = constrain.new_matcher(lltok, grammar, "tool_choice")
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_stopped()

    assert accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>')
    assert accepts('\n<tool_call>\n{"name": "refs", "arguments": {"n": 3}}\n</tool_call>')
    assert accepts('<tool_call>{"name": "od\\"d", "arguments": {"x": [1]}}</tool_call>')
    assert not accepts('<tool_call>{"name": "refs", "arguments": {"n": "3"}}</tool_call>')
    assert not accepts(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}</tool_call>'
    )
    assert not accepts('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert not accepts('Sure! <tool_call>{"name": "refs", "arguments": {"n": 3}}</tool_call>')


# ---------------------------------------------------------------- engine


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_named_function_is_called_with_valid_arguments(mlx_backend, seed):
    chunks, done = await collect(mlx_backend, request(ToolChoice("function", "get_weather"), seed))
    calls = [tc for c in chunks for tc in c.tool_calls]
    assert done.finish_reason == "tool_calls", "".join(c.text for c in chunks)
    assert [c.name for c in calls] == ["get_weather"]
    assert valid(WEATHER_PARAMS, calls[0].arguments), calls[0].arguments
    assert "".join(c.text for c in chunks).strip() == ""


async def test_required_calls_one_of_the_tools(mlx_backend):
    names = set()
    for seed in range(1, 7):
        chunks, done = await collect(mlx_backend, request(ToolChoice("required"), seed))
        calls = [tc for c in chunks for tc in c.tool_calls]
        assert done.finish_reason == "tool_calls"
        assert len(calls) == 1 and calls[0].name in SCHEMAS
        assert valid(SCHEMAS[calls[0].name], calls[0].arguments), calls[0].arguments
        names.add(calls[0].name)
    assert names  # which tool is the (random) model's choice


async def test_forced_choice_errors(mlx_backend):
    async def run(req):
        async for _ in mlx_backend.generate(req):
            pass

    with pytest.raises(errors.InvalidArgument, match="tool_choice.*response_format"):
        await run(request(ToolChoice("required"), 1, format=OutputFormat("json")))
    with pytest.raises(errors.InvalidArgument, match="not in tools"):
        await run(request(ToolChoice("function", "nope"), 1))
    with pytest.raises(errors.InvalidArgument, match="needs tools"):
        await run(request(ToolChoice("required"), 1, tools=()))


async def test_a_tool_format_without_a_grammar_is_refused(tmp_path, test_model_dir):
    shutil.copytree(test_model_dir / MODEL, tmp_path / "coder")
    cfg_path = tmp_path / "coder" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tool_parser_type"] = "qwen3_coder"
    cfg_path.write_text(json.dumps(cfg))
    backend = MLXBackend(MLXConfig(models_dir=str(tmp_path), hf_cache=str(tmp_path / "none")))
    try:
        req = request(ToolChoice("required"), 1)
        req.model = "coder"
        with pytest.raises(errors.InvalidArgument, match=r"not supported for this model's tool-call format \(qwen3"):
            async for _ in backend.generate(req):
                pass
        req = request(ToolChoice(), 1)  # auto still works
        req.model, req.sampling.max_tokens = "coder", 3
        _, done = await collect(backend, req)
        assert done.completion_tokens == 3
    finally:
        await backend.close()


def _pb_request(choice: ToolChoice) -> pb.GenerateRequest:
    """request(choice, 1) as a gRPC caller sends it."""
    m = pb.GenerateRequest(
        model=MODEL,
        chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="What's the weather in Paris?")]),
        tools=[pb.Tool(name=t.name, description=t.description, parameters_json=json.dumps(t.parameters))
               for t in (WEATHER, TIME)],
        sampling=pb.SamplingParams(temperature=1.0, seed=1, max_tokens=200),
    )
    modes = {"required": pb.TOOL_CHOICE_REQUIRED, "function": pb.TOOL_CHOICE_FUNCTION}
    if choice.forced:
        m.tool_choice.CopyFrom(pb.ToolChoice(mode=modes[choice.mode], function_name=choice.function_name))
    return m


def test_tool_choice_round_trips_through_proto():
    for choice in (ToolChoice(), ToolChoice("required"), ToolChoice("function", "get_time")):
        m = _pb_request(choice)
        assert m.HasField("tool_choice") == choice.forced
        assert GenerateRequest.from_pb(m).tool_choice == choice
    m = _pb_request(ToolChoice())
    m.tool_choice.CopyFrom(pb.ToolChoice(mode=pb.TOOL_CHOICE_FUNCTION, function_name="zzz"))
    with pytest.raises(errors.InvalidArgument, match="not in tools"):
        GenerateRequest.from_pb(m)
    m.tool_choice.function_name = ""
    with pytest.raises(errors.InvalidArgument, match="function_name"):
        GenerateRequest.from_pb(m)


# ---------------------------------------------------------------- OpenAI front, official client


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


OAI_TOOLS = [
    {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
    for t in (WEATHER, TIME)
]
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


async def test_openai_required_and_named(oai, stack):
    for choice, allowed in (("required", set(SCHEMAS)), ({"type": "function", "function": {"name": "get_time"}},
                                                          {"get_time"})):
        r = await oai.chat.completions.create(
            model=stack.model, messages=MSGS, tools=OAI_TOOLS, tool_choice=choice, max_tokens=200, n=3, seed=4
        )
        for c in r.choices:
            assert c.finish_reason == "tool_calls"
            (call,) = c.message.tool_calls
            assert call.type == "function" and call.id
            assert call.function.name in allowed
            assert valid(SCHEMAS[call.function.name], json.loads(call.function.arguments))


async def test_openai_required_streaming(oai, stack):
    stream = await oai.chat.completions.create(
        model=stack.model, messages=MSGS, tools=OAI_TOOLS, tool_choice="required", max_tokens=200, seed=2,
        stream=True,
    )
    names, args, finishes = [], "", []
    async for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                if tc.function.name:
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert finishes == ["tool_calls"]
    assert len(names) == 1 and names[0] in SCHEMAS
    assert valid(SCHEMAS[names[0]], json.loads(args))


async def test_openai_a_forced_call_with_a_json_format_is_a_call(oai, stack):
    """response_format shapes the message's text; a forced answer is a call, so the format does
    not apply to it (clients send both: the Agents SDK's structured output with "required")."""
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    for fmt in ({"type": "json_object"}, schema):
        r = await oai.chat.completions.create(
            model=stack.model, messages=MSGS, tools=OAI_TOOLS, tool_choice="required", response_format=fmt,
            max_tokens=200, seed=3,
        )
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert valid(SCHEMAS[call.function.name], json.loads(call.function.arguments))


async def test_openai_none_still_gives_no_tools(oai, stack):
    r = await oai.chat.completions.create(
        model=stack.model, messages=MSGS, tools=OAI_TOOLS, tool_choice="none", max_tokens=6, seed=1
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


async def test_openai_tool_choice_errors(oai, stack):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(
            model=stack.model, messages=MSGS, tools=OAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        )
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        await oai.chat.completions.create(model=stack.model, messages=MSGS, tool_choice="required")


# ---------------------------------------------------------------- upstream backends


def test_cloud_request_passes_the_forced_choice_upstream() -> None:
    from backends.cloud import wire as cloud_wire
    from backends.types import GenerateRequest, Message, Tool, ToolChoice

    tools = [Tool("get_weather", "", {"type": "object"}), Tool("get_time", "", {"type": "object"})]
    base = dict(model="m", messages=[Message("user", "hi")], tools=tools)
    _, body = cloud_wire.generate_body(GenerateRequest(**base, tool_choice=ToolChoice("required")))
    assert body["tool_choice"] == "required"
    _, body = cloud_wire.generate_body(GenerateRequest(**base, tool_choice=ToolChoice("function", "get_time")))
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    _, body = cloud_wire.generate_body(GenerateRequest(**base))
    assert "tool_choice" not in body


def test_ollama_cannot_force_so_the_router_may_move_on() -> None:
    from backends.errors import Unimplemented
    from backends.ollama import wire as ollama_wire
    from backends.types import GenerateRequest, Message, Tool, ToolChoice

    req = GenerateRequest(model="m", messages=[Message("user", "hi")], tools=[Tool("f", "", {"type": "object"})],
                          tool_choice=ToolChoice("required"))
    with pytest.raises(Unimplemented, match="tool_choice") as ei:
        ollama_wire.generate_body(req)
    assert ei.value.retryable
    req.tool_choice = ToolChoice()
    assert ollama_wire.generate_body(req)[1]["tools"][0]["function"]["name"] == "f"
