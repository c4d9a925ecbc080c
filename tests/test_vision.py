"""Images on MLX: the generated tiny VLM through every dialect and gRPC, batched.

A real stack (HTTP front -> gRPC service -> router -> MLX engine) over a
models folder with the generated ``tiny-vlm`` (Idefics3, loaded by mlx-vlm:
the real processor, vision tower and batching code) and ``tiny-llama`` (text
only), with a fake upstream Ollama that also has ``tiny-llama`` (the next
backend for images a text model cannot take).  The official ``ollama``,
``openai`` and ``anthropic`` clients are the judges.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import anthropic
import grpc
import ollama
import openai
import pytest
from prometheus_client import CollectorRegistry

from backends.errors import InvalidArgument
from backends.metrics import ServiceMetrics
from backends.mlx.backend import MLXBackend
from backends.mlx.testmodel import write_test_model
from backends.mlx.vision.testmodel import write_test_vlm
from backends.ollama.backend import OllamaBackend
from backends.remote import RemoteBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import GenerateRequest, Message, Sampling
from gateway.app import create_app, start_http
from mlxgate.config import MLXConfig, OllamaConfig, RemoteService, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.ollama_fake import FakeOllama
from tests.images import b64, data_url, png

VLM = "tiny-vlm"
TEXT = "tiny-llama"
ONLY_MLX = "only-text"
#: Image tokens of one image of the tiny VLM: 2 x 2 crops + a global view, 4 tokens each, plus markers.
MIN_IMAGE_TOKENS = 5 * 4


class Stack:
    def __init__(self, base, grpc_target, backend, upstream):
        self.base, self.grpc_target, self.backend, self.upstream = base, grpc_target, backend, upstream


@pytest.fixture(scope="module")
async def vstack(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-models")
    write_test_vlm(root, VLM)
    write_test_model(root, TEXT)
    write_test_model(root, ONLY_MLX, seed=1)
    upstream = FakeOllama(models=[f"{TEXT}:latest"], reply=["a", " red", " square"])
    await upstream.start()
    mlx = MLXBackend(MLXConfig(models_dir=str(root), hf_cache=str(root / "no-hf"), default_max_tokens=8,
                               bootstrap_test_model=False), observer=ServiceMetrics(CollectorRegistry()))
    router = Router([mlx, OllamaBackend(OllamaConfig(upstream=upstream.url, connect_timeout=5.0,
                                                     first_token_timeout=30.0, idle_timeout=30.0))])
    service = await start_inference_service(router, port=0)
    cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0, max_body_bytes=8 * 1024 * 1024,
                       data_dir=str(tmp_path_factory.mktemp("vision-data")))
    http = await start_http(create_app(cfg, service.target), cfg.host, 0)
    try:
        yield Stack(http.url, service.target, mlx, upstream)
    finally:
        await http.stop()
        await service.stop(grace=1.0)
        await router.close()
        await upstream.stop()


IMG = png(40, 28, (200, 30, 30))
OTHER = png(28, 40, (30, 30, 200), fmt="JPEG")


# ---------------------------------------------------------------- every dialect


async def test_ollama_chat_and_generate(vstack):
    c = ollama.AsyncClient(host=vstack.base, timeout=120)
    r = await c.chat(model=VLM, messages=[{"role": "user", "content": "what is this?", "images": [IMG]}],
                     options={"num_predict": 4, "temperature": 0})
    assert r.done and r.message.content and r.eval_count == 4
    assert r.prompt_eval_count > MIN_IMAGE_TOKENS  # image tokens count
    r = await c.generate(model=VLM, prompt="describe", images=[IMG, OTHER], options={"num_predict": 3})
    assert r.done and r.response and r.prompt_eval_count > 2 * MIN_IMAGE_TOKENS
    chunks = [p async for p in await c.generate(model=VLM, prompt="describe", images=[base64.b64encode(IMG).decode()],
                                                 stream=True, options={"num_predict": 3})]
    assert chunks[-1].done and chunks[-1].eval_count == 3


async def test_openai_chat_image_url_parts(vstack):
    c = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    r = await c.chat.completions.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is in these?"},
        {"type": "image_url", "image_url": {"url": data_url(IMG), "detail": "high"}},
        {"type": "image_url", "image_url": {"url": data_url(OTHER, "image/jpeg"), "detail": "low"}},
    ]}])
    assert r.choices[0].message.content and r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens > 2 * MIN_IMAGE_TOKENS
    parts = [{"type": "image_url", "image_url": {"url": data_url(IMG)}}]
    stream = await c.chat.completions.create(model=VLM, max_tokens=3, stream=True,
                                             messages=[{"role": "user", "content": parts}])
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text


async def test_low_detail_costs_fewer_image_tokens(vstack):
    """``detail: "low"`` turns off Idefics3's splitting into crops (one global
    view); "high" and "auto" keep it, in chat and Responses alike."""
    c = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    big = png(600, 400, (120, 60, 200))

    async def prompt_tokens(detail):
        part = {"url": data_url(big)} | ({"detail": detail} if detail else {})
        r = await c.chat.completions.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": part}]}])
        return r.usage.prompt_tokens

    low, high, auto = await prompt_tokens("low"), await prompt_tokens("high"), await prompt_tokens(None)
    assert high == auto and low < high - 3 * 4, (low, high)  # at least three crops of 4 tokens fewer
    assert low > 4  # the global view is still there
    r = await c.responses.create(model=VLM, max_output_tokens=1, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": data_url(big), "detail": "low"}]}])
    assert r.usage.input_tokens == low
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(big), "detail": "medium"}}]}])
    assert "detail" in str(e.value.body.get("param")), e.value.body


async def test_grpc_image_details_are_one_per_image(vstack):
    req = pb.GenerateRequest(model=VLM, sampling=pb.SamplingParams(max_tokens=1))
    req.chat.messages.add(role=pb.ROLE_USER, content="what?", images=[IMG, OTHER],
                          image_details=[pb.IMAGE_DETAIL_LOW])
    async with grpc.aio.insecure_channel(vstack.grpc_target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [ev async for ev in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=60)]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].image_details: give none or one per image (2), got 1" in e.value.details()


async def test_anthropic_image_blocks(vstack):
    c = anthropic.AsyncAnthropic(base_url=vstack.base, api_key="x")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(IMG)}}
    m = await c.messages.create(model=VLM, max_tokens=4, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}])
    assert m.content[0].text and m.usage.output_tokens == 4
    total = m.usage.input_tokens + m.usage.cache_read_input_tokens  # Anthropic counts cache reads apart
    assert total > MIN_IMAGE_TOKENS
    n = await c.messages.count_tokens(model=VLM, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}])
    assert n.input_tokens == total


async def test_responses_input_image(vstack):
    c = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    r = await c.responses.create(model=VLM, max_output_tokens=4, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is it?"}, {"type": "input_image", "image_url": data_url(IMG)}]}])
    assert r.output_text and r.usage.input_tokens > MIN_IMAGE_TOKENS


async def test_grpc_image_bytes(vstack):
    req = pb.GenerateRequest(model=VLM, sampling=pb.SamplingParams(max_tokens=4))
    req.chat.messages.add(role=pb.ROLE_USER, content="what?", images=[IMG, OTHER])
    async with grpc.aio.insecure_channel(vstack.grpc_target) as ch:
        events = [ev async for ev in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=120)]
    done = events[-1].done
    assert done.backend == "mlx" and done.completion_tokens == 4 and done.prompt_tokens > 2 * MIN_IMAGE_TOKENS
    registry = vstack.backend.observer.registry
    two = registry.get_sample_value("mlxgate_request_images_bucket", {"model": VLM, "le": "2.0"})
    one = registry.get_sample_value("mlxgate_request_images_bucket", {"model": VLM, "le": "1.0"})
    assert two - one >= 1  # this request's two images
    assert registry.get_sample_value("mlxgate_image_preprocess_seconds_sum", {"model": VLM}) > 0


async def test_a_corrupt_image_body_is_400(vstack):
    cut = IMG[: len(IMG) - 30]  # the header is whole, the pixel data is not
    c = ollama.AsyncClient(host=vstack.base, timeout=60)
    with pytest.raises(ollama.ResponseError) as e:
        await c.chat(model=VLM, messages=[{"role": "user", "content": "x", "images": [cut]}])
    assert e.value.status_code == 400 and "messages[0].images[0]: the image data is cut short or corrupt" in \
        e.value.error


# ---------------------------------------------------------------- text on a VLM, batching, cache


async def test_text_only_requests_to_a_vlm(vstack):
    c = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    r = await c.chat.completions.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content and r.usage.prompt_tokens < MIN_IMAGE_TOKENS


async def test_image_requests_at_once_share_decode_steps(vstack):
    stats = vstack.backend.stats
    before_multi, before_max = stats.multi_seq_steps, stats.max_batch_seen
    c = ollama.AsyncClient(host=vstack.base, timeout=120)

    async def ask(i: int):
        img = png(30 + i, 20 + i, (40 * i, 100, 0))
        return await c.chat(model=VLM, messages=[{"role": "user", "content": f"image {i}?", "images": [img]}],
                            options={"num_predict": 24, "temperature": 0})

    async def text():
        return await c.chat(model=VLM, messages=[{"role": "user", "content": "and text?"}],
                            options={"num_predict": 24, "temperature": 0})

    answers = await asyncio.gather(*[ask(i) for i in range(6)], text())
    assert all(a.eval_count == 24 for a in answers)
    assert stats.multi_seq_steps > before_multi
    assert stats.max_batch_seen >= 4 or before_max >= 4, "image requests were never decoded together"


async def test_running_streams_keep_decoding_while_images_are_prefilled(vstack):
    """An image prompt is prefilled in chunks the pacer sizes, between decode
    steps of the running streams (not at once while they wait), and its
    greedy answer is the one it gets prefilled at once, alone."""
    b = vstack.backend
    images = [png(50 + i, 30 + i, (60 * i, 20, 200)) for i in range(4)]  # ~100 image tokens: paced
    req = GenerateRequest(model=VLM, messages=[Message("user", "these four?", images=images)],
                          sampling=Sampling(temperature=0, max_tokens=6))

    async def answer():
        events = [e async for e in b.generate(req)]
        return [t for e in events[:-1] for t in e.token_ids], events[-1]

    async def forget_prompts():  # so the image part is prefilled again, not taken from the prompt cache
        if lm.prompt_cache is not None:
            await asyncio.wrap_future(b._engine.call(lm.prompt_cache.clear))

    alone, alone_done = await answer()  # (loads the model)
    lm = next(m for m in b._manager.loaded() if m.name == VLM)
    await forget_prompts()
    alone, alone_done = await answer()
    await forget_prompts()
    progress = [0, 0]

    async def stream(i: int):
        r = GenerateRequest(model=VLM, messages=[Message("user", f"keep talking {i}")],
                            sampling=Sampling(temperature=0, max_tokens=1500))
        async for e in b.generate(r):
            progress[i] += len(getattr(e, "token_ids", ()))

    real_chunk = lm.pacer.chunk
    running = [asyncio.ensure_future(stream(i)) for i in range(2)]
    try:
        while min(progress) < 2:
            await asyncio.sleep(0.01)
        lm.pacer.chunk = lambda decoding, prompts: min(real_chunk(decoding, prompts), 8)
        calls_before, at_send, at_first = b.stats.prefill_calls, list(progress), None
        events = []
        async for e in b.generate(req):
            if at_first is None:
                at_first, calls = list(progress), b.stats.prefill_calls - calls_before
            events.append(e)
        ids, done = [t for e in events[:-1] for t in e.token_ids], events[-1]
        assert ids == alone and done.prompt_tokens == alone_done.prompt_tokens > 4 * MIN_IMAGE_TOKENS
        image_part = done.prompt_tokens - done.cached_prompt_tokens - 1
        assert calls >= image_part // 8, (calls, image_part)
        # Both streams got tokens while the image part went in, not only after it.
        assert all(now - then >= calls // 2 for then, now in zip(at_send, at_first)), (at_send, at_first, calls)
    finally:
        lm.pacer.chunk = real_chunk
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def test_a_follow_up_turn_about_the_same_image_reuses_the_cache(vstack):
    c = ollama.AsyncClient(host=vstack.base, timeout=120)
    img = png(44, 36, (10, 200, 10))
    first = await c.chat(model=VLM, messages=[{"role": "user", "content": "what is it?", "images": [img]}],
                         options={"num_predict": 4, "temperature": 0})
    turn = [{"role": "user", "content": "what is it?", "images": [img]},
            {"role": "assistant", "content": first.message.content}, {"role": "user", "content": "more?"}]
    oai = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    as_openai = [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                              {"type": "image_url", "image_url": {"url": data_url(img)}}]},
                 {"role": "assistant", "content": first.message.content}, {"role": "user", "content": "more?"}]
    r = await oai.chat.completions.create(model=VLM, max_tokens=2, messages=as_openai)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached > MIN_IMAGE_TOKENS, r.usage  # the image's part of the prompt came from the cache
    # The same conversation with another image: only the text before the image is reused.
    other = [dict(turn[0], images=[png(44, 36, (200, 10, 10))])] + turn[1:]
    as_openai[0]["content"][1]["image_url"]["url"] = data_url(png(44, 36, (200, 10, 10)))
    r2 = await oai.chat.completions.create(model=VLM, max_tokens=2, messages=as_openai)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens < MIN_IMAGE_TOKENS, other


# ---------------------------------------------------------------- capabilities, text models


async def test_capabilities_and_family(vstack):
    c = ollama.AsyncClient(host=vstack.base, timeout=60)
    show = await c.show(VLM)
    assert "vision" in show.capabilities and "completion" in show.capabilities
    assert "embedding" not in show.capabilities  # mlx-vlm's models have no embedding path here
    assert "vision" not in (await c.show(ONLY_MLX)).capabilities
    tags = {m.model.removesuffix(":latest"): m for m in (await c.list()).models}
    assert tags[VLM].details.family == "idefics3" and "llama" in tags[VLM].details.families


async def test_a_text_model_given_an_image_goes_to_the_next_backend(vstack):
    before = len(vstack.upstream.requests)
    c = ollama.AsyncClient(host=vstack.base, timeout=60)
    r = await c.chat(model=TEXT, messages=[{"role": "user", "content": "what?", "images": [IMG]}])
    assert r.message.content == "a red square"
    # (the router may have listed the upstream's models first: /api/tags)
    body = next(b for p, b in vstack.upstream.requests[before:] if p == "/api/chat")
    assert body["messages"][0]["images"] == [b64(IMG)]


async def test_a_text_model_given_an_image_with_no_other_backend_is_400(vstack):
    c = openai.AsyncOpenAI(base_url=vstack.base + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=ONLY_MLX, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(IMG)}}]}])
    assert e.value.body["message"] == f"model {ONLY_MLX} does not take images"


async def test_a_remote_service_whose_model_takes_no_images_is_passed_over(vstack):
    """Over gRPC, "does not take images" keeps its retryable kind (the
    ``x-mlxgate-retryable`` trailer): a front whose first backend is a remote
    service with the text model tries the next one; with none, 400 still."""
    remote_service = await start_inference_service(vstack.backend, port=0)  # this MLX engine alone
    remote = RemoteBackend(RemoteService(name="studio", target=remote_service.target))
    upstream = OllamaBackend(OllamaConfig(upstream=vstack.upstream.url, connect_timeout=5.0,
                                          first_token_timeout=30.0, idle_timeout=30.0))
    front = Router([remote, upstream])
    try:
        req = GenerateRequest(model=TEXT, messages=[Message("user", "what?", images=[IMG])])
        events = [e async for e in front.generate(req)]
        assert events[-1].backend == "ollama" and "".join(e.text for e in events[:-1]) == "a red square"
        with pytest.raises(InvalidArgument) as e:
            [e async for e in front.generate(dataclasses.replace(req, model=ONLY_MLX))]
        assert e.value.message == f"remote:studio: model {ONLY_MLX} does not take images"
    finally:
        await front.close()
        await remote_service.stop(grace=1.0)


# ---------------------------------------------------------------- the command line and a real server


def test_make_test_model_vision_and_a_real_server(tmp_path):
    """``mlxgate make-test-model DIR --vision`` then ``mlxgate serve`` on DIR: an image chat."""
    import os
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mlxgate_cli", "make-test-model", str(tmp_path), "--vision"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / VLM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0", "--models-dir",
         str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", proc.stdout.readline())
        assert m, "mlxgate serve did not start"
        c = ollama.Client(host=m.group(1), timeout=120)
        r = c.chat(model=VLM, messages=[{"role": "user", "content": "what is it?", "images": [IMG]}],
                   options={"num_predict": 3})
        assert r.done and r.eval_count == 3 and r.prompt_eval_count > MIN_IMAGE_TOKENS
        assert "vision" in c.show(VLM).capabilities
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
