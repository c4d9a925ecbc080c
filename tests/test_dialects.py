"""The dialect modules' shared rules (mlxgate/dialects/base.py), without servers."""

from __future__ import annotations

import logging

import pytest

from backends.errors import InvalidArgument
from backends.types import ToolCall
from mlxgate import limits
from mlxgate.dialects import base, ollama, openai
from mlxgate.v1 import inference_pb2 as pb


# ---------------------------------------------------------------- tool-call arguments: one rule per direction


@pytest.mark.parametrize("value", ["[1, 2]", "not json", "3", 5, ["a"], '{"a": ' * 70 + "1" + "}" * 70])
def test_what_a_caller_sends_must_be_an_object(value):
    # The HTTP front (both dialects): 400 naming the field.
    body = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": value}}]}]}
    from gateway.errors import ApiError
    from gateway.ollama import translate as otr
    from gateway.openai import translate as atr

    with pytest.raises(ApiError) as e:
        otr.chat_request(body)
    assert e.value.status == 400 and "messages[0].tool_calls[0].function.arguments" in e.value.message
    with pytest.raises(ApiError) as e:
        atr.chat_request(body)
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"
    # A gRPC caller: INVALID_ARGUMENT naming the field.
    text = value if isinstance(value, str) else str(value)
    with pytest.raises(InvalidArgument, match="arguments_json"):
        ToolCall.from_pb(pb.ToolCall(name="f", arguments_json=text))


def test_what_a_caller_sends_may_be_json_text_of_an_object():
    assert base.caller_arguments('{"a": 1}', "x") == {"a": 1}
    assert base.caller_arguments({"a": 1}, "x") == {"a": 1}
    assert base.caller_arguments("", "x") == {} and base.caller_arguments(None, "x") == {}


@pytest.mark.parametrize(
    "value, kept",
    [
        ({"a": 1}, {"a": 1}),
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        (None, {}),
        ("{bad", {"_raw": "{bad"}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
        (7, {"_raw": "7"}),
    ],
)
def test_what_an_upstream_or_the_model_produced_is_kept(value, kept):
    assert base.produced_arguments(value) == kept


def test_both_adapters_apply_the_produced_rule():
    from backends.cloud import wire as cloud_wire
    from backends.ollama import wire as ollama_wire

    calls = ollama_wire.tool_calls_from({"tool_calls": [{"function": {"name": "f", "arguments": "oops"}}]})
    assert calls[0].arguments == {"_raw": "oops"}
    state = cloud_wire.StreamState()
    state.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{\"a\": "}}]}}]})
    assert state.tool_calls()[0].arguments == {"_raw": "{\"a\": "}


# ---------------------------------------------------------------- unknown fields


def test_unknown_fields_are_accepted_and_logged_once_per_name(caplog):
    base._note_unknown.cache_clear()
    body = {"model": "m", "prompt": "x", "weird_field": 1, "options": {"odd_option": 2}}
    with caplog.at_level(logging.INFO, logger="mlxgate.dialects"):
        for _ in range(3):
            r = ollama.GenerateRequest.model_validate(body)
            base.log_unknown(r, "/api/generate")
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == ["/api/generate: ignoring unknown field weird_field",
                     "/api/generate: ignoring unknown field options.odd_option"]


def test_the_unknown_field_log_is_bounded():
    base._note_unknown.cache_clear()
    body = {"model": "m", "prompt": "x", **{f"f{i}": i for i in range(1000)}}
    r = ollama.GenerateRequest.model_validate(body)
    base.log_unknown(r, "/api/generate")
    assert base._note_unknown.cache_info().currsize == base.MAX_UNKNOWN_LOGGED
    for i in range(3000):
        base._note_unknown("/r", f"n{i}")
    assert base._note_unknown.cache_info().currsize <= 1024


# ---------------------------------------------------------------- documented, not enforced


def test_contract_limits_are_documented_by_the_models_but_enforced_by_the_service():
    stops = ["s"] * (limits.MAX_STOP_SEQUENCES + 1)
    r = openai.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": stops, "top_logprobs": 99})
    assert len(r.stop) == limits.MAX_STOP_SEQUENCES + 1 and r.top_logprobs == 99
    schema = openai.ChatCompletionRequest.model_json_schema()
    stop = schema["properties"]["stop"]["anyOf"][1]
    assert stop["maxItems"] == limits.MAX_STOP_SEQUENCES and stop["items"]["maxLength"] == limits.MAX_STOP_CHARS


def test_wire_errors_name_the_field():
    cases = [
        (ollama.ChatRequest, {"model": "m", "messages": [{"role": "wizard"}]}, "messages[0].role"),
        (ollama.GenerateRequest, {"model": "m", "options": {"stop": 5}}, "options.stop"),
        (openai.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}], "temperature": 3},
         "temperature"),
        (openai.CompletionRequest, {"model": "m", "prompt": [1, 2]}, "prompt"),
        (openai.EmbeddingsRequest, {"model": "m", "input": "x", "dimensions": 2**31}, "dimensions"),
        (openai.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}], "seed": -(2.0**63) - 4096},
         "seed"),
    ]
    for model, body, path in cases:
        with pytest.raises(Exception) as e:
            model.model_validate(body)
        err = base.wire_error(e.value, body)
        assert err.path == path and err.message.startswith(path), (err, path)


def test_ignored_fields_are_type_checked_then_ignored():
    """A field documented with the dialect's type but unused here is held to
    that type (what /openapi.json states, what the dialect's own server
    refuses), then ignored; ``{}`` in the document means any value."""
    from pydantic import ValidationError

    assert ollama.ShowRequest.model_validate({"model": "m", "verbose": True}).verbose is True
    assert ollama.ShowRequest.model_validate({"model": "m", "system": {"any": "thing"}}).system == {"any": "thing"}
    with pytest.raises(ValidationError, match="verbose"):
        ollama.ShowRequest.model_validate({"model": "m", "verbose": {}})
    assert ollama.GenerateRequest.model_validate({"model": "m", "context": [1, 2.0]}).context == [1, 2]
    with pytest.raises(ValidationError, match="context"):
        ollama.GenerateRequest.model_validate({"model": "m", "context": ["a"]})
    with pytest.raises(ValidationError, match="template"):
        ollama.GenerateRequest.model_validate({"model": "m", "template": 5})
