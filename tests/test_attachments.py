"""The attachments package: real files in, model input or a precise error out."""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import multiprocessing
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pptx
import pytest
from pptx.util import Inches

from nanobot.attachments import (
    AttachmentLimits,
    PreparedFile,
    decode_data_url,
    prepare_file,
    shutdown_extractors,
)
from nanobot.attachments.names import sanitize_name
from nanobot.config import ApiConfig
from nanobot.errors import (
    AttachmentError,
    PayloadTooLargeError,
    RequestError,
    UnsupportedMediaError,
)

import samples

T = TypeVar("T")
LIMITS = AttachmentLimits()
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.fixture(scope="module", autouse=True)
def _stop_extractors() -> Iterator[None]:
    """Kill the extractor processes once this module's tests are done."""
    yield
    asyncio.run(shutdown_extractors())


# --- documents come out as text ---------------------------------------------------------


async def test_pdf_text_is_extracted_per_page() -> None:
    """A real PDF's text comes out under --- Page N --- markers."""
    f = await prepare_file("report.pdf", samples.make_pdf(["Quarterly revenue", "Margin rose"]), LIMITS)
    assert (f.kind, f.mime, f.image) == ("document", "application/pdf", None)
    assert f.text == "--- Page 1 ---\nQuarterly revenue\n--- Page 2 ---\nMargin rose\n"
    assert f.model_block() == f"[File: report.pdf]\n{f.text}"
    assert f.history_text() == f.model_block()


async def test_docx_paragraphs_are_extracted() -> None:
    """A DOCX's paragraphs come out one per line, markup-special characters intact."""
    f = await prepare_file("memo.docx", samples.make_docx(["Dear team,", "Q3 < Q4 & rising"]), LIMITS)
    assert (f.kind, f.mime) == ("document", DOCX_MIME)
    assert f.text == "Dear team,\nQ3 < Q4 & rising\n"


async def test_xlsx_sheets_become_csv_rows() -> None:
    """Each XLSX sheet comes out under its name, rows as CSV (quoted where needed, empties skipped)."""
    data = samples.make_xlsx({"Sales": [["region", "amount"], ["EU", 12.5]], "Notes": [["a, b", None, 3]]})
    f = await prepare_file("book.xlsx", data, LIMITS)
    assert f.mime == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    assert f.text == '--- Sheet: Sales ---\nregion,amount\nEU,12.5\n--- Sheet: Notes ---\n"a, b",,3\n'


async def test_pptx_slides_tables_and_notes_are_extracted() -> None:
    """PPTX text frames, speaker notes and table rows come out under --- Slide N ---."""
    deck = await prepare_file(
        "deck.pptx", samples.make_pptx(["Roadmap", ("Pricing", "say it slowly")]), LIMITS
    )
    assert deck.mime == "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    assert deck.text == "--- Slide 1 ---\nRoadmap\n--- Slide 2 ---\nPricing\nNotes: say it slowly\n"
    table = await prepare_file("t.pptx", samples.make_pptx_with_table([["k", "v"], ["cpu", "2"]]), LIMITS)
    assert table.text == "--- Slide 1 ---\nk | v\ncpu | 2\n"


