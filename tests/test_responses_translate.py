"""Responses <-> proto, offline (gateway/responses/translate.py): items to chat
messages, the request built for the service, and the events and output items
made from proto events -- including what the generated test model never
produces (reasoning, a failure mid-stream), checked with the openai SDK's own
stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from gateway.errors import ApiError
from gateway.responses import translate as tr
from mlxgate.v1 import inference_pb2 as pb
from tests.test_responses_sdk import strictly

PNG = "data:image/png;base64,iVBORw0KGgo="


def parsed(**body: Any) -> tr.Parsed:
    body.setdefault("model", "m")
    body.setdefault("input", "hi")
    return tr.create_request(body)


def sdk_final(events: list[dict[str, Any]]) -> Any:
    """What the openai SDK's stream accumulator makes of our events."""
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for e in events:
        strictly(ResponseStreamEvent, e)
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=e))
    return state._completed_response


def test_items_become_chat_messages():
    p = parsed(input=[
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "look: "},
                                     {"type": "input_image", "image_url": PNG, "detail": "low"},
                                     {"type": "input_image", "image_url": PNG.split(",")[1]}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "long thought"}]},
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "other", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "only a summary"}]},
        {"type": "function_call", "call_id": "c3", "name": "lookup", "arguments": "{}"},
    ])
    req = tr.generate_request(p, [])
    m = req.chat.messages
    assert [x.role for x in m] == [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL, pb.ROLE_TOOL,
                                   pb.ROLE_ASSISTANT]
    assert m[1].content == "look: " and m[1].images == [b"\x89PNG\r\n\x1a\n"] * 2  # a data: URL, bare base64
    assert m[2].content == "Let me check." and m[2].thinking == "long thought"
    assert [(c.id, c.name, json.loads(c.arguments_json), c.index) for c in m[2].tool_calls] == [
        ("c1", "lookup", {"q": 1}, 0), ("c2", "other", {}, 1)]
    assert (m[3].tool_call_id, m[3].tool_name, m[3].content) == ("c1", "lookup", "one")
    assert (m[4].tool_call_id, m[4].tool_name, m[4].content) == ("c2", "other", "two")
    # Reasoning before a call starts its own assistant message, carrying the reasoning.
    assert m[5].thinking == "only a summary" and m[5].tool_calls[0].id == "c3" and m[5].content == ""
    # The stored items: one per input item, each with an id.
    assert len(p.items) == 10 and all(i["id"] for i in p.items)
    assert p.items[1]["content"][1] == {"type": "input_image", "image_url": PNG, "detail": "low"}


def test_instructions_then_history_then_the_new_input():
    history = [
        {"id": "msg_1", "type": "message", "role": "user", "status": "completed",
         "content": [{"type": "input_text", "text": "first"}]},
        {"id": "rs_1", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "answer", "annotations": []}]},
    ]
    req = tr.generate_request(parsed(instructions="sys", input="second"), history)
    got = [(x.role, x.content, x.thinking) for x in req.chat.messages]
    assert got == [(pb.ROLE_SYSTEM, "sys", ""), (pb.ROLE_USER, "first", ""), (pb.ROLE_ASSISTANT, "answer", "hmm"),
                   (pb.ROLE_USER, "second", "")]
    # previous_response_id alone (no new input) continues the stored conversation.
    assert len(tr.generate_request(parsed(input=None, previous_response_id="resp_1"), history).chat.messages) == 2


def test_request_fields():
    req = tr.generate_request(parsed(temperature=0.5, top_p=0.9, max_output_tokens=7, truncation="auto",
                                     reasoning={"effort": "low"}), [])
    assert (req.sampling.temperature, round(req.sampling.top_p, 3), req.sampling.max_tokens) == (0.5, 0.9, 7)
    assert req.truncate is True and req.think is True
    assert parsed(reasoning={"effort": "none"}).base.think is False
    assert not parsed().base.HasField("think") and not parsed().base.HasField("truncate")
    tools = [{"type": "function", "name": "a", "parameters": {"type": "object"}},
             {"type": "function", "name": "b", "description": "bee"}]
    p = parsed(tools=tools, tool_choice={"type": "allowed_tools", "mode": "required",
                                         "tools": [{"type": "function", "name": "b"}]})
    assert [t.name for t in p.base.tools] == ["b"] and p.base.tool_choice.mode == pb.TOOL_CHOICE_REQUIRED
    assert [t["name"] for t in p.tools] == ["a", "b"]  # the answer echoes every tool
    p = parsed(tools=tools, tool_choice={"type": "allowed_tools", "mode": "auto",
                                         "tools": [{"type": "function", "name": "a"}]})
    assert [t.name for t in p.base.tools] == ["a"] and not p.base.HasField("tool_choice")
    assert parsed(tools=tools, tool_choice="none").base.tools == []
    p = parsed(text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}})
    assert p.base.format.type == pb.FORMAT_TYPE_JSON_SCHEMA and json.loads(p.base.format.json_schema) == {
        "type": "object"}
    assert p.text == {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}
    # Fields OpenAI defines that mean nothing here are accepted.
    parsed(user="u", include=["reasoning.encrypted_content"], service_tier="auto", prompt_cache_key="k",
           store=True, parallel_tool_calls=False, top_logprobs=0, stream_options={"include_obfuscation": False})


