"""`mlxgate service`'s own /metrics port passes the same trust checks as the front's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mlxgate.config import ServerConfig


def get(url: str, key: str = "") -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("public", [False, True])
def test_service_metrics_need_a_key_unless_public(tmp_path: Path, test_model_dir: Path, public: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env.update(MLXGATE_API_KEYS="sekrit-key", MLXGATE_DATA_DIR=str(tmp_path))
    if public:
        env["MLXGATE_METRICS_PUBLIC"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "service", "--grpc-port", "0", "--metrics-port", "0",
         "--models-dir", str(test_model_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        m = re.match(r"mlxgate: gRPC \S+\s+metrics (http://\S+)", proc.stdout.readline())
        assert m, proc.stderr.read() if proc.poll() is not None else "no start line"
        url = m.group(1) + "/metrics"
        assert get(url) == (200 if public else 401)
        assert get(url, "wrong") == (200 if public else 401)
        assert get(url, "sekrit-key") == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "sekrit-key" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keys_stay_out_of_the_config_repr() -> None:
    assert "sekrit" not in repr(ServerConfig(api_keys=["sekrit"]))
