"""Metrics move with real requests, and every dashboard query returns data
from a real Prometheus server scraping a running mlxgate."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from backends.routing import REASONS
from mlxgate.config import Config, MLXConfig, ServerConfig
from mlxgate_cli.stack import start_stack
from backends.mlx.vision.testmodel import write_test_vlm
from tests.images import png
from tests.mlx_fixtures import TEST_MODEL
from tests.polling import eventually
from tests.ports import HeldPort
from tests.request_builders import chat_body

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana/dashboards/mlxgate-overview.json"


def stack_config(models_dir: Path, dead_upstream: HeldPort) -> Config:
    cfg = Config(
        server=ServerConfig(port=0, grpc_port=0, data_dir=str(models_dir.parent / "observability-data")),
        mlx=MLXConfig(models_dir=str(models_dir), hf_cache=str(models_dir / "no-hf"), default_max_tokens=16,
                      bootstrap_test_model=False),
    )
    # A dead upstream Ollama first, then the local model: every request for
    # "fallback-demo" records one fallback.
    cfg.ollama.upstream = dead_upstream.url  # held: nothing listens there while the stack runs
    cfg.ollama.connect_timeout = 0.5
    cfg.aliases["fallback-demo"] = [f"ollama:{TEST_MODEL}", f"mlx:{TEST_MODEL}"]
    cfg.budget.cloud_usd_per_month = 100.0  # the Spend row's budget panel has a series
    return cfg


VLM = "tiny-vlm"


@pytest.fixture(scope="module")
async def stack(test_model_dir, tmp_path_factory):
    """The generated text model, and a generated VLM beside it (the image panels)."""
    models = tmp_path_factory.mktemp("observability-models")
    (models / TEST_MODEL).symlink_to(test_model_dir / TEST_MODEL, target_is_directory=True)
    write_test_vlm(models, VLM)
    with HeldPort() as dead:
        s = await start_stack(stack_config(models, dead), env={})
        yield s
        await s.stop()


def sample(stack, name: str, **labels) -> float:
    return stack.registry.get_sample_value(name, labels) or 0.0


async def chat(session: aiohttp.ClientSession, base: str, model: str, stream: bool = False, **extra) -> int:
    body = chat_body(model, stream=stream, options={"num_predict": 8}, **extra)
    async with session.post(f"{base}/api/chat", json=body) as r:
        await r.read()
        return r.status


async def test_metric_values_move_after_requests(stack) -> None:
    base = stack.http_url
    route = dict(dialect="ollama", route="/api/chat", status="200")
    before_http = sample(stack, "mlxgate_http_requests_total", **route)
    before_tokens = sample(stack, "mlxgate_completion_tokens_total", model=TEST_MODEL, backend="mlx")
    before_fallbacks = sample(stack, "mlxgate_fallbacks_total", from_backend="ollama", to_backend="mlx",
                              reason="UNAVAILABLE")
    before_404 = sample(stack, "mlxgate_http_requests_total", dialect="ollama", route="/api/chat", status="404")
    async with aiohttp.ClientSession() as session:
        assert await chat(session, base, TEST_MODEL) == 200
        assert await chat(session, base, TEST_MODEL, stream=True) == 200
        assert await chat(session, base, "no-such-model") == 404
        assert await chat(session, base, "fallback-demo") == 200
    assert sample(stack, "mlxgate_http_requests_total", **route) == before_http + 3
    assert sample(stack, "mlxgate_http_requests_total", dialect="ollama", route="/api/chat",
                  status="404") == before_404 + 1
    assert sample(stack, "mlxgate_completion_tokens_total", model=TEST_MODEL, backend="mlx") > before_tokens
    assert sample(stack, "mlxgate_fallbacks_total", from_backend="ollama", to_backend="mlx",
                  reason="UNAVAILABLE") == before_fallbacks + 1
    assert sample(stack, "mlxgate_time_to_first_token_seconds_count", model=TEST_MODEL, backend="mlx") >= 3
    assert sample(stack, "mlxgate_http_requests_in_flight", dialect="ollama") == 0
    assert sample(stack, "mlxgate_process_resident_memory_bytes", process="mlxgate") > 10_000_000
    assert sample(stack, "mlxgate_model_memory_bytes", model=TEST_MODEL) > 0
    assert sample(stack, "mlxgate_models_loaded") >= 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as r:
            text = await r.text()
    assert r.status == 200 and r.content_type == "text/plain"
    assert "mlxgate_http_request_duration_seconds_bucket" in text
    # Labels stay bounded: no request ids or prompt text in the exposition.
    assert "no-such-model" not in text and "hi" not in text.split()


async def test_gateway_overhead_header_and_metric(stack) -> None:
    """Each generating request says how much of its time was mlxgate's own:
    more than nothing, less than the whole request (the engine's time is
    not in it), in the header and in the histogram; routes that do not
    generate carry no header."""
    # An earlier test's streamed request is counted when its handler returns.
    await eventually(lambda: sample(stack, "mlxgate_http_requests_in_flight", dialect="ollama") == 0,
                     what="no Ollama request in flight")
    before = sample(stack, "mlxgate_gateway_overhead_seconds_count", dialect="ollama")
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            body = {"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                    "options": {"num_predict": 8}}
            t0 = time.perf_counter()
            async with session.post(f"{stack.http_url}/api/chat", json=body) as r:
                await r.read()
                total_ms = (time.perf_counter() - t0) * 1000
                overhead_ms = float(r.headers["x-mlxgate-overhead-ms"])
            assert 0 < overhead_ms < total_ms
        async with session.get(f"{stack.http_url}/api/tags") as r:
            assert r.status == 200 and "x-mlxgate-overhead-ms" not in r.headers
    # The streamed request is counted once its handler returns, after the last byte.
    await eventually(lambda: sample(stack, "mlxgate_gateway_overhead_seconds_count", dialect="ollama") == before + 2,
                     what="both requests counted")
    assert sample(stack, "mlxgate_gateway_overhead_seconds_count", dialect="anthropic") == 0


async def test_a_fresh_stack_shows_zeros_not_missing_series(test_model_dir, held_port) -> None:
    """Grafana shows "No data" for a series that does not exist yet: the
    fallbacks between configured backends, and a model's cancellations once
    it is loaded, are exposed at 0 before the first event."""
    fresh = await start_stack(stack_config(test_model_dir, held_port), env={})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{fresh.http_url}/metrics") as r:
                before = await r.text()
            load = {"model": TEST_MODEL, "prompt": "", "keep_alive": "5m"}
            async with session.post(f"{fresh.http_url}/api/generate", json=load) as r:
                assert r.status == 200 and (await r.json())["done_reason"] == "load"
            async with session.get(f"{fresh.http_url}/metrics") as r:
                after = await r.text()
    finally:
        await fresh.stop()
    before, after = samples(before), samples(after)
    # Priority order (mlx, then ollama), and the alias's order (ollama, then mlx).
    for src, dst in (("mlx", "ollama"), ("ollama", "mlx")):
        for reason in REASONS:
            key = ("mlxgate_fallbacks_total", frozenset(dict(from_backend=src, to_backend=dst, reason=reason).items()))
            assert before.get(key) == 0.0, key
    assert before.get(("mlxgate_backend_answers_total", frozenset({"backend": "mlx"}.items()))) == 0.0
    cancels = ("mlxgate_cancellations_total", frozenset(dict(model=TEST_MODEL, backend="mlx").items()))
    assert cancels not in before and after.get(cancels) == 0.0
    for reason in ("stop", "length", "cancelled", "error"):
        key = ("mlxgate_generate_requests_total",
               frozenset(dict(model=TEST_MODEL, backend="mlx", finish_reason=reason).items()))
        assert after.get(key) == 0.0, key
    # Bounded: only configured backends; no series for models never loaded or asked for.
    labels = {v for _, ls in after for _, v in ls}
    assert not any(v.startswith("cloud") for v in labels) and "none" not in labels


def samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    """/metrics text as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


