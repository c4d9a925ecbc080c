"""Thinking (reasoning) in the MLX engine: the splitter alone, then end to end
on the tiny model with the generated tokens forced (its random weights never
pick the think markers by themselves)."""

from __future__ import annotations

import pytest

from backends.mlx.output import SequenceOutput
from backends.mlx.thinking import ThinkSplitter, starts_in_thinking
from backends.types import GenerateRequest, Message, Prompt, Sampling, Tool
from mlxgate.v1 import inference_pb2 as pb
from tests.test_mlx_engine import MODEL, _tokenizer, collect, forced_tokens, text_of  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)

SAMPLE = "<think>\nLet me see: 6 times 7.\n</think>\n\nThe answer is 42."
THOUGHT = "Let me see: 6 times 7.\n"
ANSWER = "The answer is 42."


def thinking_of(chunks):
    return "".join(c.thinking for c in chunks)


def split_all(splitter: ThinkSplitter, pieces: list[str]) -> tuple[str, str]:
    thinking, text = [], []
    for p in pieces:
        t, x = splitter.feed(p)
        thinking.append(t)
        text.append(x)
    t, x = splitter.finish()
    return "".join(thinking) + t, "".join(text) + x


# ---------------------------------------------------------------- splitter


def test_splitter_separates_at_every_chunk_boundary():
    for i in range(len(SAMPLE) + 1):
        for j in range(i, len(SAMPLE) + 1):
            got = split_all(ThinkSplitter("<think>", "</think>"), [SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]])
            assert got == (THOUGHT, ANSWER), (i, j)


def test_splitter_holds_back_a_partial_marker_and_never_emits_one():
    s = ThinkSplitter("<think>", "</think>")
    assert s.feed("Hi <thi") == ("", "Hi ")
    assert s.feed("nk>hmm</th") == ("hmm", "")
    assert s.feed("ink>ok") == ("", "ok")
    # Something that only looked like a marker is text after all.
    assert s.feed(" <thin") == ("", " ")
    assert s.finish() == ("", "<thin")


def test_splitter_started_inside_and_dropping_thinking():
    assert split_all(ThinkSplitter("<think>", "</think>", in_thinking=True), ["\nhmm</think>", "\nyes"]) == (
        "hmm",
        "yes",
    )
    quiet = ThinkSplitter("<think>", "</think>", keep_thinking=False)
    assert split_all(quiet, ["<think>secret", "</think>", "shown"]) == ("", "shown")
    # A model without a think block: text untouched, leading whitespace included.
    assert split_all(ThinkSplitter("<think>", "</think>"), ["\n  plain"]) == ("", "\n  plain")


def test_prompt_tail_decides_whether_generation_starts_inside():
    S, E = [9], [8]
    assert starts_in_thinking([1, 2, 3, 9, 4], S, E)
    assert not starts_in_thinking([1, 9, 4, 8, 4], S, E)  # Qwen3 enable_thinking=False: empty block
    assert not starts_in_thinking([1, 2, 3], S, E)
    assert not starts_in_thinking([9] + [5] * 20, S, E)  # quoted far back in the conversation
    assert not starts_in_thinking([1, 9], [], [])


async def test_sequence_output_one_token_at_a_time(mlx_backend):
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    assert tok.think_start_id in ids and tok.think_end_id in ids
    out = SequenceOutput(tok.detokenizer, tok.eos_token_ids, [], None, ThinkSplitter(tok.think_start, tok.think_end))
    chunks = []
    for t in ids:
        got, stop = out.add(t)
        assert not stop
        chunks += got
    chunks += out.finish()
    assert thinking_of(chunks) == THOUGHT and text_of(chunks) == ANSWER
    assert [t for c in chunks for t in c.token_ids] == ids and out.completion_tokens == len(ids)
    assert not any("<" in c.text or "<" in c.thinking for c in chunks)
    # Streaming: the thought arrives before the answer, in several chunks.
    assert sum(1 for c in chunks if c.thinking) > 1
    first_text = next(i for i, c in enumerate(chunks) if c.text)
    assert all(not c.thinking for c in chunks[first_text:])


# ---------------------------------------------------------------- engine end to end


