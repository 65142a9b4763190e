"""``nanobot outbox list|retry ID|drop ID``: look into the durable outbox and fix it by hand.

``list`` shows every message not yet delivered (``--all`` adds the delivered ones).
``retry ID`` makes a failed, expired or held message pending again with fresh attempts;
``drop ID`` deletes a message. After a change, a running ``nanobot serve`` on the same
workspace is told at once (``SIGUSR1`` to the pid in ``<workspace>/nanobot.pid``, see
``lifecycle.py``): it sends a retried message now, and never sends a dropped one. With no
server running, the change takes effect at the next start.

With ``storage.url`` naming PostgreSQL, the commands act on the shared outbox, and every
server on that database is told through ``NOTIFY`` (see
:mod:`nanobot.storage.postgres.outbox_admin`) instead of a pid file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path
from typing import TextIO

from nanobot.config import Config, safe_url
from nanobot.delivery.lifecycle import notify_server
from nanobot.errors import StorageError
from nanobot.storage.outbox import OutboxEntry, State
from nanobot.storage.sqlite.outbox import connect, select
from nanobot.storage_config import StorageConfig

USAGE = "usage: nanobot outbox list [--all] | retry ID | drop ID"
_PREVIEW = 40
_ROW = "{:>6}  {:<9}  {:<9}  {:<14}  {:>5}  {:>6}  {}"


def outbox_command(config: Config, argv: list[str], out: TextIO | None = None) -> int:
    """Run one outbox subcommand; exit code 0 ok, 1 not found, 2 usage (an unusable file: StorageError)."""
    stream = out if out is not None else sys.stdout
    if config.storage.is_postgres:
        return _run_shared(config.storage, argv, stream, out is None)
    path = config.agents.defaults.workspace_path / "outbox.db"
    try:
        return _run(path, argv, stream, out is None)
    except sqlite3.Error as exc:  # not a database, damaged, locked past the busy timeout
        raise StorageError(f"cannot use the outbox {path}: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot use the outbox {path}: {exc.strerror or exc}") from None


def _run(path: Path, argv: list[str], stream: TextIO, usage_to_stderr: bool) -> int:
    match argv:
        case ["list"] | ["list", "--all"]:
            return _list(path, stream, everything=len(argv) == 2)
        case ["retry", ident] if ident.isdigit():
            return _change(path, int(ident), stream, retry=True)
        case ["drop", ident] if ident.isdigit():
            return _change(path, int(ident), stream, retry=False)
        case _:
            print(USAGE, file=sys.stderr if usage_to_stderr else stream)
            return 2


def _run_shared(config: StorageConfig, argv: list[str], out: TextIO, usage_to_stderr: bool) -> int:
    """The same commands on the PostgreSQL outbox (asyncpg, one connection per command)."""
    from nanobot.storage.postgres import outbox_admin  # (asyncpg is loaded only here)

    match argv:
        case ["list"] | ["list", "--all"]:
            return _print(asyncio.run(outbox_admin.list_entries(config, len(argv) == 2)), out)
        case ["retry" | "drop" as action, ident] if ident.isdigit():
            retry = action == "retry"
            if not asyncio.run(outbox_admin.change(config, int(ident), retry)):
                print(f"no outbox message {ident}" + (" that can be retried" if retry else ""), file=out)
                return 1
            told = f"every nanobot serve on {safe_url(config.url)} was told"
            what = f"retry {ident}: pending; {told} (sent now, or at the next start)" if retry else (
                f"drop {ident}: dropped; {told} (it will not be sent)")  # fmt: skip
            print(what, file=out)
            return 0
        case _:
            print(USAGE, file=sys.stderr if usage_to_stderr else out)
            return 2


def _list(path: Path, out: TextIO, everything: bool) -> int:
    return _print(_read(path, everything), out)


def _print(entries: list[OutboxEntry], out: TextIO) -> int:
    if not entries:
        print("the outbox is empty", file=out)
        return 0
    print(_ROW.format("ID", "STATE", "CHANNEL", "CHAT", "TRIES", "AGE", "TEXT / LAST ERROR"), file=out)
    now = time.time()
    for e in entries:
        text = e.content.replace("\n", " ")
        text = text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"
        detail = f"{text}  [{e.last_error}]" if e.last_error and e.state != State.DELIVERED else text
        age = _age(now - e.created_at)
        print(_ROW.format(e.id, str(e.state), e.channel, e.chat_id, e.attempts, age, detail), file=out)
    return 0


def _read(path: Path, everything: bool) -> list[OutboxEntry]:
    if not path.exists():
        return []
    conn = connect(path)
    try:
        states = None if everything else [s for s in State if s != State.DELIVERED]
        return select(conn, states)
    finally:
        conn.close()


def _change(path: Path, ident: int, out: TextIO, retry: bool) -> int:
    if not path.exists():
        print(f"no outbox message {ident}", file=out)
        return 1
    conn = connect(path)
    try:
        changed = _retry(conn, ident) if retry else _drop(conn, ident)
    finally:
        conn.close()
    if not changed:
        print(f"no outbox message {ident}" + (" that can be retried" if retry else ""), file=out)
        return 1
    print(_outcome(ident, retry, notify_server(path.parent)), file=out)
    return 0


def _outcome(ident: int, retry: bool, pid: int | None) -> str:
    """What changed, and whether a running server was told."""
    server = f"the running server (pid {pid})"
    if retry:
        later = "it will be sent at the next start of nanobot serve"
        return f"retry {ident}: pending; " + (later if pid is None else f"{server} will send it now")
    return f"drop {ident}: dropped" + ("" if pid is None else f"; {server} will not send it")


def _retry(conn: sqlite3.Connection, ident: int) -> bool:
    now = time.time()
    cur = conn.execute(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_at = ?, updated_at = ?, created_at = ? "
        "WHERE id = ? AND state IN ('failed', 'expired', 'held', 'pending')",
        (now, now, now, ident),
    )
    return cur.rowcount > 0


def _drop(conn: sqlite3.Connection, ident: int) -> bool:
    return conn.execute("DELETE FROM outbox WHERE id = ?", (ident,)).rowcount > 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
