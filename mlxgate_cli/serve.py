"""``mlxgate serve`` and ``mlxgate service``: start a Stack, run it until
SIGINT/SIGTERM, drain, stop.

With ``server.workers`` > 1 the front runs in worker processes
(``mlxgate_cli/workers.py``); both that and the one-process server build on
``mlxgate_cli/stack.py``, which imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mlxgate.config import Config
from mlxgate.memory import freeze_startup_objects
from mlxgate.ports import bind_error, check_free
from mlxgate_cli.shutdown import Signals
from mlxgate_cli.stack import Stack, start_stack
from mlxgate_cli.workers import serve_workers


async def _run_until_signalled(stack: Stack) -> None:
    signals = Signals()
    try:
        await signals.stop.wait()
        await stack.drain(stack.config.server.shutdown_grace, signals.hurry)
    finally:
        await stack.stop()


async def serve(config: Config, env: Mapping[str, str]) -> None:
    """``mlxgate serve``: front and (unless --grpc-target) the service; with
    ``server.workers`` > 1, the front in that many worker processes."""
    if config.server.workers > 1:
        await serve_workers(config, env)
        return
    stack = await start_stack(config, env)
    freeze_startup_objects()
    print(f"mlxgate: HTTP {stack.http_url}  gRPC {stack.grpc_target}", flush=True)
    await _run_until_signalled(stack)


async def serve_service_only(config: Config, env: Mapping[str, str]) -> None:
    """``mlxgate service``: the gRPC service with /metrics on its own port
    (keyed like the front's: a key unless ``server.metrics_public``)."""
    from gateway.app import start_http
    from gateway.metrics import metrics_app

    config.server.grpc_target = None
    host, port = config.server.grpc_host, config.server.metrics_port
    check_free("metrics", host, port)
    stack = await start_stack(config, env, front=False)
    try:
        metrics_cfg = dataclasses.replace(config.server, host=host)
        stack.metrics_http = await start_http(metrics_app(metrics_cfg, stack.registry), host, port)
    except OSError as e:
        await stack.stop()
        raise bind_error("metrics", host, port, e) from None
    freeze_startup_objects()
    print(f"mlxgate: gRPC {stack.grpc_target}  metrics http://{host}:{stack.metrics_http.port}", flush=True)
    await _run_until_signalled(stack)
