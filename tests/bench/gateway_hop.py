"""The gateway hop: mlxgate in front of an instant OpenAI-compatible upstream
vs that upstream called directly (issue 12's first table).

Both are driven by the same closed-loop load generator (OpenAI chat, aiohttp)
in this process, so each ratio is measured in one run: added latency p50 and
p99 with one client, requests/s non-streamed with 16 clients, streamed tokens/s
with 16 clients (tokens from the usage each stream reports) and time to first
token.  mlxgate runs as a real ``mlxgate serve`` process (no local engine,
one cloud provider: the instant upstream), as a user would run it.

It is also the ``hop`` section of ``make bench`` (``tests/bench/hop.py``),
which measures the front over the loopback gRPC channel too
(``MLXGATE_FRONT_CHANNEL=grpc``) beside the default in-process one, and the
in-process front with the usage ledger off (``no-ledger``,
``MLXGATE_USAGE_LEDGER=false``): the ledger's bookkeeping must stay off the
request path, so the two should not differ beyond noise.

With ``--baseline-src DIR`` (a ``git archive REV | tar -x -C DIR`` copy) an
mlxgate from that tree is measured beside this one, and with ``--rounds N``
every cell is measured N times, the servers in turn, and the median kept: an
A/B on a shared machine, where the load of other work moves every figure.

    python -m tests.bench.gateway_hop [--seconds 5] [--workers 1] [--channels in-process,grpc,no-ledger]
                                      [--baseline-src DIR] [--rounds 1] [--scenarios one_client,16_streams]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp

from tests.bench.common import cpu_seconds
from tests.bench.instant_upstream import MODEL, InstantUpstream

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
#: A "channel" that is the in-process front with the usage ledger off.
NO_LEDGER = "no-ledger"
#: The server from ``--baseline-src`` (the in-process front of another tree).
BASELINE = "baseline"
#: The loads measured: (name, clients, streamed).
SCENARIOS = (("one_client", 1, False), ("16_clients", 16, False), ("16_streams", 16, True))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def _one(session: aiohttp.ClientSession, url: str) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json=CHAT) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status}")
    return time.perf_counter() - t0


async def _one_stream(session: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    """(time to first content, completion tokens from the usage event)."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            if first is None and b'"content":"tok' in line.replace(b" ", b""):
                first = time.perf_counter() - t0
            if b'"usage":{' in line.replace(b" ", b""):
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = usage.get("completion_tokens", 0) or tokens
    return (first if first is not None else time.perf_counter() - t0), tokens


