"""A quantized KV cache in the MLX engine's batch (``backends/mlx/kv_quant.py``).

On generated models whose heads are 64 wide (``tiny-wide-heads``: mlx
quantizes in groups of 64; the "tiny" model's 16-wide heads cannot be).
The reference for a sequence decoded in a batch is the same sequence decoded
alone on an engine with the same settings: quantization is per token and per
head, so the batch (padding, joins, removals, cancellations) must not change
what a sequence gets.  Accuracy against full precision is reported, not
asserted (``make bench``'s memory section measures it on the bench model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from prometheus_client import CollectorRegistry

from backends.metrics import MemoryCollector
from backends.mlx import kv_quant
from backends.mlx.backend import MLXBackend
from backends.mlx.testmodel import write_test_model
from backends.types import Chunk, Done, GenerateRequest, Message, Prompt, Sampling
from mlxgate.config import KVCacheSettings, MLXConfig
from mlxgate.config_load import load_config
from tests.polling import eventually
from tests.test_mlx_scheduling import start_streams

pytestmark = pytest.mark.timeout(180)

WIDE = "wide"
#: The same weights, its first layer a sliding-window one (a RotatingKVCache).
SLIDING = "wide-sliding"
#: The "tiny" shape: 16-wide heads, which no group size divides.
NARROW = "narrow"

PROMPTS = [" ".join(f"w{(i * 7 + k) % 89}" for k in range(6 + 9 * i)) for i in range(6)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-models")
    write_test_model(root, WIDE, size="tiny-wide-heads")
    write_test_model(root, NARROW, size="tiny")
    shutil.copytree(root / WIDE, root / SLIDING)
    cfg_path = root / SLIDING / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    cfg_path.write_text(json.dumps(cfg))
    return root


def backend(root, **kw) -> MLXBackend:
    kw.setdefault("prompt_cache_bytes", 0)
    return MLXBackend(MLXConfig(models_dir=str(root), hf_cache=str(root / "none"), bootstrap_test_model=False, **kw))


def req(text: str, max_tokens: int = 16, model: str = WIDE) -> GenerateRequest:
    return GenerateRequest(model=model, prompt=Prompt(text, raw=True),
                           sampling=Sampling(temperature=0, max_tokens=max_tokens), logprobs=True)


async def run(b: MLXBackend, request: GenerateRequest):
    """(token ids, their logprobs, Done, text)."""
    ids, lps, done, text = [], [], None, ""
    async for ev in b.generate(request):
        assert done is None
        if isinstance(ev, Done):
            done = ev
        else:
            assert isinstance(ev, Chunk)
            ids += ev.token_ids
            lps += [lp.logprob for lp in ev.logprobs]
            text += ev.text
    assert done is not None and len(ids) == done.completion_tokens
    return ids, lps, done, text


def same(a, b, tol=1e-3) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= tol for x, y in zip(a[1], b[1]))


def loaded(b: MLXBackend, name: str = WIDE):
    return next(m for m in b._manager.loaded() if m.name == name)


def stored_caches(b: MLXBackend, name: str = WIDE) -> list[list]:
    """Every entry of the model's prompt-cache store (its caches, one per layer)."""
    trie = loaded(b, name).prompt_cache._lru._trie
    out, stack = [], [trie._trie]
    while stack:
        node = stack.pop()
        for k, v in node.items():
            if k == "__value__":
                out.append(v.prompt_cache)
            else:
                stack.append(v)
    return out


# ---------------------------------------------------------------- the batch cache itself


