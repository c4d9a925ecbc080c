"""Thinking through the upstream adapters: Ollama (fake and a second mlxgate)
and an OpenAI-compatible cloud (fake)."""

from __future__ import annotations

import pytest

from backends.cloud import CloudBackend
from backends.ollama import OllamaBackend
from backends.types import Chunk, Done, GenerateRequest, Message, Prompt, Sampling
from mlxgate.config import CloudProvider, OllamaConfig
from tests.fakes.ollama_fake import FakeOllama
from tests.fakes.openai_fake import FakeOpenAI
from tests.test_mlx_engine import _tokenizer
from tests.fakes.streams import collect
from tests.test_thinking_engine import ANSWER, SAMPLE, THOUGHT

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fake_ollama():
    f = FakeOllama(thinking=["Let me", " think."])
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def ollama(fake_ollama):
    b = OllamaBackend(OllamaConfig(upstream=fake_ollama.url, first_token_timeout=5, idle_timeout=5,
                                   connect_timeout=1.0))
    yield b
    await b.close()


def split(events) -> tuple[list[str], list[str], Done]:
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert isinstance(events[-1], Done)
    return [c.thinking for c in chunks], [c.text for c in chunks], events[-1]


async def test_ollama_adapter_maps_thinking_lines_and_sends_think(ollama, fake_ollama):
    history = [Message("user", "hi"), Message("assistant", "hello", thinking="greet back"), Message("user", "more")]
    for think in (True, None):
        thinking, text, done = split(await collect(ollama.generate(GenerateRequest(
            model="tiny", messages=history, think=think))))
        assert "".join(thinking) == "Let me think."
        assert "".join(text) == "Hello, world!" and done.finish_reason == "stop"
        body = fake_ollama.requests[-1][1]
        assert body.get("think") is think
        assert body["messages"][1] == {"role": "assistant", "content": "hello", "thinking": "greet back"}

    thinking, text, _ = split(await collect(ollama.generate(GenerateRequest(
        model="tiny", prompt=Prompt("hi"), think=True))))
    assert fake_ollama.paths()[-1] == "/api/generate"
    assert "".join(thinking) == "Let me think." and "".join(text) == "Hello, world!"

    thinking, text, _ = split(await collect(ollama.generate(GenerateRequest(
        model="tiny", prompt=Prompt("hi"), think=False))))
    assert fake_ollama.requests[-1][1]["think"] is False
    assert not any(thinking) and "".join(text) == "Hello, world!"


async def test_ollama_adapter_against_a_second_mlxgate(stack, monkeypatch):
    """A real Ollama-dialect upstream: this mlxgate's own front, the model's tokens forced
    (for every request: the adapter sends no request id to key them by)."""
    import mlx.core as mx

    tok = await _tokenizer(stack.backend)
    forced = tok.encode(SAMPLE, add_special_tokens=False)
    engine = stack.backend.engine
    original = engine.processors_for

    def processors_for(seq):
        procs = original(seq)
        eos, start = min(seq.lm.eos_token_ids), len(seq.prompt_ids)

        def force(tokens, logits):
            i = tokens.shape[0] - start
            hit = mx.arange(logits.shape[-1])[None] == (forced[i] if i < len(forced) else eos)
            return mx.where(hit, mx.zeros_like(logits), mx.full(logits.shape, -1e9, dtype=logits.dtype))

        return procs + [force]

    monkeypatch.setattr(engine, "processors_for", processors_for)
    b = OllamaBackend(OllamaConfig(upstream=stack.base, first_token_timeout=60, idle_timeout=60, connect_timeout=2))
    try:
        req = GenerateRequest(model=stack.model, messages=[Message("user", "6 x 7?")],
                              sampling=Sampling(max_tokens=100), think=True)
        thinking, text, done = split(await collect(b.generate(req)))
    finally:
        await b.close()
    assert "".join(thinking) == THOUGHT and "".join(text) == ANSWER
    assert done.backend == "ollama"


async def test_cloud_adapter_maps_reasoning_content_and_sends_nothing_new():
    fake = FakeOpenAI(reasoning=["Think", "ing."])
    await fake.start()
    cloud = CloudBackend(CloudProvider(name="acme", base_url=fake.base_url, api_key_env="K"), {"K": "k"})
    try:
        history = [Message("user", "hi"), Message("assistant", "yo", thinking="secret"), Message("user", "more")]
        thinking, text, done = split(await collect(cloud.generate(GenerateRequest(
            model="gpt-test", messages=history, think=True))))
    finally:
        await cloud.close()
        await fake.stop()
    assert "".join(thinking) == "Thinking." and "".join(text) == "Hi there"
    assert [t for t in thinking if t] == ["Think", "ing."]  # streamed as deltas
    body = fake.requests[-1][1]
    assert not {"think", "reasoning_effort", "reasoning"} & set(body)
    assert body["messages"][1] == {"role": "assistant", "content": "yo"}
