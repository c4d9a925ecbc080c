"""KV-cache memory at full precision, 8 and 4 bits (``MLXGATE_KV_BITS``).

For each setting, one ``mlxgate serve``; ``ctx.reps`` times, 8 streams
decode ``ctx.tokens`` tokens each on ~200-word prompts (other prompts each
time, so the prompt cache never serves them), and:

- ``mlxgate_kv_cache_memory_bytes`` is scraped while they run (its peak:
  the batch's buffers, padding and spare room included), per 8 streams and
  per stream;
- bytes per token: what the finished sequences' caches add to
  ``mlxgate_prompt_cache_memory_bytes`` (exactly the positions each holds:
  its prompt and its answer), over those positions;
- entries of that size ``MLXGATE_PROMPT_CACHE_BYTES`` (its default) holds;
- decode tokens/s of the 8 streams (from the last stream's first token to
  the first stream's last one), and its ratio to full precision;
- greedy output against full precision on the same prompts: tokens that
  agree before the first difference, and the largest difference between the
  logprobs of the agreeing tokens.

Ratios are of figures measured in the same run; on a shared machine the
throughput ratios are indicative.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import aiohttp

from tests.bench.basics import metric
from tests.bench.common import Context, Section, Server, Stream, Table, median, session, start_mlxgate, stream_chat

STREAMS = 8
WORDS = 200
#: MLXConfig.prompt_cache_bytes's default.
PROMPT_CACHE_BYTES = 512 * 1024 * 1024
SETTINGS: tuple[tuple[str, Optional[str]], ...] = (("full precision", None), ("8 bits", "8"), ("4 bits", "4"))


_TEXT = ("please summarise the following notes about the harbour and the tides of the sea "
         "with some ordinary words in it").split()


def prompt(i: int, tag: str) -> str:
    """~200 words, each prompt its own from the first word."""
    return f"{tag} stream {i}: " + " ".join(_TEXT[k % len(_TEXT)] for k in range(WORDS - 3))


async def scrape(s: aiohttp.ClientSession, server: Server) -> str:
    async with s.get(f"{server.base}/metrics") as r:
        return await r.text()


async def settled(s: aiohttp.ClientSession, server: Server, name: str, before: float) -> float:
    """``name`` once the engine refreshed it after the streams ended (it does every 0.25 s)."""
    deadline = time.monotonic() + 10
    last = before
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        value = metric(await scrape(s, server), name)
        if value != before and value == last:
            return value
        last = value
    return last


def agreement(ref: Stream, got: Stream) -> tuple[int, float]:
    """(tokens equal before the first difference, largest logprob difference over them)."""
    n, worst = 0, 0.0
    for (a, la), (b, lb) in zip(ref.tokens_logprobs, got.tokens_logprobs):
        if a != b:
            break
        n, worst = n + 1, max(worst, abs(la - lb))
    return n, worst


async def one_run(s: aiohttp.ClientSession, server: Server, ctx: Context, tag: str) -> dict:
    peak = [0.0]
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], metric(await scrape(s, server), "mlxgate_kv_cache_memory_bytes"))
            await asyncio.sleep(0.05)

    stored_before = metric(await scrape(s, server), "mlxgate_prompt_cache_memory_bytes")
    watcher = asyncio.ensure_future(watch())
    try:
        streams = await asyncio.gather(
            *(stream_chat(s, server, prompt(i, tag), ctx.tokens, logprobs=True)
              for i in range(STREAMS))
        )
    finally:
        done.set()
        await watcher
    stored = await settled(s, server, "mlxgate_prompt_cache_memory_bytes", stored_before) - stored_before
    positions = sum(st.prompt_tokens + st.tokens for st in streams)
    # Decode window: every stream is decoding in it.
    start = max(st.t_sent + st.ttft for st in streams)
    end = min(st.t_sent + st.t_end for st in streams)
    in_window = sum(k for st in streams for a, k in zip(st.arrivals, st.counts) if start < st.t_sent + a <= end)
    return {
        "prompt_tokens": median([st.prompt_tokens for st in streams]),
        "kv_cache_peak_bytes": peak[0],
        "kv_bytes_per_token": stored / positions if positions else float("nan"),
        "decode_tokens_per_s": in_window / (end - start) if end > start else float("nan"),
        "streams": streams,
    }


async def run(ctx: Context) -> Section:
    results: dict = {}
    runs: dict[str, list[dict]] = {}
    for label, bits in SETTINGS:
        env = {"MLXGATE_MAX_BATCH_SIZE": str(STREAMS), "MLXGATE_PROMPT_CACHE_BYTES": str(PROMPT_CACHE_BYTES)}
        if bits:
            env["MLXGATE_KV_BITS"] = bits
        server = start_mlxgate(ctx, env, name=f"mlxgate {label}")
        try:
            async with session() as s:
                await stream_chat(s, server, "warm up", 4)
                runs[label] = [await one_run(s, server, ctx, f"r{rep}x") for rep in range(ctx.reps)]
        finally:
            server.stop()
    full = runs[SETTINGS[0][0]]
    rows = []
    for label, _ in SETTINGS:
        rs = runs[label]
        agg = {k: median([r[k] for r in rs]) for k in ("prompt_tokens", "kv_cache_peak_bytes", "kv_bytes_per_token",
                                                      "decode_tokens_per_s")}
        pairs = [agreement(a, b) for ra, rb in zip(full, rs) for a, b in zip(ra["streams"], rb["streams"])]
        agg["tokens_agreeing"] = sum(n for n, _ in pairs)
        agg["tokens_compared"] = sum(len(a.tokens_logprobs) for ra in full for a in ra["streams"])
        agg["largest_logprob_difference"] = max((d for _, d in pairs), default=0.0)
        agg["kv_cache_ratio"] = agg["kv_cache_peak_bytes"] / results.get("full", agg)["kv_cache_peak_bytes"]
        agg["kv_per_token_ratio"] = agg["kv_bytes_per_token"] / results.get("full", agg)["kv_bytes_per_token"]
        agg["decode_ratio"] = agg["decode_tokens_per_s"] / results.get("full", agg)["decode_tokens_per_s"]
        agg["prompt_cache_entries"] = int(PROMPT_CACHE_BYTES // (agg["kv_bytes_per_token"] *
                                                                 (agg["prompt_tokens"] + ctx.tokens)))
        results["full" if label == SETTINGS[0][0] else label.split()[0] + "bit"] = agg
        mb = 1e6
        rows.append([
            label, agg["kv_cache_peak_bytes"] / mb, agg["kv_cache_peak_bytes"] / STREAMS / mb,
            f"{agg['kv_bytes_per_token']:,.0f}", agg["kv_cache_ratio"], agg["decode_tokens_per_s"],
            agg["decode_ratio"], agg["prompt_cache_entries"],
            f"{agg['tokens_agreeing']}/{agg['tokens_compared']}", agg["largest_logprob_difference"],
        ])
    table = Table(
        f"KV-cache memory: {STREAMS} streams, {int(results['full']['prompt_tokens'])}-token prompts, "
        f"{ctx.tokens} tokens each (median of {ctx.reps})",
        ["KV cache", "in flight MB", "per stream MB", "bytes/token", "ratio", "decode tok/s", "ratio",
         "entries/512MiB", "greedy agree", "max logprob diff"],
        rows,
        "In flight: peak of mlxgate_kv_cache_memory_bytes while the streams decode (the batch's buffers,\n"
        "padding and spare room included).  Bytes/token: what the finished sequences' caches add to the\n"
        "prompt-cache store, over the positions they hold.  Entries: sequences of this length the default\n"
        "MLXGATE_PROMPT_CACHE_BYTES holds.  Greedy agree: tokens equal to full precision's before the first\n"
        "difference; max logprob diff over those.  goals: 8 bits <= 0.6x and 4 bits <= 0.35x of full\n"
        "precision's bytes; decode >= 0.8x (8 bits), >= 0.7x (4 bits); throughput ratios on a shared\n"
        "machine are indicative.",
    )
    for rs in runs.values():
        for r in rs:
            r.pop("streams")
    results["runs"] = runs
    return Section(results, [table])