def _edit_parts(data: bytes, edits: dict[str, Callable[[bytes], bytes]]) -> bytes:
    """``data`` (an Office zip) with the named parts rewritten by their edit functions."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            content = src.read(name)
            dst.writestr(name, edits[name](content) if name in edits else content)
    return buf.getvalue()


def _reverse_slide_list(presentation: bytes) -> bytes:
    """presentation.xml with its ``p:sldIdLst`` entries in reverse order."""
    ids = re.findall(rb"<p:sldId [^>]*/>", presentation)
    assert len(ids) > 1
    return presentation.replace(b"".join(ids), b"".join(reversed(ids)), 1)


async def test_pptx_slide_order_follows_presentation_xml_not_file_names() -> None:
    """Slides come in p:sldIdLst order, each with the notes its own relationship points to."""
    deck = samples.make_pptx([("one", "first note"), "two", ("three", "third note")])
    # python-pptx names the notes notesSlide1 and notesSlide2: slide3.xml has notesSlide2.xml
    deck = _edit_parts(deck, {"ppt/presentation.xml": _reverse_slide_list})
    f = await prepare_file("deck.pptx", deck, LIMITS)
    assert f.text == (
        "--- Slide 1 ---\nthree\nNotes: third note\n"
        "--- Slide 2 ---\ntwo\n"
        "--- Slide 3 ---\none\nNotes: first note\n"
    )


def _rich_deck() -> bytes:
    """Placeholders, line breaks, blank paragraphs, nested groups, a table and multi-line notes."""
    prs = pptx.Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])  # title and content
    assert slide.shapes.title is not None
    slide.shapes.title.text = "Plan"
    body = slide.placeholders[1].text_frame
    body.text = "first"
    for text in ("soft\vbreak", " ", "last"):
        body.add_paragraph().text = text
    group = slide.shapes.add_group_shape()
    group.shapes.add_textbox(Inches(1), Inches(1), Inches(1), Inches(1)).text_frame.text = "grouped"
    inner = group.shapes.add_group_shape()
    inner.shapes.add_textbox(Inches(1), Inches(1), Inches(1), Inches(1)).text_frame.text = "nested"
    slide.shapes.add_textbox(Inches(1), Inches(1), Inches(1), Inches(1)).text_frame.text = " \n "
    slide.notes_slide.notes_text_frame.text = "say\nslowly"
    slide = prs.slides.add_slide(prs.slide_layouts[6])
    table = slide.shapes.add_table(3, 3, Inches(1), Inches(1), Inches(6), Inches(2)).table
    for (row, col), text in {(0, 0): "k", (0, 1): "two\nlines", (1, 2): "x"}.items():
        table.cell(row, col).text = text
    table.cell(2, 0).merge(table.cell(2, 1))
    table.cell(2, 0).text = "merged"
    slide.shapes.add_textbox(Inches(1), Inches(4), Inches(1), Inches(1)).text_frame.text = "after"
    slide.notes_slide.notes_text_frame.text = "  "  # blank notes are left out
    buf = io.BytesIO()
    prs.save(buf)
    return buf.getvalue()


async def test_pptx_frames_groups_tables_and_notes_keep_their_layout() -> None:
    """Paragraphs one per line (a:br too), blank frames skipped, table cells joined by ' | '."""
    f = await prepare_file("rich.pptx", _rich_deck(), LIMITS)
    assert f.text == (
        "--- Slide 1 ---\nPlan\nfirst\nsoft\nbreak\n \nlast\ngrouped\nnested\n"
        "Notes: say\nslowly\n"
        "--- Slide 2 ---\nk | two\nlines | \n |  | x\nmerged |  | \nafter\n"
    )


async def test_long_pptx_stops_reading_at_the_budget() -> None:
    """A deck over max_extracted_chars is cut mid-slide and its later slides are never parsed."""
    deck = samples.make_pptx([samples.words(50, seed=i) for i in range(5)])
    deck = _edit_parts(deck, {"ppt/slides/slide3.xml": lambda xml: xml[: len(xml) // 2]})
    f = await prepare_file("long.pptx", deck, AttachmentLimits(max_extracted_chars=60))
    assert f.text is not None
    body, _, marker = f.text.rpartition("\n")
    assert len(body) == 60 and body.startswith("--- Slide 1 ---\n")
    assert marker.startswith("[... truncated: ")
    assert marker.endswith(", then the rest of slide 1 and 4 more slides not read]")
    with pytest.raises(AttachmentError, match=r"^long.pptx could not be read \(ParseError\)"):
        await prepare_file("long.pptx", deck, LIMITS)  # the cut slide is only reached without a cap


async def test_pptx_with_a_doctype_is_refused_before_parsing() -> None:
    """The zip pre-scan still refuses a slide declaring entities, before the slide reader runs."""
    deck = _edit_parts(
        samples.make_pptx(["hi"]),
        {"ppt/slides/slide1.xml": lambda xml: xml.replace(b"?>", b'?><!DOCTYPE x [<!ENTITY e "e">]>', 1)},
    )
    with pytest.raises(
        AttachmentError, match=r"^x.pptx has an XML part \(ppt/slides/slide1.xml\) with a DOCTYPE"
    ):
        await prepare_file("x.pptx", deck, LIMITS)


async def test_long_document_is_capped_with_a_visible_marker() -> None:
    """A document over max_extracted_chars is cut, says so, and its later pages are not even read."""
    limits = AttachmentLimits(max_extracted_chars=60)
    f = await prepare_file(
        "long.pdf", samples.make_pdf([samples.words(50, seed=i) for i in range(5)]), limits
    )
    assert f.text is not None
    body, _, marker = f.text.rpartition("\n")
    assert len(body) == 60
    assert marker.startswith("[... truncated: ") and marker.endswith(", then 4 more pages not read]")


async def test_pdf_over_the_page_cap_yields_its_first_pages() -> None:
    """A PDF with more pages than max_pdf_pages gives its first pages and a marker naming the cap."""
    limits = AttachmentLimits(max_pdf_pages=2)
    f = await prepare_file("manual.pdf", samples.make_pdf(["one", "two", "three", "four"]), limits)
    assert f.text == (
        "--- Page 1 ---\none\n--- Page 2 ---\ntwo\n"
        "\n[... truncated: 0 more characters, then 2 more pages (the limit is 2 pages) not read]"
    )


# --- images and text --------------------------------------------------------------------


async def test_png_becomes_an_image_part_with_its_original_bytes() -> None:
    """A PNG is passed through as base64 of its original bytes, and history keeps only its name."""
    png = samples.make_png()
    f = await prepare_file("chart.png", png, LIMITS)
    assert (f.kind, f.mime, f.text) == ("image", "image/png", None)
    assert f.image is not None and base64.b64decode(f.image.data_b64) == png
    assert f.image.name == "chart.png" and f.image.data_url.startswith("data:image/png;base64,")
    assert f.model_block() == "" and f.history_text() == "[image: chart.png]"


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"GIF89a\x01\x00\x01\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
    ],
)
async def test_other_images_are_recognised_by_magic(head: bytes, mime: str) -> None:
    """JPEG, GIF and WebP are recognised by their magic bytes (pixels are never decoded)."""
    f = await prepare_file("photo.bin", head + b"\x00" * 32, LIMITS)
    assert (f.kind, f.mime) == ("image", mime)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("# Título\n\n- ünïcode ✓\n".encode(), "# Título\n\n- ünïcode ✓\n"),
        ("name,qty\r\nbolt,3\r\n".encode("utf-16"), "name,qty\nbolt,3\n"),
        ("Café – 5 €".encode("cp1252"), "Café – 5 €"),
        (codecs.BOM_UTF8 + b'{"a": 1}', '{"a": 1}'),
    ],
    ids=["utf8-markdown", "utf16-bom-csv", "cp1252", "utf8-bom-json"],
)
async def test_text_files_are_decoded(data: bytes, expected: str) -> None:
    """Text in UTF-8, UTF-16 with BOM or Windows-1252 is decoded whatever the file is called."""
    f = await prepare_file("data.weird", data, LIMITS)
    assert (f.kind, f.mime, f.text) == ("text", "text/plain", expected)
    assert f.model_block() == f"[File: data.weird]\n{expected}"


async def test_long_text_is_capped_with_a_visible_marker() -> None:
    """A text file over max_extracted_chars is cut with a marker counting what was left out."""
    f = await prepare_file("log.txt", b"x" * 150, AttachmentLimits(max_extracted_chars=100))
    assert f.text == "x" * 100 + "\n[... truncated: 50 more characters]"


# --- type decided by content, never by name ---------------------------------------------


async def test_png_bytes_named_pdf_are_an_image() -> None:
    """PNG bytes uploaded as report.pdf are treated as the image they are."""
    f = await prepare_file("report.pdf", samples.make_png(), LIMITS)
    assert (f.kind, f.mime, f.name) == ("image", "image/png", "report.pdf")


async def test_random_bytes_named_pdf_are_unsupported() -> None:
    """Random bytes named x.pdf get a 415 naming the file, what it looks like and what is supported."""
    with pytest.raises(UnsupportedMediaError) as info:
        await prepare_file("x.pdf", os.urandom(4096), LIMITS)
    assert info.value.status == 415
    assert info.value.message.startswith("x.pdf: unsupported file type (looks like binary data)")
    assert "PDF, DOCX, XLSX and PPTX" in info.value.message


async def test_plain_zip_is_unsupported_and_named_as_zip() -> None:
    """A ZIP that is not an Office document gets a 415 saying it looks like application/zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(UnsupportedMediaError, match=r"^report.bin: .*looks like application/zip"):
        await prepare_file("report.bin", buf.getvalue(), LIMITS)


