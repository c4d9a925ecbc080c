"""The proto forms of backends/types.py (backends/pbconvert.py): every domain
type that travels to another mlxgate service and back survives the trip
(``X.from_pb(x.to_pb()) == x``), what the service reads from a proto request
it can write again unchanged, and the accept step reads a request as the
generic conversion does."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from backends import accept, types
from backends.proto_values import keep_alive_from_pb
from backends.types import (
    Chunk,
    Done,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    LoadResult,
    Message,
    ModelDetails,
    ModelInfo,
    ModelShow,
    OutputFormat,
    Prompt,
    RunningModel,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    TopLogprob,
    event_from_pb,
)
from mlxgate.v1 import inference_pb2 as pb

CHAT = GenerateRequest(
    model="tiny-llama:latest",
    messages=[
        Message("system", "be brief"),
        Message("user", "weather?", images=[b"\x89PNG...", b"GIF89a..."], image_details=["low", "auto"]),
        Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris", "n": [1, 2]}, id="c1")],
                thinking="they want weather"),
        Message("tool", '{"t": 21}', tool_name="get_weather", tool_call_id="c1"),
    ],
    tools=[Tool("get_weather", "the weather", {"type": "object", "properties": {"city": {"type": "string"}}})],
    sampling=Sampling(temperature=0.0, top_p=0.5, top_k=3, min_p=0.125, seed=2**40, repeat_penalty=1.25,
                      repeat_last_n=-1, presence_penalty=-2.0, frequency_penalty=0.5, max_tokens=-1,
                      stop=["\n\n", "END"], num_ctx=512),
    format=OutputFormat("json_schema", {"type": "object"}),
    logprobs=True,
    top_logprobs=5,
    keep_alive=-1.0,
    think=False,
    tool_choice=ToolChoice("function", "get_weather"),
    request_id="req-1:abc.def",
    truncate=True,
)

PROMPT = GenerateRequest(
    model="m",
    prompt=Prompt("def f(", suffix="return 1", system="code", raw=True, images=[b"x"]),
    format=OutputFormat("json"),
    keep_alive=2.5,
    request_id="r2",
)

BARE = GenerateRequest(model="m", prompt=Prompt("hi"), request_id="r3")


@pytest.mark.parametrize("req", [CHAT, PROMPT, BARE], ids=["chat-everything", "prompt", "bare"])
def test_generate_request_survives_the_hop(req: GenerateRequest) -> None:
    # (sampling values that float32, the proto's type, holds exactly)
    assert GenerateRequest.from_pb(req.to_pb()) == req


def test_what_the_service_read_it_sends_on_unchanged() -> None:
    """A request the service parsed (floats already float32) goes on as it came."""
    m = pb.GenerateRequest(request_id="r", model="m", chat=pb.ChatInput(messages=[
        pb.ChatMessage(role=pb.ROLE_USER, content="hi")]), sampling=pb.SamplingParams(temperature=0.7, min_p=0.1))
    assert GenerateRequest.from_pb(m).to_pb() == m


def test_unset_stays_unset() -> None:
    """None means "the backend's default" and must not arrive as a value."""
    m = BARE.to_pb()
    assert not m.sampling.ListFields() and not m.HasField("keep_alive")
    assert not m.HasField("think") and not m.HasField("truncate")
    assert m.WhichOneof("input") == "prompt"


@pytest.mark.parametrize("seconds", [None, 0.0, 300.0, 0.25, -1.0])
def test_keep_alive(seconds) -> None:
    req = GenerateRequest(model="m", prompt=Prompt("x"), keep_alive=seconds)
    assert keep_alive_from_pb(req.to_pb()) == seconds


def test_embed_request_survives_the_hop() -> None:
    for req in (
        EmbedRequest(model="m", inputs=["a", "b"], truncate=False, dimensions=16, keep_alive=60.0, request_id="e1"),
        EmbedRequest(model="m", input_tokens=[[1, 2, 3], [4]], request_id="e2"),
    ):
        assert EmbedRequest.from_pb(req.to_pb()) == req


def test_events_survive_the_hop() -> None:
    chunk = Chunk(
        text="Hel", token_ids=[1, 2], thinking="hmm", backend="mlx", model="tiny-llama",
        tool_calls=[ToolCall("f", {"a": 1}, id="call_0", index=0)],
        logprobs=[TokenLogprob(1, "Hel", -0.5, top=[TopLogprob(1, "Hel", -0.5), TopLogprob(7, "He", -1.5)])],
    )
    done = Done(finish_reason="tool_calls", prompt_tokens=3, completion_tokens=4, cached_prompt_tokens=2,
                load_duration_ns=1, prompt_eval_duration_ns=2, eval_duration_ns=3, total_duration_ns=10**12,
                backend="mlx", model="tiny-llama", error_message="")
    assert event_from_pb(chunk.to_pb()) == chunk
    assert event_from_pb(done.to_pb()) == done
    for reason in ("stop", "length", "cancelled", "error"):
        assert Done.from_pb(Done(finish_reason=reason).to_pb().done).finish_reason == reason
    assert event_from_pb(pb.GenerateResponse()) is None


def test_produced_tool_call_arguments_are_kept_whatever_they_are() -> None:
    """An answer is never refused for its arguments (the produced-side rule)."""
    m = pb.Chunk(tool_calls=[pb.ToolCall(name="f", arguments_json="not json"),
                             pb.ToolCall(name="g", arguments_json="[1, 2]")])
    calls = Chunk.from_pb(m).tool_calls
    assert calls[0].arguments == {"_raw": "not json"}
    assert calls[1].name == "g" and calls[1].arguments  # kept, not dropped


def test_results_survive_the_hop() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    details = ModelDetails("llama", ["llama"], 1234, "1.2K", "F32", "mlx")
    info = ModelInfo("tiny-llama", "mlx", 99, "sha256:ab", when, details, ["ollama"])
    assert ModelInfo.from_pb(info.to_pb()) == info
    assert ModelInfo.from_pb(ModelInfo("x", "mlx").to_pb()) == ModelInfo("x", "mlx")
    show = ModelShow(info, "{{ messages }}", 2048, ["completion", "tools"], {"hidden_size": 64}, "MIT")
    assert ModelShow.from_pb(show.to_pb()) == show
    for running in (RunningModel("tiny-llama", "mlx", 5, when, 2048, details), RunningModel("x", "mlx")):
        assert RunningModel.from_pb(running.to_pb()) == running
    result = EmbedResult([[0.5, -0.25]], prompt_tokens=2, model="m", backend="mlx", load_duration_ns=1,
                         total_duration_ns=2)
    assert EmbedResult.from_pb(result.to_pb()) == result
    load = LoadResult("m", "mlx", 7)
    assert LoadResult.from_pb(load.to_pb()) == load


def test_a_show_with_broken_config_json_keeps_the_rest() -> None:
    m = ModelShow(ModelInfo("x", "mlx"), context_length=8).to_pb()
    m.config_json = "{not json"
    show = ModelShow.from_pb(m)
    assert show.config == {} and show.context_length == 8


def _every_type() -> dict[str, object]:
    """One full instance of each type with a proto form (``@proto``)."""
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    details = ModelDetails("llama", ["llama"], 1234, "1.2K", "F32", "mlx")
    call = ToolCall("f", {"a": [1, {"b": None}]}, id="c", index=2)
    top = TopLogprob(7, "He", -1.5)
    return {x.__class__.__name__: x for x in [
        call, CHAT.messages[2], PROMPT.prompt, CHAT.tools[0], CHAT.sampling, CHAT.format, CHAT.tool_choice,
        CHAT, top, TokenLogprob(1, "Hel", -0.5, top=[top]),
        Chunk(text="a", token_ids=[1], tool_calls=[call], backend="mlx", model="m", thinking="t"),
        Done("length", 1, 2, 3, 4, 5, 6, 7, "mlx", "m", "oops", "END"),
        types.TokenCount(12, "mlx", "m"),
        EmbedRequest(model="m", inputs=["a"], truncate=False, dimensions=4, keep_alive=1.5, request_id="e"),
        EmbedResult([[0.5]], 1, "m", "mlx", 2, 3), details,
        ModelInfo("m", "mlx", 9, "sha256:a", when, details, ["ollama"]),
        ModelShow(ModelInfo("m", "mlx"), "t", 8, ["vision", "thinking"], {"k": [1]}, "MIT", "sys",
                  Sampling(temperature=0.5, stop=["x"]), [Message("user", "hi")], "parent"),
        RunningModel("m", "mlx", 5, when, 2048, details), LoadResult("m", "mlx", 7),
        types.RerankRequest("m", "q", ["a", "b"], top_n=1, instruction="i", keep_alive=0.0, request_id="r"),
        types.RerankResult([(1, 0.75), (0, 0.25)], 9, "m", "mlx", "logits"),
        types.TokenizeRequest("m", messages=[Message("user", "hi")], tools=CHAT.tools, think=True,
                              add_special_tokens=True, add_generation_prompt=False, return_pieces=True,
                              keep_alive=3.0, request_id="t"),
        types.TokenizeRequest("m", text="hello", request_id="t2"),
        types.TokenizeResult([1, 2], ["a", "b"], 8, "m", "mlx"),
        types.DetokenizeRequest("m", [1, 2], keep_alive=2.0, request_id="d"),
        types.DetokenizeResult("ab", "m", "mlx"),
    ]}


def test_every_type_with_a_proto_form_survives_the_hop() -> None:
    samples = _every_type()
    converted = {name for name, cls in vars(types).items() if isinstance(cls, type) and hasattr(cls, "_pb_spec")}
    assert converted == set(samples), "a type with a proto form has no sample here"
    for name, x in samples.items():
        m = x.to_pb()
        inner = getattr(m, m.WhichOneof("event")) if isinstance(m, pb.GenerateResponse) else m
        back = type(x).from_pb(inner)
        assert back == x, name
        assert back.to_pb() == m, name


def test_the_accept_step_and_the_generic_conversion_agree() -> None:
    """What a caller sends is read the same by both ways in (images aside: the
    accept step checks their headers, and these are not images)."""
    chat = dataclasses.replace(CHAT, messages=[dataclasses.replace(x, images=[], image_details=[])
                                               for x in CHAT.messages])
    assert accept.generate(chat.to_pb()) == chat
    assert accept.generate(BARE.to_pb()) == BARE
