"""Transcoding between HTTP/JSON and protobuf messages, with protobuf's own
JSON mapping, and gRPC errors as google.rpc.Status JSON.

Unknown JSON fields, unknown query parameters and keys that appear twice in
one JSON object are rejected with 400 and named in the message, so a
misspelt or repeated field never goes unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tokenflow_grpc.gateway.routes import Route

DETAILS_METADATA_KEY = "grpc-status-details-bin"
# The standard error detail messages, registered so that their Any values in a
# google.rpc.Status decode to JSON.
STANDARD_DETAILS = error_details_pb2.DESCRIPTOR

# The HTTP status of each gRPC code, as in google/rpc/code.proto and grpc-gateway.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class TranscodeError(ValueError):
    """An HTTP request cannot be turned into the method's request message."""


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def to_json(message: Message) -> dict[str, Any]:
    """Return message as proto3 JSON: lowerCamelCase names, zero and empty fields
    included; only message fields that are unset are left out."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    return result


def status_json(code: grpc.StatusCode, message: str, details: Iterable[Any] = ()) -> dict[str, Any]:
    """Return a google.rpc.Status as JSON for code and message."""
    status = status_pb2.Status(code=code.value[0], message=message, details=list(details))
    return to_json(status)


def error_json(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """Return the google.rpc.Status of a failed call, details included when decodable."""
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            try:
                return to_json(status)
            except (TypeError, json_format.Error):
                # A detail of a type this process does not know: keep code and message.
                status.ClearField("details")
                return to_json(status)
    return status_json(error.code(), error.details() or "")


def _field_by_path(message_class: Any, path: str) -> descriptor.FieldDescriptor:
    message_descriptor = message_class.DESCRIPTOR
    fields = path.split(".")
    field: descriptor.FieldDescriptor | None = None
    for index, name in enumerate(fields):
        field = message_descriptor.fields_by_name.get(name) or _by_json_name(
            message_descriptor, name
        )
        if field is None:
            raise TranscodeError(f"unknown field {path!r}")
        if index < len(fields) - 1:
            if field.message_type is None:
                raise TranscodeError(f"field {path!r}: {name!r} is not a message")
            message_descriptor = field.message_type
    assert field is not None
    return field


def _by_json_name(
    message_descriptor: descriptor.Descriptor, name: str
) -> descriptor.FieldDescriptor | None:
    for field in message_descriptor.fields:
        if field.json_name == name:
            return field
    return None


def _scalar(field: descriptor.FieldDescriptor, text: str) -> Any:
    """Convert one path or query value to what json_format expects for field."""
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise TranscodeError(f"invalid value {text!r} for boolean field {field.name!r}")
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM and text.lstrip("-").isdigit():
        return int(text)
    return text


def _set_path(
    target: dict[str, Any], path: str, field: descriptor.FieldDescriptor, values: list[str]
) -> None:
    names = path.split(".")
    for name in names[:-1]:
        target = target.setdefault(name, {})
        if not isinstance(target, dict):
            raise TranscodeError(f"field {path!r} is set twice")
    converted = [_scalar(field, value) for value in values]
    if field.is_repeated:
        target[names[-1]] = converted
    elif len(converted) > 1:
        raise TranscodeError(f"field {path!r} is not repeated but has {len(converted)} values")
    else:
        target[names[-1]] = converted[0]


def build_request(
    route: Route,
    path_values: Mapping[str, str],
    query: Mapping[str, list[str]],
    body: bytes,
) -> Message:
    """Build the request message from path variables, query parameters and body."""
    message: Message = route.request_class()
    if route.body:
        _parse_body(route, message, body)

    bound: dict[str, Any] = {}
    for path, value in path_values.items():
        _set_path(bound, path, _field_by_path(route.request_class, path), [value])
    if route.body != "*":
        path_fields = {_field_by_path(route.request_class, p) for p in path_values}
        body_field = _field_by_path(route.request_class, route.body) if route.body else None
        seen: dict[descriptor.FieldDescriptor, str] = {}
        for path, values in query.items():
            try:
                field = _field_by_path(route.request_class, path)
            except TranscodeError as error:
                raise TranscodeError(f"unknown query parameter {path!r}: {error}") from error
            if field in seen:
                raise TranscodeError(
                    f"query parameters {seen[field]!r} and {path!r} set the same field"
                )
            seen[field] = path
            top = _field_by_path(route.request_class, path.split(".")[0])
            if body_field is not None and top == body_field:
                raise TranscodeError(f"field {path!r} is bound to the body, not the query")
            if field in path_fields:
                raise TranscodeError(f"field {path!r} is bound to the path, not the query")
            _set_path(bound, path, field, values)
    elif query:
        raise TranscodeError(
            f"unknown query parameter {next(iter(query))!r}: this route takes its fields "
            "from the JSON body"
        )

    try:
        json_format.ParseDict(bound, message)
    except json_format.ParseError as error:
        raise TranscodeError(str(error)) from error
    return message


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, raising TranscodeError for a key that appears twice.

    Python's json keeps the last value silently. Go's encoding/protojson
    rejects a field that appears twice, and the gateway rejects any key that
    appears twice in one object.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TranscodeError(
                f"invalid JSON body: duplicate key {key!r} in one object; send it once"
            )
        result[key] = value
    return result


def _parse_body(route: Route, message: Message, body: bytes) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TranscodeError(f"the body is not valid UTF-8: {error}") from error
    if not text.strip():
        return
    try:
        document = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        raise TranscodeError(f"malformed JSON body: {error}") from error
    except RecursionError as error:
        raise TranscodeError("the JSON body is nested too deeply") from error

    if route.body == "*":
        target: Any = document
    else:
        field = _field_by_path(route.request_class, route.body)
        target = {field.json_name: document}
    if not isinstance(target, dict):
        raise TranscodeError("the JSON body must be an object")
    try:
        json_format.ParseDict(target, message)
    except json_format.ParseError as error:
        raise TranscodeError(str(error)) from error
    except RecursionError as error:
        raise TranscodeError("the JSON body is nested too deeply") from error


def invalid_argument_json(message: str) -> dict[str, Any]:
    return status_json(grpc.StatusCode.INVALID_ARGUMENT, message)


def code_name(code: int) -> str:
    return str(code_pb2.Code.Name(code))
