"""Who may call the HTTP front: one middleware, before any handler runs.

``TrustGuard(server_cfg)`` is built once per app (``create_app`` does it):
every pattern and key digest is prepared there, so the per-request work is a
few header look-ups, one precompiled regular expression and, with keys set,
one SHA-256 of the presented key.  Its ``middleware`` decides, in this order,
without ever reading the request body:

1. **Host allowlist** (DNS rebinding, Ollama's CVE-2024-28224).  Only when the
   front is bound to a loopback address: a ``Host`` (any port, any case) is
   accepted when ``local_host`` says so -- ``localhost``, a name ending in
   ``.localhost``, ``.local`` or ``.internal`` (``host.docker.internal``), the
   machine's own hostname, an IP literal that is loopback, private (RFC 1918,
   unique-local IPv6) or unspecified: names and addresses a public web page
   cannot make a browser resolve to this machine, Ollama's rule -- or when it
   is in ``ServerConfig.allowed_hosts``; any other is refused with 403.  No
   ``Host`` (HTTP/1.0) passes.  Bound to any other address there is no Host
   check, as in Ollama: then the API keys are the guard (``mlxgate.exposure``).
2. **Origin**.  A request with an ``Origin`` header outside the allowlist
   (``DEFAULT_ORIGINS`` plus ``ServerConfig.origins``, Ollama's ``*``
   wildcards; a bare ``*`` allows every origin) is refused with 403, whatever
   its method or content type: a cross-site ``text/plain`` POST never reaches
   a handler.  Requests without ``Origin`` (SDKs, curl) are unaffected.
3. **OPTIONS** is answered here on every route, without a key (browsers send
   none with a preflight): 204 with the CORS headers when an (allowed)
   ``Origin`` came with it, 204 with ``Allow`` otherwise, 404 on an unknown
   route.
4. **API keys**.  With ``api_keys`` set, every route but ``GET /`` and
   ``HEAD /`` (and ``/metrics`` when ``metrics_public``) needs
   ``Authorization: Bearer <key>`` or ``x-api-key: <key>``; otherwise 401
   with ``WWW-Authenticate: Bearer``.  Keys are compared as SHA-256 digests
   with ``hmac.compare_digest`` against every configured key, with no early
   exit, so neither a key's content nor its length shows in the timing.  No
   key, configured or presented, is ever logged or echoed.  The accepted
   key's digest is left on the request (``state.CALLER_KEY``) for handlers
   that keep what a key stores private to it (the Responses API's store).
5. **Admin keys**.  With keys set, the model-management routes
   (``mlxgate.admin``: pull, push, create, copy, delete, blobs) need one of
   ``admin_keys``; any other valid key gets 403.  Admin keys are valid on
   every route.
   that keep what a key stores private to it (the Responses API's store),
   and its name and limits (``state.CALLER``, a ``mlxgate.keyring.NamedKey``
   from the one key table) for the calls to the service, which speak for it.

Refusals are ``ApiError`` rendered by ``error_response``: the caller's dialect
(``{"error": "..."}`` on ``/api/*`` and ``/``; ``{"error": {"message", "type",
"param", "code"}}`` on ``/v1/*``; ``{"type": "error", "error": {"type",
"message"}}`` on ``/v1/messages*``).

``on_response_prepare`` (an ``app.on_response_prepare`` hook) puts
``Access-Control-Allow-Origin`` (echoing the origin), ``Vary: Origin`` and
``Access-Control-Expose-Headers`` on every answer to an allowed origin,
errors and streams included (the hook runs when a stream's headers go out).

**Where it sits.**  ``build_middlewares`` orders ``[*extra, guard, error]``:
the guard is the first middleware that can answer, so nothing that reads a
body or calls the inference service runs before it.  The ``extra``
middlewares (the metrics layer) only observe and sit outside it on purpose:
refused requests are counted in ``mlxgate_http_requests_total`` with their
401/403 status, so a rebinding attempt or a client with a stale key shows up
on the dashboard instead of vanishing.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Awaitable, Callable, Iterable, Mapping, Optional

from aiohttp import hdrs, web

from gateway.caller import speak_for
from gateway.errors import ApiError, error_response, from_http, request_dialect
from gateway.state import BACKEND_HEADER, CALLER, CALLER_KEY, REQUEST_ID_HEADER
from mlxgate.admin import NEEDS_ADMIN, is_admin_path
from mlxgate.config import ORIGINS_ENV, ServerConfig, env_var
from mlxgate.exposure import is_loopback
from mlxgate.keyring import KeyRing, NamedKey, digest

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The allowed origin, once the guard has accepted it (read by the CORS hook).
CORS_ORIGIN_KEY = web.RequestKey("cors_origin", str)

#: Ollama's default origins (envconfig.AllowedOrigins); configured ones are added.
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        pattern
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for pattern in (f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

#: Endings of names that no public DNS answer can point at this machine: RFC 6761's
#: ``.localhost``, mDNS's ``.local`` (RFC 6762), ICANN's private-use ``.internal``
#: (Docker's ``host.docker.internal``, Podman's ``host.containers.internal``).
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
#: Private networks (RFC 1918, RFC 4193 unique-local): Go's ``netip.Addr.IsPrivate``,
#: which Ollama's guard uses (Python's ``is_private`` also counts documentation ranges).
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)

#: Distinct ``Host`` values whose verdict the guard remembers (a client sends
#: the same one on every request; a flood of new ones only clears the memory).
HOST_VERDICTS_MAX = 256
#: Request headers a preflight allows when it names none (it usually does: then they are echoed).
ALLOW_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "Accept",
        "User-Agent",
        "X-Requested-With",
        "x-api-key",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
        REQUEST_ID_HEADER,
        "OpenAI-Beta",
        "OpenAI-Organization",
        "OpenAI-Project",
        "x-stainless-arch",
        "x-stainless-async",
        "x-stainless-custom-poll-interval",
        "x-stainless-helper-method",
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-package-version",
        "x-stainless-poll-helper",
        "x-stainless-retry-count",
        "x-stainless-runtime",
        "x-stainless-runtime-version",
        "x-stainless-timeout",
    )
)
#: Response headers a browser script may read.
EXPOSE_HEADERS = ", ".join((REQUEST_ID_HEADER, BACKEND_HEADER, "Retry-After"))
#: How long a browser may reuse a preflight answer (Chromium caps it at 2 h).
PREFLIGHT_MAX_AGE = "7200"
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"

#: Longest piece of a refused Host/Origin value quoted back in a 403.
_QUOTE_MAX = 100


class OriginMatcher:
    """Ollama's origin patterns (gin-contrib/cors with wildcards), compiled once.

    A pattern matches the whole origin, case-insensitively; each ``*`` matches
    any run of characters; a bare ``*`` matches every origin.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = [p.strip().lower() for p in patterns if p.strip()]
        self.any = "*" in pats
        self.exact = frozenset(p for p in pats if "*" not in p)
        wild = [p for p in pats if "*" in p and p != "*"]
        self._wild = (
            re.compile("|".join(".*".join(map(re.escape, p.split("*"))) for p in wild), re.IGNORECASE | re.DOTALL)
            if wild
            else None
        )

    def allowed(self, origin: str) -> bool:
        if self.any:
            return True
        o = origin.strip().lower()
        if o in self.exact:
            return True
        return self._wild is not None and self._wild.fullmatch(o) is not None


