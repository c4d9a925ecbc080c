"""typical_p (Ollama's locally typical sampling), end to end: the official
ollama client -> the front -> the contract -> the MLX engine's sampler; and
the upstream Ollama adapter passes it on.  A value outside (0, 1] is a 400
naming it (INVALID_ARGUMENT for a gRPC caller)."""

from __future__ import annotations

import math

import ollama
import pytest

from backends import accept
from backends.errors import InvalidArgument
from backends.mlx.sampling import apply_typical_p
from backends.ollama.wire import options_json
from backends.types import GenerateRequest, Message, Sampling
from mlxgate.v1 import inference_pb2 as pb
from tests.stack import MODEL

pytestmark = pytest.mark.timeout(120)


def test_the_filter_keeps_the_most_typical_tokens_not_the_most_likely():
    import mlx.core as mx

    probs = [0.4, 0.3, 0.2, 0.1]
    # Entropy 1.28 nats; surprises 0.92, 1.20, 1.61, 2.30: tokens 1 and 2 are
    # the most typical and hold 0.5 together (top_p 0.5 would keep 0 and 1).
    kept = apply_typical_p(mx.log(mx.array([probs])), 0.5)
    assert [math.isfinite(x) for x in kept[0].tolist()] == [False, True, True, False]
    everything = apply_typical_p(mx.log(mx.array([probs])), 1.0)
    assert all(math.isfinite(x) for x in everything[0].tolist())


def test_the_contract_takes_it_and_bounds_it():
    def request(value: float) -> pb.GenerateRequest:
        return pb.GenerateRequest(model="m", prompt=pb.PromptInput(prompt="hi"),
                                  sampling=pb.SamplingParams(typical_p=value))

    assert accept.generate(request(0.25)).sampling.typical_p == 0.25
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(InvalidArgument, match="typical_p"):
            accept.generate(request(bad))


def test_the_ollama_adapter_passes_it_on():
    req = GenerateRequest(model="m", messages=[Message("user", "hi")], sampling=Sampling(typical_p=0.5))
    assert options_json(req)["typical_p"] == 0.5
    assert "typical_p" not in options_json(GenerateRequest(model="m", messages=[Message("user", "hi")]))


async def test_it_reaches_the_engine_through_the_ollama_client(stack):
    client = ollama.AsyncClient(host=stack.base, timeout=60)

    async def text(**options) -> str:
        r = await client.generate(model=MODEL, prompt="Tell me a story", options={"num_predict": 8, **options})
        return r.response

    # A tiny typical_p keeps one token per step: hot sampling with any seed says the same thing.
    answers = {await text(temperature=1.5, typical_p=1e-6, seed=seed) for seed in (1, 2, 3)}
    assert len(answers) == 1
    # Without it, the same hot sampling follows the seed (the filter above did the work).
    assert len({await text(temperature=1.5, seed=seed) for seed in (1, 2, 3)}) > 1

    for bad in (0, 1.5):
        with pytest.raises(ollama.ResponseError) as e:
            await text(typical_p=bad)
        assert e.value.status_code == 400 and "typical_p" in e.value.error
