"""A throwaway PostgreSQL server started from the installed server binaries (no pytest here).

Shared by the tests (``tests/pg.py``, the fixtures) and the benchmark (``bench/pg_section.py``):
``initdb`` + ``pg_ctl`` in a temporary directory on a free port, listening on 127.0.0.1 only,
its unix socket inside that directory, fsync off (the data is thrown away). When running as root
the server runs as the ``postgres`` user (PostgreSQL refuses root). ``NANOBOT_PG_BIN`` names the
folder holding ``initdb``, ``pg_ctl`` and ``postgres`` when they are somewhere else (Debian:
``/usr/lib/postgresql/<version>/bin``, from the ``postgresql`` package).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "nanobot"
# A password with URL-special characters: the tests connect as a deployment would (scram over TCP),
# and prove the password never reaches a log line or an error.
PASSWORD = "pg-Secret/pass:w0rd"
_QUOTED_PASSWORD = "pg-Secret%2Fpass%3Aw0rd"
_SERVER_USER = "postgres"  # who runs the server when the tests run as root


def _bin_dir() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: $NANOBOT_PG_BIN, Debian's newest, or the PATH."""
    given = os.environ.get("NANOBOT_PG_BIN")
    if given:
        return Path(given)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for folder in reversed(debian):
        if (folder / "pg_ctl").exists():
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def missing() -> str | None:
    """Why no server can be started here, or None."""
    folder = _bin_dir()
    if folder is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql, or set NANOBOT_PG_BIN)"
    for tool in ("initdb", "pg_ctl", "postgres", "createdb"):
        if not (folder / tool).exists():
            return f"{folder / tool} not found (apt-get install postgresql, or set NANOBOT_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return f"running as root and there is no {_SERVER_USER!r} user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class PgServer:
    """A running throwaway server: where it listens and how to reach its admin database."""

    root: Path  # the temporary directory (data, socket, log)
    port: int
    bin_dir: Path

    def url(self, database: str, *, password: str = _QUOTED_PASSWORD) -> str:
        """A ``postgresql://`` URL for ``database`` over TCP with the test user's password."""
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.root / "server.log"


def _run(cmd: list[str], root: bool) -> None:
    """Run a server tool (as the server user when we are root); its output in the error if it fails."""
    if root:
        cmd = ["runuser", "-u", _SERVER_USER, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")


def start_server() -> PgServer:
    """initdb + pg_ctl start in a fresh temporary directory; raises with the tool's output on failure."""
    folder = _bin_dir()
    assert folder is not None
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="nanobot-pg-"))
    (root / "pw").write_text(PASSWORD + "\n")
    if as_root:
        owner = pwd.getpwnam(_SERVER_USER)
        for path in (root, root / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data = root / "data"
    _run(
        [str(folder / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(root / "pw"),
         "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8",
         # ICU's en-US as the default collation, like most real servers: key order and prefix
         # ranges must not depend on it (";" sorts before ":" there, unlike in SQLite).
         "--locale-provider=icu", "--icu-locale=en-US", "--no-sync"],
        as_root,
    )  # fmt: skip
    for attempt in itertools.count():
        server = PgServer(root, _free_port(), folder)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        try:
            _run([str(folder / "pg_ctl"), "start", "-D", str(data), "-w", "-t", "60", "-l", str(server.log),
                  "-o", options], as_root)  # fmt: skip
            return server
        except RuntimeError:
            if attempt >= 2:  # (the free port was taken meanwhile: try another, a few times)
                raise


def stop_server(server: PgServer) -> None:
    """Stop the server and delete its directory; kill the postmaster we started if it will not stop."""
    data = server.root / "data"
    pid_file = data / "postmaster.pid"
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        _run([str(server.bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"],
             os.geteuid() == 0)  # fmt: skip
    if pid_file.exists():  # still running: it is our own child server, so end it by its pid
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    shutil.rmtree(server.root, ignore_errors=True)


def create_database(server: PgServer, name: str) -> str:
    """Create an empty database ``name`` (over the server's unix socket); its ``postgresql://`` URL."""
    createdb = [str(server.bin_dir / "createdb"), "-h", str(server.root), "-p", str(server.port)]
    createdb += ["-U", USER, name]
    done = subprocess.run(createdb, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"createdb {name} failed: {done.stderr}")
    return server.url(name)
