"""What the bench sections share: the model, the servers under test (each a
subprocess, as a user runs it), a streaming OpenAI-chat client, and tables.

A section is ``async def run(ctx: Context) -> Section``: it measures, returns
its figures (for .bench/results.json) and the tables to print.  Add one by
writing a module beside ``engine.py`` and listing it in ``run_bench.SECTIONS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import aiohttp

from tests.mlx_lm_server import ServerDidNotStart, launch_mlx_lm_server
from tests.ports import HeldPort

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- results


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""

    def render(self) -> str:
        cells = [self.header] + [[_fmt(c) for c in row] for row in self.rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(self.header))]
        lines = [f"## {self.title}"]
        for n, row in enumerate(cells):
            padded = (str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            lines.append("  ".join(padded))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


@dataclass
class Section:
    results: dict
    tables: list[Table] = field(default_factory=list)


@dataclass
class Context:
    """What every section gets: the model and the run's knobs."""

    models_dir: Path
    model: str
    tokens: int
    clients: list[int]
    reps: int
    #: Sections may keep servers here to share them; the runner stops them all.
    servers: dict = field(default_factory=dict)
    #: Another mlxgate source tree (an older commit) measured beside this one.
    baseline: Optional[Path] = None

    @property
    def model_path(self) -> Path:
        return self.models_dir / self.model


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu_seconds(pid: Optional[int] = None) -> float:
    """CPU time (user + system, all threads) of a process, this one by default.

    Beside tokens/s, CPU time per token says what serving costs even when
    other work shares the machine (wall-clock figures then drift)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- servers


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env.update(extra)
    return env


@dataclass
class Server:
    """A server subprocess; ``model`` is the name requests use."""

    name: str
    proc: subprocess.Popen
    base: str
    model: str
    log: Optional[Path] = None
    #: Ports reserved for it (``tests/ports.py``), released once it is gone.
    ports: list[HeldPort] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.release()

    def release(self) -> None:
        for port in self.ports:
            port.close()


def start_mlxgate(
    ctx: Context, env: Optional[dict[str, str]] = None, name: str = "mlxgate", src: Optional[Path] = None
) -> Server:
    """``mlxgate serve`` on free ports over ``ctx.models_dir`` (BLAS preload
    inherited), from this tree or from the source tree ``src``."""
    data = Path(tempfile.mkdtemp(prefix="mlxgate-bench-"))
    cli = "mlxgate_cli" if ((src or ROOT) / "mlxgate_cli").is_dir() else "mlxgate.cli"  # older trees
    proc = subprocess.Popen(
        [sys.executable, "-m", cli, "serve", "--port", "0", "--grpc-port", "0",
         "--models-dir", str(ctx.models_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=src or ROOT,
        env=_clean_env({"MLXGATE_DATA_DIR": str(data), **(env or {})}),
    )
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"mlxgate serve did not start: {line!r}")
    return Server(name, proc, m.group(1), ctx.model)


def start_mlx_lm_server(ctx: Context, decode_concurrency: int = 32) -> Server:
    """``mlx_lm.server`` (ships with mlx-lm) on the same model folder; its defaults otherwise."""
    return start_peer_server("mlx_lm.server", ctx.model_path, "default_model",
                             "--decode-concurrency", str(decode_concurrency))


def start_peer_server(module: str, model: Path, model_id: str, *args: str) -> Server:
    """A peer's OpenAI-compatible server (``mlx_lm.server``, ``mlx_vlm.server``:
    the same ``--model``/``--host``/``--port``) on a held port, offline."""
    held = HeldPort()
    port = held.port
    work = Path(tempfile.mkdtemp(prefix=f"{module.split('.')[0]}-bench-"))
    (work / "hf").mkdir()
    log = work / "server.log"
    env = _clean_env({"HF_HUB_CACHE": str(work / "hf")})
    try:
        proc = launch_mlx_lm_server(model, port, log, env, *args, module=module)
    except ServerDidNotStart as e:
        held.close()
        raise SystemExit(str(e)) from None
    return Server(module, proc, f"http://127.0.0.1:{port}", model_id, log, [held])


# ---------------------------------------------------------------- a streaming OpenAI chat client


@dataclass
class Stream:
    tokens: int = 0
    prompt_tokens: int = 0
    #: Seconds from sending the request to each SSE event that carried text.
    arrivals: list[float] = field(default_factory=list)
    #: Tokens each of those events carried (from their logprobs; 1 when not asked for).
    counts: list[int] = field(default_factory=list)
    t_sent: float = 0.0
    t_end: float = 0.0
    #: (token text, logprob) of every token, when logprobs were asked for.
    tokens_logprobs: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] if self.arrivals else float("nan")

    def gaps(self) -> list[float]:
        """Time per token between successive text events: an event carrying k
        tokens after a gap g counts g / k.  (A token whose text is not complete
        yet, a piece of a UTF-8 character, is held back and sent with the next
        one: the stream did not stop, its text came in one piece.)"""
        a, k = self.arrivals, self.counts
        return [(a[i] - a[i - 1]) / max(1, k[i]) for i in range(1, len(a))]


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600))


async def stream_chat(
    s: aiohttp.ClientSession,
    server: Server,
    content: Any,
    max_tokens: int,
    on_event: Optional[Callable[[Stream], None]] = None,
    stop: Optional[asyncio.Event] = None,
    logprobs: bool = False,
) -> Stream:
    """Stream one OpenAI chat completion (greedy); count tokens from the usage
    chunk (content deltas when a server sends none).  ``content``: text, or a
    list of content parts (images as ``image_url`` parts).  ``stop`` set: hang up
    after the next event (the server cancels the rest)."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs:
        body["logprobs"] = True
    out = Stream(t_sent=time.perf_counter())
    deltas = 0
    usage = None
    async with s.post(f"{server.base}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter() - out.t_sent
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"].get("completion_tokens")
                out.prompt_tokens = d["usage"].get("prompt_tokens") or 0
            choices = d.get("choices") or ()
            if any((c.get("delta") or {}).get("content") for c in choices):
                deltas += 1
                out.arrivals.append(now)
                out.counts.append(sum(len((c.get("logprobs") or {}).get("content") or ()) for c in choices) or 1)
            for c in choices:
                content = (c.get("logprobs") or {}).get("content") or ()
                out.tokens_logprobs += [(t["token"], t["logprob"]) for t in content]
                if on_event is not None:
                    on_event(out)
            if stop is not None and stop.is_set():
                break
    out.tokens = usage if usage is not None else deltas
    out.t_end = time.perf_counter() - out.t_sent
    return out


def prompt_for(i: int, tag: str) -> str:
    return f"Request {tag}-{i}: tell me a long story about the sea."


@dataclass
class Throughput:
    tokens_per_s: float
    #: CPU milliseconds the server process spent per token.
    cpu_ms_per_token: float


async def concurrent_streams(server: Server, n: int, tokens: int, tag: str) -> Throughput:
    """n clients each streaming ``tokens`` tokens at once; aggregate tokens/s over the wall time."""
    async with session() as s:
        cpu0 = cpu_seconds(server.proc.pid)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(s, server, prompt_for(i, tag), tokens) for i in range(n)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(server.proc.pid) - cpu0
    got = sum(r.tokens for r in results)
    if got != n * tokens:
        print(f"  note: {server.name} streamed {got} tokens, not {n * tokens}", file=sys.stderr)
    return Throughput(got / wall, cpu * 1000 / max(got, 1))
