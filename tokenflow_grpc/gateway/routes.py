"""HTTP routes read from the google.api.http annotations of gRPC services.

A path template follows google/api/http.proto:

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

Templates match the percent-encoded request path segment by segment, so an
encoded "/" (%2F) stays inside its segment. As http.proto specifies, a
one-segment variable's value is fully decoded, and a multi-segment one
({name=**}, {name=a/*}) keeps "%2F" encoded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message_factory

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# A streaming request with this string field resumes from an SSE Last-Event-ID.
RESUME_FIELD = "since_id"


class TemplateError(ValueError):
    """A google.api.http path template is malformed."""


class InvalidPathError(ValueError):
    """A request path cannot be decoded."""


def _decoded_segment(segment: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError as error:
        raise InvalidPathError(
            f"invalid path segment {segment!r}: its percent-encoded bytes are not UTF-8; "
            "percent-encode the UTF-8 bytes of the value"
        ) from error


def canonical_path(raw_path: str) -> str:
    """Decode each segment of a percent-encoded path, then encode only "%" and "/"
    again, so that literals compare decoded and no decoded "/" splits a segment.

    Raises InvalidPathError when a segment's percent-encoded bytes are not UTF-8.
    """
    return "/".join(
        _decoded_segment(segment).replace("%", "%25").replace("/", "%2F")
        for segment in raw_path.split("/")
    )


@dataclass(frozen=True)
class PathTemplate:
    """A compiled path template: its regular expression and variable field paths."""

    text: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]
    # For each variable, whether it can span several segments.
    multi_segment: tuple[bool, ...]

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise TemplateError(f"path template {text!r} must start with '/'")
        path, verb = _split_verb(text)
        variables: list[str] = []
        multi_segment: list[bool] = []
        pattern = "".join(
            _segment_pattern(segment, variables, multi_segment, text) for segment in _split(path)
        )
        if verb:
            pattern += re.escape(":" + _canonical_literal(verb))
        return cls(text, re.compile(f"^{pattern}$"), tuple(variables), tuple(multi_segment))

    def match(self, raw_path: str) -> dict[str, str] | None:
        """Return the decoded variable values if the percent-encoded raw_path matches, else None.

        Raises InvalidPathError when a segment's percent-encoded bytes are not UTF-8.
        """
        found = self.regex.match(canonical_path(raw_path))
        if found is None:
            return None
        return {
            name: _variable_value(value, multi)
            for name, value, multi in zip(
                self.variables, found.groups(), self.multi_segment, strict=True
            )
        }

    @property
    def openapi_path(self) -> str:
        """The template with each variable written as {field.path}, for OpenAPI."""
        return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", self.text)


def _split_verb(text: str) -> tuple[str, str]:
    last_slash = text.rfind("/")
    close = text.rfind("}")
    colon = text.rfind(":")
    if colon > last_slash and colon > close:
        return text[:colon], text[colon + 1 :]
    return text, ""


def _split(path: str) -> list[str]:
    """Split a path into segments, keeping each {variable=a/b} whole."""
    segments, depth, current = [], 0, ""
    for char in path[1:]:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    segments.append(current)
    return segments


def _variable_value(canonical: str, multi_segment: bool) -> str:
    if not multi_segment:
        return unquote(canonical)
    return "/".join(unquote(part).replace("/", "%2F") for part in canonical.split("/"))


def _canonical_literal(literal: str) -> str:
    return literal.replace("%", "%25")


def _segment_pattern(
    segment: str, variables: list[str], multi_segment: list[bool], template: str
) -> str:
    if segment.startswith("{"):
        if not segment.endswith("}"):
            raise TemplateError(f"unclosed variable {segment!r} in path template {template!r}")
        field_path, _, sub_template = segment[1:-1].partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", field_path):
            raise TemplateError(f"invalid field path {field_path!r} in path template {template!r}")
        variables.append(field_path)
        inner = sub_template or "*"
        multi_segment.append("/" in inner or "**" in inner)
        inner_pattern = "/".join(_literal_or_wildcard(part, template) for part in inner.split("/"))
        return f"/({inner_pattern})"
    return f"/{_literal_or_wildcard(segment, template)}"


def _literal_or_wildcard(segment: str, template: str) -> str:
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".+"
    if not segment or any(c in segment for c in "{}*"):
        raise TemplateError(f"invalid segment {segment!r} in path template {template!r}")
    return re.escape(_canonical_literal(segment))


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one gRPC method."""

    http_method: str
    template: PathTemplate
    body: str
    method: descriptor.MethodDescriptor
    request_class: Any
    response_class: Any

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)


def _bindings(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    for binding in rule.additional_bindings:
        yield from _bindings(binding)


def routes_for(services: Iterable[descriptor.ServiceDescriptor]) -> list[Route]:
    """Read every HTTP binding of every method of services."""
    routes = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            if method.client_streaming:
                continue  # HTTP/1.1 bodies cannot carry a client stream.
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            for rule in _bindings(options.Extensions[annotations_pb2.http]):
                kind = rule.WhichOneof("pattern")
                if kind in HTTP_METHODS:
                    http_method, template = kind.upper(), getattr(rule, kind)
                elif kind == "custom":
                    http_method, template = rule.custom.kind.upper(), rule.custom.path
                else:
                    continue
                routes.append(
                    Route(
                        http_method,
                        PathTemplate.parse(template),
                        rule.body,
                        method,
                        request_class,
                        response_class,
                    )
                )
    return routes
