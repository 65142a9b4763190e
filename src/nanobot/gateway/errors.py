"""OpenAI error bodies, request ids, browser rules and API-key auth: one middleware for every
route; and aiohttp's own malformed-request errors logged in one line."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
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
from nanobot.gateway.browser import CORS_ORIGIN, BrowserPolicy, preflight
from nanobot.gateway.ids import new_id
from nanobot.redact import redact

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("nanobot.request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(exc: NanobotError) -> dict[str, dict[str, str | None]]:
    """The OpenAI error object for ``exc``; configured secrets (an upstream may quote its key)
    are redacted here, where every error bound for a client passes, JSON body and SSE event alike."""
    param = exc.param
    return {
        "error": {
            "message": _encodable(redact(exc.message)),
            "type": exc.type,
            "param": param if param is None else _encodable(param),
            "code": exc.code,
        }
    }


def _encodable(text: str) -> str:
    """``text`` without lone surrogates (a non-UTF-8 name decoded with ``surrogateescape`` would
    make the JSON encoder fail while answering, i.e. a plain-text 500)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def _authorized(given: str | None, key: bytes) -> bool:
    """``Authorization: Bearer <key>``, the scheme in any case (RFC 7235); the key compared in
    constant time."""
    if given is None:
        return False
    scheme, _, token = given.partition(" ")
    matches = hmac.compare_digest(token.strip(" ").encode("utf-8", "replace"), key)
    return matches and scheme.lower() == "bearer"


def _browser_rules(request: web.Request, policy: BrowserPolicy) -> str | None:
    """Apply the Host and Origin rules; the origin when this is a CORS request."""
    headers = request.headers
    host = headers.get("Host")
    policy.check_host(host, request)
    origin = headers.get("Origin")
    if origin is None:
        if headers.get("Sec-Fetch-Site") == "cross-site":
            raise policy.refuse_cross_site()
        return None
    if policy.check_origin(origin, host):
        request[CORS_ORIGIN] = origin
    return origin


def _is_preflight(request: web.Request) -> bool:
    """An ``OPTIONS`` on an existing ``/v1/*`` route (405 is what the router says for it)."""
    if request.method != "OPTIONS" or not request.path.startswith("/v1/"):
        return False
    routed = request.match_info.http_exception
    return routed is None or routed.status == 405


def make_middleware(api_key: str, policy: BrowserPolicy) -> Middleware:
    """The middleware: request id, browser rules, auth on ``/v1/*``, and every error as an
    OpenAI error body."""
    key = api_key.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = _request_id(request)
        request[REQUEST_ID] = rid
        resp: web.StreamResponse
        try:
            path = request.path
            # /health is liveness: probes send all kinds of Host, and "ok" tells a page nothing.
            origin = _browser_rules(request, policy) if path != "/health" else None
            if origin is not None and _is_preflight(request):
                # Before auth: browsers never send credentials on a preflight.
                resp = preflight(origin, request.headers.get("Access-Control-Request-Headers"))
            else:
                if (
                    key
                    and path.startswith("/v1/")
                    and not _authorized(request.headers.get("Authorization"), key)
                ):
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


HTTP_LOG = logging.getLogger("nanobot.gateway.http")


class OneLineBadRequests(logging.Filter):
    """aiohttp logs each malformed request (bad request line, oversized or invalid header) with
    a traceback whose message quotes the raw line, a client's ``Authorization`` header included.
    Make it one warning naming the peer and the kind of error, without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite aiohttp's record in place; never drop it."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed request from %s: %s %s (%s)"
            record.args = (peer, exc.code, type(exc).__name__, summarize_parse_error(exc.message))
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:  # the client's mistake, not the server's
                record.levelno = logging.WARNING
                record.levelname = logging.getLevelName(logging.WARNING)
        return True


def summarize_parse_error(message: object) -> str:
    """aiohttp's description of a parse error, cut before the raw bytes it quotes."""
    text = str(message)
    for stop in (":", "'", '"', "\n"):
        text = text.split(stop, 1)[0]
    return text.strip()[:80] or "unparseable"


ONE_LINE_BAD_REQUESTS = OneLineBadRequests()
