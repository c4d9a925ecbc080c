"""Unit tests of the HTTP front's translation and error table (no servers)."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from gateway.errors import OLLAMA_BUSY, ApiError, adapt, from_grpc, openai_body
from gateway.events import Collected
from gateway.ollama import translate as otr
from gateway.openai import translate as atr
from mlxgate.v1 import inference_pb2 as pb


def Done(finish="stop", prompt=0, completion=0, cached=0, load=0, prompt_eval=0, eval_ns=0, total=0, backend="",
         model="", error_message="") -> pb.Done:
    """A proto Done, positional like the service's domain Done."""
    return pb.Done(finish_reason=getattr(pb, f"FINISH_REASON_{finish.upper()}"), prompt_tokens=prompt,
                   completion_tokens=completion, cached_prompt_tokens=cached, load_duration_ns=load,
                   prompt_eval_duration_ns=prompt_eval, eval_duration_ns=eval_ns, total_duration_ns=total,
                   backend=backend, model=model, error_message=error_message)


def ToolCall(name: str, arguments: dict, id: str = "") -> pb.ToolCall:
    return pb.ToolCall(name=name, arguments_json=json.dumps(arguments), id=id)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


# ---------------------------------------------------------------- keep_alive


@pytest.mark.parametrize(
    "value, seconds",
    [("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("2h", 7200.0), ("-1", -1.0), ("-1m", -1.0),
     (-5, -1.0), (0, 0.0), ("0", 0.0), (90, 90.0), ("1.5s", 1.5), (None, None)],
)
def test_keep_alive_parses_durations_and_seconds(value, seconds):
    assert otr.parse_keep_alive(value) == pytest.approx(seconds) if seconds is not None else otr.parse_keep_alive(
        value
    ) is None


@pytest.mark.parametrize("value", ["soon", "5x", "m5", "", True, [1]])
def test_keep_alive_rejects_garbage(value):
    with pytest.raises(ApiError) as e:
        otr.parse_keep_alive(value)
    assert e.value.status == 400 and "keep_alive" in e.value.message


# ---------------------------------------------------------------- Ollama requests


def test_ollama_options_map_onto_sampling():
    p = otr.generate_request(
        {
            "model": "m",
            "prompt": "hi",
            "options": {
                "temperature": 0.5, "top_k": 4, "num_predict": 7, "stop": "\n", "seed": 3, "num_ctx": 256,
                "mirostat": 1, "use_mmap": True, "unknown_option": "x",
            },
            "keep_alive": "10m",
            "format": "json",
        }
    )
    s = p.req.sampling
    assert (s.temperature, s.top_k, s.max_tokens, list(s.stop), s.seed, s.num_ctx) == (0.5, 4, 7, ["\n"], 3, 256)
    assert p.req.keep_alive.seconds == 600
    assert p.req.format.type == pb.FORMAT_TYPE_JSON
    assert p.stream is True and p.load_only is False


@pytest.mark.parametrize("num_predict", [-1, -2, -100])
def test_ollama_num_predict_negative_means_no_limit(num_predict):
    # Sent as max_tokens -1, so a server default (MLXGATE_DEFAULT_MAX_TOKENS) cannot cap it.
    p = otr.generate_request({"model": "m", "prompt": "x", "options": {"num_predict": num_predict}})
    assert p.req.sampling.max_tokens == -1


def test_ollama_num_predict_absent_leaves_the_default_to_the_backend():
    p = otr.generate_request({"model": "m", "prompt": "x", "options": {"temperature": 0}})
    assert not p.req.sampling.HasField("max_tokens")


@pytest.mark.parametrize("max_tokens", [None, -1])
def test_upstream_adapters_invent_no_limit(max_tokens):
    """Unset stays unset upstream; "no limit" is Ollama's num_predict -1 and nothing for a cloud API."""
    from backends.cloud import wire as cloud_wire
    from backends.ollama import wire as ollama_wire
    from backends.types import GenerateRequest, Message, Sampling

    req = GenerateRequest(model="m", messages=[Message("user", "hi")], sampling=Sampling(max_tokens=max_tokens))
    _, body = cloud_wire.generate_body(req)
    assert "max_tokens" not in body and "max_completion_tokens" not in body
    _, body = ollama_wire.generate_body(req)
    if max_tokens is None:
        assert "num_predict" not in body.get("options", {})
    else:
        assert body["options"]["num_predict"] == -1


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "m", "prompt": "x", "options": {"temperature": "hot"}}, "options.temperature"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "format": "yaml"}, "format"),
        ({"model": "m", "prompt": "x", "images": ["%%%"]}, "images[0]"),
        ({"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
        ({"model": "m", "prompt": "x", "options": {"num_predict": 1.5}}, "options.num_predict"),
    ],
)
def test_ollama_generate_validation_names_the_field(body, field):
    with pytest.raises(ApiError) as e:
        otr.generate_request(body)
    assert e.value.status == 400
    assert field in e.value.message


