"""Who may call the HTTP front (gateway/security.py, mlxgate/exposure.py).

Real fronts on port 0 over the session's real gRPC service and MLX engine:
the session stack's own front (default configuration), and fronts built here
with keys, origins and allowed hosts, composed as ``mlxgate serve`` composes
them (metrics middleware outside, /metrics route).  The non-loopback refusal
runs the real command line in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from typing import AsyncIterator

import aiohttp
import openai
import pytest
from ollama import AsyncClient, ResponseError
from prometheus_client import CollectorRegistry

from gateway.app import create_app, start_http
from gateway.metrics import HttpMetrics, metrics_handler
from gateway.security import (
    DEFAULT_ORIGINS,
    HOST_VERDICTS_MAX,
    OriginMatcher,
    TrustGuard,
    host_name,
    local_host,
)
from mlxgate.config import Config, ServerConfig
from mlxgate.exposure import exposure_problem, is_loopback

KEY1, KEY2 = "k1-secret-5f0d9c", "k2-secret-8a41b7"
WRONG = "wrong-key-3c9e11"
EVIL = "http://evil.example"
CHAT_BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stream": False,
             "options": {"num_predict": 2}}


@asynccontextmanager
async def front(stack, bind: str = "127.0.0.1", **cfg) -> AsyncIterator[str]:
    """A front over the session's gRPC service, composed like Stack.start_front."""
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    server_cfg = ServerConfig(host=bind, port=0, request_timeout=120.0, max_body_bytes=1024 * 1024, **cfg)
    app = create_app(server_cfg, stack.grpc_target, extra_middlewares=[metrics.middleware])
    app.router.add_get("/metrics", metrics_handler(registry))
    http = await start_http(app, bind, 0)
    try:
        yield f"http://127.0.0.1:{http.port}"
    finally:
        await http.stop()


@pytest.fixture(scope="module")
async def open_front(stack) -> AsyncIterator[str]:
    """No keys; extra origins and hosts configured."""
    async with front(
        stack,
        origins=["https://app.example.com", "https://*.example.org"],
        allowed_hosts=["myhost", "*.trusted.lan"],
    ) as base:
        yield base


@pytest.fixture(scope="module")
async def keyed(stack) -> AsyncIterator[str]:
    async with front(stack, api_keys=[KEY1, KEY2]) as base:
        yield base


@pytest.fixture(scope="module")
async def keyed_public_metrics(stack) -> AsyncIterator[str]:
    async with front(stack, api_keys=[KEY1], metrics_public=True) as base:
        yield base


def assert_ollama_error(body, needle: str = "") -> None:
    assert set(body) == {"error"} and isinstance(body["error"], str) and needle in body["error"]


def assert_openai_error(body, type_: str, needle: str = "") -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == type_ and needle in err["message"]
    return err


# ---------------------------------------------------------------- Host allowlist (DNS rebinding)


