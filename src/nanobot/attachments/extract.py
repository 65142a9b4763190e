"""Text extraction for PDF, DOCX, XLSX and PPTX; runs inside an extractor process.

Every extractor writes into a :class:`TextCollector` and stops reading as soon as the
character budget is spent, so the cost of a huge document is bounded by its first
``max_chars`` characters (plus, for Office files, the zip pre-scan).

DOCX is read by streaming ``word/document.xml`` (and headers/footers) through
``ElementTree.iterparse`` with docx2txt's rules (``w:t`` text, ``w:tab``, ``w:br``,
paragraph breaks). docx2txt itself loads the whole XML and its tree at once - about 15x
the file size for a text-heavy 10 MB DOCX - and cannot stop early. PPTX is streamed the
same way, slide by slide (see :mod:`nanobot.attachments.pptx_stream`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import openpyxl
import pymupdf as _pymupdf

from nanobot.attachments.collect import TextCollector
from nanobot.attachments.failures import Unreadable, Unsupported
from nanobot.attachments.jobs import ExtractRequest, Outcome
from nanobot.attachments.pptx_stream import read_slides
from nanobot.attachments.safezip import prescan

pymupdf: Any = _pymupdf  # its stubs leave Document and Page.get_text untyped

_OOXML_MAIN_PARTS = (
    ("word/document.xml", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    ("xl/workbook.xml", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    ("ppt/presentation.xml", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
)
_DOCX_HEADER = re.compile(r"word/header\d*\.xml$")
_DOCX_FOOTER = re.compile(r"word/footer\d*\.xml$")


def extract(request: ExtractRequest, data: bytes) -> Outcome:
    """Extract ``data``; every failure becomes an ``Outcome``, none escapes (this runs in a worker)."""
    try:
        if request.kind == "pdf":
            return Outcome("ok", "application/pdf", extract_pdf(data, request))
        return _extract_ooxml(data, request)
    except Unreadable as exc:
        return Outcome("unreadable", "", exc.reason)
    except Unsupported as exc:
        return Outcome("unsupported", "", exc.looks_like)
    except MemoryError:
        return Outcome("unreadable", "", "needs more memory to read than allowed")
    except Exception as exc:  # a parser failed on malformed input: report it as unreadable
        return Outcome("unreadable", "", f"could not be read ({type(exc).__name__})")


# --- PDF ------------------------------------------------------------------------------


def extract_pdf(data: bytes, request: ExtractRequest) -> str:
    """Text of each page under ``--- Page N ---``; encrypted or truncated PDFs refused.

    Reading stops at the character budget or after ``max_pdf_pages`` pages, whichever
    comes first, with a marker saying how many pages were not read: a long manual is
    still useful from its first pages, and the cap bounds the work on image-only pages.
    """
    if b"%%EOF" not in data[-1024:]:
        # MuPDF silently repairs a cut-off file and returns its first pages; refuse instead.
        raise Unreadable("is corrupt or truncated (no end-of-file marker)")
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except (RuntimeError, ValueError) as exc:  # pymupdf.FileDataError is a RuntimeError
        raise Unreadable("is corrupt or truncated") from exc
    with doc:
        if doc.needs_pass:
            raise Unreadable("is encrypted (password-protected)")
        pages = doc.page_count
        if pages == 0:
            raise Unreadable("is corrupt or truncated (no pages)")
        readable = min(pages, request.max_pdf_pages)
        out = TextCollector(request.max_chars)
        read = 0
        while read < readable and out.add(f"--- Page {read + 1} ---\n{doc[read].get_text().strip()}\n"):
            read += 1
        read = min(read + 1, readable)  # the page that filled the budget was read too
        if read == pages:
            return out.result()
        cap_note = f" (the limit is {request.max_pdf_pages:,} pages)" if read == request.max_pdf_pages else ""
        return out.result(f"{pages - read:,} more pages{cap_note}")


# --- Office (OOXML) -------------------------------------------------------------------


def _extract_ooxml(data: bytes, request: ExtractRequest) -> Outcome:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise Unreadable("is corrupt or truncated (bad zip archive)") from exc
    with zf:
        names = set(zf.namelist())
        if "[Content_Types].xml" in names:
            for part, mime in _OOXML_MAIN_PARTS:
                if part in names:
                    prescan(zf)
                    return Outcome("ok", mime, _OOXML_EXTRACTORS[part](zf, data, request.max_chars))
    raise Unsupported("application/zip")


def extract_docx(zf: zipfile.ZipFile, data: bytes, max_chars: int) -> str:
    """Headers, body and footers of a DOCX, paragraph by paragraph, streamed."""
    names = zf.namelist()
    parts = [n for n in names if _DOCX_HEADER.match(n)]
    parts.append("word/document.xml")
    parts += [n for n in names if _DOCX_FOOTER.match(n)]
    out = TextCollector(max_chars)
    for part in parts:
        with zf.open(part) as stream:
            if not _collect_wordml(stream, out):
                return out.result("the rest of the document")
    return out.result()


def _collect_wordml(stream: IO[bytes], out: TextCollector) -> bool:
    """Feed one WordprocessingML part into ``out``; ``False`` once the budget is spent."""
    line: list[str] = []
    for _event, elem in ET.iterparse(stream, events=("end",)):
        tag = elem.tag.rpartition("}")[2]
        if tag == "t":
            line.append(elem.text or "")
        elif tag == "tab":
            line.append("\t")
        elif tag in ("br", "cr"):
            line.append("\n")
        elif tag == "p":
            text = "".join(line)
            line.clear()
            elem.clear()  # drop the paragraph's subtree: memory stays flat on long documents
            if text and not out.add(text + "\n"):
                return False
    return out.add("".join(line)) if line else True


def extract_xlsx(zf: zipfile.ZipFile, data: bytes, max_chars: int) -> str:
    """Each worksheet under ``--- Sheet: name ---``, rows as comma-separated values (CSV quoting)."""
    wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        out = TextCollector(max_chars)
        sheets = list(wb.worksheets)
        for index, ws in enumerate(sheets):
            out.add(f"--- Sheet: {ws.title} ---\n")
            for line in _csv_lines(getattr(ws, "iter_rows", None)):
                if not out.add(line):
                    left = len(sheets) - index - 1
                    rest = f"the rest of sheet {ws.title!r}"
                    return out.result(f"{rest} and {left} more sheets" if left else rest)
        return out.result()
    finally:
        wb.close()


def _csv_lines(iter_rows: Any) -> Iterator[str]:
    """CSV lines for a worksheet's rows (chart sheets have no ``iter_rows``); empty rows skipped."""
    if iter_rows is None:
        return
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in iter_rows(values_only=True):
        cells = list(row)
        while cells and cells[-1] is None:
            cells.pop()
        if not cells:
            continue
        writer.writerow([_cell_text(v) for v in cells])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def extract_pptx(zf: zipfile.ZipFile, data: bytes, max_chars: int) -> str:
    """Each slide under ``--- Slide N ---``: text frames, table rows (``a | b``), then notes, streamed."""
    return read_slides(zf, max_chars)


_OOXML_EXTRACTORS = {
    "word/document.xml": extract_docx,
    "xl/workbook.xml": extract_xlsx,
    "ppt/presentation.xml": extract_pptx,
}
