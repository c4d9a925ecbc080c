"""Where the server is and which key to send, read once into ``ClientSettings``
from the variables ``mlxgate serve`` binds by (``server.host`` and
``server.port``'s, and OLLAMA_HOST; mlxgate's win) and ``CLIENT_KEY_ENV``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from mlxgate.config import CLIENT_KEY_ENV, ServerConfig, env_var, parse_ollama_host

#: The server's own default port (``mlxgate serve``, and Ollama's).
DEFAULT_PORT = ServerConfig.port
#: The variables that say where the server is, as ``mlxgate serve`` reads them.
HOST_ENV = env_var("server.host")
PORT_ENV = env_var("server.port")
#: How the verbs' help names them.
SERVER_VARIABLES = f"OLLAMA_HOST / {HOST_ENV}"
#: Bind-all addresses a server listens on, and the loopback a client dials instead.
_UNSPECIFIED = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class HostError(ValueError):
    """OLLAMA_HOST, ``HOST_ENV`` or ``PORT_ENV`` cannot be read."""


@dataclass(frozen=True)
class ClientSettings:
    """The server the verbs talk to: ``scheme://host:port/path``, and the key."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: A path prefix (a server behind a reverse proxy), "" or "/prefix".
    path: str = ""
    api_key: Optional[str] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_host(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, str, int, str]:
    """``host``, ``host:port``, ``:port``, ``[v6]:port``, each optionally with
    ``http://`` or ``https://`` and a path -> (scheme, host, port, path).

    Without a port: ``default_port``, or 443 for https (a proxy in front).
    As the server reads the same variable, a bare ``http://host`` means its
    port 11434, not 80.  A bind-all address (0.0.0.0, ::) means this machine.
    """
    v = value.strip()
    scheme, sep, rest = v.partition("://")
    if not sep:
        scheme, rest = "http", v
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: the scheme must be http or https")
    hostport, slash, path = rest.partition("/")
    host, port = parse_ollama_host(hostport)  # ValueError names a bad port
    if port is None:
        port = 443 if scheme == "https" and sep else default_port
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} is out of range")
    host = _UNSPECIFIED.get(host, host)
    return scheme, host, port, ("/" + path.rstrip("/")) if slash and path.strip("/") else ""


def _parsed(env: Mapping[str, str], var: str, default_port: int) -> Optional[tuple[str, str, int, str]]:
    if not env.get(var, "").strip():
        return None
    try:
        return parse_host(env[var], default_port)
    except ValueError as e:
        raise HostError(f"{var}: {e}") from None


def settings_from_env(env: Mapping[str, str]) -> ClientSettings:
    """The server ``mlxgate serve`` would listen on with the same variables:
    ``HOST_ENV`` wins over OLLAMA_HOST, ``PORT_ENV`` over a port in
    OLLAMA_HOST (a port written in ``HOST_ENV`` wins over both);
    ``CLIENT_KEY_ENV`` is sent as a Bearer key."""
    port_var = env.get(PORT_ENV, "").strip()
    if port_var and not port_var.isdigit():
        raise HostError(f"{PORT_ENV}: {port_var!r} is not a port number")
    key = env.get(CLIENT_KEY_ENV, "").strip() or None
    ollama = _parsed(env, "OLLAMA_HOST", DEFAULT_PORT)
    port = int(port_var) if port_var else ollama[2] if ollama else DEFAULT_PORT
    mlxgate = _parsed(env, HOST_ENV, port)
    if mlxgate:
        return ClientSettings(*mlxgate, api_key=key)
    if ollama:
        scheme, host, _, path = ollama
        return ClientSettings(scheme, host, port, path, key)
    return ClientSettings(port=port, api_key=key)
