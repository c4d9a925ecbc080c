"""How the engine's events reach the requests, and how prefill is paced:
pure Python (no MLX), so each rule is checked on its own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from backends.mlx.delivery import Dispatcher, EventQueue, coalesce
from backends.mlx.pacing import FIRST_CHUNK, MIN_TOKENS, SAMPLE_EVERY, SHORT_BURST, SHORT_PROMPT, PrefillPacer
from backends.types import Chunk, Done, TokenLogprob, ToolCall


def lp(i: int) -> TokenLogprob:
    return TokenLogprob(i, f"t{i}", -0.1 * i)


def chunk(text: str, ids: list[int], **kw) -> Chunk:
    return Chunk(text=text, token_ids=list(ids), logprobs=[lp(i) for i in ids], **kw)


# ---------------------------------------------------------------- coalesce


def test_coalesce_keeps_every_token_id_and_logprob_in_order():
    events = [chunk("a", [1]), chunk("b", [2, 3]), chunk("", [4]), chunk("c", [5]), Done(completion_tokens=5)]
    out = coalesce(events)
    assert len(out) == 2 and isinstance(out[1], Done)
    merged = out[0]
    assert merged.text == "abc"
    assert merged.token_ids == [1, 2, 3, 4, 5]
    assert [x.token_id for x in merged.logprobs] == [1, 2, 3, 4, 5]


def test_coalesce_leaves_single_events_and_errors_in_place():
    assert coalesce([]) == []
    one = chunk("x", [1])
    assert coalesce([one]) == [one]
    err = RuntimeError("boom")
    out = coalesce([chunk("a", [1]), chunk("b", [2]), err])
    assert [type(e) for e in out] == [Chunk, RuntimeError]
    assert out[0].token_ids == [1, 2] and out[1] is err


def test_coalesce_never_reorders_thinking_text_or_tool_calls():
    call = ToolCall("f", {"a": 1})
    # Thinking then text: one chunk (as the engine itself emits at the switch).
    out = coalesce([chunk("", [1], thinking="hm"), chunk("yes", [2])])
    assert len(out) == 1 and (out[0].thinking, out[0].text) == ("hm", "yes")
    # Text then thinking would put the thinking first: kept apart.
    out = coalesce([chunk("yes", [1]), chunk("", [2], thinking="hm")])
    assert len(out) == 2
    # Text then a call: one chunk; anything after a call: kept apart.
    out = coalesce([chunk("Sure. ", [1]), chunk("", [2], tool_calls=[call]), chunk("more", [3])])
    assert len(out) == 2
    assert out[0].text == "Sure. " and out[0].tool_calls == [call] and out[0].token_ids == [1, 2]
    assert out[1].text == "more" and out[1].token_ids == [3]


# ---------------------------------------------------------------- queues and the dispatcher


class Owner:
    def __init__(self, q: EventQueue) -> None:
        self.events = q
        self.cancelled = False


async def test_one_wake_up_per_loop_per_flush_for_all_its_queues():
    loop = asyncio.get_running_loop()
    owners = [Owner(EventQueue(loop)) for _ in range(5)]
    dispatch = Dispatcher()
    calls = []
    real = loop.call_soon_threadsafe

    def counting(cb, *args):
        calls.append(cb)
        return real(cb, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        readers = [asyncio.ensure_future(o.events.get_all()) for o in owners]
        await asyncio.sleep(0)

        def engine_turn() -> None:  # as the MLX thread does: several events each, one flush
            for i, o in enumerate(owners):
                dispatch.put(o, chunk(str(i), [i]))
                dispatch.put(o, chunk(str(i), [i + 10]))
            dispatch.flush()
            dispatch.flush()  # nothing new: no wake-up

        t = threading.Thread(target=engine_turn)
        t.start()
        t.join()
        got = await asyncio.wait_for(asyncio.gather(*readers), 5)
    finally:
        del loop.call_soon_threadsafe
    assert len(calls) == 1
    assert [[c.token_ids for c in evs] for evs in got] == [[[i], [i + 10]] for i in range(5)]


async def test_get_all_returns_at_once_when_events_are_waiting():
    q = EventQueue(asyncio.get_running_loop())
    q.put(1)
    q.put(2)
    assert await asyncio.wait_for(q.get_all(), 1) == [1, 2]


async def test_a_cancelled_reader_leaves_no_waiter_behind():
    q = EventQueue(asyncio.get_running_loop())
    reader = asyncio.ensure_future(q.get_all())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    q.wake()  # a late wake-up finds nobody and does nothing
    q.put("x")
    assert await q.get_all() == ["x"]


def test_events_for_a_closed_loop_cancel_their_sequence():
    loop = asyncio.new_event_loop()
    loop.close()
    owner = Owner(EventQueue(loop))
    dispatch = Dispatcher()
    dispatch.put(owner, chunk("a", [1]))
    dispatch.flush()
    assert owner.cancelled


# ---------------------------------------------------------------- prefill pacing

LONG = [2000]


def test_without_decoding_sequences_the_chunk_is_the_configured_step():
    p = PrefillPacer(max_chunk=512, interleave=1.5)
    assert p.chunk(decoding=False, prompts=LONG) == 512
    off = PrefillPacer(max_chunk=512, interleave=0)
    off.step_s, off.rate = 0.05, 1000.0
    assert off.chunk(decoding=True, prompts=LONG) == 512


def test_short_prompts_are_prefilled_at_once():
    p = PrefillPacer(max_chunk=512, interleave=1.5)
    p.step_s, p.rate = 0.05, 400.0
    assert p.chunk(decoding=True, prompts=[SHORT_PROMPT]) == 512
    assert p.chunk(decoding=True, prompts=[30] * (SHORT_BURST // 30)) == 512  # a burst of chat turns
    assert p.chunk(decoding=True, prompts=[30] * (SHORT_BURST // 30 + 1)) < 512
    assert p.chunk(decoding=True, prompts=[SHORT_PROMPT + 1]) < 512
    # With a long prompt in the batch, the short ones are paced along with it.
    assert p.chunk(decoding=True, prompts=[20, 2000]) < 512


def test_while_decoding_a_long_prompt_takes_about_interleave_steps_a_call():
    p = PrefillPacer(max_chunk=512, interleave=1.5)
    assert p.chunk(decoding=True, prompts=LONG) == 0  # time a decode step first
    p.observe(0.050, decoded=True, prompt_tokens=0, joined=False)  # a decode step: 50 ms
    assert p.chunk(decoding=True, prompts=LONG) == FIRST_CHUNK  # no paced chunk timed yet
    p.observe(0.050 + 0.040, decoded=True, prompt_tokens=FIRST_CHUNK, joined=False)  # 16 tokens in 40 ms
    assert p.step_s == pytest.approx(0.050) and p.rate == pytest.approx(400)
    # 1.5 steps = 75 ms of prefill = 30 tokens, shared by the sequences in prefill.
    assert p.chunk(decoding=True, prompts=LONG) == 30
    assert p.chunk(decoding=True, prompts=LONG * 2) == 15
    assert p.chunk(decoding=True, prompts=LONG * 8) == 3
    # What says nothing about a paced chunk's cost leaves the rate alone: whole
    # prompts prefilled with nothing decoding, short prompts prefilled at once
    # beside decoding, and a join (an extra forward pass).
    p.observe(0.100, decoded=False, prompt_tokens=500, joined=False)
    assert p.chunk(decoding=True, prompts=[20]) == 512
    p.observe(0.060, decoded=True, prompt_tokens=20, joined=False)
    p.chunk(decoding=True, prompts=LONG)
    p.observe(1.0, decoded=True, prompt_tokens=1, joined=True)
    p.observe(1.0, decoded=True, prompt_tokens=0, joined=True)
    assert (p.step_s, p.rate) == (pytest.approx(0.050), pytest.approx(400))


def test_the_chunk_stays_between_a_floor_and_the_configured_step():
    p = PrefillPacer(max_chunk=64, interleave=1.5)
    p.step_s, p.rate = 1.0, 100000.0
    assert p.chunk(decoding=True, prompts=LONG) == 64
    p.step_s, p.rate = 0.001, 100.0  # 0.15 tokens' worth: a call still makes progress
    assert p.chunk(decoding=True, prompts=LONG) == MIN_TOKENS


def test_the_step_is_timed_again_every_few_chunks():
    """A long prefill does not size its chunks from a decode step timed
    before it began (the batch or the load may have changed since)."""
    p = PrefillPacer(max_chunk=512, interleave=1.5)
    p.observe(0.200, decoded=True, prompt_tokens=0, joined=False)  # a slow moment
    sizes = []
    for _ in range(8 * (SAMPLE_EVERY + 1)):
        n = p.chunk(decoding=True, prompts=LONG)
        sizes.append(n)
        # Now a step takes 50 ms and a chunk 1 ms a token.
        p.observe(0.050 + n / 1000, decoded=True, prompt_tokens=n, joined=False)
    runs = "".join("x" if n else "0" for n in sizes).split("0")
    assert max(len(r) for r in runs) == SAMPLE_EVERY and sizes.count(0) >= 7
    assert p.step_s == pytest.approx(0.050, rel=0.05)
    # 1.5 steps of 50 ms at 1,000 tokens/s: the chunks settle near 75 tokens.
    assert 60 <= max(sizes[-SAMPLE_EVERY:]) <= 90


@pytest.mark.parametrize("first_step", [0.05, 0.2, 0.01])
def test_paced_steps_settle_at_one_plus_interleave_decode_steps(first_step):
    """A machine where a decode step takes 50 ms and a chunk's forward pass
    35 ms plus 3 ms a token (a CPU: the fixed cost is reading the weights):
    whatever the first step timing (current, stale-slow, stale-fast), the
    calls carrying a chunk settle at 2.5 decode steps, and none is ever far
    beyond that on the way."""
    p = PrefillPacer(max_chunk=512, interleave=1.5)
    p.observe(first_step, decoded=True, prompt_tokens=0, joined=False)
    ratios = []
    for _ in range(60):
        n = p.chunk(decoding=True, prompts=LONG)
        t = 0.050 + (0.035 + 0.003 * n if n else 0)
        ratios.append(t / 0.050)
        p.observe(t, decoded=True, prompt_tokens=n, joined=False)
    assert max(ratios) < 3.0
    assert 2.3 < max(ratios[-SAMPLE_EVERY:]) < 2.6
