"""Sessions over HTTP: list, read, rename and delete the API's sessions (``/v1/sessions``).

Only ``api:`` sessions are visible, by the id a chat request names (``default`` for the shared
one); a Telegram or Discord chat is never listed and is a 404 by id. The store is opened by
the runtime after the app is built, so the routes reach it through a slot it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from nanobot.errors import NotFoundError, PayloadTooLargeError, RequestError, ServiceUnavailableError
from nanobot.gateway.requests import check_session_id
from nanobot.storage.base import SessionInfo
from nanobot.storage.sessions import SessionStore

PREFIX = "api:"
MAX_MESSAGES = 1000  # messages returned by GET /v1/sessions/{id}: the newest whole turns
MAX_HISTORY_BYTES = 16 * 1024 * 1024  # and about this much stored JSON
MAX_TITLE = 200
_MAX_BODY = 64 * 1024


@dataclass(slots=True)
class StoreSlot:
    """The session store while the runtime has it open (None before start and after stop)."""

    store: SessionStore | None = None


SESSION_STORE = web.AppKey("nanobot.session_store", StoreSlot)


def _store(request: web.Request) -> SessionStore:
    store = request.app[SESSION_STORE].store
    if store is None:
        raise ServiceUnavailableError("the session store is not open (the server is starting or stopping)")
    return store


def _checked(value: str, param: str) -> str:
    """``value`` under the rules of a chat request's session_id, errors naming ``param``."""
    try:
        return check_session_id(value)
    except RequestError as exc:
        raise RequestError(exc.message.replace("session_id", param, 1), param=param) from None


def _session_key(request: web.Request) -> tuple[str, str]:
    """The id in the path and its store key."""
    sid = _checked(request.match_info["id"], "id")
    return sid, PREFIX + sid


def _not_found(sid: str) -> NotFoundError:
    return NotFoundError(f"No session {sid!r}: it has no stored turns.", param="id", code="session_not_found")


def _object(info: SessionInfo) -> dict[str, object]:
    return {
        "id": info.key.removeprefix(PREFIX),
        "object": "session",
        "title": info.title,
        "created": int(info.created),
        "updated": int(info.updated),
        "turns": info.turns,
        "preview": info.preview,
    }


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    # isascii: "²" is a digit to isdigit() but not to int(); len: no 5,000-digit int() parse
    if not (value.isascii() and value.isdigit() and len(value) <= 3) or not 1 <= int(value) <= 100:
        raise RequestError("limit must be a whole number from 1 to 100", param="limit")
    return int(value)


async def list_sessions(request: web.Request) -> web.Response:
    """``GET /v1/sessions?limit=20&after=<id>``: the API's sessions, newest first, paginated."""
    query = request.query
    limit = _limit(query.get("limit"))
    after = query.get("after") or None  # (an empty cursor is the first page)
    after_key = None if after is None else PREFIX + _checked(after, "after")
    found = await _store(request).page(PREFIX, limit, after_key)
    if found is None:
        raise RequestError(f"after: no session {after!r} to continue from", param="after")
    sessions, more = found
    data = [_object(s) for s in sessions]
    first = data[0]["id"] if data else None
    last = data[-1]["id"] if data else None
    return _json({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})


async def get_session(request: web.Request) -> web.Response:
    """``GET /v1/sessions/{id}``: the session and its stored messages in OpenAI chat format."""
    sid, key = _session_key(request)
    found = await _store(request).read(key, MAX_MESSAGES, MAX_HISTORY_BYTES)
    if found is None:
        raise _not_found(sid)
    info, messages, truncated = found
    return _json({**_object(info), "messages": messages, "truncated": truncated})


async def _title(request: web.Request) -> str:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise PayloadTooLargeError(f"the body is larger than {_MAX_BODY} bytes")
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise PayloadTooLargeError(f"the body is larger than {_MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"We could not parse the JSON body of your request: {exc}") from exc
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str):
        raise RequestError('send {"title": "..."}: title must be a string', param="title")
    if not title.strip() or len(title) > MAX_TITLE:
        raise RequestError(f"title must be 1 to {MAX_TITLE} characters, not blank", param="title")
    if not title.isprintable():
        raise RequestError("title must not contain control characters", param="title")
    return title


async def rename_session(request: web.Request) -> web.Response:
    """``PATCH /v1/sessions/{id}`` with ``{"title": "..."}``: the session, renamed."""
    sid, key = _session_key(request)
    title = await _title(request)
    info = await _store(request).rename(key, title)
    if info is None:
        raise _not_found(sid)
    return _json(_object(info))


async def delete_session(request: web.Request) -> web.Response:
    """``DELETE /v1/sessions/{id}``: its history is gone; the next request on it starts fresh.
    Waits for a turn running on that session to end first."""
    sid, key = _session_key(request)
    if not await _store(request).delete(key):
        raise _not_found(sid)
    return _json({"id": sid, "object": "session.deleted", "deleted": True})


def add_session_routes(app: web.Application) -> None:
    """Register the routes and the (empty) store slot the runtime fills."""
    app[SESSION_STORE] = StoreSlot()
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{id:.+}", get_session)
    app.router.add_patch("/v1/sessions/{id:.+}", rename_session)
    app.router.add_delete("/v1/sessions/{id:.+}", delete_session)
