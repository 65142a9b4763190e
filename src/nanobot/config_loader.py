"""Building frozen config dataclasses from parsed JSON: camelCase or snake_case keys,
``${ENV_VAR}`` (``${ENV_VAR:-default}``) in strings, one :class:`ConfigError` naming the key path
for a bad value, unknown keys as warnings. Fields marked :data:`SECRET` never show their value
in an error."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any

import orjson

from nanobot.errors import ConfigError

SECRET = {"secret": True}  # field metadata: the value is a secret (never in an error or repr)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(key: str) -> str:
    return _CAMEL_RE.sub("_", key).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def describe_value(value: object, secret: bool) -> str:
    """``value`` as an error shows it: its JSON, or only its kind when secret or large."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind_list: dict[type, str] = {list: "a list", dict: "an object"}
    if value is None:
        return "null"
    if secret or type(value) in kind_list:
        return kind.get(type(value)) or kind_list.get(type(value), type(value).__name__)
    return orjson.dumps(value).decode()


def _resolve_env(value: str, path: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name not in os.environ:
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV_RE.sub(sub, value)


def _convert(tp: Any, value: object, path: str, secret: bool, warnings: list[str]) -> object:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {describe_value(value, secret)}")
        return build(tp, value, path, warnings)
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected an object, got {describe_value(value, secret)}")
        return {str(k): _convert(val_tp, v, f"{path}.{k}", secret, warnings) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {describe_value(value, secret)}")
        return [_convert(item_tp, v, f"{path}[{i}]", secret, warnings) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {describe_value(value, secret)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {describe_value(value, secret)}")
        if value < 0:
            raise ConfigError(f"{path}: expected a non-negative integer, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {describe_value(value, secret)}")
        if value < 0:
            raise ConfigError(f"{path}: expected a non-negative number, got {value}")
        return float(value)
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool) and path.endswith("allowFrom]"):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {describe_value(value, secret)}")
        return _resolve_env(value, path)
    raise ConfigError(f"{path}: unsupported type")  # pragma: no cover - schema bug


def build(cls: type[Any], data: dict[str, object], prefix: str, warnings: list[str]) -> Any:
    """An instance of the dataclass ``cls`` from ``data`` (the object at key path ``prefix``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, object] = {}
    for key, value in data.items():
        name = _snake(key)
        path = f"{prefix}.{_camel(name)}" if prefix else _camel(name)
        spec = fields.get(name)
        if spec is None:
            warnings.append(f"{path}: unknown key, ignored")
            continue
        if name in kwargs:
            raise ConfigError(f"{path}: given twice (camelCase and snake_case)")
        kwargs[name] = _convert(hints[name], value, path, bool(spec.metadata.get("secret")), warnings)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # pragma: no cover - schema bug
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc
