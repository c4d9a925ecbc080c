"""`mlxgate serve` as a user starts it: a real process, both ports, a clean
SIGTERM; the generated test model served from the data folder when there are
no models; Ollama's variables (OLLAMA_HOST moves the port, an OLLAMA_MODELS
that is an Ollama store is ignored with a note in the log)."""

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

from mlxgate.config import Config, MLXConfig, ServerConfig


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without the caller's mlxgate/Ollama/OpenAI settings;
    data and the Hugging Face cache under tmp_path (never the real home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_", "OPENAI_"))}
    env["MLXGATE_DATA_DIR"] = str(tmp_path / "data")
    env["MLXGATE_HF_CACHE"] = str(tmp_path / "no-hf-cache")
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """The process and the HTTP URL and gRPC target it printed once both listen."""
    proc = subprocess.Popen([sys.executable, "-m", "mlxgate_cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"unexpected first line {line!r}; stderr: {proc.communicate(timeout=30)[1]}")
    return proc, m.group(1), m.group(2)


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM; the exit status must be 0; returns stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def test_serve_bootstraps_a_model_in_the_data_dir_and_shuts_down_cleanly(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    proc, http, target = start(["--port", "0", "--grpc-port", "0", "--models-dir", str(models)], clean_env(tmp_path))
    try:
        generated = tmp_path / "data" / "test-models" / "tiny-llama"
        assert (generated / "config.json").is_file()
        assert list(models.iterdir()) == []  # never among the user's models
        with urllib.request.urlopen(f"{http}/") as r:
            assert r.read() == b"Ollama is running"
        with urllib.request.urlopen(f"{http}/api/tags") as r:
            assert [t["name"] for t in json.load(r)["models"]] == ["tiny-llama:latest"]
        body = json.dumps({"model": "tiny-llama", "prompt": "hi", "stream": False, "options": {"num_predict": 3}})
        req = urllib.request.Request(f"{http}/api/generate", data=body.encode(), method="POST")
        with urllib.request.urlopen(req) as r:
            answer = json.load(r)
        assert answer["done"] is True and answer["eval_count"] == 3
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # One line says what it is, where it is and how to remove it.
    (line,) = [x for x in err.splitlines() if "test model" in x]
    assert "random weights" in line and str(generated) in line
    assert f"rm -r {generated.parent}" in line
    assert "mlxgate pull llama3.2:1b" in line, "and how to pull a real one"


def test_ollama_host_moves_the_port_and_an_ollama_store_is_ignored_with_a_note(
    tmp_path: Path, test_model_dir: Path, held_port
) -> None:
    store = tmp_path / "ollama-models"  # what OLLAMA_MODELS holds for a real Ollama
    (store / "manifests").mkdir(parents=True)
    (store / "blobs").mkdir()
    port = held_port.port
    env = clean_env(tmp_path, OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=str(store))
    proc, http, _ = start(["--grpc-port", "0", "--models-dir", str(test_model_dir)], env)
    try:
        assert http == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tags") as r:
            assert "tiny-llama:latest" in [t["name"] for t in json.load(r)["models"]]
        err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"OLLAMA_MODELS={store} is ignored" in err and "MLX cannot load" in err
    assert not (tmp_path / "data").exists()  # real models: nothing generated


def test_help_and_version() -> None:
    from importlib import metadata

    run = [sys.executable, "-m", "mlxgate_cli"]
    top = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "local LLM gateway" in top.stdout and "Command line:" not in top.stdout
    for command in ("serve", "service", "make-test-model"):
        assert command in top.stdout
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"mlxgate {metadata.version('mlxgate')}"
    serve = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(serve.split())
    for default in (ServerConfig.port, ServerConfig.grpc_port, ServerConfig.host, MLXConfig.models_dir,
                    Config.log_level):
        assert f"default: {default}" in flat, default