async def test_legacy_and_encrypted_office_files() -> None:
    """An old binary .doc is a 415; a password-protected DOCX (OLE with EncryptionInfo) is a 422."""
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504
    with pytest.raises(UnsupportedMediaError, match="legacy Microsoft Office"):
        await prepare_file("old.doc", ole + b"WordDocument".ljust(64, b"\x00"), LIMITS)
    with pytest.raises(AttachmentError, match=r"^secret.docx is encrypted"):
        await prepare_file("secret.docx", ole + "EncryptionInfo".encode("utf-16-le"), LIMITS)


# --- sizes --------------------------------------------------------------------------------


async def test_empty_file_is_a_400_naming_it() -> None:
    """An empty upload is a 400 that names the file."""
    with pytest.raises(RequestError, match=r"^notes.txt is empty$") as info:
        await prepare_file("notes.txt", b"", LIMITS)
    assert info.value.status == 400


async def test_file_one_byte_over_the_limit_is_a_413() -> None:
    """10 MiB + 1 byte is a 413 naming the file and the limit, before any parsing."""
    with pytest.raises(PayloadTooLargeError) as info:
        await prepare_file("big.pdf", b"%PDF-" + b"\x00" * (10 * 1024 * 1024 - 4), LIMITS)
    assert info.value.status == 413
    assert info.value.message == "big.pdf is 10,485,761 bytes; the limit is 10 MiB per file"


