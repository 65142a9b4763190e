"""Keep configured secrets out of error texts and log lines.

The secrets are the config fields marked ``secret`` (provider keys and extra headers,
``api.apiKey``, bot tokens), found by walking the config, so a new secret field is covered
by marking it. While :func:`secrets_redacted` is active, :func:`redact` replaces them in a
text, and every log record created anywhere in the process has them replaced in its message
and traceback. Logging is process-wide, so the set of secrets is too: the union of every
active :func:`secrets_redacted` (tests run several gateways in one process).

The cost stays off the hot path: :func:`redact` is called on error texts only, and a log
record is formatted once more only while secrets are configured.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MIN_SECRET_CHARS = 8  # shorter values would redact ordinary words; such a key is weak anyway
REDACTED = "[redacted]"

_counts: collections.Counter[str] = collections.Counter()
_pattern: re.Pattern[str] | None = None
_previous_factory: Callable[..., logging.LogRecord] | None = None
_formatter = logging.Formatter()


def config_secrets(config: object) -> frozenset[str]:
    """Every non-trivial secret value in ``config``: fields whose metadata says ``secret``."""
    found: set[str] = set()
    _collect(config, False, found)
    return frozenset(s for s in found if len(s) >= MIN_SECRET_CHARS)


def _collect(value: object, secret: bool, found: set[str]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _collect(getattr(value, f.name), secret or bool(f.metadata.get("secret")), found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, secret, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect(item, secret, found)
    elif secret and isinstance(value, str) and value:
        found.add(value)
        found.update(url_passwords(value))


def url_passwords(value: str) -> list[str]:
    """The password inside a secret URL (``storage.url``), as written and decoded: an error may
    quote either without the rest of the URL."""
    if "://" not in value:
        return []
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return []
    found = [password, unquote(password)] if password else []
    for name, given in parse_qsl(parts.query):
        if name == "password" and given:  # (libpq also takes it as a query parameter)
            found += [given, quote(given, safe="")]
    return found


def redact(text: str) -> str:
    """``text`` with every active secret replaced by ``[redacted]``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(REDACTED, text)


@contextlib.contextmanager
def secrets_redacted(secrets: Iterable[str]) -> Iterator[None]:
    """Redact ``secrets`` from :func:`redact` and from every log record while active."""
    mine = [s for s in secrets if len(s) >= MIN_SECRET_CHARS]
    _counts.update(mine)
    _refresh()
    try:
        yield
    finally:
        _counts.subtract(mine)
        _refresh()


def _refresh() -> None:
    global _pattern, _previous_factory
    for gone in [s for s, n in _counts.items() if n <= 0]:
        del _counts[gone]
    # Longest first, so a secret that contains another is replaced whole.
    live = sorted(_counts, key=len, reverse=True)
    _pattern = re.compile("|".join(map(re.escape, live))) if live else None
    current = logging.getLogRecordFactory()
    if _pattern is not None and _previous_factory is None:
        _previous_factory = current
        logging.setLogRecordFactory(_make_record)
    elif _pattern is None and current is _make_record:
        # Only when nobody wrapped ours since; otherwise ours stays in their chain, passing through.
        logging.setLogRecordFactory(_previous_factory or logging.LogRecord)
        _previous_factory = None


def _make_record(*args: object, **kwargs: object) -> logging.LogRecord:
    factory: Callable[..., logging.LogRecord] = _previous_factory or logging.LogRecord
    record: logging.LogRecord = factory(*args, **kwargs)
    pattern = _pattern
    if pattern is not None:
        _redact_record(record, pattern)
    return record


def _redact_record(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string or __str__: logging reports it when the record is emitted
        return
    if pattern.search(message):
        record.msg = pattern.sub(REDACTED, message)
        record.args = ()
    if record.exc_info and record.exc_info[1] is not None:
        text = _formatter.formatException(record.exc_info)
        if pattern.search(text):
            # The formatter uses exc_text as given rather than formatting the exception again.
            record.exc_text = pattern.sub(REDACTED, text)
