"""Workspace files: ``read_file``, ``write_file``, ``edit_file``, ``list_dir`` inside ``<workspace>/files``.

Confinement: a path is resolved (``..``, symlinks) and refused unless its real path is inside
the files folder; then it is opened component by component from the folder with
``O_NOFOLLOW``, so a symlink swapped in after the check (by ``exec``, say) makes the open fail
instead of leading outside. All file work runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanobot.tools.base import Tool, ToolContext, ToolResult
from nanobot.tools_config import FilesToolConfig

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """The path is not one these tools may touch, or the operation failed; the text says why."""


class FilesRoot:
    """The folder the file tools are confined to (created on first use)."""

    def __init__(self, root: Path, config: FilesToolConfig) -> None:
        self.root = root
        self.config = config

    def _real_root(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        return os.path.realpath(self.root)

    def parts(self, path: str) -> tuple[str, ...]:
        """``path``'s components relative to the real root, after resolving ``..`` and symlinks."""
        if not isinstance(path, str) or "\x00" in path:
            raise Refused("path must be a string without NUL characters")
        root = self._real_root()
        given = path.strip() or "."
        candidate = given if os.path.isabs(given) else os.path.join(root, given)
        real = os.path.realpath(candidate)
        if real != root and not real.startswith(root + os.sep):
            raise Refused(f"{path!r} is outside the workspace files folder; use a path relative to it")
        rel = os.path.relpath(real, root)
        return () if rel == "." else tuple(rel.split(os.sep))

    @contextlib.contextmanager
    def directory(self, parts: tuple[str, ...], create: bool = False) -> Iterator[int]:
        """A file descriptor of the directory ``parts`` (walked with O_NOFOLLOW), made if ``create``."""
        fd = os.open(self._real_root(), _DIR_FLAGS)
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise Refused(f"no such folder: {name}") from None
                except (NotADirectoryError, OSError) as exc:
                    raise Refused(f"{name} is not a folder inside the workspace ({exc.strerror})") from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def read_bytes(self, parts: tuple[str, ...], limit: int) -> tuple[bytes, int]:
        """The first ``limit`` bytes of the file and its size."""
        if not parts:
            raise Refused("that is the files folder itself, not a file")
        with self.directory(parts[:-1]) as dir_fd:
            try:
                # O_NONBLOCK: a FIFO put there (by exec) must not hang the thread; checked below
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(parts[-1], flags, dir_fd=dir_fd)
            except FileNotFoundError:
                raise Refused(f"no such file: {'/'.join(parts)}") from None
            except OSError as exc:
                raise Refused(f"cannot open {'/'.join(parts)}: {exc.strerror}") from None
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise Refused(f"{'/'.join(parts)} is not a regular file")
                return f.read(limit), info.st_size

    def write_bytes(self, parts: tuple[str, ...], data: bytes) -> None:
        """Replace the file with ``data`` at once (a temporary file renamed over it)."""
        if not parts:
            raise Refused("that is the files folder itself, not a file")
        with self.directory(parts[:-1], create=True) as dir_fd:
            name = parts[-1]
            tmp = f".{name}.nanobot-tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise Refused(f"cannot write {'/'.join(parts)}: {exc.strerror}") from None


def _text(data: bytes, where: str) -> str:
    if b"\x00" in data[:8192]:
        raise Refused(f"{where} is a binary file; read_file shows text only")
    return data.decode("utf-8", errors="replace")


