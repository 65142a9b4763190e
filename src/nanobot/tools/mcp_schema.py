"""How an MCP server's tools look to the model: their names, descriptions and argument schemas.

Providers are stricter than MCP: a function name is ``[A-Za-z0-9_-]{1,64}``, and several
reject a parameters schema that is not an object with ``properties``, or one that uses
``$ref``/``$defs`` or ``$schema``. Servers send all of these, so each tool is normalised
once, when its server lists it, never per request.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

NAME_LIMIT = 64  # OpenAI's limit for a function name; others allow the same or more
DESCRIPTION_LIMIT = 1024  # of a tool's description: it is sent with every model call
SCHEMA_LIMIT = 64 * 1024  # bytes of one tool's schema (JSON); past it the tool takes any object
_REF_DEPTH = 8  # nested $ref resolutions; deeper (or cyclic) refs become "any value"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_DROPPED = ("$schema", "$id", "$comment", "$defs", "definitions")


@dataclass(frozen=True, slots=True)
class Listed:
    """One tool as its server listed it, already normalised for the model."""

    remote: str
    description: str
    parameters: dict[str, Any]


def tool_names(server: str, tools: Iterable[str], taken: set[str]) -> list[str]:
    """The model-facing name of each of ``server``'s ``tools``, avoiding (and adding to) ``taken``.

    ``mcp_<server>_<tool>`` with every other character replaced by ``_``; a name that is too
    long or already taken ends in a short hash of the original names instead, so it stays
    stable across restarts and unique across servers.
    """
    names = []
    for tool in tools:
        name = _UNSAFE.sub("_", f"mcp_{server}_{tool}")
        salt = 0
        while len(name) > NAME_LIMIT or name in taken:
            digest = hashlib.sha1(f"{server}\0{tool}\0{salt}".encode()).hexdigest()[:8]
            name = f"{_UNSAFE.sub('_', f'mcp_{server}_{tool}')[: NAME_LIMIT - 9]}_{digest}"
            salt += 1
        taken.add(name)
        names.append(name)
    return names


def describe(description: str | None, server: str, tool: str) -> str:
    """The tool's description for the model, bounded; a server without one gets a plain default."""
    text = (description or "").strip() or f"The {tool} tool of the {server} MCP server."
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def normalize_schema(schema: object) -> dict[str, Any]:
    """``schema`` as providers accept it: an object schema with ``properties``, refs inlined,
    no ``$schema``/``$defs``; an unusable or oversized one becomes "any object"."""
    if not isinstance(schema, Mapping):
        return {"type": "object", "properties": {}}
    defs = {**_defs(schema, "definitions"), **_defs(schema, "$defs")}
    out = _inline(schema, defs, 0)
    if not isinstance(out, dict):  # pragma: no cover - a mapping stays a mapping
        out = {}
    for key in _DROPPED:
        out.pop(key, None)
    if out.get("type") != "object":
        out = {"type": "object", "properties": {}}
    if not isinstance(out.get("properties"), dict):
        out["properties"] = {}
    required = out.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        del out["required"]
    if len(orjson.dumps(out)) > SCHEMA_LIMIT:
        return {"type": "object", "properties": {}, "additionalProperties": True}
    return out


def _defs(schema: Mapping[str, Any], key: str) -> dict[str, Any]:
    found = schema.get(key)
    return dict(found) if isinstance(found, Mapping) else {}


def _inline(node: object, defs: Mapping[str, Any], depth: int) -> object:
    """``node`` with local ``#/$defs/X`` (and ``#/definitions/X``) refs replaced by their target."""
    if isinstance(node, list):
        return [_inline(item, defs, depth) for item in node]
    if not isinstance(node, Mapping):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = _target(ref, defs)
        if target is None or depth >= _REF_DEPTH:
            resolved: dict[str, Any] = {}  # unknown, remote or too deep: any value
        else:
            inlined = _inline(target, defs, depth + 1)
            resolved = dict(inlined) if isinstance(inlined, dict) else {}
        siblings = {k: _inline(v, defs, depth) for k, v in node.items() if k != "$ref" and k not in _DROPPED}
        return {**resolved, **siblings}
    return {k: _inline(v, defs, depth) for k, v in node.items() if k not in ("$defs", "definitions")}


def _target(ref: str, defs: Mapping[str, Any]) -> object | None:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            return defs.get(ref[len(prefix) :].replace("~1", "/").replace("~0", "~"))
    return None
