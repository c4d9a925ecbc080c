"""OpenAI's Responses API (/v1/responses) judged by the official ``openai`` SDK,
against the real stack (front -> gRPC service -> MLX engine on the generated
model; the store in the session's data folder).

The SDK's own types are the wire shapes: every answer and stream event is
also validated against them (``openai.types.responses``), strictly.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from tests.images import data_url, png as tiny_png
from tests.test_tool_choice import valid

pytestmark = pytest.mark.timeout(120)

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


def strictly(kind: Any, obj: Any) -> None:
    """``obj`` validates against the SDK's type (a stream event: the class of its ``type``),
    every required field included (``usage.input_tokens_details.cache_write_tokens`` too)."""
    data = obj if isinstance(obj, dict) else obj.model_dump(mode="json", exclude_unset=True)
    if kind is ResponseStreamEvent:
        kind = EVENT_CLASSES[data["type"]]
    try:
        TypeAdapter(kind).validate_python(data)
    except ValidationError as e:
        raise AssertionError(e.errors()) from None


def _event_classes() -> dict[str, Any]:
    out = {}
    for cls in get_args(get_args(ResponseStreamEvent)[0]):
        out[get_args(cls.model_fields["type"].annotation)[0]] = cls
    return out


EVENT_CLASSES = _event_classes()


# ---------------------------------------------------------------- create


async def test_create_with_text_input_and_instructions(oai, stack):
    r = await oai.responses.create(model=stack.model, input="Say hi", instructions="You are terse.",
                                   max_output_tokens=6, temperature=0, metadata={"case": "text"})
    strictly(Response, r)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == stack.model
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"]
    msg = r.output[0]
    assert msg.role == "assistant" and msg.status == "incomplete" and msg.content[0].type == "output_text"
    assert r.output_text and r.output_text == msg.content[0].text
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "You are terse." and r.metadata == {"case": "text"} and r.store is True
    assert r.max_output_tokens == 6 and r.temperature == 0 and r.tool_choice == "auto" and r.tools == []
    assert r.text.format.type == "text" and r.previous_response_id is None


async def test_create_with_items(oai, stack):
    r = await oai.responses.create(
        model=stack.model,
        input=[
            {"role": "developer", "content": "Answer in one word."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
            {"role": "user", "content": "Another?"},
        ],
        max_output_tokens=4,
        temperature=0,
    )
    strictly(Response, r)
    assert r.output_text and r.usage.output_tokens == 4
    items = [i async for i in oai.responses.input_items.list(r.id, order="asc")]
    assert [(i.type, i.role) for i in items] == [("message", "developer"), ("message", "user"),
                                                 ("message", "assistant"), ("message", "user")]
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == "Answer in one word."
    assert items[2].content[0].type == "output_text" and items[2].content[0].text == "Blue."
    assert all(i.id for i in items)
    for i in items:
        strictly(ResponseItem, i)


async def test_json_schema_format_gives_valid_json(oai, stack):
    """The grammar-constrained engine: the text follows the schema, and the answer ends (completed)."""
    for seed_text in ("First", "Second"):
        r = await oai.responses.create(model=stack.model, input=seed_text, text=JSON_FORMAT, max_output_tokens=60)
        assert r.status == "completed", r.output_text
        answer = json.loads(r.output_text)
        assert isinstance(answer["ok"], bool) and answer["n"] in (1, 2, 3) and set(answer) == {"ok", "n"}
        assert r.text.format.type == "json_schema" and r.text.format.name == "answer"
        assert r.text.format.schema_ == SCHEMA
    # json_object: any object (the random model may write a long one: its start is what is certain).
    r = await oai.responses.create(model=stack.model, input="json", text={"format": {"type": "json_object"}},
                                   max_output_tokens=8)
    assert r.output_text.lstrip().startswith("{") and r.text.format.type == "json_object"


# ---------------------------------------------------------------- stream


async def test_stream_accumulator_rebuilds_the_response(oai, stack):
    events = []
    async with oai.responses.stream(model=stack.model, input="Stream it", text=JSON_FORMAT,
                                    max_output_tokens=60) as stream:
        async for ev in stream:
            events.append(ev)
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.status == "completed" and final.output_text == deltas and json.loads(deltas)["ok"] in (True, False)
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    # What was streamed is what is stored.
    stored = await oai.responses.retrieve(final.id)
    assert stored.output_text == deltas and stored.usage == final.usage
    assert stored.output[0].id == final.output[0].id


async def test_stream_events_on_the_wire(stack):
    """Raw SSE: each event is named by its type (event: ...), data carries the same type and a
    sequence_number; no [DONE]; every event validates against the SDK's event types."""
    body = {"model": stack.model, "input": "hi", "stream": True, "max_output_tokens": 3, "store": False}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{stack.base}/v1/responses", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-mlxgate-backend"] == "mlx"
            text = await r.text()
    assert "[DONE]" not in text
    frames = [f for f in text.split("\n\n") if f.strip()]
    events = []
    for f in frames:
        name_line, data_line = f.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["output_tokens"] == 3
    for e in events:
        strictly(ResponseStreamEvent, e)