async def test_engine_routes_thinking_apart_from_text(mlx_backend, forced_tokens):  # noqa: F811
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    req = GenerateRequest(model=MODEL, messages=[Message("user", "6 x 7?")], sampling=Sampling(max_tokens=100))
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert thinking_of(chunks) == THOUGHT
    assert text_of(chunks) == ANSWER
    assert done.finish_reason == "stop" and done.completion_tokens == len(ids)


async def test_think_false_asks_the_template_and_drops_any_thinking(mlx_backend, forced_tokens):  # noqa: F811
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    on = GenerateRequest(model=MODEL, messages=[Message("user", "6 x 7?")], sampling=Sampling(max_tokens=100))
    off = GenerateRequest(
        model=MODEL, messages=[Message("user", "6 x 7?")], sampling=Sampling(max_tokens=100), think=False
    )
    forced_tokens[on.request_id] = ids
    forced_tokens[off.request_id] = ids
    _, done_on = await collect(mlx_backend, on)
    chunks, done_off = await collect(mlx_backend, off)
    # The template pre-fills an empty think block: "<think>\n\n</think>\n\n" is 6 more tokens.
    empty_block = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert done_off.prompt_tokens == done_on.prompt_tokens + len(empty_block)
    assert thinking_of(chunks) == "" and text_of(chunks) == ANSWER
    assert done_off.completion_tokens == len(ids)


async def test_prompt_that_opens_the_block_starts_generation_inside(mlx_backend, forced_tokens):  # noqa: F811
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode("hmm, six sevens</think>\n\n42", add_special_tokens=False)
    req = GenerateRequest(model=MODEL, prompt=Prompt("Question: 6 x 7?<think>\n", raw=True))
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert thinking_of(chunks) == "hmm, six sevens" and text_of(chunks) == "42"
    # Without the opened block the same tokens are an answer with a stray end marker removed.
    plain = GenerateRequest(model=MODEL, prompt=Prompt("Question: 6 x 7?", raw=True))
    forced_tokens[plain.request_id] = ids
    chunks, _ = await collect(mlx_backend, plain)
    assert thinking_of(chunks) == "" and text_of(chunks) == "hmm, six sevens</think>\n\n42"


async def test_stop_strings_and_max_tokens_cover_thinking(mlx_backend, forced_tokens):  # noqa: F811
    tok = await _tokenizer(mlx_backend)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    stop = Sampling(max_tokens=100, stop=["times"])
    req = GenerateRequest(model=MODEL, messages=[Message("user", "q")], sampling=stop)
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert done.finish_reason == "stop" and thinking_of(chunks) == "Let me see: 6 " and text_of(chunks) == ""
    assert done.completion_tokens < len(ids)

    short = GenerateRequest(model=MODEL, messages=[Message("user", "q")], sampling=Sampling(max_tokens=4))
    forced_tokens[short.request_id] = ids
    chunks, done = await collect(mlx_backend, short)
    assert done.finish_reason == "length" and done.completion_tokens == 4
    assert thinking_of(chunks) and THOUGHT.startswith(thinking_of(chunks)) and text_of(chunks) == ""


async def test_tool_call_after_thinking_is_parsed(mlx_backend, forced_tokens):  # noqa: F811
    tok = await _tokenizer(mlx_backend)
    text = '<think>need weather</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    ids = tok.encode(text, add_special_tokens=False)
    weather = Tool("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    req = GenerateRequest(
        model=MODEL, messages=[Message("user", "Paris?")], tools=[weather], sampling=Sampling(max_tokens=100)
    )
    forced_tokens[req.request_id] = ids
    chunks, done = await collect(mlx_backend, req)
    assert done.finish_reason == "tool_calls"
    assert thinking_of(chunks) == "need weather" and text_of(chunks) == ""
    assert [(c.name, c.arguments) for ch in chunks for c in ch.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_assistant_thinking_reaches_the_template_as_reasoning_content():
    d = Message("assistant", "42", thinking="6 x 7").to_template_dict()
    assert d["reasoning_content"] == "6 x 7"
    assert "reasoning_content" not in Message("assistant", "42").to_template_dict()
    m = Message.from_pb(pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="42", thinking="6 x 7"))
    assert m.thinking == "6 x 7"


def test_think_round_trips_through_the_proto():
    for think in (None, True, False):
        req = pb.GenerateRequest(model=MODEL, chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER,
                                                                                         content="x")]))
        if think is not None:
            req.think = think
        assert GenerateRequest.from_pb(req).think is think