def dq(triple, q: KVCacheSettings) -> mx.array:
    return mx.dequantize(*triple, group_size=q.group_size, bits=q.bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_joins_removals_and_extraction_keep_every_rows_values(bits):
    """merge (sequences entering together), extend (joining a running batch),
    a decode step, filter (one leaving) and extract (one finishing) move each
    row's quantized values exactly, and ``nbytes`` is the sum of the arrays."""
    q = KVCacheSettings(bits=bits, group_size=64)
    mx.random.seed(0)
    lengths = [5, 9, 3]
    keys = [mx.random.normal((1, 2, n, 64)) for n in lengths]
    values = [mx.random.normal((1, 2, n, 64)) for n in lengths]
    seqs = []
    for k, v in zip(keys, values):
        c = kv_quant.QuantizedSequenceCache(q)
        c.update_and_fetch(k, v)
        seqs.append(c)
    batch = kv_quant.QuantizedSequenceCache.merge(seqs[:2])
    assert isinstance(batch, kv_quant.BatchQuantizedKVCache) and batch.quantized and batch.bits == bits
    batch.extend(kv_quant.QuantizedSequenceCache.merge(seqs[2:]))
    step_k, step_v = mx.random.normal((3, 2, 1, 64)), mx.random.normal((3, 2, 1, 64))
    k_all, v_all = batch.update_and_fetch(step_k, step_v)
    assert batch.nbytes == sum(x.nbytes for _, x in tree_flatten((batch.keys, batch.values))) > 0
    width = max(lengths) + 1
    assert k_all[0].shape[2] == width and k_all[0].dtype == mx.uint32
    for row, (k, v, n) in enumerate(zip(keys, values, lengths)):
        want_k = mx.concatenate([k, step_k[row : row + 1]], axis=2)
        want_v = mx.concatenate([v, step_v[row : row + 1]], axis=2)
        got_k = dq(tuple(x[row : row + 1, :, width - n - 1 :] for x in k_all), q)
        got_v = dq(tuple(x[row : row + 1, :, width - n - 1 :] for x in v_all), q)
        assert mx.array_equal(got_k, dq(kv_quant._quantize(want_k, q), q))
        assert mx.array_equal(got_v, dq(kv_quant._quantize(want_v, q), q))
    # The longest sequence leaves: the others keep their values, shared left padding goes.
    batch.filter([0, 2])
    assert batch.size() == max(lengths[0], lengths[2]) + 1
    one = batch.extract(1)
    assert isinstance(one, kv_quant.QuantizedSequenceCache) and one.offset == lengths[2] + 1
    want = mx.concatenate([keys[2], step_k[2:3]], axis=2)
    assert mx.array_equal(dq(one.keys, q), dq(kv_quant._quantize(want, q), q))
    assert one.nbytes == sum(x.nbytes for _, x in tree_flatten((one.keys, one.values)))


def test_a_batch_stays_full_precision_until_quant_start():
    q = KVCacheSettings(bits=8, group_size=64, quant_start=8)
    c = kv_quant.BatchQuantizedKVCache([0, 0], q)
    k = mx.random.normal((2, 1, 6, 64))
    out_k, _ = c.update_and_fetch(k, k)
    assert not c.quantized and not hasattr(c, "bits") and mx.array_equal(out_k, k)
    assert isinstance(c.extract(0), kv_quant.PlainSequenceCache)
    out_k, _ = c.update_and_fetch(k[:, :, :3], k[:, :, :3])  # 9 positions: past the start
    assert c.quantized and c.bits == 8 and isinstance(out_k, tuple) and out_k[0].shape[2] == 9
    assert isinstance(c.extract(1), kv_quant.QuantizedSequenceCache)


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("bits", [8, 4])
async def test_batched_sequences_match_their_solo_runs_through_joins_removals_and_cancellation(models, bits):
    solo_b = backend(models, kv_bits=bits)
    b = backend(models, kv_bits=bits)
    try:
        lengths = [40, 12, 30, 8, 20]
        alone = [await run(solo_b, req(p, n)) for p, n in zip(PROMPTS, lengths)]
        first = [asyncio.ensure_future(run(b, req(p, n))) for p, n in zip(PROMPTS[:2], lengths[:2])]
        # A stream that is cancelled after a few tokens, while the others decode.
        doomed = b.generate(req(PROMPTS[5], 200))
        for _ in range(3):
            await doomed.__anext__()
        # Three more join the running batch.
        later = [asyncio.ensure_future(run(b, req(p, n))) for p, n in zip(PROMPTS[2:5], lengths[2:5])]
        await doomed.aclose()
        together = await asyncio.gather(*first, *later)
        for got, ref in zip(together, alone):
            assert same(got, ref), (got[0], ref[0])
            assert got[2].finish_reason == "length"
        assert b.stats.max_batch_seen >= 3
        await eventually(lambda: b.active_count == 0)
        assert loaded(b).kv_layers == [KVCacheSettings(bits=bits)] * 2
    finally:
        await solo_b.close()
        await b.close()


async def test_prompt_cache_entries_are_stored_quantized_and_reused(models):
    plain = backend(models, kv_bits=8)
    b = backend(models, kv_bits=8, prompt_cache_bytes=64 * 1024 * 1024)
    try:
        turn1 = GenerateRequest(model=WIDE, messages=[Message("system", "Be brief. " * 12), Message("user", "Hi!")],
                                sampling=Sampling(temperature=0, max_tokens=12), logprobs=True)
        _, _, done1, text1 = await run(b, turn1)
        (entry,) = stored_caches(b)
        assert all(isinstance(c, kv_quant.QuantizedSequenceCache) for c in entry)
        assert all(c.keys[0].dtype == mx.uint32 for c in entry)
        turn2 = GenerateRequest(
            model=WIDE, sampling=turn1.sampling, logprobs=True,
            messages=turn1.messages + [Message("assistant", text1), Message("user", "And then?")],
        )
        got = await run(b, turn2)
        assert got[2].cached_prompt_tokens >= done1.prompt_tokens - 1
        ref = await run(plain, turn2)
        assert got[0] == ref[0] and ref[2].cached_prompt_tokens == 0
        # The same prompt again: all but its last token from the store.
        again = await run(b, turn2)
        assert again[2].cached_prompt_tokens == again[2].prompt_tokens - 1 and again[0] == ref[0]
        print(f"\nlargest logprob difference, reuse vs none: {max(abs(x - y) for x, y in zip(got[1], ref[1])):.2e}")
    finally:
        await plain.close()
        await b.close()


async def test_the_same_byte_budget_holds_more_entries_quantized(models):
    full = backend(models, prompt_cache_bytes=64 * 1024 * 1024)
    try:
        await run(full, req(PROMPTS[3], 8))
        (entry,) = stored_caches(full)
        entry_bytes = sum(c.nbytes for c in entry)
    finally:
        await full.close()
    bound = entry_bytes * 5 // 2
    held = {}
    for bits in (None, 8, 4):
        b = backend(models, kv_bits=bits, prompt_cache_bytes=bound)
        try:
            for i in range(18):
                await run(b, req(f"question {i}: " + PROMPTS[3], 8))
                assert 0 < loaded(b).prompt_cache.nbytes <= bound
            held[bits] = len(loaded(b).prompt_cache)
        finally:
            await b.close()
    assert held[None] == 2 and held[8] > held[None] and held[4] > held[8], held


@pytest.mark.parametrize("bits", [8, 4])
async def test_the_kv_memory_metric_is_the_bytes_of_the_packed_arrays_scales_and_biases(models, bits):
    b = backend(models, kv_bits=bits)
    progress = [0] * 4

    async def stream(i):
        async for ev in b.generate(req(PROMPTS[i], 300)):
            if isinstance(ev, Chunk):
                progress[i] += len(ev.token_ids)

    tasks = [asyncio.ensure_future(stream(i)) for i in range(4)]
    try:
        await eventually(lambda: min(progress) >= 2, timeout=60)
        registry = CollectorRegistry()
        registry.register(MemoryCollector("service", b.memory_snapshot))
        lm = loaded(b)

        def measure():
            # On the MLX thread, between two steps: the figures and the caches agree.
            b._engine._refresh_memory()
            gen = lm.generator
            caches = list(gen._generation_batch.prompt_cache) + list(gen._prompt_batch.prompt_cache)
            caches += [c for seq in gen._unprocessed_sequences for c in seq[3]]
            arrays = [x for c in caches for _, x in tree_flatten((c.keys, c.values))]
            packed = all(isinstance(c, kv_quant.BatchQuantizedKVCache) and c.quantized
                         for c in gen._generation_batch.prompt_cache)
            return sum(x.nbytes for x in arrays), packed, registry.get_sample_value("mlxgate_kv_cache_memory_bytes")

        expected, packed, metric = await asyncio.wrap_future(b._engine.call(measure))
        assert packed and expected > 0
        assert metric == expected
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()


async def test_sliding_window_layers_stay_full_precision_with_one_log_line(models, caplog):
    solo_b = backend(models, kv_bits=8)
    b = backend(models, kv_bits=8, prompt_cache_bytes=64 * 1024 * 1024)
    try:
        with caplog.at_level(logging.INFO, logger="backends.mlx.kv_quant"):
            lengths = [20, 9, 14, 24]
            together = await asyncio.gather(*(run(b, req(p, n, SLIDING)) for p, n in zip(PROMPTS[2:], lengths)))
        lines = [r.getMessage() for r in caplog.records if r.name == "backends.mlx.kv_quant"]
        assert len(lines) == 1 and "RotatingKVCache: 1" in lines[0] and "1 of 2 layers" in lines[0], lines
        assert loaded(b, SLIDING).kv_layers == [None, KVCacheSettings(bits=8)]
        for got, (p, n) in zip(together, zip(PROMPTS[2:], lengths)):
            assert same(got, await run(solo_b, req(p, n, SLIDING)))
        kinds = {tuple(type(c).__name__ for c in entry) for entry in stored_caches(b, SLIDING)}
        assert kinds == {("RotatingKVCache", "QuantizedSequenceCache")}
    finally:
        await solo_b.close()
        await b.close()


async def test_heads_no_group_divides_stay_full_precision(models, caplog):
    full, b = backend(models), backend(models, kv_bits=4)
    try:
        with caplog.at_level(logging.INFO, logger="backends.mlx.kv_quant"):
            got = await run(b, req(PROMPTS[1], 12, NARROW))
        assert loaded(b, NARROW).kv_layers is None
        lines = [r.getMessage() for r in caplog.records if r.name == "backends.mlx.kv_quant"]
        assert len(lines) == 1 and "not a multiple of kv_group_size 64" in lines[0], lines
        assert same(got, await run(full, req(PROMPTS[1], 12, NARROW)), tol=0)
    finally:
        await full.close()
        await b.close()


async def test_quant_start_keeps_short_sequences_at_full_precision(models):
    full = backend(models)
    late = backend(models, kv_bits=4, kv_quant_start=10_000, prompt_cache_bytes=64 * 1024 * 1024)
    early = backend(models, kv_bits=4, kv_quant_start=50, prompt_cache_bytes=64 * 1024 * 1024)
    try:
        ref = await run(full, req(PROMPTS[1], 30))
        got = await run(late, req(PROMPTS[1], 30))
        assert same(got, ref, tol=1e-5)
        assert all(isinstance(c, kv_quant.PlainSequenceCache) for entry in stored_caches(late) for c in entry)
        # The prompt fits in 50 positions; the cache passes them while decoding.
        got = await run(early, req(PROMPTS[1], 30))
        assert got[2].prompt_tokens < 50 < got[2].prompt_tokens + 30 and len(got[0]) == 30
        assert all(isinstance(c, kv_quant.QuantizedSequenceCache) for entry in stored_caches(early) for c in entry)
    finally:
        for x in (full, late, early):
            await x.close()


async def test_greedy_output_at_8_bits_next_to_full_precision(models):
    """Reported, not asserted: how many greedy tokens 8 bits changes on the generated model."""
    full, q8 = backend(models), backend(models, kv_bits=8)
    try:
        agree = total = 0
        for p in PROMPTS:
            a, b = await run(full, req(p, 24)), await run(q8, req(p, 24))
            assert len(a[0]) == len(b[0]) == 24
            n = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), 24)
            agree, total = agree + n, total + 24
        print(f"\n8-bit KV cache vs full precision: {agree}/{total} greedy tokens agree before the first difference")
    finally:
        await full.close()
        await q8.close()


