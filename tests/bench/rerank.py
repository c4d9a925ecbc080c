"""Documents reranked per second through ``POST /v1/rerank`` of ``mlxgate serve``,
at 1, 32 and 256 documents per request, on the bench model (a causal model:
P("yes") after the judging prompt, the shared prefix evaluated once per request).

Each document is a short passage (~40 words); the figure is documents / wall
time of the whole request, the median of ``--reps`` requests per size after
one warm-up request.
"""

from __future__ import annotations

import time

from tests.bench.common import Context, Section, Table, median, session, start_mlxgate
from tests.bench.engine import BATCH

SIZES = (1, 32, 256)
QUERY = "which passage talks about the weather in the mountains?"


def documents(n: int) -> list[str]:
    return [f"Passage {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40)) for i in range(n)]


async def run(ctx: Context) -> Section:
    server = ctx.servers.get("mlxgate") or start_mlxgate(ctx, {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)})
    ctx.servers["mlxgate"] = server
    out: dict = {}
    rows = []
    async with session() as s:
        for n in SIZES:
            body = {"model": server.model, "query": QUERY, "documents": documents(n), "return_documents": False}
            times, tokens = [], 0
            for rep in range(ctx.reps + 1):
                t0 = time.perf_counter()
                async with s.post(f"{server.base}/v1/rerank", json=body) as r:
                    r.raise_for_status()
                    data = await r.json()
                if rep:  # the first one warms up (loads the model)
                    times.append(time.perf_counter() - t0)
                tokens = data["usage"]["total_tokens"]
            wall = median(times)
            out[f"docs_per_s_{n}"] = n / wall
            out[f"seconds_{n}"] = wall
            out[f"tokens_{n}"] = tokens
            rows.append([n, f"{wall * 1000:.0f} ms", f"{n / wall:.1f}", f"{tokens:,}"])
    table = Table("Rerank through POST /v1/rerank (mlxgate serve, causal model: P(yes))",
                  ["documents per request", "request (median)", "documents/s", "tokens per request"], rows)
    return Section(out, [table])
