"""Chunked prefill, interleaved with decoding, and coalesced delivery, on the
real engine with the generated tiny model.

Timing goals live in ``make bench``; these check what must hold whatever the
timing: a prompt prefilled in chunks gives the same greedy answer as one
prefilled at once, running streams get tokens while a long prompt is
prefilled, a cancelled prompt stops being prefilled at the next chunk, and
merged chunks carry every token id and logprob in order.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from backends.mlx.backend import MLXBackend
from backends.types import Chunk, Done, GenerateRequest, Prompt, Sampling
from mlxgate.config import MLXConfig
from tests.test_mlx_engine import MODEL, chat, collect, ids_of
from tests.polling import eventually

pytestmark = pytest.mark.timeout(120)

#: A raw prompt (no template) of about this many tokens (~2.9 tokens a word).
LONG = 1450


def long_request(**sampling) -> GenerateRequest:
    text = " ".join(f"w{i % 97}" for i in range(LONG * 10 // 29))
    return GenerateRequest(model=MODEL, prompt=Prompt(text, raw=True), sampling=Sampling(temperature=0, **sampling))


def backend(test_model_dir, **cfg) -> MLXBackend:
    # No prompt-cache reuse: every prompt is prefilled in full, the same way each time.
    return MLXBackend(
        MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none"), prompt_cache_bytes=0, **cfg)
    )


@pytest.fixture(scope="module")
async def unchunked(test_model_dir):
    """The reference: the long prompt prefilled in one piece, alone."""
    b = backend(test_model_dir, prefill_step_size=4096)
    try:
        before = b.stats.prefill_calls
        chunks, done = await collect(b, long_request(max_tokens=24))
        assert b.stats.prefill_calls - before == 2  # all but the last token, then the last one
        return ids_of(chunks), done
    finally:
        await b.close()


async def test_chunked_prefill_gives_the_same_greedy_answer(test_model_dir, unchunked):
    ref_ids, ref_done = unchunked
    b = backend(test_model_dir, prefill_step_size=16)
    try:
        chunks, done = await collect(b, long_request(max_tokens=24))
        assert done.prompt_tokens == ref_done.prompt_tokens > 1000
        assert b.stats.prefill_calls >= done.prompt_tokens // 16
        assert ids_of(chunks) == ref_ids
    finally:
        await b.close()


async def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(test_model_dir, unchunked):
    """While sequences decode, the engine asks the pacer for each chunk and
    BatchGenerator honours it: the long prompt takes many steps, each also a
    decode step of the running streams, and its answer is unchanged."""
    ref_ids, ref_done = unchunked
    b = backend(test_model_dir, prefill_step_size=4096)
    asked: list[tuple[bool, list[int]]] = []
    progress = [0] * 4
    try:
        running = [
            asyncio.ensure_future(collect_counting(b, chat(f"stream {i}", temperature=0, max_tokens=1500), progress, i))
            for i in range(4)
        ]
        await eventually(lambda: min(progress) >= 2)
        (lm,) = b._manager.loaded()
        real_chunk = lm.pacer.chunk

        def chunk(decoding: bool, prompts: list[int]) -> int:
            asked.append((decoding, prompts))
            # Whatever the timing on this machine: at most 64 tokens a step while others decode.
            return min(real_chunk(decoding, prompts), 64)

        lm.pacer.chunk = chunk
        calls_before = b.stats.prefill_calls
        at_send = list(progress)
        gen = b.generate(long_request(max_tokens=24))
        first = await gen.__anext__()
        at_first_token = list(progress)
        rest, done = await collect_rest(gen)
        assert ids_of([first] + rest) == ref_ids and done.prompt_tokens == ref_done.prompt_tokens
        steps = b.stats.prefill_calls - calls_before
        assert steps >= math.ceil(done.prompt_tokens / 64)
        assert (True, [ref_done.prompt_tokens]) in asked
        # Every running stream got tokens during the prefill, not only after it.
        assert all(b - a >= steps // 2 for a, b in zip(at_send, at_first_token)), (at_send, at_first_token, steps)
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await eventually(lambda: b.active_count == 0)
    finally:
        await b.close()


async def collect_counting(b: MLXBackend, req: GenerateRequest, progress: list[int], i: int) -> None:
    async for ev in b.generate(req):
        if isinstance(ev, Chunk):
            progress[i] += len(ev.token_ids)


async def collect_rest(gen) -> tuple[list[Chunk], Done]:
    chunks, done = [], None
    async for ev in gen:
        if isinstance(ev, Done):
            done = ev
        else:
            chunks.append(ev)
    assert done is not None
    return chunks, done


async def test_a_cancelled_prompt_stops_being_prefilled_at_the_next_chunk(test_model_dir):
    b = backend(test_model_dir, prefill_step_size=4)
    try:
        await collect(b, chat("load the model", max_tokens=1))
        before = b.stats.prefill_tokens
        task = asyncio.ensure_future(collect(b, long_request(max_tokens=4)))
        await eventually(lambda: b.stats.prefill_tokens > before)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: b.active_count == 0)
        stopped_at = b.stats.prefill_tokens
        await asyncio.sleep(0.2)
        assert b.stats.prefill_tokens == stopped_at, "a cancelled prompt kept being prefilled"
        assert stopped_at - before < LONG, "the whole prompt was prefilled before the cancellation took effect"
    finally:
        await b.close()


async def test_a_slow_reader_gets_merged_chunks_with_every_token_and_logprob(mlx_backend):
    def request():
        req = chat("Tell me about merging", temperature=0, max_tokens=40)
        req.logprobs, req.top_logprobs = True, 2
        return req

    fast, fast_done = await collect(mlx_backend, request())
    slow, done = [], None
    async for ev in mlx_backend.generate(request()):
        if isinstance(ev, Done):
            done = ev
        else:
            slow.append(ev)
            await asyncio.sleep(0.05)  # the engine runs ahead; what it made meanwhile is merged
    assert done is not None and done.completion_tokens == fast_done.completion_tokens == 40
    assert len(slow) < 40, "nothing was merged"
    assert ids_of(slow) == ids_of(fast)
    slow_lps = [lp for c in slow for lp in c.logprobs]
    fast_lps = [lp for c in fast for lp in c.logprobs]
    assert [lp.token_id for lp in slow_lps] == ids_of(slow)
    assert [(lp.token, [t.token_id for t in lp.top]) for lp in slow_lps] == [
        (lp.token, [t.token_id for t in lp.top]) for lp in fast_lps
    ]
    assert [lp.logprob for lp in slow_lps] == pytest.approx([lp.logprob for lp in fast_lps], abs=1e-4)
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast)


async def test_greedy_answers_do_not_depend_on_the_batch(mlx_backend):
    """Greedy sequences share one sampler (one argmax for a batch of them);
    alone, among greedy neighbours or among sampled ones, the answer is the same."""
    alone, _ = await collect(mlx_backend, chat("Same answer please", temperature=0, max_tokens=16))
    greedy_batch = await asyncio.gather(
        *(collect(mlx_backend, chat(p, temperature=0, max_tokens=16)) for p in ["Same answer please", "x", "y z"])
    )
    mixed_batch = await asyncio.gather(
        collect(mlx_backend, chat("Same answer please", temperature=0, max_tokens=16)),
        collect(mlx_backend, chat("sampled", temperature=1.0, seed=3, max_tokens=16)),
    )
    assert ids_of(greedy_batch[0][0]) == ids_of(alone)
    assert ids_of(mixed_batch[0][0]) == ids_of(alone)


def start_streams(b: MLXBackend, reqs: list[GenerateRequest]) -> tuple[list[int], list, list]:
    """Streams running in the background: tokens each has got so far, the
    token ids of each once it ended, and their tasks."""
    progress = [0] * len(reqs)
    outs: list = [None] * len(reqs)

    async def run(i: int) -> None:
        chunks = []
        async for ev in b.generate(reqs[i]):
            if isinstance(ev, Chunk):
                chunks.append(ev)
                progress[i] += len(ev.token_ids)
        outs[i] = ids_of(chunks)

    return progress, outs, [asyncio.ensure_future(run(i)) for i in range(len(reqs))]


def medium_request(**sampling) -> GenerateRequest:
    text = " ".join(f"m{i % 89}" for i in range(120))
    return GenerateRequest(model=MODEL, prompt=Prompt(text, raw=True), sampling=Sampling(temperature=0, **sampling))


async def test_sequences_joined_mid_batch_give_their_solo_greedy_answers(test_model_dir):
    """Prompts prefilled while others decode join the running batch (the
    whole prompt batch at once: ``joining.PromptBatch`` hands its caches
    over; one of two: mlx-lm's split): every answer, theirs and the running
    streams', is the one each gets alone."""
    b = backend(test_model_dir, prefill_step_size=4096)
    running_reqs = [chat(f"running {i}", temperature=0, max_tokens=160) for i in range(3)]
    try:
        solo_running = [ids_of((await collect(b, r))[0]) for r in running_reqs]
        solo_long = ids_of((await collect(b, long_request(max_tokens=12)))[0])
        solo_medium = ids_of((await collect(b, medium_request(max_tokens=12)))[0])
        (lm,) = b._manager.loaded()
        # 64 tokens a step, whatever the timing: the long prompt takes 20+ steps, the medium one 5.
        lm.pacer.chunk = lambda decoding, prompts: 64

        progress, outs, tasks = start_streams(b, running_reqs)
        await eventually(lambda: min(progress) >= 2, 30, "the running streams are going")
        (long_chunks, long_done), (medium_chunks, _) = await asyncio.gather(
            collect(b, long_request(max_tokens=12)), collect(b, medium_request(max_tokens=12))
        )
        # They joined mid-batch: the running streams were still going.
        assert max(progress) < 160, progress
        await asyncio.gather(*tasks)
        assert ids_of(long_chunks) == solo_long and long_done.prompt_tokens > 1000
        assert ids_of(medium_chunks) == solo_medium
        assert outs == solo_running
    finally:
        await b.close()
