"""The workspace lock: who may run a ``nanobot serve`` on a workspace.

Two servers on SQLite sharing one workspace would both drain its outbox (every message sent
twice) and write the same history files. So a server on SQLite holds an *exclusive* ``flock``
on ``<workspace>/nanobot.lock`` for its whole life, with its pid written inside; a second one
is refused with one line naming that pid. Servers on PostgreSQL (``storage.url``) keep what
they share in the database, so any number of them may share a workspace: each holds a
*shared* lock, which still keeps a SQLite server out (and the other way round): mixing the
two on one workspace is refused in one line.

The kernel drops the lock when the process ends, however it ends (``kill -9`` included), so a
stale file never blocks a restart. The file is never deleted: unlinking a lock file lets a
third process lock a new inode while a second still holds the old one.

``nanobot outbox`` commands do not take this lock: they work while a server runs (SQLite
serialises their writes) and tell it through ``nanobot.pid`` (see ``channels/lifecycle.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from nanobot.errors import StorageError

LOCK_FILE = "nanobot.lock"


def prepare(workspace: Path) -> None:
    """Create ``workspace`` if needed; a :class:`StorageError` naming it when that is impossible."""
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"workspace {workspace}: exists and is not a directory") from None
    except OSError as exc:
        raise StorageError(f"workspace {workspace}: cannot create it ({exc.strerror or exc})") from None


class WorkspaceLock:
    """A lock on a workspace (exclusive, or shared among PostgreSQL servers), held until
    :meth:`release` or the process ends."""

    __slots__ = ("_fd", "path", "shared")

    def __init__(self, path: Path, fd: int, shared: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self.shared = shared

    @classmethod
    def acquire(cls, workspace: Path, *, shared: bool = False) -> WorkspaceLock:
        """Lock ``workspace`` (creating it): exclusively, or ``shared`` with other servers on
        PostgreSQL; else raise :class:`StorageError` naming the holder's pid and what to change."""
        prepare(workspace)
        path = workspace / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            why = _refusal(workspace, fd, shared)
            os.close(fd)
            raise StorageError(why) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {exc.strerror or exc}") from None
        try:
            # Fixed width: shared holders overwrite each other's pid without leaving a tail behind.
            os.ftruncate(fd, _PID_WIDTH)
            os.pwrite(fd, f"{os.getpid():<{_PID_WIDTH - 1}}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        return cls(path, fd, shared)

    def release(self) -> None:
        """Give the workspace up (an exclusive holder empties the file); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self.shared:  # (a shared holder leaves the pid: others may still hold the lock)
            with contextlib.suppress(OSError):  # nothing to do about it; closing unlocks anyway
                os.ftruncate(fd, 0)
        os.close(fd)


_PID_WIDTH = 12


def _refusal(workspace: Path, fd: int, shared: bool) -> str:
    """Why the lock on ``workspace`` (open as ``fd``) could not be taken, naming the holder."""
    holder = _holder(fd)
    if shared:
        return (
            f"workspace {workspace} is in use by a nanobot serve on SQLite ({holder}); servers on "
            "PostgreSQL share a workspace only with each other: stop it, or give this one another "
            "agents.defaults.workspace"
        )
    try:  # a shared lock would be granted: the holders are servers on PostgreSQL
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return (
            f"workspace {workspace} is in use by another nanobot serve ({holder}); "
            "stop it, or give this one another agents.defaults.workspace"
        )
    return (
        f"workspace {workspace} is in use by nanobot serve processes on PostgreSQL ({holder}); "
        "a server on SQLite needs it alone: give it the same storage.url, or another "
        "agents.defaults.workspace"
    )


def _holder(fd: int) -> str:
    """Who holds the lock, as far as its file says."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
