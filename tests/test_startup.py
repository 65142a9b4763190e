"""`nanobot serve` as a real process: an unusable workspace is one line and exit 2, never a hang;
one server per workspace; start-up says what it runs and never prints a secret."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, workspace: Path, **provider: str) -> Path:
    """A config serving on a free port with ``workspace``; ``provider`` fields for a provider "up"."""
    defaults = {"workspace": str(workspace)}
    data: dict[str, object] = {"api": {"port": free_port()}, "agents": {"defaults": defaults}}
    if provider:
        data["providers"] = {"up": {"apiBase": "http://127.0.0.1:9/v1", **provider}}
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_bytes(orjson.dumps(data))
    return path


def serve_once(config: Path) -> tuple[int, str]:
    """Run `nanobot serve -c CONFIG` expecting it to exit by itself; its exit code and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "nanobot", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=30, check=False, env=ENV,
    )  # fmt: skip
    return proc.returncode, proc.stderr


def assert_one_line_naming(err: str, path: Path, cause: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and cause in lines[0], lines[0]


def test_garbage_sessions_db_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A sessions.db that is not a database stops start-up at once with one line naming it (it hung)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "sessions.db").write_text("garbage\n" * 100)
    code, err = serve_once(write_config(tmp_path, workspace))
    assert code == 2
    assert_one_line_naming(err, workspace / "sessions.db", "not a database")


def test_garbage_outbox_db_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An outbox.db that is not a database stops start-up with one line naming it."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "outbox.db").write_text("garbage\n" * 100)
    code, err = serve_once(write_config(tmp_path, workspace))
    assert code == 2
    assert_one_line_naming(err, workspace / "outbox.db", "not a database")


def test_workspace_that_is_a_file_is_named(tmp_path: Path) -> None:
    """A workspace path that is a file is reported as such, not as "cannot listen: File exists"."""
    workspace = tmp_path / "ws"
    workspace.write_text("not a folder")
    code, err = serve_once(write_config(tmp_path, workspace))
    assert code == 2
    assert_one_line_naming(err, workspace, "not a directory")
    assert "listen" not in err


def test_damaged_sessions_db_is_one_line(tmp_path: Path) -> None:
    """A sessions.db with damaged pages ends start-up with one line naming it, not a traceback."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    path = workspace / "sessions.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE turns (id INTEGER PRIMARY KEY, session TEXT NOT NULL, data BLOB NOT NULL);"
        "CREATE INDEX turns_session ON turns (session, id);"
    )
    db.executemany("INSERT INTO turns (session, data) VALUES (?, ?)", [(f"s{i % 20}", b"x" * 3000)
                                                                      for i in range(300)])  # fmt: skip
    db.commit()
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'turns_session'").fetchone()
    (page,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with path.open("r+b") as f:  # the page start-up reads: the index of sessions
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)
    code, err = serve_once(write_config(tmp_path, workspace))
    assert code == 2
    assert_one_line_naming(err, path, "malformed")


def read_only(workspace: Path) -> list[str]:
    """A command prefix under which ``workspace`` cannot be written to.

    chmod is enough for a normal user; root writes through it, so as root the folder is
    bind-mounted read-only in a private mount namespace (skipped where that is not allowed).
    """
    if os.geteuid() != 0:
        workspace.chmod(0o555)
        return []
    remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"'
    unshare = shutil.which("unshare")
    probe = None if unshare is None else subprocess.run(
        [unshare, "-m", "sh", "-c", f"{remount} && ! touch \"$0/probe\" 2>/dev/null", str(workspace)],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    if unshare is None or probe is None or probe.returncode != 0:
        pytest.skip("running as root, and no private read-only mount is possible here")
    return [unshare, "-m", "sh", "-c", f'{remount} && exec "$@"', str(workspace)]


def test_read_only_workspace_is_one_line(tmp_path: Path) -> None:
    """A workspace nanobot may not write to stops start-up with one line naming the path (it hung)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    prefix = read_only(workspace)
    argv = [sys.executable, "-m", "nanobot", "serve", "-c", str(write_config(tmp_path, workspace))]
    try:
        proc = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=30, check=False, env=ENV
        )
    finally:
        workspace.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_naming(proc.stderr, workspace, "Read-only file system" if prefix else "Permission denied")


class Server:
    """A `nanobot serve` process, its stderr in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nanobot", "serve", "-c", str(config)], stderr=out, env=ENV
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, within: float = 20.0) -> None:
        """Wait until the log says ``needle`` (or fail if the process exits first)."""
        deadline = time.monotonic() + within
        while needle not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_second_server_on_one_workspace_is_refused(tmp_path: Path, servers: list[Server]) -> None:
    """A second `nanobot serve` on a busy workspace exits 2 naming the holder's pid (both used to send)."""
    workspace = tmp_path / "ws"
    first = Server(write_config(tmp_path, workspace), tmp_path / "first.log")
    servers.append(first)
    first.wait_for("listening on")
    code, err = serve_once(write_config(tmp_path, workspace))
    assert code == 2
    assert_one_line_naming(err, workspace, f"in use by another nanobot serve (pid {first.proc.pid})")
    # The outbox CLI does not need the lock: it works while the server runs.
    listing = subprocess.run(
        [sys.executable, "-m", "nanobot", "outbox", "list", "-c", str(write_config(tmp_path, workspace))],
        capture_output=True, text=True, timeout=30, check=False, env=ENV,
    )  # fmt: skip
    assert (listing.returncode, listing.stdout.strip()) == (0, "the outbox is empty"), listing.stderr


def test_lock_is_released_even_by_kill_9(tmp_path: Path, servers: list[Server]) -> None:
    """After the server is killed with SIGKILL, the next one starts on the same workspace."""
    workspace = tmp_path / "ws"
    first = Server(write_config(tmp_path, workspace), tmp_path / "first.log")
    servers.append(first)
    first.wait_for("listening on")
    first.proc.kill()
    first.proc.wait()
    second = Server(write_config(tmp_path, workspace), tmp_path / "second.log")
    servers.append(second)
    second.wait_for("listening on")
    assert second.stop() == 0


def test_start_up_says_what_it_runs_without_the_key(tmp_path: Path, servers: list[Server]) -> None:
    """The log names the config, provider, API base, model and workspace; the key never appears."""
    workspace = tmp_path / "ws"
    secret = "sk-very-secret-provider-key"
    base = "http://127.0.0.1:9/v1?key=query-secret"  # a key in the URL stays out too
    config = write_config(tmp_path, workspace, apiKey=secret, apiBase=base)
    server = Server(config, tmp_path / "serve.log")
    servers.append(server)
    server.wait_for("workspace:")
    assert server.stop() == 0
    text = server.text()
    assert f"config: {config}" in text
    assert "provider: up at http://127.0.0.1:9/v1, model gpt-4o-mini" in text
    assert f"workspace: {workspace}" in text
    assert "WARNING" not in text
    for hidden in (secret, "query-secret"):
        assert hidden not in text


def test_start_up_warns_when_the_provider_key_is_empty(tmp_path: Path, servers: list[Server]) -> None:
    """A remote provider with no apiKey is named in a WARNING at start-up (a loopback one, a local
    model server, needs none). Nothing connects to the remote address at start-up."""
    config = write_config(tmp_path, tmp_path / "ws", apiKey="", apiBase="http://llm.example.invalid/v1")
    server = Server(config, tmp_path / "serve.log")
    servers.append(server)
    server.wait_for("workspace:")
    assert server.stop() == 0
    assert "WARNING nanobot.runtime: provider up has no apiKey" in server.text()
