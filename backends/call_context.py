"""What the inference service knows about the call it is serving: its
deadline and its request id, for the backends that call further.

The service sets them once per call (``enter``, in ``backends.service``'s
method handlers, from the gRPC context); the call's task and everything it
awaits (the router, a backend's generator) read them with ``remaining`` and
``request_id``.  A ``ContextVar``: each call runs in its own task, so calls
never see each other's.  Outside a call (a test calling a backend directly)
there is no deadline and no request id; ``detached()`` leaves the call for
work done on everyone's behalf (the router filling a shared cache), which
must not end with one caller's deadline nor carry its id.

The remote backend (``backends/remote``) is the reader: a call it makes to
another mlxgate service carries this call's remaining time as its gRPC
deadline, and its request id as ``x-request-id``.

One hop only: the remote backend marks every call it makes with
``x-mlxgate-forwarded: 1``; a call that arrives so marked is ``forwarded``,
and the router serves it from its own backends only, never from its remote
services.  So two fronts that list each other as remotes cannot send a
request back and forth, and a remote's model list shows what that machine
serves itself.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

from mlxgate.limits import MAX_REQUEST_ID_CHARS


#: Metadata marking a call made by another mlxgate's remote backend.
FORWARDED_KEY = "x-mlxgate-forwarded"


@dataclass(frozen=True)
class Call:
    #: ``time.monotonic()`` by which the caller wants its answer; None: no deadline.
    deadline: Optional[float] = None
    #: The caller's ``x-request-id`` ("" when it sent none).
    request_id: str = ""
    #: Made by another mlxgate's remote backend: served without remotes.
    forwarded: bool = False
    #: The caller's key name (``mlxgate.keyring``; "" without keys) and the
    #: dialect it spoke at the front ("" for a gRPC client): budgets and the ledger.
    key: str = ""
    dialect: str = ""


_current: ContextVar[Call] = ContextVar("mlxgate_call", default=Call())


def enter(time_remaining: Optional[float], request_id: Optional[str], forwarded: bool = False,
          key: str = "", dialect: str = "") -> None:
    """Called by the service at the start of a call (in the call's own task)."""
    deadline = None if time_remaining is None else time.monotonic() + max(0.0, time_remaining)
    _current.set(Call(deadline, (request_id or "")[:MAX_REQUEST_ID_CHARS], forwarded, key, dialect))


def remaining() -> Optional[float]:
    """Seconds left of the current call's deadline (never negative); None: no deadline."""
    deadline = _current.get().deadline
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def request_id() -> str:
    return _current.get().request_id


def forwarded() -> bool:
    return _current.get().forwarded


def key() -> str:
    return _current.get().key


def dialect() -> str:
    return _current.get().dialect


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Run the block outside the current call (no deadline, no request id;
    still forwarded if the call was, which decides what may be asked)."""
    token = _current.set(Call(forwarded=forwarded(), key=key()))
    try:
        yield
    finally:
        _current.reset(token)
