"""Engine serving efficiency: streamed tokens/s at 1, 8 and 32 clients for

- the pure decode loop: mlx-lm's ``BatchGenerator`` driven in this process,
  all prompts inserted at once, no server (the ceiling);
- mlxgate: ``mlxgate serve`` in a subprocess, OpenAI chat streamed through its
  HTTP front (front → gRPC → engine);
- ``mlx_lm.server`` in a subprocess on the same model folder, OpenAI chat streamed.

Every figure is greedy decoding of ``ctx.tokens`` tokens per client on short
chat prompts, wall time from the first request to the last token.  The three
are measured in rotation, ``ctx.reps`` times each, and the medians compared,
so a load change on the machine hits all of them alike.
"""

from __future__ import annotations

import time

from tests.bench.common import (
    Context,
    Section,
    Table,
    concurrent_streams,
    median,
    prompt_for,
    start_mlx_lm_server,
    start_mlxgate,
)

#: mlxgate's batch for the bench: as wide as mlx_lm.server's default (--decode-concurrency 32).
BATCH = 32


class PureLoop:
    """The ceiling: BatchGenerator.next() in a loop, nothing else."""

    def __init__(self, ctx: Context) -> None:
        from mlx_lm.utils import load

        self.model, self.tok = load(str(ctx.model_path))
        self.prefill_step_size = 512  # mlxgate's default

    def run(self, n: int, tokens: int, tag: str) -> float:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        prompts = [
            self.tok.apply_chat_template([{"role": "user", "content": prompt_for(i, tag)}], add_generation_prompt=True)
            for i in range(n)
        ]
        gen = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.tok.eos_token_ids],
            completion_batch_size=max(n, 1),
            prefill_batch_size=min(8, n),
            prefill_step_size=self.prefill_step_size,
            stream=mx.new_stream(mx.default_device()),
        )
        try:
            t0 = time.perf_counter()
            gen.insert(prompts, max_tokens=[tokens] * n)
            count = finished = 0
            while finished < n:
                _, responses = gen.next()
                for r in responses:
                    count += 1
                    finished += r.finish_reason is not None
            return count / (time.perf_counter() - t0)
        finally:
            gen.close()


async def run(ctx: Context) -> Section:
    pure = PureLoop(ctx)
    pure.run(2, 4, "warm")
    gate = ctx.servers.get("mlxgate") or start_mlxgate(ctx, {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)})
    ctx.servers["mlxgate"] = gate
    lm = ctx.servers.get("mlx_lm.server") or start_mlx_lm_server(ctx, BATCH)
    ctx.servers["mlx_lm.server"] = lm
    for server in (gate, lm):  # load the model, warm up
        await concurrent_streams(server, 2, 4, "warm")

    kinds = ("pure", "mlxgate", "mlx_lm")
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in ctx.clients} for k in kinds}
    for rep in range(ctx.reps):
        for n in ctx.clients:
            tag = f"{rep}.{n}"
            samples["pure"][n].append(pure.run(n, ctx.tokens, tag))
            samples["mlxgate"][n].append(await concurrent_streams(gate, n, ctx.tokens, "g" + tag))
            samples["mlx_lm"][n].append(await concurrent_streams(lm, n, ctx.tokens, "m" + tag))
    del pure

    rows, results = [], {}
    for n in ctx.clients:
        p, g, m = (median(samples[k][n]) for k in ("pure", "mlxgate", "mlx_lm"))
        rows.append([n, p, g, m, g / p, g / m])
        results[str(n)] = {
            "pure_loop_tokens_per_s": p,
            "mlxgate_tokens_per_s": g,
            "mlx_lm_server_tokens_per_s": m,
            "mlxgate_vs_pure": g / p,
            "mlxgate_vs_mlx_lm_server": g / m,
            "samples": {k: samples[k][n] for k in samples},
        }
    table = Table(
        f"Engine: streamed tokens/s, {ctx.tokens} tokens per client, greedy (median of {ctx.reps})",
        ["clients", "pure loop", "mlxgate", "mlx_lm.server", "mlxgate/pure", "mlxgate/mlx_lm"],
        rows,
        "goal: mlxgate/pure >= 0.90 at every count, mlxgate/mlx_lm >= 1.3 at 8 and 32",
    )
    return Section({"tokens_per_client": ctx.tokens, "batch": BATCH, "clients": results}, [table])
