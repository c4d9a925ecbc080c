"""One forward pass for a decode step and a prefill chunk (``backends/mlx/mixed.py``),
and a join whose last prompt token rides in the batch's decode step
(``backends/mlx/joining.py``), on the generated tiny model.

What must hold whatever the timing: the fused pass computes what the two
passes compute (logits and the prompt's KV cache), a long prompt prefilled in
fused steps beside running streams gives every sequence its solo greedy
answer, and a sequence that joins the batch generates exactly what it is
allowed to (its echoed prompt token is not counted or sent).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache

from backends.mlx import mixed
from tests.polling import eventually
from tests.test_mlx_engine import MODEL, chat, collect, ids_of
from tests.test_mlx_scheduling import backend, long_request, start_streams

pytestmark = pytest.mark.timeout(120)


def batch_cache(model, rows: int, tokens: int, seed: int) -> list:
    cache = [BatchKVCache([0] * rows) for _ in model.layers]
    model(mx.random.randint(0, 200, (rows, tokens), key=mx.random.key(seed)), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_a_fused_pass_computes_what_two_passes_compute(test_model_dir):
    model, _ = load(str(test_model_dir / MODEL))
    assert mixed.fusable(model)
    mixed.install(model)
    mixed.install(model)  # idempotent
    assert type(model.layers[0].self_attn).__name__.startswith("Split")
    decode_in = mx.array([3, 14, 15, 92], dtype=mx.uint32)
    chunk = list(range(40, 77))
    # Two passes: the batch's decode step, then the prompt's chunk.
    d1, p1 = batch_cache(model, 4, 30, 1), batch_cache(model, 1, 100, 2)
    want = model(decode_in[:, None], cache=d1)
    model(mx.array([chunk]), cache=p1)
    # One pass.
    d2, p2 = batch_cache(model, 4, 30, 1), batch_cache(model, 1, 100, 2)
    got = mixed.forward(model, decode_in, d2, chunk, p2)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() < 1e-4
    for a, b in zip(p1 + d1, p2 + d2):
        assert a._idx == b._idx and a.offset.tolist() == b.offset.tolist()
        assert mx.abs(a.keys[..., : a._idx, :] - b.keys[..., : b._idx, :]).max().item() < 1e-4
        assert mx.abs(a.values[..., : a._idx, :] - b.values[..., : b._idx, :]).max().item() < 1e-4
    # Outside a fused step the split attention is the model's own.
    fresh, _ = load(str(test_model_dir / MODEL))
    x = mx.array([chunk])
    assert mx.abs(model(x) - fresh(x)).max().item() == 0.0


def test_only_known_text_families_are_fused():
    assert not mixed.fusable(SimpleNamespace(model_type="gemma3"))
    assert not mixed.fusable(SimpleNamespace(model_type="llama"))  # no layers to split


async def run_beside_streams(b, n_running: int = 3):
    """Greedy answers of a long prompt sent while ``n_running`` streams decode,
    64 prompt tokens a step whatever the timing; theirs and the streams'."""
    running_reqs = [chat(f"running {i}", temperature=0, max_tokens=120) for i in range(n_running)]
    (lm,) = b._manager.loaded()
    lm.pacer.chunk = lambda decoding, prompts: 64
    progress, outs, tasks = start_streams(b, running_reqs)
    await eventually(lambda: min(progress) >= 2, 30, "the running streams are going")
    long_chunks, long_done = await collect(b, long_request(max_tokens=12))
    assert max(progress) < 120, progress  # it joined mid-batch
    await asyncio.gather(*tasks)
    return ids_of(long_chunks), long_done, outs, running_reqs


async def test_a_long_prompt_prefilled_in_fused_steps_gives_every_solo_answer(test_model_dir):
    fused = backend(test_model_dir, prefill_step_size=4096)
    try:
        solo_long, solo_done = await collect(fused, long_request(max_tokens=12))
        assert fused.stats.fused_steps == 0  # nothing was decoding
        before = fused.stats.fused_steps
        long_ids, long_done, outs, reqs = await run_beside_streams(fused)
        solo_running = [ids_of((await collect(fused, r))[0]) for r in reqs]
        steps = fused.stats.fused_steps - before
        # 1,400+ prompt tokens at 64 a step: most of them fused (the pacer's
        # decode-only steps and the first, before the prompt is in the batch, are not).
        assert steps >= 10, steps
        assert long_ids == ids_of(solo_long) and len(long_ids) == long_done.completion_tokens == 12
        assert long_done.prompt_tokens == solo_done.prompt_tokens > 1000
        assert outs == solo_running
    finally:
        await fused.close()
    unfused = backend(test_model_dir, prefill_step_size=4096, fused_prefill=False)
    try:
        await collect(unfused, chat("load", max_tokens=1))
        long_ids2, _, outs2, _ = await run_beside_streams(unfused)
        assert unfused.stats.fused_steps == 0
        assert long_ids2 == long_ids and outs2 == outs
    finally:
        await unfused.close()


async def test_a_joined_sequence_generates_exactly_its_limit_and_nothing_echoed(test_model_dir):
    """Its last prompt token comes back from its first decode step and is
    dropped: not sent, not counted against ``max_tokens``, not in the stats."""
    b = backend(test_model_dir)
    try:
        await collect(b, chat("load", max_tokens=1))
        before = b.stats.generated_tokens
        results = await asyncio.gather(
            *(collect(b, chat(f"limit {n}", temperature=0, max_tokens=n)) for n in (1, 2, 7))
        )
        for n, (chunks, done) in zip((1, 2, 7), results):
            assert done.finish_reason == "length" and done.completion_tokens == n == len(ids_of(chunks))
        assert b.stats.generated_tokens - before == 10
        (lm,) = b._manager.loaded()
        assert not lm.generator.echoes  # every echo came back and was dropped
    finally:
        await b.close()


