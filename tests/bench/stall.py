"""No stalls: 8 streams decode; a ~2,000-token prompt arrives; how long do
their tokens stop?

For each running stream: the longest gap between two of its tokens after the
long prompt was sent, over its median gap (its whole life), and over its
median gap before the long prompt (the steady pace).  Tokens are counted
from the stream's logprobs, so an event carrying k tokens (text held back
while a character is incomplete: random weights make many) counts its gap
over k.  The figure is the worst
stream's.  Measured on ``mlxgate serve`` with prefill interleaving off
(``MLXGATE_PREFILL_INTERLEAVE=0``: 512-token chunks, the engine before this
work) and on (the default), in the same run; the long prompt's time to first
token is reported beside it.
"""

from __future__ import annotations

import asyncio

from tests.bench.common import (
    Context,
    Section,
    Server,
    Stream,
    Table,
    median,
    prompt_for,
    session,
    start_mlxgate,
    stream_chat,
)
from tests.bench.engine import BATCH

RUNNING = 8
#: The running streams' limit: more than they get to before they are hung up
#: on, a few tokens after the long prompt's answer.
RUNNING_TOKENS = 1500
#: Tokens of the running streams before the long prompt is sent, and after its answer.
WARM_TOKENS = 16
AFTER_TOKENS = 8
LONG_PROMPT_TOKENS = 2000


def long_prompt(ctx: Context, tag: str, target: int = LONG_PROMPT_TOKENS) -> str:
    """A user message that makes a chat prompt of about ``target`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ctx.model_path / "tokenizer.json"))
    words = [f"{tag} line {i} of the long document, with some ordinary words in it." for i in range(400)]
    text = " ".join(words)
    ids = tok.encode(text).ids
    # ~20 tokens of chat template around the message.
    return tok.decode(ids[: target - 20])


async def measure(server: Server, ctx: Context, tag: str) -> dict:
    progress = [0] * RUNNING
    target = [WARM_TOKENS]
    reached, stop = asyncio.Event(), asyncio.Event()

    def seen(i: int):
        def on_event(s: Stream) -> None:
            progress[i] = len(s.arrivals)
            if min(progress) >= target[0]:
                reached.set()

        return on_event

    async with session() as s:
        running = [
            asyncio.ensure_future(
                stream_chat(s, server, prompt_for(i, tag), RUNNING_TOKENS, seen(i), stop, logprobs=True)
            )
            for i in range(RUNNING)
        ]
        await reached.wait()
        long = await stream_chat(s, server, long_prompt(ctx, tag), 8)
        reached.clear()
        target[0] = max(progress) + AFTER_TOKENS
        await reached.wait()
        stop.set()
        streams = await asyncio.gather(*running)
    during = during_p95 = overall = overall_life = 0.0
    for st in streams:
        sent = long.t_sent - st.t_sent  # when the long prompt went out, on this stream's clock
        first = sent + long.ttft  # when its first token came
        gaps = st.gaps()
        ends = st.arrivals[1:]
        steady = median([g for g, a in zip(gaps, ends) if a <= sent])
        # Gaps that ended while the long prompt was being prefilled (before the
        # step in which it joined the batch and its first token came).
        in_prefill = [g for g, a in zip(gaps, ends) if sent < a < first - steady / 2]
        after = [g for g, a in zip(gaps, ends) if a > sent]
        if not in_prefill or not after:
            continue
        during = max(during, max(in_prefill) / steady)
        during_p95 = max(during_p95, sorted(in_prefill)[int(0.95 * (len(in_prefill) - 1))] / steady)
        overall = max(overall, max(after) / steady)
        overall_life = max(overall_life, max(after) / median(gaps))
    return {
        "prefill_longest_over_steady_median": during,
        "prefill_p95_over_steady_median": during_p95,
        "longest_over_steady_median": overall,
        "longest_over_median": overall_life,
        "long_prompt_tokens": long.prompt_tokens,
        "long_prompt_ttft_s": long.ttft,
        "running_median_gap_s": median([median(st.gaps()) for st in streams]),
    }


async def run(ctx: Context) -> Section:
    results: dict = {}
    rows = []
    for label, interleave in (("before (interleave off)", "0"), ("after (default)", None)):
        env = {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)}
        if interleave is not None:
            env["MLXGATE_PREFILL_INTERLEAVE"] = interleave
        server = start_mlxgate(ctx, env, name=f"mlxgate {label}")
        try:
            async with session() as s:
                await stream_chat(s, server, "warm up", 4)
            runs = [await measure(server, ctx, f"{label[:3]}{rep}") for rep in range(ctx.reps)]
        finally:
            server.stop()
        key = "before" if interleave is not None else "after"
        agg = {k: median([r[k] for r in runs]) for k in runs[0]}
        agg["runs"] = runs
        results[key] = agg
        rows.append([label, agg["prefill_longest_over_steady_median"], agg["prefill_p95_over_steady_median"],
                     agg["longest_over_steady_median"], agg["longest_over_median"],
                     agg["running_median_gap_s"] * 1000, agg["long_prompt_ttft_s"]])
    tokens = results["after"]["runs"][0]["long_prompt_tokens"]
    table = Table(
        f"Stalls: {RUNNING} streams decoding, a {tokens:,}-token prompt arrives (median of {ctx.reps})",
        ["mlxgate", "during its prefill", "(p95)", "any gap after", "any gap / life median", "median gap ms",
         "its TTFT s"],
        rows,
        "A running stream's longest gap between two tokens over its median gap before the prompt came\n"
        "(worst of the 8 streams): during the prompt's prefill, and at any time after it came, including\n"
        "the step where it joins the batch; then over the median of the stream's whole life.  An event\n"
        "carrying k tokens counts its gap / k (text held back for an incomplete character is no stall).\n"
        "goal: <= 3x",
    )
    return Section(results, [table])
