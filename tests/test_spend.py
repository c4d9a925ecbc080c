"""What cloud fallback costs, against a real ``mlxgate serve`` and a fake
OpenAI-compatible cloud that reports usage (tests/fakes/openai_fake.py:
11 prompt tokens, 3 of them cached, 2 completion tokens per chat).

Prices are chosen so each cloud chat costs exactly $10: input and output at
$1 per token, cached input free ((11 - 3) + 2 = 10).  Judged by the official
``openai`` and ``anthropic`` clients and plain HTTP for the Ollama dialect.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import sys
from pathlib import Path
from typing import AsyncIterator, Optional

import aiohttp
import anthropic
import openai
import pytest

from tests.fakes.openai_fake import FakeOpenAI
from tests.scrape import scrape
from tests.test_cli_serve import clean_env

COST = 10.0  # USD per cloud chat at PRICES
PRICES = '{ "*" = [1000000.0, 1000000.0, 0.0] }'
POLL_S = 0.05


@pytest.fixture
async def cloud() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(models=["gpt-test"])
    await fake.start()
    yield fake
    await fake.stop()


class Serve:
    """One ``mlxgate serve`` process (asyncio subprocess: the fake cloud runs on this loop)."""

    def __init__(self, proc: asyncio.subprocess.Process, http: str) -> None:
        self.proc = proc
        self.http = http

    @classmethod
    async def start(cls, tmp_path: Path, config: str, models: Path, **env: str) -> "Serve":
        toml = tmp_path / "mlxgate.toml"
        toml.write_text(config)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlxgate_cli", "serve", "--port", "0", "--grpc-port", "0",
            "--models-dir", str(models), "--config", str(toml),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(tmp_path, **env))
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        m = re.match(r"mlxgate: HTTP (http://\S+)\s+gRPC (\S+)", line)
        if not m:
            proc.kill()
            _, err = await proc.communicate()
            raise AssertionError(f"unexpected first line {line!r}; stderr: {err.decode()[-3000:]}")
        return cls(proc, m.group(1))

    async def stop(self) -> str:
        """SIGTERM; exit status 0; returns stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.proc.communicate(), 60)
        text = err.decode()
        assert self.proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        return text

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    def openai(self, key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.http}/v1", api_key=key, max_retries=0)

    async def usage(self, key: Optional[str] = None, **query: str) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession() as s, s.get(f"{self.http}/api/usage", params=query,
                                                       headers=headers) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def usage_until(self, requests: int, key: Optional[str] = None) -> dict:
        """/api/usage once the ledger holds ``requests`` cloud requests (the writer is a thread)."""
        async with asyncio.timeout(30):
            while True:
                u = await self.usage(key, group_by="backend")
                if sum(g["requests"] for g in u["by"] if g["backend"].startswith("cloud:")) >= requests:
                    return u
                await asyncio.sleep(POLL_S)


def config(cloud: FakeOpenAI, extra: str = "") -> str:
    return (f'[[cloud.providers]]\nname = "fake"\nbase_url = "{cloud.base_url}"\nmodels = ["gpt-test"]\n'
            f'prices = {PRICES}\n\n[aliases]\n"smart" = ["cloud:fake:gpt-test", "mlx:tiny-llama"]\n\n{extra}')


async def chat(client: openai.AsyncOpenAI, model: str = "gpt-test"):
    return await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)


