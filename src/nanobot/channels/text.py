"""Text shaping for chat platforms: split long Markdown, render Markdown as Telegram HTML.

``split_markdown`` cuts at paragraph, then line, then word boundaries and never leaves a
code fence open across a cut: the fence is closed at the end of one part and reopened
(with its language) at the start of the next, so every part renders on its own.

``markdown_to_telegram_html`` renders the Markdown subset chat models write (bold, italic,
strikethrough, inline code, fenced code, links, headings, bullets, blockquotes) into the HTML that
Telegram's ``parse_mode: HTML`` accepts, escaping everything else. It is not a full
CommonMark parser: on odd input Telegram may reject the markup, and the caller falls back
to plain text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator

Measure = Callable[[str], int]

_FENCE_RE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)")


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the way Telegram counts message length."""
    return len(text.encode("utf-16-le")) // 2


# --------------------------------------------------------------------------- splitting


def split_markdown(text: str, limit: int, measure: Measure = len) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` (as ``measure`` counts), fences kept whole."""
    if measure(text) <= limit:
        return [text]
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, limit, measure):
        if current and measure(current) + 2 + measure(piece) <= limit:
            current = f"{current}\n\n{piece}"
            continue
        if current:
            parts.append(current)
        current = piece
    if current:
        parts.append(current)
    return parts


def _blocks(text: str) -> Iterator[tuple[list[str], str, str]]:
    """Yield ``(lines, fence_opener, fence_closer)``: paragraphs (opener "") and fenced blocks."""
    lines: list[str] = []
    opener = closer = ""
    for line in text.split("\n"):
        if opener:  # inside a fence
            lines.append(line)
            if line.strip().startswith(closer) and line.strip().strip(closer[0]) == "":
                yield lines, opener, closer
                lines, opener, closer = [], "", ""
            continue
        fence = _FENCE_RE.match(line)
        if fence:
            if lines:
                yield lines, "", ""
            lines, opener, closer = [line], line.strip(), fence.group(1)
        elif line.strip():
            lines.append(line)
        elif lines:
            yield lines, "", ""
            lines = []
    if lines:
        yield lines, opener, closer


def _pieces(text: str, limit: int, measure: Measure) -> Iterator[str]:
    """Yield self-contained pieces, each within ``limit``."""
    for lines, opener, closer in _blocks(text):
        block = "\n".join(lines)
        if measure(block) <= limit:
            yield block
        elif opener:
            yield from _split_fence(lines, opener, closer, limit, measure)
        else:
            yield from _pack(lines, limit, measure, "", "")


def _split_fence(lines: list[str], opener: str, closer: str, limit: int, measure: Measure) -> Iterator[str]:
    body = lines[1:]
    if body and body[-1].strip().startswith(closer):
        body = body[:-1]
    yield from _pack(body, limit, measure, opener + "\n", "\n" + closer)


def _pack(lines: list[str], limit: int, measure: Measure, head: str, tail: str) -> Iterator[str]:
    """Pack whole lines into pieces ``head + lines + tail``; hard-split lines that cannot fit."""
    room = limit - measure(head) - measure(tail)
    if room < 1:
        raise ValueError("limit too small for a code fence")
    chunk: list[str] = []
    size = -1  # no newline before the first line
    for line in lines:
        for segment in _cut_line(line, room, measure):
            cost = measure(segment) + 1
            if chunk and size + cost > room:
                yield head + "\n".join(chunk) + tail
                chunk, size = [], -1
            chunk.append(segment)
            size += cost
    if chunk:
        yield head + "\n".join(chunk) + tail


def _cut_line(line: str, room: int, measure: Measure) -> Iterator[str]:
    """Cut one over-long line at the last space that fits, else mid-word."""
    while measure(line) > room:
        cut = _fit(line, room, measure)
        space = line.rfind(" ", 0, cut)
        if space > cut // 2:
            cut = space
        yield line[:cut]
        line = line[cut:].lstrip(" ")
    yield line


def _fit(line: str, room: int, measure: Measure) -> int:
    """The longest prefix length of ``line`` whose measure is within ``room`` (at least 1)."""
    low, high = 1, min(len(line), room)
    while low < high:
        mid = (low + high + 1) // 2
        if measure(line[:mid]) <= room:
            low = mid
        else:
            high = mid - 1
    return low


# --------------------------------------------------------------------------- Telegram HTML

_CODE_RE = re.compile(r"`([^`\n]+)`")
# A URL may hold balanced parentheses (CommonMark): .../wiki/Foo_(bar) is one link.
_LINK_RE = re.compile(r"\[([^\]\n]+)\]\((https?://(?:[^\s()]|\([^\s()]*\))+)\)")
# Underscores only count at word boundaries (CommonMark's flanking rules for ``_``): never
# inside a word (foo__bar__baz), and ``__name__`` (one identifier: a Python dunder) stays literal.
_BOLD_RE = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|(?<!\w)__(?!\w+__(?!\w))(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC_RE = re.compile(
    r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"  # *italic*, not 2 * 3 * 4
    r"|(?<!\w)_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)"  # _italic_, not snake_case_names nor __dunder__
)
_QUOTE_RE = re.compile(r"^\s{0,3}(?:>\s?)+")  # nested quotes flatten: Telegram has one level
_STRIKE_RE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.+?)\s*#*$")
_BULLET_RE = re.compile(r"^(\s*)[-*+]\s+")
_PLACEHOLDER_RE = re.compile("\x00(\\d+)\x00")


def markdown_to_telegram_html(text: str) -> str:
    """Render chat-style Markdown as Telegram HTML (``parse_mode: HTML``)."""
    out: list[str] = []
    code: list[str] = []
    quote: list[str] = []  # rendered lines of the blockquote being read
    fence_lang: str | None = None
    closer = ""
    for line in text.split("\n"):
        if fence_lang is not None:
            if line.strip().startswith(closer) and line.strip().strip(closer[0]) == "":
                out.append(_pre(code, fence_lang))
                fence_lang, code = None, []
            else:
                code.append(line)
            continue
        quoted = _QUOTE_RE.match(line)
        if quoted:
            quote.append(_render_line(line[quoted.end() :]))
            continue
        if quote:
            out.append(_blockquote(quote))
            quote = []
        fence = _FENCE_RE.match(line)
        if fence:
            fence_lang, closer = fence.group(2), fence.group(1)
            continue
        out.append(_render_line(line))
    if quote:
        out.append(_blockquote(quote))
    if fence_lang is not None:  # an unclosed fence runs to the end
        out.append(_pre(code, fence_lang))
    return "\n".join(out)


def _blockquote(lines: list[str]) -> str:
    return "<blockquote>" + "\n".join(lines) + "</blockquote>"


def _pre(code: list[str], lang: str) -> str:
    body = html.escape("\n".join(code), quote=False)
    if lang:
        return f'<pre><code class="language-{html.escape(lang)}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def _render_line(line: str) -> str:
    heading = _HEADING_RE.match(line)
    if heading:
        return f"<b>{_render_inline(heading.group(1))}</b>"
    bullet = _BULLET_RE.match(line)
    if bullet:
        return f"{bullet.group(1)}• {_render_inline(line[bullet.end() :])}"
    return _render_inline(line)


def _render_inline(text: str) -> str:
    """Inline Markdown → HTML; code spans and links are set aside first so nothing renders inside them."""
    held: list[str] = []

    def hold(fragment: str) -> str:
        held.append(fragment)
        return f"\x00{len(held) - 1}\x00"

    text = text.replace("\x00", "")
    text = _CODE_RE.sub(lambda m: hold(f"<code>{html.escape(m.group(1), quote=False)}</code>"), text)
    # A link's label stays in the text (it may hold bold or code); only its tags are set aside.
    text = _LINK_RE.sub(lambda m: hold(_link_open(m.group(2))) + m.group(1) + hold("</a>"), text)
    text = html.escape(text, quote=False)
    text = _BOLD_RE.sub(lambda m: f"<b>{m.group(1) or m.group(2)}</b>", text)
    text = _ITALIC_RE.sub(lambda m: f"<i>{m.group(1) or m.group(2)}</i>", text)
    text = _STRIKE_RE.sub(lambda m: f"<s>{m.group(1)}</s>", text)
    return _PLACEHOLDER_RE.sub(lambda m: held[int(m.group(1))], text)


def _link_open(url: str) -> str:
    return f'<a href="{html.escape(url, quote=True)}">'
