"""Unique ids for requests and completions, cheap enough for every request.

A random per-process prefix and a counter: unique across restarts and processes, and no
system call per id. Ids are labels, not secrets.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)


def new_id(kind: str) -> str:
    """``<kind><12 random hex digits><counter>``, e.g. ``turn_1f2e3d4c5b6a42``."""
    return f"{kind}{_PREFIX}{next(_COUNTER)}"  # (a format spec such as :08x costs twice as much)
