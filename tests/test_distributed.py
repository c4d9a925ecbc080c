"""One model over two processes on MLX's distributed engine (ring backend over
loopback, CPU): ``mlx.launch -n 2 --backend ring -- -m mlxgate_cli service
--distributed`` on the generated test model, as a user runs it.

Rank 0 is the gRPC service; rank 1 holds the other half of every layer and
follows rank 0's broadcasts (``backends/mlx/distributed/``).  What each rank
does is read from rank 0's /metrics: ``mlxgate_distributed_rank_*{rank=...}``
(rank 1's figures come from its heartbeats, every 0.5 s).

The follower-death test starts the two ranks itself, with the environment
mlx.launch gives them (MLX_RANK, MLX_HOSTFILE): under mlx.launch the launcher
also terminates rank 0 when a rank exits with an error, which would hide
whether rank 0's own watchdog noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.scrape import scrape
from tests.mlx_fixtures import TEST_MODEL
from tests.polling import eventually, eventually_here
from tests.ports import HeldPort, consecutive_held_ports, held_ports
from tests.test_cli_serve import clean_env

pytestmark = pytest.mark.timeout(120)

LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
SERVICE = "mlxgate.v1.InferenceService"
PROMPTS = ["The sea was calm that morning", "Tell me about rings", "Once upon a time", "Numbers: 1 2 3"]


@dataclass
class Cluster:
    procs: list[asyncio.subprocess.Process]
    target: str
    metrics_url: str
    log: Path
    #: The ring's ports, held until the ranks are gone (``tests/ports.py``).
    ports: list[HeldPort] = field(default_factory=list)

    async def metrics(self) -> dict[str, float]:
        return await scrape(self.metrics_url)

    async def rank(self, name: str, rank: int) -> float:
        return (await self.metrics()).get(f'mlxgate_distributed_rank_{name}{{rank="{rank}"}}', float("nan"))

    async def health(self) -> int:
        async with grpc.aio.insecure_channel(self.target) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            return r.status

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except asyncio.TimeoutError:
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        for port in self.ports:
            port.close()


async def _started(procs: list, log: Path, ports: list[HeldPort]) -> Cluster:
    out = procs[0].stdout
    assert out is not None
    line = (await asyncio.wait_for(out.readline(), 90)).decode()
    m = re.match(r"mlxgate: gRPC (\S+)\s+metrics (http://\S+)", line)
    if not m:
        for p in procs:
            if p.returncode is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"unexpected first line {line!r}; log: {log.read_text()[-3000:]}")
    return Cluster(procs, m.group(1), m.group(2) + "/metrics", log, ports)


def _service_args(models: Path, *extra: str) -> list[str]:
    return ["-m", "mlxgate_cli", "service", "--distributed", "--grpc-port", "0", "--metrics-port", "0",
            "--models-dir", str(models), *extra]


async def launch(tmp: Path, models: Path, *extra: str) -> Cluster:
    """``mlx.launch -n 2 --backend ring`` of ``mlxgate service --distributed``."""
    log = tmp / "cluster.log"
    ports = consecutive_held_ports(2)  # the launcher gives rank i the port base + i
    procs: list = []
    with open(log, "wb") as f, _killed_on_error(procs, ports):
        procs.append(await asyncio.create_subprocess_exec(
            LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(ports[0].port),
            "--python", sys.executable, "--", *_service_args(models, *extra),
            stdout=asyncio.subprocess.PIPE, stderr=f, env=clean_env(tmp, MLXGATE_METRICS_PUBLIC="1"),
            start_new_session=True,
        ))
        return await _started(procs, log, ports)


async def launch_by_hand(tmp: Path, models: Path, **extra_env: str) -> Cluster:
    """The two ranks with the environment mlx.launch gives them, without the launcher."""
    ports = held_ports(2)
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[p.address] for p in ports]))
    log = tmp / "cluster.log"
    procs: list = []
    with open(log, "wb") as f, _killed_on_error(procs, ports):
        for rank in (0, 1):
            env = clean_env(tmp, MLXGATE_METRICS_PUBLIC="1", MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile),
                            **extra_env)
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, *_service_args(models),
                stdout=asyncio.subprocess.PIPE if rank == 0 else asyncio.subprocess.DEVNULL, stderr=f, env=env,
                start_new_session=True,
            ))
        return await _started(procs, log, ports)


@contextlib.contextmanager
def _killed_on_error(procs: list, ports: list[HeldPort]):
    """Ranks already started do not outlive a failed start (rank 0 would wait for the ring forever)."""
    try:
        yield
    except BaseException:
        for p in procs:
            if p.returncode is None:
                os.killpg(p.pid, signal.SIGKILL)
        for port in ports:
            port.close()
        raise


def _request(prompt: str, max_tokens: int, temperature: float = 0.0, seed: Optional[int] = None) -> pb.GenerateRequest:
    s = pb.SamplingParams(temperature=temperature, max_tokens=max_tokens)
    if seed is not None:
        s.seed = seed
    return pb.GenerateRequest(model=TEST_MODEL, prompt=pb.PromptInput(prompt=prompt, raw=True), sampling=s)


async def generate(target: str, req: pb.GenerateRequest, text: Optional[list] = None) -> tuple[list[int], Any]:
    ids: list[int] = []
    async with grpc.aio.insecure_channel(target) as ch:
        async for ev in pb_grpc.InferenceServiceStub(ch).Generate(req, timeout=60):
            if ev.HasField("chunk"):
                ids += list(ev.chunk.token_ids)
                if text is not None:
                    text.append(ev.chunk.text)
            else:
                return ids, ev.done
    raise AssertionError("stream ended without Done")


def single_model(path: Path) -> Any:
    from mlx_lm.utils import load

    return load(str(path))[0]


async def single_process(mlx_backend, req: pb.GenerateRequest) -> list[int]:
    """The same request on the ordinary one-process engine."""
    from backends.types import Chunk, GenerateRequest

    ids: list[int] = []
    async for ev in mlx_backend.generate(GenerateRequest.from_pb(req)):
        if isinstance(ev, Chunk):
            ids += ev.token_ids
    return ids


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory, test_model_dir) -> AsyncIterator[Cluster]:
    c = await launch(tmp_path_factory.mktemp("dist"), test_model_dir)
    try:
        yield c
    finally:
        await c.stop()


#: ~340 tokens: prefilled in paced chunks beside running streams; its insert
#: message takes the broadcast's second collective.
LONG_PROMPT = " ".join(f"line {i} of a long prompt about the sea." for i in range(20))


async def test_greedy_output_is_the_single_process_output(cluster, mlx_backend):
    for prompt in PROMPTS[:2]:
        req = _request(prompt, 24)
        ids, _ = await generate(cluster.target, req)
        assert len(ids) == 24
        assert ids == await single_process(mlx_backend, req)


async def test_a_long_prompt_joins_running_streams_in_paced_chunks(cluster, mlx_backend):
    """While two streams decode, a long prompt is prefilled in chunks whose
    size rank 0's pacer picks from its timings each step: the size travels
    with the step, so rank 1 runs the very same steps (its decode-step count
    equals rank 0's) and every answer is the single process's."""
    reqs = [_request(PROMPTS[0], 80), _request(PROMPTS[3], 80)]
    texts: list[list[str]] = [[], []]
    running = [asyncio.ensure_future(generate(cluster.target, r, t)) for r, t in zip(reqs, texts)]
    await eventually(lambda: _true(all(texts)), 60, "both streams started")
    long_req = _request(LONG_PROMPT, 8)
    long_ids, _ = await generate(cluster.target, long_req)
    results = await asyncio.gather(*running)
    assert long_ids == await single_process(mlx_backend, long_req)
    for (ids, _), r in zip(results, reqs):
        assert ids == await single_process(mlx_backend, r)
    steps0 = await cluster.rank("decode_steps", 0)
    await eventually(lambda: _equals(cluster, "decode_steps", 1, steps0), 60, "rank 1 ran rank 0's steps")


async def test_seeded_sampling_is_repeatable(cluster):
    """Every rank builds the sampler from rank 0's seed: the ranks agree (a
    follower whose tokens differ exits, and the next request would fail),
    and the same seed gives the same answer."""
    req = _request(PROMPTS[2], 20, temperature=0.9, seed=1234)
    first, _ = await generate(cluster.target, req)
    again, _ = await generate(cluster.target, req)
    assert first == again and len(first) == 20
    other, _ = await generate(cluster.target, _request(PROMPTS[2], 20, temperature=0.9, seed=99))
    assert other != first
    assert await cluster.rank("up", 1) == 1


async def test_a_json_schema_constrains_every_rank(cluster, mlx_backend):
    """The grammar travels with the sequence: every rank masks its logits
    alike, so the answer is the single process's (and valid JSON)."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    req = _request(PROMPTS[1], 60)
    req.format.CopyFrom(pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)))
    text = []
    ids, _ = await generate(cluster.target, req, text)
    assert ids == await single_process(mlx_backend, req)
    assert set(json.loads("".join(text))) == {"name", "age"}, text
    assert await cluster.rank("up", 1) == 1


