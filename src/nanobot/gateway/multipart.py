"""Read a ``multipart/form-data`` chat request incrementally, never buffering a part past its limit.

Fields: ``message`` (the user's text), ``files`` (repeatable), ``session_id``, ``model``,
``stream`` ("true"/"false"), ``system`` (optional extra instructions).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from nanobot.errors import PayloadTooLargeError, RequestError
from nanobot.gateway.requests import FileInput

_FIELD_LIMIT = 1024 * 1024  # text fields (the message itself included)
_CHUNK = 256 * 1024
_TEXT_FIELDS = frozenset({"message", "session_id", "model", "stream", "system"})


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
    except (ValueError, AssertionError) as exc:
        raise RequestError(f"malformed multipart body: {exc}") from exc
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
            name = part.name or ""
            if name in ("files", "file", "files[]"):
                if len(files) >= max_files:
                    raise RequestError(f"too many files: at most {max_files} per request", param="files")
                label = f"file {part.filename!r}" if part.filename else f"file #{len(files) + 1}"
                data = await _read_part(part, max_file_bytes, budget, label)
                files.append(FileInput(part.filename, data, f"files[{len(files)}]"))
            elif name in _TEXT_FIELDS:
                raw = await _read_part(part, _FIELD_LIMIT, budget, f"field {name!r}")
                try:
                    fields[name] = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RequestError(f"field {name!r} is not valid UTF-8", param=name) from exc
            else:
                raise RequestError(
                    f"unknown form field {name!r}; expected message, files, session_id, model, stream",
                    param=name,
                )
    except ValueError as exc:  # aiohttp's parser on a malformed body
        raise RequestError(f"malformed multipart body: {exc}") from exc
    return MultipartForm(fields, tuple(files))


def form_stream(value: str | None) -> bool:
    """The ``stream`` field: "true"/"false" (also 1/0, yes/no)."""
    if value is None or value.strip().lower() in ("", "false", "0", "no"):
        return False
    if value.strip().lower() in ("true", "1", "yes"):
        return True
    raise RequestError("stream must be 'true' or 'false'", param="stream")
