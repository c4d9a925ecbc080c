"""`mlxgate serve --workers 2` as a user starts it (real processes, the
generated model, ports picked by the OS): both workers answer on the one HTTP
port, /metrics from any worker adds up the whole server, a second server on
the port is refused, a killed worker is replaced, a stream in flight lives
through SIGTERM's drain, and the workers end with their parent."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.mlx_fixtures import TEST_MODEL
from tests.test_cli_serve import clean_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")


class Server:
    """A ``mlxgate serve --workers 2`` process; its stderr collected by a thread."""

    def __init__(self, tmp_path: Path, models: Path, *extra: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0", "--workers", "2",
             "--models-dir", str(models), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path, **env),
        )
        self.err: list[str] = []
        self.collector = threading.Thread(target=self._collect, daemon=True)
        self.collector.start()
        line = self.proc.stdout.readline()
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"unexpected first line {line!r}; stderr: {self.stderr()}")
        self.http, self.grpc = m.group(1), m.group(2)
        self.port = int(self.http.rsplit(":", 1)[1])

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def stderr(self) -> str:
        return "".join(self.err)

    def workers(self) -> list[int]:
        pid = self.proc.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path: Path, test_model_dir: Path) -> Iterator[Server]:
    s = Server(tmp_path, test_model_dir, MLXGATE_SHUTDOWN_GRACE="30")
    try:
        yield s
    finally:
        s.stop()


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (the kernel picks the worker per connection)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def generate(base: str, tokens: int) -> dict:
    body = json.dumps({"model": TEST_MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": tokens}})
    req = urllib.request.Request(f"{base}/api/generate", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def sample(text: str, name: str, **labels: str) -> Optional[float]:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def workers_seen(base: str, want: set[str], tries: int = 200) -> tuple[set[str], int]:
    """GET / on new connections until every worker in ``want`` answered; (seen, requests sent)."""
    seen: set[str] = set()
    n = 0
    while seen != want and n < tries:
        status, headers, body = get(f"{base}/")
        assert status == 200 and body == b"Ollama is running"
        seen.add(headers["x-mlxgate-worker"])
        n += 1
    return seen, n


def _ask(conn: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on an open connection; the status line's first 12 bytes (b"" if closed)."""
    with conn:
        conn.sendall(request)
        got = b""
        while len(got) < 12 and (chunk := conn.recv(12 - len(got))):
            got += chunk
        return got


def wait_for(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_two_workers_share_the_port_and_metrics_add_up(server: Server, tmp_path: Path, test_model_dir) -> None:
    assert len(server.workers()) == 2
    seen, roots = workers_seen(server.http, {"1", "2"})
    assert seen == {"1", "2"}, f"only worker(s) {seen} answered {roots} connections"
    assert generate(server.http, 3)["eval_count"] == 3
    assert generate(server.http, 3)["eval_count"] == 3
    # The service's gRPC port serves other clients as before.
    with grpc.insecure_channel(server.grpc) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING

    # /metrics from either worker: the service's metrics once, every worker's HTTP metrics summed.
    texts = {}
    for _ in range(100):
        status, headers, body = get(f"{server.http}/metrics")
        assert status == 200
        texts.setdefault(headers["x-mlxgate-worker"], body.decode())
        if len(texts) == 2:
            break
    assert texts, "no /metrics answer"
    for text in texts.values():
        assert sample(text, "mlxgate_http_requests_total", route="/", status="200") == roots
        assert sample(text, "mlxgate_http_requests_total", route="/api/generate", status="200") == 2
        assert sample(text, "mlxgate_http_request_duration_seconds_count", route="/api/generate") == 2
        assert sample(text, "mlxgate_http_requests_in_flight", dialect="ollama") == 0
        assert sample(text, "mlxgate_generate_requests_total", model=TEST_MODEL, finish_reason="length") == 2
        assert sample(text, "mlxgate_process_resident_memory_bytes", process="service") > 10_000_000
        for worker in ("worker-1", "worker-2"):
            assert sample(text, "mlxgate_process_resident_memory_bytes", process=worker) > 10_000_000
        types = re.findall(r"^# TYPE (\S+)", text, re.M)
        assert len(types) == len(set(types)), "a metric family appears twice"

    # The Responses API's store is one SQLite file: what one worker stored, the other serves.
    body = json.dumps({"model": TEST_MODEL, "input": "hi", "max_output_tokens": 2}).encode()
    req = urllib.request.Request(f"{server.http}/v1/responses", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        stored_by, rid = r.headers["x-mlxgate-worker"], json.load(r)["id"]
    for _ in range(200):
        status, headers, got = get(f"{server.http}/v1/responses/{rid}")
        assert status == 200 and json.loads(got)["id"] == rid
        if headers["x-mlxgate-worker"] != stored_by:
            break
    else:
        pytest.fail("the other worker never answered")

    # Every worker keeps the one Host rule (gateway.security.TrustGuard.host_allowed), and answers a
    # request beyond aiohttp's limits with 400 and one WARNING line, no traceback.
    allowed: set[str] = set()
    for _ in range(200):
        status, headers, _ = get(f"{server.http}/api/version", Host="host.docker.internal:11434")
        assert status == 200
        allowed.add(headers["x-mlxgate-worker"])
        if len(allowed) == 2:
            break
    assert allowed == {"1", "2"}
    for _ in range(4):
        assert get(f"{server.http}/api/version", Host="evil.example.com")[0] == 403
        assert get(f"{server.http}/api/version?q=" + "a" * 10_000)[0] == 400
    assert wait_for(lambda: len(re.findall(r"WARNING worker-\d aiohttp.server: malformed HTTP request from",
                                           server.stderr())) == 4), server.stderr()
    assert "Traceback" not in server.stderr() and "ERROR" not in server.stderr()

    # A second server on the same HTTP port: the one-line refusal, status 2.
    second = subprocess.run(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", str(server.port), "--grpc-port", "0",
         "--workers", "2", "--models-dir", str(test_model_dir)],
        capture_output=True, text=True, timeout=60, env=clean_env(tmp_path / "second"),
    )
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"mlxgate: cannot listen for HTTP on 127.0.0.1:{server.port}: port {server.port} is already in use"
    )

    # A worker killed: logged, replaced, and both answer again.
    victim = server.workers()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in server.workers() and len(server.workers()) == 2)
    assert wait_for(lambda: "starting another" in server.stderr())
    (line,) = [x for x in server.err if "starting another" in x]
    assert f"(pid {victim}) was killed by SIGKILL" in line
    assert wait_for(lambda: len(re.findall(r"HTTP worker \d started", server.stderr())) == 3)
    seen, more = workers_seen(server.http, {"1", "2"})
    assert seen == {"1", "2"}
    # The dead worker's counts stay in the sums.
    text = get(f"{server.http}/metrics")[2].decode()
    assert sample(text, "mlxgate_http_requests_total", route="/", status="200") == roots + more


