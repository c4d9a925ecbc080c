"""Claude Code as a judge: the real CLI, in print mode, against mlxgate's
Anthropic Messages API on a generated model, reaching a completed answer.

Claude Code (``@anthropic-ai/claude-code``, pinned in
tests/claude_code/package-lock.json; a native binary installed by ``npm ci``)
runs as ``claude -p hi --model tiny-llama --output-format json`` with
``ANTHROPIC_BASE_URL`` pointing at a real front -> gRPC service -> MLX engine,
telemetry, updates, error reports and non-essential traffic turned off, its
configuration in a temporary HOME, and every proxy variable pointing at a
closed loopback port (``NO_PROXY`` for loopback), so it reaches nothing but
mlxgate.  What it sends is its real request: streaming, adaptive thinking,
context management, its betas, metadata, ``cache_control`` blocks and a
system-role message.

Two things about the generated model, and why this test sizes it so:

- Claude Code's default prompt (its system prompt and a dozen tools, about
  49 KB) is some 35,000 tokens with the test model's small tokenizer: far past
  the default 2,048-token context, and minutes of prefill on a CPU.  The
  suite runs ``--bare --system-prompt ... --tools ""`` (a prompt of about 150
  tokens); gateway/README.md says what the full prompt did by hand.
- Claude Code takes an answer that stops at ``max_tokens`` for an error (it
  asks the model to continue, three times, then fails), and the default test
  model almost never ends its turn.  The model here is the ``ending`` variant
  (``write_test_model(ending=True)``), which ends its turns after a few tokens,
  with an 8,192-token context so that continuations fit; output is capped at
  200 tokens (``CLAUDE_CODE_MAX_OUTPUT_TOKENS``).

Needs ``node`` and ``npm``; without them the test skips, or fails when ``CI``
is set (as tests/test_polyglot_node.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import MLXConfig, ServerConfig
from tests.test_polyglot_node import _require_node, _run

pytestmark = [pytest.mark.timeout(420), pytest.mark.outside_pypi]

PACKAGE_DIR = Path(__file__).resolve().parent / "claude_code"
CLAUDE = PACKAGE_DIR / "node_modules" / ".bin" / "claude"
NPM_CI_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 120.0
KEY = "sk-local-claude-code"
MODEL = "tiny-llama"


async def _ensure_claude_code(npm: str) -> None:
    if not (PACKAGE_DIR / "node_modules" / ".package-lock.json").exists():
        rc, out = await _run(npm, "ci", "--no-audit", "--no-fund", cwd=PACKAGE_DIR, timeout=NPM_CI_TIMEOUT_S)
        if rc != 0:
            pytest.fail(f"npm ci in {PACKAGE_DIR} failed (exit {rc}):\n{out[-4000:]}")
    rc, out = await _run(str(CLAUDE), "--version", cwd=PACKAGE_DIR, timeout=60)
    if rc != 0:
        reason = f"Claude Code does not run on this platform (exit {rc}): {out[-1000:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
async def mlxgate(tmp_path_factory):
    """A front (keys on) over the service over an MLX engine serving the ending
    variant of the test model; yields (url, [(method, path, status)])."""
    from backends.mlx.backend import MLXBackend
    from backends.mlx.testmodel import write_test_model

    root = tmp_path_factory.mktemp("claude-code-models")
    write_test_model(root, MODEL, seed=0, context=8192, ending=True)
    backend = MLXBackend(MLXConfig(models_dir=str(root), hf_cache=str(root / "none"), bootstrap_test_model=False))
    service = await start_inference_service(Router([backend]), port=0)
    seen: list[tuple[str, str, int]] = []

    @web.middleware
    async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        response = await handler(request)
        seen.append((request.method, request.path, response.status))
        return response

    cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=[KEY], request_timeout=120)
    http = await start_http(create_app(cfg, service.target, extra_middlewares=[record]), cfg.host, 0)
    try:
        yield http.url, seen
    finally:
        await http.stop()
        await service.stop(grace=0.5)
        await backend.close()


async def test_claude_code_print_mode_reaches_a_completed_answer(mlxgate, tmp_path):
    node, npm = _require_node()
    await _ensure_claude_code(npm)
    url, seen = mlxgate
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    closed = "http://127.0.0.1:9"  # nothing listens: anything not loopback fails at once
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": KEY,  # sent as x-api-key: the front has keys on
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "200",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "HTTPS_PROXY": closed, "HTTP_PROXY": closed, "https_proxy": closed, "http_proxy": closed,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    proc = await asyncio.create_subprocess_exec(
        str(CLAUDE), "-p", "hi", "--model", MODEL, "--output-format", "json",
        "--bare", "--system-prompt", "You are terse.", "--tools", "",
        cwd=home / "work", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"claude -p did not finish within {RUN_TIMEOUT_S:.0f} s; mlxgate saw {seen}")
    diag = f"exit {proc.returncode}\nstdout: {out.decode(errors='replace')[-3000:]}\nstderr: " \
           f"{err.decode(errors='replace')[-3000:]}\nmlxgate saw: {seen}"
    assert proc.returncode == 0, diag
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["type"] == "result" and result["subtype"] == "success" and result["is_error"] is False, diag
    assert result["stop_reason"] == "end_turn" and result["terminal_reason"] == "completed", diag
    assert isinstance(result["result"], str)
    # Every call went to the Anthropic routes, with the key, and was answered.
    messages = [s for s in seen if s[1] == "/v1/messages"]
    assert messages and all(status == 200 for _, _, status in messages), diag
    assert {path for _, path, _ in seen} <= {"/v1/messages", "/v1/messages/count_tokens"}, diag
