"""Image chats on a vision-language model: mlxgate vs mlx-vlm's own server.

The generated VLM (``mlxgate make-test-model DIR --vision``: a tiny Idefics3,
random weights; written once to ``.bench/vision-models/tiny-vlm``) behind

- mlxgate: ``mlxgate serve`` in a subprocess, OpenAI chat streamed through its
  HTTP front (front → gRPC → MLX engine: images paced into the batch);
- ``mlx_vlm.server`` (ships with mlx-vlm) on the same model folder, its
  OpenAI-compatible ``/v1/chat/completions``, its defaults otherwise.

1, 4 and 8 clients at once, each streaming ``ctx.tokens`` greedy tokens about
an image of its own (a 320 x 240 PNG, another colour for every client and
repetition, so no prompt cache helps).  Figures: aggregate streamed tokens/s
(wall time from the first request to the last token) and time to first token
(median over the clients), the median of ``ctx.reps`` rotations.  On a tiny
model the time goes to serving, preprocessing and scheduling, not to the
weights: read the ratio, not the absolute numbers.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
from pathlib import Path

from tests.bench.common import (
    ROOT,
    Context,
    Section,
    Server,
    Table,
    median,
    session,
    start_mlxgate,
    start_peer_server,
    stream_chat,
)

CLIENTS = (1, 4, 8)
VLM = "tiny-vlm"


def _image_url(i: int, tag: str) -> str:
    from PIL import Image, ImageDraw

    seed = sum(tag.encode()) * 31 + i * 7
    img = Image.new("RGB", (320, 240), (seed % 256, (seed * 3) % 256, (seed * 5) % 256))
    ImageDraw.Draw(img).rectangle((40 + i, 30, 200, 160), fill=((seed * 7) % 256, 20, 90))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _content(i: int, tag: str) -> list:
    return [{"type": "text", "text": f"Request {tag}-{i}: what is in this picture?"},
            {"type": "image_url", "image_url": {"url": _image_url(i, tag)}}]


@dataclasses.dataclass
class Sample:
    tokens_per_s: float
    ttft_s: float


async def image_chats(server: Server, n: int, tokens: int, tag: str) -> Sample:
    contents = [_content(i, tag) for i in range(n)]  # encoded before the clock starts
    async with session() as s:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(stream_chat(s, server, c, tokens) for c in contents))
        wall = time.perf_counter() - t0
    return Sample(sum(r.tokens for r in streams) / wall, median([r.ttft for r in streams]))


def _model_dir() -> Path:
    root = ROOT / ".bench" / "vision-models"
    if not (root / VLM / "config.json").exists():
        from backends.mlx.vision.testmodel import write_test_vlm

        write_test_vlm(root, VLM)
    return root


async def run(ctx: Context) -> Section:
    vctx = dataclasses.replace(ctx, models_dir=_model_dir(), model=VLM, servers={})
    gate = start_mlxgate(vctx, {"MLXGATE_MAX_BATCH_SIZE": "32"}, "mlxgate (vision)")
    ctx.servers["mlxgate (vision)"] = gate
    vlm = ctx.servers["mlx_vlm.server"] = start_peer_server("mlx_vlm.server", vctx.model_path,
                                                               str(vctx.model_path.resolve()))
    servers = {"mlxgate": gate, "mlx_vlm": vlm}
    for server in servers.values():  # load the model, warm up
        await image_chats(server, 2, 4, "warm")

    samples: dict[str, dict[int, list[Sample]]] = {k: {n: [] for n in CLIENTS} for k in servers}
    for rep in range(ctx.reps):
        for n in CLIENTS:
            for key, server in servers.items():
                samples[key][n].append(await image_chats(server, n, ctx.tokens, f"{key[0]}{rep}.{n}"))

    rows, results = [], {}
    for n in CLIENTS:
        tps = {k: median([x.tokens_per_s for x in samples[k][n]]) for k in servers}
        ttft = {k: median([x.ttft_s for x in samples[k][n]]) for k in servers}
        g, v = tps["mlxgate"], tps["mlx_vlm"]
        rows.append([n, g, v, g / v, ttft["mlxgate"] * 1000, ttft["mlx_vlm"] * 1000])
        results[str(n)] = {
            "mlxgate_tokens_per_s": g,
            "mlx_vlm_server_tokens_per_s": v,
            "mlxgate_vs_mlx_vlm_server": g / v,
            "mlxgate_ttft_s": ttft["mlxgate"],
            "mlx_vlm_server_ttft_s": ttft["mlx_vlm"],
            "samples": {k: [dataclasses.asdict(x) for x in samples[k][n]] for k in servers},
        }
    table = Table(
        f"Vision: image chats on the generated {VLM}, {ctx.tokens} tokens per client, greedy (median of {ctx.reps})",
        ["clients", "mlxgate tok/s", "mlx_vlm.server tok/s", "mlxgate/mlx_vlm", "mlxgate TTFT ms",
         "mlx_vlm TTFT ms"],
        rows,
        "one 320 x 240 PNG per client; TTFT: median over the clients of one run",
    )
    return Section({"model": VLM, "tokens_per_client": ctx.tokens, "clients": results}, [table])
