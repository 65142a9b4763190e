"""Workspace file tools: read, write, edit, list inside <workspace>/files, and no way out of it."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from nanobot.bus import MessageBus
from nanobot.tools import ToolContext
from nanobot.tools.files import file_tools
from nanobot.tools_config import FilesToolConfig
from tool_calls import call_on

from fake_llm import FakeLLM

Gateway = Callable[..., Awaitable[str]]


@pytest.fixture
async def gateway_url(start_gateway: Gateway) -> str:
    """A gateway with the default tools."""
    return await start_gateway()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """The workspace files folder the default test config gives the tools (made here: the tools make it
    on first use, but these tests put files there first)."""
    folder = tmp_path / "ws" / "files"
    folder.mkdir(parents=True)
    return folder


async def test_write_read_edit_list(gateway_url: str, fake_llm: FakeLLM, files: Path) -> None:
    """A file the model writes can be read back, edited in place and seen in its folder."""
    wrote = await call_on(
        gateway_url, fake_llm, "write_file", {"path": "notes/todo.md", "content": "a\nb\nc\n"}
    )
    assert wrote == "wrote 6 bytes to notes/todo.md"
    assert (files / "notes" / "todo.md").read_text() == "a\nb\nc\n"
    assert await call_on(gateway_url, fake_llm, "read_file", {"path": "notes/todo.md"}) == "a\nb\nc\n"
    part = await call_on(
        gateway_url, fake_llm, "read_file", {"path": "notes/todo.md", "offset": 2, "limit": 1}
    )
    assert part == "b\n\n[lines 2-2; more follows: offset=3]"
    edited = await call_on(
        gateway_url, fake_llm, "edit_file", {"path": "notes/todo.md", "old_text": "b\n", "new_text": "B!\n"}
    )
    assert edited == "edited notes/todo.md"
    assert (files / "notes" / "todo.md").read_text() == "a\nB!\nc\n"
    listing = await call_on(gateway_url, fake_llm, "list_dir", {"path": "."})
    assert listing == "notes/"
    assert await call_on(gateway_url, fake_llm, "list_dir", {"path": "notes"}) == "todo.md (7 bytes)"


async def test_edit_needs_exactly_one_match(gateway_url: str, fake_llm: FakeLLM, files: Path) -> None:
    """edit_file refuses text that is absent or occurs more than once, and leaves the file alone."""
    (files / "f.txt").write_text("x x")
    absent = await call_on(
        gateway_url, fake_llm, "edit_file", {"path": "f.txt", "old_text": "y", "new_text": "z"}
    )
    assert absent == "Error: old_text not found in f.txt"
    twice = await call_on(
        gateway_url, fake_llm, "edit_file", {"path": "f.txt", "old_text": "x", "new_text": "z"}
    )
    assert twice.startswith("Error: old_text found 2 times")
    assert (files / "f.txt").read_text() == "x x"


async def test_dot_dot_is_refused(gateway_url: str, fake_llm: FakeLLM, tmp_path: Path) -> None:
    """../ cannot reach the workspace's own files (sessions, outbox) or anything else."""
    (tmp_path / "ws" / "secret.txt").write_text("no")
    for tool, args in (
        ("read_file", {"path": "../secret.txt"}),
        ("write_file", {"path": "../../escaped.txt", "content": "x"}),
        ("list_dir", {"path": "sub/../../"}),
        ("edit_file", {"path": "../secret.txt", "old_text": "no", "new_text": "yes"}),
    ):
        text = await call_on(gateway_url, fake_llm, tool, args)
        assert "is outside the workspace files folder" in text, (tool, text)
    assert not (tmp_path / "escaped.txt").exists()
    assert (tmp_path / "ws" / "secret.txt").read_text() == "no"


async def test_absolute_path_outside_is_refused(gateway_url: str, fake_llm: FakeLLM, files: Path) -> None:
    """An absolute path outside the folder is refused; one inside it works."""
    text = await call_on(gateway_url, fake_llm, "read_file", {"path": "/etc/passwd"})
    assert text == "Error: '/etc/passwd' is outside the workspace files folder; use a path relative to it"
    inside = await call_on(
        gateway_url, fake_llm, "write_file", {"path": str(files / "a.txt"), "content": "ok"}
    )
    assert inside == "wrote 2 bytes to a.txt"


