"""gRPC server reflection under both grpc.reflection.v1 and v1alpha.

grpcio-reflection ships only v1alpha. The v1 service has the same messages
under another package name, so its file descriptor is derived from the
v1alpha one and the same servicer serves both, because the bytes on the wire are
identical.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass

    file_proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file_proto)
    file_proto.name = V1_FILE
    file_proto.package = V1_PACKAGE
    file_proto.ClearField("options")
    old_prefix, new_prefix = f".{V1ALPHA_PACKAGE}.", f".{V1_PACKAGE}."
    for message in file_proto.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(old_prefix, new_prefix)
    for service in file_proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_prefix, new_prefix)
            method.output_type = method.output_type.replace(old_prefix, new_prefix)
    pool.AddSerializedFile(file_proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for service_names plus both reflection services."""
    _register_v1_descriptor()
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)

    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.method_handlers_generic_handler(
            service,
            {
                "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                    servicer.ServerReflectionInfo,
                    request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                    response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
