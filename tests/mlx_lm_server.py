"""Starting ``mlx_lm.server`` (ships with mlx-lm) offline on a generated model:
the cloud adapter's real OpenAI-compatible upstream in the tests and the
baseline in ``make bench``."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping


class ServerDidNotStart(Exception):
    """``str()``: what happened, with the end of the server's log."""


def launch_mlx_lm_server(model: Path, port: int, log: Path, env: Mapping[str, str], *args: str,
                        timeout: float = 120.0, module: str = "mlx_lm.server") -> subprocess.Popen:
    """The server on 127.0.0.1:``port`` once its ``/health`` answers 200; its
    output in ``log``.  ``env`` should point HF_HUB_CACHE at an empty folder
    (nothing from the hub, no network).  ``module``: also ``mlx_vlm.server``,
    which takes the same ``--model``, ``--host`` and ``--port``."""
    env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--model", str(Path(model).resolve()), "--host", "127.0.0.1",
             "--port", str(port), *args],
            stdout=f, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerDidNotStart(f"{module} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServerDidNotStart(f"{module} did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)
