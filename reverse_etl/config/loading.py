"""Reading the project file: render ``env_var`` templates, validate, and turn every failure
into a ConfigError whose message names the file, the key path, the bad value and what would be
valid (with a did-you-mean). Secrets are registered for scrubbing as soon as they are read.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from reverse_etl.config.models import (
    CONNECTION_MODELS,
    DEFAULT_CONFIG,
    DESTINATION_TYPES,
    ConsentColumn,
    ConsentSpec,
    FieldMapping,
    NotUtf8Error,
    Project,
    SnapshotSpec,
    SourceSpec,
    StateSpec,
    Sync,
    _RefError,
    read_text_file,
)
from reverse_etl.destinations.registry import UnsupportedObject, destination_for
from reverse_etl.errors import ConfigError
from reverse_etl.secrets import check_connections, register_secret, render_tree, scrub


def load_project(
    file: str | Path | None = None,
    root: str | Path | None = None,
    env: dict[str, str] | None = None,
    *,
    defer_secrets: bool = False,
) -> Project:
    """Read, render and validate the project file; every failure is a ConfigError.

    ``defer_secrets``: an env var that a destination connection's key names but the
    environment lacks is not an error yet: the key is left empty and the variable recorded
    (``Project.missing_env``), so commands that never call the API (status, check, plan, ...)
    work without the secret; ``require_env`` raises it for those that do."""
    root = Path(root) if root else Path.cwd()
    file = Path(file) if file else root / DEFAULT_CONFIG
    try:
        raw = load_yaml(read_text_file(file))
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: file not found; pass --config or create profiles/profiles.yml "
            "(see README.md, 'Configuration')"
        ) from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"{file}: cannot read it: {exc.strerror or exc}") from None
    except (NotUtf8Error, DuplicateKeyError) as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{file}: the top level must be a mapping with `connections:` and `syncs:`"
        )
    missing: dict[str, list[tuple[str, str]]] = {}
    try:
        if defer_secrets:
            raw, missing = _defer_destination_env(raw, env)
        rendered = render_tree(raw, env)
        check_connections(raw, rendered, env)  # a key HTTP cannot carry: said before any call
    except KeyError as exc:
        raise ConfigError(_missing_env_message(file, *exc.args[0])) from None
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    try:
        project = Project.model_validate({**rendered, "root": root, "file": file})
    except ValidationError as exc:
        for path, name in _deferred_in(exc, missing):  # an emptied key cannot be valid
            raise ConfigError(_missing_env_message(file, path, name)) from None
        raise ConfigError(scrub(format_validation_error(file, exc, rendered))) from None
    project._missing_env = missing
    for conn in project.connections.values():
        for value in conn.__dict__.values():
            if isinstance(value, SecretStr):
                register_secret(value.get_secret_value())
    _check_destination_options(project)
    return project


_MERGE_TAG = "tag:yaml.org,2002:merge"  # a `<<: *base` key
_VALUE_TAG = "tag:yaml.org,2002:value"  # a `=` key, read as the string "="


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping: PyYAML alone keeps the last one, silently."""