# --- hostile and broken documents -------------------------------------------------------


async def test_zip_bomb_is_refused_without_inflating_it() -> None:
    """A DOCX-shaped zip inflating to 200 MB is a 422 zip bomb, counted from bytes actually inflated."""
    with pytest.raises(AttachmentError, match=r"^bomb.docx .*refused as a zip bomb") as info:
        await prepare_file("bomb.docx", samples.make_zip_bomb(), LIMITS)
    assert info.value.status == 422


async def test_billion_laughs_xlsx_is_refused() -> None:
    """An XLSX whose XML declares the billion-laughs entities is a 422, nothing expanded."""
    with pytest.raises(AttachmentError, match=r"^laughs.xlsx has an XML part .* DOCTYPE or ENTITY"):
        await prepare_file("laughs.xlsx", samples.make_billion_laughs_xlsx(), LIMITS)


async def test_truncated_pdf_is_refused() -> None:
    """A PDF cut in half is a 422 'is corrupt or truncated', not a silently repaired first page."""
    pdf = samples.make_pdf(["first page", "second page"])
    with pytest.raises(AttachmentError, match=r"^cut.pdf is corrupt or truncated"):
        await prepare_file("cut.pdf", pdf[: len(pdf) // 2], LIMITS)


async def test_encrypted_pdf_is_refused() -> None:
    """A password-protected PDF is a 422 saying it is encrypted."""
    pdf = samples.make_pdf(["top secret"], user_pw="hunter2")
    with pytest.raises(AttachmentError, match=r"^locked.pdf is encrypted"):
        await prepare_file("locked.pdf", pdf, LIMITS)


async def test_corrupt_office_files_are_refused() -> None:
    """A cut-off DOCX and one whose XML is malformed are each a 422 naming the file."""
    docx = samples.make_docx(["hello"])
    with pytest.raises(AttachmentError, match=r"^cut.docx is corrupt or truncated"):
        await prepare_file("cut.docx", docx[: len(docx) // 2], LIMITS)
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(docx)) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"<w:document><w:body>" if name == "word/document.xml" else src.read(name))
    with pytest.raises(AttachmentError, match=r"^bad.docx could not be read \(ParseError\)"):
        await prepare_file("bad.docx", buf.getvalue(), LIMITS)


# --- time limit, event loop, cancellation -----------------------------------------------


def _large_docx() -> bytes:
    return samples.make_docx([samples.words(40, seed=i % 50) for i in range(40_000)], stored=True)


async def test_extraction_time_limit_stops_the_parse_and_the_pool_recovers() -> None:
    """A parse slower than extract_timeout is a 422 'took longer than', and the next file still works."""
    limits = AttachmentLimits(max_extracted_chars=10**9, extract_timeout=0.01)
    await prepare_file("warm.docx", samples.make_docx(["warm"]), LIMITS)  # time the parse, not a cold start
    with pytest.raises(AttachmentError, match=r"^huge.docx took longer than 0.01s to read"):
        await prepare_file("huge.docx", _large_docx(), limits)
    f = await prepare_file("after.docx", samples.make_docx(["still alive"]), LIMITS)
    assert f.text == "still alive\n"


async def test_extraction_does_not_block_the_event_loop() -> None:
    """While a large document is parsed, other coroutines keep running on the loop."""
    data = _large_docx()
    ticks = 0
    task = asyncio.create_task(prepare_file("huge.docx", data, AttachmentLimits(max_extracted_chars=10**9)))
    while not task.done():
        ticks += 1
        await asyncio.sleep(0)
    assert (await task).text is not None
    assert ticks > 100


def _cpu_ticks(pid: int) -> int | None:
    """CPU time a process has used (clock ticks), or None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else int(fields[11]) + int(fields[12])


async def _until(predicate: Callable[[], T], within: float = 20.0) -> T:
    """Poll ``predicate`` until it returns something truthy, with a deadline."""
    async with asyncio.timeout(within):
        # Another process's state: there is no event to wait on, so poll it.
        while not (found := predicate()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker CPU time from /proc")
async def test_cancelled_extraction_kills_its_worker() -> None:
    """Cancelling a request mid-extraction kills the worker parsing it, and later files still work."""
    limits = AttachmentLimits(max_extracted_chars=10**9)
    await prepare_file("warm.docx", samples.make_docx(["warm"]), LIMITS)
    workers = [p.pid for p in multiprocessing.active_children() if p.name == "nanobot-extractor"]
    idle = {pid: _cpu_ticks(pid) for pid in workers}
    task = asyncio.create_task(prepare_file("huge.docx", _large_docx(), limits))

    def parsing() -> int | None:  # the worker whose CPU time moves is the one parsing
        return next((pid for pid in workers if (_cpu_ticks(pid) or 0) > (idle[pid] or 0)), None)

    busy = await _until(parsing)
    assert busy is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: _cpu_ticks(busy) is None)  # killed, not left to finish the parse
    f = await prepare_file("next.docx", samples.make_docx(["next"]), LIMITS)
    assert f.text == "next\n"


# --- names ------------------------------------------------------------------------------


async def test_traversal_name_is_only_a_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'../../etc/passwd' becomes the display name 'passwd' and nothing is written anywhere."""
    monkeypatch.chdir(tmp_path)
    f = await prepare_file("../../etc/passwd", b"root:x:0:0\n", LIMITS)
    assert f.name == "passwd"
    assert f.model_block() == "[File: passwd]\nroot:x:0:0\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("evil\u202egpj.exe", "evilgpj.exe"),
        ("line\nbreak\x00.txt", "linebreak.txt"),
        ("..", "upload"),
        (None, "upload"),
        ("a" * 300, "a" * 255),
    ],
)
def test_names_are_sanitized(raw: str | None, clean: str) -> None:
    """Display names keep only the last path part, lose control/bidi characters and fit 255 chars."""
    assert sanitize_name(raw) == clean