async def test_a_prompt_ending_in_an_end_token_still_answers(test_model_dir):
    """The echoed last prompt token never reaches the stop matcher: a raw
    prompt that ends in EOS generates, as it did before the echo."""
    from backends.types import GenerateRequest, Prompt, Sampling

    b = backend(test_model_dir)
    try:
        await collect(b, chat("load", max_tokens=1))
        (lm,) = b._manager.loaded()
        eos = lm.tokenizer.eos_token
        req = GenerateRequest(model=MODEL, prompt=Prompt(f"hello there{eos}", raw=True),
                              sampling=Sampling(temperature=0, max_tokens=5))
        chunks, done = await collect(b, req)
        assert done.completion_tokens >= 1 and ids_of(chunks)
    finally:
        await b.close()


def test_a_join_copies_into_one_buffer_what_mlx_lm_pads_and_concatenates(test_model_dir):
    """``JoiningKVCache.extend`` leaves the state mlx-lm's ``extend`` leaves,
    whichever side is longer."""
    from backends.mlx.joining import JoiningKVCache

    model, _ = load(str(test_model_dir / MODEL))
    for running_len, new_len in ((30, 300), (300, 30), (64, 64)):
        want_run, want_new = batch_cache(model, 3, running_len, 1), batch_cache(model, 1, new_len, 2)
        got_run, got_new = batch_cache(model, 3, running_len, 1), batch_cache(model, 1, new_len, 2)
        for c in got_run + got_new:
            c.__class__ = JoiningKVCache
        for a, b in zip(want_run, want_new):
            a.extend(b)
        for a, b in zip(got_run, got_new):
            a.extend(b)
        for a, b in zip(want_run, got_run):
            state = (a._idx, a.left_padding.tolist(), a.offset.tolist())
            assert state == (b._idx, b.left_padding.tolist(), b.offset.tolist())
            assert b.keys.shape[2] >= b._idx
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                assert mx.array_equal(x[..., : a._idx, :], y[..., : b._idx, :])
        # And the next decode step over the joined batch is the same.
        step = mx.array([[5], [6], [7], [8]])
        assert mx.abs(model(step, cache=want_run) - model(step, cache=got_run)).max().item() < 1e-5


def test_a_decode_step_over_rows_of_very_different_lengths_splits_them_and_computes_the_same(test_model_dir):
    """``ragged.py``: short rows beside a long one attend over their own
    length only; the logits and the cache after the step are the same."""
    from backends.mlx import ragged
    from backends.mlx.joining import JoiningKVCache

    plain, _ = load(str(test_model_dir / MODEL))
    split, _ = load(str(test_model_dir / MODEL))
    mixed.install(split)

    def joined():
        run, new = batch_cache(plain, 3, 20, 1), batch_cache(plain, 1, 250, 2)
        for a, b in zip(run, new):
            a.__class__ = JoiningKVCache
            a.extend(b)
        return run

    want_cache, got_cache = joined(), joined()
    assert ragged._groups(got_cache[0]) is not None  # the split applies
    for step in range(3):  # and keeps applying as the rows grow
        tokens = mx.array([[5 + step], [6], [7], [8]])
        want = plain(tokens, cache=want_cache)
        got = split(tokens, cache=got_cache)
        assert mx.abs(want - got).max().item() < 1e-4
        for a, b in zip(want_cache, got_cache):
            assert a._idx == b._idx and a.offset.tolist() == b.offset.tolist()
            assert mx.abs(a.keys[..., : a._idx, :] - b.keys[..., : b._idx, :]).max().item() < 1e-5
    # Rows of similar lengths are not split.
    assert ragged._groups(batch_cache(plain, 3, 20, 1)[0]) is None


def test_a_removal_gathers_only_the_window_the_kept_rows_use(test_model_dir):
    """``JoiningKVCache.filter`` leaves the state mlx-lm's ``filter`` leaves
    (the kept rows, their common padding dropped)."""
    from backends.mlx.joining import JoiningKVCache

    model, _ = load(str(test_model_dir / MODEL))

    def joined(cls):
        run, new = batch_cache(model, 3, 20, 1), batch_cache(model, 1, 250, 2)
        for a, b in zip(run, new):
            a.__class__ = cls
            a.extend(b)
        return run

    for keep in ([0, 1, 2], [3], [1, 3], [0, 2]):  # the long row leaves; only it stays; mixes
        want, got = joined(BatchKVCache), joined(JoiningKVCache)
        for a, b in zip(want, got):
            a.filter(keep)
            b.filter(keep)
            assert (a._idx, a.left_padding.tolist(), a.offset.tolist()) == (
                b._idx, b.left_padding.tolist(), b.offset.tolist())
            assert mx.array_equal(a.keys[..., : a._idx, :], b.keys[..., : b._idx, :])
            assert mx.array_equal(a.values[..., : a._idx, :], b.values[..., : b._idx, :])
        step = mx.array([[5]] * len(keep))
        assert mx.abs(model(step, cache=want) - model(step, cache=got)).max().item() < 1e-5
