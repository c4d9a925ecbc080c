"""``make bench`` section ``hop``: the gateway hop (issue 12's first table).

mlxgate in front of an instant OpenAI-compatible upstream vs the upstream
direct, measured by ``tests/bench/gateway_hop.py``; the front reaches its
service in-process (the default) and, for comparison, over loopback gRPC
and with the usage ledger off (its bookkeeping must not show here).
"""

from __future__ import annotations

from tests.bench.common import Context, Section, Table
from tests.bench.gateway_hop import run as run_hop

SECONDS = 4.0
CHANNELS = ("in-process", "grpc", "no-ledger")


#: Issue 21's targets for the hop (the default in-process front):
#: added p50 at 1 client, TTFT under 16 streams minus direct (ms, at most),
#: streamed tokens/s as a fraction of direct (at least).
ADDED_P50_MAX_MS = 1.5
ADDED_TTFT_MAX_MS = 5.0
TOKENS_RATIO_MIN = 0.5


async def run(ctx: Context) -> Section:
    r = await run_hop(SECONDS, workers=1, channels=CHANNELS, baseline=ctx.baseline)
    return Section(results=r, tables=[table(r, SECONDS), targets(r)])


#: Issue 21's figures: (key in gateway_hop's result, label, target, passes).
FIGURES = (
    ("added_p50_ms", "added latency p50 ms, 1 client", f"≤ {ADDED_P50_MAX_MS:g}",
     lambda v: v <= ADDED_P50_MAX_MS),
    ("added_ttft_ms", "time to first token p50, 16 streams, minus direct, ms", f"≤ {ADDED_TTFT_MAX_MS:g}",
     lambda v: v <= ADDED_TTFT_MAX_MS),
    ("tokens_per_s_ratio", "streamed tokens/s, 16 clients, mlxgate / direct", f"≥ {TOKENS_RATIO_MIN:g}",
     lambda v: v >= TOKENS_RATIO_MIN),
)


def targets(r: dict) -> Table:
    """The three figures issue 21 sets for the hop, each with pass or fail
    (those of the loads measured; the baseline tree's beside them when measured)."""

    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    baseline = "baseline_src" in r
    rows = []
    for key, label, goal, passes in FIGURES:
        if key not in r:
            continue
        row = [label, r[key], goal, verdict(passes(r[key]))]
        if baseline:
            row += [r[f"baseline_{key}"], verdict(passes(r[f"baseline_{key}"]))]
        rows.append(row)
    heads = ["", "now", "target", ""] + (["baseline", ""] if baseline else [])
    rounds = r.get("rounds", 1)
    note = ("one run" if rounds == 1 else f"medians of {rounds} rounds") + \
        " on this machine: the figures move with whatever else the machine runs"
    if baseline:
        note += f"\nbaseline: mlxgate from {r['baseline_src']}"
    return Table("gateway hop: issue 21's targets (in-process front)", heads, rows, note=note)


def table(r: dict, seconds: float) -> Table:
    """``gateway_hop.run``'s result: direct, then mlxgate with each front channel measured."""
    one, many, streams = r["one_client"], r["16_clients"], r["16_streams"]
    names = r["channels"][1:] + (["baseline"] if "baseline_src" in r else [])
    keys = ["mlxgate"] + [f"mlxgate_{c}" for c in names]
    heads = ["mlxgate"] + [
        "mlxgate, usage ledger off" if c == "no-ledger" else "baseline" if c == "baseline"
        else f"mlxgate, front over {'gRPC' if c == 'grpc' else c}"
        for c in names]

    def row(label: str, metric: str, scenario: dict, goal: str) -> list:
        return [label, scenario["direct"][metric], *(scenario[k][metric] for k in keys), goal]

    rows = [
        row("latency p50 ms, 1 client", "p50_ms", one, f"added ≤ 1.5 (now {r['added_p50_ms']:+.2f})"),
        row("latency p99 ms, 1 client", "p99_ms", one, f"added ≤ 5 (now {r['added_p99_ms']:+.2f})"),
        row("requests/s, 16 clients", "requests_per_s", many, "≥ 1,000"),
        row("streamed tokens/s, 16 clients", "tokens_per_s", streams, "≥ 20,000"),
        row("time to first token p50 ms, 16 streams", "ttft_p50_ms", streams, "≤ 10"),
    ]
    return Table(
        "gateway hop: instant OpenAI-compatible upstream, OpenAI chat, closed loop",
        ["", "direct", *heads, "goal"],
        rows,
        note=f"{seconds:g} s per cell; the load generator, the upstream and mlxgate share the machine's cores",
    )