async def test_four_streams_share_one_batch_and_a_cancel_leaves_it_on_every_rank(cluster):
    async with grpc.aio.insecure_channel(cluster.target) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        calls = [stub.Generate(_request(p, 1500), timeout=60) for p in PROMPTS]
        firsts = [asyncio.ensure_future(c.read()) for c in calls]
        await asyncio.gather(*firsts)
        # All four decode together, on both ranks.
        await eventually(lambda: _equals(cluster, "sequences", 1, 4), 60, "rank 1 holds 4 sequences")
        # A decode step of 4 sequences, on each rank.
        await eventually(lambda: _at_least(cluster, "max_batch", 0, 4), 60, "rank 0 decodes 4 at once")
        await eventually(lambda: _at_least(cluster, "max_batch", 1, 4), 60, "rank 1 decodes 4 at once")
        calls[0].cancel()
        await eventually(lambda: _equals(cluster, "sequences", 1, 3), 60, "rank 1 dropped the cancelled sequence")
        assert await cluster.rank("sequences", 0) == 3
        for c in calls[1:]:
            c.cancel()
        await eventually(lambda: _equals(cluster, "sequences", 1, 0), 60, "rank 1's batch emptied")
        assert await cluster.rank("sequences", 0) == 0


async def _equals(cluster: Cluster, name: str, rank: int, value: float) -> bool:
    return await cluster.rank(name, rank) == value


