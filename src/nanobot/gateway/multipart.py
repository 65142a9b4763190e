"""Read a ``multipart/form-data`` chat request incrementally, never buffering a part past its limit.

Fields: ``message`` (the user's text), ``files`` (repeatable; also ``file`` and ``files[]``),
``session_id``, ``model``, ``stream`` ("true"/"false"), ``system`` (optional extra instructions).

A malformed body is the client's mistake: every parser failure becomes a 400 naming it, and no
text taken from the body reaches an error message undecodable (a lone surrogate would make the
JSON error body itself fail).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from aiohttp import BadContentDispositionHeader, BadContentDispositionParam, BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from nanobot.errors import PayloadTooLargeError, RequestError
from nanobot.gateway.requests import FileInput

# aiohttp warns about each malformed Content-Disposition it sees (in ``reader.next``); we
# answer those with a 400 ourselves. Left on, each distinct header a client sends is printed to
# stderr and kept in the warnings registry: log noise and memory that hostile input controls.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)

_FIELD_LIMIT = 1024 * 1024  # text fields (the message itself included)
_CHUNK = 256 * 1024
_TEXT_FIELDS = frozenset({"message", "session_id", "model", "stream", "system", "include_tool_events"})
_FILE_FIELDS = frozenset({"files", "file", "files[]"})
# How aiohttp's parser fails on a malformed body: ValueError (boundaries, lengths),
# HttpProcessingError (a bad header line in a part, too many or too long headers), RuntimeError
# (a bad ``_charset_`` part), AssertionError (not multipart at all).
_MALFORMED = (ValueError, HttpProcessingError, RuntimeError, AssertionError)
# One ``; key=value`` parameter of Content-Disposition, on the raw header bytes: a quoted string
# (with backslash escapes) or anything up to the next ``;``.
_PARAM = re.compile(rb';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.S)
_ESCAPED = re.compile(rb'\\([\\"])')  # only \\ and \": a Windows path keeps its separators


def printable(text: str) -> str:
    """``text`` safe to put in a JSON error: undecodable bytes (lone surrogates) as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lenient(raw: bytes) -> str:
    """Header bytes as text: UTF-8 when they are, else Latin-1 (every byte is a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _plain_value(raw: bytes) -> str:
    raw = raw.strip()
    if raw[:1] == b'"':  # a quoted string; an unterminated one is taken as it stands
        raw = _ESCAPED.sub(rb"\1", raw[1:-1] if len(raw) > 1 and raw.endswith(b'"') else raw[1:])
    return _lenient(raw)


def _extended_value(raw: bytes) -> str | None:
    """An RFC 5987 ``charset'language'percent-encoded`` value, or None when it is not one."""
    pieces = raw.strip().split(b"'", 2)
    if len(pieces) != 3:
        return None
    data = unquote_to_bytes(pieces[2])
    try:
        return data.decode(pieces[0].decode("ascii") or "utf-8")
    except (LookupError, UnicodeDecodeError):  # an unknown charset, or bytes not in it
        return _lenient(data)


def disposition(header: str | None) -> tuple[str | None, str | None]:
    """The ``name`` and ``filename`` of a part's Content-Disposition, decoded leniently.

    A file name is only a label, so a Latin-1 or otherwise non-UTF-8 name must not fail an
    upload: ``filename*`` (RFC 7578/5987) wins, then the raw bytes as UTF-8, else as Latin-1.
    """
    if not header:
        return None, None
    params: dict[bytes, bytes] = {}
    # aiohttp decoded the header as UTF-8 with surrogateescape: this gives back its bytes.
    for match in _PARAM.finditer(header.encode("utf-8", "surrogateescape")):
        params.setdefault(match[1].lower(), match[2])
    name = params.get(b"name")
    extended = params.get(b"filename*")
    filename = _extended_value(extended) if extended is not None else None
    if filename is None and b"filename" in params:
        filename = _plain_value(params[b"filename"])
    return (None if name is None else _plain_value(name)), filename


@dataclass(frozen=True, slots=True)
class MultipartForm:
    """The fields of a multipart chat request."""

    fields: dict[str, str]
    files: tuple[FileInput, ...]


class _Budget:
    """The running byte count of the whole request."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise PayloadTooLargeError(
                f"the request is larger than the limit of {self.limit} bytes (api.maxRequestBytes)"
            )


def _malformed(exc: Exception) -> RequestError:
    detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    return RequestError(f"malformed multipart body: {printable(detail)}")


async def _read_part(part: BodyPartReader, limit: int, budget: _Budget, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await part.read_chunk(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        budget.take(len(chunk))
        if size > limit:
            raise PayloadTooLargeError(f"{what} is larger than the limit of {limit} bytes", param="files")
        chunks.append(chunk)


async def read_multipart(
    request: web.Request, *, max_file_bytes: int, max_files: int, max_request_bytes: int
) -> MultipartForm:
    """Parse the form; 413 for a file or body over its limit, 400 for too many files or bad fields."""
    try:
        reader = await request.multipart()
    except _MALFORMED as exc:
        raise _malformed(exc) from exc
    budget = _Budget(max_request_bytes)
    fields: dict[str, str] = {}
    files: list[FileInput] = []
    parts_seen = 0
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise RequestError("nested multipart bodies are not supported")
            parts_seen += 1
            if parts_seen > max_files + len(_TEXT_FIELDS):
                raise RequestError(f"too many form parts (at most {max_files} files)", param="files")
            name, filename = disposition(part.headers.get("Content-Disposition"))
            if name is None:
                raise RequestError(f"form part #{parts_seen} has no name in its Content-Disposition")
            if name in _FILE_FIELDS:
                if len(files) >= max_files:
                    raise RequestError(f"too many files: at most {max_files} per request", param="files")
                label = f"file {filename!r}" if filename else f"file #{len(files) + 1}"
                data = await _read_part(part, max_file_bytes, budget, label)
                files.append(FileInput(filename, data, f"files[{len(files)}]"))
            elif name in _TEXT_FIELDS:
                raw = await _read_part(part, _FIELD_LIMIT, budget, f"field {name!r}")
                try:
                    fields[name] = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RequestError(f"field {name!r} is not valid UTF-8", param=name) from exc
            else:
                raise RequestError(
                    f"unknown form field {name!r}; expected message, files, session_id, model, stream, "
                    "system, include_tool_events",
                    param=name,
                )
    except _MALFORMED as exc:  # aiohttp's parser on a malformed body
        raise _malformed(exc) from exc
    return MultipartForm(fields, tuple(files))


def form_stream(value: str | None, name: str = "stream") -> bool:
    """A yes/no field (``stream``, ``include_tool_events``): "true"/"false" (also 1/0, yes/no)."""
    if value is None or value.strip().lower() in ("", "false", "0", "no"):
        return False
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    raise RequestError(f"{name} must be 'true' or 'false'", param=name)
