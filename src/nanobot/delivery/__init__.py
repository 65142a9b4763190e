"""Delivery of the agent's outbound messages: api replies, the durable outbox, per-chat lanes.

``manager`` dispatches (api replies straight to the waiting response, everything else into the
outbox); ``outbox`` is the storage contract and its SQLite implementation (PostgreSQL:
:mod:`nanobot.storage.postgres.outbox`); ``lanes`` delivers in order per chat; ``lifecycle``
holds the backoff, late channel starts and hand edits; ``outbox_cli`` is ``nanobot outbox``.
Platform specifics stay in :mod:`nanobot.channels`.
"""
