"""A tool call cut short never leaks its markup as content.

When a generation stops inside a call (max_tokens, the context, EOS before
the end marker), the answer has no call and no markup: the finish reason
("length") says why.  Checked on ``SequenceOutput`` with plain token lists,
on the engine with forced tokens, through both dialects with the official
``openai`` client and raw Ollama requests, streamed and not.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from openai import AsyncOpenAI

from backends.mlx.output import SequenceOutput
from backends.mlx.toolcalls import ToolCallSplitter
from backends.types import GenerateRequest, Message, Sampling
from tests.test_mlx_engine import MODEL, WEATHER, _tokenizer, collect, forced_tokens, text_of  # noqa: F401 - fixture
from tests.test_tool_choice import OAI_TOOLS

pytestmark = pytest.mark.timeout(120)

START, END = "<tool_call>", "</tool_call>"
EOS = 0


class ListDetokenizer:
    """The streaming-detokenizer interface over a fixed id → text table."""

    def __init__(self, vocab: dict[int, str]) -> None:
        self._vocab = vocab
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = self._vocab[token]

    def finalize(self) -> None:
        self.last_segment = ""


def json_parser(body: str, tools=None):
    return json.loads(body.strip())


def run(pieces: list[str], forced: bool = False, eos: bool = False):
    """Feed ``pieces`` as one token each (then EOS if asked); (chunks, splitter, ids fed)."""
    vocab = {i + 1: p for i, p in enumerate(pieces)}
    splitter = ToolCallSplitter(START, END, json_parser, forced=forced)
    out = SequenceOutput(ListDetokenizer(vocab), {EOS}, [], splitter)
    chunks = []
    ids = list(vocab)
    for t in ids + ([EOS] if eos else []):
        new, stop = out.add(t)
        chunks += new
        if stop:
            break
    else:
        chunks += out.finish()  # max_tokens: the engine finishes the sequence
    return chunks, splitter, ids


def calls_of(chunks):
    return [tc for c in chunks for tc in c.tool_calls]


# ---------------------------------------------------------------- SequenceOutput / ToolCallSplitter


@pytest.mark.parametrize("eos", [False, True])
def test_a_call_cut_short_is_dropped_not_passed_on_as_text(eos):
    chunks, splitter, ids = run(["Sure.", " ", START, "\n", '{"name"', ': "get'], eos=eos)
    assert text_of(chunks) == "Sure. "
    assert calls_of(chunks) == [] and splitter.unfinished == 1
    assert [t for c in chunks for t in c.token_ids] == ids  # every token still accounted for


def test_a_call_cut_right_after_its_start_marker_is_dropped():
    chunks, splitter, _ = run(["Hi", START])
    assert text_of(chunks) == "Hi" and calls_of(chunks) == [] and splitter.unfinished == 1


def test_a_whole_call_without_its_end_marker_is_still_a_call():
    chunks, splitter, _ = run([START, '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    assert [(c.name, c.arguments) for c in calls_of(chunks)] == [("get_weather", {"city": "Oslo"})]
    assert text_of(chunks) == "" and splitter.unfinished == 0


def test_a_forced_call_has_no_text_at_all():
    """Forced calls: the whitespace the grammar allows around the markers is not content."""
    chunks, splitter, _ = run([" ", START, "\n", '{"name": "get'], forced=True)
    assert text_of(chunks) == "" and calls_of(chunks) == [] and splitter.unfinished == 1
    chunks, _, _ = run(["\n", START, '{"name": "f", "arguments": {}}', "\n", END], forced=True, eos=True)
    assert text_of(chunks) == "" and [c.name for c in calls_of(chunks)] == ["f"]


def test_a_closed_call_the_parser_cannot_read_stays_text():
    """The model finished it: what it wrote is passed on (Ollama's and vLLM's behaviour)."""
    chunks, splitter, _ = run(["x ", START, "not json", END], eos=True)
    assert text_of(chunks) == f"x {START}not json{END}" and splitter.unfinished == 0


# ---------------------------------------------------------------- engine, unforced: the model starts a call

CALL_TEXT = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CUT_AT = 'Sure. <tool_call>{"name": "get'


async def _cut_call(mlx_backend):
    """(token ids of a whole call, how many of them stop inside it)."""
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(CALL_TEXT, add_special_tokens=False)
    cut = len(tok.encode(CUT_AT, add_special_tokens=False))
    assert ids[:cut] == tok.encode(CUT_AT, add_special_tokens=False)
    return ids, cut


async def test_engine_drops_a_call_cut_by_max_tokens(mlx_backend, forced_tokens):  # noqa: F811
    ids, cut = await _cut_call(mlx_backend)
    req = GenerateRequest(model=MODEL, messages=[Message("user", "Weather in Paris?")], tools=[WEATHER],
                          sampling=Sampling(max_tokens=cut))
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert done.finish_reason == "length" and done.completion_tokens == cut
    assert text_of(chunks) == "Sure. " and calls_of(chunks) == []


async def test_ollama_chat_cut_inside_a_call_has_no_markup(stack, forced_tokens):  # noqa: F811
    ids, cut = await _cut_call(stack.backend)
    tools = [{"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                                "parameters": WEATHER.parameters}}]
    body = {"model": stack.model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
            "options": {"num_predict": cut}}
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            rid = f"cut-call-{stream}"
            forced_tokens[rid] = ids
            async with s.post(stack.base + "/api/chat", json={**body, "stream": stream},
                              headers={"X-Request-Id": rid}) as r:
                assert r.status == 200, await r.text()
                lines = [json.loads(line) for line in (await r.text()).splitlines()]
            content = "".join(x["message"]["content"] for x in lines)
            assert content == "Sure. ", content
            assert not any(x["message"].get("tool_calls") for x in lines)
            assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
            assert lines[-1]["eval_count"] == cut


# ---------------------------------------------------------------- forced: tool_choice "required", max_tokens 8


@pytest.fixture
async def oai(stack):
    client = AsyncOpenAI(base_url=f"{stack.base}/v1", api_key="x", max_retries=0, timeout=60)
    yield client
    await client.close()


async def test_openai_forced_call_cut_by_max_tokens(oai, stack):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = await oai.chat.completions.create(
        model=stack.model, messages=msgs, tools=OAI_TOOLS, tool_choice="required", max_tokens=8, n=3, seed=1
    )
    for c in r.choices:
        assert c.finish_reason == "length"
        assert c.message.tool_calls is None
        assert not (c.message.content or "").strip(), c.message.content
    assert r.usage.completion_tokens == 3 * 8

    stream = await oai.chat.completions.create(
        model=stack.model, messages=msgs, tools=OAI_TOOLS, tool_choice="required", max_tokens=8, seed=2,
        stream=True,
    )
    content, finishes, calls = "", [], []
    async for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            calls += ch.delta.tool_calls or []
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert content == "" and calls == [] and finishes == ["length"]


# ---------------------------------------------------------------- upstream adapters: structured calls, cut ones marked


def test_a_cloud_call_cut_by_length_stays_marked_as_cut():
    """Cloud APIs send structured call deltas; one cut short keeps its raw arguments
    and the answer's finish reason stays "length" (OpenAI's own marking)."""
    from backends.cloud import wire as cloud_wire
    from gateway.openai import translate as atr
    from mlxgate.v1 import inference_pb2 as pb

    state = cloud_wire.StreamState()
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    state.feed({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    state.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}}]})
    state.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    (got,) = state.tool_calls()
    assert got.name == "get_weather" and got.arguments == {"_raw": '{"ci'}
    assert cloud_wire.finish_reason(state.finish) == "length"
    assert atr.finish_reason(pb.Done(finish_reason=pb.FINISH_REASON_LENGTH), had_tool_calls=True) == "length"
    assert atr.finish_reason(pb.Done(finish_reason=pb.FINISH_REASON_STOP), had_tool_calls=True) == "tool_calls"
