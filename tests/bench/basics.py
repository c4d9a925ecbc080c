"""The single-stream figures, through the Ollama API of ``mlxgate serve``:
cold load, decode tokens/s of one stream, prefill tokens/s of a ~2,000-token
prompt, time to first token of a short prompt, and memory (from /metrics).

Runs first, on a fresh server, so the load is a cold one; the engine section
then reuses the server.
"""

from __future__ import annotations

import statistics
import time

import aiohttp

from tests.bench.common import Context, Section, Server, Table, session, start_mlxgate
from tests.bench.engine import BATCH

LONG_PROMPT = " ".join(f"item {i} is a line of text for the prompt." for i in range(120))


async def generate(s: aiohttp.ClientSession, server: Server, prompt: str, n: int) -> dict:
    body = {"model": server.model, "prompt": prompt, "stream": False,
            "options": {"num_predict": n, "temperature": 0.0}}
    async with s.post(f"{server.base}/api/generate", json=body) as r:
        r.raise_for_status()
        return await r.json()


async def ttft(s: aiohttp.ClientSession, server: Server, i: int) -> float:
    body = {"model": server.model, "prompt": f"Hello number {i}, how are you?", "options": {"num_predict": 4}}
    t0 = time.perf_counter()
    async with s.post(f"{server.base}/api/generate", json=body) as r:
        await r.content.readline()
        first = time.perf_counter() - t0
        await r.read()
    return first


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def run(ctx: Context) -> Section:
    server = ctx.servers.get("mlxgate") or start_mlxgate(ctx, {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)})
    ctx.servers["mlxgate"] = server
    out: dict = {}
    async with session() as s:
        cold = await generate(s, server, "Hello", 1)
        out["cold_load_s"] = cold["load_duration"] / 1e9
        single = await generate(s, server, "Once upon a time", ctx.tokens)
        out["decode_tokens_per_s_single"] = single["eval_count"] / (single["eval_duration"] / 1e9)
        long = await generate(s, server, LONG_PROMPT, 1)
        out["prompt_tokens"] = long["prompt_eval_count"]
        out["prefill_tokens_per_s"] = long["prompt_eval_count"] / (long["prompt_eval_duration"] / 1e9)
        ttfts = [await ttft(s, server, i) for i in range(10)]
        out["ttft_p50_s"] = statistics.median(ttfts)
        out["ttft_max_s"] = max(ttfts)
        async with s.get(f"{server.base}/metrics") as r:
            text = await r.text()
        out["rss_bytes"] = metric(text, "mlxgate_process_resident_memory_bytes")
        out["mlx_peak_bytes"] = metric(text, "mlxgate_mlx_peak_memory_bytes")
        out["model_bytes"] = metric(text, "mlxgate_model_memory_bytes")
    mb = 1e6
    table = Table(
        "One stream, through the Ollama API (mlxgate serve)",
        ["figure", "value"],
        [
            ["cold load", f"{out['cold_load_s']:.2f} s"],
            ["decode, one stream", f"{out['decode_tokens_per_s_single']:.1f} tok/s"],
            [f"prefill ({out['prompt_tokens']:,}-token prompt)", f"{out['prefill_tokens_per_s']:.0f} tok/s"],
            ["time to first token (short prompt), p50 / max",
             f"{out['ttft_p50_s'] * 1000:.0f} / {out['ttft_max_s'] * 1000:.0f} ms"],
            ["weights / MLX peak / process RSS",
             f"{out['model_bytes'] / mb:.0f} / {out['mlx_peak_bytes'] / mb:.0f} / {out['rss_bytes'] / mb:.0f} MB"],
        ],
    )
    return Section(out, [table])
