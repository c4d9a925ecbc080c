"""/v1/responses behind the front's trust checks and bounds: key privacy of
stored responses, Origin and keys, metrics, and a conversation whose earlier
turns the store no longer holds.  Real fronts (composed as ``mlxgate serve``
composes them) over the session's gRPC service and MLX engine."""

from __future__ import annotations

import json
import logging
import re

import aiohttp
import openai
import pytest

from gateway.app import create_app, end_calls, start_http
from mlxgate.config import ServerConfig
from tests.test_http_trust import EVIL, KEY1, KEY2, WRONG, assert_openai_error, engine_idle_prefills, front

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2}


def client(base: str, key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


async def test_stored_responses_are_private_to_the_key_that_made_them(stack, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with front(stack, api_keys=[KEY1, KEY2], data_dir=str(tmp_path)) as base:
        one, two = client(base, KEY1), client(base, KEY2)
        try:
            r = await one.responses.create(**BODY)
            assert (await one.responses.retrieve(r.id)).id == r.id
            # Another key: every way in is 404, as for an id that does not exist.
            for call in (two.responses.retrieve(r.id), two.responses.input_items.list(r.id),
                         two.responses.delete(r.id),
                         two.responses.create(**BODY, previous_response_id=r.id)):
                with pytest.raises(openai.NotFoundError):
                    await call
            # x-api-key names the same owner as Authorization: Bearer.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{base}/v1/responses/{r.id}", headers={"x-api-key": KEY1}) as resp:
                    assert resp.status == 200 and (await resp.json())["id"] == r.id
            follow = await one.responses.create(**BODY, previous_response_id=r.id)
            assert follow.previous_response_id == r.id
            await one.responses.delete(r.id)
        finally:
            await one.close()
            await two.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert stored  # the store is there ...
    for key in (KEY1, KEY2):  # ... and holds no key; no log line does either
        assert key.encode() not in stored
        assert key not in caplog.text


async def test_responses_refuse_a_cross_site_origin_and_a_missing_key(stack, tmp_path):
    prefills = await engine_idle_prefills(stack)
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.base + "/v1/responses", data=json.dumps(BODY),
                          headers={"Content-Type": "text/plain", "Origin": EVIL}) as r:
            assert r.status == 403
            assert assert_openai_error(await r.json(), "permission_error", EVIL)["code"] == "origin_not_allowed"
        for method, path in (("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                             ("GET", "/v1/responses/resp_1/input_items")):
            async with s.request(method, stack.base + path, headers={"Origin": EVIL}) as r:
                assert r.status == 403, (method, path)
    assert stack.backend.stats.prefills == prefills
    async with front(stack, api_keys=[KEY1], data_dir=str(tmp_path)) as base:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
                async with s.post(base + "/v1/responses", json=BODY, headers=headers) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                    assert assert_openai_error(await r.json(), "authentication_error")["code"] == "invalid_api_key"
                async with s.get(base + "/v1/responses/resp_1", headers=headers) as r:
                    assert r.status == 401
    assert stack.backend.stats.prefills == prefills
    assert not any(tmp_path.iterdir())  # refused before the store was opened


async def test_requests_are_counted_under_the_openai_dialect(stack, tmp_path):
    async with front(stack, data_dir=str(tmp_path)) as base:
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/responses", json=BODY) as r:
                rid = (await r.json())["id"]
            async with s.get(f"{base}/v1/responses/{rid}/input_items") as r:
                assert r.status == 200
            async with s.get(f"{base}/v1/responses/resp_nope") as r:
                assert r.status == 404
            async with s.get(base + "/metrics") as r:
                text = await r.text()
    for route, status in (("/v1/responses", 200), ("/v1/responses/{response_id}/input_items", 200),
                          ("/v1/responses/{response_id}", 404)):
        pattern = rf'mlxgate_http_requests_total\{{dialect="openai",route="{re.escape(route)}",status="{status}"\}} 1'
        assert re.search(pattern, text), route


async def test_a_conversation_whose_start_was_removed_says_so(stack, tmp_path):
    """The store keeps 2 responses: a third turn removes the first, and continuing the chain is a
    404 naming the missing response; newer conversations go on."""
    async with front(stack, data_dir=str(tmp_path), responses_max_count=2) as base:
        oai = client(base)
        try:
            r1 = await oai.responses.create(**BODY)
            r2 = await oai.responses.create(**BODY, previous_response_id=r1.id)
            r3 = await oai.responses.create(**BODY, previous_response_id=r2.id)
            with pytest.raises(openai.NotFoundError):
                await oai.responses.retrieve(r1.id)
            with pytest.raises(openai.NotFoundError) as e:
                await oai.responses.create(**BODY, previous_response_id=r3.id)
            err = e.value.body
            assert err["param"] == "previous_response_id" and err["code"] == "previous_response_not_found"
            assert r1.id in err["message"] and "no longer stored" in err["message"]
            fresh = await oai.responses.create(**BODY)
            assert (await oai.responses.create(**BODY, previous_response_id=fresh.id)).status == "incomplete"
        finally:
            await oai.close()


async def test_a_conversation_longer_than_a_body_is_refused(stack, tmp_path):
    """The stored history is bounded by the front's body limit (what the same history sent in one
    request may weigh): beyond it, a 400 before anything is generated."""
    async with front(stack, data_dir=str(tmp_path)) as base:  # max_body_bytes: 1 MiB
        oai = client(base)
        try:
            # 600 KB a turn, under the body limit; the engine keeps the newest messages that fit.
            big = [{"role": "user", "content": "word " * 300} for _ in range(400)]
            r1 = await oai.responses.create(model="tiny-llama", input=big, max_output_tokens=1,
                                            truncation="auto")
            r2 = await oai.responses.create(model="tiny-llama", input=big, max_output_tokens=1,
                                            truncation="auto", previous_response_id=r1.id)
            assert r2.status == "incomplete"
            with pytest.raises(openai.BadRequestError) as e:
                await oai.responses.create(model="tiny-llama", input="more", previous_response_id=r2.id)
            assert e.value.body["param"] == "previous_response_id" and "too long" in e.value.body["message"]
        finally:
            await oai.close()


async def test_an_unusable_store_is_a_503_and_store_false_still_works(stack, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    async with front(stack, data_dir=str(blocker)) as base:
        oai = client(base)
        try:
            with pytest.raises(openai.InternalServerError) as e:
                await oai.responses.create(**BODY)
            assert e.value.status_code == 503 and "store: false" in e.value.body["message"]
            with pytest.raises(openai.InternalServerError):
                await oai.responses.retrieve("resp_1")
            r = await oai.responses.create(**BODY, store=False)
            assert r.output_text and r.store is False
        finally:
            await oai.close()
    assert "responses store" in caplog.text


async def test_a_failure_after_the_stream_began_ends_it_with_response_failed(stack, tmp_path):
    """The calls still running at shutdown are ended (gateway.app.end_calls): the stream's last events
    are error and response.failed, and the failed response is stored as such."""
    cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0, data_dir=str(tmp_path))
    app = create_app(cfg, stack.grpc_target)
    http = await start_http(app, "127.0.0.1", 0)
    try:
        body = {**BODY, "stream": True, "max_output_tokens": 2000}
        events = []
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{http.url}/v1/responses", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
                        # The first event goes out with the first token: the call has begun
                        # (by the first text delta the tiny model may have finished all of it).
                        if events[-1]["type"] == "response.created":
                            assert end_calls(app) == 1
            kinds = [e["type"] for e in events]
            assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            failed = events[-1]["response"]
            assert failed["status"] == "failed" and "shutting down" in failed["error"]["message"]
            assert failed["error"]["code"] == "server_error" and events[-2]["message"] == failed["error"]["message"]
            async with s.get(f"{http.url}/v1/responses/{failed['id']}") as r:
                assert (await r.json())["status"] == "failed"
    finally:
        await http.stop()