# ---------------------------------------------------------------- stored responses


async def test_retrieve_delete_and_input_items(oai, stack):
    items = [{"role": "user", "content": f"message {i}"} for i in range(5)]
    r = await oai.responses.create(model=stack.model, input=items, max_output_tokens=2)
    got = await oai.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()

    page = await oai.responses.input_items.list(r.id, limit=2)  # newest first by default
    assert [i.content[0].text for i in page.data] == ["message 4", "message 3"] and page.has_more
    assert page.first_id == page.data[0].id and page.last_id == page.data[1].id
    everything = [i.content[0].text async for i in oai.responses.input_items.list(r.id, limit=2, order="asc")]
    assert everything == [f"message {i}" for i in range(5)]  # the SDK paged with after=
    ids = [i.id for i in (await oai.responses.input_items.list(r.id, order="asc")).data]
    after = await oai.responses.input_items.list(r.id, order="asc", after=ids[1], limit=2)
    assert [i.id for i in after.data] == ids[2:4] and after.has_more
    before = await oai.responses.input_items.list(r.id, order="asc", extra_query={"before": ids[3]})
    assert [i.id for i in before.data] == ids[:3] and not before.has_more
    with pytest.raises(openai.BadRequestError) as e:
        await oai.responses.input_items.list(r.id, after="msg_nope")
    assert e.value.body["param"] == "after"
    with pytest.raises(openai.BadRequestError):
        await oai.responses.input_items.list(r.id, limit=101)

    assert await oai.responses.delete(r.id) is None  # the SDK reads no body; ours says what went
    for call in (oai.responses.retrieve(r.id), oai.responses.delete(r.id), oai.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError) as e:
            await call
        assert e.value.body["type"] == "invalid_request_error" and r.id in e.value.body["message"]


