"""An OpenAPI 3.1 document generated from the gateway's routes and the
message descriptors, in protobuf's JSON mapping."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor

from tokenflow_grpc.gateway.routes import RESUME_FIELD, Route

OPENAPI_VERSION = "3.1.0"
STATUS_SCHEMA = "google.rpc.Status"
INT64_PATTERN = r"^-?[0-9]+$"
UINT64_PATTERN = r"^[0-9]+$"
DURATION_PATTERN = r"^-?[0-9]+(\.[0-9]{1,9})?s$"

_Type = descriptor.FieldDescriptor
_INT32 = {_Type.TYPE_INT32, _Type.TYPE_SINT32, _Type.TYPE_SFIXED32}
_UINT32 = {_Type.TYPE_UINT32, _Type.TYPE_FIXED32}
_INT64 = {_Type.TYPE_INT64, _Type.TYPE_SINT64, _Type.TYPE_SFIXED64}
_UINT64 = {_Type.TYPE_UINT64, _Type.TYPE_FIXED64}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": DURATION_PATTERN},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "additionalProperties": True,
    },
}


class _Schemas:
    """Collects a component schema for each message reached from the routes."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # Placeholder for recursive messages.
            self.components[message.full_name] = self._message(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _message(self, message: descriptor.Descriptor) -> dict[str, Any]:
        properties = {field.json_name: self.field(field) for field in message.fields}
        return {"type": "object", "properties": properties, "additionalProperties": False}

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.scalar(value)}
        item = self.scalar(field)
        if field.is_repeated:
            return {"type": "array", "items": item}
        return item

    def scalar(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        kind = field.type
        if kind == _Type.TYPE_MESSAGE and field.message_type is not None:
            return self.ref(field.message_type)
        if kind == _Type.TYPE_ENUM and field.enum_type is not None:
            return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
        if kind == _Type.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == _Type.TYPE_STRING:
            return {"type": "string"}
        if kind == _Type.TYPE_BYTES:
            return {"type": "string", "format": "byte"}
        if kind in (_Type.TYPE_DOUBLE, _Type.TYPE_FLOAT):
            return {"type": "number"}
        if kind in _INT32:
            return {"type": "integer", "format": "int32"}
        if kind in _UINT32:
            return {"type": "integer", "format": "int32", "minimum": 0}
        if kind in _INT64:
            return {"type": "string", "format": "int64", "pattern": INT64_PATTERN}
        if kind in _UINT64:
            return {"type": "string", "format": "uint64", "pattern": UINT64_PATTERN}
        raise ValueError(f"unsupported field type {kind} of {field.full_name}")


def _query_parameters(
    message: descriptor.Descriptor, bound: set[str], schemas: _Schemas, prefix: str = ""
) -> list[dict[str, Any]]:
    """List the scalar and repeated scalar fields a GET route takes from its query."""
    parameters = []
    for field in message.fields:
        path = prefix + field.name
        if path in bound:
            continue
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN:
            if not field.is_repeated and not is_map:
                parameters += _query_parameters(field.message_type, bound, schemas, path + ".")
            continue
        parameter: dict[str, Any] = {"name": path, "in": "query", "schema": schemas.field(field)}
        if field.is_repeated:
            parameter["explode"] = True
        parameters.append(parameter)
    return parameters


def _operation(route: Route, operation_id: str, schemas: _Schemas) -> dict[str, Any]:
    bound = set(route.template.variables)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.template.variables
    ]
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": f"{route.method.containing_service.name}.{route.method.name}",
        "tags": [route.method.containing_service.full_name],
    }
    if route.body == "*":
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schemas.ref(route.method.input_type)}},
        }
    else:
        if route.body:
            body_field = route.method.input_type.fields_by_name[route.body]
            bound.add(route.body)
            operation["requestBody"] = {
                "content": {"application/json": {"schema": schemas.field(body_field)}}
            }
        parameters += _query_parameters(route.method.input_type, bound, schemas)
    if parameters:
        operation["parameters"] = parameters

    output = schemas.ref(route.method.output_type)
    error = {"$ref": f"#/components/schemas/{STATUS_SCHEMA}"}
    if route.server_streaming:
        line = {
            "type": "object",
            "properties": {"result": output, "error": error},
            "additionalProperties": False,
        }
        operation["x-server-streaming"] = True
        content = {
            "application/x-ndjson": {"schema": line},
            "text/event-stream": {"schema": {"type": "string"}},
        }
        operation["description"] = _stream_description(route)
    else:
        content = {"application/json": {"schema": output}}
    operation["responses"] = {
        "200": {"description": "OK", "content": content},
        "default": {
            "description": "A google.rpc.Status describing the error.",
            "content": {"application/json": {"schema": error}},
        },
    }
    return operation


def _stream_description(route: Route) -> str:
    text = (
        "Server stream: one JSON object per line, or Server-Sent Events when the "
        "request accepts text/event-stream."
    )
    if RESUME_FIELD in route.method.input_type.fields_by_name:
        return (
            f"{text} A dropped stream resumes after an event id, sent as {RESUME_FIELD} or, "
            "for Server-Sent Events, as the Last-Event-ID header."
        )
    return f"{text} It cannot be resumed; after a dropped stream, send the request again."


def build_openapi(routes: list[Route], title: str = "TokenFlow") -> dict[str, Any]:
    """Return the OpenAPI document of routes."""
    from google.rpc import status_pb2

    schemas = _Schemas()
    schemas.ref(status_pb2.Status.DESCRIPTOR)
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for route in routes:
        operation_id = route.method.name
        suffix = 2
        while operation_id in used_ids:
            operation_id = f"{route.method.name}{suffix}"
            suffix += 1
        used_ids.add(operation_id)
        path_item = paths.setdefault(route.template.openapi_path, {})
        path_item[route.http_method.lower()] = _operation(route, operation_id, schemas)

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": "v1",
            "description": "HTTP/JSON routes transcoded to gRPC from google.api.http annotations.",
        },
        "paths": paths,
        "components": {"schemas": schemas.components},
    }
