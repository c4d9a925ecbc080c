"""``mlxgate serve --workers N``: N HTTP front processes in front of one inference service.

The parent process (this module):

1. binds the HTTP listening socket once (SO_REUSEADDR, never SO_REUSEPORT,
   so a second mlxgate on the port still fails with "address in use");
2. runs the inference service as ``mlxgate serve`` does (gRPC on its TCP
   port for every other client), plus a private Unix-domain gRPC socket for
   its own workers, and a private ``/metrics`` over another Unix socket
   serving the service's registry; both sockets live in a directory only
   this user can enter (mode 0700, sockets 0600), removed at exit;
3. starts N workers (``python -m mlxgate_cli.worker``, see that module),
   each handed the listening socket (``pass_fds``) and one end of a socket
   pair that carries its settings and its "ready", and tells each side when
   the other is gone: a worker whose parent dies exits at once.

The kernel hands each new connection to one of the workers waiting on the
shared socket; a connection stays with its worker (HTTP keep-alive).

A worker that exits while the server runs is logged and started again; a
worker that cannot start, or one that exits ``MAX_RESTARTS`` times within
``RESTART_WINDOW`` seconds, stops the whole server with status 1 and a
one-line reason (``WorkersFailed``) rather than restarting it forever.

SIGTERM/SIGINT drains: the workers are sent SIGTERM (they refuse new
requests and finish those in flight for ``shutdown_grace`` seconds; their
gRPC calls carry the parent's drain pass, ``Stack.front_token``), the
service drains alongside (NOT_SERVING, other gRPC callers refused); once
every worker has exited the service stops.  A second signal is forwarded:
the workers end what is left at once.

Metrics: the workers' HTTP metrics use prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR`` in the private directory; a dead
worker's live gauges are dropped with ``mark_process_dead``); any worker's
``/metrics`` serves the parent's service metrics followed by all workers'
HTTP metrics summed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mlxgate.config import Config
from mlxgate.memory import freeze_startup_objects
from mlxgate.ports import bind_error
from mlxgate_cli.shutdown import STOP_TIMEOUT, Signals
from mlxgate_cli.stack import Stack, check_ports, ensure_default_model, log_notes

if TYPE_CHECKING:
    from gateway.app import RunningHTTP

log = logging.getLogger(__name__)

#: A worker that has not said "ready" by then failed to start.
START_TIMEOUT = 120.0
#: More exits than this within RESTART_WINDOW seconds stop the server.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: After the drain, how long the workers may take to exit before they are killed.
_EXIT_MARGIN = 5.0


class WorkersFailed(Exception):
    """The workers cannot be kept running; ``str()`` is one line for the user."""


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound once for every worker (SO_REUSEADDR as
    aiohttp's own site sets it, never SO_REUSEPORT)."""
    sock: Optional[socket.socket] = None
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise bind_error("HTTP", host, port, e) from None
    return sock


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    control: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The exit status, once the process has ended.
    ended: "asyncio.Task[int]"
    #: Resident memory, as the worker last reported it.
    rss: Optional[int] = None

    async def _wait(self) -> int:
        with contextlib.suppress(OSError):
            while line := await self.control.readline():
                name, _, value = line.partition(b" ")
                if name == b"rss":
                    with contextlib.suppress(ValueError):
                        self.rss = int(value)
        # End of file: the worker's end closed, that is, the process is ending.
        while self.proc.poll() is None:
            await asyncio.sleep(0.02)
        self.writer.close()
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Supervisor:
    """Starts the workers, restarts one that exits, stops them all."""

    def __init__(self, count: int, listener: socket.socket, settings: dict, env: Mapping[str, str],
                 multiproc_dir: Path) -> None:
        self.count = count
        self.listener = listener
        self.settings = settings
        self.env = dict(env)
        self.multiproc_dir = multiproc_dir
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        #: Set with ``reason`` when the workers cannot be kept running.
        self.failed = asyncio.Event()
        self.reason = ""
        self._keepers: list[asyncio.Task] = []

    async def _spawn(self, index: int) -> _Worker:
        parent_end, child_end = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlxgate_cli.worker", "--control", str(child_end.fileno())],
                pass_fds=(child_end.fileno(), self.listener.fileno()),
                env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(self.multiproc_dir)},
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # nothing of a worker's lands on the parent's stdout
            )
        finally:
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        worker = _Worker(index, proc, reader, writer, None)  # type: ignore[arg-type]
        self.workers[index] = worker
        try:
            writer.write(json.dumps({**self.settings, "index": index}).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
            worker.signal(signal.SIGKILL)
        except OSError:  # it is gone already (a broken pipe)
            line = b""
        worker.ended = asyncio.ensure_future(worker._wait())
        if line != b"ready\n":
            status = await worker.ended
            raise WorkersFailed(f"HTTP worker {index} failed to start: it {_describe(status)} (see its log above)")
        log.info("HTTP worker %d started (pid %d)", index, proc.pid)
        return worker

    async def start(self) -> None:
        results = await asyncio.gather(*(self._spawn(i) for i in range(1, self.count + 1)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self._keepers = [asyncio.ensure_future(self._keep(i)) for i in range(1, self.count + 1)]

    def _dead(self, worker: _Worker) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(worker.proc.pid, str(self.multiproc_dir))

    async def _keep(self, index: int) -> None:
        exits: collections.deque[float] = collections.deque()
        while True:
            worker = self.workers[index]
            status = await worker.ended
            self._dead(worker)
            if self.stopping:
                return
            now = time.monotonic()
            exits.append(now)
            while exits and exits[0] < now - RESTART_WINDOW:
                exits.popleft()
            if len(exits) > MAX_RESTARTS:
                self._fail(f"HTTP worker {index} {_describe(status)}, its {len(exits)}th exit within "
                           f"{RESTART_WINDOW:.0f} s: stopping")
                return
            log.warning("HTTP worker %d (pid %d) %s; starting another", index, worker.proc.pid, _describe(status))
            try:
                await self._spawn(index)
            except WorkersFailed as e:
                self._fail(str(e))
                return

    def _fail(self, reason: str) -> None:
        log.error("%s", reason)
        self.reason = reason
        self.failed.set()

    def memory(self) -> dict[str, int]:
        """Each live worker's resident memory, by its process label."""
        return {f"worker-{i}": w.rss for i, w in sorted(self.workers.items())
                if w.rss is not None and w.proc.poll() is None}

    def signal_all(self, sig: int) -> None:
        for w in list(self.workers.values()):
            w.signal(sig)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker and wait up to ``timeout`` for them to exit
        (they drain); then SIGKILL what is left."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        ended = [w.ended for w in self.workers.values() if w.ended is not None]
        if ended:
            await asyncio.wait(ended, timeout=timeout)
        late = [w for w in self.workers.values() if w.proc.poll() is None]
        for w in late:
            log.warning("HTTP worker %d (pid %d) did not exit in time; killing it", w.index, w.proc.pid)
            w.signal(signal.SIGKILL)
        for w in self.workers.values():
            if w.ended is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(w.ended), _EXIT_MARGIN)
            elif w.proc.poll() is None:  # still starting
                w.signal(signal.SIGKILL)
                w.proc.wait()
            self._dead(w)
        for k in self._keepers:
            k.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)


_PRIVATE_PREFIX = "mlxgate-workers-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def private_dir() -> Path:
    """A new directory only this user can enter (0700), named after this
    process, for the sockets and the metrics files; those left behind by a
    server that was killed (its process gone) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for stale in tmp.glob(f"{_PRIVATE_PREFIX}*"):
        pid = stale.name[len(_PRIVATE_PREFIX):].split("-", 1)[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and stale.stat().st_uid == os.getuid() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-"))


async def _private_metrics(registry, path: Path) -> "RunningHTTP":
    """The service's registry as /metrics on a Unix socket, for the workers."""
    from aiohttp import web

    from gateway.app import RunningHTTP
    from gateway.metrics import metrics_handler

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    os.chmod(path, 0o600)
    return RunningHTTP(runner=runner, port=0)


async def serve_workers(config: Config, env: Mapping[str, str]) -> None:
    """``mlxgate serve`` with ``server.workers`` > 1."""
    cfg = config.server
    check_ports(config)
    listener = bind_http(cfg.host, cfg.port)
    port = listener.getsockname()[1]
    private = private_dir()
    multiproc_dir = private / "prometheus"
    multiproc_dir.mkdir()
    stack = Stack(config)
    metrics_http: Optional[RunningHTTP] = None
    supervisor: Optional[Supervisor] = None
    try:
        log_notes(config)
        ensure_default_model(config)
        await stack.start_service(env, process="service", unix_path=str(private / "service.sock"),
                                  other_memory=lambda: supervisor.memory() if supervisor is not None else {})
        metrics_http = await _private_metrics(stack.registry, private / "metrics.sock")
        settings = {
            "server": dataclasses.asdict(dataclasses.replace(cfg, port=port)),
            "log_level": config.log_level,
            "front_token": stack.front_token,
            "grpc_target": f"unix:{private / 'service.sock'}",
            "metrics_socket": str(private / "metrics.sock"),
            "listen_fd": listener.fileno(),
        }
        supervisor = Supervisor(cfg.workers, listener, settings, env, multiproc_dir)
        await supervisor.start()
        freeze_startup_objects()
        print(f"mlxgate: HTTP http://{cfg.host}:{port}  gRPC {stack.grpc_target}  ({cfg.workers} HTTP workers)",
              flush=True)
        log.info("HTTP front on http://%s:%d: %d worker processes (gRPC service %s)", cfg.host, port,
                 cfg.workers, stack.grpc_target)
        signals = Signals()
        stop = asyncio.ensure_future(signals.stop.wait())
        failed = asyncio.ensure_future(supervisor.failed.wait())
        await asyncio.wait([stop, failed], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failed.cancel()

        async def forward_hurry() -> None:
            await signals.hurry.wait()
            supervisor.signal_all(signal.SIGTERM)  # their second: end what is left now

        hurry = asyncio.ensure_future(forward_hurry())
        grace = cfg.shutdown_grace
        try:
            await asyncio.gather(stack.drain(grace, signals.hurry),
                                 supervisor.stop(grace + STOP_TIMEOUT + _EXIT_MARGIN))
        finally:
            hurry.cancel()
        if supervisor.reason:
            raise WorkersFailed(supervisor.reason)
    finally:
        if supervisor is not None and not supervisor.stopping:
            await supervisor.stop(0)
        await stack.stop()
        if metrics_http is not None:
            await metrics_http.stop()
        listener.close()
        shutil.rmtree(private, ignore_errors=True)
