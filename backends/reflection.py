"""gRPC server reflection, both versions: ``grpc.reflection.v1`` and ``v1alpha``.

Newer grpcurl and Postman ask ``grpc.reflection.v1.ServerReflection`` first;
older tools know only ``v1alpha``.  grpcio-reflection (1.85) implements
v1alpha alone (grpc/grpc#38576), and no package on PyPI ships Python stubs for
v1.  The two protocols are the same messages with the same field numbers
under another package name, so v1 is served here by grpcio-reflection's own
servicer, with v1alpha's message classes doing the (byte-identical) wire
work, on the v1 method path.

So that tools can also *describe* the v1 service (``grpcurl describe
grpc.reflection.v1.ServerReflection``), its file descriptor is added to the
descriptor pool: v1alpha's, renamed to ``grpc/reflection/v1/reflection.proto``
in package ``grpc.reflection.v1`` (no generated code is vendored).

Both services stay open when API keys are set: the gate
(``backends.gate``) only guards ``mlxgate.v1.InferenceService``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2

V1ALPHA_SERVICE_NAME: str = v1alpha.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"


def _renamed(type_name: str, old: str) -> str:
    prefix = f".{old}."
    return f".{V1_PACKAGE}.{type_name[len(prefix):]}" if type_name.startswith(prefix) else type_name


def _rename_messages(messages: Iterable[descriptor_pb2.DescriptorProto], old: str) -> None:
    for message in messages:
        for f in message.field:
            if f.type_name:
                f.type_name = _renamed(f.type_name, old)
        _rename_messages(message.nested_type, old)


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``, made from v1alpha's descriptor."""
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    old = fdp.package
    fdp.name = V1_FILE
    fdp.package = V1_PACKAGE
    fdp.ClearField("options")  # v1alpha's java/go package names would be wrong here
    _rename_messages(fdp.message_type, old)
    for service in fdp.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type, old)
            method.output_type = _renamed(method.output_type, old)
    return fdp


def register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add the v1 file to ``pool`` once (a later grpcio-reflection may add it itself)."""
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(v1_file_descriptor().SerializeToString())


def _guarded(servicer, warn: Callable[..., bool]) -> Callable:
    """The servicer's ServerReflectionInfo with malformed requests answered
    INVALID_ARGUMENT (a rate-limited warning, as for InferenceService) instead
    of grpcio's UNKNOWN and a logged traceback per call: reflection is open
    to anyone who can reach the port."""

    async def info(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bad: list[str] = []

        async def requests() -> AsyncIterator[Any]:
            try:
                async for request in request_iterator:
                    yield request
            except DecodeError as e:
                bad.append(str(e))

        async for response in servicer.ServerReflectionInfo(requests(), context):
            yield response
        if bad:
            warn("malformed reflection request from %s answered INVALID_ARGUMENT: %s", context.peer(), bad[0])
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"malformed ServerReflectionRequest: {bad[0]}")

    return info


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str], warn: Callable[..., bool]) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``service_names``
    (the reflection services list themselves too); ``warn`` logs a malformed
    request (rate-limited)."""
    pool = descriptor_pool.Default()
    register_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    info = _guarded(v1alpha.aio.ReflectionServicer(names, pool=pool), warn)
    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
        )
    )
