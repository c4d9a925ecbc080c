"""TLS on gRPC between machines: a service's TCP port with a certificate, a
front (``--grpc-target``) and remote backends checking it against their
roots, and the settings' one-line errors.  The certificates are made here
(self-signed, for ``localhost`` and 127.0.0.1); real processes at the end:
``mlxgate service`` with TLS behind ``mlxgate serve``."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.errors import DeadlineExceeded, Unavailable
from backends.remote import HealthState, RemoteBackend
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import RemoteService, ServerConfig
from mlxgate.config_load import load_config
from mlxgate.grpc_tls import server_credentials
from tests.fakes.scripted_backend import ScriptedBackend
from tests.fakes.streams import collect
from tests.mlx_fixtures import TEST_MODEL
from tests.polling import eventually
from tests.request_builders import chat
from tests.test_remote_services import KEY, generate, start_service, stop_service
from tests.test_cli_serve import clean_env
from tests.test_shutdown import spawn

pytestmark = pytest.mark.timeout(120)


def self_signed(folder: Path, name: str = "localhost") -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed certificate for ``name`` and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[str, str, str]:
    """(cert, key) of the service, and another certificate that does not vouch for it."""
    cert, key = self_signed(tmp_path / "service")
    other, _ = self_signed(tmp_path / "other")
    return cert, key, other


@pytest.fixture
async def tls_service(certs):
    cert, key, _ = certs
    svc = await start_inference_service(ScriptedBackend("mlx", ["m"], text=["over ", "tls"]), port=0,
                                        tls=server_credentials(cert, key))
    try:
        yield svc
    finally:
        await svc.stop(grace=0.5)


def remote(target: str, **kw) -> RemoteBackend:
    r = RemoteBackend(RemoteService(name="a", target=target, **kw))
    r.backoff_min, r.backoff_max = 0.05, 0.2
    return r


async def test_a_remote_backend_calls_a_tls_service_and_checks_its_certificate(tls_service, certs):
    cert, _, other = certs
    target = f"localhost:{tls_service.port}"  # the certificate's DNS name (the others use its IP address)
    ok = remote(target, tls_ca=cert)
    try:
        events = await collect(ok.generate(chat("m")))
        assert "".join(e.text for e in events[:-1]) == "over tls"
        await eventually(lambda: ok.health == HealthState.SERVING)
    finally:
        await ok.close()
    # The server-wide default roots serve an entry without its own.
    default = RemoteBackend(RemoteService(name="b", target=target), tls_ca=cert)
    try:
        assert "".join(e.text for e in (await collect(default.generate(chat("m"))))[:-1]) == "over tls"
    finally:
        await default.close()
    # Roots that do not vouch for the certificate, and plaintext: no call gets through.
    for r in (remote(target, tls_ca=other), remote(target)):
        try:
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await collect(r.generate(chat("m")))
            assert r.health != HealthState.SERVING
        finally:
            await r.close()


async def test_a_front_with_grpc_target_calls_over_tls(tls_service, certs):
    cert, _, other = certs
    for ca, status in ((cert, 200), (other, 503), ("", 503)):
        cfg = ServerConfig(host="127.0.0.1", port=0, grpc_target=f"127.0.0.1:{tls_service.port}",
                           grpc_tls_ca=ca, request_timeout=5)
        http = await start_http(create_app(cfg, cfg.grpc_target), cfg.host, 0)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{http.url}/api/generate",
                                  json={"model": "m", "prompt": "hi", "stream": False}) as r:
                    body = await r.json()
                    assert r.status == status, (ca, body)
                    if status == 200:
                        assert body["response"] == "over tls"
        finally:
            await http.stop()


def test_settings_are_checked_at_start(tmp_path, certs):
    cert, key, _ = certs
    env = {"MLXGATE_GRPC_TLS_CERT": cert, "MLXGATE_GRPC_TLS_KEY": key, "MLXGATE_GRPC_TLS_CA": cert}
    cfg = load_config(None, env)
    assert (cfg.server.grpc_tls_cert, cfg.server.grpc_tls_key, cfg.server.grpc_tls_ca) == (cert, key, cert)
    with pytest.raises(ValueError, match="go together"):
        load_config(None, {"MLXGATE_GRPC_TLS_CERT": cert})
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ValueError, match=r"server.grpc_tls_key: .*not.pem is not a PEM file"):
        load_config(None, {**env, "MLXGATE_GRPC_TLS_KEY": str(tmp_path / "not.pem")})
    with pytest.raises(ValueError, match=r"server.grpc_tls_ca: cannot read .*missing.pem"):
        load_config(None, {**env, "MLXGATE_GRPC_TLS_CA": str(tmp_path / "missing.pem")})
    with pytest.raises(ValueError, match="front_channel = grpc does not go with grpc_tls_cert"):
        load_config(None, {**env, "MLXGATE_FRONT_CHANNEL": "grpc"})


async def test_mlxgate_service_with_tls_behind_mlxgate_serve(tmp_path, test_model_dir, certs):
    cert, key, _ = certs
    svc = await start_service(tmp_path / "svc", test_model_dir, MLXGATE_GRPC_TLS_CERT=cert, MLXGATE_GRPC_TLS_KEY=key)
    try:
        port = svc.target.rsplit(":", 1)[1]
        # Health over TLS answers; a plaintext channel gets nothing.
        roots = grpc.ssl_channel_credentials(Path(cert).read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", roots) as ch:
            got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(svc.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        env = clean_env(tmp_path / "front", MLXGATE_MLX_ENABLED="false", MLXGATE_REMOTES=f"127.0.0.1:{port}",
                        MLXGATE_API_KEYS=KEY, MLXGATE_GRPC_TLS_CA=cert)
        front = await spawn(["serve", "--port", "0", "--grpc-port", "0"], env)
        try:
            assert front.proc.stdout is not None
            line = (await asyncio.wait_for(front.proc.stdout.readline(), 120)).decode()
            m = re.match(r"mlxgate: HTTP (http://\S+)", line)
            assert m, f"{line!r}: {await front.stderr_text() if not line else ''}"
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
                backend, answer = await generate(http, m.group(1))
            assert backend == f"remote:127.0.0.1:{port}" and answer["eval_count"] == 2
            assert answer["model"] == TEST_MODEL
        finally:
            front.kill()
            await front.proc.wait()
    finally:
        await stop_service(svc)