async def test_cancel_counts(stack) -> None:
    """A cut stream is counted under the backend that was answering, with its tokens."""
    labels = dict(model=TEST_MODEL, backend="mlx")
    before = sample(stack, "mlxgate_cancellations_total", **labels)
    tokens_before = sample(stack, "mlxgate_completion_tokens_total", **labels)
    async with aiohttp.ClientSession() as session:
        body = {"model": TEST_MODEL, "prompt": "tell a story", "options": {"num_predict": 2000}}
        async with session.post(f"{stack.http_url}/api/generate", json=body) as r:
            await r.content.readline()
    await eventually(lambda: sample(stack, "mlxgate_cancellations_total", **labels) != before,
                     what="the cancellation counted")
    assert sample(stack, "mlxgate_cancellations_total", **labels) == before + 1
    assert sample(stack, "mlxgate_completion_tokens_total", **labels) > tokens_before


async def test_huge_keep_alive_means_forever_and_metrics_still_scrape(stack) -> None:
    async with aiohttp.ClientSession() as session:
        load = {"model": TEST_MODEL, "prompt": "", "keep_alive": "1000000000000s"}
        async with session.post(f"{stack.http_url}/api/generate", json=load) as r:
            assert r.status == 200 and (await r.json())["done_reason"] == "load"
        async with session.get(f"{stack.http_url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert f'mlxgate_model_expiry_timestamp_seconds{{model="{TEST_MODEL}"}} +Inf' in text
        async with session.get(f"{stack.http_url}/api/ps") as r:
            (model,) = [m for m in (await r.json())["models"] if m["name"] == f"{TEST_MODEL}:latest"]
        assert model["expires_at"] > "2200"
        async with session.post(f"{stack.http_url}/api/generate", json={**load, "keep_alive": "5m"}) as r:
            assert r.status == 200


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    return exprs


def test_dashboard_uses_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


PROMETHEUS = shutil.which("prometheus")


async def wait_until_scraping(session: aiohttp.ClientSession, api: str, timeout: float = 60.0) -> None:
    """Prometheus takes a few seconds to start; traffic before its first
    scrape would leave every rate() at zero."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{api}/query", params={"query": 'up{job="mlxgate"}'}) as r:
                body = await r.json()
            if any(s["value"][1] == "1" for s in body["data"]["result"]):
                return
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.25)
    raise AssertionError("Prometheus never scraped mlxgate")


@pytest.mark.outside_pypi
@pytest.mark.skipif(PROMETHEUS is None and not os.environ.get("CI"), reason="prometheus not installed (CI installs it)")
async def test_every_dashboard_query_returns_data(stack, tmp_path, held_port) -> None:
    assert PROMETHEUS, "the prometheus binary is required in CI (.ci/run installs the Debian package)"
    port = held_port.port  # Go's listeners set SO_REUSEADDR: Prometheus binds beside the hold
    host_port = stack.http_url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: mlxgate\n    static_configs:\n      - targets: ['{host_port}']\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_scraping(session, api)
            # Traffic while Prometheus scrapes: successes, a 404, a fallback,
            # a cancelled stream, an embedding, an image chat.
            image = base64.b64encode(png()).decode()

            async def traffic() -> None:
                for _ in range(8):
                    await chat(session, stack.http_url, TEST_MODEL)
                    await chat(session, stack.http_url, VLM,
                               messages=[{"role": "user", "content": "what is this?", "images": [image]}])
                    await chat(session, stack.http_url, TEST_MODEL, stream=True)
                    await chat(session, stack.http_url, "no-such-model")
                    await chat(session, stack.http_url, "fallback-demo")
                    async with session.post(f"{stack.http_url}/api/generate",
                                            json={"model": TEST_MODEL, "prompt": "go",
                                                  "options": {"num_predict": 500}}) as r:
                        await r.content.readline()
                    async with session.post(f"{stack.http_url}/api/embed",
                                            json={"model": TEST_MODEL, "input": "x"}) as r:
                        await r.read()
                    await asyncio.sleep(0.5)

            await traffic()
            await asyncio.sleep(2.5)  # two more scrapes after the last request
            missing = []
            for expr in dashboard_queries():
                q = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
                async with session.get(f"{api}/query", params={"query": q}) as r:
                    body = await r.json()
                assert body["status"] == "success", (expr, body)
                values = [float(s["value"][1]) for s in body["data"]["result"]]
                if not values or all(math.isnan(v) for v in values):
                    missing.append(expr)
            assert not missing, "dashboard queries with no data:\n" + "\n".join(missing)
    finally:
        proc.terminate()
        proc.wait(10)
