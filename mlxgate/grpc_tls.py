"""TLS for gRPC between machines: the service's TCP port (a certificate and
its key) and the channels to other services (the roots they are checked
against).

Keys travel in ``authorization`` metadata; between Macs on a network they
should not travel in the clear.  A Unix-domain socket (the workers' private
one) stays plaintext: only this user can open it.
"""

from __future__ import annotations

from pathlib import Path

import grpc

_PEM = b"-----BEGIN "


def read_pem(path: str, what: str) -> bytes:
    """The PEM file at ``path``; ValueError with one line saying what is wrong."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if _PEM not in data:
        raise ValueError(f"{what}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """The service's TLS credentials: its certificate chain and private key."""
    return grpc.ssl_server_credentials(
        [(read_pem(key_path, "server.grpc_tls_key"), read_pem(cert_path, "server.grpc_tls_cert"))]
    )


def channel_credentials(ca_path: str, what: str) -> grpc.ChannelCredentials:
    """Credentials for a channel to a service whose certificate ``ca_path``
    (a CA, or the certificate itself when self-signed) vouches for."""
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca_path, what))
