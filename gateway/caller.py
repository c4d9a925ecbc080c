"""Whom the front speaks for on a call to the service.

The trust middleware (``gateway/security.py``) names the caller of each
request it lets through: its key's name from the key table (never the
secret) and the dialect it speaks.  The inference client
(``gateway/client.py``) sends both with every call it makes for the request
(``x-mlxgate-caller``, ``x-mlxgate-dialect``), and the service, trusting
this front's token, books the request to that key (its limits, its budget,
the ledger).  A ``ContextVar``: each request runs in its own task.

For a key with rate limits, the service sends the ``x-ratelimit-*`` values
as initial metadata; the client copies them here and ``on_response_prepare``
puts them on the answer (streams included), so clients can pace themselves.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web

#: Must match backends.gate.CALLER_KEY and backends.spend.service.DIALECT_KEY.
CALLER_KEY = "x-mlxgate-caller"
DIALECT_KEY = "x-mlxgate-dialect"
RATE_HEADER_PREFIX = "x-ratelimit-"


@dataclass
class OnBehalf:
    #: The key's name ("" without keys).
    name: str
    dialect: str
    #: The key has rate limits: its answers carry ``x-ratelimit-*``.
    limited: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.name:
            return ((CALLER_KEY, self.name), (DIALECT_KEY, self.dialect))
        return ((DIALECT_KEY, self.dialect),)

    def take_rate_headers(self, metadata: Any) -> None:
        for k, v in metadata or ():
            if k.startswith(RATE_HEADER_PREFIX):
                self.headers[k] = v if isinstance(v, str) else v.decode("latin-1")


_current: ContextVar[Optional[OnBehalf]] = ContextVar("mlxgate_on_behalf", default=None)
ON_BEHALF = web.RequestKey("on_behalf", OnBehalf)


def speak_for(request: web.Request, name: str, dialect: str, limited: bool = False) -> None:
    ob = OnBehalf(name, dialect, limited)
    request[ON_BEHALF] = ob
    _current.set(ob)


def on_behalf() -> Optional[OnBehalf]:
    return _current.get()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    ob = request.get(ON_BEHALF)
    if ob is not None and ob.headers:
        for k, v in ob.headers.items():
            response.headers.setdefault(k, v)