async def _at_least(cluster: Cluster, name: str, rank: int, value: float) -> bool:
    return await cluster.rank(name, rank) >= value


async def test_each_rank_holds_half_of_every_layer(cluster, test_model_dir):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    await generate(cluster.target, _request("load it", 1))
    model, _ = load(str(test_model_dir / TEST_MODEL))
    params = dict(tree_flatten(model.parameters()))
    full = sum(v.nbytes for v in params.values())
    layers = sum(v.nbytes for k, v in params.items() if ".layers." in k and "norm" not in k)
    rest = full - layers
    await eventually(lambda: _at_least(cluster, "parameter_bytes", 1, 1), 60, "rank 1 reports its shard")
    shard = [await cluster.rank("parameter_bytes", r) for r in (0, 1)]
    # Tensor parallelism splits every projection of every layer in two; the
    # embeddings, the head and the norms stay whole on each rank.
    assert shard[0] == shard[1] == rest + layers // 2, (shard, full, layers)
    print(f"parameter bytes per rank {shard[0]:.0f} of {full} ({shard[0] / full:.0%}; layers {layers}, "
          f"replicated {rest})")


async def test_embeddings_run_on_every_rank(cluster, mlx_backend):
    from backends.types import EmbedRequest

    req = pb.EmbedRequest(model=TEST_MODEL, input=["hello there"])
    async with grpc.aio.insecure_channel(cluster.target) as ch:
        got = await pb_grpc.InferenceServiceStub(ch).Embed(req, timeout=60)
    mine = await mlx_backend.embed(EmbedRequest.from_pb(req))
    a, b = list(got.embeddings[0].values), mine.embeddings[0]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # ... and the ranks are still in step afterwards.
    assert len((await generate(cluster.target, _request(PROMPTS[3], 8)))[0]) == 8