# --- data: URLs -------------------------------------------------------------------------

PARAM = "messages[0].content[1]"


def test_data_url_is_decoded() -> None:
    """A base64 data: URL gives its MIME type and bytes; MIME-style line breaks are tolerated."""
    png = samples.make_png()
    b64 = base64.b64encode(png).decode()
    url = f"data:image/PNG;name=x.png;base64,{b64[:20]}\n{b64[20:]}"
    assert decode_data_url(url, param=PARAM, max_bytes=1024) == ("image/png", png)


def test_http_url_is_refused_and_never_fetched() -> None:
    """An http(s) URL is a 400 saying only data: URLs and uploads are accepted."""
    with pytest.raises(RequestError, match="never fetches URLs") as info:
        decode_data_url("https://example.com/cat.png", param=PARAM, max_bytes=1024)
    assert (info.value.status, info.value.param) == (400, PARAM)


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,@@not base64@@",
        "data:image/png;base64,AAA",
        "data:text/plain,hello",
        "data:abc",
    ],
)
def test_malformed_data_url_is_a_400_naming_the_part(url: str) -> None:
    """Garbage base64, bad padding or a non-base64 data: URL is a 400 naming the request part."""
    with pytest.raises(RequestError) as info:
        decode_data_url(url, param=PARAM, max_bytes=1024)
    assert info.value.status == 400 and info.value.param == PARAM
    assert info.value.message.startswith(PARAM)