def test_ollama_template_is_accepted_with_raw():
    p = otr.generate_request({"model": "m", "prompt": "x", "template": "{{ .Prompt }}", "raw": True})
    assert p.req.prompt.raw is True


def test_ollama_generate_empty_prompt_is_load_only():
    assert otr.generate_request({"model": "m"}).load_only
    assert otr.chat_request({"model": "m", "messages": []}).load_only


def test_ollama_chat_messages_and_tools():
    img = base64.b64encode(b"\x89PNG").decode()
    p = otr.chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?", "images": [img]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        }
    )
    msgs = p.req.chat.messages
    assert [m.role for m in msgs] == [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL]
    assert msgs[0].images == [b"\x89PNG"]
    assert json.loads(msgs[1].tool_calls[0].arguments_json) == {"city": "Paris"}
    assert msgs[2].tool_name == "get_weather"
    assert p.req.tools[0].name == "get_weather"


def test_ollama_chat_rejects_bad_role_and_non_list_messages():
    with pytest.raises(ApiError, match=r"messages\[0\]\.role"):
        otr.chat_request({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(ApiError, match="messages must be an array"):
        otr.chat_request({"model": "m", "messages": "hello"})


def test_ollama_final_objects():
    done = Done("tool_calls", 5, 3, 0, 10, 20, 30, 60, "mlx", "m")
    final = otr.chat_final("m", done, "hi", [ToolCall("f", {"a": 1})])
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert (final["total_duration"], final["eval_count"], final["prompt_eval_count"]) == (60, 3, 5)
    assert final["backend"] == "mlx"
    assert final["created_at"].endswith("Z")
    with pytest.raises(ApiError) as e:
        otr.generate_final("m", Done("error", error_message="engine fell over"))
    assert e.value.status == 500 and "engine fell over" in e.value.message


# ---------------------------------------------------------------- OpenAI requests


def test_openai_chat_request_translation():
    url = "data:image/png;base64," + base64.b64encode(b"img").decode()
    p = atr.chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "what is "},
                                             {"type": "text", "text": "this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
            "stop": "END",
            "seed": 7,
            "n": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "user": "ignored",
        }
    )
    r = p.base[0]
    msgs = r.chat.messages
    assert msgs[0].role == pb.ROLE_SYSTEM
    assert msgs[1].content == "what is this?" and msgs[1].images == [b"img"]
    assert json.loads(msgs[2].tool_calls[0].arguments_json) == {"x": 1}
    assert msgs[3].tool_call_id == "call_1" and msgs[3].tool_name == "f"
    assert r.sampling.max_tokens == 9 and list(r.sampling.stop) == ["END"]
    assert r.format.type == pb.FORMAT_TYPE_JSON_SCHEMA
    seeds = [x.sampling.seed for x in p.requests()]
    assert seeds == [7, 8, 9]


def test_openai_tool_choice():
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    assert len(atr.chat_request({**base, "tool_choice": "auto"}).base[0].tools) == 2
    assert len(atr.chat_request({**base, "tool_choice": "none"}).base[0].tools) == 0
    assert not atr.chat_request({**base, "tool_choice": "auto"}).base[0].HasField("tool_choice")
    named = atr.chat_request({**base, "tool_choice": {"type": "function", "function": {"name": "b"}}})
    assert [t.name for t in named.base[0].tools] == ["b"]
    assert named.base[0].tool_choice.mode == pb.TOOL_CHOICE_FUNCTION
    assert named.base[0].tool_choice.function_name == "b"
    required = atr.chat_request({**base, "tool_choice": "required"}).base[0]
    assert len(required.tools) == 2 and required.tool_choice.mode == pb.TOOL_CHOICE_REQUIRED
    with pytest.raises(ApiError, match="tool_choice"):
        atr.chat_request({**base, "tool_choice": {"type": "function", "function": {"name": "zzz"}}})
    # A forced answer is a call: the text format does not apply to it (and is not sent).
    both = atr.chat_request({**base, "tool_choice": "required", "response_format": {"type": "json_object"}}).base[0]
    assert both.tool_choice.mode == pb.TOOL_CHOICE_REQUIRED and both.format.type == pb.FORMAT_TYPE_UNSPECIFIED
    assert atr.chat_request({**base, "response_format": {"type": "json_object"}}).base[0].format.type == (
        pb.FORMAT_TYPE_JSON)
    with pytest.raises(ApiError, match="needs tools"):
        atr.chat_request({**base, "tools": [], "tool_choice": "required"})