class _FileTool(Tool):
    def __init__(self, files: FilesRoot) -> None:
        self._files = files

    def summarize(self, args: dict[str, Any]) -> str:
        """The path."""
        return str(args.get("path", ""))

    async def execute(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult | str:
        """Run the operation in a thread; a refusal becomes an error result."""
        try:
            return await asyncio.to_thread(self.run, args)
        except Refused as exc:
            return ToolResult(f"Error: {exc}", is_error=True)

    def run(self, args: dict[str, Any]) -> str:
        """The operation itself (in a worker thread)."""
        raise NotImplementedError


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    path = {"type": "string", "description": "A path relative to the workspace files folder."}
    return {"type": "object", "properties": {"path": path, **properties}, "required": required}


class ReadFileTool(_FileTool):
    """``read_file``: a text file, or some of its lines."""

    name = "read_file"
    description = (
        "Read a text file from the workspace files folder; offset (1-based line) and limit read a part."
    )
    parameters = _schema(
        {
            "offset": {"type": "integer", "minimum": 1, "description": "First line to read (1-based)."},
            "limit": {"type": "integer", "minimum": 1, "description": "How many lines to read."},
        },
        ["path"],
    )

    def run(self, args: dict[str, Any]) -> str:
        """The file's text (or the lines asked for), bounded by tools.files.maxReadBytes."""
        parts = self._files.parts(args["path"])
        cap = self._files.config.max_read_bytes
        data, size = self._files.read_bytes(parts, cap)
        text = _text(data, args["path"])
        offset, limit = _positive(args.get("offset")), _positive(args.get("limit"))
        if offset is None and limit is None:
            if size > cap:
                return (
                    text
                    + f"\n\n[truncated: the file has {size:,} bytes; read {cap:,} (tools.files.maxReadBytes)]"
                )
            return text
        lines = text.splitlines(keepends=True)
        start = (offset or 1) - 1
        chosen = lines[start : start + limit] if limit else lines[start:]
        end = start + len(chosen)
        more = end < len(lines) or size > cap
        note = f"\n[lines {start + 1}-{end}; more follows: offset={end + 1}]" if more else ""
        return "".join(chosen) + note


class WriteFileTool(_FileTool):
    """``write_file``: create or replace a file."""

    name = "write_file"
    description = "Create or replace a text file in the workspace files folder (folders are created)."
    parameters = _schema(
        {"content": {"type": "string", "description": "The whole new text."}}, ["path", "content"]
    )

    def run(self, args: dict[str, Any]) -> str:
        """Write the content; refused past tools.files.maxWriteBytes."""
        content = args["content"]
        if not isinstance(content, str):
            raise Refused("content must be a string")
        data = content.encode("utf-8")
        cap = self._files.config.max_write_bytes
        if len(data) > cap:
            raise Refused(f"content is {len(data):,} bytes; the limit is {cap:,} (tools.files.maxWriteBytes)")
        parts = self._files.parts(args["path"])
        self._files.write_bytes(parts, data)
        return f"wrote {len(data):,} bytes to {'/'.join(parts)}"


class EditFileTool(_FileTool):
    """``edit_file``: replace one exact piece of text."""

    name = "edit_file"
    description = (
        "Replace old_text with new_text in a workspace file. old_text must occur exactly once "
        "(include surrounding lines to make it unique)."
    )
    parameters = _schema(
        {
            "old_text": {"type": "string", "description": "The exact text to replace."},
            "new_text": {"type": "string", "description": "The replacement."},
        },
        ["path", "old_text", "new_text"],
    )

    def run(self, args: dict[str, Any]) -> str:
        """Replace the one occurrence, or say why not (absent, or ambiguous)."""
        old, new = args["old_text"], args["new_text"]
        if not isinstance(old, str) or not isinstance(new, str) or not old:
            raise Refused("old_text must be a non-empty string and new_text a string")
        parts = self._files.parts(args["path"])
        cap = self._files.config.max_write_bytes
        data, size = self._files.read_bytes(parts, cap + 1)
        if size > cap:
            raise Refused(
                f"the file has {size:,} bytes; edit_file handles up to {cap:,} (tools.files.maxWriteBytes)"
            )
        text = _text(data, args["path"])
        count = text.count(old)
        if count != 1:
            why = "not found" if not count else f"found {count} times; include more context to make it unique"
            raise Refused(f"old_text {why} in {'/'.join(parts)}")
        updated = text.replace(old, new, 1).encode("utf-8")
        if len(updated) > cap:
            raise Refused(f"the result would exceed {cap:,} bytes (tools.files.maxWriteBytes)")
        self._files.write_bytes(parts, updated)
        return f"edited {'/'.join(parts)}"


class ListDirTool(_FileTool):
    """``list_dir``: what a folder holds."""

    name = "list_dir"
    description = (
        "List a folder of the workspace files folder (path '.' for the top): names, folders end in '/'."
    )
    parameters = _schema({}, [])

    def run(self, args: dict[str, Any]) -> str:
        """One line per entry, sorted; folders end in ``/``, files show their size."""
        parts = self._files.parts(str(args.get("path") or "."))
        cap = self._files.config.max_entries
        lines: list[str] = []
        with self._files.directory(parts) as fd, os.scandir(fd) as entries:
            for entry in entries:
                if entry.name.endswith(".nanobot-tmp"):
                    continue
                if entry.is_symlink():
                    lines.append(f"{entry.name} (link)")
                elif entry.is_dir(follow_symlinks=False):
                    lines.append(entry.name + "/")
                else:
                    lines.append(f"{entry.name} ({entry.stat(follow_symlinks=False).st_size:,} bytes)")
        lines.sort()
        shown = lines[:cap]
        if len(lines) > cap:
            shown.append(f"[{len(lines) - cap:,} more not shown (tools.files.maxEntries)]")
        return "\n".join(shown) if shown else "(empty folder)"


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def file_tools(root: Path, config: FilesToolConfig) -> list[Tool]:
    """The four file tools, confined to ``root``."""
    files = FilesRoot(root, config)
    return [ReadFileTool(files), WriteFileTool(files), EditFileTool(files), ListDirTool(files)]