def _chunks(*chunks: pb.Chunk, done: pb.Done) -> list[pb.GenerateResponse]:
    return [*(pb.GenerateResponse(chunk=c) for c in chunks), pb.GenerateResponse(done=done)]


EVENTS = _chunks(
    pb.Chunk(thinking="Let me ", token_ids=[1, 2]),
    pb.Chunk(thinking="think.", token_ids=[3]),
    pb.Chunk(text="Calling", token_ids=[4]),
    pb.Chunk(text=" now.", token_ids=[5], tool_calls=[pb.ToolCall(id="call_1", name="f", arguments_json='{"x": 1}')]),
    done=pb.Done(finish_reason=pb.FINISH_REASON_TOOL_CALLS, prompt_tokens=10, completion_tokens=6,
                 cached_prompt_tokens=4),
)


def run(a: tr.Assembler, events: list[pb.GenerateResponse]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = a.start()
    final: dict[str, Any] = {}
    for ev in events:
        if ev.WhichOneof("event") == "done":
            closing, terminal, final = a.finish(ev.done)
            out += closing + terminal
        else:
            out += a.feed(ev.chunk)
    return out, final


def test_reasoning_text_and_a_call_as_items_and_events():
    p = parsed(tools=[{"type": "function", "name": "f"}])
    events, final = run(tr.Assembler(p, stream=True), EVENTS)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    reasoning, message, call = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text",
                                                                          "text": "Let me think."}]
    assert message["content"][0]["text"] == "Calling now." and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "f", '{"x": 1}')
    assert final["status"] == "completed" and final["usage"] == {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 16}
    # The SDK's accumulator rebuilds the same response from the events.
    rebuilt = sdk_final(events)
    assert rebuilt.id == final["id"] and rebuilt.output_text == "Calling now."
    assert [o.type for o in rebuilt.output] == ["reasoning", "message", "function_call"]
    assert rebuilt.output[0].content[0].text == "Let me think."
    # Without a stream: the same output, no events.
    a = tr.Assembler(p, stream=False)
    silent, plain = run(a, EVENTS)
    assert silent == [] and [o["type"] for o in plain["output"]] == ["reasoning", "message", "function_call"]
    # Given back as history, the reasoning is the assistant's thinking again.
    m = tr.messages_pb(final["output"])
    assert len(m) == 1 and m[0].thinking == "Let me think." and m[0].content == "Calling now."
    assert m[0].tool_calls[0].id == "call_1"


def test_an_empty_or_cut_answer():
    p = parsed()
    events, final = run(tr.Assembler(p, stream=True), _chunks(done=pb.Done(finish_reason=pb.FINISH_REASON_STOP)))
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == ""
    assert sdk_final(events).output_text == ""
    events, final = run(tr.Assembler(p, stream=True), _chunks(
        pb.Chunk(text="abc"), done=pb.Done(finish_reason=pb.FINISH_REASON_LENGTH, completion_tokens=1)))
    assert events[-1]["type"] == "response.incomplete" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["completed_at"] is None
    with pytest.raises(ApiError):
        run(tr.Assembler(p, stream=True), _chunks(done=pb.Done(finish_reason=pb.FINISH_REASON_ERROR,
                                                                 error_message="boom")))


def test_a_failure_after_the_stream_began():
    a = tr.Assembler(parsed(), stream=True)
    events = a.start() + a.feed(pb.Chunk(text="partial"))
    events += a.fail(ApiError(503, "ollama: no token for 60 s (idle_timeout)"))
    assert [e["type"] for e in events[-5:]] == ["response.output_text.done", "response.content_part.done",
                                               "response.output_item.done", "error", "response.failed"]
    error, failed = events[-2], events[-1]["response"]
    assert error["message"].startswith("ollama:") and error["code"] == "server_error"
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error",
                                                                "message": error["message"]}
    assert failed["output"][0]["status"] == "incomplete" and a.failed == failed
    for e in events:
        strictly(ResponseStreamEvent, e)
