"""`make soak`: mixed traffic against a running `mlxgate serve` for a long time.

Starts a real server process on the generated test model, then runs a fixed
number of client workers in a closed loop for ``--minutes``: both HTTP
dialects (streamed and not), gRPC streams, embeddings in both dialects,
model listings, metrics scrapes, and clients that disconnect mid-stream.
Every request has an expected outcome; anything else is a failure.  The
server's RSS is sampled every few seconds, and the slope after warm-up (a
least-squares line, MB per hour) is the leak figure.

Prints one summary (also written to ``.bench/soak.json``).  Goal: 0 failures
and a slope under 5 MB/h.  Not part of ``make test``: it runs for an hour by
default.  Traffic goes to loopback only, and every loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import grpc

from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
ROOT = Path(__file__).resolve().parents[2]


class Soak:
    def __init__(self, http: str, target: str) -> None:
        self.http = http
        self.target = target
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    # ---------------------------------------------------------------- one request of each kind

    async def ollama_chat(self, s: aiohttp.ClientSession) -> None:
        stream = random.random() < 0.5
        body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me something"}], "stream": stream,
                "options": {"num_predict": random.randint(4, 24)}}
        async with s.post(f"{self.http}/api/chat", json=body) as r:
            assert r.status == 200, r.status
            lines = [json.loads(x) for x in (await r.read()).splitlines() if x.strip()]
        assert lines[-1]["done"] is True, lines[-1]

    async def ollama_generate(self, s: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "prompt": "once upon a time", "stream": False, "options": {"num_predict": 8}}
        async with s.post(f"{self.http}/api/generate", json=body) as r:
            assert r.status == 200 and (await r.json())["done"] is True

    async def openai_chat(self, s: aiohttp.ClientSession) -> None:
        stream = random.random() < 0.5
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": stream}
        async with s.post(f"{self.http}/v1/chat/completions", json=body) as r:
            assert r.status == 200, r.status
            text = await r.text()
        if stream:
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")

    async def openai_completion(self, s: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 6}
        async with s.post(f"{self.http}/v1/completions", json=body) as r:
            assert r.status == 200 and (await r.json())["choices"]

    async def embeddings(self, s: aiohttp.ClientSession) -> None:
        if random.random() < 0.5:
            async with s.post(f"{self.http}/api/embed", json={"model": MODEL, "input": ["a", "b c"]}) as r:
                assert r.status == 200 and len((await r.json())["embeddings"]) == 2
        else:
            async with s.post(f"{self.http}/v1/embeddings", json={"model": MODEL, "input": "hello"}) as r:
                assert r.status == 200 and (await r.json())["data"]

    async def disconnect(self, s: aiohttp.ClientSession) -> None:
        """A client that goes away after the first line of a long stream."""
        body = {"model": MODEL, "prompt": "a long story", "options": {"num_predict": 500}}
        async with s.post(f"{self.http}/api/generate", json=body) as r:
            assert r.status == 200
            await r.content.readline()

    async def listings(self, s: aiohttp.ClientSession) -> None:
        for path in ("/api/tags", "/api/ps", "/v1/models", "/metrics"):
            async with s.get(self.http + path) as r:
                assert r.status == 200, (path, r.status)
                await r.read()

    async def bad_request(self, s: aiohttp.ClientSession) -> None:
        """Refusals cost nothing and leak nothing: an unknown model, deep JSON."""
        async with s.post(f"{self.http}/api/chat", json={"model": "no-such-model", "messages": []}) as r:
            assert r.status == 404
        async with s.post(f"{self.http}/v1/chat/completions", data=b"[" * 5000) as r:
            assert r.status == 400

    async def grpc_generate(self, stub: pb_grpc.InferenceServiceStub) -> None:
        req = pb.GenerateRequest(model=MODEL, sampling=pb.SamplingParams(max_tokens=10))
        req.chat.messages.add(role=pb.ROLE_USER, content="hi")
        events = [ev async for ev in stub.Generate(req, timeout=120)]
        assert events[-1].WhichOneof("event") == "done"

    # ---------------------------------------------------------------- loop

    async def worker(self, until: float, stub: pb_grpc.InferenceServiceStub, pause: float) -> None:
        kinds: list[tuple[str, float, Callable[[aiohttp.ClientSession], Awaitable[None]]]] = [
            ("ollama_chat", 3, self.ollama_chat),
            ("ollama_generate", 2, self.ollama_generate),
            ("openai_chat", 3, self.openai_chat),
            ("openai_completion", 1, self.openai_completion),
            ("embeddings", 2, self.embeddings),
            ("disconnect", 1, self.disconnect),
            ("listings", 1, self.listings),
            ("bad_request", 1, self.bad_request),
            ("grpc_generate", 2, lambda s: self.grpc_generate(stub)),
        ]
        weights = [w for _, w, _ in kinds]
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while time.monotonic() < until:
                name, _, fn = random.choices(kinds, weights)[0]
                try:
                    await fn(s)
                    self.ok[name] += 1
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    self.failed[name] += 1
                    self.examples.setdefault(name, f"{type(e).__name__}: {e}"[:300])
                if pause:
                    await asyncio.sleep(random.uniform(0, 2 * pause))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    cov = sum((t - mt) * (r - mr) for t, r in samples)
    return cov / var * 3600 if var else 0.0


async def run(minutes: float, workers: int, warmup_fraction: float, pause: float) -> dict:
    from backends.mlx.testmodel import write_test_model

    work = Path(tempfile.mkdtemp(prefix="mlxgate-soak-"))
    write_test_model(work / "models", MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env["MLXGATE_DATA_DIR"] = str(work / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0",
         "--models-dir", str(work / "models")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", proc.stdout.readline())
        if not m:
            raise SystemExit("mlxgate serve did not start")
        soak = Soak(m.group(1), m.group(2))
        started = time.monotonic()
        until = started + minutes * 60
        samples: list[tuple[float, float]] = []

        async def sample() -> None:
            while time.monotonic() < until:
                samples.append((time.monotonic() - started, rss_mb(proc.pid)))
                await asyncio.sleep(5)

        async with grpc.aio.insecure_channel(soak.target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            await asyncio.gather(sample(), *(soak.worker(until, stub, pause) for _ in range(workers)))
        elapsed = time.monotonic() - started
        after = [s for s in samples if s[0] >= elapsed * warmup_fraction]
        result = {
            "minutes": round(elapsed / 60, 1),
            "workers": workers,
            "mean_pause_s": pause,
            "requests": sum(soak.ok.values()) + sum(soak.failed.values()),
            "failures": sum(soak.failed.values()),
            "by_kind": {
                k: {"ok": soak.ok[k], "failed": soak.failed[k]} for k in sorted(set(soak.ok) | set(soak.failed))
            },
            "failure_examples": soak.examples,
            "rss_mb": {"start": samples[0][1] if samples else 0, "after_warmup": after[0][1] if after else 0,
                       "end": samples[-1][1] if samples else 0, "max": max((r for _, r in samples), default=0)},
            "rss_slope_mb_per_hour_after_warmup": round(slope_mb_per_hour(after), 2),
            "server_alive": proc.poll() is None,
        }
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of the slope")
    p.add_argument("--pause", type=float, default=0.1, help="mean seconds a worker waits between requests")
    args = p.parse_args()
    result = asyncio.run(run(args.minutes, args.workers, args.warmup, args.pause))
    out = ROOT / ".bench" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = result["failures"] == 0 and result["rss_slope_mb_per_hour_after_warmup"] < 5 and result["server_alive"]
    print("soak:", "PASS" if ok else "FAIL", "(goal: 0 failures, RSS slope < 5 MB/h after warm-up)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
