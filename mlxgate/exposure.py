"""No open door by accident: which bind addresses are loopback, and whether a
configuration would listen beyond this machine without API keys.

Pure functions, no I/O: nothing is resolved over the network.  A host name
counts as loopback only when it is ``localhost`` or ends in ``.localhost``
(RFC 6761 reserves both for the loopback interface); any other name may
resolve to a public address, so it is treated as exposed.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

from mlxgate.config import Config, env_var
from mlxgate.keyring import every_secret


def is_loopback(host: str) -> bool:
    """True when binding ``host`` listens on the loopback interface only.

    ``""`` (aiohttp's "every interface"), ``0.0.0.0`` and ``::`` are not
    loopback; ``localhost``, ``127.x.y.z``, ``::1`` (bracketed or not) and
    IPv4-mapped loopback addresses are.
    """
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])  # drop an IPv6 zone ("::1%lo")
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def exposure_problem(config: Config, http: bool, grpc: bool) -> Optional[str]:
    """A one-line message when the configuration would serve a non-loopback
    address without API keys (and the user did not say that is intended);
    None when it may start.

    ``http``/``grpc``: which listeners this command opens (``mlxgate serve``:
    both, or only HTTP with ``--grpc-target``; ``mlxgate service``: gRPC, and
    its /metrics port, which binds the gRPC host too).
    """
    server = config.server
    if every_secret(server) or server.allow_unauthenticated:
        return None
    exposed = []
    if http and not is_loopback(server.host):
        exposed.append(f"HTTP on {server.host or '*'}:{server.port}")
    if grpc and not is_loopback(server.grpc_host):
        exposed.append(f"gRPC on {server.grpc_host or '*'}:{server.grpc_port}")
    if not exposed:
        return None
    return (
        f"mlxgate: refusing to listen beyond this machine without API keys ({', '.join(exposed)}): "
        f"set {env_var('server.api_keys')} (or --api-key KEY), or {env_var('server.allow_unauthenticated')}=1 "
        "(or --allow-unauthenticated) to run without keys"
    )
