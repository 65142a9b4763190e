"""``channels.telegram.webhook``: Telegram's webhook mode, its config and the checks made at start.

Split from :mod:`nanobot.config` (which keeps one concern: the config tree and its loading).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nanobot.config_loader import SECRET as _SECRET
from nanobot.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TelegramWebhookConfig:
    """Webhook mode: Telegram POSTs updates to ``url`` (any process behind it takes them) with
    ``secret`` in ``X-Telegram-Bot-Api-Secret-Token``; empty ``url``: long polling."""

    url: str = ""  # the public https:// URL Telegram calls
    secret: str = field(default="", repr=False, metadata=_SECRET)  # 16-256 of A-Z a-z 0-9 _ -
    path: str = ""  # the route served here, when a proxy rewrites it (default: the URL's path)

    @property
    def enabled(self) -> bool:
        """Whether updates come by webhook rather than by polling."""
        return bool(self.url)

    @property
    def route(self) -> str:
        """The path this server takes the webhook's calls on."""
        return self.path or urlsplit(self.url).path


# What Telegram accepts (1-256), at least 16 long: anyone who guesses it can make the bot talk.
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{16,256}")
_OWN_ROUTES = ("/v1/", "/health", "/metrics", "/static/")


def check_telegram_webhook(webhook: TelegramWebhookConfig) -> None:
    """Raise ConfigError for a webhook Telegram would refuse, or one that could be forged or
    would shadow one of the gateway's own routes."""
    where = "channels.telegram.webhook"
    if not webhook.enabled:
        if webhook.secret or webhook.path:
            raise ConfigError(f"{where}.url: required with a secret or path (the public https:// URL)")
        return
    parts = urlsplit(webhook.url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{where}.url: expected a public https:// URL (Telegram calls only https), "
                          f"got {webhook.url[:200]!r}")  # fmt: skip
    if not webhook.secret:
        raise ConfigError(f"{where}.secret: required: Telegram sends it with every call, and calls "
                          "without it are refused")  # fmt: skip
    if not _WEBHOOK_SECRET.fullmatch(webhook.secret):
        raise ConfigError(f"{where}.secret: expected 16-256 characters of A-Z, a-z, 0-9, _ and - "
                          "(Telegram accepts no others; a shorter one is guessable)")  # fmt: skip
    route = webhook.route
    if not route.startswith("/") or route == "/" or route.startswith(_OWN_ROUTES):
        raise ConfigError(f"{where}: the route {route[:200]!r} (from {'path' if webhook.path else 'url'}) "
                          "must be a path of its own, e.g. /telegram/webhook")  # fmt: skip
