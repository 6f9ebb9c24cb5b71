"""Resolving ``{{ env_var('NAME', 'default') }}`` in config values, and scrubbing secrets.

Secrets live in the environment, never in files; every resolved secret is registered so that
log lines, error files and exception texts can be scrubbed of it before they leave the process.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

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


def scrub(text: str) -> str:
    """Replace every registered secret in ``text`` with ``***``."""
    for secret in _longest_first:  # a secret inside a longer one must not break its match
        if secret in text:
            text = text.replace(secret, "***")
    return text


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