# ---------------------------------------------------------------- settings


def test_settings_from_env_and_per_model_tables(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[mlx]\nkv_bits = 8\n[mlx.models."Big:latest"]\nkv_bits = 4\nkv_group_size = 32\n'
                    '[mlx.models."plain"]\nkv_bits = 0\n')
    cfg = load_config(toml, env={"MLXGATE_KV_QUANT_START": "256"})
    assert cfg.mlx.kv_cache_for("big") == KVCacheSettings(4, 32, 256)
    assert cfg.mlx.kv_cache_for("BIG:latest") == KVCacheSettings(4, 32, 256)
    assert cfg.mlx.kv_cache_for("plain").bits is None
    assert cfg.mlx.kv_cache_for("other") == KVCacheSettings(8, 64, 256)
    env = {"MLXGATE_KV_BITS": "4", "MLXGATE_KV_GROUP_SIZE": "128"}
    assert load_config(None, env=env).mlx.kv_cache_for("x") == KVCacheSettings(4, 128, 0)
    assert load_config(None, env={}).mlx.kv_cache_for("x").bits is None


@pytest.mark.parametrize("env, toml, message", [
    ({"MLXGATE_KV_BITS": "3"}, "", "kv_bits must be one of 4, 8"),
    ({"MLXGATE_KV_GROUP_SIZE": "48"}, "", "kv_group_size must be one of 32, 64, 128"),
    ({"MLXGATE_KV_QUANT_START": "-1"}, "", "kv_quant_start must be 0 or more"),
    ({}, '[mlx.models."m"]\nkv_bits = 5\n', 'mlx.models."m": kv_bits must be one of 4, 8'),
    ({}, '[mlx.models."m"]\nkv_bitz = 4\n', 'mlx.models."m": unknown key(s) kv_bitz'),
])
def test_bad_settings_are_one_line_errors(tmp_path, env, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, env=env)


