"""Reading a request body whole, with a bound: one helper for every route that takes a body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from nanobot.errors import PayloadTooLargeError


async def read_bounded(
    request: web.Request, limit: int, too_large: Callable[[], PayloadTooLargeError]
) -> bytes:
    """The whole body, at most ``limit`` bytes (``too_large()`` is raised past it: a declared
    length is refused before anything is read). Unlike ``request.read()`` the body is not kept on
    the request, so a large upload is held once, not for the whole turn."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise too_large()
        try:  # the usual case: one call, and the body is usually in the buffer already
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:  # the client stopped sending: what came
            return exc.partial
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)
