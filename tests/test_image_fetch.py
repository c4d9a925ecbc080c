"""Image URLs fetched when the owner turned it on (MLXGATE_FETCH_IMAGE_URLS=1), within bounds, never SSRF.

A real stack (HTTP front -> gRPC service -> MLX engine with the generated
``tiny-vlm``) and a real local aiohttp server serving images, redirects, a
slow body, a huge body, a page that is no image.  Two fronts on the one
service: one with MLXGATE_FETCH_PRIVATE=1 (the image server is on loopback,
so only it may reach it) and one without (the SSRF guard: every loopback,
private or link-local address refused before a connection is made).  The
official ``openai`` and ``anthropic`` clients are the judges.
"""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from backends.metrics import ServiceMetrics
from backends.mlx.backend import MLXBackend
from backends.mlx.vision.testmodel import write_test_vlm
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from gateway.imagefetch import MAX_REDIRECTS, FetchFailed, ImageFetcher, _Budget, non_public
from mlxgate import limits
from mlxgate.config import MLXConfig, ServerConfig
from tests.images import data_url, png

VLM = "tiny-vlm"
IMG = png(40, 28, (200, 30, 30))
#: Seconds the fronts allow a request's image URLs (the slow server never finishes).
FETCH_TIMEOUT = 2.0