async def test_fused_steps_over_quantized_caches_give_the_solo_answers(models):
    """A long prompt prefilled in fused steps (``mixed.py``) beside streams whose
    caches are quantized: every answer is its quantized solo answer.  A model
    with sliding-window layers is not fused."""
    # Tokens of each running stream: they must outlast the long prompt's ~36
    # steps of prefill (at 60 they sometimes ended first).
    RUNNING = 200
    long_text = " ".join(f"w{i % 97}" for i in range(400))
    b = backend(models, kv_bits=8, prefill_step_size=4096)
    try:
        solo_long = (await run(b, req(long_text, 12)))[0]
        solo_running = [(await run(b, req(p, RUNNING)))[0] for p in PROMPTS[:3]]
        (lm,) = b._manager.loaded()
        assert lm.fused
        lm.pacer.chunk = lambda decoding, prompts: 32
        before = b.stats.fused_steps
        progress, outs, tasks = start_streams(b, [req(p, RUNNING) for p in PROMPTS[:3]])
        await eventually(lambda: min(progress) >= 2, 30, "the streams are going")
        long_ids = (await run(b, req(long_text, 12)))[0]
        assert max(progress) < RUNNING  # it joined mid-batch
        await asyncio.gather(*tasks)
        assert b.stats.fused_steps - before >= 5
        assert long_ids == solo_long and outs == solo_running
        await run(b, req("slide", 2, model=SLIDING))
        assert not next(m for m in b._manager.loaded() if m.name == SLIDING).fused
    finally:
        await b.close()
