"""Fast validation of large JSON bodies against OpenAPI 3.0 schemas.

jsonschema and openapi-core both need about a second to walk a 10,000-profile Klaviyo import,
and the sandbox must take ~50,000 profiles a second. So each body schema is compiled once into
nested closures (~40 ms for such a body). They cost nothing extra while values are valid and,
on the way out of a failure, record the JSON pointer and reason of the first error, so one pass
both decides and explains. jsonschema stays the reference: it runs the schemas the compiler
does not support, and the tests check that both agree on randomly broken documents. Both read
the same converted schema and the same format checks.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from itertools import islice
from typing import Any

from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import best_match

Check = Callable[[Any], bool]

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
_SUPPORTED = frozenset(
    {
        "$ref",
        "type",
        "enum",
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "format",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "components",
    }
)


class Unsupported(Exception):
    """The schema uses a keyword the compiler does not know; use jsonschema instead."""


# --- formats: one predicate per name, shared by the compiler and jsonschema -----------------


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
    for name, (lo, hi) in INT_FORMATS.items():
        checker.checks(name)(
            lambda v, lo=lo, hi=hi: type(v) is not int or lo <= v <= hi  # noqa: E721
        )
    return checker


FORMAT_CHECKER = _format_checker()


# --- OpenAPI 3.0 -> JSON Schema draft 4 ------------------------------------------------------


def oas_to_jsonschema(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable`` as JSON Schema and drop annotation keywords.

    ``{"$ref": X, "nullable": true}`` (OpenAPI ignores siblings of ``$ref``, but vendors mean
    "X or null", and clients send null there) becomes ``anyOf: [X, null]``.
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


# --- the compiler ----------------------------------------------------------------------------
#
# Each compiled check returns a bool and costs nothing extra while values are valid. On the
# way out of a failure it leaves a trace in a per-thread ``_Failure``: the innermost check sets
# the message, and every enclosing object or array check prepends its key or index. So the
# pointer and reason of the first error come from the same single pass.

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}
_NULL_ONLY = {"type": "null"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_equal(a: Any, b: Any) -> bool:
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class _Failure(threading.local):
    """Where and why the current validation failed (path built innermost first)."""

    def __init__(self) -> None:
        self.path: list[str | int] = []
        self.message: str | None = None

    def reset(self) -> None:
        self.path = []
        self.message = None

    def fail(self, message: str) -> bool:
        if self.message is None:
            self.message = message
        return False

    def save(self) -> tuple[int, str | None]:
        return len(self.path), self.message

    def restore(self, mark: tuple[int, str | None]) -> None:
        del self.path[mark[0] :]
        self.message = mark[1]


def _any(_: Any) -> bool:
    return True


class _Compiler:
    def __init__(self, root: Mapping[str, Any], failure: _Failure):
        self.root = root
        self.f = failure
        self.refs: dict[str, Check] = {}

    def ref(self, ref: str) -> Check:
        if ref in self.refs:
            return self.refs[ref]
        if not ref.startswith("#/"):
            raise Unsupported(f"remote $ref {ref}")
        cell: list[Check] = []

        def trampoline(v: Any) -> bool:  # only reached by recursive schemas
            return cell[0](v)

        self.refs[ref] = trampoline
        target: Any = self.root
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        fn = self.compile(target)
        cell.append(fn)
        self.refs[ref] = fn
        return fn

    def compile(self, s: Any) -> Check:
        f = self.f
        if s is True or s == {}:
            return _any
        if s is False:
            return lambda v: f.fail(f"{_short(v)} is not allowed here")
        if not isinstance(s, dict):
            raise Unsupported(f"schema {s!r}")
        unknown = set(s) - _SUPPORTED
        if unknown:
            raise Unsupported(f"keywords {sorted(unknown)}")
        if "$ref" in s:  # draft 4: siblings of $ref are ignored
            return self.ref(s["$ref"])

        allowed: tuple[type, ...] | None = None
        type_names = ""
        if "type" in s:
            names = s["type"] if isinstance(s["type"], list) else [s["type"]]
            allowed = tuple(t for n in names for t in _PY_TYPES[n])
            type_names = ", ".join(repr(n) for n in names)
        obj = self._object(s)
        arr = self._array(s)
        text = self._string(s)
        num = self._number(s)
        enum = self._enum(s.get("enum"))
        subs = self._combinators(s)

        # Short cuts for the shapes that make up most of a body: plain leaves and objects.
        if arr is None and text is None and num is None and enum is None and not subs:
            if obj is None:
                if allowed is None:
                    return _any
                return lambda v: (
                    type(v) in allowed or f.fail(f"{_short(v)} is not of type {type_names}")
                )
            if allowed == (dict,):
                return lambda v: (
                    obj(v) if type(v) is dict else f.fail(f"{_short(v)} is not of type 'object'")
                )

        def check(v: Any) -> bool:
            t = type(v)
            if allowed is not None and t not in allowed:
                return f.fail(f"{_short(v)} is not of type {type_names}")
            if t is dict:
                if obj is not None and not obj(v):
                    return False
            elif t is list:
                if arr is not None and not arr(v):
                    return False
            elif t is str:
                if text is not None and not text(v):
                    return False
            elif (t is int or t is float) and num is not None and not num(v):
                return False
            if enum is not None and not enum(v):
                return False
            for sub in subs:  # noqa: SIM110 - a plain loop is faster than all() on the hot path
                if not sub(v):
                    return False
            return True

        return check

    def _object(self, s: Mapping[str, Any]) -> Check | None:
        f = self.f
        props = {k: self.compile(v) for k, v in s.get("properties", {}).items()}
        required = tuple(s.get("required", ()))
        addl_schema = s.get("additionalProperties", True)
        closed = addl_schema is False
        addl: Check | None = None if addl_schema in (True, False) else self.compile(addl_schema)
        lo, hi = s.get("minProperties", 0), s.get("maxProperties")
        if not props and not required and addl is None and not closed and not lo and hi is None:
            return None
        if addl is None and not closed and not lo and hi is None:
            return self._open_object(props, required)

        def check(v: dict) -> bool:
            for key in required:
                if key not in v:
                    return f.fail(f"{key!r} is a required property")
            if len(v) < lo or (hi is not None and len(v) > hi):
                return f.fail(f"object has {len(v)} properties, allowed {lo}..{hi}")
            for key, value in v.items():
                c = props.get(key)
                if c is None:
                    if closed:
                        return f.fail(
                            f"Additional properties are not allowed ({key!r} was unexpected)"
                        )
                    c = addl
                    if c is None:
                        continue
                if not c(value):
                    f.path.append(key)
                    return False
            return True

        return check

    def _open_object(self, props: dict[str, Check], required: tuple[str, ...]) -> Check:
        """An object that allows any other key: only its own properties need looking at."""
        f = self.f
        items = tuple(props.items())
        missing = object()

        def check(v: dict) -> bool:
            for key in required:
                if key not in v:
                    return f.fail(f"{key!r} is a required property")
            for key, c in items:
                value = v.get(key, missing)
                if value is not missing and not c(value):
                    f.path.append(key)
                    return False
            return True

        return check

    def _array(self, s: Mapping[str, Any]) -> Check | None:
        f = self.f
        items = s.get("items")
        if isinstance(items, list):
            raise Unsupported("tuple items")
        each = None if items is None else self.compile(items)
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if each is None and not lo and hi is None:
            return None

        def check(v: list) -> bool:
            if len(v) < lo:
                return f.fail(f"array has {len(v)} items, fewer than the minimum of {lo}")
            if hi is not None and len(v) > hi:
                return f.fail(f"array has {len(v)} items, more than the maximum of {hi}")
            if each is not None:
                for i, x in enumerate(v):
                    if not each(x):
                        f.path.append(i)
                        return False
            return True

        return check

    def _string(self, s: Mapping[str, Any]) -> Check | None:
        f = self.f
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        pattern = s.get("pattern")
        rx = re.compile(pattern) if pattern is not None else None
        fmt_name = s.get("format", "")
        fmt = STRING_FORMATS.get(fmt_name)
        if not lo and hi is None and rx is None and fmt is None:
            return None

        def check(v: str) -> bool:
            if lo and len(v) < lo:
                return f.fail(f"{_short(v)} is too short (minimum length {lo})")
            if hi is not None and len(v) > hi:
                return f.fail(f"{_short(v)} is too long (maximum length {hi})")
            if rx is not None and rx.search(v) is None:
                return f.fail(f"{_short(v)} does not match {pattern!r}")
            if fmt is not None and not fmt(v):
                return f.fail(f"{_short(v)} is not a {fmt_name!r}")
            return True

        return check

    def _number(self, s: Mapping[str, Any]) -> Check | None:
        f = self.f
        lo, hi = s.get("minimum"), s.get("maximum")
        ex_lo, ex_hi = s.get("exclusiveMinimum", False), s.get("exclusiveMaximum", False)
        if not isinstance(ex_lo, bool) or not isinstance(ex_hi, bool):
            raise Unsupported("numeric exclusiveMinimum/Maximum (draft 6 style)")
        bounds = INT_FORMATS.get(s.get("format", ""))
        if lo is None and hi is None and bounds is None:
            return None

        def check(v: float) -> bool:
            if lo is not None and (v <= lo if ex_lo else v < lo):
                return f.fail(f"{v} is less than the minimum of {lo}")
            if hi is not None and (v >= hi if ex_hi else v > hi):
                return f.fail(f"{v} is greater than the maximum of {hi}")
            if bounds is not None and type(v) is int and not bounds[0] <= v <= bounds[1]:
                return f.fail(f"{v} is out of range for {s.get('format')}")
            return True

        return check

    def _enum(self, values: list[Any] | None) -> Check | None:
        f = self.f
        if values is None:
            return None
        message = f"is not one of {_short(values)}"
        if all(type(x) is str or x is None for x in values):
            strings = frozenset(x for x in values if x is not None)
            nullable = None in values

            def check_str(v: Any) -> bool:
                if (v is None and nullable) or (type(v) is str and v in strings):
                    return True
                return f.fail(f"{_short(v)} {message}")

            return check_str

        def check(v: Any) -> bool:
            return any(_json_equal(v, x) for x in values) or f.fail(f"{_short(v)} {message}")

        return check

    def _combinators(self, s: Mapping[str, Any]) -> list[Check]:
        subs: list[Check] = []
        if "allOf" in s:
            parts = [self.compile(x) for x in s["allOf"]]
            if len(parts) == 1:
                subs.append(parts[0])
            else:

                def check_all(v: Any) -> bool:
                    for part in parts:  # noqa: SIM110 - faster than all() on the hot path
                        if not part(v):
                            return False
                    return True

                subs.append(check_all)
        if "anyOf" in s:
            subs.append(self._alternatives(s["anyOf"], exactly_one=False))
        if "oneOf" in s:
            subs.append(self._alternatives(s["oneOf"], exactly_one=True))
        if "not" in s:
            neg = self.compile(s["not"])

            def check_not(v: Any) -> bool:
                mark = self.f.save()
                matched = neg(v)
                self.f.restore(mark)
                return not matched or self.f.fail(f"{_short(v)} must not match {s['not']}")

            subs.append(check_not)
        return subs

    def _alternatives(self, schemas: list[Any], *, exactly_one: bool) -> Check:
        f = self.f
        nullable = any(x == _NULL_ONLY for x in schemas)
        rest = [self.compile(x) for x in schemas if x != _NULL_ONLY]
        if nullable and len(rest) == 1:  # the common "X or null": X's own error is the best
            only = rest[0]
            return lambda v: v is None or only(v)

        def check(v: Any) -> bool:
            if v is None and nullable:
                return True
            mark = f.save()
            passed = 0
            deepest: tuple[list[str | int], str | None] | None = None
            for alt in rest:
                if alt(v):
                    passed += 1
                    if not exactly_one:
                        break
                elif deepest is None or len(f.path) > mark[0] + len(deepest[0]):
                    deepest = (f.path[mark[0] :], f.message)
                f.restore(mark)
            f.restore(mark)
            if passed == 1 or (passed > 1 and not exactly_one):
                return True
            if passed > 1:
                return f.fail(f"{_short(v)} is valid under more than one of the given schemas")
            if deepest is not None and deepest[0]:
                f.path.extend(deepest[0])
                return f.fail(deepest[1] or "invalid")
            return f.fail(f"{_short(v)} is not valid under any of the given schemas")

        return check


# --- public API ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaError:
    """The first reason a document does not match: where (JSON pointer) and why."""

    pointer: str
    message: str


class BodyValidator:
    """Checks JSON documents against one schema inside an OpenAPI 3.0 document."""

    def __init__(self, schema: Mapping[str, Any], components: Mapping[str, Any]):
        root = {"allOf": [oas_to_jsonschema(schema)], "components": _convert_components(components)}
        self._failure = _Failure()
        self._fast: Check | None
        try:
            self._fast = _Compiler(root, self._failure).compile({"allOf": root["allOf"]})
        except Unsupported:
            self._fast = None
        self._slow = Draft4Validator(root, format_checker=FORMAT_CHECKER)

    def first_error(self, document: Any) -> SchemaError | None:
        """None when ``document`` is valid, else the first error found and where it is."""
        if self._fast is None:
            error = best_match(islice(self._slow.iter_errors(document), 1))
            if error is None:
                return None
            return SchemaError(_pointer(error.absolute_path), error.message)
        failure = self._failure
        failure.reset()
        if self._fast(document):
            return None
        return SchemaError(_pointer(reversed(failure.path)), failure.message or "invalid")

    def slow_is_valid(self, document: Any) -> bool:
        """jsonschema's verdict, for tests that check the compiled validator agrees."""
        return self._slow.is_valid(document)


def _pointer(parts: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
