"""``allowFrom``: which platform users may talk to the agent."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class AllowList:
    """User ids or usernames (``@`` optional, any case); ``"*"`` admits everyone, empty no one.

    A denied sender is logged once, with the id and username the operator can add.
    """

    __slots__ = ("_channel", "_everyone", "_ids", "_logged")

    def __init__(self, channel: str, entries: list[str]) -> None:
        self._channel = channel
        self._everyone = "*" in entries
        self._ids = frozenset(e.strip().removeprefix("@").lower() for e in entries if e.strip())
        self._logged: set[str] = set()

    def permits(self, sender_id: str, username: str = "") -> bool:
        """True when the sender may talk to the agent; logs the first denial of each sender."""
        if self._everyone or sender_id in self._ids:
            return True
        if username and username.removeprefix("@").lower() in self._ids:
            return True
        if sender_id not in self._logged:
            self._logged.add(sender_id)
            log.warning(
                "%s: ignored a message from user id %s (username %s): not in channels.%s.allowFrom; "
                'add "%s" there to let them in',
                self._channel,
                sender_id,
                f"@{username}" if username else "none",
                self._channel,
                sender_id,
            )
        return False