def host_name(value: str) -> str:
    """The host part of a ``Host`` header, lower-cased, without port or final
    dot; IPv6 literals keep their brackets (``[::1]``)."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[: end + 1] if end != -1 else v
    if v.count(":") == 1:
        v = v.partition(":")[0]
    return v.rstrip(".")


def _ip_is_local(name: str) -> bool:
    """A loopback, private or unspecified IP literal ("127.0.0.2", "[::1]",
    "192.168.1.20", "[fd00::1]", "0.0.0.0"); IPv4-mapped IPv6 as its IPv4."""
    if not name or not (name[0].isdigit() or name[0] == "["):
        return False
    try:
        addr = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified or any(addr in net for net in PRIVATE_NETWORKS)


def machine_names(hostname: str) -> frozenset[str]:
    """The machine's own names from its hostname as the OS reports it
    (``socket.gethostname()``): that name, and without ``.local`` when the OS
    reports it with (macOS's "MyMac.local")."""
    name = hostname.strip().lower().rstrip(".")
    if not name:
        return frozenset()
    return frozenset({name, name.removesuffix(".local")} - {""})


def local_host(name: str, machine: frozenset[str]) -> bool:
    """Whether a ``Host`` name (``host_name``'s form) is one a public web page
    cannot make a browser resolve to this machine (Ollama's ``allowedHost``
    and its IP check): ``localhost``, a name ending in ``LOCAL_SUFFIXES``, one
    of the ``machine``'s own names, a loopback, private or unspecified IP
    literal."""
    return name == "localhost" or name.endswith(LOCAL_SUFFIXES) or name in machine or _ip_is_local(name)


def _quote(value: str) -> str:
    return value if len(value) <= _QUOTE_MAX else value[:_QUOTE_MAX] + "..."


class TrustGuard:
    """The trust middleware and its CORS hook, prepared from one ServerConfig."""

    def __init__(self, cfg: ServerConfig, hostname: Optional[str] = None) -> None:
        """``hostname``: the machine's, as the OS reports it (default
        ``socket.gethostname()``, read once here)."""
        self.check_host = is_loopback(cfg.host)
        names = [host_name(h) for h in cfg.allowed_hosts if h.strip()]
        self.any_host = "*" in names
        self.allowed_hosts = frozenset(n for n in names if not n.startswith("*"))
        #: "*.example.lan" in allowed_hosts: any sub-domain of example.lan.
        self.host_suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.machine = machine_names(socket.gethostname() if hostname is None else hostname)
        self.origins = OriginMatcher((*DEFAULT_ORIGINS, *cfg.origins))
        self.keyring = KeyRing.from_server(cfg)
        self.metrics_public = cfg.metrics_public
        #: ``Host`` value -> ``host_allowed``'s verdict (parsing an IP literal costs ~20 µs).
        self._host_verdicts: dict[str, bool] = {}

    @property
    def keys_required(self) -> bool:
        return self.keyring.required

    # ---------------------------------------------------------------- checks

    def host_allowed(self, host: str) -> bool:
        """The one Host rule of every front (``serve``, its workers, the
        front-only and remote modes, the metrics port): ``local_host``, or a
        name the owner listed in ``allowed_hosts``."""
        if self.any_host:
            return True
        verdict = self._host_verdicts.get(host)
        if verdict is None:
            name = host_name(host)
            verdict = (
                not name
                or local_host(name, self.machine)
                or name in self.allowed_hosts
                or name.endswith(self.host_suffixes)
            )
            if len(self._host_verdicts) >= HOST_VERDICTS_MAX:
                self._host_verdicts.clear()
            self._host_verdicts[host] = verdict
        return verdict

    def key_valid(self, headers: Mapping[str, str]) -> Optional[bool]:
        """None when no key was presented, else whether one presented key is
        configured (``headers``: case-insensitive, as ``request.headers``)."""
        valid, _, _ = self.check_key(headers)
        return valid

    def check_key(self, headers: Mapping[str, str]) -> tuple[Optional[bool], Optional[bytes], Optional[NamedKey]]:
        """``key_valid``, the digest of the first presented key that is
        configured (the caller's identity for what it stores: ``CALLER_KEY``)
        and that key's entry in the key table (its name, admin flag, limits)."""
        presented = []
        auth = headers.get(hdrs.AUTHORIZATION)
        if auth:
            scheme, _, credential = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                presented.append(credential.strip())
        x_api_key = headers.get("x-api-key", "").strip()
        if x_api_key:
            presented.append(x_api_key)
        if not presented:
            return None, None, None
        matched: Optional[bytes] = None
        caller: Optional[NamedKey] = None
        for credential in presented:
            d = digest(credential)
            key = self.keyring.lookup_digest(d)  # every key compared
            if key is not None and matched is None:
                matched, caller = d, key
        return matched is not None, matched, caller

    def _needs_key(self, request: web.Request) -> bool:
        path = request.path
        if path == "/":
            return request.method not in (hdrs.METH_GET, hdrs.METH_HEAD)
        if path == "/metrics":
            return not self.metrics_public
        return True

    # ---------------------------------------------------------------- middleware

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        if self.check_host:
            host = headers.get(hdrs.HOST)
            if host and not self.host_allowed(host):
                name = _quote(host_name(host))
                return self._refuse(
                    request,
                    ApiError(
                        403,
                        f"forbidden: Host '{name}' is not allowed on a server bound to a loopback address "
                        f"(DNS-rebinding guard); to allow it, set {env_var('server.allowed_hosts')}={name}",
                        code="host_not_allowed",
                    ),
                    "Host not allowed",
                )
        origin = headers.get(hdrs.ORIGIN)
        if origin is not None:
            if not self.origins.allowed(origin):
                quoted = _quote(origin.strip())
                return self._refuse(
                    request,
                    ApiError(
                        403,
                        f"forbidden: Origin '{quoted}' is not allowed; to allow it, add it to {ORIGINS_ENV} "
                        "(or OLLAMA_ORIGINS), comma-separated, '*' wildcards allowed",
                        code="origin_not_allowed",
                    ),
                    "Origin not allowed",
                )
            request[CORS_ORIGIN_KEY] = origin
        if request.method == hdrs.METH_OPTIONS:
            return self._options(request, origin)
        if self.keyring.required and self._needs_key(request):
            valid, key_digest, caller = self.check_key(headers)
            if not valid:
                message = (
                    "invalid API key"
                    if valid is False
                    else "API key required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                )
                return self._refuse(
                    request,
                    ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}),
                    "missing API key" if valid is None else "wrong API key",
                )
            assert key_digest is not None and caller is not None
            if is_admin_path(request.path) and not caller.admin:
                return self._refuse(request, ApiError(403, NEEDS_ADMIN, code="admin_key_required"),
                                    "not an admin key")
            request[CALLER_KEY] = key_digest
            request[CALLER] = caller
            speak_for(request, caller.name, request_dialect(request), caller.rate_limited)
            return await handler(request)
        speak_for(request, "", request_dialect(request))
        return await handler(request)

    def _refuse(self, request: web.Request, err: ApiError, why: str) -> web.Response:
        log.debug("%s %s refused with %d: %s", request.method, request.path, err.status, why)
        return error_response(err, request_dialect(request))

    def _options(self, request: web.Request, origin: Optional[str]) -> web.StreamResponse:
        match_info = request.match_info
        exc = match_info.http_exception
        if isinstance(exc, web.HTTPMethodNotAllowed):
            methods = set(exc.allowed_methods)
        elif exc is not None:  # unknown route
            return error_response(from_http(exc, request.path), request_dialect(request))
        else:  # a route that takes OPTIONS (or any method) itself
            resource = match_info.route.resource
            methods = {r.method for r in resource} if resource is not None else set()
            methods.discard(hdrs.METH_ANY)
        allow = ", ".join(sorted(methods | {hdrs.METH_OPTIONS}))
        response = web.Response(status=204, headers={hdrs.ALLOW: allow})
        if origin is not None:
            h = response.headers
            h[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = allow
            h[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = (
                request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").strip() or ALLOW_HEADERS
            )
            h[hdrs.ACCESS_CONTROL_MAX_AGE] = PREFLIGHT_MAX_AGE
            h[hdrs.VARY] = PREFLIGHT_VARY
        return response

    # ---------------------------------------------------------------- CORS on answers

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.get(CORS_ORIGIN_KEY)
        if origin is None:
            return
        h = response.headers
        h[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        h[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
        vary = h.get(hdrs.VARY)
        if not vary:
            h[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            h[hdrs.VARY] = f"{vary}, Origin"
