"""Server reflection under both names clients ask for: grpc.reflection.v1 (grpcurl, Postman, current
grpc tooling) and the older grpc.reflection.v1alpha.

grpcio-reflection ships only v1alpha (its `reflection_pb2` and servicer). The v1 protocol,
grpc/reflection/v1/reflection.proto, is the same proto under another package: same messages, same
field numbers, so the same bytes on the wire. This module builds the v1 file descriptor from the
v1alpha one (package and type names renamed; it is put in the default descriptor pool, so v1 can
itself be described) and serves v1 with the v1alpha servicer.
"""

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
METHOD = "ServerReflectionInfo"


def _v1_file_descriptor():
    """grpc/reflection/v1/reflection.proto in the default pool (added once, from the v1alpha file)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{v1alpha_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


V1_DESCRIPTOR = _v1_file_descriptor()
# The v1 messages, for clients (and tests) that speak v1.
V1ServerReflectionRequest = message_factory.GetMessageClass(
    V1_DESCRIPTOR.message_types_by_name["ServerReflectionRequest"])
V1ServerReflectionResponse = message_factory.GetMessageClass(
    V1_DESCRIPTOR.message_types_by_name["ServerReflectionResponse"])


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serves reflection over `service_names` plus both reflection services, as v1 and v1alpha."""
    names = tuple(dict.fromkeys((*service_names, *SERVICE_NAMES)))
    v1alpha.enable_server_reflection(names, server)
    servicer = v1alpha.ReflectionServicer(names)
    # v1 and v1alpha messages are byte-for-byte the same, so the v1alpha (de)serializers serve v1 too.
    handlers = {METHOD: grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(V1_SERVICE_NAME, handlers)


def v1_stub(channel: grpc.Channel):
    """A callable for grpc.reflection.v1.ServerReflection/ServerReflectionInfo (a stream of v1 requests)."""
    return channel.stream_stream(f"/{V1_SERVICE_NAME}/{METHOD}",
                                 request_serializer=V1ServerReflectionRequest.SerializeToString,
                                 response_deserializer=V1ServerReflectionResponse.FromString)