async def test_a_dead_follower_turns_health_not_serving(tmp_path, test_model_dir):
    """SIGKILL of rank 1 mid-stream: the stream ends UNAVAILABLE, health turns
    NOT_SERVING, new requests are refused naming why, and a front that has
    the cluster as a remote and an Ollama behind it falls back to the Ollama."""
    from mlxgate.config import Config, RemoteService, ServerConfig
    from mlxgate_cli.stack import start_stack
    from tests.fakes.ollama_fake import FakeOllama

    c = await launch_by_hand(tmp_path, test_model_dir)
    ollama = FakeOllama(models=[f"{TEST_MODEL}:latest"])
    await ollama.start()
    cfg = Config(server=ServerConfig(port=0, grpc_port=0, request_timeout=60))
    cfg.mlx.enabled = False
    cfg.remotes = [RemoteService(name="dist", target=c.target)]
    cfg.ollama.upstream = ollama.url
    front = await start_stack(cfg, env={}, front=False)
    try:
        assert await c.health() == health_pb2.HealthCheckResponse.SERVING
        _, done = await generate(front.grpc_target, _request(PROMPTS[2], 4))
        assert done.backend == "remote:dist"
        async with grpc.aio.insecure_channel(c.target) as ch:
            call = pb_grpc.InferenceServiceStub(ch).Generate(_request(PROMPTS[0], 1500), timeout=60)
            await call.read()  # streaming
            c.procs[1].send_signal(signal.SIGKILL)
            t = await eventually(lambda: _not_serving(c), 60, "health NOT_SERVING")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        print(f"NOT_SERVING {t:.2f} s after the follower was killed")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await generate(c.target, _request(PROMPTS[1], 4))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "out of service" in e.value.details()
        assert await c.rank("up", 1) == 0
        assert (await c.metrics())['mlxgate_backend_serving{backend="mlx"}'] == 0
        text = c.log.read_text()
        assert re.search(r"ERROR backends.mlx.distributed: distributed MLX engine out of service: rank 1 ", text), \
            text[-3000:]
        # The front's health watch sees NOT_SERVING: the Ollama answers.
        remote = front.router.catalogue.by_name["remote:dist"]
        await eventually(lambda: _false(remote.serving), 60, "the front sees the remote not serving")
        _, done = await generate(front.grpc_target, _request(PROMPTS[2], 4))
        assert done.backend == "ollama"
    finally:
        await front.stop()
        await ollama.stop()
        await c.stop()


async def _false(value: bool) -> bool:
    return not value


async def _true(value: bool) -> bool:
    return value


async def _not_serving(c: Cluster) -> bool:
    return await c.health() == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_silent_follower_is_declared_dead_after_the_timeout(tmp_path, test_model_dir):
    """A rank that stops answering without closing its connections (a machine
    that vanished; here SIGSTOP) leaves rank 0 waiting in a collective: the
    watchdog ends the requests in flight and turns health NOT_SERVING after
    MLXGATE_DISTRIBUTED_TIMEOUT seconds without a heartbeat.

    The timeout is short (the default is 5 s) but guards only silence: the
    heartbeats run on their own threads on both sides, through a load as
    through a decode step, and a side that was itself not scheduled for a
    while reads its peer's waiting beats before it judges.  Nothing here
    times the machine: the watchdog's own message says how long the rank
    was silent, which must be the timeout or more."""
    timeout = 3.0
    c = await launch_by_hand(tmp_path, test_model_dir, MLXGATE_DISTRIBUTED_TIMEOUT=str(timeout))
    try:
        async with grpc.aio.insecure_channel(c.target) as ch:
            call = pb_grpc.InferenceServiceStub(ch).Generate(_request(PROMPTS[1], 1500), timeout=120)
            await call.read()
            assert await c.health() == health_pb2.HealthCheckResponse.SERVING
            c.procs[1].send_signal(signal.SIGSTOP)
            t = await eventually(lambda: _not_serving(c), 60, "health NOT_SERVING")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            silent = re.search(r"rank 1 sent no heartbeat for ([0-9.]+) s", e.value.details())
            assert silent, e.value.details()
        assert float(silent.group(1)) >= timeout
        print(f"NOT_SERVING {t:.2f} s after the follower stopped answering")
    finally:
        if c.procs[1].returncode is None:
            c.procs[1].send_signal(signal.SIGKILL)
        await c.stop()