async def test_rebinding_host_is_refused_in_both_dialects(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/tags", headers={"Host": "evil.example:11434"}) as r:
            assert r.status == 403
            assert_ollama_error(await r.json(), "MLXGATE_ALLOWED_HOSTS=evil.example")
        async with s.post(stack.base + "/v1/chat/completions", json={}, headers={"Host": "rebind.attacker.net"}) as r:
            assert r.status == 403
            err = assert_openai_error(await r.json(), "permission_error", "MLXGATE_ALLOWED_HOSTS=rebind.attacker.net")
            assert err["code"] == "host_not_allowed"


#: Accepted on a loopback bind with no configuration (Ollama's rule, CVE-2024-28224's fix).
LOCAL_HOSTS = [
    # localhost and *.localhost (RFC 6761), any port, any case, a final dot
    "localhost", "localhost:11434", "LocalHost:1", "localhost.", "app.localhost:3000",
    # *.local (mDNS) and *.internal: Docker's and Podman's names for the host
    "mymac.local", "MyMac.Local:11434", "host.docker.internal", "host.docker.internal:11434",
    "HOST.DOCKER.INTERNAL", "gateway.docker.internal", "host.containers.internal:8080",
    # the machine's own hostname, as the OS reports it and with .local
    socket.gethostname(), socket.gethostname().upper() + ":11434", socket.gethostname() + ".local",
    # IP literals: loopback, private (RFC 1918, unique-local IPv6), unspecified, IPv4-mapped
    "127.0.0.1", "127.0.0.1:8080", "127.8.9.10:5", "[::1]", "[::1]:11434", "0.0.0.0:11434", "[::]",
    "10.0.0.1", "10.255.255.255:11434", "172.16.0.1", "172.31.255.1", "192.168.1.20:11434", "[fd00::1]:11434",
    "[fc00::2]", "[::ffff:192.168.0.7]", "[::ffff:127.0.0.1]:1",
]
#: Refused there: names a public DNS answer can point anywhere, public IP literals.
PUBLIC_HOSTS = [
    "evil.example", "evil.example.com", "localhost.evil.example", "127.0.0.1.nip.io", "host.docker.internal.evil.com",
    "local", "internal", "evil-local", "trusted.lan", "trusted.lan.evil.com", "myhostx", "localhostx:1",
    socket.gethostname() + ".evil.example", "8.8.8.8", "1.1.1.1:11434", "172.32.0.1", "192.169.0.1",
    "192.0.2.1", "100.64.0.1", "169.254.169.254", "[2001:db8::1]:11434", "[2606:4700::1111]", "[fe80::1]",
    "[::ffff:8.8.8.8]",
]


@pytest.mark.parametrize("host", [*LOCAL_HOSTS, "myhost", "myhost:9", "a.trusted.lan", "b.a.trusted.lan:1"])
async def test_loopback_and_allowed_hosts_pass(open_front, host):
    async with aiohttp.ClientSession() as s:
        async with s.get(open_front + "/api/version", headers={"Host": host}) as r:
            assert r.status == 200, host


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
async def test_other_hosts_are_refused(open_front, host):
    async with aiohttp.ClientSession() as s:
        async with s.get(open_front + "/api/version", headers={"Host": host}) as r:
            assert r.status == 403, host
            assert "MLXGATE_ALLOWED_HOSTS" in (await r.json())["error"]


def test_one_host_rule_for_every_front():
    """``TrustGuard.host_allowed`` is the rule; ``local_host`` its built-in part."""
    guard = TrustGuard(ServerConfig(host="127.0.0.1"))
    assert guard.check_host
    for host in LOCAL_HOSTS:
        assert guard.host_allowed(host), host
        assert local_host(host_name(host), guard.machine), host
    for host in PUBLIC_HOSTS:
        assert not guard.host_allowed(host), host
    assert guard.host_allowed("")  # no Host (HTTP/1.0)
    # The machine's name as the OS reports it: with .local (macOS) its short name too.
    mac = TrustGuard(ServerConfig(host="127.0.0.1"), hostname="Jane-MacBook.local")
    assert all(mac.host_allowed(h) for h in ("jane-macbook", "Jane-MacBook:11434", "jane-macbook.local."))
    linux = TrustGuard(ServerConfig(host="127.0.0.1"), hostname="build-7")
    assert linux.host_allowed("build-7") and linux.host_allowed("build-7.local")
    assert not linux.host_allowed("build-8") and not linux.host_allowed("build-7.evil.example")
    # Configured names add to the rule; "*" lets every Host through.
    listed = TrustGuard(ServerConfig(host="127.0.0.1", allowed_hosts=["Api.Example.com", "*.corp.example"]))
    assert listed.host_allowed("api.example.com:443") and listed.host_allowed("x.corp.example")
    assert not listed.host_allowed("corp.example") and not listed.host_allowed("evil.example")
    assert TrustGuard(ServerConfig(host="127.0.0.1", allowed_hosts=["*"])).host_allowed("evil.example")
    # Bound beyond loopback the middleware does not check the Host at all (keys are the guard).
    assert not TrustGuard(ServerConfig(host="0.0.0.0")).check_host


def test_host_verdicts_are_remembered_within_a_bound():
    """The guard remembers each Host's verdict (the same value comes on every
    request); asked again, or after a flood of new values clears the memory,
    the answer is the same, and the memory never outgrows its bound."""
    guard = TrustGuard(ServerConfig(host="127.0.0.1"))
    for _ in range(2):
        assert all(guard.host_allowed(h) for h in LOCAL_HOSTS)
        assert not any(guard.host_allowed(h) for h in PUBLIC_HOSTS)
    for i in range(3 * HOST_VERDICTS_MAX):
        assert guard.host_allowed(f"10.0.{i // 256}.{i % 256}")
        assert not guard.host_allowed(f"rebind-{i}.example")
        assert len(guard._host_verdicts) <= HOST_VERDICTS_MAX
    assert all(guard.host_allowed(h) for h in LOCAL_HOSTS)
    assert not any(guard.host_allowed(h) for h in PUBLIC_HOSTS)


async def test_an_allowed_host_does_not_let_a_foreign_origin_in(stack):
    async with aiohttp.ClientSession() as s:
        headers = {"Host": "host.docker.internal:11434", "Origin": EVIL}
        async with s.get(stack.base + "/api/tags", headers=headers) as r:
            assert r.status == 403
            assert_ollama_error(await r.json(), "Origin")
        headers = {"Host": "host.docker.internal:11434", "Origin": "http://localhost:3000"}
        async with s.get(stack.base + "/api/tags", headers=headers) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


async def test_an_oversized_request_line_is_one_warning_not_a_traceback(stack, caplog):
    """aiohttp answers 400 itself (before any middleware); the log gets one
    WARNING line per such request, never ERROR with the parser's traceback."""
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/tags?q=" + "a" * 10_000) as r:
            assert r.status == 400
        async with s.get(stack.base + "/api/tags", headers={"X-Big": "b" * 10_000}) as r:
            assert r.status == 400
        async with s.get(stack.base + "/api/version") as r:  # and the server goes on
            assert r.status == 200
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING], [r.getMessage() for r in records]
    for record in records:
        assert record.exc_info is None and "\n" not in record.getMessage()
        assert "malformed HTTP request from 127.0.0.1 answered 400" in record.getMessage()
        assert len(record.getMessage()) < 400


