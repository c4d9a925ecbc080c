"""Running the client verbs (``mlxgate list``, ``run``, ...) as a user does:
a subprocess with a clean environment pointed at one server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

#: The longest any one verb may take in a test (a bound, not a timing).
VERB_TIMEOUT_S = 120


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def client_env(url: Optional[str], key: Optional[str] = None, var: str = "MLXGATE_HOST",
               **extra: str) -> dict[str, str]:
    """The environment without the caller's mlxgate/Ollama settings; ``var`` set to ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "OLLAMA_"))}
    if url is not None:
        env[var] = url
    if key is not None:
        env["MLXGATE_API_KEY"] = key
    env.update(extra)
    return env


def _default_sigint() -> None:
    # A shell's background job starts with SIGINT ignored; Ctrl-C tests need Python's handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, env: dict[str, str], stdin: Optional[str] = None, cwd: Optional[str] = None) -> Result:
    """One verb to its end (blocking: for a server in another process)."""
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    p = subprocess.run([sys.executable, "-m", "mlxgate_cli", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=VERB_TIMEOUT_S, **feed)
    return Result(p.returncode, p.stdout, p.stderr)


async def start_cli(*args: str, env: dict[str, str], cwd: Optional[str] = None) -> asyncio.subprocess.Process:
    """A verb started without waiting (for a server in this event loop)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlxgate_cli", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd, preexec_fn=_default_sigint)


async def finish(proc: asyncio.subprocess.Process, stdin: Optional[str] = None) -> Result:
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None),
                                      VERB_TIMEOUT_S)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def run_cli_async(*args: str, env: dict[str, str], stdin: Optional[str] = None,
                        cwd: Optional[str] = None) -> Result:
    return await finish(await start_cli(*args, env=env, cwd=cwd), stdin if stdin is not None else "")


def last_error_line(r: Result, rc: int = 1) -> str:
    """A failed verb: its exit status ``rc``, no traceback; the last line on stderr."""
    assert r.rc == rc, (r.rc, r.out, r.err)
    assert "Traceback" not in r.err, r.err
    assert r.err_lines, "nothing on stderr"
    return r.err_lines[-1]


def one_error_line(r: Result, rc: int = 1) -> str:
    """A verb that failed before any output: exactly one line on stderr; that line."""
    line = last_error_line(r, rc)
    assert len(r.err_lines) == 1, r.err
    return line
