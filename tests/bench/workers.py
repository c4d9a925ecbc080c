"""Bench section ``workers``: ``mlxgate serve --workers 1`` vs ``--workers 2``
(and, for reference, one process whose front reaches its service over
loopback gRPC, ``MLXGATE_FRONT_CHANNEL=grpc``) in front of an instant
OpenAI-compatible upstream (the gateway-hop harness,
``gateway_hop.py``), so what is measured is the HTTP front and the service,
not a model.

For each worker count, a real ``mlxgate serve`` (no local engine, the
instant upstream as its one cloud provider) is driven by the closed-loop
load generator in this process: requests/s non-streamed with 16 clients and
streamed tokens/s with 16 clients (64 tokens each); the median of
``--reps`` runs, the two servers measured in turn within each run.  Beside
each figure: the CPU the service process (the parent) and the HTTP front
processes used per request, which says where the bottleneck sits.

    python -m tests.bench.run_bench --sections workers [--reps 3]
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.common import Context, Section, Table, cpu_seconds, median
from tests.bench.gateway_hop import closed_loop
from tests.bench.instant_upstream import MODEL, InstantUpstream

CLIENTS = 16
SECONDS = 5.0
#: The servers measured: --workers 1 (the in-process channel), --workers 1
#: with the loopback gRPC channel (what the hop to a service costs, in one
#: process), --workers 2.
CONFIGS = {"1": (1, "in-process"), "1-grpc": (1, "grpc"), "2": (2, "in-process")}


def start_mlxgate(upstream: InstantUpstream, workers: int, channel: str) -> tuple[subprocess.Popen, str]:
    """``mlxgate serve`` with no local engine, the instant upstream its one cloud provider."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env.update(MLXGATE_MLX_ENABLED="false", OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="bench",
               MLXGATE_CLOUD_MODELS=MODEL, MLXGATE_DATA_DIR=tempfile.mkdtemp(prefix="mlxgate-bench-"),
               MLXGATE_LOG_LEVEL="WARNING", MLXGATE_FRONT_CHANNEL=channel, MLXGATE_WORKERS=str(workers))
    proc = subprocess.Popen([sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    m = re.match(r"mlxgate: HTTP (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("mlxgate serve did not start")
    return proc, m.group(1)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def _measure(url: str, pid: int, stream: bool) -> dict[str, Any]:
    """One closed-loop run; the CPU seconds of the parent and of its workers over it."""
    workers = _children(pid)
    parent0, workers0 = cpu_seconds(pid), [cpu_seconds(w) for w in workers]
    r = await closed_loop(url, CLIENTS, SECONDS, stream)
    parent = cpu_seconds(pid) - parent0
    each = [cpu_seconds(w) - c0 for w, c0 in zip(workers, workers0)]
    front = sum(each)
    n = max(1, r["requests"])
    r.update(service_cpu_ms_per_request=parent * 1e3 / n, front_cpu_ms_per_request=front * 1e3 / n,
             # How the kernel spread the 16 connections: each worker's share of the fronts' CPU.
             front_cpu_shares=[round(c / front, 2) if front else 0.0 for c in each])
    return r


async def run(ctx: Context) -> Section:
    upstream = await InstantUpstream().start()
    servers = {}
    try:
        for n, (workers, channel) in CONFIGS.items():
            proc, base = start_mlxgate(upstream, workers, channel)
            servers[n] = (proc, f"{base}/v1/chat/completions")
        runs: dict[str, dict[str, list[dict]]] = {n: {"unary": [], "stream": []} for n in CONFIGS}
        for _ in range(ctx.reps):
            for kind, stream in (("unary", False), ("stream", True)):
                for n in CONFIGS:
                    proc, url = servers[n]
                    runs[n][kind].append(await _measure(url, proc.pid, stream))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        await upstream.stop()

    def med(n: str, kind: str, key: str) -> float:
        return median([r[key] for r in runs[n][kind]])

    results: dict[str, Any] = {"clients": CLIENTS, "seconds": SECONDS, "reps": ctx.reps}
    for n in CONFIGS:
        results[f"workers_{n}"] = {
            "requests_per_s": med(n, "unary", "requests_per_s"),
            "stream_tokens_per_s": med(n, "stream", "tokens_per_s"),
            "unary_service_cpu_ms_per_request": med(n, "unary", "service_cpu_ms_per_request"),
            "unary_front_cpu_ms_per_request": med(n, "unary", "front_cpu_ms_per_request"),
            "stream_service_cpu_ms_per_request": med(n, "stream", "service_cpu_ms_per_request"),
            "stream_front_cpu_ms_per_request": med(n, "stream", "front_cpu_ms_per_request"),
            "runs": runs[n],
        }
    one, hop, two = results["workers_1"], results["workers_1-grpc"], results["workers_2"]
    results["requests_per_s_ratio"] = two["requests_per_s"] / one["requests_per_s"]
    results["stream_tokens_per_s_ratio"] = two["stream_tokens_per_s"] / one["stream_tokens_per_s"]

    def cpu(r: dict, kind: str) -> str:
        return f"{r[f'{kind}_service_cpu_ms_per_request']:.2f} + {r[f'{kind}_front_cpu_ms_per_request']:.2f}"

    table = Table(
        f"HTTP workers: mlxgate serve --workers 1 vs 2, instant upstream, {CLIENTS} clients "
        f"(median of {ctx.reps} x {SECONDS:.0f} s)",
        ["", "--workers 1", "--workers 1, gRPC channel", "--workers 2", "2 / 1"],
        [
            ["requests/s, non-streamed", one["requests_per_s"], hop["requests_per_s"], two["requests_per_s"],
             f"{results['requests_per_s_ratio']:.2f}x"],
            ["streamed tokens/s (64 per request)", one["stream_tokens_per_s"], hop["stream_tokens_per_s"],
             two["stream_tokens_per_s"], f"{results['stream_tokens_per_s_ratio']:.2f}x"],
            ["CPU ms per request, non-streamed: service + fronts", cpu(one, "unary"), cpu(hop, "unary"),
             cpu(two, "unary"), ""],
            ["CPU ms per request, streamed: service + fronts", cpu(one, "stream"), cpu(hop, "stream"),
             cpu(two, "stream"), ""],
        ],
        note="Share of each worker in the fronts' CPU (how the kernel handed out the 16 connections), per run: "
             f"non-streamed {[r['front_cpu_shares'] for r in runs['2']['unary']]}, "
             f"streamed {[r['front_cpu_shares'] for r in runs['2']['stream']]}.\n"
             "--workers 1: front and service in one process, all its CPU counted as service's. The load generator "
             "and the upstream run in the bench process, on the same cores.",
    )
    return Section(results, [table])
