"""Command line: parse flags into a Config and hand it to the composition root.

Only this module knows about argparse; everything below it gets a Config
(or the section of it that it needs).
"""

# ``mlxgate`` (the console script) and ``python -m mlxgate_cli`` run ``main``.

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlxgate.config import Config, load_config
from mlxgate.exposure import exposure_problem


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (env MLXGATE_CONFIG)")
    p.add_argument("--models-dir", help="folder with one MLX model per subfolder (env MLXGATE_MODELS_DIR)")
    p.add_argument("--grpc-host", help="gRPC bind address (env MLXGATE_GRPC_HOST, default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (env MLXGATE_GRPC_PORT, default 50051)")
    p.add_argument("--ollama-upstream", help="upstream Ollama URL for fallback (env OLLAMA_UPSTREAM)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (env MLXGATE_LOG_LEVEL)")
    p.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require this key from callers; repeat for several (env MLXGATE_API_KEYS, comma-separated)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="allow a non-loopback bind address without API keys (env MLXGATE_ALLOW_UNAUTHENTICATED)",
    )
    p.add_argument("--data-dir", help="where mlxgate keeps its own data (env MLXGATE_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="HTTP front (Ollama + OpenAI) and the gRPC inference service")
    serve.add_argument("--host", help="HTTP bind address (env MLXGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (env MLXGATE_PORT, default 11434)")
    serve.add_argument(
        "--grpc-target",
        help="use the inference service at host:port instead of starting one (env MLXGATE_GRPC_TARGET)",
    )
    _add_common(serve)

    service = sub.add_parser("service", help="only the gRPC inference service, with /metrics on its own port")
    service.add_argument("--metrics-port", type=int, help="port for /metrics (env MLXGATE_METRICS_PORT, 9464)")
    _add_common(service)

    model = sub.add_parser("make-test-model", help="write a small random-weight model into DIR")
    model.add_argument("dir", help="models directory; the model is written to DIR/<name>")
    model.add_argument("--name", default="tiny-llama")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--size", default="tiny", help="tiny (tests, default), bench (~90M params), bench-bf16")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.grpc_host": args.grpc_host,
        "server.grpc_port": args.grpc_port,
        "server.grpc_target": getattr(args, "grpc_target", None),
        "server.metrics_port": getattr(args, "metrics_port", None),
        "mlx.models_dir": args.models_dir,
        "ollama.upstream": args.ollama_upstream,
        "server.api_keys": args.api_keys,
        "server.allow_unauthenticated": args.allow_unauthenticated,
        "server.data_dir": args.data_dir,
        "log_level": args.log_level or os.environ.get("MLXGATE_LOG_LEVEL"),
    }
    return load_config(args.config, overrides=overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Before any thread starts: fewer malloc arenas keep large requests' freed
    # buffers reusable instead of parked per thread (mlxgate/memory.py).
    from mlxgate.memory import limit_arenas

    limit_arenas()
    if args.command == "make-test-model":
        from backends.mlx.testmodel import write_test_model

        path = write_test_model(Path(args.dir).expanduser(), name=args.name, seed=args.seed, size=args.size)
        print(path)
        return 0

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"mlxgate: configuration error: {e}", file=sys.stderr)
        return 2
    serve_grpc = args.command == "service" or not config.server.grpc_target
    problem = exposure_problem(config, http=args.command == "serve", grpc=serve_grpc)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from mlxgate.ports import BindError
    from mlxgate_cli import stack

    runner = stack.serve if args.command == "serve" else stack.serve_service_only
    status = 0
    try:
        asyncio.run(runner(config, dict(os.environ)))
    except KeyboardInterrupt:
        pass
    except BindError as e:  # a port in use: one line, no traceback
        print(f"mlxgate: {e}", file=sys.stderr)
        status = 2
    # Shutdown is complete: servers stopped, streams cancelled, models freed.
    # Skip interpreter finalization, where grpc.aio's background thread can
    # abort the process ("terminate called without an active exception",
    # grpc/grpc#38679; seen here about 1 exit in 15 on a loaded machine), so a
    # supervisor sees exit status 0 for a clean stop (2 when a port was taken).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
