"""OpenAI error bodies, request ids and API-key auth: one middleware for every route."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from nanobot.errors import (
    AuthenticationError,
    MethodNotAllowedError,
    NanobotError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    UnsupportedMediaError,
)
from nanobot.gateway.ids import new_id

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("nanobot.request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(exc: NanobotError) -> dict[str, dict[str, str | None]]:
    """The OpenAI error object for ``exc``."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def error_headers(exc: NanobotError) -> dict[str, str]:
    """``x-should-retry`` and ``Retry-After`` for ``exc``, when it says so."""
    headers: dict[str, str] = {}
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return headers


def error_response(exc: NanobotError) -> web.Response:
    """A JSON response carrying the OpenAI error object for ``exc``."""
    return web.Response(
        status=exc.status,
        body=orjson.dumps(error_body(exc)),
        content_type="application/json",
        headers=error_headers(exc),
    )


def _translate_http(exc: web.HTTPException, request: web.Request) -> NanobotError:
    status = exc.status
    if status == 404:
        return NotFoundError(f"Unknown request URL: {request.method} {request.path}")
    if status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return MethodNotAllowedError(
            f"Method {request.method} is not allowed for {request.path}; use {allowed}"
        )
    if status == 413:
        return PayloadTooLargeError(f"Request body is too large: {exc.text or ''}".strip())
    if status == 415:
        return UnsupportedMediaError(exc.text or "unsupported media type")
    err = RequestError(exc.reason or "bad request")
    err.status = status
    return err


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return new_id("req_")


def make_middleware(api_key: str) -> Middleware:
    """The middleware: request id, auth on ``/v1/*``, and every error as an OpenAI error body."""
    expected = f"Bearer {api_key}".encode() if api_key else b""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = _request_id(request)
        request[REQUEST_ID] = rid
        resp: web.StreamResponse
        try:
            if expected and request.path.startswith("/v1/"):
                given = request.headers.get("Authorization", "").encode("utf-8", "replace")
                if not hmac.compare_digest(given, expected):
                    raise AuthenticationError(
                        "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'."
                    )
            resp = await handler(request)
        except NanobotError as exc:
            resp = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error_response(_translate_http(exc, request))
        except asyncio.CancelledError:
            raise
        except Exception:  # the last line of defence: log it, answer in OpenAI shape
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = error_response(NanobotError("The server had an error while processing your request."))
        if not resp.prepared:
            resp.headers["x-request-id"] = rid
        return resp

    return middleware
