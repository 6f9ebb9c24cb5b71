"""JSON:API pieces Klaviyo uses: error documents, ``filter`` expressions, cursor pagination.

Filters look like ``equals(email,"a@b.com")``, ``any(ids,['x','y'])`` or
``and(equals(name,"A"),greater-than(created,2024-01-01T00:00:00Z))``; values are quoted
strings, lists, numbers, booleans, ``null`` or bare datetimes.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request

from reverse_etl.sandbox.spec import SpecViolation, Violation

MEDIA_TYPE = "application/vnd.api+json"

TITLES = {
    400: ("invalid", "Invalid input."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    409: ("conflict", "Conflict."),
    413: ("request_too_large", "Request entity too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    429: ("throttled", "Request was throttled."),
    500: ("error", "A server error occurred."),
    501: ("not_implemented", "Not implemented by the sandbox."),
    503: ("service_unavailable", "Service temporarily unavailable."),
}


def error_document(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
) -> dict[str, Any]:
    default_code, title = TITLES.get(status, ("error", "Error."))
    error: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code or default_code,
        "title": title,
        "detail": detail,
    }
    if pointer is not None:
        error["source"] = {"pointer": pointer}
    elif parameter is not None:
        error["source"] = {"parameter": parameter}
    return {"errors": [error]}


# --- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    op: str
    field: str
    value: Any


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[(),\[\]])
      | (?P<word>[^\s(),\[\]'"]+)
    )""",
    re.VERBOSE,
)


def _bad_filter(detail: str) -> SpecViolation:
    return SpecViolation(
        Violation(400, "parameter", f"Invalid filter: {detail}", parameter="filter")
    )


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _bad_filter(f"unexpected text at {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.group("str") is not None:
            raw = m.group("str")[1:-1]
            out.append(("value", re.sub(r"\\(.)", r"\1", raw)))
        elif m.group("punct") is not None:
            out.append((m.group("punct"), None))
        else:
            out.append(("word", m.group("word")))
    return out


def _literal(word: str) -> Any:
    if word in ("true", "false"):
        return word == "true"
    if word == "null":
        return None
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        return word  # a bare datetime or enum word


def parse_filter(text: str) -> list[Condition]:
    """All conditions of a filter (top-level commas and ``and(...)`` both mean AND)."""
    toks = _tokens(text)
    pos = 0

    def take(kind: str) -> Any:
        nonlocal pos
        if pos >= len(toks) or toks[pos][0] != kind:
            found = toks[pos][0] if pos < len(toks) else "end"
            raise _bad_filter(f"expected {kind!r}, found {found!r}")
        pos += 1
        return toks[pos - 1][1]

    def value() -> Any:
        nonlocal pos
        token: tuple[str, Any] = toks[pos] if pos < len(toks) else ("end", None)
        kind, val = token
        if kind == "value":
            pos += 1
            return val
        if kind == "word":
            pos += 1
            return _literal(val)
        if kind == "[":
            pos += 1
            items = []
            while pos < len(toks) and toks[pos][0] != "]":
                items.append(value())
                if pos < len(toks) and toks[pos][0] == ",":
                    pos += 1
            take("]")
            return items
        raise _bad_filter(f"expected a value, found {kind!r}")

    def expression() -> list[Condition]:
        op = take("word")
        take("(")
        if op in ("and", "or", "not"):
            if op != "and":
                raise _bad_filter(f"{op}() is not supported")
            conds = expression()
            while pos < len(toks) and toks[pos][0] == ",":
                take(",")
                conds += expression()
            take(")")
            return conds
        field = take("word")
        take(",")
        val = value()
        take(")")
        return [Condition(op, field, val)]

    conds = expression()
    while pos < len(toks):
        take(",")
        conds += expression()
    return conds


def check_filter(
    conditions: Sequence[Condition],
    allowed: Mapping[str, set[str]],
    supported: Mapping[str, set[str]],
) -> None:
    """400 for what the spec does not allow; 501 for what it allows but the sandbox lacks."""
    for c in conditions:
        if c.op not in allowed.get(c.field, set()):
            raise _bad_filter(f"{c.op}({c.field},...) is not allowed here")
        if c.op not in supported.get(c.field, set()):
            raise SpecViolation(
                Violation(501, "unsupported", f"The sandbox does not filter on {c.op}({c.field})")
            )
        if c.op == "any" and not isinstance(c.value, list):
            raise _bad_filter(f"any({c.field},...) needs a list")


def matches(
    record: Mapping[str, Any], conditions: Sequence[Condition], fields: Mapping[str, str]
) -> bool:
    """Whether ``record`` passes all conditions; ``fields`` maps filter fields to record keys."""
    for c in conditions:
        actual = record.get(fields.get(c.field, c.field))
        if c.op == "equals":
            expected = c.value[0] if isinstance(c.value, list) and len(c.value) == 1 else c.value
            if c.field == "email" and isinstance(actual, str) and isinstance(expected, str):
                if actual.lower() != expected.lower():
                    return False
            elif actual != expected:
                return False
        elif c.op == "any":
            values = {
                v.lower() if c.field == "email" and isinstance(v, str) else v for v in c.value
            }
            probe = actual.lower() if c.field == "email" and isinstance(actual, str) else actual
            if probe not in values:
                return False
        elif c.op == "contains":
            if not isinstance(actual, str) or str(c.value).lower() not in actual.lower():
                return False
        elif c.op in ("greater-than", "less-than", "greater-or-equal", "less-or-equal"):
            if actual is None:
                return False
            a, b = str(actual), str(c.value)
            ok = {
                "greater-than": a > b,
                "less-than": a < b,
                "greater-or-equal": a >= b,
                "less-or-equal": a <= b,
            }
            if not ok[c.op]:
                return False
    return True


# --- pagination ------------------------------------------------------------------------------


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("offset:"):
            raise ValueError(text)
        return max(0, int(text[7:]))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise SpecViolation(
            Violation(400, "parameter", "Invalid page[cursor].", parameter="page[cursor]")
        ) from exc


def page_links(
    request: Request, next_offset: int | None, prev_offset: int | None
) -> dict[str, str]:
    """``self``/``next``/``prev`` links that keep every query parameter but the cursor."""
    base = str(request.url.replace(query="")).rstrip("?")
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "page[cursor]"]

    def link(offset: int | None) -> str:
        extra = [] if not offset else [("page[cursor]", encode_cursor(offset))]
        query = urlencode(params + extra, safe="[],()'\":@")
        return f"{base}?{query}" if query else base

    links = {"self": str(request.url)}
    if next_offset is not None:
        links["next"] = link(next_offset)
    if prev_offset is not None:
        links["prev"] = link(prev_offset)
    return links
