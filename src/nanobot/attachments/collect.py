"""Bounded text output: extractors stop reading once the model's budget is spent."""

from __future__ import annotations


class TextCollector:
    """Accumulates extracted text up to ``limit`` characters, counting what it drops.

    Extractors call :meth:`add` for each piece (a page, a row, a paragraph) and stop
    reading the document as soon as it returns ``False``, so a huge file costs no more
    than its first ``limit`` characters.
    """

    __slots__ = ("_limit", "_parts", "_size", "dropped")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self.dropped = 0

    @property
    def full(self) -> bool:
        """Whether the budget is spent (further text is only counted)."""
        return self._size >= self._limit

    def add(self, text: str) -> bool:
        """Append ``text`` (cut at the budget); ``False`` once the budget is spent."""
        room = self._limit - self._size
        if len(text) <= room:
            self._parts.append(text)
            self._size += len(text)
            return self._size < self._limit
        if room > 0:
            self._parts.append(text[:room])
            self._size = self._limit
        self.dropped += len(text) - max(room, 0)
        return False

    def result(self, unread: str = "") -> str:
        """The collected text, ending with a visible marker if anything was left out.

        ``unread`` names the part of the document not even read (e.g. "12 more pages").
        """
        text = "".join(self._parts)
        if not self.dropped and not unread:
            return text
        marker = f"[... truncated: {self.dropped:,} more characters"
        if unread:
            marker += f", then {unread} not read"
        return f"{text}\n{marker}]"


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a visible marker when cut."""
    collector = TextCollector(limit)
    collector.add(text)
    return collector.result()
