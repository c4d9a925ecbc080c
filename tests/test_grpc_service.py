"""The gRPC contract end to end: a real grpc.aio server on port 0 in front of
the real MLX engine on the generated model, called through the generated stub."""

from __future__ import annotations


import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from backends.service import SERVICE_NAME, start_inference_service
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc
from tests.mlx_fixtures import TEST_MODEL
from tests.reflection_client import v1_reflection_call
from tests.request_builders import pb_chat
from tests.polling import eventually


@pytest.fixture(scope="module")
async def service(mlx_backend):
    svc = await start_inference_service(mlx_backend, port=0)
    yield svc
    await svc.stop(0)


@pytest.fixture
async def channel(service):
    async with grpc.aio.insecure_channel(service.target) as ch:
        yield ch


async def test_health_reports_serving(channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for resp in stub.ServerReflectionInfo(requests()):
        names = [s.name for s in resp.list_services_response.service]
    assert "mlxgate.v1.InferenceService" in names
    assert "grpc.health.v1.Health" in names
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(names)


async def test_reflection_v1_lists_and_resolves_the_service(channel) -> None:
    from google.protobuf import descriptor_pb2

    request, call = v1_reflection_call(channel)

    async def requests():
        yield request(list_services="")
        yield request(file_containing_symbol=SERVICE_NAME)
        yield request(file_containing_symbol="grpc.reflection.v1.ServerReflection")

    answers = [r async for r in call(requests())]
    assert [a.WhichOneof("message_response") for a in answers] == ["list_services_response",
                                                                   "file_descriptor_response",
                                                                   "file_descriptor_response"]
    assert SERVICE_NAME in [s.name for s in answers[0].list_services_response.service]
    files = {}
    for raw in answers[1].file_descriptor_response.file_descriptor_proto:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[fdp.name] = fdp
    assert "mlxgate/v1/inference.proto" in files
    service = next(s for s in files["mlxgate/v1/inference.proto"].service if s.name == "InferenceService")
    assert {"Generate", "ListModels", "ShowModel"} <= {m.name for m in service.method}
    (v1,) = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in answers[2].file_descriptor_response.file_descriptor_proto]
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_generate_streams_chunks_then_done(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    events = [e async for e in stub.Generate(pb_chat(TEST_MODEL, "Hello there", max_tokens=6, temperature=0.0))]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert all(k == "chunk" for k in kinds[:-1]) and len(kinds) > 1
    done = events[-1].done
    assert done.backend == "mlx" and done.model == TEST_MODEL
    assert done.completion_tokens == sum(len(e.chunk.token_ids) for e in events[:-1])
    assert done.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert done.prompt_tokens > 0 and done.total_duration_ns > 0


async def test_max_tokens_gives_length_with_exact_count(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    req = pb.GenerateRequest(model=TEST_MODEL, prompt=pb.PromptInput(prompt="count", raw=True),
                             sampling=pb.SamplingParams(max_tokens=5, temperature=0.0))
    events = [e async for e in stub.Generate(req)]
    done = events[-1].done
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert done.completion_tokens == 5


async def test_unary_calls(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    models = await stub.ListModels(pb.ListModelsRequest())
    assert TEST_MODEL in [m.name for m in models.models]
    show = await stub.ShowModel(pb.ShowModelRequest(model=TEST_MODEL))
    assert show.context_length > 0 and pb.CAPABILITY_COMPLETION in show.capabilities
    emb = await stub.Embed(pb.EmbedRequest(model=TEST_MODEL, input=["a", "b c"]))
    assert len(emb.embeddings) == 2
    norm = sum(v * v for v in emb.embeddings[0].values) ** 0.5
    assert abs(norm - 1.0) < 1e-3


async def test_unknown_model_is_not_found_and_names_models(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    req = pb_chat(TEST_MODEL, "hi")
    req.model = "no-such-model"
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stub.Generate(req):
            pass
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert TEST_MODEL in ei.value.details()


@pytest.mark.parametrize(
    "req, field",
    [
        (pb_chat(TEST_MODEL, "hi", temperature=-1.0), "temperature"),
        (pb_chat(TEST_MODEL, "hi", top_p=2.0), "top_p"),
        (pb.GenerateRequest(model=TEST_MODEL), "prompt or chat"),
        (pb.GenerateRequest(chat=pb.ChatInput()), "model"),
        (pb.GenerateRequest(model=TEST_MODEL, chat=pb_chat(TEST_MODEL).chat,
                            tools=[pb.Tool(name="f", parameters_json="{bad")]),
         "tools[0].parameters_json"),
    ],
)
async def test_invalid_arguments_name_the_parameter(channel, req, field) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stub.Generate(req):
            pass
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in ei.value.details()


async def test_cancelling_the_call_empties_the_engine(channel, mlx_backend) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    call = stub.Generate(pb_chat(TEST_MODEL, "Tell me a long story", max_tokens=2000, temperature=0.7))
    first = await call.read()
    assert first.WhichOneof("event") == "chunk"
    assert mlx_backend.active_count >= 1
    call.cancel()
    await eventually(lambda: mlx_backend.active_count == 0, what="the engine dropping the cancelled sequence")


async def test_load_and_unload_with_keep_alive_zero(channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    await stub.LoadModel(pb.LoadModelRequest(model=TEST_MODEL, keep_alive=duration_pb2.Duration(seconds=-1)))
    running = await stub.ListRunning(pb.ListRunningRequest())
    (m,) = [m for m in running.models if m.name == TEST_MODEL]
    assert not m.HasField("expires_at")  # negative keep_alive: never expires
    assert m.size_bytes > 0
    unloaded = await stub.UnloadModel(pb.UnloadModelRequest(model=TEST_MODEL))
    assert unloaded.was_loaded
    running = await stub.ListRunning(pb.ListRunningRequest())
    assert TEST_MODEL not in [m.name for m in running.models]
