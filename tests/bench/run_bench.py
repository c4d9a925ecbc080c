"""`make bench`: speed and memory of the full stack, measured through the
Ollama dialect (what clients see), written to .bench/results.json.

Usage: python -m tests.bench.run_bench [--size tiny|bench|bench-bf16] [--models-dir DIR --model NAME]
Without arguments it generates and benchmarks the ~90M-parameter "bench" model
(random weights, so only speed and memory mean anything); point it at a real
MLX model folder for real-world tokens/s.  Timing goals live here, not in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp

from mlxgate.config import Config, MLXConfig, ServerConfig
from mlxgate_cli.stack import start_stack

LONG_PROMPT = " ".join(f"item {i} is a line of text for the prompt." for i in range(120))


async def generate(session: aiohttp.ClientSession, base: str, model: str, prompt: str, n: int, **kw) -> dict:
    body = {"model": model, "prompt": prompt, "stream": False, "options": {"num_predict": n, "temperature": 0.0,
            **kw}}
    async with session.post(f"{base}/api/generate", json=body) as r:
        r.raise_for_status()
        return await r.json()


async def ttft(session: aiohttp.ClientSession, base: str, model: str, i: int) -> float:
    body = {"model": model, "prompt": f"Hello number {i}, how are you?", "options": {"num_predict": 4}}
    t0 = time.perf_counter()
    async with session.post(f"{base}/api/generate", json=body) as r:
        await r.content.readline()
        first = time.perf_counter() - t0
        await r.read()
    return first


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def run(models_dir: Path, model: str, tokens: int, concurrency: int) -> dict:
    cfg = Config(server=ServerConfig(port=0, grpc_port=0),
                 mlx=MLXConfig(models_dir=str(models_dir), bootstrap_test_model=False, max_batch_size=concurrency))
    stack = await start_stack(cfg, env={})
    base = stack.http_url
    out: dict = {"model": model}
    try:
        async with aiohttp.ClientSession() as s:
            cold = await generate(s, base, model, "Hello", 1)
            out["cold_load_s"] = cold["load_duration"] / 1e9
            single = await generate(s, base, model, "Once upon a time", tokens)
            out["decode_tokens_per_s_single"] = single["eval_count"] / (single["eval_duration"] / 1e9)
            long = await generate(s, base, model, LONG_PROMPT, 1)
            out["prompt_tokens"] = long["prompt_eval_count"]
            out["prefill_tokens_per_s"] = long["prompt_eval_count"] / (long["prompt_eval_duration"] / 1e9)
            t0 = time.perf_counter()
            results = await asyncio.gather(*[
                generate(s, base, model, f"Story number {i}:", tokens) for i in range(concurrency)
            ])
            wall = time.perf_counter() - t0
            total = sum(r["eval_count"] for r in results)
            out["concurrent_streams"] = concurrency
            out["decode_tokens_per_s_aggregate"] = total / wall
            out["batching_speedup"] = out["decode_tokens_per_s_aggregate"] / out["decode_tokens_per_s_single"]
            ttfts = [await ttft(s, base, model, i) for i in range(10)]
            out["ttft_p50_s"] = statistics.median(ttfts)
            out["ttft_max_s"] = max(ttfts)
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
            out["rss_bytes"] = metric(text, "mlxgate_process_resident_memory_bytes")
            out["mlx_peak_bytes"] = metric(text, "mlxgate_mlx_peak_memory_bytes")
            out["model_bytes"] = metric(text, "mlxgate_model_memory_bytes")
    finally:
        await stack.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--model", help="model name (default: bench-<size>)")
    ap.add_argument("--size", default="bench", help="generated model size when --models-dir is not given")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(".bench/results.json"))
    args = ap.parse_args()
    models_dir = args.models_dir
    model = args.model or f"bench-{args.size}"
    if models_dir is None:
        from backends.mlx.testmodel import write_test_model

        models_dir = Path(".bench/models")
        if not (models_dir / model / "config.json").exists():
            write_test_model(models_dir, model, size=args.size)
    result = asyncio.run(run(models_dir, model, args.tokens, args.concurrency))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
