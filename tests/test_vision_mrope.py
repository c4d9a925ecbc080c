"""Images on a Qwen2-VL (multimodal rotary positions), batched with everything else.

The generated ``tiny-qwen2-vl`` (``mlxgate make-test-model DIR --vision
--arch qwen2_vl``: mlx-vlm's Qwen2-VL with random weights, its real processor
and vision tower) places image tokens on a 2-D grid of rotary positions, so
after an image each sequence decodes at its own position offset
(``backends/mlx/vision/mrope.py``).  The judges: a real ``mlxgate serve``
process and the official ``ollama`` and ``openai`` clients (image and text
requests at once answer what each answers alone; prompt counts include the
image tokens; a follow-up turn reads the image part from the prompt cache),
and an in-process stack (real gRPC and HTTP on ephemeral ports) for what
only the engine's counters show (the requests shared decode steps) and for
clearing the prompt cache.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import ollama
import openai
import pytest
from prometheus_client import CollectorRegistry

from backends.metrics import ServiceMetrics
from backends.mlx.backend import MLXBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import GenerateRequest, Message, Sampling
from gateway.app import create_app, start_http
from mlxgate.config import MLXConfig, ServerConfig
from tests.images import data_url, png

QWEN = "tiny-qwen2-vl"
#: The tiny model's images: sides in multiples of 28 pixels (14-pixel patches,
#: merged 2 x 2) within its bounds are not resized, so an image of W x H
#: pixels is (W / 28) x (H / 28) image tokens, between <|vision_start|> and <|vision_end|>.
SIZES = [(56, 56), (112, 56), (84, 84), (56, 112)]
IMAGES = [png(w, h, (50 * i, 120, 200 - 40 * i)) for i, (w, h) in enumerate(SIZES)]


def image_tokens(i: int) -> int:
    w, h = SIZES[i]
    return (w // 28) * (h // 28)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-models")
    out = subprocess.run([sys.executable, "-m", "mlxgate_cli", "make-test-model", str(root), "--vision",
                          "--arch", "qwen2_vl"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(root / QWEN)
    return root


@pytest.fixture(scope="module")
def served(qwen_dir):
    """A real ``mlxgate serve`` on the models folder: its HTTP base URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0", "--models-dir",
         str(qwen_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", proc.stdout.readline())
        assert m, "mlxgate serve did not start"
        yield m.group(1)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _ask(i: int) -> dict:
    return {"role": "user", "content": f"what is in picture {i}?", "images": [IMAGES[i]]}


GREEDY = {"num_predict": 12, "temperature": 0}
TEXT = {"role": "user", "content": "and a question without any picture, a bit longer than the others"}


# ---------------------------------------------------------------- a real server, the official clients


async def test_image_and_text_requests_at_once_answer_as_alone(served):
    c = ollama.AsyncClient(host=served, timeout=120)
    messages = [[_ask(i)] for i in range(len(IMAGES))] + [[TEXT]]
    alone = [await c.chat(model=QWEN, messages=m, options=GREEDY) for m in messages]
    together = await asyncio.gather(*[c.chat(model=QWEN, messages=m, options=GREEDY) for m in messages])
    assert all(r.eval_count == 12 for r in alone + together)
    assert [r.message.content for r in together] == [r.message.content for r in alone]
    # The answers differ from one image to the next: each row decoded at its own positions.
    assert len({r.message.content for r in alone}) == len(alone)


async def test_prompt_counts_include_the_image_tokens(served):
    c = ollama.AsyncClient(host=served, timeout=120)
    text_only = await c.chat(model=QWEN, messages=[{"role": "user", "content": "what is in picture 2?"}],
                             options={"num_predict": 1})
    with_image = await c.chat(model=QWEN, messages=[_ask(2)], options={"num_predict": 1})
    assert with_image.prompt_eval_count == text_only.prompt_eval_count + image_tokens(2) + 2
    oai = openai.AsyncOpenAI(base_url=served + "/v1", api_key="x")
    r = await oai.chat.completions.create(model=QWEN, max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}},
        {"type": "text", "text": "what is in picture 2?"}]}])
    assert r.usage.prompt_tokens == text_only.prompt_eval_count + image_tokens(0) + image_tokens(1) + 4


