"""Every vision family the MLX engine serves: a generated tiny model of each, end to end.

For each architecture of ``backends/mlx/vision/families.py`` (Idefics3,
SmolVLM, Gemma 3, LLaVA, PaliGemma, Mistral 3 / Pixtral) the generated model
is loaded through the registry (mlx-vlm's real model and processor), an
image request is answered while a text request decodes in the same batch,
and its greedy answer is the one it gets alone.  The prompt counts the
family's image tokens.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from backends.mlx.backend import MLXBackend
from backends.mlx.vision.families import FAMILIES, GEMMA3_WINDOW
from backends.mlx.vision.testmodel import default_name, write_test_vlm
from backends.types import GenerateRequest, Message, Prompt, Sampling
from mlxgate.config import MLXConfig
from tests.images import png

#: The image tokens one 40 x 28 image is at least, per family (its processor's rule, tiny sizes).
MIN_IMAGE_TOKENS = {
    "idefics3": 5 * 4,  # 2 x 2 crops + a global view, 4 tokens each
    "smolvlm": 5 * 4,
    "gemma3": 4,  # mm_tokens_per_image
    "llava": 16,  # (32 / 8)² patches, the CLS token dropped
    "paligemma": 16,
    "mistral3": 4 * 2,  # 64 x 48 px in 16-px merged patches: 3 rows of 4, less the row breaks
}
IMG = png(40, 28, (200, 30, 30))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-families")
    for arch in FAMILIES:
        write_test_vlm(root, arch=arch)
    return root


@pytest.fixture(scope="module")
async def backend(models_dir):
    mlx = MLXBackend(MLXConfig(models_dir=str(models_dir), hf_cache=str(models_dir / "no-hf"),
                               default_max_tokens=8, bootstrap_test_model=False, max_loaded_models=1))
    try:
        yield mlx
    finally:
        await mlx.close()


async def _answer(b: MLXBackend, req: GenerateRequest):
    events = [e async for e in b.generate(req)]
    return [t for e in events[:-1] for t in e.token_ids], events[-1]


@pytest.mark.parametrize("arch", list(FAMILIES))
async def test_an_image_request_batched_with_text_answers_as_alone(backend, arch):
    model = default_name(arch)
    image = GenerateRequest(model=model, messages=[Message("user", "what is this?", images=[IMG])],
                            sampling=Sampling(temperature=0, max_tokens=6))
    text = GenerateRequest(model=model, messages=[Message("user", "and some text, please")],
                           sampling=Sampling(temperature=0, max_tokens=12))
    alone, alone_done = await _answer(backend, image)  # (loads the model)
    lm = next(m for m in backend._manager.loaded() if m.name == model)
    await asyncio.wrap_future(backend._engine.call(lm.prompt_cache.clear))  # prefill the images again
    text_alone, _ = await _answer(backend, text)
    await asyncio.wrap_future(backend._engine.call(lm.prompt_cache.clear))
    steps = backend.stats.multi_seq_steps
    (ids, done), (text_ids, _) = await asyncio.gather(_answer(backend, image), _answer(backend, text))
    assert len(alone) == 6 and ids == alone, arch
    assert text_ids == text_alone, arch
    assert done.prompt_tokens == alone_done.prompt_tokens
    text_tokens = len(lm.tokenizer.encode("what is this?"))
    assert done.prompt_tokens >= text_tokens + MIN_IMAGE_TOKENS[arch], (arch, done.prompt_tokens)
    assert backend.stats.multi_seq_steps > steps, f"{arch}: the image and text requests never shared a step"
    # A raw prompt: the family's own placeholder goes before the text, once per image.
    raw = GenerateRequest(model=model, prompt=Prompt("describe", raw=True, images=[IMG, IMG]),
                          sampling=Sampling(temperature=0, max_tokens=2))
    _, raw_done = await _answer(backend, raw)
    assert raw_done.prompt_tokens >= 2 * MIN_IMAGE_TOKENS[arch], (arch, raw_done.prompt_tokens)


def test_make_test_model_takes_the_architecture(tmp_path):
    from mlxgate_cli.main import main

    assert main(["make-test-model", str(tmp_path), "--vision", "--arch", "llava"]) == 0
    config = json.loads((tmp_path / "tiny-llava" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "clip_vision_model"
    assert main(["make-test-model", str(tmp_path), "--vision"]) == 0
    assert json.loads((tmp_path / "tiny-vlm" / "config.json").read_text())["model_type"] == "idefics3"


async def test_gemma3_follow_up_turn_from_its_rotating_caches(backend):
    """Gemma 3's sliding-window layers keep rotating caches (the window, 16,
    is shorter than the prompt): the next turn about the same image reuses
    the cached prefix and answers as it does from nothing."""
    model = default_name("gemma3")
    first = [Message("user", "what is this? tell me more about it please", images=[IMG])]
    ids, _ = await _answer(backend, GenerateRequest(model=model, messages=first,
                                                    sampling=Sampling(temperature=0, max_tokens=6)))
    lm = next(m for m in backend._manager.loaded() if m.name == model)
    turn = GenerateRequest(model=model, messages=first + [
        Message("assistant", lm.tokenizer.decode(ids)), Message("user", "and what colour is it?")],
        sampling=Sampling(temperature=0, max_tokens=6))
    warm, warm_done = await _answer(backend, turn)
    await asyncio.wrap_future(backend._engine.call(lm.prompt_cache.clear))
    cold, cold_done = await _answer(backend, turn)
    assert warm_done.cached_prompt_tokens > GEMMA3_WINDOW and cold_done.cached_prompt_tokens == 0
    assert warm == cold
