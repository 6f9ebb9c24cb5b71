"""Validation of JSON request bodies against OpenAPI 3.0 schemas, with jsonschema-rs.

openapi-core and jsonschema need about a second to walk a 10,000-profile Klaviyo import; the
sandbox must take tens of thousands of profiles a second, so bodies are checked by
jsonschema-rs (compiled Rust, ~0.4 µs a profile). OpenAPI's dialect is converted to JSON Schema
draft 4 first (``nullable``, ``int32``/``int64`` ranges, annotations dropped), and the format
checks are ours, so that "date-time" means what the vendors accept. Python's jsonschema, with
the same converted schema and formats, is the reference the tests compare against.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import jsonschema_rs
from jsonschema import FormatChecker

# OpenAPI keywords that carry no validation meaning.
_ANNOTATIONS = frozenset(
    {
        "description",
        "example",
        "examples",
        "default",
        "title",
        "readOnly",
        "writeOnly",
        "deprecated",
        "discriminator",
        "xml",
        "externalDocs",
        "nullable",
        "$schema",
        "id",
    }
)


# --- formats: one predicate per name, for jsonschema-rs and the jsonschema reference ----------


def _is_datetime(value: str) -> bool:
    if len(value) < 16 or value[10] not in "Tt":
        return False
    try:
        datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return False
    return True


def _is_date(value: str) -> bool:
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return len(value) == 10


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")


def _is_ip(version: int) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        try:
            return ipaddress.ip_address(value).version == version
        except ValueError:
            return False

    return check


STRING_FORMATS: dict[str, Callable[[str], bool]] = {
    "date-time": _is_datetime,
    "date": _is_date,
    "email": lambda v: _EMAIL.match(v) is not None,
    "uri": lambda v: _URI.match(v) is not None,
    "ipv4": _is_ip(4),
    "ipv6": _is_ip(6),
}
INT_FORMATS: dict[str, tuple[int, int]] = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


def _format_checker() -> FormatChecker:
    checker = FormatChecker(formats=())
    for name, fn in STRING_FORMATS.items():
        checker.checks(name)(lambda v, fn=fn: not isinstance(v, str) or fn(v))
    return checker


FORMAT_CHECKER = _format_checker()  # for Python's jsonschema, the tests' reference


# --- OpenAPI 3.0 -> JSON Schema draft 4 ------------------------------------------------------


def oas_to_jsonschema(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable`` and integer formats as JSON Schema; drop annotations.

    ``{"$ref": X, "nullable": true}`` (OpenAPI ignores siblings of ``$ref``, but vendors mean
    "X or null", and clients send null there) becomes ``anyOf: [X, null]``. ``int32`` and
    ``int64`` become ``minimum``/``maximum`` (JSON Schema formats apply to strings only).
    """
    if isinstance(node, list):
        return [oas_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (v if k in ("enum", "required") else oas_to_jsonschema(v))
        for k, v in node.items()
        if k not in _ANNOTATIONS and not k.startswith("x-")
    }
    bounds = INT_FORMATS.get(out.get("format", ""))
    if bounds is not None:
        del out["format"]
        out.setdefault("minimum", bounds[0])
        out.setdefault("maximum", bounds[1])
    if node.get("nullable") is True:
        if "$ref" in out:
            return {"anyOf": [{"$ref": out["$ref"]}, {"type": "null"}]}
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        for key in ("oneOf", "anyOf"):
            if key in out:
                out[key] = [*out[key], {"type": "null"}]
    return out


def _convert_components(components: Mapping[str, Any]) -> dict[str, Any]:
    # Only "schemas" can be the target of a body schema's $ref; keep the rest untouched.
    return {k: (oas_to_jsonschema(v) if k == "schemas" else v) for k, v in components.items()}


@dataclass(frozen=True)
class SchemaError:
    """The first reason a document does not match: where (JSON pointer) and why."""

    pointer: str
    message: str


class BodyValidator:
    """Checks JSON documents against one request-body schema of an OpenAPI 3.0 document."""

    def __init__(self, schema: Mapping[str, Any], components: Mapping[str, Any]):
        self.schema = {
            "allOf": [oas_to_jsonschema(schema)],
            "components": _convert_components(components),
        }
        self._validator = jsonschema_rs.Draft4Validator(
            self.schema, formats=STRING_FORMATS, validate_formats=True
        )

    def first_error(self, document: Any) -> SchemaError | None:
        """None when ``document`` is valid, else the first error found and where it is."""
        if self._validator.is_valid(document):
            return None
        error = _deepest(next(iter(self._validator.iter_errors(document))))
        return SchemaError(_pointer(error.instance_path), error.message)


def _deepest(error: Any) -> Any:
    """For anyOf/oneOf failures, the branch error that got furthest into the document: for a
    nullable object that is the bad value inside it, not "not valid under any of"."""
    branches = getattr(error.kind, "context", None)
    if not branches:
        return error
    subs = [sub for branch in branches for sub in branch]
    if not subs:
        return error
    best = max(subs, key=lambda sub: len(sub.instance_path))
    return _deepest(best) if len(best.instance_path) > len(error.instance_path) else error


def _pointer(parts: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
