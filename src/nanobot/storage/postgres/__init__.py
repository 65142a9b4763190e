"""PostgreSQL storage (``asyncpg``, no ORM), shared by any number of nanobot processes.

:class:`PgStorage` opens the pool, applies the versioned migrations under an advisory lock and
holds the implementations: :class:`PgSessionBackend` (the session contract of
:mod:`nanobot.storage.base`) and :class:`PgTurnLeases` (one turn per session across processes,
with fencing tokens); :class:`PgOutbox` (the outbox, its chat lanes claimed by one process at a
time).
"""

from nanobot.storage.postgres.leases import PgTurnLeases
from nanobot.storage.postgres.migrations import SCHEMA_VERSION
from nanobot.storage.postgres.outbox import PgOutbox
from nanobot.storage.postgres.sessions import PgSessionBackend
from nanobot.storage.postgres.store import PgStorage

__all__ = ["SCHEMA_VERSION", "PgOutbox", "PgSessionBackend", "PgStorage", "PgTurnLeases"]
