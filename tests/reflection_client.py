"""A gRPC reflection v1 client for the tests (the Python packages ship v1alpha stubs only)."""

from __future__ import annotations

import grpc


def v1_reflection_call(channel: grpc.aio.Channel):
    """A reflection v1 client (as newer grpcurl and Postman are): v1 message
    types from the descriptor pool, on the v1 method path."""
    from google.protobuf import descriptor_pool, message_factory

    from backends.reflection import register_v1_descriptor

    pool = descriptor_pool.Default()
    register_v1_descriptor(pool)  # what the server adds; a no-op when it already ran here
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    return request, call
