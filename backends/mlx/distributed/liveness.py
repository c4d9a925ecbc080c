"""The heartbeat: a TCP side channel outside MLX, because a collective with
a vanished peer never returns.  Rank 0 runs the :class:`Watchdog`, every other
rank a :class:`HeartbeatClient`."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("backends.mlx.distributed")

#: A follower's heartbeat period (the silence after which a rank is dead is
#: ``MLXConfig.distributed_timeout``, sent to the followers in the hello).
HEARTBEAT_S = 0.5
#: How long rank 0 waits for every follower's first heartbeat at start-up.
CONNECT_TIMEOUT_S = 60.0


def _leader_host() -> str:
    """Rank 0's address as the other ranks reach it: the ring's hostfile, or
    JACCL's coordinator; loopback when all ranks share one machine."""
    path = os.environ.get("MLX_HOSTFILE")
    if path:
        try:
            with open(path) as f:
                hosts = json.load(f)
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (OSError, ValueError, IndexError, TypeError):
            pass
    coord = os.environ.get("MLX_JACCL_COORDINATOR")
    if coord:
        return coord.rsplit(":", 1)[0]
    return "127.0.0.1"


class Watchdog:
    """Rank 0's end of the heartbeat channel."""

    def __init__(self, size: int, on_dead: Callable[[str], None], timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self._on_dead = on_dead
        self._lock = threading.Lock()
        self._seen: dict[int, float] = {}
        self._stats: dict[int, dict] = {}
        self._closed: set[int] = set()
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._started = 0.0
        #: Sent to the ranks over the ring (never on the heartbeat's TCP port):
        #: a line without it is not a rank's, and is ignored.
        self.secret = secrets.token_hex(16)
        #: Rank 0's own figures, set by whoever knows them (the backend).
        self.local: Callable[[], dict] = dict

    def start(self) -> tuple[str, int]:
        host = _leader_host()
        self._sock = socket.create_server((host, 0))
        self._started = time.monotonic()
        threading.Thread(target=self._accept, name="mlx-dist-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="mlx-dist-watchdog", daemon=True).start()
        return host, self._sock.getsockname()[1]

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="mlx-dist-heartbeat", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rank = None
        with conn, conn.makefile("rb") as lines:
            try:
                for line in lines:
                    beat = json.loads(line)
                    if not secrets.compare_digest(str(beat.pop("secret", "")), self.secret):
                        log.warning("distributed MLX watchdog: a heartbeat without the ranks' secret; "
                                    "connection closed")
                        break
                    rank = int(beat["rank"])
                    with self._lock:
                        self._seen[rank] = time.monotonic()
                        self._stats[rank] = beat
                    conn.sendall(b"ok\n")
            except (OSError, ValueError, KeyError):
                pass
        if rank is not None and not self._stop.is_set():
            with self._lock:
                self._closed.add(rank)

    def _watch(self) -> None:
        woke, skipped = time.monotonic(), False
        while not self._stop.wait(HEARTBEAT_S / 2):
            now, last = time.monotonic(), woke
            woke = now
            if now - last > HEARTBEAT_S * 2 and not skipped:
                # This process was not scheduled for a while (a loaded
                # machine): the beats may be waiting unread; judge next turn.
                skipped = True
                continue
            skipped = False
            with self._lock:
                seen, closed = dict(self._seen), set(self._closed)
            for rank in range(1, self.size):
                if rank in closed:
                    self._on_dead(f"rank {rank} closed its heartbeat connection (its process exited)")
                    return
                if rank in seen and now - seen[rank] > self.timeout:
                    self._on_dead(f"rank {rank} sent no heartbeat for {now - seen[rank]:.1f} s")
                    return
                if rank not in seen and now - self._started > CONNECT_TIMEOUT_S:
                    self._on_dead(f"rank {rank} never connected its heartbeat in {CONNECT_TIMEOUT_S:.0f} s")
                    return

    def status(self) -> list[dict]:
        now = time.monotonic()
        out = [{"rank": 0, "up": True, **self.local()}]
        with self._lock:
            for rank in range(1, self.size):
                beat = self._stats.get(rank, {})
                up = (rank in self._seen and rank not in self._closed
                      and now - self._seen[rank] <= self.timeout)
                out.append({"up": up, **beat, "rank": rank})
        return out


class HeartbeatClient:
    """A follower's end: a line every HEARTBEAT_S; rank 0 gone → this process exits."""

    def __init__(self, rank: int, host: str, port: int, stats: Callable[[], dict], timeout: float,
                 secret: str) -> None:
        self.rank = rank
        self._secret = secret
        self._stats = stats
        self.timeout = timeout
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._last_ok = time.monotonic()
        threading.Thread(target=self._send, name="mlx-dist-heartbeat", daemon=True).start()
        threading.Thread(target=self._read, name="mlx-dist-heartbeat-read", daemon=True).start()

    def _send(self) -> None:
        woke, skipped = time.monotonic(), False
        while True:
            try:
                beat = {**self._stats(), "rank": self.rank, "secret": self._secret}
                self._sock.sendall(json.dumps(beat).encode() + b"\n")
            except OSError as e:
                leader_lost(f"cannot reach rank 0's watchdog: {e}")
            now, last = time.monotonic(), woke
            woke = now
            if now - last > HEARTBEAT_S * 3 and not skipped:
                # As the watchdog: this process was not scheduled for a while (a
                # loaded machine), so rank 0's answers may be waiting unread; judge
                # next turn, once the reader had its chance.
                skipped = True
            else:
                skipped = False
                if now - self._last_ok > self.timeout:
                    leader_lost(f"rank 0 did not answer for {self.timeout:.1f} s")
            time.sleep(HEARTBEAT_S)

    def _read(self) -> None:
        try:
            with self._sock.makefile("rb") as lines:
                while True:
                    try:
                        line = lines.readline()
                    except socket.timeout:
                        continue
                    if not line:
                        break
                    self._last_ok = time.monotonic()
        except OSError:
            pass
        leader_lost("rank 0 closed the heartbeat connection")


def leader_lost(why: str) -> None:
    log.error("distributed MLX follower: %s; exiting", why)
    logging.shutdown()
    os._exit(1)