async def test_budget_reached_is_429_in_every_dialect_local_models_still_served_and_restart_keeps_it(
    tmp_path: Path, test_model_dir: Path, cloud: FakeOpenAI
) -> None:
    cfg = config(cloud, "[budget]\ncloud_usd_per_day = 25\n")
    srv = await Serve.start(tmp_path, cfg, test_model_dir)
    try:
        client = srv.openai()
        for _ in range(3):  # $10 each: the third takes the day's spend to $30
            raw = await chat(client)
            assert raw.headers["x-mlxgate-backend"] == "cloud:fake"
        with pytest.raises(openai.RateLimitError) as e:
            await chat(client)
        assert e.value.status_code == 429
        assert e.value.code == "insufficient_quota"
        assert "daily cloud budget of $25.00" in e.value.message and "resets at" in e.value.message
        assert 0 < int(e.value.response.headers["Retry-After"]) <= 86400
        # Anthropic: rate_limit_error (not 529 overloaded); Ollama: {"error"} with 429.
        ac = anthropic.AsyncAnthropic(base_url=srv.http, api_key="none", max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as ae:
            await ac.messages.create(model="gpt-test", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert ae.value.status_code == 429 and ae.value.body["error"]["type"] == "rate_limit_error"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{srv.http}/api/chat", json={"model": "gpt-test", "stream": False, "messages": [
                    {"role": "user", "content": "hi"}]}) as r:
                assert r.status == 429 and "Retry-After" in r.headers
                assert "cloud budget" in (await r.json())["error"]
            # A local model is served; an alias whose cloud target is spent falls back to it.
            async with s.post(f"{srv.http}/api/generate", json={"model": "tiny-llama", "prompt": "hi",
                                                                "stream": False, "options": {"num_predict": 2}}) as r:
                assert r.status == 200 and (await r.json())["done"] is True
        raw = await chat(client, "smart")
        assert raw.headers["x-mlxgate-backend"] == "mlx"
        u = await srv.usage_until(3)
        cloud_rows = [g for g in u["by"] if g["backend"] == "cloud:fake"]
        assert cloud_rows == [{"key": "*", "backend": "cloud:fake", "model": "*", "requests": 3,
                               "prompt_tokens": 33, "completion_tokens": 6, "cached_tokens": 9,
                               "cost_usd": 3 * COST}]
        assert u["budget"]["day"]["spent_usd"] == 3 * COST and u["budget"]["day"]["limit_usd"] == 25
        assert u["budget"]["day"]["remaining_usd"] == 0 and u["budget"]["month"]["limit_usd"] is None
        m = await scrape(f"{srv.http}/metrics")
        assert m['mlxgate_cost_usd_total{backend="cloud:fake",key="none",model="gpt-test"}'] == 3 * COST
        assert m['mlxgate_tokens_total{backend="cloud:fake",direction="prompt",key="none",model="gpt-test"}'] == 33
        assert m['mlxgate_budget_remaining_usd{scope="day"}'] == 0
        assert m['mlxgate_fallbacks_total{from_backend="cloud:fake",reason="BUDGET",to_backend="mlx"}'] >= 1
        await srv.stop()
    finally:
        srv.kill()
    # The spend survives a restart: still refused, without a new cloud call.
    calls = len(cloud.requests)
    srv = await Serve.start(tmp_path, cfg, test_model_dir)
    try:
        with pytest.raises(openai.RateLimitError):
            await chat(srv.openai())
        assert len(cloud.requests) == calls
        await srv.stop()
    finally:
        srv.kill()


async def test_per_key_rate_limit_budget_models_and_usage_for_admins_only(
    tmp_path: Path, test_model_dir: Path, cloud: FakeOpenAI
) -> None:
    keys = ('[[keys]]\nname = "root"\nkey_env = "ROOT_KEY"\nadmin = true\n\n'
            '[[keys]]\nname = "bob"\nkey = "sk-bob"\nrequests_per_minute = 3\ncloud_usd_per_day = 15\n'
            'models = ["gpt-test", "tiny-llama"]\n\n'
            '[[keys]]\nname = "carol"\nkey = "sk-carol"\nmodels = ["tiny-llama"]\n')
    srv = await Serve.start(tmp_path, config(cloud, keys), test_model_dir, ROOT_KEY="sk-root",
                            MLXGATE_API_KEYS="sk-plain")
    try:
        bob = srv.openai("sk-bob")
        first = await chat(bob)
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert re.fullmatch(r"(\d+m)?\d+s", first.headers["x-ratelimit-reset-requests"])
        await chat(bob)  # $20 of bob's $15 a day
        with pytest.raises(openai.RateLimitError) as budget:
            await chat(bob)
        assert budget.value.code == "insufficient_quota" and "key 'bob'" in budget.value.message
        with pytest.raises(openai.RateLimitError) as rate:  # the fourth request this minute
            await chat(bob, "tiny-llama")
        assert rate.value.code == "rate_limit_exceeded" and "3 requests per minute" in rate.value.message
        h = rate.value.response.headers
        assert h["x-ratelimit-remaining-requests"] == "0" and int(h["Retry-After"]) >= 1
        # Others are not held by bob's limits; a model outside a key's list is 403.
        assert (await chat(srv.openai("sk-plain"))).headers["x-mlxgate-backend"] == "cloud:fake"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await chat(srv.openai("sk-carol"))
        assert "key 'carol' may not use model 'gpt-test'" in denied.value.message
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{srv.http}/api/usage", headers={"Authorization": "Bearer sk-bob"}) as r:
                assert r.status == 403 and "admin" in (await r.json())["error"]
            async with s.get(f"{srv.http}/api/usage", params={"since": "yesterday"},
                             headers={"Authorization": "Bearer sk-root"}) as r:
                assert r.status == 400 and "since" in (await r.json())["error"]
        u = await srv.usage_until(3, "sk-root")
        u = await srv.usage("sk-root", group_by="key")
        by_key = {g["key"]: g for g in u["by"]}
        assert by_key["bob"]["requests"] == 2 and by_key["bob"]["cost_usd"] == 2 * COST
        assert by_key["key-1"]["requests"] == 1
        assert u["budget"]["key:bob"]["spent_usd"] == 2 * COST and u["budget"]["key:bob"]["limit_usd"] == 15
        # The command line, against the running server.
        for args, key in ((["--json", "--group-by", "key"], "sk-root"), (["--since", "1h"], "sk-root"), ([], "sk-bob")):
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlxgate_cli", "usage", *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=clean_env(tmp_path, MLXGATE_HOST=srv.http, MLXGATE_API_KEY=key))
            out, cli_err = await asyncio.wait_for(cli.communicate(), 60)
            if key == "sk-bob":
                assert cli.returncode == 1 and b"403" in cli_err and b"admin" in cli_err
            elif "--json" in args:
                assert cli.returncode == 0 and json.loads(out)["by"] == u["by"]
            else:
                text = out.decode()
                assert cli.returncode == 0 and "cost_usd" in text.splitlines()[0]
                assert re.search(r"^bob\s+cloud:fake\s+gpt-test\s+2\s+22\s+4\s+6\s+20\.0000", text, re.M), text
                assert re.search(r"^key:bob\s+20\.0000\s+15\.00", text, re.M), text
        err = await srv.stop()
    finally:
        srv.kill()
    for secret in ("sk-bob", "sk-root", "sk-carol", "sk-plain"):
        assert secret not in err
    db = sqlite3.connect(tmp_path / "data" / "usage.sqlite3")
    rows = db.execute("SELECT * FROM usage").fetchall()
    db.close()
    assert rows and not any(s in repr(r) for r in rows for s in ("sk-bob", "sk-root", "sk-plain"))
    assert {r[1] for r in rows} == {"bob", "key-1"} and {r[2] for r in rows} == {"openai"}


