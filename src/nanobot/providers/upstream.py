"""What an upstream failure looked like, in words a user can act on.

Only the failure paths call into this module: the hot path never pays for it. Every
text names the URL called (without secrets), the HTTP status, and a bounded excerpt of
what came back; an HTML page is called one (with its title), not "malformed JSON".
"""

from __future__ import annotations

import html
import re

import orjson

from nanobot.errors import ContextLengthError, ProviderError

EXCERPT_CHARS = 300
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
# The ways OpenAI, vLLM, llama.cpp, Ollama, Anthropic, Mistral, Groq and Gemini word "the
# prompt does not fit the model's context".
_CONTEXT = re.compile(
    r"context[_ ]length|context window|context size|maximum context|prompt is too long"
    r"|too many tokens|input token count|exceeds the (?:available )?context"
    r"|reduce the length of the (?:messages|prompt)",
    re.IGNORECASE,
)
_CONTEXT_STATUSES = frozenset({400, 413, 422})


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = _SPACE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[:limit] + "…"


def looks_like_html(body: bytes, content_type: str = "") -> bool:
    """Whether ``body`` is a web page (a proxy's or a login page) rather than an API answer."""
    if content_type == "text/html":
        return True
    head = body[:256].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def describe_body(body: bytes, content_type: str = "") -> str:
    """A short account of ``body``: the API's own error message, an HTML page, or an excerpt."""
    if not body.strip():
        return "an empty body"
    if looks_like_html(body, content_type):
        found = _TITLE.search(body[:65536])
        title = excerpt(html.unescape(found.group(1).decode("utf-8", "replace")), 120) if found else ""
        return f'an HTML page ("{title}")' if title else "an HTML page"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"a body that is not JSON: {excerpt(body[:4096].decode('utf-8', 'replace'))}"
    message = api_error_message(parsed)
    if message is not None:
        return excerpt(message, 1000)
    return excerpt(body[:4096].decode("utf-8", "replace"))


def api_error_message(parsed: object) -> str | None:
    """The ``error.message`` (or ``error`` string, or ``message``) of a parsed error body."""
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error")
    if isinstance(err, dict):
        message = err.get("message")
        return message if isinstance(message, str) else None
    if isinstance(err, str):
        return err
    message = parsed.get("message") or parsed.get("detail")
    return message if isinstance(message, str) else None


def _api_error_code(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    err = parsed.get("error") if isinstance(parsed, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else ""


def status_error(url: str, status: int, body: bytes, content_type: str) -> ProviderError | ContextLengthError:
    """The error for a non-200 answer; a context-length refusal is a :class:`ContextLengthError`."""
    what = describe_body(body, content_type)
    if status in _CONTEXT_STATUSES and (
        _api_error_code(body) == "context_length_exceeded" or _CONTEXT.search(what)
    ):
        return context_length_error(url, f"HTTP {status}", what)
    hint = " (check the provider's apiBase)" if what.startswith("an HTML page") or status == 404 else ""
    if status in (401, 403):
        hint = " (check the provider's apiKey)"
    return ProviderError(f"upstream LLM returned HTTP {status} from {url}: {what}{hint}")


def context_length_error(url: str, how: str, what: str) -> ContextLengthError:
    """The refusal the agent recovers from by dropping old turns (``how``: "HTTP 400", "in the stream")."""
    return ContextLengthError(f"the request does not fit the model's context ({how} from {url}: {what})")


def is_context_length(message: str) -> bool:
    """Whether an error text says the prompt does not fit the model's context."""
    return _CONTEXT.search(message) is not None


def bad_completion(url: str, body: bytes, content_type: str, why: str) -> ProviderError:
    """The error for a 200 answer that is not a chat completion."""
    return ProviderError(
        f"upstream LLM at {url} answered HTTP 200 with {describe_body(body, content_type)}, "
        f"not a chat completion ({why})"
    )