async def test_a_raw_prompts_image_is_bracketed_as_the_template_would(served):
    """A raw /api/generate prompt's image gets Qwen's <|vision_start|> and <|vision_end|>
    (M-RoPE finds an image by its start token), as a chat template writes them."""
    c = ollama.AsyncClient(host=served, timeout=120)
    text_only = await c.generate(model=QWEN, prompt="what is it?", raw=True, options={"num_predict": 1})
    with_image = await c.generate(model=QWEN, prompt="what is it?", raw=True, images=[IMAGES[2]],
                                  options={"num_predict": 1})
    assert with_image.prompt_eval_count == text_only.prompt_eval_count + image_tokens(2) + 2


async def test_openai_clients_at_once_answer_as_alone(served):
    oai = openai.AsyncOpenAI(base_url=served + "/v1", api_key="x")

    def parts(i: int) -> list:
        return [{"type": "text", "text": f"describe {i}"},
                {"type": "image_url", "image_url": {"url": data_url(IMAGES[i])}}]

    async def ask(content) -> str:
        r = await oai.chat.completions.create(model=QWEN, max_tokens=10, temperature=0,
                                              messages=[{"role": "user", "content": content}])
        assert r.usage.completion_tokens == 10
        return r.choices[0].message.content

    contents = [parts(i) for i in (3, 1, 0)] + ["hello, no picture here"]
    alone = [await ask(x) for x in contents]
    assert await asyncio.gather(*[ask(x) for x in contents]) == alone


async def test_a_follow_up_turn_reads_the_image_part_from_the_cache(served):
    oai = openai.AsyncOpenAI(base_url=served + "/v1", api_key="x")
    img = png(84, 56, (10, 200, 10))
    first_turn = [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                {"type": "image_url", "image_url": {"url": data_url(img)}}]}]
    first = await oai.chat.completions.create(model=QWEN, max_tokens=4, temperature=0, messages=first_turn)
    follow_up = first_turn + [{"role": "assistant", "content": first.choices[0].message.content},
                              {"role": "user", "content": "and more?"}]
    r = await oai.chat.completions.create(model=QWEN, max_tokens=4, temperature=0, messages=follow_up)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, r.usage  # the whole first turn, its image included


# ---------------------------------------------------------------- in process: the engine's counters


@pytest.fixture(scope="module")
async def qstack(qwen_dir, tmp_path_factory):
    mlx = MLXBackend(MLXConfig(models_dir=str(qwen_dir), hf_cache=str(qwen_dir / "no-hf"), default_max_tokens=8,
                               bootstrap_test_model=False), observer=ServiceMetrics(CollectorRegistry()))
    router = Router([mlx])
    service = await start_inference_service(router, port=0)
    cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0,
                       data_dir=str(tmp_path_factory.mktemp("qwen-data")))
    http = await start_http(create_app(cfg, service.target), cfg.host, 0)
    try:
        yield http.url, mlx
    finally:
        await http.stop()
        await service.stop(grace=1.0)
        await router.close()


async def _forget_prompts(mlx) -> None:
    """Clear the model's prompt cache (on the MLX thread), so a prompt is evaluated in full."""
    for lm in mlx._manager.loaded():
        if lm.prompt_cache is not None:
            await asyncio.wrap_future(mlx._engine.call(lm.prompt_cache.clear))


