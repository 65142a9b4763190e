"""The workspace lock: one ``nanobot serve`` per workspace.

Two servers on one workspace would both drain its outbox (every message sent twice) and
write the same history. So a server holds an exclusive ``flock`` on
``<workspace>/nanobot.lock`` for its whole life, with its pid written inside; a second one
is refused with one line naming that pid. The kernel drops the lock when the process
ends, however it ends (``kill -9`` included), so a stale file never blocks a restart.
The file is never deleted: unlinking a lock file lets a third process lock a new inode
while a second still holds the old one.

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
    """An exclusive lock on a workspace, held until :meth:`release` or the process ends."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, workspace: Path) -> WorkspaceLock:
        """Lock ``workspace`` (creating it), or raise :class:`StorageError` naming the holder's pid."""
        prepare(workspace)
        path = workspace / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StorageError(
                f"workspace {workspace} is in use by another nanobot serve ({holder}); "
                "stop it, or give this one another agents.defaults.workspace"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        return cls(path, fd)

    def release(self) -> None:
        """Give the workspace up (the file stays, emptied); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # nothing to do about it; closing unlocks anyway
            os.ftruncate(fd, 0)
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as far as its file says."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
