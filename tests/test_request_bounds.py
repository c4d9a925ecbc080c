"""What one request may cost: cheap refusals, bounded fields, small errors, the queue bound.

Against the real stack (HTTP front -> gRPC service -> MLX engine on the
generated model, context 2,048 tokens) unless a test needs its own engine;
memory is measured on a real ``mlxgate serve`` process, so the figure is the
server's alone.  Timing bounds are generous (a loaded 2-core box), and far
below what the unbounded code took (tens of seconds, gigabytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import aiohttp
import grpc
import pytest

from backends.errors import ResourceExhausted
from backends.mlx import model_manager
from backends.mlx.backend import MLXBackend
from backends.routing import Router
from backends.service import start_inference_service
from backends.types import GenerateRequest, Message
from gateway.app import create_app, start_http
from mlxgate import limits
from mlxgate.config import MLXConfig, ServerConfig
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.mlx_fixtures import TEST_MODEL
from tests.request_builders import chat_body

CHAT = "/v1/chat/completions"
MB100 = 100 * 1024 * 1024


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Served:
    http: str
    grpc: str
    pid: int

    def rss(self) -> int:
        return rss_of(self.pid)

    async def settled_growth(self, before: int, bound: int = MB100, wait: float = 3.0) -> int:
        """RSS growth once the server handed freed memory back (it trims shortly after a large request)."""
        deadline = time.monotonic() + wait
        grown = self.rss() - before
        while grown >= bound and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            grown = self.rss() - before
        return grown


@contextlib.contextmanager
def large_body_server(models_dir) -> Iterator[Served]:
    """A real ``mlxgate serve`` process taking 40 MB bodies, for its RSS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env["MLXGATE_MAX_BODY_BYTES"] = str(40 * 1024 * 1024)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0",
         "--models-dir", str(models_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", proc.stdout.readline())
        assert m, "mlxgate serve did not start"
        yield Served(m.group(1), m.group(2), proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(test_model_dir):
    with large_body_server(test_model_dir) as server:
        yield server


async def post(base: str, path: str, body, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, json=body, **kw) as r:
            return r.status, await r.json(content_type=None)


def huge_text(mb: int) -> str:
    return ("lorem ipsum dolor sit amet " * (mb * 1024 * 1024 // 27 + 1))[: mb * 1024 * 1024]


# ---------------------------------------------------------------- cheap refusals


@pytest.mark.parametrize(
    "path, body",
    [
        (CHAT, {"messages": [{"role": "user", "content": "PROMPT"}]}),
        ("/api/chat", {"messages": [{"role": "user", "content": "PROMPT"}], "stream": False}),
        ("/api/chat", {"messages": [{"role": "user", "content": "PROMPT"}], "stream": False, "truncate": False}),
        ("/api/generate", {"prompt": "PROMPT", "stream": False, "truncate": False}),
        ("/v1/completions", {"prompt": "PROMPT"}),
    ],
)
async def test_a_25mb_prompt_is_refused_fast_and_small(served, path, body) -> None:
    text = huge_text(25)
    body = dict(body, model=TEST_MODEL)
    if "messages" in body:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    data = json.dumps(body).encode()
    del body, text
    # Warm the model so the figures are the request's own.
    assert (await post(served.http, "/api/generate", {"model": TEST_MODEL, "prompt": "", "stream": False}))[0] == 200
    before = served.rss()
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(served.http + path, data=data, headers={"Content-Type": "application/json"}) as r:
            status, answer = r.status, await r.json(content_type=None)
        took = time.monotonic() - t0
    assert status == 400, answer
    assert "context length exceeded" in str(answer)
    assert took < 3.0, f"took {took:.2f}s"  # 27 s before the bound; ~0.3 s here
    grown = await served.settled_growth(before)
    assert grown < MB100, f"RSS grew {grown / 1e6:.0f} MB"  # 2.5 GB before


async def test_a_30mb_prompt_over_grpc_is_refused_fast(served) -> None:
    req = pb.GenerateRequest(model=TEST_MODEL)
    req.chat.messages.add(role=pb.ROLE_USER, content=huge_text(30))
    before = served.rss()
    async with grpc.aio.insecure_channel(
        served.grpc, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async for _ in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=60):
                pass
        took = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context length exceeded" in ei.value.details()
    assert took < 3.0, f"took {took:.2f}s"  # 62 s before the bound
    grown = await served.settled_growth(before)
    assert grown < MB100, f"RSS grew {grown / 1e6:.0f} MB"  # 4.9 GB before


async def test_a_10mb_embedding_input(served) -> None:
    text = huge_text(10)
    before = served.rss()
    t0 = time.monotonic()
    status, answer = await post(served.http, "/api/embed", {"model": TEST_MODEL, "input": text})
    assert status == 200 and len(answer["embeddings"]) == 1  # cut to the context, as Ollama does
    assert answer["prompt_eval_count"] <= 2048
    status, answer = await post(served.http, "/api/embed", {"model": TEST_MODEL, "input": text, "truncate": False})
    assert status == 400 and "context length" in answer["error"]
    status, answer = await post(served.http, "/v1/embeddings", {"model": TEST_MODEL, "input": text})
    assert status == 400 and "context length" in answer["error"]["message"]
    assert time.monotonic() - t0 < 6.0  # 13 s for the first one alone before the bound
    grown = await served.settled_growth(before)
    assert grown < MB100, f"RSS grew {grown / 1e6:.0f} MB"  # 2 GB before


# ---------------------------------------------------------------- truncation (Ollama's default)


def history(turns: int, words: int = 60) -> list[dict]:
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question {i} " + "word " * words})
        msgs.append({"role": "assistant", "content": f"answer {i} " + "text " * words})
    msgs.append({"role": "user", "content": "and now?"})
    return msgs


async def test_a_history_twice_the_context(stack) -> None:
    msgs = history(40)  # ~5,000 tokens against a 2,048-token context
    status, answer = await post(
        stack.base, "/api/chat", {"model": TEST_MODEL, "messages": msgs, "stream": False, "options": {"num_predict": 4}}
    )
    assert status == 200, answer
    assert answer["prompt_eval_count"] < 2048 and answer["eval_count"] == 4
    status, answer = await post(stack.base, "/api/chat", {"model": TEST_MODEL, "messages": msgs, "stream": False,
                                                           "truncate": False})
    assert status == 400 and "context length exceeded" in answer["error"]
    status, answer = await post(stack.base, CHAT, {"model": TEST_MODEL, "messages": msgs, "max_tokens": 4})
    assert status == 400 and "context length exceeded" in answer["error"]["message"]


async def test_truncation_keeps_system_and_newest_and_counts_it(mlx_backend) -> None:
    from backends.mlx.context import fit

    seen = []

    class Observer:
        def observe_truncation(self, model, messages, tokens):
            seen.append((model, messages))

        def observe_queue_wait(self, model, seconds):
            pass

    old = mlx_backend.observer
    mlx_backend.observer = Observer()
    try:
        msgs = [Message("system", "SYS")] + [
            Message("user" if i % 2 == 0 else "assistant", f"turn {i} " + "w " * 80) for i in range(60)
        ] + [Message("user", "LAST")]
        req = GenerateRequest(model=TEST_MODEL, messages=msgs, truncate=True)
        req.sampling.max_tokens = 2
        events = [ev async for ev in mlx_backend.generate(req)]
        assert events[-1].finish_reason in ("stop", "length")
        assert seen and seen[0][0] == TEST_MODEL and seen[0][1] > 0
    finally:
        mlx_backend.observer = old

    class Counter:
        max_token_chars = 4

        def count(self, text, cap):
            from backends.mlx.context import Count

            n = len(text.split())
            return Count(n, n)

    def render(r):
        return [0] * sum(len(m.content.split()) + 8 for m in r.messages)

    ids, fitted = fit(GenerateRequest(model="m", messages=msgs, truncate=True), Counter(), 500, render, reserve=50)
    kept = fitted.request.messages
    assert kept[0].content == "SYS" and kept[-1].content == "LAST"
    assert len(ids) < 500 and fitted.dropped_messages == len(msgs) - len(kept) > 0
    # The newest messages are the ones kept, in order.
    assert [m.content for m in kept[1:]] == [m.content for m in msgs[len(msgs) - len(kept) + 1:]]


async def test_a_long_generate_prompt_keeps_its_end(stack) -> None:
    prompt = "start " + "filler " * 4000 + "THE END"
    status, answer = await post(stack.base, "/api/generate", {"model": TEST_MODEL, "prompt": prompt, "stream": False,
                                                               "options": {"num_predict": 2}})
    assert status == 200, answer
    assert answer["prompt_eval_count"] < 2048


# ---------------------------------------------------------------- bounded fields


@pytest.mark.parametrize(
    "path, body, needle",
    [
        (CHAT, chat_body(TEST_MODEL, stop=["x"] * (limits.MAX_STOP_SEQUENCES + 1)), "stop"),
        ("/api/chat", chat_body(TEST_MODEL, options={"stop": ["y"] * 100_000}), "stop"),
        (CHAT, chat_body(TEST_MODEL, stop=["z" * (limits.MAX_STOP_CHARS + 1)]), "stop[0]"),
        (CHAT, {"model": TEST_MODEL, "messages": [{"role": "user", "content": "m"}] * (limits.MAX_MESSAGES + 1)},
         "messages"),
        (CHAT, chat_body(TEST_MODEL, tools=[{"type": "function", "function": {"name": f"f{i}"}}
                                for i in range(limits.MAX_TOOLS + 1)]), "tools"),
        ("/api/chat", {"model": TEST_MODEL, "messages": [{"role": "user", "content": "m", "images": ["aGk="] * 40}]},
         "images"),
        (CHAT, chat_body(model="m" * (limits.MAX_MODEL_NAME_CHARS + 1)), "model"),
        ("/api/generate", {"model": "m" * 20_000, "prompt": "hi"}, "model"),
        (CHAT, chat_body(TEST_MODEL, n=limits.MAX_CHOICES + 1), "n"),
    ],
)
async def test_bounded_fields_are_400_naming_the_field(stack, path, body, needle) -> None:
    status, answer = await post(stack.base, path, body)
    assert status == 400, answer
    message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
    assert needle in message
    assert len(message) <= limits.MAX_ERROR_CHARS


@pytest.mark.parametrize("path", ["/api/chat", CHAT])
async def test_deep_json_and_lone_surrogates_are_400(stack, path) -> None:
    async with aiohttp.ClientSession() as s:
        deep = b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        async with s.post(stack.base + path, data=deep) as r:
            assert r.status == 400 and "nested" in await r.text()
        lone = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % TEST_MODEL.encode()
        async with s.post(stack.base + path, data=lone) as r:
            assert r.status == 400 and "Unicode" in await r.text()
        # Deep JSON inside a schema (format / response_format) is refused too, not recursed into.
        schema = {"type": "object"}
        for _ in range(200):
            schema = {"type": "object", "properties": {"a": schema}}
        body = chat_body(TEST_MODEL, format=schema) if path == "/api/chat" else chat_body(
            TEST_MODEL, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        async with s.post(stack.base + path, json=body) as r:
            assert r.status == 400 and "nested" in await r.text()


async def test_grpc_limits_and_deep_json_in_proto_fields(stack) -> None:
    deep = "[" * 5000 + "]" * 5000
    cases = [
        (pb.GenerateRequest(model="m" * 300, prompt=pb.PromptInput(prompt="x")), "model"),
        (pb.GenerateRequest(model=TEST_MODEL, prompt=pb.PromptInput(prompt="x"),
                            sampling=pb.SamplingParams(stop=["s"] * 1000)), "stop"),
        (pb.GenerateRequest(model=TEST_MODEL, prompt=pb.PromptInput(prompt="x"),
                            tools=[pb.Tool(name="f", parameters_json='{"a": ' + deep + "}")]), "nested"),
        (pb.GenerateRequest(model=TEST_MODEL, prompt=pb.PromptInput(prompt="x"),
                            format=pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=deep)), "nested"),
    ]
    async with grpc.aio.insecure_channel(stack.grpc_target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        for req, needle in cases:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in stub.Generate(req, timeout=30):
                    pass
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
            assert needle in ei.value.details()


async def test_a_json_schema_without_type_is_honoured(stack) -> None:
    """gRPC: a schema with the format type unset is a schema, never silently ignored."""
    req = pb.GenerateRequest(
        model=TEST_MODEL,
        prompt=pb.PromptInput(prompt="give me json"),
        format=pb.OutputFormat(json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                           '"required": ["a"], "additionalProperties": false}'),
        sampling=pb.SamplingParams(max_tokens=40, temperature=0),
    )
    text = ""
    async with grpc.aio.insecure_channel(stack.grpc_target) as ch:
        async for ev in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=60):
            if ev.WhichOneof("event") == "chunk":
                text += ev.chunk.text
    import json

    assert text.startswith("{") and '"a"' in text
    if text.endswith("}"):
        assert isinstance(json.loads(text)["a"], int)


# ---------------------------------------------------------------- small errors


async def test_errors_stay_small(stack) -> None:
    name = "n" * limits.MAX_MODEL_NAME_CHARS
    status, answer = await post(stack.base, CHAT, chat_body(model=name))
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert len(answer["error"]["message"]) < 500
    async with grpc.aio.insecure_channel(stack.grpc_target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pb_grpc.InferenceServiceStub(ch).ShowModel(pb.ShowModelRequest(model="x" * 20_000), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_not_found_names_a_few_models() -> None:
    from backends.routing.catalogue import available

    text = available([f"model-{i}" for i in range(500)])
    assert text.count("model-") == limits.MAX_NAMES_IN_ERROR and "490 more" in text


# ---------------------------------------------------------------- the queue bound


async def test_max_pending_holds_for_a_cold_model(test_model_dir, monkeypatch) -> None:
    """40 concurrent requests to a cold model with max_pending 4: 4 admitted, 36 refused at once."""
    gate = threading.Event()
    real_load = model_manager._load_files

    def slow_load(entry):
        gate.wait(30)
        return real_load(entry)

    monkeypatch.setattr(model_manager, "_load_files", slow_load)
    backend = MLXBackend(MLXConfig(models_dir=str(test_model_dir), hf_cache=str(test_model_dir / "none"),
                                   max_pending=4, bootstrap_test_model=False))
    service = await start_inference_service(Router([backend]), port=0)
    cfg = ServerConfig(port=0, request_timeout=60)
    http = await start_http(create_app(cfg, service.target), "127.0.0.1", 0)
    try:
        async def one(i: int) -> tuple[int, dict, str]:
            dialect_path = CHAT if i % 2 else "/api/chat"
            body = chat_body(TEST_MODEL, max_tokens=2, options={"num_predict": 2}, stream=False)
            async with aiohttp.ClientSession() as s:
                async with s.post(http.url + dialect_path, json=body) as r:
                    return r.status, await r.json(content_type=None), r.headers.get("Retry-After", "")

        tasks = [asyncio.create_task(one(i)) for i in range(40)]
        deadline = time.monotonic() + 20
        while sum(t.done() for t in tasks) < 36 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert backend.accepted_count == 4
        gate.set()
        results = await asyncio.gather(*tasks)
        ok = [r for r in results if r[0] == 200]
        busy = [r for r in results if r[0] != 200]
        assert len(ok) == 4 and len(busy) == 36
        assert all(r[2] for r in busy)  # Retry-After
        assert {r[0] for r in busy} == {429, 503}  # OpenAI 429, Ollama 503 "server busy"
        assert backend.accepted_count == 0
        with pytest.raises(ResourceExhausted):
            backend._accepted = 4
            async for _ in backend.generate(GenerateRequest(model=TEST_MODEL, messages=[Message("user", "x")])):
                pass
        backend._accepted = 0
    finally:
        gate.set()
        await http.stop()
        await service.stop(grace=1)
        await backend.close()


# ---------------------------------------------------------------- stop strings stay cheap


def test_stop_strings_cost_does_not_grow_with_text() -> None:
    from backends.mlx.output import StopStrings

    stops = [f"stop-{i}-never" for i in range(limits.MAX_STOP_SEQUENCES)]
    s = StopStrings(stops)
    t0 = time.process_time()
    for _ in range(20_000):
        s.feed("lorem ")
    per_token = (time.process_time() - t0) / 20_000
    assert per_token < 1e-3  # microseconds in practice; the bound only catches quadratic behaviour


def test_the_readme_states_the_enforced_limits() -> None:
    """The README's limits table is the one in mlxgate/limits.py (a changed limit fails here)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## What a request may cost"):readme.index("## Architecture")]
    for name in ("MAX_MODEL_NAME_CHARS", "MAX_STOP_SEQUENCES", "MAX_STOP_CHARS", "MAX_MESSAGES", "MAX_TOOLS",
                 "MAX_TOOL_NAME_CHARS", "MAX_TOOL_CALLS", "MAX_IMAGES", "MAX_EMBED_INPUTS", "MAX_CHOICES",
                 "MAX_TOP_LOGPROBS", "MAX_JSON_DEPTH", "MAX_REQUEST_ID_CHARS", "MAX_ERROR_CHARS",
                 "MAX_NAMES_IN_ERROR"):
        assert f"{getattr(limits, name):,}" in section, name
