"""Ollama's model-management routes: pull, create, copy, delete, blobs (and push, refused).

Thin handlers over the service's management RPCs (``PullModel``,
``CreateModel``, ``CopyModel``, ``DeleteModel``, ``HasBlob``, ``CreateBlob``);
the trust guard has already required an admin key when keys are set
(``mlxgate.admin``).  Answers as Ollama gives them: copy and delete 200 with
no body, a stored blob 200 / a new one 201, pull and create NDJSON progress
(or, with ``"stream": false``, pull's ``success`` and create's last object).  Errors before the first progress
line are HTTP statuses; after it, a last ``{"error": ...}`` line.  No path is
built here: names and digests travel to the service as data.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable, Optional

from aiohttp import web

from gateway import generation
from gateway.errors import ApiError, bad_request
from gateway.generation import Renderer
from gateway.ollama import translate as tr
from gateway.parsing import parse, read_json
from gateway.routing import Route
from gateway.state import SERVER_CONFIG_KEY, client, request_id
from gateway.streaming import NDJSON, ndjson_frame
from mlxgate.dialects import ollama as owire
from mlxgate.dialects import ollama_manage as wire
from mlxgate.v1 import inference_pb2 as pb

PUSH_HELP = (
    "mlxgate does not push models to a registry. Its managed models are MLX folders under the models "
    "directory (<models_dir>/.mlxgate-store); upload one to the Hugging Face Hub with huggingface-cli or "
    "mlx_lm.upload."
)
#: Bytes per CreateBlob message.
BLOB_CHUNK = 1024 * 1024


def create_request(data: dict[str, Any]) -> tuple[pb.CreateModelRequest, bool]:
    r = parse(wire.CreateRequest, data, "/api/create")
    model = r.model or r.name or ""
    if not model:
        raise bad_request("model is required", param="model")
    req = pb.CreateModelRequest(
        model=model,
        from_model=r.from_ or "",
        files=r.files or {},
        adapters=r.adapters or {},
        license=r.licenses(),
        parameters=tr.sampling(r.parameters),
        messages=[tr.message_pb(m, i) for i, m in enumerate(r.messages or ())],
        quantize=r.quantize or "",
    )
    if r.template is not None:
        req.template = r.template
    if r.system is not None:
        req.system = r.system
    return req, r.stream is not False


def _progress(p: pb.CreateModelProgress) -> wire.Progress:
    out: wire.Progress = {"status": p.status}
    if p.digest:
        out["digest"] = p.digest
    if p.total:
        out["total"] = p.total
        out["completed"] = p.completed
    return out


class _Progress(Renderer):
    """Progress lines as Ollama streams them; not streamed, the last one
    (or ``answer``).  They name no backend, and a failure is a status."""

    media_type = NDJSON
    dialect = "ollama"
    frame = staticmethod(ndjson_frame)

    def __init__(self, line: Callable[[Any], Any], answer: Optional[dict[str, Any]] = None) -> None:
        self.line, self.answer, self.last = line, answer, None

    def check(self, first: Any) -> None:
        pass

    def headers(self, ev: Any) -> dict[str, str]:
        return {}

    def event(self, index: int, ev: Any) -> Iterable[Any]:
        return (self.line(ev),)

    def take(self, index: int, ev: Any) -> None:
        self.last = ev

    async def whole(self) -> Any:
        return self.answer or self.line(self.last)


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's pull over PullModel: progress lines, or one ``{"status": "success"}``."""
    req, streamed = tr.pull_request(await read_json(request))
    stream = client(request).pull_model(req, request_id(request))
    return await generation.run(request, [stream], _Progress(tr.progress_line, {"status": "success"}), streamed)


async def create(request: web.Request) -> web.StreamResponse:
    req, streamed = create_request(await read_json(request))
    stream = client(request).create_model(req, request_id(request))
    return await generation.run(request, [stream], _Progress(_progress), streamed)


async def copy(request: web.Request) -> web.Response:
    r = parse(wire.CopyRequest, await read_json(request), "/api/copy")
    await client(request).copy_model(r.source, r.destination, request_id(request))
    return web.Response(status=200)


async def delete(request: web.Request) -> web.Response:
    r = parse(wire.DeleteRequest, await read_json(request), "/api/delete")
    model = r.model or r.name or ""
    if not model:
        raise bad_request("model is required", param="model")
    await client(request).delete_model(model, request_id(request))
    return web.Response(status=200)


async def head_blob(request: web.Request) -> web.Response:
    res = await client(request).has_blob(request.match_info["digest"], request_id(request))
    return web.Response(status=200 if res.exists else 404)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body a chunk at a time; a stall longer than http_body_timeout is a 408."""
    limit = request.app[SERVER_CONFIG_KEY].http_body_timeout
    while True:
        try:
            async with asyncio.timeout(limit):
                data = await request.content.read(BLOB_CHUNK)
        except TimeoutError:
            raise ApiError(408, f"request body stalled for more than {limit:g} s") from None
        if not data:
            return
        yield data


async def post_blob(request: web.Request) -> web.Response:
    digest, rid = request.match_info["digest"], request_id(request)
    c = client(request)
    if (await c.has_blob(digest, rid)).exists:
        return web.Response(status=200)
    await c.create_blob(digest, _body(request), rid)
    return web.Response(status=201)


async def push(request: web.Request) -> web.Response:
    raise ApiError(501, PUSH_HELP)


_PROGRESS = "NDJSON progress lines (stream, the default) or the last one (stream=false)"

#: Model management's routes (in the Ollama table).
ROUTES: list[Route] = [
    Route("POST", "/api/pull", pull, "Pull a model", body=owire.PullRequest, answer=owire.ProgressResponse,
          stream="ndjson", stream_item=owire.ProgressResponse,
          description="From the Hugging Face Hub (HF_ENDPOINT): a catalog name, hf.co/<owner>/<repo>[:<revision>] "
                      "or <owner>/<repo>[:<revision>]. "
                      "NDJSON lines (stream, the default) or one JSON object (stream=false)"),
    Route("POST", "/api/push", push, "Push a model (unsupported)", unsupported=True, description=PUSH_HELP),
    Route("POST", "/api/create", create, "Create a model", body=wire.CreateRequest, answer=wire.Progress,
          stream="ndjson", stream_item=wire.Progress, description=_PROGRESS),
    Route("POST", "/api/copy", copy, "Copy a model", body=wire.CopyRequest),
    Route("DELETE", "/api/delete", delete, "Delete a model", body=wire.DeleteRequest),
    Route("HEAD", "/api/blobs/{digest}", head_blob, "Check a blob", statuses=(404,)),
    Route("POST", "/api/blobs/{digest}", post_blob, "Push a blob", statuses=(201,)),
]
