"""Display names for uploads: the client's file name is a label, never a path."""

from __future__ import annotations

import unicodedata

MAX_NAME_CHARS = 255
DEFAULT_NAME = "upload"


def sanitize_name(name: str | None) -> str:
    """The last path component of ``name``, without control or format characters, <= 255 chars.

    ``../../etc/passwd`` becomes ``passwd``; Windows separators count too. Bidi overrides
    and other invisible format characters (category Cf) are dropped so a name cannot
    disguise its extension. An empty result falls back to ``upload``.
    """
    if not name:
        return DEFAULT_NAME
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if unicodedata.category(ch) not in ("Cc", "Cf")).strip()
    if cleaned in ("", ".", ".."):
        return DEFAULT_NAME
    return cleaned[:MAX_NAME_CHARS]
