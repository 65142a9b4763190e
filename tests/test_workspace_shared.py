"""The workspace lock on PostgreSQL: servers on PostgreSQL share a workspace; SQLite still owns one."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from cluster import ask, start, write_config
from nanobot.errors import StorageError
from nanobot.workspace import WorkspaceLock
from served import free_port

from fake_llm import FakeLLM


def test_shared_holders_share_and_keep_an_exclusive_one_out(tmp_path: Path) -> None:
    """Two PostgreSQL servers lock one workspace together; a SQLite server is told why it cannot."""
    first = WorkspaceLock.acquire(tmp_path, shared=True)
    second = WorkspaceLock.acquire(tmp_path, shared=True)
    with pytest.raises(StorageError, match="in use by nanobot serve processes on PostgreSQL") as refused:
        WorkspaceLock.acquire(tmp_path)
    assert "give it the same storage.url" in refused.value.message
    first.release()
    with pytest.raises(StorageError, match="on PostgreSQL"):  # one holder left is enough
        WorkspaceLock.acquire(tmp_path)
    second.release()
    WorkspaceLock.acquire(tmp_path).release()  # the last one gone: SQLite may have it


def test_an_exclusive_holder_keeps_shared_ones_out(tmp_path: Path) -> None:
    """A PostgreSQL server on a workspace a SQLite server holds is refused, naming that server's pid."""
    import os

    held = WorkspaceLock.acquire(tmp_path)
    with pytest.raises(StorageError, match=rf"in use by a nanobot serve on SQLite \(pid {os.getpid()}\)"):
        WorkspaceLock.acquire(tmp_path, shared=True)
    held.release()
    WorkspaceLock.acquire(tmp_path, shared=True).release()


@pytest.mark.timeout(120)
async def test_servers_on_postgresql_share_a_workspace_and_sqlite_is_refused_beside_them(
    tmp_path: Path, fake_llm: FakeLLM, pg_url: str
) -> None:
    """Two PostgreSQL servers run on one workspace; a SQLite one there exits 2 in one line, and
    a PostgreSQL one beside a SQLite server likewise."""
    llm = fake_llm.url  # type: ignore[attr-defined]
    workspace = tmp_path / "shared-ws"
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            port = free_port()
            config = write_config(tmp_path / name, llm, port, workspace, storage={"url": pg_url})
            servers.append(await start(config, port))
            await servers[-1].wait_log("listening on", within=60)
        async with aiohttp.ClientSession() as http:
            await ask(http, servers[0].url, "s", "one")
            assert await ask(http, servers[1].url, "s", "two") == "echo: two"
        (tmp_path / "c").mkdir()
        config = write_config(tmp_path / "c", llm, free_port(), workspace)  # SQLite
        refused = await _run(config)
        assert refused[0] == 2 and len(refused[1]) == 1, refused
        assert f"workspace {workspace} is in use by nanobot serve processes on PostgreSQL" in refused[1][0]
        for served in servers:
            served.terminate()
            assert await served.exit_code(within=30) == 0, served.log
        # The other way round: a SQLite server holds it, a PostgreSQL one is refused.
        port = free_port()
        sqlite = await start(write_config(tmp_path / "c", llm, port, workspace), port)
        servers.append(sqlite)
        await sqlite.wait_log("listening on", within=60)
        (tmp_path / "d").mkdir()
        refused = await _run(
            write_config(tmp_path / "d", llm, free_port(), workspace, storage={"url": pg_url})
        )
        assert refused[0] == 2 and len(refused[1]) == 1, refused
        assert f"nanobot serve on SQLite (pid {sqlite.proc.pid})" in refused[1][0]
        assert "pg-Secret" not in refused[1][0]
    finally:
        for served in servers:
            if served.proc.returncode is None:
                served.proc.kill()
                await served.proc.wait()


async def _run(config: Path) -> tuple[int, list[str]]:
    """Run ``nanobot serve -c config`` to its end: exit code and stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobot", "serve", "-c", str(config), stderr=asyncio.subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode().strip().splitlines()
