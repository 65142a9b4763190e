"""The statements of the PostgreSQL outbox (:mod:`nanobot.storage.postgres.outbox`).

Times the processes compare (lane leases, rate-limit holds) are the server's clock
(``clock_timestamp()``), so the machines' clocks do not matter; the message columns keep the
SQLite table's epoch seconds, written by the process that changes the row.
"""

from __future__ import annotations

CHANNEL = "nanobot_outbox"  # NOTIFY: the outbox changed (payload ""), or a hold (see HOLD_PREFIX)
HOLD_PREFIX = "hold "  # payload "hold <seconds> <channel>": a platform's Retry-After for all

COLUMNS = (
    "o.id, o.uid, o.channel, o.chat_id, o.kind, o.content, o.metadata, o.state, o.attempts, "
    "o.parts_done, o.created_at, o.updated_at, o.next_at, o.last_error"
)

# New messages, in the given order (uids are ours: RETURNING order is not promised).
INSERT = """
INSERT INTO outbox AS o
    (uid, channel, chat_id, kind, content, metadata, state, created_at, updated_at, next_at)
SELECT u.uid, u.channel, u.chat_id, u.kind, u.content, u.metadata, u.state, $8, $8, $8
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     WITH ORDINALITY AS u (uid, channel, chat_id, kind, content, metadata, state, n)
ORDER BY u.n
RETURNING o.id, o.uid
"""

# Every chat with messages has a lane row (sorted: two processes adding the same new lanes
# never wait on each other in opposite orders).
ENSURE_LANES = """
INSERT INTO outbox_lanes (channel, chat_id)
SELECT DISTINCT c, i FROM unnest($1::text[], $2::text[]) AS u (c, i) ORDER BY c, i
ON CONFLICT DO NOTHING
"""

# Claim free (or expired) lanes of the channels this process delivers, with pending work; a
# lane another transaction is claiming is skipped, not waited for. $4/$5: only these lanes
# (the ones a batch was just added to), or NULL for any.
CLAIM = """
WITH free AS (
    SELECT l.channel, l.chat_id FROM outbox_lanes l
    WHERE l.channel = ANY($1::text[]) AND l.expires_at <= clock_timestamp()
      AND ($4::text[] IS NULL OR (l.channel, l.chat_id) IN (SELECT * FROM unnest($4::text[], $5::text[])))
      AND EXISTS (SELECT 1 FROM outbox o WHERE o.channel = l.channel AND o.chat_id = l.chat_id
                  AND o.state = 'pending')
    ORDER BY l.channel, l.chat_id
    LIMIT $6
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox_lanes l
SET holder = $2, token = nextval('outbox_lane_tokens'),
    expires_at = clock_timestamp() + make_interval(secs => $3)
FROM free WHERE l.channel = free.channel AND l.chat_id = free.chat_id
RETURNING l.channel, l.chat_id, l.token
"""

# Keep the lanes still ours (the ones not returned were taken over after our lease ran out).
RENEW = """
UPDATE outbox_lanes SET expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE holder = $1 AND token = ANY($2::bigint[])
RETURNING channel, chat_id, token
"""

# Give back the lanes with nothing pending (a message added later claims its lane again).
RELEASE_IDLE = """
UPDATE outbox_lanes l SET holder = '', expires_at = '-infinity'
WHERE l.holder = $1 AND l.token = ANY($2::bigint[])
  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.channel = l.channel AND o.chat_id = l.chat_id
                  AND o.state = 'pending')
RETURNING l.token
"""

RELEASE_ALL = """
UPDATE outbox_lanes SET holder = '', expires_at = '-infinity'
WHERE holder = $1 AND token = ANY($2::bigint[])
"""

# The pending messages of the lanes we hold, in order.
MINE = f"""
SELECT {COLUMNS} FROM outbox o
JOIN outbox_lanes l ON l.channel = o.channel AND l.chat_id = o.chat_id
WHERE l.holder = $1 AND l.token = ANY($2::bigint[]) AND o.state = 'pending'
ORDER BY o.id
"""

# Pending messages of these lanes stored before a given id (by any process), oldest first.
PENDING_BEFORE = f"""
SELECT {COLUMNS} FROM outbox o
WHERE o.state = 'pending' AND o.id < $3
  AND (o.channel, o.chat_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY o.id
"""

# When the soonest lease of another process's lane with pending work ends (seconds from now).
NEXT_EXPIRY = """
SELECT EXTRACT(EPOCH FROM MIN(l.expires_at) - clock_timestamp())::float8 FROM outbox_lanes l
WHERE l.channel = ANY($1::text[]) AND l.expires_at > clock_timestamp()
  AND NOT (l.holder = $2 AND l.token = ANY($3::bigint[]))
  AND EXISTS (SELECT 1 FROM outbox o WHERE o.channel = l.channel AND o.chat_id = l.chat_id
              AND o.state = 'pending')
"""

# A delivery attempt's result, fenced: only while the lane's token is still ours.
SAVE = """
UPDATE outbox o SET state = $2, attempts = $3, parts_done = $4, updated_at = $5, next_at = $6,
    last_error = $7
WHERE o.id = $1 AND EXISTS (SELECT 1 FROM outbox_lanes l WHERE l.channel = o.channel
                            AND l.chat_id = o.chat_id AND l.token = $8)
"""

# At each re-read: held messages of the channels this process delivers go out (or expire when
# older than heldMaxAgeSeconds). Pending ones of channels not enabled here stay pending:
# another process may deliver them.
EXPIRE_HELD = """
UPDATE outbox SET state = 'expired', updated_at = $2, last_error = 'held too long'
WHERE state = 'held' AND created_at < $3 AND channel = ANY($1::text[])
"""
RELEASE_HELD = """
UPDATE outbox SET state = 'pending', updated_at = $2, next_at = $2
WHERE state = 'held' AND channel = ANY($1::text[])
"""
PRUNE_DELIVERED = "DELETE FROM outbox WHERE state = 'delivered' AND updated_at < $1"

COUNTS = "SELECT state, COUNT(*) FROM outbox WHERE state = ANY($1::text[]) GROUP BY state"

# A platform's Retry-After, for every process: the later of the stored and the new end.
HOLD = f"""
WITH held AS (
    INSERT INTO outbox_holds AS h (channel, bucket, not_before)
    VALUES ($1, '*', clock_timestamp() + make_interval(secs => $2))
    ON CONFLICT (channel, bucket) DO UPDATE SET not_before = GREATEST(h.not_before, EXCLUDED.not_before)
    RETURNING channel
)
SELECT pg_notify('{CHANNEL}', '{HOLD_PREFIX}' || $2::text || ' ' || channel) FROM held
"""
HOLDS = """
SELECT channel, EXTRACT(EPOCH FROM not_before - clock_timestamp())::float8 AS seconds
FROM outbox_holds WHERE bucket = '*' AND not_before > clock_timestamp()
"""

NOTIFY = f"SELECT pg_notify('{CHANNEL}', '')"
