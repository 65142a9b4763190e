"""Splitting long Markdown and rendering it as Telegram HTML."""

from __future__ import annotations

import pytest

from nanobot.channels.text import markdown_to_telegram_html, split_markdown, utf16_len

from fake_platforms import telegram_visible_text


def test_short_text_is_one_part() -> None:
    """A message under the limit is sent as it is."""
    assert split_markdown("hello\n\nworld", 100) == ["hello\n\nworld"]


def test_split_prefers_paragraph_boundaries() -> None:
    """Paragraphs stay whole when they fit, and every part is under the limit."""
    paragraphs = [f"paragraph {i} " + "word " * 15 for i in range(20)]
    parts = split_markdown("\n\n".join(paragraphs), 300)
    assert all(len(p) <= 300 for p in parts)
    assert "\n\n".join(parts).split("\n\n") == [p.strip("\n") for p in paragraphs]


def test_split_keeps_lines_whole_inside_a_long_paragraph() -> None:
    """A paragraph longer than the limit is cut between lines, never inside one."""
    lines = [f"line number {i}" for i in range(200)]
    parts = split_markdown("\n".join(lines), 500)
    assert len(parts) > 1
    assert all(len(p) <= 500 for p in parts)
    assert [line for p in parts for line in p.split("\n")] == lines


def test_split_closes_and_reopens_code_fences() -> None:
    """A code block cut in two is closed at the end of one part and reopened, with its language."""
    code = "\n".join(f"print({i})" for i in range(300))
    text = f"Here is the code:\n\n```python\n{code}\n```\n\nDone."
    parts = split_markdown(text, 1000)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 1000
        assert part.count("```") % 2 == 0, part
    fenced = [p for p in parts if "print(" in p]
    assert all(p.lstrip().startswith("```python") or "```python" in p for p in fenced)
    body = [line for p in parts for line in p.split("\n") if line.startswith("print(")]
    assert body == code.split("\n")


def test_split_cuts_an_overlong_line_at_a_space() -> None:
    """A single line longer than the limit is cut at word boundaries."""
    text = " ".join(f"w{i}" for i in range(1000))
    parts = split_markdown(text, 200)
    assert all(len(p) <= 200 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_split_counts_utf16_units_for_telegram() -> None:
    """Emoji count as two units, as Telegram counts them."""
    text = "😀" * 5000
    parts = split_markdown(text, 4096, utf16_len)
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert "".join(parts) == text


def test_render_basic_markdown() -> None:
    """Bold, italic, inline code, code blocks, links and headings become Telegram HTML."""
    md = "# Title\n**bold** *it* `x<y` [site](https://e.com/?a=1&b=2)\n```py\nif a < b:\n    pass\n```"
    html = markdown_to_telegram_html(md)
    assert "<b>Title</b>" in html
    assert "<b>bold</b> <i>it</i> <code>x&lt;y</code>" in html
    assert '<a href="https://e.com/?a=1&amp;b=2">site</a>' in html
    assert '<pre><code class="language-py">if a &lt; b:\n    pass</code></pre>' in html


def test_render_escapes_html_and_leaves_plain_symbols() -> None:
    """Angle brackets and ampersands are escaped; snake_case and arithmetic are not formatted."""
    html = markdown_to_telegram_html("a <b> & c, my_var_name, 2 * 3 * 4")
    assert html == "a &lt;b&gt; &amp; c, my_var_name, 2 * 3 * 4"


@pytest.mark.parametrize(
    "md",
    [
        "**bold with `code` inside**",
        "- item *one*\n- item **two**\n* item three",
        "unclosed **bold and `code",
        "```\nunclosed fence <tag>",
        "[**bold link**](https://x.y/z)",
        "nested ~~strike **bold**~~ text",
    ],
)
def test_rendered_markup_is_valid_telegram_html(md: str) -> None:
    """Common chat Markdown renders to HTML that Telegram's parser accepts."""
    telegram_visible_text(markdown_to_telegram_html(md))


def test_link_url_with_parentheses_is_kept_whole() -> None:
    """A Wikipedia-style URL with `(...)` links to the whole address, not up to the first `)`."""
    html = markdown_to_telegram_html("see [wiki](https://en.wikipedia.org/wiki/Foo_(bar)) now")
    assert html == 'see <a href="https://en.wikipedia.org/wiki/Foo_(bar)">wiki</a> now'
    assert telegram_visible_text(html) == "see wiki now"


@pytest.mark.parametrize(
    "md",
    [
        "__init__",
        "override __init__ and __repr__",
        "call obj.__init__() from __main__.py",
        "foo__bar__baz",
        "a snake_case_name and _private",
    ],
)
def test_dunder_names_and_intraword_underscores_stay_literal(md: str) -> None:
    """`__init__` is shown as written, not as a bold "init"; underscores inside words are text."""
    assert markdown_to_telegram_html(md) == md


def test_underscore_emphasis_at_word_boundaries_still_renders() -> None:
    """`__two words__` is bold and `_word_` italic when they stand at word boundaries."""
    html = markdown_to_telegram_html("__very important__ and _this_")
    assert html == "<b>very important</b> and <i>this</i>"


def test_blockquotes_become_telegram_blockquotes() -> None:
    """`> lines` render as one <blockquote> (they used to be dropped to plain `>` text), formatting kept."""
    md = "He said:\n> first **line**\n> second\n>> nested\nAnd then."
    html = markdown_to_telegram_html(md)
    assert html == "He said:\n<blockquote>first <b>line</b>\nsecond\nnested</blockquote>\nAnd then."
    assert telegram_visible_text(html) == "He said:\nfirst line\nsecond\nnested\nAnd then."
