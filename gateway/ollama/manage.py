"""Ollama's model-management routes: create, copy, delete, blobs (and push, refused).

Thin handlers over the service's management RPCs (``CreateModel``,
``CopyModel``, ``DeleteModel``, ``HasBlob``, ``CreateBlob``); the trust guard
has already required an admin key when keys are set (``mlxgate.admin``).
Answers as Ollama gives them: copy and delete 200 with no body, a stored
blob 200 / a new one 201, create NDJSON progress (or, with
``"stream": false``, its last object).  Errors before the first progress
line are HTTP statuses; after it, a last ``{"error": ...}`` line.  No path is
built here: names and digests travel to the service as data.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

import grpc
from aiohttp import web

from gateway.errors import ApiError, adapt, bad_request, ollama_body
from gateway.ollama import translate as tr
from gateway.parsing import parse, read_json
from gateway.render import json_response
from gateway.state import SERVER_CONFIG_KEY, client, request_id
from gateway.streaming import NDJSON, ndjson_frame, open_stream, pump, with_first
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


async def _read(call: Any) -> AsyncIterator[pb.CreateModelProgress]:
    while True:
        m = await call.read()
        if m is grpc.aio.EOF:
            return
        yield m


async def create(request: web.Request) -> web.StreamResponse:
    req, stream = create_request(await read_json(request))
    rid = request_id(request)
    call = client(request).create_model(req, rid)
    try:
        steps = _read(call)
        first = await anext(steps, None)  # a failure before any progress is a plain HTTP error
        if first is None:
            raise ApiError(500, "model creation ended without progress")
        if not stream:
            last = first
            async for last in steps:
                pass
            return json_response(_progress(last))
        resp = await open_stream(request, NDJSON)

        def error_frame(err: ApiError) -> bytes:
            return ndjson_frame(ollama_body(adapt(err, "ollama")))

        if await pump(resp, with_first(first, steps), lambda p: (_progress(p),), ndjson_frame, error_frame, rid):
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
        return resp
    finally:
        call.cancel()


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