async def test_pipeline_parallelism(tmp_path, test_model_dir):
    """--pipeline: each rank holds half of the layers of a model type mlx-lm
    can pipeline (qwen2); a llama is refused with a clear UNAVAILABLE before
    any rank loads it, and the engine stays in service."""
    from backends.mlx.backend import MLXBackend
    from backends.mlx.testmodel import write_test_model
    from mlxgate.config import MLXConfig

    models = tmp_path / "models"
    write_test_model(models, "tiny-qwen", arch="qwen2")
    (models / TEST_MODEL).symlink_to(test_model_dir / TEST_MODEL)
    c = await launch(tmp_path, models, "--pipeline")
    single = MLXBackend(MLXConfig(models_dir=str(models), hf_cache=str(tmp_path / "no-hf"), bootstrap_test_model=False))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await generate(c.target, _request("hi", 4))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "does not support pipeline parallelism" in e.value.details()
        req = _request(PROMPTS[0], 24)
        req.model = "tiny-qwen"
        ids, _ = await generate(c.target, req)
        assert len(ids) == 24
        assert ids == await single_process(single, req)
        assert await c.health() == health_pb2.HealthCheckResponse.SERVING
        # Each rank holds one of the two layers (whole), and the embeddings and head.
        from mlx.utils import tree_flatten

        params = dict(tree_flatten(single_model(models / "tiny-qwen").parameters()))
        layers = sum(v.nbytes for k, v in params.items() if ".layers." in k)
        expected = sum(v.nbytes for v in params.values()) - layers // 2
        await eventually(lambda: _equals(c, "parameter_bytes", 1, expected), 60, "rank 1 reports its shard")
        assert await c.rank("parameter_bytes", 0) == expected
    finally:
        await single.close()
        await c.stop()



def test_watchdog_ignores_strangers_and_sees_a_rank_leave(monkeypatch):
    """The heartbeat port is plain TCP: a connection without the ranks'
    secret (sent over the ring) neither counts as a rank nor, by closing,
    takes the engine out of service; a rank's closing does, at once."""
    from backends.mlx.distributed import Watchdog

    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    monkeypatch.delenv("MLX_JACCL_COORDINATOR", raising=False)
    dead: list[str] = []
    w = Watchdog(2, dead.append, timeout=5.0)
    host, port = w.start()
    try:
        with socket.create_connection((host, port)) as s:
            s.sendall(json.dumps({"rank": 1, "secret": "guess"}).encode() + b"\n")
            s.settimeout(30)
            assert s.recv(16) == b""  # the watchdog read the line and closed the connection
        assert dead == [] and w.status()[1]["up"] is False
        with socket.create_connection((host, port)) as s:
            s.sendall(json.dumps({"rank": 1, "secret": w.secret, "sequences": 2}).encode() + b"\n")
            assert s.makefile("rb").readline() == b"ok\n"
            assert w.status()[1]["up"] is True and w.status()[1]["sequences"] == 2
        eventually_here(lambda: dead, 10, "the watchdog declared rank 1 dead")
        assert "rank 1 closed its heartbeat connection" in dead[0]
    finally:
        w.stop()


def test_distributed_settings_and_a_lone_process(tmp_path):
    """MLXGATE_DISTRIBUTED / MLXGATE_PIPELINE / MLXGATE_DISTRIBUTED_TIMEOUT and
    the flags set MLXConfig; --distributed outside mlx.launch (a group of one)
    says how to launch it and exits 2."""
    import subprocess

    from mlxgate.config_load import load_config
    from mlxgate_cli.main import build_parser, config_from_args

    cfg = load_config(env={"MLXGATE_DISTRIBUTED": "1", "MLXGATE_PIPELINE": "true",
                           "MLXGATE_DISTRIBUTED_TIMEOUT": "2.5"})
    assert (cfg.mlx.distributed, cfg.mlx.pipeline, cfg.mlx.distributed_timeout) == (True, True, 2.5)
    assert (load_config(env={}).mlx.distributed, load_config(env={}).mlx.pipeline) == (False, False)
    args = build_parser().parse_args(["service", "--distributed", "--pipeline"])
    cfg = config_from_args(args)
    assert cfg.mlx.distributed and cfg.mlx.pipeline
    r = subprocess.run([sys.executable, "-m", "mlxgate_cli", "service", "--distributed", "--grpc-port", "0",
                        "--metrics-port", "0"], env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--distributed needs the processes started by mlx.launch" in r.stderr
