"""The vendors' OpenAPI specs, loaded once, and the check of one request against them.

A client that passes its tests against the sandbox should not meet a 400 from the vendor, so
every request is checked the way the vendor would: path, method, query and header parameters
with openapi-core, the Content-Type against the operation's media types, and the JSON body with
jsonschema-rs (``bodyschema``) because openapi-core needs about a second for a 10,000-profile
body.

Specs live in ``shared/api-specs`` beside the repository (``REVERSE_ETL_API_SPECS`` overrides).
Two published specs reject their own examples; ``_PATCHES`` repairs exactly those spots.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.validation.request.exceptions import (
    MissingRequiredParameter,
    ParameterValidationError,
)
from openapi_core.validation.request.validators import V30RequestParametersValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

from reverse_etl.sandbox.bodyschema import BodyValidator

#: Short names for the spec files the sandboxes serve.
SPEC_FILES: dict[str, str] = {
    "klaviyo/profiles": "klaviyo/profiles.json",
    "klaviyo/lists": "klaviyo/lists.json",
    "klaviyo/events": "klaviyo/events.json",
    "klaviyo/catalogs": "klaviyo/catalogs.json",
    "dotdigital/contacts": "dotdigital/dotdigital-contacts-service.json",
    "dotdigital/insight": "dotdigital/dotdigital-insight-data-service.json",
    "dotdigital/v2": "dotdigital/dotdigital-v2-api-swagger.json",
}


def spec_dir() -> Path:
    """Where the vendor specs are: $REVERSE_ETL_API_SPECS or ../shared/api-specs."""
    env = os.environ.get("REVERSE_ETL_API_SPECS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "api-specs"


def _patch_insight(doc: dict[str, Any]) -> None:
    # upsertInsightRecord = allOf[{contactIdentity, additionalProperties: false}, insightRecord]
    # forbids `key` and `json` in its first part, so no record could ever pass.
    doc["components"]["schemas"]["upsertInsightRecord"]["allOf"][0].pop(
        "additionalProperties", None
    )


def _patch_contacts(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    # The import example matches on {"contactId": 123456}, but `identifiers` only allows extra
    # string identifiers, so the integer contactId of contactIdObject is rejected by allOf.
    schemas["identifiers"]["properties"]["contactId"] = {"type": "integer", "minimum": 0}
    # channelProperties.email is closed (additionalProperties: false) in one allOf branch while
    # the other branch adds `resubscribeOptions`; allow that documented key in the closed one.
    email = schemas["channelProperties_channelProperties_email"]
    email["properties"]["resubscribeOptions"] = {
        "$ref": "#/components/schemas/"
        "channelPropertiesWithResubscribe_channelProperties_email_resubscribeOptions"
    }


_PATCHES: dict[str, Callable[[dict[str, Any]], None]] = {
    "dotdigital/insight": _patch_insight,
    "dotdigital/contacts": _patch_contacts,
}


@dataclass(frozen=True)
class Violation:
    """A request the vendor would refuse, with where it went wrong.

    ``kind`` is one of ``route`` (no such path/method), ``auth``, ``content_type``,
    ``parameter``, ``body`` (schema), ``limit`` (a documented batch or size limit),
    ``not_found`` (an id the account does not have) or ``semantic`` (valid shape, refused
    meaning, e.g. consent time in the future). ``unsupported`` marks what the spec allows but
    the sandbox does not implement (501); it is not counted as the client's fault.
    """

    status: int
    kind: str
    detail: str
    pointer: str | None = None
    parameter: str | None = None
    method: str = ""
    path: str = ""
    code: str | None = None  # the vendor's own error code, when the sandbox knows it


class SpecViolation(Exception):
    """Raised by checks; the sandbox turns it into the vendor's error answer."""

    def __init__(self, violation: Violation):
        super().__init__(violation.detail)
        self.violation = violation


def violation(
    status: int,
    kind: str,
    detail: str,
    *,
    pointer: str | None = None,
    parameter: str | None = None,
    code: str | None = None,
) -> SpecViolation:
    return SpecViolation(
        Violation(status, kind, detail, pointer=pointer, parameter=parameter, code=code)
    )


