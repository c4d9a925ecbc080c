"""Typed application state and per-request values the handlers read."""

from __future__ import annotations

import os
import re
from typing import Optional

from aiohttp import web

from gateway.client import InferenceClient
from mlxgate.config import ServerConfig
from mlxgate.keyring import NamedKey
from mlxgate.v1 import inference_pb2 as pb

CLIENT_KEY = web.AppKey("inference_client", InferenceClient)
SERVER_CONFIG_KEY = web.AppKey("server_config", ServerConfig)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
#: The SHA-256 digest of the API key the caller presented, once the trust
#: middleware has accepted it (absent when no keys are configured).  Handlers
#: read it to keep what a key stores private to it; it is never logged.
CALLER_KEY = web.RequestKey("caller_key_digest", bytes)
#: The caller's key from the key table (its name, admin flag and limits; no
#: secret), once the trust middleware has accepted it.
CALLER = web.RequestKey("caller", NamedKey)

#: Header a caller may send to correlate logs; echoed on every response.
REQUEST_ID_HEADER = "X-Request-Id"
#: Response header naming the backend that answered (streams too: see backend_header).
BACKEND_HEADER = "x-mlxgate-backend"


def backend_header(ev: pb.GenerateResponse) -> dict[str, str]:
    """The header naming the backend an event names: a stream's first event
    (the router names the backend on it) or a whole answer's Done; empty when
    it names none (a first chunk from a service without a router)."""
    backend = ev.done.backend if ev.WhichOneof("event") == "done" else ev.chunk.backend
    return {BACKEND_HEADER: backend} if backend else {}

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id(request: web.Request) -> str:
    """The caller's X-Request-Id when it is sane (it goes into gRPC metadata), else a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    # 32 random hex digits, as uuid4().hex (whose object costs four times more).
    return given if _REQUEST_ID_OK.match(given) else os.urandom(16).hex()


def request_id(request: web.Request) -> str:
    rid = request.get(REQUEST_ID_KEY)
    if rid is None:
        rid = request[REQUEST_ID_KEY] = new_request_id(request)
    return rid


def caller_key(request: web.Request) -> Optional[bytes]:
    """The digest of the caller's API key (``CALLER_KEY``), or None without keys."""
    return request.get(CALLER_KEY)


def client(request: web.Request) -> InferenceClient:
    return request.app[CLIENT_KEY]
