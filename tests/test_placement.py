"""Placement (backends/routing/placement.py): among the engines that have a model -- the
local MLX engine and remote mlxgate services -- the router prefers one that
is serving, then one where the model is loaded, then the least loaded, then
the priority order; Ollama and the clouds keep their places.  Scripted
backends stand in for the engines (tests/fakes/scripted_backend.py); the real
thing over real processes is tests/test_remote_services.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from backends.errors import ModelNotFound, Unavailable
from backends.routing import Router
from mlxgate.config import RouterConfig
from tests.fakes.scripted_backend import ScriptedBackend
from tests.fakes.streams import collect
from tests.test_router import FakeClock, Recorder
from tests.request_builders import chat

pytestmark = pytest.mark.timeout(30)


def engine(name: str, models=("m",), **kw) -> ScriptedBackend:
    return ScriptedBackend(name, list(models), is_engine=True, **kw)


def router(*backends, aliases=None, clock=None, **rc) -> tuple[Router, Recorder]:
    rec = Recorder()
    kw = {"clock": clock} if clock is not None else {}
    return Router(list(backends), RouterConfig(**rc), aliases or {}, observer=rec, **kw), rec


def names(targets) -> list[str]:
    return [t.backend.name for t in targets]


async def test_warm_engines_first_then_priority_and_other_kinds_keep_their_place():
    mlx, a, b = engine("mlx"), engine("remote:a"), engine("remote:b")
    oll, cloud = ScriptedBackend("ollama", ["m"]), ScriptedBackend("cloud:x", ["m"])
    r, _ = router(mlx, a, b, oll, cloud)
    assert names(await r.targets("m")) == ["mlx", "remote:a", "remote:b", "ollama", "cloud:x"]
    b.loaded.add("m")
    r.placement._running.clear()  # (as if running_ttl had passed)
    assert names(await r.targets("m")) == ["remote:b", "mlx", "remote:a", "ollama", "cloud:x"]
    a.loaded.add("m:latest")  # "m" and "m:latest" are one model
    r.placement._running.clear()
    assert names(await r.targets("m")) == ["remote:a", "remote:b", "mlx", "ollama", "cloud:x"]
    events = await collect(r.generate(chat()))
    assert events[-1].backend == "remote:a"


async def test_one_engine_alone_is_never_asked_what_it_has_loaded():
    mlx, oll = engine("mlx"), ScriptedBackend("ollama", ["m"])
    r, _ = router(mlx, oll)
    await collect(r.generate(chat()))
    await asyncio.sleep(0.05)
    assert names(await r.targets("m")) == ["mlx", "ollama"] and mlx.running_calls == 0


async def test_sequential_requests_stay_on_the_warm_engine():
    a, b = engine("remote:a"), engine("remote:b")
    b.loaded.add("m")
    r, rec = router(a, b)
    for _ in range(4):
        assert (await collect(r.generate(chat())))[-1].backend == "remote:b"
    assert a.calls == [] and rec.fallbacks == []


async def test_concurrent_requests_spread_over_the_warm_engines():
    hold = asyncio.Event()
    a, b, c = (engine(n, hold=hold) for n in ("remote:a", "remote:b", "remote:c"))
    a.loaded.add("m")
    b.loaded.add("m")  # c is cold: it gets nothing while a warm one is there
    r, _ = router(a, b, c)
    streams = [r.generate(chat()) for _ in range(6)]
    try:
        # Each stream is at its first chunk, held there: all six in flight at once.
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        assert sorted(f.backend for f in firsts) == ["remote:a"] * 3 + ["remote:b"] * 3
        assert r.in_flight == {"remote:a": 3, "remote:b": 3, "remote:c": 0}
    finally:
        hold.set()
        for s in streams:
            await s.aclose()
    assert r.in_flight == {"remote:a": 0, "remote:b": 0, "remote:c": 0}


async def test_requests_arriving_together_see_each_other():
    """No await between ordering and counting: a burst spreads even when
    every request resolves its targets at the same moment."""
    hold = asyncio.Event()
    a, b = engine("remote:a", hold=hold), engine("remote:b", hold=hold)
    a.loaded.add("m")
    b.loaded.add("m")
    r, _ = router(a, b)
    streams = [r.generate(chat()) for _ in range(4)]
    tasks = [asyncio.ensure_future(anext(s)) for s in streams]  # all start before any runs
    try:
        firsts = await asyncio.gather(*tasks)
        assert sorted(f.backend for f in firsts) == ["remote:a", "remote:a", "remote:b", "remote:b"]
    finally:
        hold.set()
        for s in streams:
            await s.aclose()


async def test_a_backend_that_is_not_serving_goes_last_and_gets_nothing():
    a, b = engine("remote:a"), engine("remote:b")
    a.loaded.add("m")
    r, rec = router(a, b)
    await r.targets("m")  # listed while it served
    a.serving = False  # now draining
    assert names(await r.targets("m")) == ["remote:b", "remote:a"]
    events = await collect(r.generate(chat()))
    assert events[-1].backend == "remote:b" and a.calls == [] and rec.fallbacks == []
    # Nothing else has it: the answer says why, and the breaker is untouched.
    b.fail = Unavailable("remote:b: down")
    with pytest.raises(Unavailable, match="remote:b: down"):
        await collect(r.generate(chat()))
    assert a.calls == [] and r.breaker_states()["remote:a"] == "closed"
    a.serving = True
    r2, _ = router(a)
    await r2.targets("m")
    a.serving = False
    with pytest.raises(Unavailable, match="not serving"):
        await collect(r2.generate(chat()))
    calls = a.running_calls
    assert await r2.list_running() == [] and a.running_calls == calls
    # Never listed (not serving from the start): not found, and the answer says why.
    with pytest.raises(ModelNotFound, match=r"not serving, so not listed: remote:a"):
        await collect(router(a)[0].generate(chat()))


async def test_a_not_serving_backend_keeps_its_listing_but_is_not_asked_for_it():
    clock = FakeClock()
    a, b = engine("remote:a", ["only-a", "m"]), engine("remote:b")
    r, _ = router(a, b, clock=clock, model_list_ttl=10)
    assert "only-a" in [m.name for m in await r.list_models()]
    a.serving = False
    clock.advance(11)
    assert "only-a" in [m.name for m in await r.list_models()]  # stale, kept
    assert a.list_calls == 1
    with pytest.raises(Unavailable, match="not serving"):
        await collect(r.generate(chat("only-a")))


async def test_what_is_loaded_is_cached_and_refreshed_after_each_request():
    clock = FakeClock()
    a, b = engine("remote:a"), engine("remote:b")
    r, _ = router(a, b, clock=clock, running_ttl=5)
    await r.targets("m")
    await r.targets("m")
    assert (a.running_calls, b.running_calls) == (1, 1)  # cached
    await collect(r.generate(chat()))  # answered by a: a is asked again soon after
    for _ in range(500):  # (refreshes are at least 0.5 s apart)
        if a.running_calls >= 2:
            break
        await asyncio.sleep(0.02)
    assert a.running_calls >= 2 and b.running_calls == 1
    assert r.placement.is_warm("remote:a", "m") is False
    a.loaded.add("m")  # loaded behind the router's back: seen once the cache expires
    clock.advance(6)
    assert names(await r.targets("m")) == ["remote:a", "remote:b"] and r.placement.is_warm("remote:a", "m")
    # /api/ps (list_running) refreshes it too, for every engine
    b.loaded.add("m")
    await r.list_running()
    assert r.placement.is_warm("remote:b", "m")
    await r.close()


async def test_a_failing_running_list_counts_as_cold_and_spares_the_breaker():
    a, b = engine("remote:a"), engine("remote:b")
    b.loaded.add("m")
    a.list_error = None
    r, _ = router(a, b, breaker_failures=1)

    async def broken():
        raise Unavailable("remote:b: cannot list")
    b.list_running = broken  # type: ignore[method-assign]
    assert names(await r.targets("m")) == ["remote:a", "remote:b"]
    assert r.breaker_states()["remote:b"] == "closed"


async def test_aliases_keep_their_order():
    a, b = engine("remote:a"), engine("remote:b", ["m", "tiny:latest"])
    b.loaded.add("m")
    r, _ = router(a, b, aliases={"pinned": ["remote:a:m", "remote:b:m"]})
    assert names(await r.targets("pinned")) == ["remote:a", "remote:b"]


async def test_remote_alias_names_may_hold_colons(caplog):
    hp = engine("remote:10.0.0.2:50051", ["tiny:latest"])
    short = engine("remote:10.0.0.2", ["x"])
    r, _ = router(short, hp, aliases={
        "t": ["remote:10.0.0.2:50051:tiny:latest"], "u": ["remote:10.0.0.2:x"], "bad": ["remote:nowhere:m"]})
    (t,) = await r.targets("t")
    assert (t.backend.name, t.model) == ("remote:10.0.0.2:50051", "tiny:latest")
    (u,) = await r.targets("u")
    assert (u.backend.name, u.model) == ("remote:10.0.0.2", "x")
    with caplog.at_level(logging.WARNING):
        assert await r.targets("bad") == []
    assert "no configured remote service matches" in caplog.text


async def test_unary_calls_are_placed_and_counted_too():
    a, b = engine("remote:a"), engine("remote:b")
    b.loaded.add("m")
    r, _ = router(a, b)
    from backends.types import EmbedRequest

    res = await r.embed(EmbedRequest(model="m", inputs=["x"]))
    assert res.backend == "remote:b" and r.in_flight == {"remote:a": 0, "remote:b": 0}
    assert (await r.load_model("m", None)).backend == "remote:b"


def test_fallback_orders_cover_engines_both_ways():
    r, _ = router(engine("mlx"), engine("remote:a"), ScriptedBackend("ollama", []),
                  aliases={"x": ["ollama:x", "mlx:x"]})
    assert r.fallback_orders() == [["ollama", "mlx"], ["remote:a", "mlx"]]


async def test_close_cancels_background_refreshes():
    a, b = engine("remote:a"), engine("remote:b")
    r, _ = router(a, b)
    await collect(r.generate(chat()))
    await r.close()
    assert r.placement._refreshers == {}


@pytest.mark.parametrize("spill_at", [2, 0])
async def test_past_the_spill_point_a_cold_engine_takes_the_next_request(spill_at):
    hold = asyncio.Event()
    a, b = engine("remote:a", hold=hold), engine("remote:b", hold=hold)
    a.loaded.add("m")
    r, _ = router(a, b, spill_at=spill_at)
    streams = [r.generate(chat()) for _ in range(4)]
    try:
        got = [(await anext(s)).backend for s in streams]  # one after the other, each still in flight
        if spill_at:
            # two on the warm one, then it is "full": the cold one loads and shares the rest
            assert got == ["remote:a", "remote:a", "remote:b", "remote:b"]
        else:
            assert got == ["remote:a"] * 4
    finally:
        hold.set()
        for s in streams:
            await s.aclose()


async def test_in_flight_and_serving_are_metrics():
    from prometheus_client import CollectorRegistry

    from backends.metrics import BackendCollector

    hold = asyncio.Event()
    a, b = engine("remote:a", hold=hold), engine("remote:b", hold=hold)
    b.serving = False  # draining
    r, _ = router(a, b, ScriptedBackend("ollama", ["m"]))
    registry = CollectorRegistry()
    registry.register(BackendCollector(lambda: r.in_flight, r.health))
    stream = r.generate(chat())
    try:
        await anext(stream)
        assert registry.get_sample_value("mlxgate_backend_in_flight", {"backend": "remote:a"}) == 1
        assert registry.get_sample_value("mlxgate_backend_in_flight", {"backend": "ollama"}) == 0
        assert registry.get_sample_value("mlxgate_backend_serving", {"backend": "remote:a"}) == 1
        assert registry.get_sample_value("mlxgate_backend_serving", {"backend": "remote:b"}) == 0
    finally:
        hold.set()
        await stream.aclose()
    assert registry.get_sample_value("mlxgate_backend_in_flight", {"backend": "remote:a"}) == 0
