"""Prompt-cache reuse in the MLX engine, on the generated tiny model.

The reference for every output is a second backend with reuse off
(``prompt_cache_bytes=0``): with greedy decoding (or a fixed seed) a
sequence that starts from a stored cache must give the tokens, and the
logprobs, it gives when it evaluates its whole prompt.  The random tiny
model's greedy tokens depend little on the prompt, so the logprobs are the
sharp check: another user message moves them by ~0.1, reuse by nothing
(the first test asserts both).
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from backends.mlx import prompt as prompt_mod
from backends.mlx.backend import MLXBackend
from backends.types import Chunk, Done, GenerateRequest, Message, Prompt, Sampling
from mlxgate.config import MLXConfig

MODEL = "tiny-llama"
SYSTEM = "You are a careful assistant. Answer briefly and check every step twice. " * 4

pytestmark = pytest.mark.timeout(60)


def config(models_dir, **kw) -> MLXConfig:
    kw.setdefault("prompt_cache_bytes", 64 * 1024 * 1024)
    return MLXConfig(models_dir=str(models_dir), hf_cache=str(models_dir / "none"), bootstrap_test_model=False, **kw)


def req(messages, model=MODEL, **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0)
    sampling.setdefault("max_tokens", 16)
    return GenerateRequest(model=model, messages=list(messages), sampling=Sampling(**sampling), logprobs=True)


def conversation(user="Hello! How are you?"):
    return [Message("system", SYSTEM), Message("user", user)]


class Out(list):
    """Generated token ids, with their logprobs in ``.logprobs``."""

    logprobs: list[float]

    def same_as(self, other: "Out", tol: float = 1e-4) -> bool:
        return list(self) == list(other) and all(abs(a - b) <= tol for a, b in zip(self.logprobs, other.logprobs))


async def run(backend, request):
    ids, text, done = Out(), "", None
    ids.logprobs = []
    async for ev in backend.generate(request):
        assert done is None
        if isinstance(ev, Done):
            done = ev
        else:
            assert isinstance(ev, Chunk)
            ids += ev.token_ids
            ids.logprobs += [lp.logprob for lp in ev.logprobs]
            text += ev.text
    assert done is not None
    assert len(ids.logprobs) == (len(ids) if request.logprobs else 0)
    return ids, text, done


def loaded(backend, name=MODEL):
    return next(m for m in backend._manager.loaded() if m.name == name)


def prompt_ids(backend, request) -> list[int]:
    lm = loaded(backend, request.model)
    return prompt_mod.build_prompt(request, lm.tokenizer, lm.name)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def store_bytes(backend) -> int:
    return sum(m.prompt_cache.nbytes for m in backend._manager.loaded() if m.prompt_cache is not None)


@pytest.fixture(scope="module")
async def plain(test_model_dir):
    """The reference: the same model with reuse off."""
    backend = MLXBackend(config(test_model_dir, prompt_cache_bytes=0))
    yield backend
    await backend.close()


@pytest.fixture
async def reusing(test_model_dir):
    backend = MLXBackend(config(test_model_dir))
    yield backend
    await backend.close()


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory, test_model_dir):
    """The very same weights and tokenizer under two names."""
    root = tmp_path_factory.mktemp("twins")
    for name in ("twin-a", "twin-b"):
        shutil.copytree(test_model_dir / MODEL, root / name)
    return root


async def test_second_turn_reuses_the_first_and_matches_a_full_prefill(reusing, plain):
    turn1 = req(conversation())
    ids1, text1, done1 = await run(reusing, turn1)
    assert done1.cached_prompt_tokens == 0
    assert (await run(plain, turn1))[0].same_as(ids1)

    turn2 = req(conversation() + [Message("assistant", text1), Message("user", "And why is that?")])
    ids2, _, done2 = await run(reusing, turn2)
    p1, p2 = prompt_ids(reusing, turn1), prompt_ids(reusing, turn2)
    # The store holds turn 1's prompt + its generated tokens; the whole first prompt
    # is a prefix of the second, and the shared part may run into the answer.
    expected = min(common_prefix(p1 + ids1, p2), len(p2) - 1)
    assert expected >= len(p1)
    assert done2.cached_prompt_tokens == expected
    assert done2.prompt_tokens == len(p2)
    ref2, _, ref_done2 = await run(plain, turn2)
    assert ids2.same_as(ref2, tol=0) and ref_done2.cached_prompt_tokens == 0

    # The very same prompt again: all but its last token come from the store.
    again, _, done3 = await run(reusing, turn2)
    assert done3.cached_prompt_tokens == len(p2) - 1 and again.same_as(ref2, tol=0)
    assert reusing.stats.prompt_cache_hits == 2

    # The check has teeth: another last user message moves the logprobs far more than the tolerance.
    other = req(conversation() + [Message("assistant", text1), Message("user", "And why not?")])
    moved = (await run(plain, other))[0].logprobs
    assert max(abs(a - b) for a, b in zip(moved, ref2.logprobs)) > 1e-2


async def test_shared_system_prompt_and_sampling_state_survive_reuse(reusing, plain):
    first = req(conversation("What is the capital of France?"))
    await run(reusing, first)
    # Another conversation with the same system prompt: it starts from the
    # first one's cache, trimmed back to the shared prefix.
    other = req(conversation("Tell me about the sea."), max_tokens=24)
    ids, _, done = await run(reusing, other)
    p_other = prompt_ids(reusing, other)
    shared = common_prefix(prompt_ids(reusing, first), p_other)
    assert shared > 40 and done.cached_prompt_tokens == shared
    assert ids.same_as((await run(plain, other))[0])
    # Penalties and a seeded sampler read the whole prompt as their context,
    # the cached part included.
    for sampling in ({"repeat_penalty": 1.8, "repeat_last_n": 512}, {"temperature": 0.9, "seed": 7}):
        other = req(conversation("Tell me about the sea."), max_tokens=24, **sampling)
        ids, _, done = await run(reusing, other)
        assert done.cached_prompt_tokens == len(p_other) - 1
        ref, _, _ = await run(plain, other)
        assert ids.same_as(ref), sampling


async def test_a_finish_on_a_stop_string_keeps_the_cache_too(reusing, plain):
    base = req(conversation(), max_tokens=24)
    _, text, _ = await run(plain, base)
    # A stop string that first occurs in the middle of the greedy answer.
    at = next(k for k in range(6, len(text) - 4) if text[k : k + 4].strip() and text.find(text[k : k + 4]) == k)
    turn1 = req(conversation(), max_tokens=24, stop=[text[at : at + 4]])
    ids1, text1, done1 = await run(reusing, turn1)
    assert done1.finish_reason == "stop" and text1 == text[:at]
    turn2 = req(conversation() + [Message("assistant", text1), Message("user", "Go on.")])
    ids2, _, done2 = await run(reusing, turn2)
    assert done2.cached_prompt_tokens >= len(prompt_ids(reusing, turn1))
    assert ids2.same_as((await run(plain, turn2))[0])


async def test_concurrent_requests_reusing_one_entry_match_their_solo_outputs(reusing, plain):
    await run(reusing, req(conversation()))  # the entry they will all start from
    users = ["Hello! How are you?", "Hello! How are you doing today?", "Hello! How are you?", "Something else"]
    requests = [req(conversation(u), max_tokens=12 + 6 * i) for i, u in enumerate(users)]
    # Plus one that shares nothing but the template's first tokens, batched with them.
    requests.append(GenerateRequest(model=MODEL, prompt=Prompt("zz", raw=True), sampling=Sampling(temperature=0)))
    alone = [(await run(plain, r))[0] for r in requests]
    steps = reusing.stats.multi_seq_steps
    together = await asyncio.gather(*(run(reusing, r) for r in requests))
    for (ids, _, _), ref in zip(together, alone):
        assert ids.same_as(ref)
    assert all(done.cached_prompt_tokens > 0 for _, _, done in together[:4])
    assert reusing.stats.multi_seq_steps > steps  # they did share decode steps
    # ... and the entry they shared is intact: the first request still matches.
    ids, _, done = await run(reusing, requests[0])
    assert ids.same_as(alone[0]) and done.cached_prompt_tokens == done.prompt_tokens - 1


async def test_models_never_share_caches_and_unloading_drops_them(twin_models):
    backend = MLXBackend(config(twin_models, max_loaded_models=2))
    try:
        a, b = req(conversation(), model="twin-a"), req(conversation(), model="twin-b")
        ids_a, _, _ = await run(backend, a)
        # Same weights, same tokens: only the model name differs, and that is enough.
        ids_b, _, done_b = await run(backend, b)
        assert done_b.cached_prompt_tokens == 0 and ids_b.same_as(ids_a)
        _, _, done_a = await run(backend, a)
        assert done_a.cached_prompt_tokens > 0
        assert store_bytes(backend) > 0

        old = loaded(backend, "twin-a")
        assert await backend.unload_model("twin-a")
        assert old.prompt_cache is None and [m.name for m in backend._manager.loaded()] == ["twin-b"]
        _, _, done_a = await run(backend, a)
        assert done_a.cached_prompt_tokens == 0  # a fresh load starts with an empty store
    finally:
        await backend.close()

    # Eviction (max_loaded_models=1) drops the evicted model's store as well.
    backend = MLXBackend(config(twin_models, max_loaded_models=1))
    try:
        await run(backend, a)
        old = loaded(backend, "twin-a")
        await run(backend, b)
        assert old.prompt_cache is None
        _, _, done_a = await run(backend, a)
        assert done_a.cached_prompt_tokens == 0
    finally:
        await backend.close()


async def test_the_byte_bound_holds_across_models(twin_models):
    backend = MLXBackend(config(twin_models, max_loaded_models=2))
    try:
        await run(backend, req(conversation(), model="twin-a"))
        entry = store_bytes(backend)
        assert entry > 0
        await backend.unload_model("twin-a")
        # A bound of about two and a half entries, shared by both models.
        backend.config.prompt_cache_bytes = bound = entry * 5 // 2
        users = [f"Question number {i}: what is {i} times {i}?" for i in range(6)]
        for i, user in enumerate(users):
            _, _, done = await run(backend, req(conversation(user), model=("twin-a", "twin-b")[i % 2]))
            assert 0 < store_bytes(backend) <= bound
            assert sum(len(m.prompt_cache) for m in backend._manager.loaded()) <= 3
        assert backend.stats.prompt_cache_stores >= 6
        await asyncio.sleep(0.05)
        snap = await asyncio.to_thread(_snapshot_when_fresh, backend)
        assert snap.prompt_cache_bytes == store_bytes(backend) and snap.kv_cache_bytes == 0

        # An entry that alone is over the bound is not kept at all.
        await backend.unload_model("twin-a")
        await backend.unload_model("twin-b")
        backend.config.prompt_cache_bytes = entry // 4
        for _ in range(2):
            _, _, done = await run(backend, req(conversation(), model="twin-a"))
            assert done.cached_prompt_tokens == 0 and store_bytes(backend) == 0
    finally:
        await backend.close()


def _snapshot_when_fresh(backend):
    """The MLX thread refreshes its figures after storing; wait for the refresh to land."""
    import time

    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        snap = backend.memory_snapshot()
        if snap.prompt_cache_bytes == store_bytes(backend):
            break
        time.sleep(0.02)
    return snap


async def test_reuse_off_stores_nothing(plain):
    await run(plain, req(conversation()))
    _, _, done = await run(plain, req(conversation()))
    assert done.cached_prompt_tokens == 0
    assert all(m.prompt_cache is None for m in plain._manager.loaded())
    assert plain.memory_snapshot().prompt_cache_bytes == 0