@dataclass
class _ParamRequest:
    """The minimal request object openapi-core's parameter validator reads."""

    host_url: str
    path: str
    path_pattern: str
    method: str
    parameters: RequestParameters
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass
class Operation:
    """One method + path template of a spec, with what the sandbox needs to check it."""

    spec: Spec
    method: str
    template: str
    raw: Mapping[str, Any]
    header_params: tuple[str, ...] = ()
    media_types: tuple[str, ...] = ()
    body_required: bool = False
    _body: BodyValidator | None = field(default=None, repr=False)

    @property
    def operation_id(self) -> str:
        return str(self.raw.get("operationId", f"{self.method} {self.template}"))

    @property
    def ratelimit(self) -> Mapping[str, str]:
        """Klaviyo's ``x-klaviyo-ratelimit`` (burst/steady/daily), empty elsewhere."""
        return self.raw.get("x-klaviyo-ratelimit", {})

    def body_validator(self) -> BodyValidator:
        if self._body is None:
            content = self.raw["requestBody"]["content"]
            schema = content[self.media_types[0]]["schema"]
            self._body = BodyValidator(schema, self.spec.raw.get("components", {}))
        return self._body

    def check(
        self,
        *,
        path_params: Mapping[str, str],
        query: Sequence[tuple[str, str]],
        headers: Mapping[str, str],
        content_type: str | None,
        body: bytes,
    ) -> Any:
        """Check one request; return its parsed JSON body (or None). Raise SpecViolation."""
        header_values = tuple(
            (h, headers[h.lower()]) for h in self.header_params if h.lower() in headers
        )
        problem = self.spec.check_parameters(
            self.method,
            self.template,
            tuple(sorted(path_params.items())),
            tuple(query),
            header_values,
        )
        if problem is not None:
            raise SpecViolation(problem)
        if not self.media_types:
            return None
        media = (content_type or "").split(";")[0].strip().lower()
        if not body and not self.body_required:
            return None
        if media not in self.media_types:
            raise violation(
                415,
                "content_type",
                f"Content-Type must be {' or '.join(self.media_types)}, got {media or 'none'!r}",
                parameter="Content-Type",
            )
        if not body:
            raise violation(400, "body", "A request body is required.", pointer="/")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise violation(
                400, "body", f"The request body is not valid JSON: {exc}", pointer="/"
            ) from exc
        error = self.body_validator().first_error(document)
        if error is not None:
            raise violation(400, "body", error.message, pointer=error.pointer or "/")
        return document


class Spec:
    """One vendor spec: the raw document, openapi-core's view of it, and its operations."""

    def __init__(self, name: str, raw: dict[str, Any]):
        self.name = name
        self.raw = raw
        self.openapi = OpenAPI.from_dict(raw, config=Config(spec_validator_cls=None))
        self.host_url = _server_url(raw)
        self._params = V30RequestParametersValidator(self.openapi.spec, base_url=None)
        self._ops: dict[tuple[str, str], Operation] = {}
        self.check_parameters = functools.lru_cache(maxsize=4096)(self._check_parameters)

    def operation(self, method: str, template: str) -> Operation:
        """The operation for ``method`` on ``template``; KeyError if the spec has none."""
        key = (method.lower(), template)
        op = self._ops.get(key)
        if op is None:
            raw = self.raw["paths"][template][key[0]]
            path_level = self.raw["paths"][template].get("parameters", [])
            params = [*path_level, *raw.get("parameters", [])]
            body = raw.get("requestBody") or {}
            op = Operation(
                spec=self,
                method=key[0],
                template=template,
                raw=raw,
                header_params=tuple(p["name"] for p in params if p.get("in") == "header"),
                media_types=tuple(k.lower() for k in body.get("content", {})),
                body_required=bool(body.get("required", False)),
            )
            self._ops[key] = op
        return op

    def _check_parameters(
        self,
        method: str,
        template: str,
        path_params: tuple[tuple[str, str], ...],
        query: tuple[tuple[str, str], ...],
        headers: tuple[tuple[str, str], ...],
    ) -> Violation | None:
        path = template
        for name, value in path_params:
            path = path.replace("{" + name + "}", value)
        request = _ParamRequest(
            host_url=self.host_url,
            path=path,
            path_pattern=template,
            method=method,
            parameters=RequestParameters(
                path=dict(path_params),
                query=ImmutableMultiDict(list(query)),
                header=Headers(list(headers)),
                cookie=ImmutableMultiDict(),
            ),
        )
        for error in self._params.iter_errors(request):
            return _parameter_violation(error)
        return None


def _parameter_violation(error: Exception) -> Violation:
    name = getattr(error, "name", None)
    location = getattr(error, "location", "query")
    if isinstance(error, MissingRequiredParameter):
        detail = f"The {location} parameter {name!r} is required."
    elif isinstance(error, ParameterValidationError):
        cause = error.__cause__
        reasons = [getattr(e, "message", str(e)) for e in getattr(cause, "schema_errors", ()) or ()]
        detail = f"Invalid {location} parameter {name!r}: " + (
            "; ".join(reasons) or str(cause or error)
        )
    else:
        detail = str(error)
    return Violation(400, "parameter", detail, parameter=name)


def _server_url(raw: Mapping[str, Any]) -> str:
    servers = raw.get("servers") or [{"url": "https://localhost"}]
    server = servers[0]
    url = str(server["url"])
    for var, spec in (server.get("variables") or {}).items():
        url = url.replace("{" + var + "}", str(spec.get("default", "")))
    return re.sub(r"/+$", "", url)


@functools.cache
def load_spec(name: str) -> Spec:
    """Load (once per process) the spec called ``name`` in :data:`SPEC_FILES`."""
    raw = orjson.loads((spec_dir() / SPEC_FILES[name]).read_bytes())
    patch = _PATCHES.get(name)
    if patch is not None:
        patch(raw)
    return Spec(name, raw)