async def test_symlink_out_is_refused(
    gateway_url: str, fake_llm: FakeLLM, files: Path, tmp_path: Path
) -> None:
    """A symlink inside the folder pointing outside leads nowhere: not read, not written through."""
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (files / "link.txt").symlink_to(outside)
    read = await call_on(gateway_url, fake_llm, "read_file", {"path": "link.txt"})
    assert read == "Error: 'link.txt' is outside the workspace files folder; use a path relative to it"
    wrote = await call_on(gateway_url, fake_llm, "write_file", {"path": "link.txt", "content": "overwritten"})
    assert wrote.startswith("Error: 'link.txt' is outside")
    assert outside.read_text() == "private"
    listing = await call_on(gateway_url, fake_llm, "list_dir", {"path": "."})
    assert listing == "link.txt (link)"


async def test_symlinked_dir_out_is_refused(
    gateway_url: str, fake_llm: FakeLLM, files: Path, tmp_path: Path
) -> None:
    """A symlinked folder pointing outside cannot be listed, read or written into."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "key").write_text("k")
    (files / "d").symlink_to(elsewhere, target_is_directory=True)
    for tool, args in (
        ("list_dir", {"path": "d"}),
        ("read_file", {"path": "d/key"}),
        ("write_file", {"path": "d/new", "content": "x"}),
    ):
        text = await call_on(gateway_url, fake_llm, tool, args)
        assert "is outside the workspace files folder" in text, (tool, text)
    assert sorted(os.listdir(elsewhere)) == ["key"]


async def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path: Path) -> None:
    """The open itself refuses symlinks (O_NOFOLLOW on each part): a path checked as inside stays inside."""
    root = tmp_path / "files"
    outside = tmp_path / "outside"
    outside.mkdir()
    tools = {t.name: t for t in file_tools(root, FilesToolConfig())}
    ctx = ToolContext(MessageBus(), "api", "c", "r")
    await tools["write_file"].execute({"path": "d/f.txt", "content": "in"}, ctx)
    files_root = tools["write_file"]._files  # type: ignore[attr-defined]
    parts = files_root.parts("d/f.txt")  # checked while d is a real folder ...
    (root / "d" / "f.txt").unlink()
    (root / "d").rmdir()
    (root / "d").symlink_to(outside, target_is_directory=True)  # ... then swapped for a link out
    from nanobot.tools.files import Refused

    with pytest.raises(Refused, match="not a folder inside the workspace"):
        files_root.write_bytes(parts, b"escaped")
    assert list(outside.iterdir()) == []


async def test_size_bounds(start_gateway: Gateway, fake_llm: FakeLLM, files: Path) -> None:
    """Reads and writes past the configured bounds are cut or refused, with the key to change."""
    url = await start_gateway({"tools": {"files": {"maxReadBytes": 10, "maxWriteBytes": 5}}})
    (files / "big.txt").write_text("0123456789abcdef")
    text = await call_on(url, fake_llm, "read_file", {"path": "big.txt"})
    assert text.startswith(
        "0123456789\n\n[truncated: the file has 16 bytes; read 10 (tools.files.maxReadBytes)]"
    )
    text = await call_on(url, fake_llm, "write_file", {"path": "w.txt", "content": "123456"})
    assert text == "Error: content is 6 bytes; the limit is 5 (tools.files.maxWriteBytes)"
    assert not (files / "w.txt").exists()


async def test_binary_file_is_not_read(gateway_url: str, fake_llm: FakeLLM, files: Path) -> None:
    """read_file says a binary file is binary instead of filling the context with noise."""
    (files / "b.bin").write_bytes(b"\x00\x01\x02")
    assert await call_on(gateway_url, fake_llm, "read_file", {"path": "b.bin"}) == (
        "Error: b.bin is a binary file; read_file shows text only"
    )


async def test_a_fifo_is_not_read(gateway_url: str, fake_llm: FakeLLM, files: Path) -> None:
    """A named pipe in the folder is refused at once instead of hanging the read forever."""
    os.mkfifo(files / "pipe")
    assert (
        await call_on(gateway_url, fake_llm, "read_file", {"path": "pipe"})
        == "Error: pipe is not a regular file"
    )
