"""`mlxgate serve` as `make run` starts it: a real process, an empty models
directory (so it writes the test model), both ports, a clean SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_serve_bootstraps_a_model_and_shuts_down_cleanly(tmp_path: Path) -> None:
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0", "--models-dir", str(models)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()  # printed once both servers listen
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
        assert m, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        http, target = m.group(1), m.group(2)
        assert (models / "tiny-llama" / "config.json").is_file()
        with urllib.request.urlopen(f"{http}/") as r:
            assert r.read() == b"Ollama is running"
        with urllib.request.urlopen(f"{http}/api/tags") as r:
            assert [t["name"] for t in json.load(r)["models"]] == ["tiny-llama"]
        body = json.dumps({"model": "tiny-llama", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
        req = urllib.request.Request(f"{http}/api/generate", data=body.encode(), method="POST")
        with urllib.request.urlopen(req) as r:
            answer = json.load(r)
        assert answer["done"] is True and answer["eval_count"] == 3
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
