"""One HTTP worker process of ``mlxgate serve --workers N`` (started by
``mlxgate_cli.workers``, never by hand).

It runs the aiohttp front on the listening socket the parent bound and
handed down (``web.SockSite``), calling the parent's inference service over
the private Unix-domain gRPC socket with the parent's drain pass
(``front_token``), as a front with ``front_channel = "grpc"`` does.

The parent talks to it over one end of a socket pair (``--control FD``):

- parent → worker: one JSON line, the settings (the server configuration,
  API keys included, so they never appear in a command line);
- worker → parent: ``ready`` once the front accepts requests;
- end of file from the parent: the parent is gone (killed, crashed), so the
  service is gone too: the worker exits at once.  This works on every
  platform (no Linux-only ``PR_SET_PDEATHSIG``).

SIGTERM (from the parent) drains like a single process: new requests 503,
those in flight run on for ``shutdown_grace`` seconds, then are ended; a
second SIGTERM ends them at once.  SIGINT is ignored: a Ctrl-C in a terminal
reaches the whole process group, and the parent forwards it as SIGTERM.

HTTP metrics go to prometheus_client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set by the parent before this process starts);
``/metrics`` serves the parent's service metrics followed by every worker's
HTTP metrics summed (``gateway.metrics.multiprocess_metrics_handler``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Optional

from aiohttp import ClientSession, UnixConnector, web
from prometheus_client import CollectorRegistry

from gateway.app import begin_drain, create_app, end_calls, idle_timeout, wait_idle
from gateway.serverlog import server_logger
from gateway.metrics import HttpMetrics, multiprocess_metrics_handler
from mlxgate.config import ServerConfig
from mlxgate.memory import freeze_startup_objects, resident_memory_bytes
from mlxgate_cli.shutdown import STOP_TIMEOUT, Signals, exit_now, first_done, run_loop

log = logging.getLogger("mlxgate.worker")

#: The response header naming the worker that answered (1..N).
WORKER_HEADER = "x-mlxgate-worker"

#: Once a worker stops accepting, how long the connections it accepted just
#: before may take to send their request (answered 503) before they are closed.
ACCEPTED_LINGER = 1.0


def _read_settings(control: socket.socket) -> dict[str, Any]:
    with control.makefile("rb") as f:
        line = f.readline()
    if not line:
        raise SystemExit("mlxgate worker: the parent closed the control socket before sending the settings")
    return json.loads(line)


def _watch_parent(loop: asyncio.AbstractEventLoop, control: socket.socket, index: int) -> None:
    """Exit at once when the parent's end of the control socket closes."""
    control.setblocking(False)

    def readable() -> None:
        try:
            data = control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            log.error("worker %d: the parent process is gone; exiting", index)
            logging.shutdown()
            os._exit(1)

    loop.add_reader(control.fileno(), readable)


async def run(settings: dict[str, Any], control: socket.socket) -> None:
    index = int(settings["index"])
    cfg = ServerConfig(**settings["server"])
    loop = asyncio.get_running_loop()
    _watch_parent(loop, control, index)
    signals = Signals((signal.SIGTERM,))

    # Values go to the multiprocess files; this registry is never served.
    http_metrics = HttpMetrics(CollectorRegistry())
    app = create_app(cfg, settings["grpc_target"], extra_middlewares=[http_metrics.middleware],
                     front_token=settings["front_token"])
    session: Optional[ClientSession] = None

    async def service_metrics() -> bytes:
        nonlocal session
        if session is None:
            session = ClientSession(connector=UnixConnector(path=settings["metrics_socket"]))
        async with session.get("http://mlxgate/metrics") as r:
            r.raise_for_status()
            return await r.read()

    app.router.add_get("/metrics", multiprocess_metrics_handler(os.environ["PROMETHEUS_MULTIPROC_DIR"],
                                                                service_metrics))
    worker_id = str(index)

    #: The connections that had a response started since the drain began.
    answered: set[object] = set()

    async def name_worker(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = worker_id
        if signals.stop.is_set():
            answered.add(request.protocol)

    app.on_response_prepare.append(name_worker)
    listener = socket.socket(fileno=int(settings["listen_fd"]))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=STOP_TIMEOUT,
                           keepalive_timeout=idle_timeout(app), logger=server_logger())
    await runner.setup()
    reporting: Optional[asyncio.Future] = None
    try:
        await web.SockSite(runner, listener).start()
        log.info("worker %d (pid %d) serving HTTP", index, os.getpid())
        freeze_startup_objects()
        control.sendall(b"ready\n")
        reporting = asyncio.ensure_future(_report_memory(control))
        await signals.stop.wait()
        await _drain(app, cfg.shutdown_grace, signals.hurry)
        await _stop_accepting(runner, answered)
    finally:
        if reporting is not None:
            reporting.cancel()
        await runner.cleanup()
        if session is not None:
            await session.close()


#: How often a worker tells the parent its resident memory (for /metrics).
MEMORY_REPORT_INTERVAL = 2.0


async def _report_memory(control: socket.socket) -> None:
    while True:
        with contextlib.suppress(OSError):  # BlockingIOError: the parent is not reading; next time
            control.send(f"rss {resident_memory_bytes()}\n".encode())
        await asyncio.sleep(MEMORY_REPORT_INTERVAL)


async def _drain(app: web.Application, grace: float, hurry: asyncio.Event) -> None:
    """As ``Stack.drain`` for a front alone: refuse new requests, wait for
    those in flight up to ``grace`` (or ``hurry``), then end the rest."""
    begin_drain(app)
    log.info("draining: refusing new requests, waiting up to %.0f s for those in flight", grace)
    started = time.monotonic()
    await first_done(wait_idle(app, grace), hurry.wait())
    ended = end_calls(app)
    if ended:
        log.warning("shutdown: after %.1f s, ended the %d calls still running in this worker",
                    time.monotonic() - started, ended)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wait_idle(app, None), STOP_TIMEOUT)


async def _stop_accepting(runner: web.AppRunner, answered: set[object]) -> None:
    """Stop taking connections off the shared socket, then give each open
    connection not answered since the drain began up to ``ACCEPTED_LINGER``
    seconds to send its request (answered 503: draining).  Closing them at
    once would drop a client that connected just before, or one about to use
    its kept-alive connection, without an answer although another worker
    still serves the port."""
    for site in runner.sites:
        await site.stop()
    server = runner.server
    deadline = time.monotonic() + ACCEPTED_LINGER
    while server is not None and time.monotonic() < deadline and any(
        conn not in answered for conn in server.connections
    ):
        await asyncio.sleep(0.02)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mlxgate-worker", description="an HTTP worker of mlxgate serve --workers")
    ap.add_argument("--control", type=int, required=True, help="file descriptor of the control socket")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control)
    settings = _read_settings(control)
    from mlxgate.memory import limit_arenas

    limit_arenas()  # as mlxgate_cli.main, before the event loop's threads
    logging.basicConfig(
        level=str(settings["log_level"]).upper(),
        format=f"%(asctime)s %(levelname)s worker-{settings['index']} %(name)s: %(message)s",
    )
    status = 0
    try:
        run_loop(run(settings, control))
    except Exception:
        log.exception("worker %s failed", settings["index"])
        status = 1
    exit_now(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
