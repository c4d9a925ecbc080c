"""The Responses API's store (gateway/responses/store.py) on its own: a real
SQLite file in a tmp folder, its bounds, its cost per call, its owners."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.responses.store import BadCursor, BrokenChain, NotFound, ResponseStore, TooLong, Unavailable

pytestmark = pytest.mark.timeout(60)


def store(path: Path, **kw: Any) -> ResponseStore:
    kw.setdefault("max_count", 1000)
    kw.setdefault("max_bytes", 10**8)
    kw.setdefault("max_history_bytes", 10**7)
    kw.setdefault("max_history_items", 1000)
    return ResponseStore(path / "responses.sqlite3", **kw)


def response(rid: str, previous: str | None = None, text: str = "answer", pad: int = 0) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "previous_response_id": previous, "status": "completed",
        "output": [{"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text + "x" * pad, "annotations": []}]}],
    }


def user(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or f"msg_in_{text}", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def texts(items: list[dict[str, Any]]) -> list[str]:
    return [i["content"][0]["text"] for i in items]


async def test_survives_reopening_and_the_file_is_private_and_in_wal_mode(tmp_path):
    s = store(tmp_path)
    assert not (tmp_path / "responses.sqlite3").exists()  # opened on first use
    await s.save("", response("resp_1"), [user("hello")])
    blob = await s.get("resp_1", "")
    await s.close()
    path = tmp_path / "responses.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    again = store(tmp_path)
    try:
        assert await again.get("resp_1", "") == blob
        assert texts((await again.items("resp_1", "", 20, "asc", None, None)).items) == ["hello"]
        assert texts(await again.history("resp_1", "")) == ["hello", "answer"]
    finally:
        await again.close()


async def test_work_runs_on_the_store_thread(tmp_path):
    s = store(tmp_path)
    try:
        name = await s._run(lambda: threading.current_thread().name)
        assert name.startswith("responses-store") and name != threading.current_thread().name
    finally:
        await s.close()
    with pytest.raises(Unavailable):  # closed (the app's cleanup): handlers answer 503
        await s.get("resp_1", "")


async def test_count_bound_removes_the_oldest_first(tmp_path):
    s = store(tmp_path, max_count=3)
    try:
        for i in range(5):
            await s.save("", response(f"resp_{i}"), [user(f"q{i}")])
        kept = [i for i in range(5) if await s.get(f"resp_{i}", "") is not None]
        assert kept == [2, 3, 4]
        assert (await s.stats())[0] == 3
        # The removed responses' items went with them.
        rows = await s._run(lambda: s.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        assert rows == 3
    finally:
        await s.close()


async def test_byte_bound_removes_the_oldest_first_and_the_totals_stay_exact(tmp_path):
    s = store(tmp_path, max_bytes=10_000)
    try:
        for i in range(12):
            await s.save("", response(f"resp_{i}", pad=2_000), [user(f"q{i}")])
        count, total = await s.stats()
        assert total <= 10_000 and count == 4  # each is a little over 2,000 bytes
        exact = await s._run(lambda: s.db.execute("SELECT COUNT(*), SUM(bytes) FROM responses").fetchone())
        assert exact == (count, total)
        assert await s.get("resp_11", "") is not None and await s.get("resp_7", "") is None
        # One that alone is larger than the whole store is not kept (and evicts nothing).
        assert await s.save("", response("resp_big", pad=20_000), []) is False
        assert await s.get("resp_big", "") is None and await s.stats() == (count, total)
    finally:
        await s.close()


async def test_history_is_the_chain_oldest_first(tmp_path):
    s = store(tmp_path)
    try:
        await s.save("", response("resp_1", text="a1"), [user("q1")])
        await s.save("", response("resp_2", "resp_1", text="a2"), [user("q2")])
        await s.save("", response("resp_3", "resp_2", text="a3"), [user("q3"), user("q3b")])
        assert texts(await s.history("resp_3", "")) == ["q1", "a1", "q2", "a2", "q3", "q3b", "a3"]
        assert texts(await s.history("resp_2", "")) == ["q1", "a1", "q2", "a2"]
        with pytest.raises(NotFound):
            await s.history("resp_nope", "")
    finally:
        await s.close()


async def test_a_chain_whose_ancestor_is_gone_says_which(tmp_path):
    s = store(tmp_path, max_count=2)
    try:
        await s.save("", response("resp_1"), [user("q1")])
        await s.save("", response("resp_2", "resp_1"), [user("q2")])
        await s.save("", response("resp_3", "resp_2"), [user("q3")])  # evicts resp_1
        with pytest.raises(BrokenChain) as e:
            await s.history("resp_3", "")
        assert e.value.missing == "resp_1" and e.value.response_id == "resp_3"
        await s.delete("resp_2", "")
        with pytest.raises(BrokenChain) as e:
            await s.history("resp_3", "")
        assert e.value.missing == "resp_2"
    finally:
        await s.close()


async def test_history_cost_is_bounded_before_any_content_is_read(tmp_path):
    """A conversation beyond the bounds is refused from the links alone (an index walk
    of at most max_history_items + 1 rows): no response body nor item is read."""
    s = store(tmp_path, max_history_items=10, max_history_bytes=5_000)
    try:
        previous = None
        for i in range(30):
            await s.save("", response(f"resp_{i}", previous), [user(f"q{i}")])
            previous = f"resp_{i}"
        statements: list[str] = []
        await s._run(lambda: s.db.set_trace_callback(statements.append))
        with pytest.raises(TooLong):
            await s.history("resp_29", "")
        assert len(statements) == 1 and "WITH RECURSIVE" in statements[0]
        # Within the item bound but over the bytes: refused the same way.
        await s.save("", response("resp_big", pad=6_000), [])
        statements.clear()
        with pytest.raises(TooLong) as e:
            await s.history("resp_big", "")
        assert "bytes" in e.value.what and len(statements) == 1
        await s._run(lambda: s.db.set_trace_callback(None))
        # At the bound it is served.
        assert len(await s.history("resp_4", "")) == 10
    finally:
        await s.close()


async def test_input_items_pages(tmp_path):
    s = store(tmp_path)
    try:
        await s.save("", response("resp_1"), [user(f"m{i}", f"id{i}") for i in range(7)])
        page = await s.items("resp_1", "", 3, "desc", None, None)
        assert texts(page.items) == ["m6", "m5", "m4"] and page.has_more
        page = await s.items("resp_1", "", 3, "asc", "id4", None)
        assert texts(page.items) == ["m5", "m6"] and not page.has_more
        page = await s.items("resp_1", "", 10, "desc", "id4", None)
        assert texts(page.items) == ["m3", "m2", "m1", "m0"]
        page = await s.items("resp_1", "", 10, "asc", "id1", "id5")
        assert texts(page.items) == ["m2", "m3", "m4"]
        with pytest.raises(BadCursor) as e:
            await s.items("resp_1", "", 10, "asc", None, "nope")
        assert e.value.param == "before"
        with pytest.raises(NotFound):
            await s.items("resp_2", "", 10, "asc", None, None)
    finally:
        await s.close()


async def test_owners_do_not_see_each_other(tmp_path):
    s = store(tmp_path)
    try:
        key_a, key_b = hashlib.sha256(b"key-a").digest(), hashlib.sha256(b"key-b").digest()
        a, b = await s.owner(key_a), await s.owner(key_b)
        assert a != b and len(a) == 64 and await s.owner(key_a) == a and await s.owner(None) == ""
        await s.save(a, response("resp_1"), [user("secret")])
        assert await s.get("resp_1", b) is None and await s.get("resp_1", "") is None
        assert await s.delete("resp_1", b) is False
        for call in (s.items("resp_1", b, 10, "asc", None, None), s.history("resp_1", b)):
            with pytest.raises(NotFound):
                await call
        assert await s.get("resp_1", a) is not None
        # A chain continued under another owner does not reach back into the first one's.
        await s.save(b, response("resp_2", "resp_1"), [user("q")])
        with pytest.raises(BrokenChain):
            await s.history("resp_2", b)
    finally:
        await s.close()
    # The file holds neither key nor its SHA-256 digest, and the owner hash is salted per database.
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in (b"key-a", key_a, key_a.hex().encode()):
        assert secret not in data
    other = store(tmp_path / "other")
    try:
        assert await other.owner(key_a) != a
    finally:
        await other.close()


async def test_concurrent_saves_keep_the_bounds(tmp_path):
    s = store(tmp_path, max_count=20)
    try:
        await asyncio.gather(*(s.save("", response(f"resp_{i}"), [user(f"q{i}")]) for i in range(60)))
        count, _ = await s.stats()
        assert count == 20
        assert await s._run(lambda: s.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]) == 20
    finally:
        await s.close()


def test_bounds_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        store(tmp_path, max_count=0)
