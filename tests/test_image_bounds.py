"""Hostile and broken images are cheap to refuse, in every dialect and over gRPC.

Against a real ``mlxgate serve`` process (its RSS is the server's alone): a
30,000 x 30,000 PNG (~100 kB on the wire, 2.7 GB as RGB) is refused from its
header, before anything is decoded; so are images past the byte and pixel
caps, bytes that are no image, formats not accepted, bad base64 and URLs
(not fetched unless MLXGATE_FETCH_IMAGE_URLS=1).  Each refusal is a 400 in the
caller's dialect naming the problem.  Timing bounds are generous (a loaded
2-core box), far above the milliseconds a refusal takes and far below a decode.
"""

from __future__ import annotations

import json
import re
import time

import aiohttp
import grpc
import pytest

from mlxgate import limits
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.images import b64, bomb_png, data_url, png
from tests.mlx_fixtures import TEST_MODEL
from tests.test_request_bounds import MB100, large_body_server


@pytest.fixture(scope="module")
def served(test_model_dir):
    with large_body_server(test_model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png()
    assert len(data) < 200_000
    return data


# One request per dialect carrying one image (bytes), and how its error reads.


def ollama_chat(img: bytes) -> tuple[str, dict]:
    return "/api/chat", {"model": TEST_MODEL, "stream": False,
                         "messages": [{"role": "user", "content": "what is this?", "images": [b64(img)]}]}


def ollama_generate(img: bytes) -> tuple[str, dict]:
    return "/api/generate", {"model": TEST_MODEL, "stream": False, "prompt": "what is this?", "images": [b64(img)]}


def openai_chat(img: bytes) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": TEST_MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": data_url(img), "detail": "low"}}]}]}


def anthropic_messages(img: bytes) -> tuple[str, dict]:
    return "/v1/messages", {"model": TEST_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(img)}},
        {"type": "text", "text": "what is this?"}]}]}


def responses(img: bytes) -> tuple[str, dict]:
    return "/v1/responses", {"model": TEST_MODEL, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": data_url(img)}]}]}


DIALECTS = [ollama_chat, ollama_generate, openai_chat, anthropic_messages, responses]


def message_of(path: str, body: dict) -> str:
    """The error text of a dialect's error body, checking the body's shape."""
    if path.startswith("/api/"):
        assert set(body) == {"error"}, body
        return body["error"]
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"]


async def post(base: str, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.__name__)
async def test_a_30000_square_png_is_refused_from_its_header(served, bomb, dialect) -> None:
    path, body = dialect(bomb)
    # Warm up (the model, Pillow's import) so the figures are the refusal's own.
    assert (await post(served.http, "/api/generate", {"model": TEST_MODEL, "prompt": "", "stream": False}))[0] == 200
    await post(served.http, path, body)
    before = served.rss()
    t0 = time.monotonic()
    status, answer = await post(served.http, path, body)
    took = time.monotonic() - t0
    assert status == 400, answer
    assert re.search(r"images\[0\]: the image has more than \d+ pixels", message_of(path, answer))
    assert took < 1.0, f"took {took:.2f}s"  # a decode alone takes many seconds and 2.7 GB
    grown = await served.settled_growth(before)
    assert grown < MB100, f"RSS grew {grown / 1e6:.0f} MB"


async def test_a_30000_square_png_over_grpc(served, bomb) -> None:
    req = pb.GenerateRequest(model=TEST_MODEL)
    req.chat.messages.add(role=pb.ROLE_USER, content="what?", images=[png(), bomb])
    async with grpc.aio.insecure_channel(served.grpc) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async for _ in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=30):
                pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].images[1]: the image has more than" in ei.value.details()


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "image, problem",
    [
        (b"%PDF-1.4 not an image at all", "images[0]: not an image"),
        (png(fmt="BMP"), "images[0]: unsupported image format BMP; send one of PNG, JPEG, GIF, WEBP"),
        (png(fmt="TIFF"), "images[0]: unsupported image format TIFF"),
        (bomb_png(8_000, 7_000), "images[0]: the image is 8000 x 7000 = 56000000 pixels; at most 50000000"),
        (png()[:12], "images[0]: not an image"),
    ],
    ids=["not-an-image", "bmp", "tiff", "over-the-pixel-cap", "cut-in-the-header"],
)
async def test_bad_images_are_400_naming_the_problem(served, dialect, image, problem) -> None:
    path, body = dialect(image)
    status, answer = await post(served.http, path, body)
    assert status == 400, answer
    assert problem in message_of(path, answer)


async def test_the_byte_cap(served) -> None:
    big = png() + b"\0" * (limits.MAX_IMAGE_BYTES + 1 - len(png()))
    path, body = ollama_chat(big)
    status, answer = await post(served.http, path, body)
    assert status == 400
    assert f"an image may have at most {limits.MAX_IMAGE_BYTES} bytes" in answer["error"]


async def test_the_pixel_cap_of_a_request(served) -> None:
    img = bomb_png(7_000, 7_000)  # 49 Mpx: under the cap of one image
    n = limits.MAX_REQUEST_IMAGE_PIXELS // 49_000_000 + 1
    status, answer = await post(served.http, "/api/chat", {
        "model": TEST_MODEL, "stream": False, "messages": [{"role": "user", "content": "x", "images": [b64(img)] * n}]})
    assert status == 400
    assert f"a request may carry at most {limits.MAX_REQUEST_IMAGE_PIXELS}" in answer["error"]


@pytest.mark.parametrize(
    "path, body, problem",
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["%%%not base64"]}]}, "images[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, "invalid base64"),
        ("/v1/responses", {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "%%%"}]}]}, "invalid base64"),
        ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}]}]}, "base64"),
    ],
)
async def test_bad_base64(served, path, body, problem) -> None:
    status, answer = await post(served.http, path, dict(body, model=TEST_MODEL))
    assert status == 400, answer
    assert problem in message_of(path, answer)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]}),
        ("/v1/responses", {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}),
        ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}]}),
    ],
)
async def test_image_urls_are_not_fetched_by_default(served, path, body) -> None:
    status, answer = await post(served.http, path, dict(body, model=TEST_MODEL))
    assert status == 400, answer
    assert "MLXGATE_FETCH_IMAGE_URLS=1" in message_of(path, answer)


async def test_the_openapi_document_states_the_caps(served) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(served.http + "/openapi.json") as r:
            text = await r.text()
    assert f"at most {limits.MAX_IMAGE_BYTES} bytes and {limits.MAX_IMAGE_PIXELS} pixels" in text
    assert "MLXGATE_FETCH_IMAGE_URLS=1" in text
