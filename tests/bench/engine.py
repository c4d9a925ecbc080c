"""Engine serving efficiency: streamed tokens/s at 1, 8 and 32 clients for

- the pure decode loop: mlx-lm's ``BatchGenerator`` driven in this process,
  all prompts inserted at once, no server (the ceiling);
- mlxgate: ``mlxgate serve`` in a subprocess, OpenAI chat streamed through its
  HTTP front (front → gRPC → engine);
- ``mlx_lm.server`` in a subprocess on the same model folder, OpenAI chat streamed.

Every figure is greedy decoding of ``ctx.tokens`` tokens per client on short
chat prompts, wall time from the first request to the last token.  The three
are measured in rotation, ``ctx.reps`` times each, and the medians compared,
so a load change on the machine hits all of them alike.  With
``--baseline-src DIR`` an mlxgate from another source tree (an older commit)
is measured in the same rotation.
"""

from __future__ import annotations

import time

from tests.bench.common import (
    Context,
    Section,
    Table,
    Throughput,
    concurrent_streams,
    cpu_seconds,
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

    def run(self, n: int, tokens: int, tag: str) -> Throughput:
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
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            gen.insert(prompts, max_tokens=[tokens] * n)
            count = finished = 0
            while finished < n:
                _, responses = gen.next()
                for r in responses:
                    count += 1
                    finished += r.finish_reason is not None
            wall = time.perf_counter() - t0
            return Throughput(count / wall, (cpu_seconds() - cpu0) * 1000 / count)
        finally:
            gen.close()


async def run(ctx: Context) -> Section:
    pure = PureLoop(ctx)
    pure.run(2, 4, "warm")
    env = {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)}
    gate = ctx.servers.get("mlxgate") or start_mlxgate(ctx, env)
    ctx.servers["mlxgate"] = gate
    lm = ctx.servers.get("mlx_lm.server") or start_mlx_lm_server(ctx, BATCH)
    ctx.servers["mlx_lm.server"] = lm
    servers = {"mlxgate": gate, "mlx_lm": lm}
    if ctx.baseline is not None:
        servers["baseline"] = ctx.servers["baseline"] = start_mlxgate(ctx, env, "mlxgate (baseline)", ctx.baseline)
    for server in servers.values():  # load the model, warm up
        await concurrent_streams(server, 2, 4, "warm")

    kinds = ("pure", *servers)
    samples: dict[str, dict[int, list[Throughput]]] = {k: {n: [] for n in ctx.clients} for k in kinds}
    for rep in range(ctx.reps):
        for n in ctx.clients:
            tag = f"{rep}.{n}"
            samples["pure"][n].append(pure.run(n, ctx.tokens, tag))
            for key, server in servers.items():
                samples[key][n].append(await concurrent_streams(server, n, ctx.tokens, key[0] + tag))
    del pure

    rows, cpu_rows, results = [], [], {}
    for n in ctx.clients:
        med = {k: median([x.tokens_per_s for x in samples[k][n]]) for k in kinds}
        best = {k: max(x.tokens_per_s for x in samples[k][n]) for k in kinds}
        cpu = {k: median([x.cpu_ms_per_token for x in samples[k][n]]) for k in kinds}
        p, g, m = med["pure"], med["mlxgate"], med["mlx_lm"]
        row = [n, p, g, m, g / p, g / m]
        results[str(n)] = {
            "pure_loop_tokens_per_s": p,
            "mlxgate_tokens_per_s": g,
            "mlx_lm_server_tokens_per_s": m,
            "mlxgate_vs_pure": g / p,
            "mlxgate_vs_mlx_lm_server": g / m,
            "best_of_reps": {"mlxgate_vs_pure": best["mlxgate"] / best["pure"],
                             "mlxgate_vs_mlx_lm_server": best["mlxgate"] / best["mlx_lm"]},
            "cpu_ms_per_token": cpu,
            "samples": {k: [x.tokens_per_s for x in samples[k][n]] for k in kinds},
        }
        best_ratios = [best["mlxgate"] / best["pure"], best["mlxgate"] / best["mlx_lm"]]
        cpu_rows.append([n] + [cpu[k] for k in kinds] + best_ratios)
        if "baseline" in med:
            b = med["baseline"]
            row += [b, b / p]
            results[str(n)].update(baseline_tokens_per_s=b, baseline_vs_pure=b / p)
        rows.append(row)
    header = ["clients", "pure loop", "mlxgate", "mlx_lm.server", "mlxgate/pure", "mlxgate/mlx_lm"]
    if ctx.baseline is not None:
        header += ["baseline", "baseline/pure"]
    table = Table(
        f"Engine: streamed tokens/s, {ctx.tokens} tokens per client, greedy (median of {ctx.reps})",
        header,
        rows,
        "goal (issue 21): mlxgate/pure >= 0.90 at every count, mlxgate/mlx_lm >= 0.95 at 8 and 32"
        + (f"\nbaseline: mlxgate from {ctx.baseline}" if ctx.baseline is not None else ""),
    )
    names = {"pure": "pure loop", "mlxgate": "mlxgate", "mlx_lm": "mlx_lm.server", "baseline": "baseline"}
    cpu_table = Table(
        "Engine: CPU ms per token (the serving process, all threads; median) and best-of ratios",
        ["clients"] + [names[k] for k in kinds] + ["best mlxgate/pure", "best mlxgate/mlx_lm"],
        cpu_rows,
        "CPU per token holds better than tokens/s when other work shares the machine.",
    )
    result = {"tokens_per_client": ctx.tokens, "batch": BATCH, "clients": results}
    if ctx.baseline is not None:
        result["baseline_src"] = str(ctx.baseline)
    return Section(result, [table, cpu_table])
