"""``make bench`` section ``hop``: the gateway hop (issue 12's first table).

mlxgate in front of an instant OpenAI-compatible upstream vs the upstream
direct, measured by ``tests/bench/gateway_hop.py``; the front reaches its
service in-process (the default) and, for comparison, over loopback gRPC.
"""

from __future__ import annotations

from tests.bench.common import Context, Section, Table
from tests.bench.gateway_hop import run as run_hop

SECONDS = 4.0
CHANNELS = ("in-process", "grpc")


async def run(ctx: Context) -> Section:
    r = await run_hop(SECONDS, workers=1, channels=CHANNELS)
    one, many, streams = r["one_client"], r["16_clients"], r["16_streams"]

    def row(label: str, metric: str, scenario: dict, goal: str) -> list:
        d, g, grpc_ = (scenario[k][metric] for k in ("direct", "mlxgate", "mlxgate_grpc"))
        return [label, d, g, grpc_, goal]

    rows = [
        row("latency p50 ms, 1 client", "p50_ms", one, f"added ≤ 1.5 (now {r['added_p50_ms']:+.2f})"),
        row("latency p99 ms, 1 client", "p99_ms", one, f"added ≤ 5 (now {r['added_p99_ms']:+.2f})"),
        row("requests/s, 16 clients", "requests_per_s", many, "≥ 1,000"),
        row("streamed tokens/s, 16 clients", "tokens_per_s", streams, "≥ 20,000"),
        row("time to first token p50 ms, 16 streams", "ttft_p50_ms", streams, "≤ 10"),
    ]
    table = Table(
        "gateway hop: instant OpenAI-compatible upstream, OpenAI chat, closed loop",
        ["", "direct", "mlxgate", "mlxgate, front over gRPC", "goal"],
        rows,
        note=f"{SECONDS:.0f} s per cell; the load generator, the upstream and mlxgate share the machine's cores",
    )
    return Section(results=r, tables=[table])