def test_oversized_data_url_is_a_413_before_decoding() -> None:
    """A data: URL decoding to more than max_bytes is a 413, even when its payload is not valid base64."""
    with pytest.raises(PayloadTooLargeError) as info:
        decode_data_url("data:image/png;base64," + "!" * 2000, param=PARAM, max_bytes=1000)
    assert info.value.param == PARAM
    exact = base64.b64encode(b"x" * 1001).decode()
    with pytest.raises(PayloadTooLargeError):
        decode_data_url(f"data:application/pdf;base64,{exact}", param=PARAM, max_bytes=1000)
    assert decode_data_url(f"data:a/b;base64,{exact}", param=PARAM, max_bytes=1001)[1] == b"x" * 1001


# --- limits -----------------------------------------------------------------------------


def test_limits_come_from_the_api_config() -> None:
    """AttachmentLimits.from_api copies the four limits from ApiConfig."""
    api = ApiConfig(max_file_bytes=5, max_extracted_chars=6, max_pdf_pages=7, extract_timeout=8.0)
    assert AttachmentLimits.from_api(api) == AttachmentLimits(5, 6, 7, 8.0)


def test_prepared_file_is_a_frozen_value() -> None:
    """PreparedFile is immutable, so a prepared upload cannot be altered on its way to the model."""
    f = PreparedFile("a.txt", "text", "text/plain", text="hi")
    with pytest.raises(AttributeError):
        f.text = "changed"  # type: ignore[misc]
