"""Ports a test hands to another server or process: reserved, never guessed.

"Bind port 0, read the number, close, hand it on" leaves the port free until
the other side binds it, seconds later when that side is a process that has
to start Python: meanwhile any port-0 bind or outgoing connection on the
machine (another test, another suite running beside this one) may take it,
and a listener with ``SO_REUSEPORT`` (an MLX ring, a gRPC server) may even
share it and take the connections meant for the test's server.

A :class:`HeldPort` keeps the port bound (never listening) for as long as the
test needs it.  It is bound first without any reuse option, so the kernel
hands out only a port that nobody holds, then marked ``SO_REUSEADDR`` and
``SO_REUSEPORT`` so that the server it is meant for (aiohttp, gRPC, MLX's
ring, ``http.server``: all set ``SO_REUSEADDR``) can bind beside it.  While
it is held, the kernel gives the port to no port-0 bind and no outgoing
connection, a bind without reuse options fails, and a connection to it is
refused until the intended server listens: also the way to get an address
where nothing answers.
"""

from __future__ import annotations

import socket
from typing import Iterator, Optional

import pytest

HOST = "127.0.0.1"


class HeldPort:
    """One reserved port on 127.0.0.1 (``port``, ``address``); ``close()`` releases it."""

    def __init__(self, port: int = 0) -> None:
        self._sock: Optional[socket.socket] = socket.socket()
        try:
            self._sock.bind((HOST, port))  # exclusive: fails if anything holds the port
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "HeldPort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def held_ports(n: int) -> list[HeldPort]:
    """``n`` reserved ports, each chosen by the kernel."""
    return [HeldPort() for _ in range(n)]


def consecutive_held_ports(n: int, tries: int = 100) -> list[HeldPort]:
    """``n`` reserved consecutive ports (``mlx.launch --starting-port`` uses
    base, base + 1, ...): the kernel's choice for the first, then the next
    ones, held as they are found free; another base when one is taken."""
    for _ in range(tries):
        ports = [HeldPort()]
        try:
            for i in range(1, n):
                if ports[0].port + i > 65535:
                    raise OSError("past the last port")
                ports.append(HeldPort(ports[0].port + i))
            return ports
        except OSError:
            for p in ports:
                p.close()
    raise RuntimeError(f"no {n} consecutive free ports in {tries} tries")


@pytest.fixture
def held_port() -> Iterator[HeldPort]:
    """A reserved port for one test: for a server the test starts on it, or an
    address where nothing listens (connections refused)."""
    with HeldPort() as port:
        yield port
