"""The PostgreSQL schema, as versioned migrations applied at start under an advisory lock.

Ten processes starting at once on an empty database all succeed and the schema is applied
once: each takes ``pg_advisory_lock`` (per database), reads the version in ``nanobot_schema``,
applies what is missing (each version in its own transaction) and unlocks. A database written
by a newer nanobot is refused, as for SQLite. A migration is never edited once released: a
change is a new entry at the end of :data:`MIGRATIONS`.
"""

from __future__ import annotations

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from nanobot.errors import StorageError

# Session keys compare as bytes ("C"), like SQLite: listing by key prefix is a range scan, and
# its order cannot depend on the server's locale.
_V1 = (
    """CREATE TABLE sessions (
        key TEXT COLLATE "C" PRIMARY KEY,
        title TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        turns INTEGER NOT NULL,
        preview TEXT NOT NULL
    )""",
    "CREATE INDEX sessions_recent ON sessions (updated, key)",
    # One row per turn, its messages as orjson bytes: bytea, not jsonb, because jsonb rejects
    # "\u0000" in strings, reorders keys, and costs a parse on every write.
    """CREATE TABLE turns (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session TEXT COLLATE "C" NOT NULL,
        data BYTEA NOT NULL
    )""",
    "CREATE INDEX turns_session ON turns (session, id)",
    # One turn per session across processes. Tokens come from one sequence, so they only grow
    # (fencing): a released or expired holder's token never becomes valid again.
    "CREATE SEQUENCE turn_lease_tokens",
    """CREATE TABLE turn_leases (
        session TEXT COLLATE "C" PRIMARY KEY,
        holder TEXT NOT NULL,
        token BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )""",
    # The outbox: the columns of channels/outbox.py's SQLite table, delivered per chat lane.
    """CREATE TABLE outbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        uid TEXT NOT NULL,
        channel TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        content TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        parts_done INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        last_error TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX outbox_state ON outbox (state, channel)",
    "CREATE INDEX outbox_lane_order ON outbox (channel, chat_id, id) WHERE state = 'pending'",
    # A chat's lane: claimed by one process at a time (FOR UPDATE SKIP LOCKED on these rows, or
    # the lease columns), so messages to one chat go out in order while lanes spread over processes.
    """CREATE TABLE outbox_lanes (
        channel TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        holder TEXT NOT NULL DEFAULT '',
        token BIGINT NOT NULL DEFAULT 0,
        expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
        PRIMARY KEY (channel, chat_id)
    )""",
    # Inbound platform updates already taken (Telegram update_id, Discord message id): a new
    # leader after a crash skips what the old one handled.
    """CREATE TABLE inbound_updates (
        channel TEXT NOT NULL,
        update_id TEXT NOT NULL,
        seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (channel, update_id)
    )""",
    "CREATE INDEX inbound_updates_age ON inbound_updates (seen_at)",
)

# Taking a session's turn lease also reads the session's version (its newest turn id), in one
# round trip. A function, because a statement reads from one snapshot: taken before a holder's
# last write committed (the INSERT below waits for that holder's row), it would miss that turn.
# Each statement of a PL/pgSQL function sees what committed before it started.
_V2_storage = (
    """CREATE OR REPLACE FUNCTION nanobot_take_turn_lease(
        p_session TEXT, p_holder TEXT, p_ttl DOUBLE PRECISION,
        OUT token BIGINT, OUT remaining DOUBLE PRECISION, OUT version BIGINT
    ) LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO turn_leases AS l (session, holder, token, expires_at)
        VALUES (p_session, p_holder, nextval('turn_lease_tokens'),
                clock_timestamp() + make_interval(secs => p_ttl))
        ON CONFLICT (session) DO UPDATE
            SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
            WHERE l.expires_at <= clock_timestamp()
        RETURNING l.token INTO token;
        IF token IS NULL THEN
            SELECT EXTRACT(EPOCH FROM l.expires_at - clock_timestamp())::float8 INTO remaining
            FROM turn_leases AS l WHERE l.session = p_session;
        ELSE
            SELECT max(t.id) INTO version FROM turns AS t WHERE t.session = p_session;
        END IF;
    END
    $$""",
)

# The outbox across processes: lane tokens only grow (fencing: a process that lost its lane cannot
# record deliveries in it), and a platform's Retry-After held for every process (per channel and
# bucket; "*" is the whole channel), as the server's time it ends.
_V2_outbox = (
    "CREATE SEQUENCE outbox_lane_tokens",
    """CREATE TABLE outbox_holds (
        channel TEXT NOT NULL,
        bucket TEXT NOT NULL,
        not_before TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (channel, bucket)
    )""",
)

# A release announces itself (NOTIFY) only when someone waited for that lease: a failed attempt
# marks the row ``waited``. NOTIFY takes a lock held from the commit's start to its end that
# every notifying transaction on the server needs, so announcing every turn's release serialised
# the turns' commits; the uncontended turn, nearly every turn, now sends none.
#
# And the lease taken for many sessions in one statement (see batches.py): the same steps over
# arrays, rows locked in key order (as the grouped turn write does) so that two groups never wait
# on each other in a circle. A row per session: the token and version when taken, else how long
# the current lease has left (no row at all: it was released meanwhile, try again).
_V3_leases = (
    "ALTER TABLE turn_leases ADD COLUMN waited BOOLEAN NOT NULL DEFAULT false",
    """CREATE OR REPLACE FUNCTION nanobot_take_turn_lease(
        p_session TEXT, p_holder TEXT, p_ttl DOUBLE PRECISION,
        OUT token BIGINT, OUT remaining DOUBLE PRECISION, OUT version BIGINT
    ) LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO turn_leases AS l (session, holder, token, expires_at)
        VALUES (p_session, p_holder, nextval('turn_lease_tokens'),
                clock_timestamp() + make_interval(secs => p_ttl))
        ON CONFLICT (session) DO UPDATE
            SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at,
                waited = false
            WHERE l.expires_at <= clock_timestamp()
        RETURNING l.token INTO token;
        IF token IS NULL THEN
            UPDATE turn_leases AS l SET waited = true WHERE l.session = p_session
            RETURNING EXTRACT(EPOCH FROM l.expires_at - clock_timestamp())::float8 INTO remaining;
        ELSE
            SELECT max(t.id) INTO version FROM turns AS t WHERE t.session = p_session;
        END IF;
    END
    $$""",
    """CREATE FUNCTION nanobot_take_turn_leases(
        p_sessions TEXT[], p_holders TEXT[], p_ttls DOUBLE PRECISION[]
    ) RETURNS TABLE (session TEXT, token BIGINT, remaining DOUBLE PRECISION, version BIGINT)
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        won TEXT[];
        tokens BIGINT[];
    BEGIN
        WITH taken AS (
            INSERT INTO turn_leases AS l (session, holder, token, expires_at)
            SELECT x.s, x.h, nextval('turn_lease_tokens'), clock_timestamp() + make_interval(secs => x.t)
            FROM unnest(p_sessions, p_holders, p_ttls) AS x(s, h, t) ORDER BY x.s
            ON CONFLICT (session) DO UPDATE
                SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at,
                    waited = false
                WHERE l.expires_at <= clock_timestamp()
            RETURNING l.session, l.token
        ) SELECT array_agg(taken.session), array_agg(taken.token) INTO won, tokens FROM taken;
        RETURN QUERY
            SELECT x.s, x.t, NULL::float8, (SELECT max(t.id) FROM turns AS t WHERE t.session = x.s)
            FROM unnest(won, tokens) AS x(s, t);
        RETURN QUERY
            UPDATE turn_leases AS l SET waited = true
            WHERE l.session = ANY (p_sessions) AND (won IS NULL OR l.session <> ALL (won))
            RETURNING l.session, NULL::bigint,
                EXTRACT(EPOCH FROM l.expires_at - clock_timestamp())::float8, NULL::bigint;
    END
    $$""",
)

# Where a channel's Discord Gateway session stands (saved with each message id the leader records),
# so that a new leader RESUMEs it and Discord replays what was sent while nobody was connected.
_V4_inbound_sessions = (
    """CREATE TABLE inbound_sessions (
        channel TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        resume_url TEXT NOT NULL,
        seq BIGINT NOT NULL,
        saved_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2_storage, _V2_outbox, _V3_leases, _V4_inbound_sessions)
SCHEMA_VERSION = len(MIGRATIONS)

# pg_advisory_lock key of the migrations: the bytes of "nanobot" read as one number.
MIGRATION_LOCK = int.from_bytes(b"nanobot", "big")

_VERSIONS = """CREATE TABLE IF NOT EXISTS nanobot_schema (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


async def migrate(conn: asyncpg.Connection | PoolConnectionProxy) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` under the migration lock; the version found.

    Raises StorageError for a database from a newer nanobot (nothing is changed then).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_VERSIONS)
        found: int = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM nanobot_schema")
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"the database was written by a newer nanobot (schema {found}; this one knows "
                f"{SCHEMA_VERSION})"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            async with conn.transaction():
                for statement in MIGRATIONS[version - 1]:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO nanobot_schema (version) VALUES ($1)", version)
        return found
    finally:
        # (a connection lost meanwhile took its session-level lock with it)
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
