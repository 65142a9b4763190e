"""Failures raised inside an extractor process, turned into :mod:`nanobot.errors` by the caller.

They carry only a reason (the caller adds the file name) and cross the process
boundary as plain data, so they stay independent of the HTTP-facing error tree.
"""

from __future__ import annotations


class Unreadable(Exception):
    """The document is corrupt, encrypted, too big once unpacked, or otherwise unreadable (422)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unsupported(Exception):
    """The container holds no format we read, e.g. a plain ZIP archive (415)."""

    def __init__(self, looks_like: str) -> None:
        super().__init__(looks_like)
        self.looks_like = looks_like
