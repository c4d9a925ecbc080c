"""Pulling through a real ``mlxgate serve`` pointed at the fake hub (HF_ENDPOINT):
the official ``ollama`` client's ``pull``, streamed and not, then the pulled
model listed and answering a chat; a client that goes away mid-pull and the
next pull resuming; gRPC's PullModel; the pull metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import grpc
import pytest
from ollama import AsyncClient, ResponseError

from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.fakes.hf_hub_fake import FakeHub
from tests.images import png
from tests.test_cli_serve import clean_env, start, stop
from tests.polling import eventually

pytestmark = pytest.mark.timeout(240)

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated vision-language model (Idefics3: processor files beside the weights)."""
    from backends.mlx.vision.testmodel import write_test_vlm

    return write_test_vlm(tmp_path_factory.mktemp("hub-vlm"), "tiny-vlm")


@pytest.fixture
async def hub(test_model_dir: Path, vlm_dir: Path) -> AsyncIterator[FakeHub]:
    fake = await FakeHub().start()
    fake.add_folder("org/tiny", test_model_dir / "tiny-llama")
    fake.add_folder("org/tiny-vlm", vlm_dir)
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def server(hub: FakeHub, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    config = tmp_path / "mlxgate.toml"
    config.write_text('[catalog]\n"tiny" = "org/tiny"\n')
    env = clean_env(tmp_path, HF_ENDPOINT=hub.base, MLXGATE_CONFIG=str(config))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(var, None)
    (tmp_path / "models").mkdir()
    proc, http, target = await asyncio.to_thread(
        start, ["--port", "0", "--grpc-port", "0", "--models-dir", str(tmp_path / "models")], env)
    try:
        yield http, target
        err = await asyncio.to_thread(stop, proc)
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_ollama_client_pulls_a_model_that_then_answers(server: tuple[str, str], hub: FakeHub,
                                                                 test_model_dir: Path) -> None:
    http, _ = server
    client = AsyncClient(host=http)
    lines = [p async for p in await client.pull("hf.co/org/tiny", stream=True)]
    sha = hub.repos["org/tiny"].files[WEIGHTS].sha256
    size = (test_model_dir / "tiny-llama" / WEIGHTS).stat().st_size
    assert lines[0].status == "pulling manifest"
    assert [p.status for p in lines if not p.digest][1:] == ["verifying sha256 digest", "writing manifest", "success"]
    progress = [p for p in lines if p.digest]
    assert progress and all(p.digest == f"sha256:{sha}" and p.status == f"pulling {sha[:12]}" for p in progress)
    assert progress[-1].total == progress[-1].completed == size

    names = [m.model for m in (await client.list()).models]
    assert "hf.co/org/tiny:latest" in names
    answer = await client.chat(model="hf.co/org/tiny", messages=[{"role": "user", "content": "hi"}],
                               options={"num_predict": 3})
    assert answer.done and answer.eval_count == 3

    # stream=false: one object; a catalog name from the config; already present, so nothing is fetched.
    fetched = len([r for r in hub.requests if r.path.startswith("/cdn/")])
    assert (await client.pull("tiny", stream=False)).status == "success"
    assert len([r for r in hub.requests if r.path.startswith("/cdn/")]) == fetched
    assert "tiny:latest" in [m.model for m in (await client.list()).models]

    # Errors before any output are HTTP statuses, streamed or not.
    for stream in (False, True):
        with pytest.raises(ResponseError) as e:
            res = await client.pull("org/missing", stream=stream)
            if stream:
                [p async for p in res]
        assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ResponseError) as e:
        await client.pull("../../etc/passwd")
    assert e.value.status_code == 400

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{http}/metrics") as r:
            metrics = await r.text()
    assert 'mlxgate_model_pulls_total{outcome="success"} 2.0' in metrics
    assert 'mlxgate_model_pulls_total{outcome="error"} 3.0' in metrics
    received = [line for line in metrics.splitlines() if line.startswith("mlxgate_model_pull_received_bytes_total")]
    assert received and float(received[0].split()[-1]) >= size


async def test_a_pulled_vision_model_brings_its_processor_and_takes_images(server: tuple[str, str],
                                                                          vlm_dir: Path, tmp_path: Path) -> None:
    """A VLM is pulled like any model: its processor and template files come with
    the weights, so it answers an image (Ollama's ``images``) and shows ``vision``."""
    http, _ = server
    client = AsyncClient(host=http)
    assert (await client.pull("hf.co/org/tiny-vlm", stream=False)).status == "success"
    shown = await client.show("hf.co/org/tiny-vlm")
    assert "vision" in (shown.capabilities or [])
    text = await client.chat(model="hf.co/org/tiny-vlm", messages=[{"role": "user", "content": "what is it?"}],
                             options={"num_predict": 2})
    seen = await client.chat(model="hf.co/org/tiny-vlm",
                             messages=[{"role": "user", "content": "what is it?", "images": [png(40, 28)]}],
                             options={"num_predict": 2})
    assert seen.done and seen.eval_count == 2
    # The image's tokens count in the prompt: the processor expanded it.
    assert seen.prompt_eval_count > text.prompt_eval_count + 4
    wanted = {p.name for p in vlm_dir.iterdir() if "processor" in p.name or "chat_template" in p.name}
    pulled = {p.name for p in (tmp_path / "models").rglob("*") if p.is_file()}
    assert wanted and wanted <= pulled


async def test_a_client_leaving_mid_pull_leaves_a_download_the_next_pull_resumes(server: tuple[str, str],
                                                                                 hub: FakeHub) -> None:
    http, target = server
    hub.slow[WEIGHTS] = 0.05
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{http}/api/pull", json={"model": "org/tiny"}) as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            async for raw in r.content:
                line = json.loads(raw)
                if line.get("digest") and 0 < line["completed"] < line["total"]:
                    break
    # The download stops once its last client left: the fake's stream ends.
    await eventually(lambda: not hub.streaming, what="the fake's stream ending")
    assert len([r for r in hub.requests if r.path.startswith("/cdn/")]) == 1
    hub.slow.clear()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        lines = [m async for m in stub.PullModel(pb.PullModelRequest(model="org/tiny"))]
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        resumed = [r for r in hub.requests if r.path.startswith("/cdn/")][1:]
        assert len(resumed) == 1 and resumed[0].range.startswith("bytes=") and resumed[0].range != "bytes=0-"
        first = [m for m in lines if m.digest][0]
        assert f"bytes={first.completed}-" == resumed[0].range
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [m async for m in stub.PullModel(pb.PullModelRequest(model="org/missing"))]
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
