"""``create``'s ``quantize``: MLX quantization with mlx-lm's own converter.

Ollama's llama.cpp types map onto MLX's affine quantization by their bits:
``q4_K_M``, ``q4_K_S``, ``q4_0``, ``q4_1`` -> 4-bit, ``q8_0`` -> 8-bit;
MLX's own modes (``mxfp4``, ``nvfp4``, ``mxfp8``) are passed as they are.

**Where it runs.**  The MLX engine owns MLX on one thread
(``backends/mlx/engine.py``): every MLX call of the serving process goes
through it, and a second thread driving MLX beside it would race its
streams and memory.  Quantizing a model takes seconds to minutes of MLX
work, which on the engine thread would stall every generation.  So it runs
``python -m mlx_lm convert`` in a **child process** (its own MLX, its own
memory), started with ``asyncio.create_subprocess_exec``: the event loop
only waits for it, the engine thread never sees it, a cancelled create kills
it, and nothing is fetched from the network (``HF_HUB_OFFLINE=1``; the
source is a local folder).  The output goes to ``partial/`` and is promoted
whole once it is a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
from typing import AsyncIterator

from backends.errors import InvalidArgument, Unavailable
from backends.models.store import ModelStore, StoredModel

#: Ollama's quantization types -> (bits, MLX mode).
QUANT_TYPES: dict[str, tuple[int, str]] = {
    "q4_k_m": (4, "affine"),
    "q4_k_s": (4, "affine"),
    "q4_0": (4, "affine"),
    "q4_1": (4, "affine"),
    "q8_0": (8, "affine"),
    "mxfp4": (0, "mxfp4"),
    "nvfp4": (0, "nvfp4"),
    "mxfp8": (0, "mxfp8"),
}
_STDERR_TAIL = 400


def plan(qtype: str) -> tuple[int, str]:
    """(bits, mode) of a quantization type (0 bits: the mode's own), or InvalidArgument."""
    try:
        return QUANT_TYPES[qtype.lower()]
    except KeyError:
        raise InvalidArgument(
            f"quantize: unsupported type {qtype[:32]!r}; one of q4_K_M, q4_K_S, q4_0, q4_1 (4-bit), "
            "q8_0 (8-bit), mxfp4, nvfp4, mxfp8"
        ) from None


def _weights_size(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


async def quantize(store: ModelStore, model: StoredModel, qtype: str) -> AsyncIterator:
    """Quantize ``model``'s snapshot into a new one (``model.snapshot`` and
    ``quantization`` are updated); yields Ollama's progress lines."""
    from backends.models.manage import Progress, _is_model

    bits, mode = plan(qtype)
    src = store.snapshot_path(model.snapshot)
    snapshot = f"quant-{secrets.token_hex(12)}"
    out = store.partial_path(snapshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = await asyncio.to_thread(_weights_size, src)
    yield Progress(f"quantizing model to {qtype.upper() if bits else qtype}", digest="0", total=total, completed=0)
    args = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out),
            "-q", "--q-mode", mode]
    if bits:
        args += ["--q-bits", str(bits)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    promoted = False
    try:
        _, err = await proc.communicate()
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip().splitlines()
            why = tail[-1][:_STDERR_TAIL] if tail else f"exit status {proc.returncode}"
            raise InvalidArgument(f"quantize {qtype}: mlx-lm's conversion failed: {why}")
        yield Progress(f"quantizing model to {qtype.upper() if bits else qtype}", digest="0", total=total,
                       completed=total)
        yield Progress("verifying conversion")
        try:
            await asyncio.to_thread(_is_model, out)
        except InvalidArgument as e:
            raise Unavailable(f"quantize {qtype}: the conversion wrote no model: {e.message}") from None
        await asyncio.to_thread(store.promote, snapshot)
        promoted = True
        model.snapshot = snapshot
        model.quantization = qtype
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if not promoted:
            await asyncio.to_thread(shutil.rmtree, out, True)
