"""Polyglot conformance: a Node.js client speaks the gRPC contract.

tests/node/client.mjs uses only the official ``@grpc/grpc-js`` and
``@grpc/proto-loader`` (versions pinned in tests/node/package-lock.json) and
loads proto/mlxgate/v1/inference.proto at run time, as a Node application
would.  It runs against a real grpc.aio server on port 0 in front of the real
MLX engine on the generated model, and prints one JSON object with what it saw;
the tests below judge that object.

The cancelled call is a handshake: the client prints READY-TO-CANCEL after the
first chunk and waits for a line on stdin, so the test can see the sequence in
the engine before it tells the client to ``call.cancel()``.

Needs ``node`` and ``npm`` on PATH; ``npm ci`` runs once when
tests/node/node_modules is missing.  Without them the tests skip, or fail when
the ``CI`` environment variable is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from backends.service import SERVICE_NAME, start_inference_service
from tests.mlx_fixtures import TEST_MODEL
from tests.polling import eventually

NODE_DIR = Path(__file__).resolve().parent / "node"
REPO_ROOT = NODE_DIR.parent.parent
CLIENT = NODE_DIR / "client.mjs"
NPM_CI_TIMEOUT_S = 300.0
CLIENT_TIMEOUT_S = 60.0
READY_MARKER = "READY-TO-CANCEL"

pytestmark = pytest.mark.outside_pypi


def _require_node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        return node, npm
    missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
    reason = f"Node.js polyglot conformance needs {missing} on PATH (Node >= 18 with npm)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


async def _run(*cmd: str, cwd: Path, timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout:.0f}s in {cwd}")
    return proc.returncode or 0, out.decode(errors="replace")


async def _ensure_node_modules(npm: str) -> None:
    # npm writes node_modules/.package-lock.json last, so its presence means a
    # finished install rather than an interrupted one.
    if (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        return
    rc, out = await _run(npm, "ci", "--no-audit", "--no-fund", cwd=NODE_DIR, timeout=NPM_CI_TIMEOUT_S)
    if rc != 0:
        pytest.fail(f"npm ci in {NODE_DIR} failed (exit {rc}):\n{out[-4000:]}")


async def _run_client(node: str, target: str, mlx_backend) -> dict[str, Any]:
    """Run client.mjs, take part in its cancel handshake, return its JSON plus
    what Python saw of the engine around the cancelled call."""
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), target, "--model", TEST_MODEL, "--pause-before-cancel",
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr_lines: list[str] = []
    active_at_cancel: int | None = None

    async def handshake() -> None:
        nonlocal active_at_cancel
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            stderr_lines.append(text)
            if text.endswith(READY_MARKER):
                # The client holds its call open: the sequence must be in flight.
                active_at_cancel = mlx_backend.active_count
                proc.stdin.write(b"cancel\n")
                await proc.stdin.drain()
                break

    async def interact() -> bytes:
        await handshake()
        proc.stdin.close()
        stdout, stderr = await proc.communicate()
        stderr_lines.extend(stderr.decode(errors="replace").splitlines())
        return stdout

    try:
        stdout = await asyncio.wait_for(interact(), CLIENT_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node client timed out after {CLIENT_TIMEOUT_S:.0f}s; stderr:\n" + "\n".join(stderr_lines))

    # Node has exited; its cancelled call must now leave the engine empty.
    await eventually(lambda: mlx_backend.active_count == 0, what="the engine dropping the cancelled call")

    text = stdout.decode(errors="replace").strip()
    diag = f"exit {proc.returncode}; stdout:\n{text}\nstderr:\n" + "\n".join(stderr_lines)
    try:
        result = json.loads(text.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"node client printed no JSON object ({diag})")
    assert proc.returncode == 0 and "error" not in result, f"node client failed: {diag}"
    result["python"] = {"active_at_cancel": active_at_cancel, "active_after_exit": mlx_backend.active_count}
    return result


@pytest.fixture(scope="module")
async def node_results(mlx_backend) -> dict[str, Any]:
    node, npm = _require_node()
    await _ensure_node_modules(npm)
    svc = await start_inference_service(mlx_backend, port=0)
    try:
        return await _run_client(node, svc.target, mlx_backend)
    finally:
        await svc.stop(0)


async def test_node_health_check_reports_serving(node_results) -> None:
    assert node_results["health"] == {"": "SERVING", SERVICE_NAME: "SERVING"}


async def test_node_list_models_names_the_test_model(node_results) -> None:
    models = {m["name"]: m for m in node_results["models"]}
    assert TEST_MODEL in models
    m = models[TEST_MODEL]
    assert m["backend"] == "mlx"
    # int64 as a decimal string (longs: String) and a decoded well-known Timestamp.
    assert int(m["size_bytes"]) > 0
    assert int(m["modified_at"]["seconds"]) > 0


async def test_node_generate_streams_chunks_then_one_done(node_results) -> None:
    gen = node_results["generate"]
    assert gen["status"]["code"] == 0, gen["status"]
    kinds = gen["kinds"]
    assert len(kinds) > 1 and kinds[-1] == "done" and kinds.count("done") == 1
    assert all(k == "chunk" for k in kinds[:-1])
    (done,) = gen["done"]
    assert done["backend"] == "mlx" and done["model"] == TEST_MODEL
    assert done["completion_tokens"] == sum(len(c["token_ids"]) for c in gen["chunks"])
    assert done["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    assert done["prompt_tokens"] > 0 and int(done["total_duration_ns"]) > 0


async def test_node_unknown_model_is_not_found(node_results) -> None:
    nf = node_results["not_found"]
    assert nf["status"]["code"] == 5 and nf["status"]["code_name"] == "NOT_FOUND", nf
    assert TEST_MODEL in nf["status"]["details"]
    assert nf["events"] == 0


async def test_node_cancel_mid_stream_empties_the_engine(node_results) -> None:
    cancel, seen = node_results["cancel"], node_results["python"]
    assert cancel["first_event"] == "chunk"
    assert seen["active_at_cancel"] is not None and seen["active_at_cancel"] >= 1, seen
    assert cancel["status"]["code"] == 1 and cancel["status"]["code_name"] == "CANCELLED", cancel
    assert not cancel["saw_done"]
    assert seen["active_after_exit"] == 0, "the engine still runs the sequence 1 s after the Node client cancelled"