async def test_http10_without_host_header_passes(stack):
    port = int(stack.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/version HTTP/1.0\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert b'"version"' in answer


async def test_no_host_check_when_bound_beyond_loopback(stack):
    # Bound to every interface: like Ollama, no Host check (keys are the guard there).
    async with front(stack, bind="0.0.0.0") as base:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/api/version", headers={"Host": "evil.example"}) as r:
                assert r.status == 200


def test_host_name_parsing():
    assert host_name("LOCALHOST:11434") == "localhost"
    assert host_name("[::1]:80") == "[::1]"
    assert host_name("[::1]") == "[::1]"
    assert host_name("example.com.") == "example.com"
    assert host_name("::1") == "::1"  # not valid in Host; kept whole, then refused unless it is an IP literal


# ---------------------------------------------------------------- Origin / CORS


def test_default_origins_follow_ollama():
    m = OriginMatcher(DEFAULT_ORIGINS)
    for ok in ["http://localhost", "https://localhost", "http://localhost:3000", "https://127.0.0.1:8443",
               "http://0.0.0.0:80", "http://127.0.0.1", "app://obsidian.md", "file://", "tauri://localhost",
               "vscode-webview://1a2b", "vscode-file://vscode-app", "HTTP://LOCALHOST:5173"]:
        assert m.allowed(ok), ok
    for bad in ["http://evil.example", "http://localhost.evil.example", "https://127.0.0.1.nip.io", "null",
                "http://10.0.0.5:3000", "chrome-extension://abcdef", ""]:
        assert not m.allowed(bad), bad
    extra = OriginMatcher([*DEFAULT_ORIGINS, "https://*.example.org", "chrome-extension://abc"])
    assert extra.allowed("https://x.example.org") and extra.allowed("chrome-extension://abc")
    assert not extra.allowed("https://example.org.evil.com") and not extra.allowed("http://x.example.org")
    assert OriginMatcher(["*"]).allowed("http://anything.example")


async def engine_idle_prefills(stack) -> int:
    """The engine's prefill count once nothing is queued or running (so that
    no earlier test's leftover can move it while we watch)."""
    for _ in range(600):
        if stack.backend.active_count == 0:
            break
        await asyncio.sleep(0.05)
    assert stack.backend.active_count == 0
    return stack.backend.stats.prefills


async def test_cross_site_text_plain_post_is_refused_before_any_work(stack):
    """The CSRF shape a web page can send without a preflight: refused, and the engine never saw it."""
    prefills = await engine_idle_prefills(stack)
    body = json.dumps(CHAT_BODY)
    async with aiohttp.ClientSession() as s:
        for path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
            async with s.post(stack.base + path, data=body,
                              headers={"Content-Type": "text/plain", "Origin": EVIL}) as r:
                assert r.status == 403, path
                assert "Access-Control-Allow-Origin" not in r.headers
                d = await r.json()
                if path.startswith("/v1/"):
                    assert assert_openai_error(d, "permission_error", EVIL)["code"] == "origin_not_allowed"
                else:
                    assert_ollama_error(d, "MLXGATE_ORIGINS")
        # GET and form posts too: the Origin decides, not the method or content type.
        async with s.get(stack.base + "/api/tags", headers={"Origin": EVIL}) as r:
            assert r.status == 403
        async with s.post(stack.base + "/api/chat", data={"a": "b"}, headers={"Origin": EVIL}) as r:
            assert r.status == 403
    assert stack.backend.stats.prefills == prefills
    assert stack.backend.active_count == 0
    # The control: the same request from an allowed origin (or none) does reach the engine.
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/api/chat", data=body,
                          headers={"Content-Type": "text/plain", "Origin": "http://localhost:3000"}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert stack.backend.stats.prefills > prefills


async def test_refusals_never_read_the_body(keyed):
    """A body over max_body_bytes would be 413 if read: the refusals come first."""
    big = b"x" * (2 * 1024 * 1024)
    async with aiohttp.ClientSession() as s:
        async with s.post(keyed + "/api/chat", data=big) as r:
            assert r.status == 401
        async with s.post(keyed + "/api/chat", data=big, headers={"Origin": EVIL}) as r:
            assert r.status == 403
        async with s.post(keyed + "/api/chat", data=big, headers={"Host": "evil.example"}) as r:
            assert r.status == 403
        # Control: with the key, the body is read and refused for its size.
        async with s.post(keyed + "/api/chat", data=big, headers={"Authorization": f"Bearer {KEY1}"}) as r:
            assert r.status == 413


def _assert_cors(headers, origin: str) -> None:
    assert headers["Access-Control-Allow-Origin"] == origin
    assert any("Origin" in v for v in headers.getall("Vary"))
    exposed = headers["Access-Control-Expose-Headers"].lower()
    assert "x-request-id" in exposed and "x-mlxgate-backend" in exposed and "retry-after" in exposed


@pytest.mark.parametrize("origin", ["http://localhost:5173", "https://app.example.com", "https://ui.example.org",
                                    "vscode-webview://abc"])
async def test_allowed_origin_gets_cors_headers_on_json_errors_and_streams(open_front, stack, origin):
    h = {"Origin": origin}
    async with aiohttp.ClientSession() as s:
        async with s.get(open_front + "/api/tags", headers=h) as r:
            assert r.status == 200
            _assert_cors(r.headers, origin)
        async with s.post(open_front + "/api/show", json={"model": "no-such-model"}, headers=h) as r:
            assert r.status == 404
            _assert_cors(r.headers, origin)
        gen = {"model": stack.model, "prompt": "hi", "options": {"num_predict": 2}}
        async with s.post(open_front + "/api/generate", json=gen, headers=h) as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            _assert_cors(r.headers, origin)
            lines = [json.loads(line) async for line in r.content if line.strip()]
            assert lines[-1]["done"] is True
        chat = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "stream": True}
        async with s.post(open_front + "/v1/chat/completions", json=chat, headers=h) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            _assert_cors(r.headers, origin)
            assert (await r.text()).rstrip().endswith("data: [DONE]")