async def closed_loop(url: str, clients: int, seconds: float, stream: bool,
                      pid: Optional[int] = None) -> dict[str, Any]:
    """``clients`` clients, each sending its next request when the last one
    ended, for ``seconds``; with ``pid``, that server's CPU time per request
    too (steadier than wall-clock figures on a machine doing other work)."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        for _ in range(3):  # warm the connections and the path
            await (_one_stream(session, url) if stream else _one(session, url))

        async def client() -> None:
            nonlocal tokens
            while time.perf_counter() < stop:
                if stream:
                    t, n = await _one_stream(session, url)
                    ttfts.append(t)
                    tokens += n
                else:
                    latencies.append(await _one(session, url))

        cpu0 = cpu_seconds(pid) if pid is not None else 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0 if pid is not None else 0.0
    n = len(ttfts) if stream else len(latencies)
    out: dict[str, Any] = {"requests": n, "requests_per_s": n / elapsed}
    if pid is not None:
        out["server_cpu_ms_per_request"] = cpu * 1e3 / max(n, 1)
    if stream:
        out.update(tokens_per_s=tokens / elapsed, ttft_p50_ms=pct(ttfts, 50) * 1e3)
    else:
        out.update(p50_ms=pct(latencies, 50) * 1e3, p99_ms=pct(latencies, 99) * 1e3)
    return out


def start_mlxgate(
    upstream: InstantUpstream, workers: int, data_dir: str, channel: str = "in-process", src: Optional[Path] = None
) -> tuple[subprocess.Popen, str]:
    """``mlxgate serve`` in front of ``upstream``, from this tree or from the source tree ``src``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env.update(
        MLXGATE_MLX_ENABLED="false",
        OPENAI_BASE_URL=upstream.base_url,
        OPENAI_API_KEY="bench",
        MLXGATE_CLOUD_MODELS=MODEL,
        MLXGATE_DATA_DIR=data_dir,
        MLXGATE_LOG_LEVEL="WARNING",
        MLXGATE_FRONT_CHANNEL="in-process" if channel == NO_LEDGER else channel,
    )
    if channel == NO_LEDGER:
        env["MLXGATE_USAGE_LEDGER"] = "false"
    cmd = [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=src)
    m = re.match(r"mlxgate: HTTP (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("mlxgate serve did not start")
    return proc, m.group(1)


def _median(cells: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(c[k] for c in cells) for k in cells[0]}


async def run(seconds: float, workers: int, channels: tuple[str, ...] = ("in-process",),
              baseline: Optional[Path] = None, rounds: int = 1,
              scenarios: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
    """Direct, then mlxgate with each front channel (and the baseline tree's
    mlxgate), for each load; ``rounds`` times, each cell's median kept."""
    upstream = await InstantUpstream().start()
    direct = f"{upstream.base_url}/chat/completions"
    servers = [(c, *start_mlxgate(upstream, workers, tempfile.mkdtemp(prefix="mlxgate-bench-"), c)) for c in channels]
    if baseline is not None:
        servers.append((BASELINE, *start_mlxgate(upstream, workers, tempfile.mkdtemp(prefix="mlxgate-bench-"),
                                                 src=baseline)))
    loads = [s for s in SCENARIOS if scenarios is None or s[0] in scenarios]
    try:
        result: dict[str, Any] = {"channels": list(channels), "rounds": rounds}
        if baseline is not None:
            result["baseline_src"] = str(baseline)
        for name, clients, stream in loads:
            cells: dict[str, list[dict[str, Any]]] = {}
            for r in range(rounds):
                targets = [("direct", direct, None)] + [
                    ("mlxgate" if channel == channels[0] else f"mlxgate_{channel}", f"{base}/v1/chat/completions",
                     proc.pid) for channel, proc, base in servers]
                # Each round in another order, so no server always follows the same one.
                for key, url, pid in targets[r % len(targets):] + targets[:r % len(targets)]:
                    cells.setdefault(key, []).append(await closed_loop(url, clients, seconds, stream, pid))
            result[name] = {key: _median(runs) for key, runs in cells.items()}
        for key in ["mlxgate"] + ([f"mlxgate_{BASELINE}"] if baseline is not None else []):
            prefix = "" if key == "mlxgate" else f"{BASELINE}_"
            if "one_client" in result:
                one = result["one_client"]
                result[prefix + "added_p50_ms"] = one[key]["p50_ms"] - one["direct"]["p50_ms"]
                result[prefix + "added_p99_ms"] = one[key]["p99_ms"] - one["direct"]["p99_ms"]
            if "16_streams" in result:
                streams = result["16_streams"]
                result[prefix + "added_ttft_ms"] = streams[key]["ttft_p50_ms"] - streams["direct"]["ttft_p50_ms"]
                result[prefix + "tokens_per_s_ratio"] = (streams[key]["tokens_per_s"]
                                                         / max(streams["direct"]["tokens_per_s"], 1e-9))
        return result
    finally:
        for _, proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
        await upstream.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--channels", default="in-process", help="front channels to measure, comma-separated")
    p.add_argument("--baseline-src", type=Path, help="also measure mlxgate from this source tree")
    p.add_argument("--rounds", type=int, default=1, help="measurements of each cell (the median is kept)")
    p.add_argument("--scenarios", default=",".join(s[0] for s in SCENARIOS), help="loads to measure, comma-separated")
    args = p.parse_args()
    r = asyncio.run(run(args.seconds, args.workers, tuple(args.channels.split(",")),
                        args.baseline_src.resolve() if args.baseline_src else None, args.rounds,
                        tuple(args.scenarios.split(","))))
    from tests.bench.hop import table, targets  # the section's tables (hop.py imports this module)

    print(json.dumps(r, indent=2))
    if all(s[0] in r for s in SCENARIOS):
        print(table(r, args.seconds).render())
    print(targets(r).render())


if __name__ == "__main__":
    main()