class ImageServer:
    """Serves images and hostile answers; counts the requests it saw."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.hits: list[str] = []
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        name = request.match_info["name"]
        if name == "img.png":
            return web.Response(body=IMG, content_type="image/png")
        if name.startswith("hop"):  # hopN: N redirects, then the image
            n = int(name[3:])
            raise web.HTTPFound("/img.png" if n <= 1 else f"/hop{n - 1}")
        if name == "elsewhere":  # a redirect to the absolute URL in ?to=
            raise web.HTTPFound(request.query["to"])
        if name == "page.html":
            return web.Response(text="<html>no image</html>", content_type="text/html")
        if name == "huge.png":  # a declared length past the cap
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            resp.content_length = limits.MAX_IMAGE_BYTES + 1
            await resp.prepare(request)
            await resp.write(IMG)
            await self.release.wait()
            return resp
        if name == "endless.png":  # chunked, no length, more than the cap
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            block = b"\0" * (1024 * 1024)
            for _ in range(limits.MAX_IMAGE_BYTES // len(block) + 2):
                await resp.write(block)
            return resp
        if name == "slow.png":  # headers at once, the body never
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            await resp.prepare(request)
            await resp.write(IMG[:10])
            await self.release.wait()
            return resp
        if name == "gzip.png":
            return web.Response(body=IMG, headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
        raise web.HTTPNotFound()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


class Stack:
    def __init__(self, open_base: str, guarded_base: str, images: ImageServer) -> None:
        self.open, self.guarded, self.images = open_base, guarded_base, images


@pytest.fixture(scope="module")
async def fstack(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-models")
    write_test_vlm(root, VLM)
    images = ImageServer()
    await images.start()
    mlx = MLXBackend(MLXConfig(models_dir=str(root), hf_cache=str(root / "no-hf"), default_max_tokens=4,
                               bootstrap_test_model=False), observer=ServiceMetrics(CollectorRegistry()))
    service = await start_inference_service(mlx, port=0)
    data = tmp_path_factory.mktemp("fetch-data")
    fronts = []
    for private in (True, False):
        cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0, max_body_bytes=8 * 1024 * 1024,
                           data_dir=str(data / str(private)), fetch_image_urls=True, fetch_private=private,
                           fetch_image_timeout=FETCH_TIMEOUT)
        fronts.append(await start_http(create_app(cfg, service.target), cfg.host, 0))
    try:
        yield Stack(fronts[0].url, fronts[1].url, images)
    finally:
        for f in fronts:
            await f.stop()
        await service.stop(grace=1.0)
        await mlx.close()
        await images.stop()


def chat(url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


# ---------------------------------------------------------------- fetched, in every dialect


async def test_openai_image_url_is_fetched_and_counts_as_the_inline_image(fstack):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x")
    inline = await c.chat.completions.create(model=VLM, max_tokens=2, messages=chat(data_url(IMG)))
    before = len(fstack.images.hits)
    fetched = await c.chat.completions.create(model=VLM, max_tokens=2,
                                              messages=chat(fstack.images.url + "/img.png"))
    assert fstack.images.hits[before:] == ["/img.png"]
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens


async def test_responses_input_image_is_fetched(fstack):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x")
    inline = await c.responses.create(model=VLM, max_output_tokens=2, store=False, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": data_url(IMG)}]}])
    r = await c.responses.create(model=VLM, max_output_tokens=2, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what?"},
        {"type": "input_image", "image_url": fstack.images.url + "/hop2"}]}])
    assert r.usage.input_tokens == inline.usage.input_tokens
    # A later turn reads the stored image; nothing is fetched again.
    before = len(fstack.images.hits)
    again = await c.responses.create(model=VLM, max_output_tokens=2, previous_response_id=r.id, input="and now?")
    assert again.usage.input_tokens > r.usage.input_tokens and fstack.images.hits[before:] == []


async def test_anthropic_url_source_is_fetched(fstack):
    c = anthropic.AsyncAnthropic(base_url=fstack.open, api_key="x")
    image = {"type": "image", "source": {"type": "url", "url": fstack.images.url + "/img.png"}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
    m = await c.messages.create(model=VLM, max_tokens=2, messages=messages)
    n = await c.messages.count_tokens(model=VLM, messages=messages)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n.input_tokens > 20


# ---------------------------------------------------------------- bounds: redirects, time, size, type


async def test_at_most_three_redirects(fstack):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x")
    ok = await c.chat.completions.create(model=VLM, max_tokens=1,
                                         messages=chat(f"{fstack.images.url}/hop{MAX_REDIRECTS}"))
    assert ok.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=VLM, max_tokens=1,
                                        messages=chat(f"{fstack.images.url}/hop{MAX_REDIRECTS + 1}"))
    assert f"more than {MAX_REDIRECTS} redirects" in e.value.body["message"]
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"


async def test_a_redirect_to_another_scheme_is_refused(fstack):
    c = anthropic.AsyncAnthropic(base_url=fstack.open, api_key="x")
    url = f"{fstack.images.url}/elsewhere?to=file:///etc/passwd"
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": url}}]}])
    assert "only http and https URLs are fetched" in e.value.body["error"]["message"]


async def test_a_slow_server_meets_the_time_limit(fstack):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=VLM, max_tokens=1, messages=chat(fstack.images.url + "/slow.png"))
    assert f"not fetched within {FETCH_TIMEOUT:g} s" in e.value.body["message"]


@pytest.mark.parametrize("name, problem", [
    ("huge.png", f"{limits.MAX_IMAGE_BYTES + 1} bytes; an image may have at most {limits.MAX_IMAGE_BYTES}"),
    # 8 MiB of body limit in this stack: the request's images together are cut first.
    ("endless.png", "the request's images together exceed"),
])
async def test_a_huge_body_meets_the_size_limit(fstack, name, problem):
    c = anthropic.AsyncAnthropic(base_url=fstack.open, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": f"{fstack.images.url}/{name}"}}]}])
    assert problem in e.value.body["error"]["message"]


@pytest.mark.parametrize("name, problem", [
    ("page.html", "served as text/html; only image/* is fetched"),
    ("gzip.png", "Content-Encoding gzip"),
    ("missing.png", "status 404"),
])
async def test_what_is_no_image_is_refused(fstack, name, problem):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model=VLM, max_output_tokens=1, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": f"{fstack.images.url}/{name}"}]}])
    assert problem in e.value.body["message"] and e.value.body["param"] == "input[0].content[0].image_url"


async def test_too_many_image_urls_are_refused_before_any_fetch(fstack):
    c = openai.AsyncOpenAI(base_url=fstack.open + "/v1", api_key="x")
    parts = [{"type": "image_url", "image_url": {"url": f"{fstack.images.url}/img.png?{i}"}}
             for i in range(limits.MAX_IMAGES + 1)]
    before = len(fstack.images.hits)
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": parts}])
    assert f"at most {limits.MAX_IMAGES} images" in e.value.body["message"]
    assert len(fstack.images.hits) == before


# ---------------------------------------------------------------- SSRF: no private addresses without FETCH_PRIVATE


@pytest.mark.parametrize("host, problem", [
    ("127.0.0.1:{port}", "127.0.0.1 is a loopback address"),
    ("localhost:{port}", "localhost resolves to"),
    ("[::ffff:127.0.0.1]:{port}", "is a loopback address"),
    ("0.0.0.0:{port}", "0.0.0.0 is an unspecified address"),
    ("169.254.169.254", "169.254.169.254 is a link-local address"),
    ("10.1.2.3", "10.1.2.3 is a private address"),
    ("[fd00::1]", "fd00::1 is a private address"),
    ("224.0.0.1", "224.0.0.1 is a multicast address"),
])
async def test_private_addresses_are_refused_without_fetch_private(fstack, host, problem):
    url = f"http://{host.format(port=fstack.images.port)}/img.png"
    c = openai.AsyncOpenAI(base_url=fstack.guarded + "/v1", api_key="x")
    before = len(fstack.images.hits)
    with pytest.raises(openai.BadRequestError) as e:
        await c.chat.completions.create(model=VLM, max_tokens=1, messages=chat(url))
    message = e.value.body["message"]
    assert problem in message and "MLXGATE_FETCH_PRIVATE=1" in message
    assert len(fstack.images.hits) == before  # never reached


async def test_every_dialect_is_guarded(fstack):
    url = fstack.images.url + "/img.png"
    before = len(fstack.images.hits)
    a = anthropic.AsyncAnthropic(base_url=fstack.guarded, api_key="x")
    with pytest.raises(anthropic.BadRequestError) as e:
        await a.messages.create(model=VLM, max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": url}}]}])
    assert "loopback" in e.value.body["error"]["message"]
    o = openai.AsyncOpenAI(base_url=fstack.guarded + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as e:
        await o.responses.create(model=VLM, max_output_tokens=1, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": url}]}])
    assert "loopback" in e.value.body["message"]
    assert len(fstack.images.hits) == before


# ---------------------------------------------------------------- the fetcher's own checks


async def test_each_redirect_target_is_checked_again():
    """A server the policy allows redirects to one it refuses (127.0.0.2, also
    loopback on Linux): the second connection is never made."""
    allowed, refused = ImageServer("127.0.0.1"), ImageServer("127.0.0.2")
    await allowed.start()
    await refused.start()

    def policy(ip):
        return "test-refused" if str(ip) == "127.0.0.2" else None

    fetcher = ImageFetcher(ServerConfig(fetch_image_urls=True, fetch_image_timeout=FETCH_TIMEOUT), refuse=policy)
    await fetcher.start()
    try:
        data, ctype = await fetcher.fetch(allowed.url + "/hop1", _Budget(1 << 20))
        assert (data, ctype) == (IMG, "image/png")
        with pytest.raises(FetchFailed, match="127.0.0.2 is a test-refused address"):
            await fetcher.fetch(f"{allowed.url}/elsewhere?to={refused.url}/img.png", _Budget(1 << 20))
        assert allowed.hits[-1] == "/elsewhere" and refused.hits == []
    finally:
        await fetcher.close()
        await allowed.stop()
        await refused.stop()


def test_the_default_policy():
    import ipaddress

    for text in ("127.0.0.1", "::1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "fe80::1",
                 "0.0.0.0", "::", "224.0.0.1", "ff02::1", "100.64.0.1", "::ffff:10.0.0.1", "240.0.0.1"):
        assert non_public(ipaddress.ip_address(text)), text
    for text in ("8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"):
        assert non_public(ipaddress.ip_address(text)) is None, text


def test_the_settings():
    from mlxgate.config_load import load_config

    cfg = load_config(env={}).server
    assert (cfg.fetch_image_urls, cfg.fetch_private, cfg.fetch_image_timeout) == (False, False, 10.0)
    cfg = load_config(env={"MLXGATE_FETCH_IMAGE_URLS": "1", "MLXGATE_FETCH_PRIVATE": "1",
                           "MLXGATE_FETCH_IMAGE_TIMEOUT": "2.5"}).server
    assert (cfg.fetch_image_urls, cfg.fetch_private, cfg.fetch_image_timeout) == (True, True, 2.5)
    with pytest.raises(ValueError, match="fetch_image_timeout must be positive"):
        load_config(env={"MLXGATE_FETCH_IMAGE_TIMEOUT": "0"})
