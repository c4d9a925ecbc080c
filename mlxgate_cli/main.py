"""Command line: parse flags into a Config and hand it to the composition root.

Only this module and ``flags.py`` (the flags of serve and service, built
from the settings table) know about argparse; everything below them gets a
Config (or the section of it that it needs).
"""

# ``mlxgate`` (the console script) and ``python -m mlxgate_cli`` run ``main``.

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

from mlxgate.config import CLIENT_KEY_ENV, Config
from mlxgate.config_load import load_config
from mlxgate.exposure import exposure_problem
from mlxgate_cli.client import cli as client_cli
from mlxgate_cli.client.host import HOST_ENV, SERVER_VARIABLES
from mlxgate_cli.flags import add_setting_flags, described, overrides


USAGE = """\
mlxgate is a local LLM gateway. On one port it answers the Ollama REST API
(/api/generate, /api/chat, /api/tags, ...) and the OpenAI REST API (/v1/...),
so Ollama and OpenAI clients work unchanged; gRPC clients get
mlxgate.v1.InferenceService. It runs MLX models itself (one folder per model
in the models directory, or the Hugging Face cache) and falls back to an
upstream Ollama and to OpenAI-compatible cloud APIs."""

EPILOG = f"""\
examples:
  mlxgate serve                          serve on http://127.0.0.1:11434 (gRPC 127.0.0.1:50051)
  mlxgate serve --models-dir ~/models    serve the MLX models in ~/models
  mlxgate make-test-model ./models       write a small random-weight model to try things with
  mlxgate usage --since 7d               what went where: requests, tokens and cloud spend per key and model
  mlxgate serve --help                   every option of serve, with its default
  mlxgate list                           the models of the running server (also: pull, ps, show,
                                         cp, rm, create, run, stop, as Ollama's CLI; {SERVER_VARIABLES}
                                         say where the server is, {CLIENT_KEY_ENV} its key)

Settings come from flags, then environment variables (MLXGATE_*, and Ollama's
own: OLLAMA_HOST, OLLAMA_MODELS, OLLAMA_KEEP_ALIVE, ...), then a TOML file
(--config), then defaults. README.md in the mlxgate source tree documents
every setting, the API routes, metrics and dashboards."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows argparse defaults except None/False: flags that fall back to the
    configuration carry their default in the help text (``flags.described``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _version() -> str:
    try:
        return f"mlxgate {metadata.version('mlxgate')}"
    except metadata.PackageNotFoundError:
        return "mlxgate (not installed: version unknown)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxgate", description=USAGE, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the HTTP APIs (Ollama and OpenAI) and the gRPC service",
        description="Serve the Ollama and OpenAI REST APIs on one HTTP port and the gRPC inference service.",
        formatter_class=_HelpFormatter,
    )
    add_setting_flags(serve, "serve")

    service = sub.add_parser(
        "service",
        help="only the gRPC inference service, with /metrics on its own port",
        description="Run only the gRPC inference service (for a front started with serve --grpc-target).",
        formatter_class=_HelpFormatter,
    )
    add_setting_flags(service, "service")

    usage = sub.add_parser(
        "usage",
        help="usage and spend of a running server, by key, backend and model",
        description="Print a running server's usage ledger and budgets (GET /api/usage).",
        formatter_class=_HelpFormatter,
    )
    usage.add_argument("--host", help=described("the server", (HOST_ENV, "OLLAMA_HOST"), "http://127.0.0.1:11434"))
    usage.add_argument("--since", help="ISO 8601 date/time or an age (24h, 7d); default: every row kept")
    usage.add_argument("--until", help="as --since; default: now")
    usage.add_argument("--group-by", help="comma-separated key, backend, model (default all three)")
    usage.add_argument("--json", action="store_true", help="print the answer as JSON")

    from backends.mlx.vision.families import FAMILIES  # names only (no MLX import)
    from backends.mlx.vision.testmodel_qwen import NAMES as QWEN_VL_NAMES

    model = sub.add_parser(
        "make-test-model",
        help="write a small random-weight model into DIR (for trying things out)",
        description="Write a small generated MLX model (random weights: it answers gibberish) into DIR/NAME.",
        formatter_class=_HelpFormatter,
    )
    model.add_argument("dir", help="models directory; the model is written to DIR/<name>")
    model.add_argument("--name", help="model (folder) name (default tiny-llama, or tiny-vlm with --vision)")
    model.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    model.add_argument("--size", default="tiny", help="tiny (tests), bench (~90M params), bench-bf16")
    model.add_argument("--context", type=int, metavar="TOKENS",
                       help="context length (default 2048; the same weights with more room, for long prompts such "
                            "as Claude Code's)")
    model.add_argument("--ending", action="store_true",
                       help="a variant that ends its turns by itself after a few tokens (for clients that wait for "
                            "the end of a turn, such as Claude Code)")
    model.add_argument("--vision", action="store_true",
                       help="a vision-language model instead (run by mlx-vlm): takes images")
    model.add_argument("--arch", default="idefics3", choices=[*FAMILIES, *QWEN_VL_NAMES],
                       help="the vision-language architecture (implies --vision); the model is named tiny-vlm for "
                            "idefics3, tiny-<arch> for the others (qwen2_vl, qwen2_5_vl: multimodal rotary "
                            "positions, named tiny-qwen2-vl, tiny-qwen2.5-vl)")
    client_cli.add_verbs(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=overrides(args))


def _distributed_rank(config: Config) -> Optional[int]:
    """``--distributed``: None on rank 0 (it goes on to serve); on the other
    ranks, run the follower loop and return its exit status."""
    from backends.mlx import distributed

    grp = distributed.group()
    if grp.size() < 2:
        print("mlxgate: --distributed needs the processes started by mlx.launch, e.g. "
              "mlx.launch -n 2 --backend ring --python .venv/bin/python -- -m mlxgate_cli service --distributed",
              file=sys.stderr)
        return 2
    if grp.rank() == 0:
        return None
    from mlxgate_cli.stack import ensure_default_model

    return distributed.run_follower(config.mlx, lambda: ensure_default_model(config))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verb", None):  # a client verb: an HTTP client of a running server
        return client_cli.run_verb(args)
    # Before any thread starts: fewer malloc arenas keep large requests' freed
    # buffers reusable instead of parked per thread (mlxgate/memory.py).
    from mlxgate.memory import limit_arenas

    limit_arenas()
    if args.command == "make-test-model" and (args.vision or args.arch != "idefics3"):  # (--arch implies --vision)
        from backends.mlx.vision.testmodel import write_test_vlm
        from backends.mlx.vision.testmodel_qwen import NAMES as QWEN_VL_NAMES, write_test_qwen_vl

        out_dir = Path(args.dir).expanduser()
        if args.arch in QWEN_VL_NAMES:
            print(write_test_qwen_vl(out_dir, name=args.name or QWEN_VL_NAMES[args.arch], seed=args.seed,
                                     arch=args.arch))
        else:
            print(write_test_vlm(out_dir, name=args.name or "", seed=args.seed, arch=args.arch))
        return 0
    if args.command == "make-test-model":
        from backends.mlx.testmodel import CONTEXT, write_test_model

        path = write_test_model(Path(args.dir).expanduser(), name=args.name or "tiny-llama", seed=args.seed,
                                size=args.size, context=args.context or CONTEXT, ending=args.ending)
        print(path)
        return 0
    if args.command == "usage":
        from mlxgate_cli.usage import run

        return run(args.host, args.since, args.until, args.group_by, args.json, os.environ)

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
    from mlxgate_cli import serve
    from mlxgate_cli.shutdown import exit_now, run_loop
    from mlxgate_cli.workers import WorkersFailed

    if config.mlx.distributed and config.mlx.enabled:
        follower_status = _distributed_rank(config)
        if follower_status is not None:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(follower_status)

    runner = serve.serve if args.command == "serve" else serve.serve_service_only
    status = 0
    try:
        run_loop(runner(config, dict(os.environ)))
    except KeyboardInterrupt:
        pass
    except BindError as e:  # a port in use: one line, no traceback
        print(f"mlxgate: {e}", file=sys.stderr)
        status = 2
    except WorkersFailed as e:  # a worker could not start, or kept exiting
        print(f"mlxgate: {e}", file=sys.stderr)
        status = 1
    exit_now(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
