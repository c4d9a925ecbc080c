"""Binding the listening ports: one clear error instead of a traceback.

Each port is exclusive: the HTTP site never sets SO_REUSEPORT and the gRPC
server is created with ``grpc.so_reuseport`` off, so a second ``mlxgate
serve`` on the same port fails to start instead of silently sharing its
traffic.  ``BindError`` (and ``PortInUse`` for the common case) carry a
one-line message naming the port; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import errno
import socket
from typing import Optional

#: Ollama's port: when it is taken, Ollama itself is the usual suspect.
OLLAMA_PORT = 11434


class BindError(Exception):
    """A listening port could not be bound; ``str()`` is one line for the user."""

    def __init__(self, what: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen for {what} on {_addr(host, port)}: {reason}")
        self.what = what
        self.host = host
        self.port = port


class PortInUse(BindError):
    """Another process (another mlxgate, Ollama, ...) already listens there."""

    def __init__(self, what: str, host: str, port: int) -> None:
        reason = f"port {port} is already in use"
        if port == OLLAMA_PORT:
            reason += " (Ollama may be running: stop `ollama serve` or quit the Ollama app, or choose another port)"
        super().__init__(what, host, port, reason)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(host: str, port: int) -> Optional[OSError]:
    """Try to bind ``host:port`` the way the servers do (SO_REUSEADDR, no
    SO_REUSEPORT) and release it at once; the error, or None when it is free."""
    if port == 0:
        return None
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return e
    err: Optional[OSError] = None
    for family, type_, proto, _, sockaddr in infos:
        with socket.socket(family, type_, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                err = err or e
    return err


def bind_error(what: str, host: str, port: int, error: Optional[OSError]) -> BindError:
    """The BindError for a failed bind; ``error`` is the OS's reason when known."""
    if error is not None and error.errno == errno.EADDRINUSE:
        return PortInUse(what, host, port)
    reason = (error.strerror or str(error)) if error is not None else "the address cannot be bound"
    return BindError(what, host, port, reason)


def check_free(what: str, host: str, port: int) -> None:
    """Raise ``BindError`` when ``host:port`` cannot be bound right now."""
    problem = bind_problem(host, port)
    if problem is not None:
        raise bind_error(what, host, port, problem)
