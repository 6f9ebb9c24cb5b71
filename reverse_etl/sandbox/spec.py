"""The vendors' OpenAPI specs, loaded once, and the check of one request against them.

A client that passes its tests against the sandbox should not meet a 400 from the vendor, so
every request is checked the way the vendor would: path, method, query and header parameters
with openapi-core, the Content-Type against the operation's media types, and the JSON body with
jsonschema-rs (``bodyschema``) because openapi-core needs about a second for a 10,000-profile
body.

The specs are the vendors' files and stay outside the package. They are looked for, first
found wins, in: ``--api-specs DIR`` (:func:`use_spec_dir`), ``$REVERSE_ETL_API_SPECS``,
``../shared/api-specs`` beside the repository checkout, then ``./shared/api-specs`` and
``../shared/api-specs`` from the current directory. A directory named by the flag or the
variable must hold them. When none is found, :func:`load_spec` gives empty specs: the sandboxes
still serve, without request validation (and without Klaviyo's per-endpoint rate limits, which
the specs carry); :func:`find_specs` says so in one line for a command to print at start.
Two published specs reject their own examples; ``_PATCHES`` repairs exactly those spots.
"""

from __future__ import annotations

import functools
import logging
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


ENV_VAR = "REVERSE_ETL_API_SPECS"
log = logging.getLogger("reverse_etl.sandbox")

_flag_dir: Path | None = None  # --api-specs, set by use_spec_dir()
_told: set[str] = set()  # what find_specs found, as said once to the user


class SpecsNotFound(FileNotFoundError):
    """``--api-specs`` or ``$REVERSE_ETL_API_SPECS`` names a directory without the specs."""


@dataclass(frozen=True)
class SpecLocation:
    """Where the specs were found (``path``, ``how``), or every place looked in."""

    path: Path | None
    how: str = ""
    looked: tuple[Path, ...] = ()

    def describe(self) -> str:
        """One line for a command to print when it starts."""
        if self.path is not None:
            return f"vendor API specs: {self.path} ({self.how}); requests are checked against them"
        return (
            "warning: vendor API specs not found (looked in "
            + ", ".join(str(p) for p in self.looked)
            + f"; pass --api-specs DIR or set {ENV_VAR}): the sandboxes serve WITHOUT request "
            "validation"
        )


def use_spec_dir(path: str | Path | None) -> None:
    """Take the specs from ``path`` (the ``--api-specs`` option) in this process; None: look."""
    global _flag_dir
    _flag_dir = Path(path).expanduser() if path else None
    load_spec.cache_clear()


def _missing(directory: Path) -> list[str]:
    return [f for f in SPEC_FILES.values() if not (directory / f).is_file()]


def find_specs(*, told: bool = False) -> SpecLocation:
    """The spec directory, first found of the places in this module's docstring.

    ``told``: the caller prints :meth:`SpecLocation.describe`, so :func:`load_spec` does not
    log it again. Raises :class:`SpecsNotFound` when ``--api-specs`` or the variable names a
    directory that lacks them: a path given on purpose is never silently passed over.
    """
    env = os.environ.get(ENV_VAR)
    for how, given in (("--api-specs", _flag_dir), (f"${ENV_VAR}", Path(env) if env else None)):
        if given is None:
            continue
        missing = _missing(given)
        if missing:
            raise SpecsNotFound(
                f"{how} {given}: not the vendors' API specs (no {', '.join(missing[:3])}"
                + (", ..." if len(missing) > 3 else "")
                + ")"
            )
        return SpecLocation(given.resolve(), how)
    candidates: list[tuple[str, Path]] = []
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        candidates.append(("beside the repository", checkout.parent / "shared" / "api-specs"))
    cwd = Path.cwd()
    candidates.append(("from the current directory", cwd / "shared" / "api-specs"))
    candidates.append(("from the current directory", cwd.parent / "shared" / "api-specs"))
    looked: list[Path] = []
    found = None
    for how, path in candidates:
        path = path.resolve()
        if path in looked:
            continue
        looked.append(path)
        if not _missing(path):
            found = SpecLocation(path, how)
            break
    location = found or SpecLocation(None, looked=tuple(looked))
    if told:
        _told.add(location.describe())
    return location


def spec_dir() -> Path | None:
    """The directory the specs are read from, None when there are none (see find_specs)."""
    return find_specs().path


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
        """Check one request; return its parsed JSON body (or None). Raise SpecViolation.

        Without the spec files (``spec.present`` false) only the body's JSON is checked."""
        if not self.spec.present:
            return _parse_json(body) if body else None
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
        document = _parse_json(body)
        error = self.body_validator().first_error(document)
        if error is not None:
            raise violation(400, "body", error.message, pointer=error.pointer or "/")
        return document


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise violation(
            400, "body", f"The request body is not valid JSON: {exc}", pointer="/"
        ) from exc


class Spec:
    """One vendor spec: the raw document, openapi-core's view of it, and its operations.

    ``raw=None`` is the stand-in used when the spec files are not found (``present`` false):
    every operation exists, has no parameters, media types or rate limit, and checks nothing
    but that a body is JSON.
    """

    def __init__(self, name: str, raw: dict[str, Any] | None):
        self.name = name
        self.present = raw is not None
        self.raw: dict[str, Any] = raw if raw is not None else {"paths": {}}
        self.openapi: OpenAPI | None = None
        self._params: V30RequestParametersValidator | None = None
        if raw is not None:
            # the specs are the vendors' as published: checking them is not ours to do
            no_check = Config(spec_validator_cls=None)  # type: ignore[arg-type]  # None: skip
            self.openapi = OpenAPI.from_dict(raw, config=no_check)
            self._params = V30RequestParametersValidator(self.openapi.spec, base_url=None)
        self.host_url = _server_url(self.raw)
        self._ops: dict[tuple[str, str], Operation] = {}
        self.check_parameters = functools.lru_cache(maxsize=4096)(self._check_parameters)

    def operation(self, method: str, template: str) -> Operation:
        """The operation for ``method`` on ``template``; KeyError if the spec has none."""
        key = (method.lower(), template)
        op = self._ops.get(key)
        if op is None and not self.present:
            op = self._ops[key] = Operation(spec=self, method=key[0], template=template, raw={})
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
        if self._params is None:
            return None
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
    """Load (once per process) the spec called ``name`` in :data:`SPEC_FILES`; an empty
    stand-in, with one logged warning, when the spec files are not found."""
    location = find_specs()
    if location.path is None:
        message = location.describe()
        if message not in _told:  # once a process, unless a command printed it already
            _told.add(message)
            log.warning(message.removeprefix("warning: "))
        return Spec(name, None)
    raw = orjson.loads((location.path / SPEC_FILES[name]).read_bytes())
    patch = _PATCHES.get(name)
    if patch is not None:
        patch(raw)
    return Spec(name, raw)