async def test_image_requests_share_decode_steps_with_text_requests(qstack):
    base, mlx = qstack
    c = ollama.AsyncClient(host=base, timeout=120)
    messages = [[_ask(i)] for i in range(len(IMAGES))] + [[TEXT]]
    alone = []
    for m in messages:
        alone.append((await c.chat(model=QWEN, messages=m, options=GREEDY)).message.content)
        await _forget_prompts(mlx)
    steps = mlx.stats.multi_seq_steps
    together = await asyncio.gather(*[c.chat(model=QWEN, messages=m, options=GREEDY) for m in messages])
    assert [r.message.content for r in together] == alone
    assert mlx.stats.multi_seq_steps > steps
    assert mlx.stats.max_batch_seen >= 3, "image and text requests were never decoded together"


async def test_an_answer_from_the_prompt_cache_is_the_answer_without_it(qstack):
    """The follow-up turn's cache carries the first turn's position offset:
    the answer is the one the whole prompt evaluated afresh gets."""
    base, mlx = qstack
    req = GenerateRequest(model=QWEN, messages=[Message("user", "what is it?", images=[IMAGES[1]])],
                          sampling=Sampling(temperature=0, max_tokens=6))

    async def answer(r: GenerateRequest):
        events = [e async for e in mlx.generate(r)]
        return "".join(e.text for e in events[:-1]), events[-1]

    first, _ = await answer(req)
    follow = GenerateRequest(model=QWEN, sampling=req.sampling, messages=req.messages + [
        Message("assistant", first), Message("user", "tell me more about it")])
    cached_text, cached_done = await answer(follow)
    assert cached_done.cached_prompt_tokens > image_tokens(1)
    await _forget_prompts(mlx)
    fresh_text, fresh_done = await answer(follow)
    assert fresh_done.cached_prompt_tokens == 0
    assert cached_text == fresh_text and cached_done.prompt_tokens == fresh_done.prompt_tokens


async def test_a_text_request_served_from_an_image_conversations_cache_is_at_plain_positions(qstack):
    """A stored image sequence's cache carries its offset; a text request
    that shares only the text before the image starts from it at offset 0."""
    _, mlx = qstack

    async def answer(r: GenerateRequest):
        events = [e async for e in mlx.generate(r)]
        return [t for e in events[:-1] for t in e.token_ids], events[-1]

    text = GenerateRequest(model=QWEN, messages=[Message("user", "what is in the sky today?")],
                           sampling=Sampling(temperature=0, max_tokens=8))
    await _forget_prompts(mlx)
    fresh, fresh_done = await answer(text)
    await _forget_prompts(mlx)
    await answer(GenerateRequest(model=QWEN, messages=[Message("user", "what is it?", images=[IMAGES[3]])],
                                 sampling=Sampling(temperature=0, max_tokens=2)))
    served, served_done = await answer(text)
    assert fresh_done.cached_prompt_tokens == 0 < served_done.cached_prompt_tokens
    assert served == fresh


async def mlx_vlms_answer(b: MLXBackend, model: str, req: GenerateRequest) -> list[int]:
    """The greedy answer of mlx-vlm's own model call on ``req``'s prompt: the
    whole prompt with the pixels, then a token at a time (positions from the
    state the model keeps for its one sequence).  On the MLX thread."""
    from backends.mlx.vision import prompt as vision_prompt

    lm = next(m for m in b._manager.loaded() if m.name == model)
    ids = await asyncio.to_thread(vision_prompt.build, req, lm.vision, model)

    def reference() -> list[int]:
        import mlx.core as mx
        from mlx_vlm.models.cache import KVCache

        vlm = lm.vision.model
        cache = [KVCache() for _ in vlm.layers]
        pixels = {k: mx.array(v) for k, v in ids.pixels.items()}
        logits = vlm(mx.array([list(ids)]), cache=cache, **pixels).logits
        out = []
        for _ in range(req.sampling.max_tokens):
            token = mx.argmax(logits[:, -1, :], axis=-1)
            out.append(int(token.item()))
            logits = vlm.language_model(token[None], cache=cache).logits
        return out

    return await asyncio.wrap_future(b._engine.call(reference))


