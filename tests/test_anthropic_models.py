"""GET /v1/models and /v1/models/{id}: both OpenAI's API and Anthropic's serve
these paths; a client that sends ``anthropic-version`` (every Anthropic
client does) gets Anthropic's shapes, paging and errors.  Judges: the
``anthropic`` SDK's ``models`` resource (its auto-paging included) and the
``openai`` SDK on the same paths, against a real front and gRPC service over
a backend that lists five models."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from backends.routing import Router
from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import ServerConfig
from tests.fakes.scripted_backend import ScriptedBackend

pytestmark = pytest.mark.timeout(60)

MODELS = ["m1", "m2", "m3", "m4", "m5"]


@pytest.fixture
async def front():
    service = await start_inference_service(Router([ScriptedBackend("mlx", MODELS, is_engine=True)]), port=0)
    cfg = ServerConfig(host="127.0.0.1", port=0, api_keys=["sk-local"])
    http = await start_http(create_app(cfg, service.target), cfg.host, 0)
    try:
        yield http.url
    finally:
        await http.stop()
        await service.stop(grace=1.0)


def claude(base: str, key: str = "sk-local") -> AsyncAnthropic:
    return AsyncAnthropic(base_url=base, api_key=key, max_retries=0)


async def test_list_pages_as_anthropic_pages(front):
    c = claude(front)
    first = await c.models.list(limit=2)
    assert [m.id for m in first.data] == ["m1", "m2"]
    assert first.has_more is True and first.first_id == "m1" and first.last_id == "m2"
    m = first.data[0]
    assert m.type == "model" and m.display_name == "m1" and m.created_at.tzinfo is not None
    # The SDK's auto-paging follows last_id as after_id to the end.
    assert [m.id async for m in await c.models.list(limit=2)] == MODELS
    assert [m.id async for m in await c.models.list()] == MODELS  # default limit 20: one page
    last = await c.models.list(limit=2, after_id="m4")
    assert [m.id for m in last.data] == ["m5"] and last.has_more is False
    back = await c.models.list(limit=2, before_id="m4")
    assert [m.id for m in back.data] == ["m2", "m3"] and back.has_more is True
    start = await c.models.list(limit=5, before_id="m2")
    assert [m.id for m in start.data] == ["m1"] and start.has_more is False
    empty = await c.models.list(after_id="m5")
    assert empty.data == [] and empty.has_more is False and empty.first_id is None and empty.last_id is None


async def test_retrieve_and_errors_in_anthropic_shape(front):
    c = claude(front)
    m = await c.models.retrieve("m3")
    assert (m.id, m.type, m.display_name) == ("m3", "model", "m3")
    assert (await c.models.retrieve("m3:latest")).id == "m3:latest"  # echoed as asked
    with pytest.raises(anthropic.NotFoundError) as nf:
        await c.models.retrieve("nope")
    assert nf.value.type == "not_found_error" and nf.value.api_message == "model: nope"
    assert nf.value.request_id
    for bad, says in (({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"after_id": "nope"}, "after_id"),
                      ({"after_id": "m1", "before_id": "m3"}, "not both")):
        with pytest.raises(anthropic.BadRequestError) as e:
            await c.models.list(**bad)
        assert e.value.type == "invalid_request_error" and says in e.value.api_message, (bad, e.value.api_message)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await claude(front, "sk-wrong").models.list()
    assert auth.value.type == "authentication_error"


async def test_openai_clients_are_unchanged(front):
    o = AsyncOpenAI(base_url=front + "/v1", api_key="sk-local", max_retries=0)
    listed = await o.models.list()
    assert [m.id for m in listed.data] == MODELS and listed.data[0].object == "model"
    assert (await o.models.retrieve("m2")).owned_by == "mlx"
    with pytest.raises(openai.NotFoundError) as nf:
        await o.models.retrieve("nope")
    assert nf.value.code == "model_not_found"
    # Anthropic's query parameters mean nothing to OpenAI's list.
    async with aiohttp.ClientSession() as s:
        async with s.get(front + "/v1/models?limit=0", headers={"Authorization": "Bearer sk-local"}) as r:
            assert r.status == 200 and (await r.json())["object"] == "list"
