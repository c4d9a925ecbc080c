"""One model over two processes (``--distributed``, ring backend over
loopback) against the same model in one process: streamed tokens/s at each
client count, through ``mlxgate serve``'s HTTP front (OpenAI chat, greedy).

The two ranks run under ``mlx.launch -n 2 --backend ring`` on this machine,
so they share its cores and talk over loopback TCP: every layer's two
all-reduces (tensor parallelism) and the engine's one broadcast per step are
pure overhead here, with no second machine's memory or compute to gain.  The
figure says what that overhead costs on this box; on two Macs the trade is
different (a model that fits neither alone, twice the memory bandwidth), and
needs measuring there.  Both servers are measured in rotation, ``ctx.reps``
times, and the medians compared.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.bench.common import (
    ROOT,
    Context,
    Section,
    Server,
    Table,
    _clean_env,
    concurrent_streams,
    median,
    start_mlxgate,
)
from tests.bench.engine import BATCH
from tests.ports import consecutive_held_ports


@dataclass
class LaunchedServer(Server):
    """``mlx.launch`` and its ranks, in a session of their own (stopped together)."""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.release()


def start_distributed(ctx: Context, env: dict[str, str], ranks: int = 2) -> Server:
    """``mlx.launch -n RANKS --backend ring -- -m mlxgate_cli serve --distributed`` on free ports."""
    data = Path(tempfile.mkdtemp(prefix="mlxgate-bench-dist-"))
    launch = str(Path(sys.executable).with_name("mlx.launch"))
    ports = consecutive_held_ports(ranks)  # the launcher gives rank i the port base + i
    proc = subprocess.Popen(
        [launch, "-n", str(ranks), "--backend", "ring", "--starting-port", str(ports[0].port),
         "--python", sys.executable, "--", "-m", "mlxgate_cli", "serve", "--distributed",
         "--port", "0", "--grpc-port", "0", "--models-dir", str(ctx.models_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True,
        env=_clean_env({"MLXGATE_DATA_DIR": str(data), **env}),
    )
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
    if not m:
        os.killpg(proc.pid, signal.SIGKILL)
        for port in ports:
            port.close()
        raise SystemExit(f"mlxgate serve --distributed did not start: {line!r}")
    return LaunchedServer(f"mlxgate --distributed ({ranks} ranks)", proc, m.group(1), ctx.model, ports=ports)


async def run(ctx: Context) -> Section:
    env = {"MLXGATE_MAX_BATCH_SIZE": str(BATCH)}
    single = ctx.servers.get("mlxgate") or start_mlxgate(ctx, env)
    ctx.servers["mlxgate"] = single
    dist = ctx.servers["mlxgate-distributed"] = start_distributed(ctx, env)
    servers = {"single": single, "distributed": dist}
    for server in servers.values():  # load the model, warm up
        await concurrent_streams(server, 2, 4, "warm")
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in ctx.clients} for k in servers}
    for rep in range(ctx.reps):
        for n in ctx.clients:
            for key, server in servers.items():
                got = await concurrent_streams(server, n, ctx.tokens, f"{key[0]}{rep}.{n}")
                samples[key][n].append(got.tokens_per_s)
    rows, results = [], {}
    for n in ctx.clients:
        s, d = median(samples["single"][n]), median(samples["distributed"][n])
        rows.append([n, s, d, d / s])
        results[str(n)] = {"single_tokens_per_s": s, "distributed_tokens_per_s": d, "distributed_vs_single": d / s,
                           "samples": {k: samples[k][n] for k in servers}}
    table = Table(
        f"Distributed: streamed tokens/s, 2 ranks (ring over loopback, tensor parallel) vs one process, "
        f"{ctx.tokens} tokens per client, greedy (median of {ctx.reps})",
        ["clients", "one process", "2 ranks", "2 ranks/one"],
        rows,
        "Both ranks share this machine's cores and talk over loopback: the collectives are pure overhead here.",
    )
    return Section({"tokens_per_client": ctx.tokens, "ranks": 2, "clients": results}, [table])
