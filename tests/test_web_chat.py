"""The built-in web chat in a real browser (Debian's Chromium, headless, driven by Playwright).

One browser for the module; each test gets a fresh browser context (empty localStorage) on a real
gateway whose upstream is the fake LLM. Set NANOBOT_REQUIRE_BROWSER=1 (``.ci/run`` does) to turn a
missing browser into a failure instead of a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from nanobot.config import Config
from nanobot.gateway import sse
from nanobot.runtime import build_app

from fake_llm import FakeLLM, Step, last_user_text

pytestmark = pytest.mark.asyncio(loop_scope="module")  # one browser, one loop, for the module

CHROMIUM = os.environ.get("NANOBOT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).parent.parent / "docs" / "web-chat.png"
StartGateway = Callable[..., Awaitable[str]]

try:
    from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None  # type: ignore[assignment]


def _unavailable() -> str | None:
    if async_playwright is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, launched once for the module (never Playwright's own download)."""
    missing = _unavailable()
    if missing:
        if os.environ.get("NANOBOT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required (NANOBOT_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(missing)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def servers() -> AsyncIterator[list[TestServer]]:
    """Servers started on the module's loop (pytest-aiohttp's fixtures tear down on another)."""
    started: list[TestServer] = []
    yield started
    for server in reversed(started):  # the gateway before its upstream
        await server.close()


@pytest_asyncio.fixture(loop_scope="module")
async def fake_llm(servers: list[TestServer]) -> FakeLLM:
    """The scripted upstream, on the module's loop."""
    llm = FakeLLM()
    server = TestServer(llm.app())
    await server.start_server()
    servers.append(server)
    llm.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return llm


@pytest_asyncio.fixture(loop_scope="module")
async def start_gateway(servers: list[TestServer], make_config: Callable[..., Config]) -> StartGateway:
    """Start a real gateway (the whole runtime) on the module's loop; returns its base URL."""

    async def start(extra: dict[str, Any] | None = None) -> str:
        server = TestServer(build_app(make_config(extra)))
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    return start


class Watched:
    """A page with what it said on the console, threw, or opened as a JS dialog."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("dialog", self._dialog)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()


@pytest_asyncio.fixture(loop_scope="module")
async def open_page(browser: Browser) -> AsyncIterator[Callable[..., Awaitable[Watched]]]:
    """Open the chat page of a gateway in a fresh browser context; no page may throw."""
    watched: list[Watched] = []
    contexts = []

    async def open_(base: str, *, ready: bool = True, **context_args: Any) -> Watched:
        context = await browser.new_context(**context_args)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = await context.new_page()
        w = Watched(page)
        watched.append(w)
        await page.goto(base + "/")
        if ready:  # the chat list loaded and the open chat restored
            await page.wait_for_selector("body[data-ready]")
        return w

    yield open_
    for context in contexts:
        await context.close()
    for w in watched:
        assert w.page_errors == [], "the page threw"


def assistant(page: Page) -> Any:
    """The last answer on the page."""
    return page.locator(".msg.assistant").last


async def send(page: Page, text: str) -> None:
    """Type ``text`` and press Enter, as a user would."""
    await page.locator("#input").fill(text)
    await page.locator("#input").press("Enter")


async def test_page_loads_without_console_errors(start_gateway: StartGateway, open_page: Any) -> None:
    """Opening http://127.0.0.1:PORT/ shows the chat, ready to type, and the console stays clean."""
    base = await start_gateway()
    w = await open_page(base)
    await expect(w.page.locator("#input")).to_be_focused()
    await expect(w.page.locator("h1")).to_have_text("New chat")
    assert w.console_errors == []
    assert w.dialogs == []


async def test_answer_streams_in_and_enter_sends(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """Enter sends (Shift+Enter is a new line) and the answer shows while the model is still writing."""
    gate = asyncio.Event()
    fake_llm.push(Step(chunks=["The first half, ", "then the rest."], gate=gate))
    w = await open_page(await start_gateway())
    box = w.page.locator("#input")
    await box.type("line one")
    await box.press("Shift+Enter")
    await box.type("line two")
    await box.press("Enter")
    await expect(assistant(w.page)).to_contain_text("The first half,")
    await expect(assistant(w.page)).not_to_contain_text("then the rest")
    await expect(w.page.locator("#stop")).to_be_visible()
    gate.set()
    await expect(assistant(w.page)).to_contain_text("The first half, then the rest.")
    await expect(w.page.locator("#send")).to_be_visible()
    assert last_user_text(fake_llm.requests[-1]) == "line one\nline two"
    await expect(w.page.locator(".msg.user").last).to_have_text("line one\nline two")
    await expect(box).to_have_value("")
    assert w.console_errors == []


async def test_stop_cancels_the_turn_upstream(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """Stop ends the answer where it is, and the model's call upstream is cancelled too."""
    fake_llm.push(Step(chunks=["Counting: one, two, ", "never sent"], gate=asyncio.Event()))
    w = await open_page(await start_gateway())
    await send(w.page, "count to a million")
    await expect(assistant(w.page)).to_contain_text("Counting: one, two,")
    await w.page.locator("#stop").click()
    await asyncio.wait_for(fake_llm.cancelled.wait(), 10)
    await expect(assistant(w.page).locator(".status")).to_have_text("Stopped.")
    await expect(assistant(w.page)).to_contain_text("Counting: one, two,")
    await expect(w.page.locator("#send")).to_be_visible()
    await expect(w.page.locator("#input")).to_be_focused()


async def test_attached_files_reach_the_model(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """A file picked with the button and one dropped on the page both reach the model as text."""
    w = await open_page(await start_gateway())
    page = w.page
    await page.locator("#file-input").set_input_files(
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"The password is pineapple."}
    )
    # Drag and drop: the browser's own drop event carrying a File.
    await page.evaluate(
        """() => {
            const data = new DataTransfer();
            const text = "Dropped: the meeting is on Tuesday.";
            data.items.add(new File([text], "dropped.txt", {type: "text/plain"}));
            for (const type of ["dragenter", "dragover", "drop"]) {
                document.getElementById("messages").dispatchEvent(
                    new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
            }
        }"""
    )
    await expect(page.locator("#attachments li")).to_have_count(2)
    await send(page, "what do these say?")
    await expect(assistant(page)).to_contain_text("echo:")
    await expect(page.locator("#attachments li")).to_have_count(0)
    await expect(page.locator(".msg.user .sent-files li")).to_have_text(["notes.txt", "dropped.txt"])
    sent = str(fake_llm.requests[-1]["messages"])
    assert "The password is pineapple." in sent
    assert "Dropped: the meeting is on Tuesday." in sent
    assert w.console_errors == []


async def test_a_refused_file_shows_the_servers_error_next_to_it(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """A file over api.maxFileBytes gets the server's 413 message beside it; the message stays in the box."""
    w = await open_page(await start_gateway({"api": {"maxFileBytes": 1000}}))
    page = w.page
    await page.locator("#file-input").set_input_files(
        {"name": "big.txt", "mimeType": "text/plain", "buffer": b"x" * 5000}
    )
    await send(page, "read this")
    error = page.locator("#attachments li.has-error .file-error")
    await expect(error).to_contain_text("Too large")
    await expect(error).to_contain_text("larger than the limit of 1000 bytes")
    await expect(page.locator("#input")).to_have_value("read this")
    await expect(page.locator(".msg")).to_have_count(0)
    assert fake_llm.requests == []
    # Removing the file and sending again works.
    await page.get_by_role("button", name="Remove big.txt").click()
    await page.locator("#input").press("Enter")
    await expect(assistant(page)).to_have_text("echo: read this")


XSS_REPLY = (
    "<img src=x onerror=\"window.__xss='img'; alert('img')\">\n\n"
    "<script>window.__xss='script'; alert('script')</script>\n\n"
    "[click me](javascript:alert('link')) and <b onmouseover=alert(1)>bold?</b>\n\n"
    "**bold** and *italic* and `inline <i>code</i>`, see [the docs](https://example.com/docs).\n\n"
    "- one\n- two\n\n## A heading\n\n"
    "```html\n<script>alert('in code')</script>\n```\n"
)


async def test_markdown_renders_and_html_in_replies_stays_text(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """HTML and script in a reply show as text (no element, no dialog); Markdown still renders."""
    fake_llm.push(Step(chunks=[XSS_REPLY[:40], XSS_REPLY[40:]]))
    w = await open_page(await start_gateway())
    page = w.page
    await send(page, "<img src=y onerror=\"window.__xss='user'\"> hi")
    answer = assistant(page)
    await expect(answer.locator(".code")).to_have_count(1)
    await expect(page.locator("#send")).to_be_visible()
    await expect(answer).to_contain_text("<img src=x onerror=")
    await expect(answer).to_contain_text("<script>window.__xss='script'")
    await expect(page.locator(".msg.user")).to_contain_text("<img src=y onerror=")
    messages = page.locator("#messages")
    assert await messages.locator("img, script, b, i, iframe").count() == 0
    assert await page.evaluate("() => window.__xss") is None
    assert w.dialogs == []
    # The dangerous link is text; the https one is a real link that opens safely.
    assert await messages.locator("a[href^='javascript']").count() == 0
    link = answer.get_by_role("link", name="the docs")
    await expect(link).to_have_attribute("href", "https://example.com/docs")
    await expect(link).to_have_attribute("target", "_blank")
    await expect(link).to_have_attribute("rel", "noopener noreferrer")
    await expect(answer.locator("strong")).to_have_text(["bold"])
    await expect(answer.locator("em")).to_have_text(["italic"])
    await expect(answer.locator("p code")).to_have_text("inline <i>code</i>")
    await expect(answer.locator("li")).to_have_text(["one", "two"])
    await expect(answer.locator("h4")).to_have_text("A heading")
    await expect(answer.locator(".code pre")).to_have_text("<script>alert('in code')</script>")
    # The copy button puts the code itself on the clipboard.
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await answer.get_by_role("button", name="Copy html to the clipboard").click()
    await expect(answer.locator(".copy")).to_have_text("Copied")
    copied = await page.evaluate("() => navigator.clipboard.readText()")
    assert copied == "<script>alert('in code')</script>"
    assert w.dialogs == []


async def test_tool_progress_is_shown_while_the_agent_works(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """A tool the agent calls shows as a compact line (name, state, summary) before the answer ends."""
    if not hasattr(sse, "tool_event"):
        pytest.skip("this server sends no tool progress events yet (the tools issue)")
    gate = asyncio.Event()
    fake_llm.push(
        Step(tool_calls=[("message", {"content": "Progress: 50%"})]),
        Step(chunks=["All ", "done."], gate=gate),
    )
    w = await open_page(await start_gateway())
    page = w.page
    await send(page, "do the job")
    tool = assistant(page).locator(".tools li")
    await expect(tool).to_have_count(1)
    await expect(tool.locator(".tool-name")).to_have_text("message")
    await expect(tool).to_have_attribute("data-status", "finished")
    await expect(assistant(page)).to_have_attribute("aria-busy", "true")  # still working
    gate.set()
    await expect(assistant(page).locator(".body")).to_contain_text("All done.")
    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    await expect(assistant(page).locator(".tools .tool-name")).to_have_text("message")


async def test_api_key_is_asked_once_and_kept(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """With api.apiKey set the page asks for the key, retries with it, and keeps it across reloads."""
    w = await open_page(await start_gateway({"api": {"apiKey": "sk-web-chat-key-1"}}), ready=False)
    page = w.page
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await page.locator("#key-input").fill("sk-wrong-key-000")
    await page.locator("#key-input").press("Enter")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#key-text")).to_contain_text("not accepted")
    await page.locator("#key-input").fill("sk-web-chat-key-1")
    await page.get_by_role("button", name="Save").click()
    await expect(dialog).to_be_hidden()
    await send(page, "hello with a key")
    await expect(assistant(page)).to_have_text("echo: hello with a key")
    assert fake_llm.requests[-1]["messages"][-1]["content"] == "hello with a key"
    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    await expect(dialog).to_be_hidden()
    await send(page, "and again")
    await expect(assistant(page)).to_have_text("echo: and again")
    assert w.dialogs == []


async def test_a_message_sent_while_the_page_loads_is_answered(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """Enter pressed before the chat list has loaded (say right after the key dialog) still sends.

    The page used to start its new chat once the list arrived, which cancelled a turn already
    under way: the message went back into the box without a word.
    """
    base = await start_gateway()
    listed = asyncio.Event()
    release = asyncio.Event()

    async def hold(route: Any) -> None:
        listed.set()
        await release.wait()
        await route.continue_()

    w = await open_page(base, ready=False)
    await w.page.route(re.compile(r"/v1/sessions\?"), hold)
    await w.page.reload()
    await listed.wait()
    await send(w.page, "typed early")
    release.set()
    await w.page.wait_for_selector("body[data-ready]")
    await expect(assistant(w.page)).to_have_text("echo: typed early")
    await expect(w.page.locator("#input")).to_have_value("")
    assert fake_llm.requests[-1]["messages"][-1]["content"] == "typed early"


async def test_upstream_failure_is_a_readable_message(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """When the model's server fails, the answer says so in words (never a blank or broken page)."""
    fake_llm.push(Step(status=401, error="invalid upstream credentials"))
    w = await open_page(await start_gateway())
    await send(w.page, "hello?")
    status = assistant(w.page).locator(".status")
    await expect(status).to_contain_text("invalid upstream credentials")
    await expect(status).to_have_attribute("role", "alert")
    await expect(w.page.locator("#send")).to_be_visible()


async def test_a_busy_server_says_when_to_retry(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """Past api.maxConcurrentTurns the page shows the 429 in words with its Retry-After; the text stays."""
    fake_llm.push(Step(stall=True))
    base = await start_gateway({"api": {"maxConcurrentTurns": 1}})
    w = await open_page(base)
    body = {"messages": [{"role": "user", "content": "a long job"}], "session_id": "other"}
    async with aiohttp.ClientSession() as s:
        busy = asyncio.create_task(s.post(f"{base}/v1/chat/completions", json=body))
        await asyncio.wait_for(fake_llm.received.wait(), 10)
        await send(w.page, "my turn?")
        banner = w.page.locator("#banner")
        await expect(banner).to_contain_text("The server is busy")
        await expect(banner).to_contain_text("api.maxConcurrentTurns")
        await expect(banner).to_contain_text("Try again in 1 s.")
        await expect(w.page.locator("#input")).to_have_value("my turn?")
        await expect(w.page.locator(".msg")).to_have_count(0)
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy


async def test_a_server_that_is_gone_is_reported(start_gateway: StartGateway, open_page: Any) -> None:
    """If the gateway stops, sending says it cannot reach the server instead of failing silently."""
    w = await open_page(await start_gateway())
    await w.page.context.set_offline(True)
    await send(w.page, "anyone there?")
    await expect(w.page.locator("#banner")).to_contain_text("Cannot reach the nanobot server")
    await expect(w.page.locator("#input")).to_have_value("anyone there?")


async def sessions_listed(base: str, key: str = "") -> list[dict[str, Any]]:
    """The API's own list of sessions, newest first."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.get(f"{base}/v1/sessions", headers=headers) as r:
        assert r.status == 200
        return list((await r.json())["data"])


async def test_chats_survive_reload_rename_and_delete(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """Chats are listed, reopen with their history after a reload, and can be switched, renamed, deleted."""
    base = await start_gateway()
    w = await open_page(base)
    page = w.page
    rows = page.locator("#sessions li")
    await send(page, "first topic: apples")
    await expect(assistant(page)).to_have_text("echo: first topic: apples")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("first topic: apples")  # untitled: its first message
    await page.get_by_role("button", name="New chat").click()
    await expect(page.locator(".msg")).to_have_count(0)
    await send(page, "second topic: pears")
    await expect(assistant(page)).to_have_text("echo: second topic: pears")
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_contain_text("second topic")  # newest first

    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    await expect(page.locator(".msg.user")).to_have_text(["second topic: pears"])
    await expect(assistant(page)).to_have_text("echo: second topic: pears")
    await expect(page.locator("#sessions li.current")).to_contain_text("second topic")

    # Switching back continues that chat: the model sees its history.
    await rows.filter(has_text="first topic").locator(".open").click()
    await expect(page.locator(".msg.user")).to_have_text(["first topic: apples"])
    await send(page, "more apples")
    await expect(assistant(page)).to_have_text("echo: more apples")
    said = [m["content"] for m in fake_llm.requests[-1]["messages"] if m["role"] == "user"]
    assert said == ["first topic: apples", "more apples"]

    first = rows.filter(has_text="first topic")
    await first.locator(".rename").click()
    await page.get_by_label("New title").fill("Fruit plans")
    await page.get_by_label("New title").press("Enter")
    await expect(rows.filter(has_text="Fruit plans")).to_have_count(1)
    await expect(page.locator("h1")).to_have_text("Fruit plans")
    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    await expect(page.locator("#sessions li.current")).to_have_text(re.compile("Fruit plans"))
    await expect(page.locator(".msg.user")).to_have_text(["first topic: apples", "more apples"])

    delete = rows.filter(has_text="Fruit plans").locator(".delete")
    await delete.click()
    await expect(delete).to_have_text("Delete?")  # a second press confirms
    await delete.click()
    await expect(rows).to_have_count(1)
    await expect(page.locator(".msg")).to_have_count(0)  # the open chat is gone: a new one
    assert [s["title"] for s in await sessions_listed(base)] == ["second topic: pears"]
    await page.reload()
    await page.wait_for_selector("body[data-ready]")
    await expect(rows).to_have_count(1)
    await expect(page.locator(".msg")).to_have_count(0)
    assert w.console_errors == []
    assert w.dialogs == []


async def test_phone_width_dark_mode_and_keyboard(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM
) -> None:
    """On a phone-width screen the page fits, the chat list opens from a button, dark mode applies,
    and the keyboard reaches everything with a visible focus ring."""
    fake_llm.push(Step(text="```\n" + "x" * 400 + "\n```"))
    w = await open_page(await start_gateway(), viewport={"width": 390, "height": 800}, color_scheme="dark")
    page = w.page
    assert await page.evaluate("() => getComputedStyle(document.body).backgroundColor") == "rgb(23, 25, 29)"
    await expect(page.locator("#sidebar")).to_be_hidden()
    await send(page, "a wide answer please")
    await expect(assistant(page).locator("pre")).to_be_visible()
    await expect(page.locator("#send")).to_be_visible()
    assert await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    await page.get_by_role("button", name="Show the chat list").click()
    await expect(page.locator("#new-chat")).to_be_focused()
    await expect(page.locator("#sessions li")).to_have_count(1)
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")  # past "close", onto the chat's title
    focused = await page.evaluate(
        "() => [document.activeElement.textContent, getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused == ["a wide answer please", "solid"]
    await page.keyboard.press("Enter")  # opens it and closes the list
    await expect(page.locator("#sidebar")).to_be_hidden()
    await expect(page.locator("#input")).to_be_focused()
    await page.keyboard.press("Shift+Tab")
    assert await page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "Attach files"


SCREENSHOT_REPLY = """Use **`wc`** for a quick count, or a few lines of Python for more control:

```python
from pathlib import Path

words = Path("notes.txt").read_text().split()
print(f"{len(words)} words")
```

- `wc -w notes.txt` prints the word count and the file name.
- `split()` with no argument splits on any run of whitespace.
"""


async def test_screenshot_after_a_short_conversation(
    start_gateway: StartGateway, open_page: Any, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """The README's picture of the page is the real page after a real conversation.

    Set NANOBOT_SCREENSHOT=docs/web-chat.png to refresh the committed one."""
    fake_llm.push(Step(text="Hi! Ask me anything: I can read files you attach and message your chats."))
    fake_llm.push(Step(chunks=[SCREENSHOT_REPLY[:60], SCREENSHOT_REPLY[60:]]))
    w = await open_page(await start_gateway(), viewport={"width": 1100, "height": 700})
    page = w.page
    await send(page, "Hello nanobot")
    await expect(assistant(page)).to_contain_text("Ask me anything")
    await page.get_by_role("button", name="New chat").click()
    await send(page, "How do I count the words in a file?")
    await expect(assistant(page).locator(".code")).to_have_count(1)
    await expect(page.locator("#send")).to_be_visible()
    await expect(page.locator("#sessions li")).to_have_count(2)
    await page.locator("#input").fill("Thanks! Can you also")
    await page.locator("#input").blur()
    target = Path(os.environ.get("NANOBOT_SCREENSHOT") or tmp_path / "web-chat.png")
    png = await page.screenshot(path=str(target))
    assert png.startswith(b"\x89PNG")
