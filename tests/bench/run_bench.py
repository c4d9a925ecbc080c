"""`make bench`: speed and memory, as clients see them, written to .bench/results.json.

Usage: python -m tests.bench.run_bench [--sections hop,workers,basics,engine,stall,vision,memory] [--reps 3]
       [--clients 1,8,32] [--tokens 64] [--size bench|bench-bf16|tiny] [--models-dir DIR --model NAME]
       [--baseline-src DIR]

Without arguments it generates the ~90M-parameter "bench" model (random
weights, so only speed and memory mean anything) and runs every section:

- hop: the gateway hop, mlxgate in front of an instant OpenAI-compatible
  upstream vs the upstream direct (``gateway_hop.py``);
- workers: ``mlxgate serve --workers 1`` vs ``2`` in front of the same upstream;
- basics: cold load, one stream's decode and prefill, time to first token, memory;
- engine: streamed tokens/s of the pure decode loop vs mlxgate vs mlx_lm.server
  at 1, 8 and 32 clients, and their ratios;
- stall: how long running streams stop when a ~2,000-token prompt arrives,
  with prefill interleaving off and on;
- distributed: the model over 2 ranks (``--distributed``, ring over loopback)
  vs one process, streamed tokens/s;
- rerank: documents reranked per second through ``/v1/rerank`` at 1, 32 and
  256 documents per request (``rerank.py``);
- vision: image chats at 1, 4 and 8 clients on the generated VLM, mlxgate vs
  ``mlx_vlm.server``, tokens/s and time to first token (``vision.py``).
- memory: the KV cache at full precision, 8 and 4 bits (``MLXGATE_KV_BITS``)
  with 8 streams on ~200-word prompts: bytes in flight, per stream and per
  token, decode tokens/s, prompt-cache entries the same budget holds, greedy
  agreement (``memory.py``).

Each section is a module here with ``async def run(ctx) -> Section``
(``common.py``); add one to ``SECTIONS``.  Comparisons are ratios measured in
the same run; the load average before and after is printed and stored, so a
busy machine shows.  Timing goals live here, not in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from tests.bench import basics, distributed, engine, hop, memory, rerank, stall, vision, workers
from tests.bench.common import Context, load_average

SECTIONS = {"hop": hop.run, "workers": workers.run, "basics": basics.run, "engine": engine.run, "stall": stall.run,
            "distributed": distributed.run, "rerank": rerank.run, "vision": vision.run, "memory": memory.run}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    preload = os.environ.get("LD_PRELOAD", "")
    return {
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "blas": "OpenBLAS preloaded" if "openblas" in preload else "MLX's own",
        "python": platform.python_version(),
    }


async def run_sections(ctx: Context, names: list[str]) -> dict:
    results: dict = {}
    try:
        for name in names:
            print(f"-- {name} (load average {load_average()})", file=sys.stderr, flush=True)
            section = await SECTIONS[name](ctx)
            results[name] = section.results
            for table in section.tables:
                print()
                print(table.render(), flush=True)
    finally:
        for server in ctx.servers.values():
            server.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path)
    ap.add_argument("--model", help="model name (default: bench-<size>)")
    ap.add_argument("--size", default="bench", help="generated model size when --models-dir is not given")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each client streams")
    ap.add_argument("--clients", default="1,8,32", help="client counts for the engine section")
    ap.add_argument("--reps", type=int, default=3, help="measurements of each figure (the median is kept)")
    ap.add_argument("--baseline-src", type=Path,
                    help="also measure mlxgate from this source tree (git archive REV | tar -x -C DIR)")
    ap.add_argument("--out", type=Path, default=Path(".bench/results.json"))
    args = ap.parse_args()
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s): {', '.join(unknown)}")
    models_dir = args.models_dir
    model = args.model or f"bench-{args.size}"
    if models_dir is None:
        from backends.mlx.testmodel import write_test_model

        models_dir = Path(".bench/models")
        if not (models_dir / model / "config.json").exists():
            write_test_model(models_dir, model, size=args.size)
    ctx = Context(models_dir.resolve(), model, args.tokens, [int(c) for c in args.clients.split(",")], args.reps,
                  baseline=args.baseline_src.resolve() if args.baseline_src else None)
    started = datetime.datetime.now(datetime.timezone.utc)
    info = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "model": model, "machine": machine(),
            "load_average_before": load_average()}
    print(f"mlxgate bench, {info['date']}: {model} on {info['machine']['cpu']} "
          f"({info['machine']['cores']} cores, {info['machine']['blas']}), load average {info['load_average_before']}")
    results = asyncio.run(run_sections(ctx, names))
    info["load_average_after"] = load_average()
    info["minutes"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60, 1)
    print(f"\nload average after: {info['load_average_after']} ({info['minutes']} min)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "sections": results}, indent=2))


if __name__ == "__main__":
    main()
