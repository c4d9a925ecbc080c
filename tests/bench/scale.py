"""Bench section "scale": throughput of one front over 1 vs 2 local
`mlxgate service` processes on the same generated model.

What it measures: a front (the in-process composition `mlxgate serve` runs,
with no local engine and the services as ``[[remote]]`` entries) receives
``requests`` non-streamed /api/generate calls, ``concurrency`` at a time, each
asking for ``tokens`` tokens (greedy, no stop); the figure is completion tokens
per second of wall time, as a client sees it, and the ratio of 2 services to 1.
Every service has the model loaded before the clock starts, so placement
spreads the load over all of them (``backends/routing/placement.py``); the
answer counts per service are reported too.

Reading it: the services here share one machine's cores.  On a box with few
cores (this project's CI has 2) two services compete for the same CPUs the one
already used, so expect a ratio near 1 (or below: two processes, two copies of
the weights, and less batching per engine); the figure says the spreading
works and costs little.  On two real Macs each service has its own GPU and
memory bandwidth, which is what bounds decoding, so the ratio approaches 2 as
long as the traffic is concurrent enough to keep both busy.

Runs on its own (``python -m tests.bench.scale``, ``make bench-scale``) or from
a runner, which calls ``run_section(models_dir, model, ...)`` and gets a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from mlxgate.config import Config, RemoteService, ServerConfig
from mlxgate_cli.stack import start_stack

NAME = "scale"
#: Every prompt differs a little, so no answer comes from a prompt cache.
PROMPT = "Request {i}: tell me a long story about a lighthouse keeper."


def _service_env(data_dir: str, batch: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env.update(MLXGATE_DATA_DIR=data_dir, MLXGATE_HF_CACHE=os.path.join(data_dir, "no-hf-cache"),
               MLXGATE_MAX_BATCH_SIZE=str(batch), MLXGATE_LOG_LEVEL="WARNING")
    return env


async def _start_service(models_dir: Path, data_dir: str, batch: int) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlxgate_cli", "service", "--grpc-port", "0", "--metrics-port", "0",
        "--models-dir", str(models_dir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=_service_env(data_dir, batch),
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    m = re.match(r"mlxgate: gRPC (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"service did not start: {line!r}")
    return proc, m.group(1)


async def _generate(http: aiohttp.ClientSession, base: str, model: str, i: int, tokens: int) -> tuple[str, int]:
    body = {"model": model, "prompt": PROMPT.format(i=i), "stream": False,
            "options": {"num_predict": tokens, "temperature": 0.0}}
    async with http.post(f"{base}/api/generate", json=body) as r:
        r.raise_for_status()
        answer = await r.json()
        return r.headers["x-mlxgate-backend"], int(answer["eval_count"])


async def measure(models_dir: Path, model: str, services: int, tokens: int, concurrency: int,
                  requests: int) -> dict[str, Any]:
    """One front over ``services`` service processes: tokens/s and who answered."""
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="mlxgate-bench-scale-") as tmp:
        try:
            targets = []
            for n in range(services):
                proc, target = await _start_service(models_dir, os.path.join(tmp, f"svc{n}"), concurrency)
                procs.append(proc)
                targets.append(target)
            cfg = Config(server=ServerConfig(port=0, grpc_port=0, request_timeout=3600))
            cfg.mlx.enabled = False
            cfg.remotes = [RemoteService(name=f"s{n}", target=t) for n, t in enumerate(targets)]
            stack = await start_stack(cfg, env={})
            try:
                base = stack.http_url
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
                    # Load the model everywhere (one warm-up answer per service, in
                    # parallel: placement sends the second to the idle one).
                    await asyncio.gather(*(_generate(http, base, model, -1 - n, 1) for n in range(services)))
                    assert stack.router is not None
                    for b in stack.router.backends:
                        await b.load_model(model, -1)
                    await stack.router.list_running()  # placement sees every service warm
                    queue = iter(range(requests))
                    by: Counter[str] = Counter()
                    produced = 0

                    async def client() -> None:
                        nonlocal produced
                        for i in queue:
                            backend, n = await _generate(http, base, model, i, tokens)
                            by[backend] += 1
                            produced += n

                    t0 = time.perf_counter()
                    await asyncio.gather(*(client() for _ in range(concurrency)))
                    wall = time.perf_counter() - t0
            finally:
                await stack.stop()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except asyncio.TimeoutError:
                    proc.kill()
    return {"services": services, "tokens_per_s": produced / wall, "wall_s": wall, "completion_tokens": produced,
            "answers_by_service": dict(sorted(by.items()))}


async def bench(models_dir: Path, model: str, tokens: int = 32, concurrency: int = 8, requests: int = 32,
                counts: Sequence[int] = (1, 2)) -> dict[str, Any]:
    out: dict[str, Any] = {"section": NAME, "model": model, "tokens": tokens, "concurrency": concurrency,
                           "requests": requests, "cpus": os.cpu_count()}
    runs = [await measure(models_dir, model, n, tokens, concurrency, requests) for n in counts]
    out["runs"] = runs
    if len(runs) >= 2 and runs[0]["tokens_per_s"]:
        out["ratio"] = runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"]
    return out


def run_section(models_dir: Path, model: str, **kw: Any) -> dict[str, Any]:
    """What a bench runner calls: the results as a dict (see ``bench``)."""
    return asyncio.run(bench(models_dir, model, **kw))


def ensure_model(size: str, models_dir: Path = Path(".bench/models")) -> tuple[Path, str]:
    """The generated model of ``size`` (written once, as run_bench does)."""
    from backends.mlx.testmodel import write_test_model

    model = f"bench-{size}" if size != "tiny" else "tiny-llama"
    if not (models_dir / model / "config.json").exists():
        write_test_model(models_dir, model, size=size)
    return models_dir, model


def report(result: dict[str, Any]) -> str:
    lines = [f"scale: {result['model']}, {result['requests']} requests of {result['tokens']} tokens, "
             f"{result['concurrency']} at a time, {result['cpus']} CPUs"]
    for r in result["runs"]:
        lines.append(f"  {r['services']} service(s): {r['tokens_per_s']:8.1f} tok/s  ({r['wall_s']:.1f} s; "
                     f"answers {r['answers_by_service']})")
    if "ratio" in result:
        lines.append(f"  ratio {result['runs'][-1]['services']} vs 1: {result['ratio']:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--model", help="model name (with --models-dir)")
    ap.add_argument("--size", default="bench", help="generated model size without --models-dir (tiny, bench)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(".bench/scale.json"))
    args = ap.parse_args(argv)
    if args.models_dir is not None:
        models_dir, model = args.models_dir, args.model or ap.error("--model is required with --models-dir")
    else:
        models_dir, model = ensure_model(args.size)
    result = run_section(models_dir, model, tokens=args.tokens, concurrency=args.concurrency, requests=args.requests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