async def test_requests_without_origin_get_no_cors_headers(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/tags") as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_preflight_allowed_origin(open_front):
    async with aiohttp.ClientSession() as s:
        for path, method in (("/api/chat", "POST"), ("/v1/chat/completions", "POST"), ("/api/tags", "GET"),
                             ("/v1/models/tiny-llama", "GET"), ("/", "GET")):
            async with s.options(open_front + path, headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "content-type,authorization,x-stainless-os",
            }) as r:
                assert r.status == 204, path
                assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                methods = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
                assert {method, "OPTIONS"} <= methods
                assert r.headers["Access-Control-Allow-Headers"] == "content-type,authorization,x-stainless-os"
                assert int(r.headers["Access-Control-Max-Age"]) > 0
                assert "Origin" in r.headers["Vary"]
        # No requested headers: a list that covers what the SDKs send.
        async with s.options(open_front + "/v1/chat/completions", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        }) as r:
            assert r.status == 204
            allowed = r.headers["Access-Control-Allow-Headers"].lower()
            for name in ("authorization", "content-type", "x-api-key", "anthropic-version", "x-stainless-os",
                         "x-request-id"):
                assert name in allowed


async def test_preflight_disallowed_origin_and_plain_options(open_front):
    async with aiohttp.ClientSession() as s:
        async with s.options(open_front + "/api/chat", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 403
            assert "Access-Control-Allow-Origin" not in r.headers
            assert_ollama_error(await r.json(), "MLXGATE_ORIGINS")
        async with s.options(open_front + "/v1/embeddings", headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST"}) as r:
            assert r.status == 403
            assert_openai_error(await r.json(), "permission_error")
        # No Origin: 204 with Allow; an unknown route: 404 in the dialect's shape.
        async with s.options(open_front + "/api/tags") as r:
            assert r.status == 204
            assert {m.strip() for m in r.headers["Allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}
        async with s.options(open_front + "/api/nope") as r:
            assert r.status == 404
            assert_ollama_error(await r.json(), "/api/nope")
        async with s.options(open_front + "/v1/nope", headers={"Origin": "http://localhost"}) as r:
            assert r.status == 404
            assert_openai_error(await r.json(), "invalid_request_error")


async def test_method_not_allowed_carries_allow(stack):
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/api/generate") as r:
            assert r.status == 405
            assert {m.strip() for m in r.headers["Allow"].split(",")} == {"POST", "OPTIONS"}
            assert_ollama_error(await r.json())
        async with s.delete(stack.base + "/v1/models") as r:
            assert r.status == 405
            assert {m.strip() for m in r.headers["Allow"].split(",")} == {"GET", "OPTIONS"}
            assert_openai_error(await r.json(), "invalid_request_error")


# ---------------------------------------------------------------- API keys


ROUTES = [("GET", "/api/tags", "ollama"), ("GET", "/api/version", "ollama"), ("GET", "/v1/models", "openai"),
          ("GET", "/openapi.json", "ollama"), ("GET", "/metrics", "ollama")]


@pytest.mark.parametrize("method, path, dialect", ROUTES)
async def test_keys_missing_wrong_and_right(keyed, method, path, dialect):
    async with aiohttp.ClientSession() as s:
        for headers, why in (({}, "API key required"), ({"Authorization": f"Bearer {WRONG}"}, "invalid API key"),
                             ({"x-api-key": WRONG}, "invalid API key"),
                             ({"Authorization": f"Basic {KEY1}"}, "API key required"),
                             ({"Authorization": "Bearer"}, "API key required")):
            async with s.request(method, keyed + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert r.headers["WWW-Authenticate"] == "Bearer"
                d = await r.json()
                if dialect == "openai":
                    err = assert_openai_error(d, "authentication_error", why)
                    assert err["code"] == "invalid_api_key" and err["param"] is None
                else:
                    assert_ollama_error(d, why)
                assert WRONG not in json.dumps(d) and KEY1 not in json.dumps(d)
        for headers in ({"Authorization": f"Bearer {KEY1}"}, {"Authorization": f"bearer  {KEY2} "},
                        {"x-api-key": KEY2}, {"Authorization": f"Bearer {WRONG}", "x-api-key": KEY1}):
            async with s.request(method, keyed + path, headers=headers) as r:
                assert r.status == 200, (path, headers)


async def test_keys_on_generation_and_unknown_routes(keyed, stack):
    prefills = await engine_idle_prefills(stack)
    async with aiohttp.ClientSession() as s:
        async with s.post(keyed + "/api/chat", json=CHAT_BODY) as r:
            assert r.status == 401
        async with s.post(keyed + "/v1/chat/completions", json=CHAT_BODY, headers={"x-api-key": WRONG}) as r:
            assert r.status == 401
        assert stack.backend.stats.prefills == prefills
        async with s.post(keyed + "/api/chat", json=CHAT_BODY, headers={"x-api-key": KEY1}) as r:
            assert r.status == 200 and (await r.json())["done"] is True
        async with s.get(keyed + "/api/nope") as r:
            assert r.status == 401
        async with s.get(keyed + "/api/nope", headers={"x-api-key": KEY1}) as r:
            assert r.status == 404


async def test_root_stays_open_and_preflight_needs_no_key(keyed):
    async with aiohttp.ClientSession() as s:
        async with s.get(keyed + "/") as r:
            assert r.status == 200 and await r.text() == "Ollama is running"
        async with s.head(keyed + "/") as r:
            assert r.status == 200
        async with s.options(keyed + "/api/chat", headers={
            "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
        # ... but it passes the Origin check,
        async with s.options(keyed + "/api/chat", headers={"Origin": EVIL}) as r:
            assert r.status == 403
        # and a browser app from an allowed origin can read the 401.
        async with s.get(keyed + "/api/tags", headers={"Origin": "http://localhost:8080"}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"


async def test_metrics_public_and_refusals_are_counted(keyed, keyed_public_metrics):
    async with aiohttp.ClientSession() as s:
        async with s.get(keyed_public_metrics + "/metrics") as r:
            assert r.status == 200
        async with s.get(keyed_public_metrics + "/api/tags") as r:
            assert r.status == 401
        # The metrics middleware sits outside the guard: refusals show on the dashboard.
        async with s.get(keyed + "/v1/models", headers={"Authorization": f"Bearer {WRONG}"}) as r:
            assert r.status == 401
        async with s.get(keyed + "/metrics", headers={"Authorization": f"Bearer {KEY1}"}) as r:
            text = await r.text()
    assert re.search(r'mlxgate_http_requests_total\{dialect="openai",route="/v1/models",status="401"\} [1-9]', text)


async def test_openai_client_with_key(keyed, stack):
    good = openai.AsyncOpenAI(base_url=f"{keyed}/v1", api_key=KEY1, max_retries=0, timeout=60)
    bad = openai.AsyncOpenAI(base_url=f"{keyed}/v1", api_key=WRONG, max_retries=0, timeout=60)
    try:
        assert [m.id for m in (await good.models.list()).data] == [stack.model]
        r = await good.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
        assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError) as e:
            await bad.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    finally:
        await good.close()
        await bad.close()


async def test_ollama_client_with_key(keyed, stack):
    good = AsyncClient(host=keyed, headers={"Authorization": f"Bearer {KEY2}"}, timeout=60)
    assert [m.model for m in (await good.list()).models] == [f"{stack.model}:latest"]
    r = await good.generate(model=stack.model, prompt="hi", options={"num_predict": 2})
    assert r.done and r.eval_count == 2
    with pytest.raises(ResponseError) as e:
        await AsyncClient(host=keyed, timeout=60).list()
    assert e.value.status_code == 401 and "API key required" in e.value.error


async def test_keys_never_logged(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as s:
        for headers in ({"Authorization": f"Bearer {KEY1}"}, {"x-api-key": KEY2}, {"Authorization": f"Bearer {WRONG}"},
                        {"x-api-key": WRONG}, {}):
            async with s.get(keyed + "/api/tags", headers=headers) as r:
                await r.read()
        # Through the guard to the service and back (an unknown model).
        async with s.post(keyed + "/api/chat", json={"model": "no-such"}, headers={"x-api-key": KEY1}) as r:
            assert r.status == 404
    assert "refused with 401" in caplog.text  # the refusals are logged (at debug level) ...
    for secret in (KEY1, KEY2, WRONG):
        assert secret not in caplog.text  # ... without any key


# ---------------------------------------------------------------- no open door by accident


def test_is_loopback():
    for h in ["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "::1", "[::1]", "app.localhost",
              "::ffff:127.0.0.1"]:
        assert is_loopback(h), h
    for h in ["0.0.0.0", "", "::", "192.168.1.10", "10.0.0.1", "example.com", "localhost.example.com", "fe80::1"]:
        assert not is_loopback(h), h


def test_exposure_problem():
    def cfg(**kw) -> Config:
        return Config(server=ServerConfig(**kw))

    assert exposure_problem(cfg(), http=True, grpc=True) is None
    msg = exposure_problem(cfg(host="0.0.0.0"), http=True, grpc=True)
    assert msg and "\n" not in msg and "HTTP on 0.0.0.0" in msg and "gRPC" not in msg
    assert "MLXGATE_API_KEYS" in msg and "--api-key" in msg
    assert "MLXGATE_ALLOW_UNAUTHENTICATED=1" in msg and "--allow-unauthenticated" in msg
    assert "gRPC on 0.0.0.0" in exposure_problem(cfg(grpc_host="0.0.0.0"), http=True, grpc=True)
    # Only what the command binds counts: --grpc-target serves HTTP only; `service` gRPC only.
    assert exposure_problem(cfg(grpc_host="0.0.0.0"), http=True, grpc=False) is None
    assert exposure_problem(cfg(host="0.0.0.0"), http=False, grpc=True) is None
    assert exposure_problem(cfg(host="", grpc_host="::"), http=True, grpc=True).count(" on ") == 2
    assert exposure_problem(cfg(host="0.0.0.0", api_keys=["k"]), http=True, grpc=True) is None
    assert exposure_problem(cfg(host="0.0.0.0", api_keys=[" "]), http=True, grpc=True) is not None
    assert exposure_problem(cfg(host="0.0.0.0", allow_unauthenticated=True), http=True, grpc=True) is None


def _clean_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env["MLXGATE_DATA_DIR"] = str(tmp_path / "data")  # never the real home
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "args, env",
    [
        (["serve", "--host", "0.0.0.0"], {}),
        (["serve", "--grpc-host", "0.0.0.0"], {}),
        (["serve"], {"MLXGATE_HOST": "0.0.0.0"}),
        (["serve", "--api-key", ""], {"OLLAMA_HOST": "0.0.0.0:0"}),
        (["service", "--grpc-host", "0.0.0.0"], {}),
    ],
)
def test_non_loopback_without_keys_refuses_to_start(args, env, test_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "mlxgate_cli", *args, "--grpc-port", "0", "--models-dir", str(test_model_dir)]
    if args[0] == "serve":
        cmd += ["--port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(tmp_path, **env), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "MLXGATE_API_KEYS" in lines[0] and "MLXGATE_ALLOW_UNAUTHENTICATED=1" in lines[0]


def _start(args: list[str], test_model_dir, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mlxgate_cli", "serve", "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0",
           "--models-dir", str(test_model_dir), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # printed once both servers listen
    m = re.match(r"mlxgate: HTTP http://0\.0\.0\.0:(\d+)\s", line)
    if not m:
        proc.kill()
        pytest.fail(f"unexpected first line {line!r}; stderr: {proc.communicate(timeout=30)[1]}")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_non_loopback_with_a_key_starts_and_requires_it(test_model_dir, tmp_path):
    proc, base = _start([], test_model_dir, _clean_env(tmp_path, MLXGATE_API_KEYS=f"{KEY1},{KEY2}"))
    try:
        assert _status(base + "/", {}) == 200
        assert _status(base + "/api/tags", {}) == 401
        assert _status(base + "/api/tags", {"Authorization": f"Bearer {KEY2}"}) == 200
    finally:
        err = _stop(proc)
    assert "Traceback" not in err and KEY1 not in err and KEY2 not in err


def test_non_loopback_with_allow_unauthenticated_starts(test_model_dir, tmp_path):
    proc, base = _start(["--allow-unauthenticated"], test_model_dir, _clean_env(tmp_path))
    try:
        assert _status(base + "/api/tags", {}) == 200
    finally:
        err = _stop(proc)
    assert "Traceback" not in err
