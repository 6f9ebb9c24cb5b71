"""Resolving ``{{ env_var('NAME', 'default') }}`` in config values, and scrubbing secrets.

Secrets live in the environment, never in files; every resolved secret is registered so that
log lines, error files and exception texts can be scrubbed of it before they leave the process.
A destination's credentials are also checked as they are resolved: one that HTTP cannot carry
(a trailing newline, a control character) is refused there, naming the connection and the
environment variable, never the value (``check_connections``).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Literal

_ENV_VAR = re.compile(
    r"""\{\{\s*env_var\(\s*(['"])(?P<name>[^'"]+)\1\s*(?:,\s*(['"])(?P<default>.*?)\3\s*)?\)\s*\}\}"""
)
_TEMPLATE = re.compile(r"\{\{.*?\}\}")

_known_secrets: set[str] = set()
_longest_first: tuple[str, ...] = ()  # what scrub() tries, in order; kept with _known_secrets
_SECRET_KEY = re.compile(r"(key|password|secret|token|credential)", re.IGNORECASE)


class MissingEnvVar(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def render(value: str, env: Mapping[str, str] | None = None) -> str:
    """Substitute every env_var() template in ``value``; raise MissingEnvVar if one is unset."""
    env = os.environ if env is None else env

    def sub(match: re.Match[str]) -> str:
        name = match.group("name")
        if name in env:
            return env[name]
        if match.group("default") is not None:
            return match.group("default")
        raise MissingEnvVar(name)

    rendered = _ENV_VAR.sub(sub, value)
    leftover = _TEMPLATE.search(rendered)
    if leftover:
        raise ValueError(
            f"unsupported template {leftover.group(0)!r}; only "
            "{{ env_var('NAME') }} and {{ env_var('NAME', 'default') }} are understood"
        )
    return rendered


def render_tree(node: Any, env: Mapping[str, str] | None = None, path: str = "") -> Any:
    """Render templates in every string of a loaded YAML tree. Errors carry the key path."""
    if isinstance(node, dict):
        return {k: render_tree(v, env, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [render_tree(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "{{" in node:
        try:
            value = render(node, env)
        except MissingEnvVar as exc:
            raise KeyError((path, exc.name)) from None
        if _SECRET_KEY.search(path.rsplit(".", 1)[-1]):
            register_secret(value)  # before validation, so even its error messages are scrubbed
        return value
    return node


def register_secret(value: str | None) -> None:
    """Scrub ``value`` from every text that leaves the process, log records included (from
    now on, whichever handler takes them)."""
    global _longest_first
    if value and len(value) >= 4:
        _known_secrets.add(value)
        _longest_first = tuple(sorted(_known_secrets, key=len, reverse=True))
        scrub_log_records()


def register_basic_auth(username: str, password: str) -> None:
    """Register what HTTP Basic puts on the wire for ``username`` and ``password``: the base64
    of ``username:password`` (RFC 7617 section 2), which decodes to the password. An error
    answer that echoes the request's headers (a proxy's, a debugging endpoint's) would
    otherwise carry it into messages and the run record; ``password`` alone is registered only
    when it came from an ``env_var()`` template. Encoded as httpx does (UTF-8) and as Latin-1,
    the charset many clients still use."""
    register_secret(password)
    for encoding in ("utf-8", "latin-1"):
        try:
            pair = f"{username}:{password}".encode(encoding)
        except UnicodeEncodeError:
            continue
        register_secret(base64.b64encode(pair).decode("ascii"))


# The value of an Authorization (or Proxy-Authorization) header quoted in a text: an echo of
# the request in an error body, as "Authorization: Basic dXNlcjpwYXNz" or as JSON. Its token
# is scrubbed whatever it is, so a credential nobody registered (or one cut short when the
# text was, which a registered value no longer matches) never leaves either.
_AUTHORIZATION = re.compile(
    r"""(?P<head>authorization["']?\s*[:=]\s*["']?)"""
    r"""(?P<value>[^\s"',;}\]]+(?:[ \t]+[^\s"',;}\]]+)?)""",  # [scheme] credential
    re.IGNORECASE,
)
_BASIC = re.compile(r"\b(?P<head>Basic[ \t]+)(?P<value>[A-Za-z0-9+/]{8,}={0,2})")


def scrub(text: str) -> str:
    """Replace every registered secret in ``text`` with ``***``, and any quoted Authorization
    header's credential (``_AUTHORIZATION``) too."""
    for secret in _longest_first:  # a secret inside a longer one must not break its match
        if secret in text:
            text = text.replace(secret, "***")
    if "uthoriz" in text or "UTHORIZ" in text or "Basic" in text:  # the regexes, only if needed
        text = _AUTHORIZATION.sub(_masked, text)
        text = _BASIC.sub(_masked, text)
    return text


# RFC 9110 section 11.4 "credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]": the
# schemes the destinations and common proxies use; a value after any other first word is
# masked whole, as it may be a bare key
_SCHEMES = {"basic", "bearer", "digest", "token", "klaviyo-api-key", "apikey", "negotiate"}


def _masked(match: re.Match[str]) -> str:
    """The header with its credential masked: the word after a known scheme, else the whole
    value. A log template's placeholder (``%s``, ``{}``) is left for its argument, which is
    scrubbed on its own."""
    words = match.group("value").split()
    scheme = words[:1] if len(words) == 2 and words[0].lower() in _SCHEMES else []
    credential = words[len(scheme) :]
    if all(w == "***" or w[0] in "%{" for w in credential):
        return match.group(0)
    return match.group("head") + " ".join(scheme + ["***"] * len(credential))


_factory_installed = False


def scrub_log_records() -> None:
    """Make every log record scrubbed from its creation, whichever handler takes it (a
    scheduler's, Airflow's, pytest's caplog), not only the handlers the CLI installs: httpx
    and the warehouse drivers log URLs and errors that may carry a secret. Idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    make = logging.getLogRecordFactory()

    def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if not _known_secrets:
            return record
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: logging reports it at emit time
            return record
        if scrub(message) != message:
            # scrub the template and each argument, keeping the arguments' shape: formatters
            # such as uvicorn's access log unpack ``record.args`` themselves
            record.msg = scrub(str(record.msg))
            if isinstance(record.args, tuple):
                record.args = tuple(_scrub_arg(a) for a in record.args)
            elif isinstance(record.args, Mapping):
                record.args = {k: _scrub_arg(v) for k, v in record.args.items()}
            if scrub(record.getMessage()) != record.getMessage():  # a secret spanning both
                record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(scrubbed)
    _factory_installed = True


def _scrub_arg(value: Any) -> Any:
    text = str(value)
    return value if scrub(text) == text else scrub(text)


# --------------------------------------------------------------------------- credentials

#: How a credential is sent. ``token``: verbatim in a header (an API key), so printable ASCII
#: without whitespace. ``text``: encoded first (Basic auth's user name and password), so only
#: whitespace at either end and control characters are refused; spaces inside and non-ASCII
#: letters can belong to a password.
CredentialKind = Literal["token", "text"]

_credentials: dict[str, dict[str, CredentialKind]] = {}  # connection type -> key -> kind
_CHAR_NAMES = {
    "\n": "a newline",
    "\r": "a carriage return",
    "\t": "a tab",
    " ": "a space",
    "\x00": "a NUL character",
    "\ufeff": "a byte order mark (U+FEFF)",
}


def credential_fields(connection_type: str, **fields: CredentialKind) -> dict[str, CredentialKind]:
    """Declare the credential keys of a ``type: connection_type`` connection, so that
    the project loader checks them once resolved (``check_connections``)."""
    _credentials[connection_type] = dict(fields)
    return _credentials[connection_type]


def check_credential(value: str, kind: CredentialKind) -> str | None:
    """What is wrong with a credential, as "ends with a newline; remove it", or None.

    Refused rather than stripped. Stripping would silently send a credential other than the
    one configured: whitespace may belong to a password, and whatever else reads the same
    variable (another tool, a colleague's shell) keeps failing without anyone learning why.
    A control character inside cannot be stripped at all. Refused, the mistake is named at
    once, before any request, instead of surfacing as minutes of retries ("LocalProtocolError")
    or a 401 the user cannot explain. The answer names the offending character, never any
    character of the credential itself."""
    if not value:
        return None
    for end, char in (("ends", value[-1]), ("starts", value[0])):
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            return f"{end} with {_char_name(char)}; remove it"
    for char in value:
        if unicodedata.category(char) == "Cc" or (kind == "token" and char.isspace()):
            return f"contains {_char_name(char)}; remove it"
    if kind == "token" and not value.isascii():
        return (
            "contains a character that is not ASCII, which a key never has (a pasted quote, "
            "dash or invisible character?); copy it again from the vendor's settings"
        )
    return None


def refuse_bad_credentials(model: Any, fields: Mapping[str, CredentialKind]) -> None:
    """Raise ValueError naming the first of ``model``'s credential ``fields`` that
    ``check_credential`` refuses (without its value): the check of a connection built in code;
    a loaded one was already checked, with the variable named, by ``check_connections``."""
    for key, kind in fields.items():
        value: Any = getattr(model, key, None)
        if hasattr(value, "get_secret_value"):  # a SecretStr
            value = value.get_secret_value()
        problem = check_credential(value, kind) if isinstance(value, str) else None
        if problem:
            raise ValueError(f"{key} {problem}")


def check_connections(raw: Any, rendered: Any, env: Mapping[str, str] | None = None) -> None:
    """Raise ValueError if a credential declared with ``credential_fields`` of a project's
    ``connections`` (``raw`` as written, ``rendered`` with its templates filled) cannot be
    sent: the message names the connection, the key and where the value came from (an
    environment variable, a template default, the file), never the value."""
    raw_connections = raw.get("connections") if isinstance(raw, dict) else None
    done = rendered.get("connections") if isinstance(rendered, dict) else None
    if not isinstance(raw_connections, dict) or not isinstance(done, dict):
        return
    for name, conn in raw_connections.items():
        out = done.get(name)
        if not isinstance(conn, dict) or not isinstance(out, dict):
            continue
        for key, kind in _credentials.get(str(conn.get("type")), {}).items():
            value = out.get(key)
            problem = check_credential(value, kind) if isinstance(value, str) else None
            if problem:
                origin = _origin(conn.get(key), os.environ if env is None else env)
                raise ValueError(f"connection {name}: {key} ({origin}) {problem}")


def _origin(template: Any, env: Mapping[str, str]) -> str:
    """Where a rendered value came from: its env vars, a template default, or the file."""
    names = [m.group("name") for m in _ENV_VAR.finditer(str(template))]
    if not names:
        return "as written in the project file"
    unset = [n for n in names if n not in env]
    if unset:
        return f"from the default given in env_var('{unset[0]}', ...)"
    names = list(dict.fromkeys(names))
    return f"from env var{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _char_name(char: str) -> str:
    if char in _CHAR_NAMES:
        return _CHAR_NAMES[char]
    kind = "whitespace" if char.isspace() else "an invisible character"
    if unicodedata.category(char) == "Cc":
        kind = "a control character"
    return f"{kind} (U+{ord(char):04X})"
