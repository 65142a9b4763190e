"""Inbound chat across processes: who receives a channel's updates, and which were taken already.

Telegram allows one ``getUpdates`` consumer per bot token and Discord one Gateway session per
shard, so with several processes on one PostgreSQL exactly one process *leads* each polling
channel (:mod:`nanobot.storage.postgres.leadership`: an advisory lock on a dedicated
connection); the others only send. Every update id is recorded before its update is handed to
the agent, so a new leader after a crash, or a webhook call Telegram retries, never starts a
second turn for the same update.

One process on the embedded SQLite files always leads (the workspace lock already makes it the
only one) and remembers recent ids in memory: no database, no cost.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from nanobot.storage_config import StorageConfig

Work = Callable[[], Awaitable[None]]

log = logging.getLogger(__name__)

RECENT_IDS = 10_000  # ids a single process remembers (a retried webhook call comes within minutes)


class ResumePoint(NamedTuple):
    """Where a Discord Gateway session stands: a new leader RESUMEs it (Discord replays what was
    sent since ``seq``) instead of identifying afresh, which would lose what arrived meanwhile."""

    session_id: str
    resume_url: str
    seq: int


class ChannelInbound(Protocol):
    """One channel's inbound side in this process: leadership and the record of update ids."""

    @property
    def resumable(self) -> bool:
        """Whether a Gateway session this process stops is resumed later: by the next leader (on
        PostgreSQL) or by this process after a restart (its point kept in the workspace)."""
        ...

    @property
    def leading(self) -> bool:
        """Whether this process receives the channel's updates now."""
        ...

    async def lead(self, work: Work) -> None:
        """Run ``work`` whenever this process leads the channel: wait for the lead, run it, cancel
        it when the lead is lost, wait again. Returns when ``work`` returns."""
        ...

    async def fresh(self, ids: Sequence[str], resume: ResumePoint | None = None) -> list[str]:
        """Record ``ids`` as taken and return those never taken before, in order; with
        ``resume``, also where the channel's session stands (in the same write).

        Raises StorageError when they cannot be recorded: then none may be handed on yet.
        """
        ...

    async def resume_point(self) -> ResumePoint | None:
        """Where the last leader's session stood (None: none saved, or nothing to share)."""
        ...

    async def close(self) -> None:
        """Give up the lead and release connections; the object may be used again later."""
        ...


class SoloInbound:
    """The single process's inbound side: always the leader; recent ids kept in memory. With a
    ``resume_file`` (in the workspace), where the channel's Gateway session stood when the
    process stopped is kept there, and the next start resumes it: Discord replays what was sent
    during a restart instead of it being lost."""

    def __init__(self, remember: int = RECENT_IDS, resume_file: Path | None = None, token: str = "") -> None:
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._file = resume_file
        self._bot = hashlib.sha256(token.encode()).hexdigest()[:16]  # (a point is the token's own)
        self._resume: ResumePoint | None = None

    @property
    def resumable(self) -> bool:
        """With a resume file: this process resumes its session after a restart."""
        return self._file is not None

    @property
    def leading(self) -> bool:
        """Always: no other process can share this workspace."""
        return True

    async def lead(self, work: Work) -> None:
        """Run ``work`` at once."""
        await work()

    async def fresh(self, ids: Sequence[str], resume: ResumePoint | None = None) -> list[str]:
        """The ids not among the last :data:`RECENT_IDS` seen, now remembered (``resume`` in
        memory, written to the resume file at :meth:`close`)."""
        if resume is not None:
            self._resume = resume
        new = [i for i in dict.fromkeys(ids) if i not in self._recent]
        for update_id in new:
            self._recent[update_id] = None
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)
        return new

    async def resume_point(self) -> ResumePoint | None:
        """Where the session stood when this workspace's last process stopped (once: the file
        is removed as it is read, so a later start never resumes a session twice)."""
        if self._file is None:
            return None
        try:
            saved = orjson.loads(self._file.read_bytes())
            self._file.unlink()
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("%s: ignoring the saved Gateway session (%s); identifying afresh", self._file, exc)
            return None
        try:
            if saved["bot"] != self._bot:  # (another bot's: the token changed)
                return None
            return ResumePoint(str(saved["session_id"]), str(saved["resume_url"]), int(saved["seq"]))
        except (KeyError, TypeError, ValueError):
            log.warning("%s: ignoring a malformed saved Gateway session; identifying afresh", self._file)
            return None

    async def close(self) -> None:
        """Keep where the session stands in the resume file, if there is one to keep (the ids
        stay remembered across a restart of the channel)."""
        resume, self._resume = self._resume, None
        if self._file is None or resume is None:
            return
        point = {"bot": self._bot, "session_id": resume.session_id, "resume_url": resume.resume_url,
                 "seq": resume.seq}  # fmt: skip
        try:
            write_private(self._file, orjson.dumps(point))
        except OSError as exc:
            log.warning("%s: the Gateway session could not be kept (%s); the next start identifies afresh",
                        self._file, exc)  # fmt: skip


def open_inbound(
    storage: StorageConfig, channel: str, token: str, workspace: Path | None = None
) -> ChannelInbound:
    """The inbound side of ``channel`` (its bot ``token`` names it, as a digest) on ``storage``:
    shared through PostgreSQL, else this process alone (its Gateway session, if any, kept in
    ``<workspace>/<channel>-session.json`` between runs). Connects lazily, when first used."""
    if not storage.is_postgres:
        resume_file = None if workspace is None else workspace / f"{channel}-session.json"
        return SoloInbound(resume_file=resume_file, token=token)
    # Imported here: asyncpg is only loaded by deployments that use it.
    from nanobot.storage.postgres.leadership import PgChannelInbound

    return PgChannelInbound(storage, channel, token)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (a temporary file renamed over it), readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