async def test_100_concurrent_cloud_requests_against_a_small_budget(
    tmp_path: Path, test_model_dir: Path, cloud: FakeOpenAI
) -> None:
    srv = await Serve.start(tmp_path, config(cloud, "[budget]\ncloud_usd_per_month = 50\n"), test_model_dir)
    try:
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

        async def one(s: aiohttp.ClientSession) -> int:
            async with s.post(f"{srv.http}/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as s:
            statuses = await asyncio.gather(*(one(s) for _ in range(100)))
        ok = statuses.count(200)
        assert statuses.count(429) == 100 - ok
        assert ok >= 5  # the budget was not reached before $50
        u = await srv.usage_until(ok)
        (row,) = [g for g in u["by"] if g["backend"] == "cloud:fake"]
        assert row["requests"] == ok and row["cost_usd"] == ok * COST  # each answered request once
        # Overshoot: at most what was in flight when the budget was reached.
        assert u["budget"]["month"]["spent_usd"] == ok * COST < 50 + 100 * COST
        async with aiohttp.ClientSession() as s:
            assert await one(s) == 429
        await srv.stop()
    finally:
        srv.kill()


async def test_corrupt_ledger_is_logged_once_and_inference_goes_on(
    tmp_path: Path, test_model_dir: Path, cloud: FakeOpenAI
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "usage.sqlite3").write_bytes(b"this is not a database" * 100)
    srv = await Serve.start(tmp_path, config(cloud), test_model_dir)
    try:
        for _ in range(3):
            await chat(srv.openai())
        u = await srv.usage()
        assert u["by"] == []
        err = await srv.stop()
    finally:
        srv.kill()
    assert len([x for x in err.splitlines() if "usage ledger" in x]) == 1
    assert "cannot be opened" in err


async def test_locked_ledger_is_logged_once_and_its_rows_written_once_it_is_free(
    tmp_path: Path, test_model_dir: Path, cloud: FakeOpenAI
) -> None:
    srv = await Serve.start(tmp_path, config(cloud), test_model_dir)
    lock = None
    seen = []
    try:
        await chat(srv.openai())
        await srv.usage_until(1)
        lock = sqlite3.connect(tmp_path / "data" / "usage.sqlite3", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # another process holding the file
        for _ in range(3):
            assert (await chat(srv.openai())).headers["x-mlxgate-backend"] == "cloud:fake"
        assert srv.proc.stderr is not None
        async with asyncio.timeout(30):  # the writer gives up on the lock after its busy timeout
            while not any("cannot be written" in x for x in seen):
                seen.append((await srv.proc.stderr.readline()).decode())
        assert (await chat(srv.openai())).headers["x-mlxgate-backend"] == "cloud:fake"
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        await srv.usage_until(5)  # the kept rows, and the one that came after
        err = await srv.stop()
    finally:
        if lock is not None:
            lock.close()
        srv.kill()
    lines = [x for x in [*seen, *err.splitlines()] if "usage ledger" in x and "cannot be written" in x]
    assert len(lines) == 1 and "keeping" in lines[0]