class _ProjectLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Called on every mapping before its keys are read, and on each mapping merged into
        # another (``<<: *base``) before the merge changes it: so each is checked as written.
        # A key a merge brings in may be given again (that is what a merge is for).
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._check_duplicates(node)
        super().flatten_mapping(node)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a mapping or list as a key: the constructor refuses it
            # as the constructor reads it: "a", 'a' and a are one key, as are 1 and 0x1
            key = key_node.value if key_node.tag == _VALUE_TAG else self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key not in lines:
                lines[key] = line
                continue
            where = (
                f"both on line {line}" if lines[key] == line else f"lines {lines[key]} and {line}"
            )
            raise DuplicateKeyError(
                f"line {line}: key {key!r} appears twice in one mapping ({where}); YAML would "
                "silently keep only the last one: remove one of them"
            )


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, but a key given twice in one mapping is a ``DuplicateKeyError``."""
    loader = _ProjectLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def require_env(project: Project, connections: Iterable[str]) -> None:
    """Raise, naming each variable, if the connections' keys need env vars the environment
    lacked when the project was loaded with ``defer_secrets``: before any API call."""
    missing = [m for name in dict.fromkeys(connections) for m in project.missing_env(name)]
    if missing:
        raise ConfigError(
            "\n".join(_missing_env_message(project.file, path, name) for path, name in missing)
        )


def _missing_env_message(file: Path, path: str, name: str) -> str:
    return (
        f"{file}: {path}: environment variable {name!r} is not set; export it, or give a "
        f"default: {{{{ env_var('{name}', 'value') }}}}"
    )


def _defer_destination_env(
    raw: dict[str, Any], env: dict[str, str] | None
) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]]]:
    """``raw`` with each destination connection key whose env var is unset emptied, and
    connection name -> [(key path, variable)] of those keys. Destination keys only: a
    warehouse, the state store or the error folder are needed by every command."""
    connections = raw.get("connections")
    if not isinstance(connections, dict):
        return raw, {}
    missing: dict[str, list[tuple[str, str]]] = {}
    out: dict[str, Any] = {}
    for name, conn in connections.items():
        if not isinstance(conn, dict) or conn.get("type") not in DESTINATION_TYPES:
            out[name] = conn
            continue
        kept = dict(conn)
        for key, value in conn.items():
            if not isinstance(value, str) or "{{" not in value:
                continue
            try:
                render_tree(value, env, f"connections.{name}.{key}")
            except KeyError as exc:
                missing.setdefault(str(name), []).append(exc.args[0])
                kept[key] = ""
            except ValueError:
                pass  # an unsupported template: the full render below says so
        out[name] = kept
    return {**raw, "connections": out}, missing


def _deferred_in(
    exc: ValidationError, missing: dict[str, list[tuple[str, str]]]
) -> list[tuple[str, str]]:
    """The deferred (key path, variable) pairs whose emptied key failed validation."""
    failed = {_loc_path(err["loc"]) for err in exc.errors()}
    return [m for found in missing.values() for m in found if m[0] in failed]


def _check_destination_options(project: Project) -> None:
    for i, sync in enumerate(project.syncs):
        conn = project.connections[sync.destination.connection]
        try:
            problems = destination_for(conn.type, sync.object).check_sync(sync)
        except UnsupportedObject as exc:
            problems = [str(exc)]
        if problems:
            raise ConfigError(
                "\n".join(f"{project.file}: syncs[{i}] ({sync.name}): {p}" for p in problems)
            )


_MODELS_BY_KEY: dict[str, type[BaseModel]] = {
    "source": SourceSpec,
    "consent": ConsentSpec,
    "state": StateSpec,
    "snapshot": SnapshotSpec,
    "email": ConsentColumn,
    "sms": ConsentColumn,
}
_TYPE_TAGS = set(CONNECTION_MODELS)


def format_validation_error(file: Path, exc: ValidationError, data: Any) -> str:
    lines = [f"{file}: {exc.error_count()} problem(s):"]
    seen: set[str] = set()
    for err in exc.errors():
        loc = _loc_path(err["loc"])
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RefError):
            lines.append(f"  {ctx_error.loc}: {ctx_error}")
            continue
        kind = err["type"]
        value = err.get("input")
        if _mapping_branch(err["loc"]) == "str" and isinstance(value, dict):
            continue  # the long form was meant; its own errors say what is wrong
        if kind == "extra_forbidden":
            key = err["loc"][-1]
            valid = _valid_keys(err["loc"])
            hint = difflib.get_close_matches(str(key), valid, n=1)
            line = (
                f"  {loc}: unknown key {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + (f" Valid keys: {', '.join(valid)}" if valid else "")
            )
        else:
            # Only scalars are echoed: a whole mapping may hold a secret.
            hidden = kind == "missing" or isinstance(value, dict | list)
            shown = "" if hidden else f" (got {_short(value)})"
            line = f"  {loc}: {err['msg'].removeprefix('Value error, ')}{shown}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def _mapping_branch(loc: tuple[Any, ...]) -> str | None:
    """Mapping values are ``str | FieldMapping``: pydantic names the branch after the column."""
    for i in range(2, len(loc) - 1):
        if loc[i - 1] == "mapping" and loc[0] == "syncs":
            branch = loc[i + 1]
            return "str" if str(branch).startswith("str") else str(branch)
    return None


def _loc_path(loc: tuple[Any, ...]) -> str:
    """The key path as the user wrote it, without pydantic's union-branch tags."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        conn_tag = i == 2 and loc[0] == "connections" and part in _TYPE_TAGS
        mapping_tag = (
            i >= 4 and loc[i - 2] == "mapping" and str(part).startswith(("str", "FieldMapping"))
        )
        if conn_tag or mapping_tag or str(part).startswith("function-"):
            continue
        out += f".{part}" if out else str(part)
    return out or "(top level)"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    model: type[BaseModel] = Project
    if parents and parents[0] == "syncs":
        model = Sync
    if parents and parents[0] in ("state", "snapshot"):
        model = _MODELS_BY_KEY[parents[0]]
    if parents and parents[0] == "connections":
        tag = loc[2] if len(loc) > 3 and loc[2] in _TYPE_TAGS else None
        model = CONNECTION_MODELS.get(tag or "", Project)
    elif "mapping" in parents:
        model = FieldMapping
    else:
        for part in parents[1:]:
            if part in _MODELS_BY_KEY:
                model = _MODELS_BY_KEY[part]
    return sorted(
        (f.alias or name) for name, f in model.model_fields.items() if name not in {"root", "file"}
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