async def test_deleted_body_and_unknown_ids(stack):
    async with aiohttp.ClientSession() as s:
        body = {"model": stack.model, "input": "x", "max_output_tokens": 1}
        async with s.post(f"{stack.base}/v1/responses", json=body) as r:
            rid = (await r.json())["id"]
        async with s.delete(f"{stack.base}/v1/responses/{rid}") as r:
            assert r.status == 200 and await r.json() == {"id": rid, "object": "response.deleted", "deleted": True}
        for method, path in (("GET", "resp_unknown"), ("DELETE", "x" * 300), ("GET", "resp_x/input_items")):
            async with s.request(method, f"{stack.base}/v1/responses/{path}") as r:
                assert r.status == 404, (method, path)
                assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_store_false_is_not_kept(oai, stack):
    r = await oai.responses.create(model=stack.model, input="x", max_output_tokens=1, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        await oai.responses.create(model=stack.model, input="y", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"


# ---------------------------------------------------------------- conversations


async def test_previous_response_id_continues_and_reuses_the_prompt_cache(oai, stack):
    first = await oai.responses.create(model=stack.model, instructions="Be brief.", input="Tell me about cats.",
                                       max_output_tokens=8, temperature=0)
    second = await oai.responses.create(model=stack.model, instructions="Be brief.", input="And dogs?",
                                        previous_response_id=first.id, max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    # The history came back: the second prompt holds the first turn, rendered as the same prefix,
    # so the engine served that prefix from its prompt cache.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    third = await oai.responses.create(model=stack.model, instructions="Be brief.", input="And birds?",
                                       previous_response_id=second.id, max_output_tokens=8, temperature=0)
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens
    # input_items lists a response's own input only.
    items = (await oai.responses.input_items.list(second.id)).data
    assert [i.content[0].text for i in items] == ["And dogs?"]


async def test_tool_round_trip(oai, stack):
    """tool_choice "required" forces a call (the MLX engine's grammar); the function_call_output goes
    back with previous_response_id and a message comes out."""
    r = await oai.responses.create(model=stack.model, input="What's the weather in Paris?", tools=TOOLS,
                                   tool_choice="required", temperature=1.0, max_output_tokens=200)
    strictly(Response, r)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert valid(WEATHER, json.loads(call.arguments)), call.arguments
    assert r.tool_choice == "required" and r.tools[0].name == "get_weather"

    follow = await oai.responses.create(
        model=stack.model, previous_response_id=r.id, tools=TOOLS, max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp": 21})}],
    )
    assert [o.type for o in follow.output] == ["message"] and follow.output_text
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert follow.usage.input_tokens > r.usage.input_tokens


async def test_a_forced_call_with_a_json_format_is_a_call(oai, stack):
    """text.format shapes output_text; a forced answer is a call, so the format does not apply to it
    (agents send both: the Agents SDK's structured output with tool_choice "required")."""
    r = await oai.responses.create(model=stack.model, input="Weather?", tools=TOOLS, tool_choice="required",
                                   text=JSON_FORMAT, max_output_tokens=200)
    assert [o.type for o in r.output] == ["function_call"] and valid(WEATHER, json.loads(r.output[0].arguments))
    assert r.text.format.type == "json_schema"


async def test_forced_call_streams_its_arguments(oai, stack):
    async with oai.responses.stream(model=stack.model, input="Weather?", tools=TOOLS,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    max_output_tokens=200) as stream:
        events = [ev async for ev in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert final.output[0].type == "function_call" and final.output[0].arguments == done.arguments
    assert valid(WEATHER, json.loads(done.arguments))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra, param, needle", [
    ({"tools": [{"type": "web_search"}]}, "tools[0]", "function tools only"),
    ({"background": True}, "background", "background mode"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "prompt templates"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "item references"),
    ({"input": [{"id": "msg_1"}]}, "input[0]", "item references"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0].type", "file inputs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0].file_id", "file inputs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].image_url", "MLXGATE_FETCH_IMAGE_URLS=1"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "not base64!"}]}]},
     "input[0].content[0].image_url", "data: URLs"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
     "input[0].arguments", "object"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not in tools"),
    ({"input": None}, "input", "input is required"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "16"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "must be"),
])
async def test_what_is_not_served_is_a_clear_400(oai, stack, extra, param, needle):
    body = {"model": stack.model, "input": "hi", "max_output_tokens": 1, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        await oai.responses.create(**body)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"], err


async def test_unknown_model_and_images_on_a_text_model(oai, stack):
    with pytest.raises(openai.NotFoundError) as e:
        await oai.responses.create(model="no-such-model", input="hi")
    assert e.value.body["code"] == "model_not_found"
    png = data_url(tiny_png())
    with pytest.raises(openai.BadRequestError) as e:
        await oai.responses.create(model=stack.model, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "what is it?"},
                                         {"type": "input_image", "image_url": png, "detail": "auto"}]}])
    assert e.value.body["message"] == f"model {stack.model} does not take images"
