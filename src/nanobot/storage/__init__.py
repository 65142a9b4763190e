"""Storage: sessions, turn leases, the outbox and inbound update ids, on SQLite or PostgreSQL.

Today the embedded SQLite implementations still live in :mod:`nanobot.sessions` and
:mod:`nanobot.channels.outbox`; :mod:`nanobot.storage.postgres` implements the same contracts on a
PostgreSQL shared by any number of processes (``storage.url = postgresql://...``). The
restructuring of issue 9 moves the Protocols and the SQLite side in here, next to it.
"""