def test_a_stream_in_flight_lives_through_sigterm(server: Server) -> None:
    workers = server.workers()
    body = json.dumps({"model": TEST_MODEL, "prompt": "hi", "options": {"num_predict": 1500}})
    req = urllib.request.Request(f"{server.http}/api/generate", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        first = json.loads(r.readline())
        assert first["done"] is False
        # Connections opened before the signal whose request comes just after
        # it: each gets an answer (503, draining), none is closed unanswered,
        # although the idle worker among those holding them exits at once.
        early = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(8)]
        signalled = time.time()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: server.stderr().count("draining: refusing new requests") == 2, 10)
        answers = [_ask(c, b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                   for c in early]
        assert answers == [b"HTTP/1.1 503"] * len(early), answers
        # New requests are refused while the stream goes on (from either worker).
        assert get(f"{server.http}/api/tags")[0] == 503
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 1500, lines[-1]
    # It was still being generated after the signal, not just read from buffers.
    ended = datetime.datetime.fromisoformat(lines[-1]["created_at"].replace("Z", "+00:00")).timestamp()
    assert ended > signalled
    server.proc.wait(timeout=60)
    assert server.proc.returncode == 0, server.stderr()
    assert "Traceback" not in server.stderr()
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10)
    assert "shutting down" in server.stderr()


def test_workers_end_with_their_parent(server: Server, tmp_path: Path, test_model_dir: Path) -> None:
    workers = server.workers()
    assert len(workers) == 2
    environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    (private,) = [Path(v.split(b"=", 1)[1].decode()).parent for v in environ
                  if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    assert private.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in private.glob("*.sock")} == {
        "service.sock": 0o600, "metrics.sock": 0o600}
    server.proc.kill()
    server.proc.wait()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
        except OSError:
            return True

    assert wait_for(lambda: all(gone(p) for p in workers), 15), "a worker outlived its parent"
    # What the killed server left behind goes when the next one starts.
    assert private.exists()
    Server(tmp_path / "next", test_model_dir).stop()
    assert not private.exists()


def test_a_worker_that_keeps_exiting_stops_the_server(server: Server) -> None:
    from mlxgate_cli.workers import MAX_RESTARTS

    def started() -> list[str]:
        return re.findall(r"HTTP worker 1 started \(pid (\d+)\)", server.stderr())

    for n in range(1, MAX_RESTARTS + 2):
        assert wait_for(lambda: len(started()) == n), server.stderr()
        os.kill(int(started()[-1]), signal.SIGKILL)
    server.proc.wait(timeout=60)
    server.collector.join(10)
    assert server.proc.returncode == 1
    assert server.err[-1].strip() == (
        f"mlxgate: HTTP worker 1 was killed by SIGKILL, its {MAX_RESTARTS + 1}th exit within 60 s: stopping"
    )