def test_openai_deprecated_function_messages_are_a_tool_call_and_its_result():
    """Older clients replay ``function_call`` / ``role: "function"`` history (OpenAI's
    ChatCompletionRequestFunctionMessage): the call and the tool result they are."""
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "12 C"},
        {"role": "assistant", "content": "ok", "function_call": {"name": "f", "arguments": "not json"}},
        {"role": "assistant", "content": "x", "function_call": "garbage"},
    ]
    msgs = atr.chat_request({"model": "m", "messages": history}).base[0].chat.messages
    call, result, odd, ignored = msgs[1], msgs[2], msgs[3], msgs[4]
    assert [(c.name, c.arguments_json) for c in call.tool_calls] == [("get_weather", '{"city":"Oslo"}')]
    assert (result.role, result.tool_name, result.content) == (pb.ROLE_TOOL, "get_weather", "12 C")
    # What the model produced earlier is kept whatever it is (produced_arguments).
    assert [(c.name, c.arguments_json) for c in odd.tool_calls] == [("f", '{"_raw":"not json"}')]
    assert list(ignored.tool_calls) == []


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_openai_chat_validation(extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(ApiError) as e:
        atr.chat_request(body)
    assert e.value.status == 400
    assert e.value.param == param
    assert openai_body(e.value)["error"]["type"] == "invalid_request_error"


def test_openai_completion_request():
    p = atr.completion_request({"model": "m", "prompt": ["a", "b"], "n": 2, "logprobs": 2, "suffix": "z"})
    reqs = p.requests()
    assert [r.prompt.prompt for r in reqs] == ["a", "a", "b", "b"]
    assert all(r.prompt.raw and r.prompt.suffix == "z" and r.logprobs and r.top_logprobs == 2 for r in reqs)
    for bad, param in (({"echo": True}, "echo"), ({"prompt": [1, 2, 3]}, "prompt"), ({"best_of": 3}, "best_of")):
        with pytest.raises(ApiError) as e:
            atr.completion_request({"model": "m", "prompt": "x", **bad})
        assert e.value.param == param


def test_openai_embeddings_request_and_base64():
    p = atr.embeddings_request({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    res = pb.EmbedResponse(embeddings=[pb.Embedding(values=[1.0, -2.5])], prompt_tokens=3)
    out = atr.embeddings_response(p, res)
    raw = base64.b64decode(out["data"][0]["embedding"])
    import struct

    assert struct.unpack("<2f", raw) == (1.0, -2.5)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    with pytest.raises(ApiError, match="encoding_format"):
        atr.embeddings_request({"model": "m", "input": "x", "encoding_format": "int8"})


def test_openai_chat_stream_renderer():
    p = atr.chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2,
                          "stream": True, "stream_options": {"include_usage": True}})
    r = atr.ChatStream(p)
    def Chunk(text, **kw):
        return pb.GenerateResponse(chunk=pb.Chunk(text=text, **kw))

    lp = pb.TokenLogprob(token_id=1, token="he", logprob=-0.1,
                         top_logprobs=[pb.TopLogprob(token_id=1, token="he", logprob=-0.1)])
    out = r.render((1, Chunk("he", logprobs=[lp])))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[1]["choices"][0]["delta"] == {"content": "he"}
    assert out[1]["choices"][0]["logprobs"]["content"][0]["token"] == "he"
    out = r.render((1, Chunk("", tool_calls=[ToolCall("f", {"a": 1}, id="c1")])))
    call = out[0]["choices"][0]["delta"]["tool_calls"][0]
    assert call["index"] == 0 and call["id"] == "c1" and json.loads(call["function"]["arguments"]) == {"a": 1}
    out = r.render((1, pb.GenerateResponse(done=Done("stop", 4, 2, backend="mlx"))))
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls" and out[-1]["backend"] == "mlx"
    r.render((0, pb.GenerateResponse(done=Done("length", 4, 3, backend="mlx"))))
    tail = r.tail()
    assert tail[0]["choices"] == [] and tail[0]["usage"]["total_tokens"] == 4 + 2 + 3


def test_openai_chat_completion_tool_calls():
    p = atr.chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    body = atr.chat_completion(p, [Collected("", [ToolCall("f", {"a": 1})], [], Done("tool_calls", 3, 4))])
    ch = body["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    assert ch["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert ch["message"]["tool_calls"][0]["id"].startswith("call_")
    assert body["usage"]["total_tokens"] == 7


# ---------------------------------------------------------------- error table


@pytest.mark.parametrize(
    "code, status, otype",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.UNIMPLEMENTED, 501, "invalid_request_error"),
        (grpc.StatusCode.CANCELLED, 499, "server_error"),
    ],
)
def test_error_table(code, status, otype):
    err = from_grpc(_rpc_error(code, "the reason"))
    assert err.status == status
    body = openai_body(adapt(err, "openai"))["error"]
    assert body["type"] == otype and body["message"] == "the reason"


def test_error_table_ollama_busy_and_generic_500():
    err = adapt(from_grpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")), "ollama")
    assert (err.status, err.message) == (503, OLLAMA_BUSY)
    err = from_grpc(_rpc_error(grpc.StatusCode.DATA_LOSS, "secret stack frame"), "rid1")
    assert err.status == 500 and "secret" not in err.message and "rid1" in err.message
    nf = from_grpc(_rpc_error(grpc.StatusCode.NOT_FOUND, "model 'x' not found"))
    assert openai_body(nf)["error"]["code"] == "model_not_found"