async def test_an_image_answer_is_mlx_vlms_own(qstack):
    _, mlx = qstack
    req = GenerateRequest(model=QWEN, messages=[Message("user", "what is it?", images=[IMAGES[2]])],
                          sampling=Sampling(temperature=0, max_tokens=8))
    await _forget_prompts(mlx)
    events = [e async for e in mlx.generate(req)]
    assert [t for e in events[:-1] for t in e.token_ids] == await mlx_vlms_answer(mlx, QWEN, req)
    assert events[-1].prompt_tokens > image_tokens(2)


async def test_qwen2_5_vl_image_requests_batched_answer_as_alone_and_as_mlx_vlm(tmp_path):
    """Qwen2.5-VL (its own vision tower, the same positions): image and text
    requests at once answer what each answers alone, which is mlx-vlm's answer."""
    from backends.mlx.vision.testmodel_qwen import write_test_qwen_vl

    write_test_qwen_vl(tmp_path, "tiny-qwen2.5-vl", arch="qwen2_5_vl")
    b = MLXBackend(MLXConfig(models_dir=str(tmp_path), hf_cache=str(tmp_path / "none"), bootstrap_test_model=False,
                             prompt_cache_bytes=0))
    try:
        def req(i: int) -> GenerateRequest:
            images = [IMAGES[i]] if i < len(IMAGES) else []
            return GenerateRequest(model="tiny-qwen2.5-vl", messages=[Message("user", f"what is {i}?", images=images)],
                                   sampling=Sampling(temperature=0, max_tokens=8))

        async def answer(r: GenerateRequest) -> list[int]:
            return [t for e in [e async for e in b.generate(r)][:-1] for t in e.token_ids]

        alone = [await answer(req(i)) for i in range(len(IMAGES) + 1)]
        assert await asyncio.gather(*[answer(req(i)) for i in range(len(IMAGES) + 1)]) == alone
        assert b.stats.max_batch_seen >= 3
        for i in (0, 2):
            assert alone[i] == await mlx_vlms_answer(b, "tiny-qwen2.5-vl", req(i))
    finally:
        await b.close()


async def test_a_quantized_kv_cache_keeps_each_rows_positions(tmp_path, caplog):
    """With ``kv_bits`` (``kv_quant.py``'s cache classes for the layers), the
    position entry stays as it is: image and text requests at once answer
    what each answers alone on the same quantized model."""
    from backends.mlx.kv_quant import KVCacheSettings
    from backends.mlx.vision.testmodel_qwen import write_test_qwen_vl

    write_test_qwen_vl(tmp_path, "wide-qwen", size="tiny-wide-heads")  # 64-wide heads: quantizable
    b = MLXBackend(MLXConfig(models_dir=str(tmp_path), hf_cache=str(tmp_path / "none"), bootstrap_test_model=False,
                             kv_bits=8, prompt_cache_bytes=0))
    try:
        def req(i: int) -> GenerateRequest:
            images = [IMAGES[i]] if i < len(IMAGES) else []
            return GenerateRequest(model="wide-qwen", messages=[Message("user", f"what is {i}?", images=images)],
                                   sampling=Sampling(temperature=0, max_tokens=8))

        async def answer(r: GenerateRequest) -> list[int]:
            return [t for e in [e async for e in b.generate(r)][:-1] for t in e.token_ids]

        alone = [await answer(req(i)) for i in range(len(IMAGES) + 1)]
        assert await asyncio.gather(*[answer(req(i)) for i in range(len(IMAGES) + 1)]) == alone
        lm = next(m for m in b._manager.loaded() if m.name == "wide-qwen")
        assert lm.kv_layers == [KVCacheSettings(bits=8), KVCacheSettings(bits=8), None]
        # Every layer quantized: no "kept at full precision" warning for the positions entry.
        assert not [r for r in caplog.records if r.name == "backends.mlx.kv_quant" and r.levelname == "WARNING"]
        assert b.stats.max_batch_seen >= 3
    finally:
        await b.close()
