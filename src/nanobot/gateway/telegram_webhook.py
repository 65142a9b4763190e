"""Telegram webhook mode: the route Telegram POSTs each update to (``channels.telegram.webhook``).

Every process behind the public URL takes updates, so no process has to lead. A call is
authenticated by its ``X-Telegram-Bot-Api-Secret-Token`` header alone (compared in constant
time; 403 otherwise): the public host is not in ``api.allowedHosts`` and Telegram sends no
``Authorization``, so the route is outside ``/v1/`` (no Bearer key) and exempt from the Host
check (see :class:`~nanobot.gateway.browser.BrowserPolicy`). The Origin rules still apply:
Telegram sends no ``Origin``, a web page always does.

The body is bounded, the update's id recorded (Telegram retries a call whose answer it did not
see: the retry is answered 200 and dropped), then handed to the channel, and the call answered
at once: the agent's turn runs after the answer. Nothing could be recorded: 503, so Telegram
tries again later.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Protocol

import orjson
from aiohttp import web

from nanobot.errors import (
    ChannelError,
    ForbiddenError,
    PayloadTooLargeError,
    RequestError,
    ServiceUnavailableError,
    StorageError,
)
from nanobot.gateway.bodies import read_bounded
from nanobot.webhook_config import TelegramWebhookConfig

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = 1024 * 1024  # an update is a message of at most 4096 characters plus metadata
RETRY_AFTER = 5.0  # seconds, for a call that could not be taken now
_OK = orjson.dumps({"ok": True})


class UpdateSink(Protocol):
    """Where a webhook call's update goes: the Telegram channel."""

    async def take_update(self, update: dict[str, Any]) -> None:
        """Record the update's id and hand it on, unless taken before."""
        ...


def add_telegram_webhook(app: web.Application, webhook: TelegramWebhookConfig, sink: UpdateSink) -> None:
    """Serve ``POST <webhook.route>`` for Telegram, handing updates to ``sink``."""
    secret = webhook.secret.encode()

    async def receive(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, secret):
            raise ForbiddenError(f"Missing or wrong {SECRET_HEADER}.")
        update = await _read_update(request)
        try:
            await sink.take_update(update)
        except (ChannelError, StorageError) as exc:
            log.warning("telegram webhook: update not taken (%s); Telegram will send it again", exc.message)
            busy = ServiceUnavailableError("The update could not be taken now.", retry_after=RETRY_AFTER)
            raise busy from None
        return web.Response(body=_OK, content_type="application/json")

    app.router.add_post(webhook.route, receive)


async def _read_update(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, read up to :data:`MAX_UPDATE_BYTES` (413 past it, 400 if not JSON)."""
    body = await read_bounded(request, MAX_UPDATE_BYTES, _too_large)
    try:
        update = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError("The body is not JSON: expected a Telegram Update object.") from None
    if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
        raise RequestError("Expected a Telegram Update object with an integer update_id.")
    return update


def _too_large() -> PayloadTooLargeError:
    return PayloadTooLargeError(f"A Telegram update is at most {MAX_UPDATE_BYTES} bytes.")
