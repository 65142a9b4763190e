"""Real sample files, generated on the fly, for attachment tests and the benchmark.

Every generator returns the bytes of a genuine file (pymupdf writes the PDFs, openpyxl
the XLSX, python-pptx the PPTX; DOCX and the hostile files are assembled with
``zipfile`` by hand because python-docx is not a dependency). The ``*_of_size``
variants build text-heavy documents of roughly ``n_bytes`` for the benchmark.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence

import openpyxl
import pptx
import pymupdf
from pptx.util import Inches

Cell = str | int | float | None

_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "revenue",
    "forecast",
    "quarter",
    "margin",
    "budget",
    "invoice",
    "customer",
    "shipment",
    "warehouse",
]


def words(count: int, seed: int = 0) -> str:
    """``count`` pseudo-random words, deterministic for a given seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _fit(n_bytes: int, build: Callable[[int], bytes], sample: int, start: int = 0) -> bytes:
    """``build(count)`` with the largest count whose output stays at or just under ``n_bytes``."""
    base = len(build(start))
    per_unit = (len(build(start + sample)) - base) / sample
    count = max(1, start + int((n_bytes - base) / per_unit * 0.98))
    data = build(count)
    while len(data) > n_bytes and count > 1:
        count = int(count * 0.97)
        data = build(count)
    return data


# --- images ---------------------------------------------------------------------------


def make_png() -> bytes:
    """A valid 1x1 opaque red PNG, built by hand."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte + one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# --- PDF ------------------------------------------------------------------------------


def make_pdf(pages: Sequence[str], *, user_pw: str | None = None) -> bytes:
    """A PDF with one page per string (encrypted with AES-256 when ``user_pw`` is set)."""
    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        if text:
            page.insert_textbox(pymupdf.Rect(36, 36, 576, 806), text, fontsize=9)
    if user_pw is None:
        data: bytes = doc.tobytes(garbage=3, deflate=True)
    else:
        data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=user_pw, owner_pw=user_pw + "!")
    doc.close()
    return data


def make_pdf_of_size(n_bytes: int) -> bytes:
    """A text-heavy PDF of at most ``n_bytes`` (~5 KB, 2,000 words a page): 20 distinct pages, repeated."""

    def build(count: int) -> bytes:
        doc = pymupdf.open()
        for seed in range(min(count, 20)):
            page = doc.new_page()
            page.insert_textbox(pymupdf.Rect(20, 20, 592, 822), words(2000, seed=seed), fontsize=4)
        for i in range(count - 20):
            doc.fullcopy_page(i % 20)
        data: bytes = doc.tobytes()
        doc.close()
        return data

    return _fit(n_bytes, build, 100, start=20)


# --- DOCX -----------------------------------------------------------------------------

_DOCX_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.'
    'wordprocessingml.document.main+xml"/></Types>'
)
_DOCX_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
)
_W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def make_docx(paragraphs: Sequence[str], *, stored: bool = False) -> bytes:
    """A minimal but valid DOCX (Word opens it) with one paragraph per string (``stored``: not deflated)."""
    body = "".join(f"<w:p><w:r><w:t>{_xml_escape(p)}</w:t></w:r></w:p>" for p in paragraphs)
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<w:document xmlns:w="{_W_NS}"><w:body>{body}</w:body></w:document>'
    )
    return _zip(
        {"[Content_Types].xml": _DOCX_CONTENT_TYPES, "_rels/.rels": _DOCX_RELS, "word/document.xml": document}
    )


def make_docx_of_size(n_bytes: int) -> bytes:
    """A text-heavy, deflated DOCX of at most ``n_bytes`` (about 6x that in XML)."""

    def build(paragraph_count: int) -> bytes:
        body = "".join(
            f"<w:p><w:r><w:t>{words(60, seed=i)}</w:t></w:r></w:p>" for i in range(paragraph_count)
        )
        document = (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<w:document xmlns:w="{_W_NS}"><w:body>{body}</w:body></w:document>'
        )
        return _zip(_docx_parts(document))

    return _fit(n_bytes, build, 2000)


def _docx_parts(document: str) -> dict[str, str | bytes]:
    return {
        "[Content_Types].xml": _DOCX_CONTENT_TYPES,
        "_rels/.rels": _DOCX_RELS,
        "word/document.xml": document,
    }


def _zip(parts: dict[str, str | bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, content in parts.items():
            zf.writestr(name, content)
    return buf.getvalue()


# --- XLSX -----------------------------------------------------------------------------


def make_xlsx(sheets: dict[str, list[list[Cell]]]) -> bytes:
    """An XLSX written by openpyxl, one worksheet per entry, rows as given."""
    wb = openpyxl.Workbook()
    first = True
    for title, rows in sheets.items():
        ws = wb.active if first else wb.create_sheet()
        assert ws is not None
        ws.title = title
        first = False
        for row in rows:
            ws.append(row)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def make_xlsx_of_size(n_bytes: int) -> bytes:
    """An XLSX of at most ``n_bytes``: rows of random numbers and words (poorly compressible).

    Written in openpyxl's fast write-only mode, then given the ``<dimension>`` element
    Excel and LibreOffice always write (without it openpyxl's reader scans the whole sheet).
    """

    def build(row_count: int) -> bytes:
        rng = random.Random(7)
        wb = openpyxl.Workbook(write_only=True)
        ws = wb.create_sheet("Data")
        for _ in range(row_count):
            label = words(3, seed=rng.randint(0, 10**6))
            ws.append([rng.randint(0, 10**9), rng.random(), label, rng.random()])
        buf = io.BytesIO()
        wb.save(buf)
        src = zipfile.ZipFile(buf)
        parts: dict[str, str | bytes] = {name: src.read(name) for name in src.namelist()}
        sheet = bytes(parts["xl/worksheets/sheet1.xml"])
        dimension = f'</sheetPr><dimension ref="A1:D{max(row_count, 1)}"/>'.encode()
        parts["xl/worksheets/sheet1.xml"] = sheet.replace(b"</sheetPr>", dimension, 1)
        return _zip(parts)

    return _fit(n_bytes, build, 10_000)


# --- PPTX -----------------------------------------------------------------------------


def make_pptx(slides: Sequence[str | tuple[str, str]]) -> bytes:
    """A PPTX written by python-pptx; each slide is ``body`` or ``(body, notes)``."""
    prs = pptx.Presentation()
    layout = prs.slide_layouts[6]  # blank
    for item in slides:
        body, notes = (item, "") if isinstance(item, str) else item
        slide = prs.slides.add_slide(layout)
        box = slide.shapes.add_textbox(Inches(0.5), Inches(0.5), Inches(9), Inches(6))
        box.text_frame.text = body
        if notes:
            slide.notes_slide.notes_text_frame.text = notes
    buf = io.BytesIO()
    prs.save(buf)
    return buf.getvalue()


def make_pptx_with_table(rows: list[list[str]]) -> bytes:
    """A one-slide PPTX holding a table with the given cell texts."""
    prs = pptx.Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[6])
    shape = slide.shapes.add_table(len(rows), len(rows[0]), Inches(0.5), Inches(0.5), Inches(8), Inches(3))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            shape.table.cell(r, c).text = text
    buf = io.BytesIO()
    prs.save(buf)
    return buf.getvalue()


def make_pptx_of_size(n_bytes: int) -> bytes:
    """A text-heavy PPTX of at most ``n_bytes`` (2,000 random words a slide, deflated)."""

    def build(slide_count: int) -> bytes:
        prs = pptx.Presentation()
        layout = prs.slide_layouts[6]
        for seed in range(slide_count):
            slide = prs.slides.add_slide(layout)
            box = slide.shapes.add_textbox(Inches(0.5), Inches(0.5), Inches(9), Inches(6))
            box.text_frame.text = words(2000, seed=seed)
        buf = io.BytesIO()
        prs.save(buf)
        return buf.getvalue()

    return _fit(n_bytes, build, 20)


# --- hostile files --------------------------------------------------------------------


def make_zip_bomb(decompressed_bytes: int = 200 * 1024 * 1024) -> bytes:
    """A DOCX-shaped zip whose ``word/document.xml`` inflates to ``decompressed_bytes`` of zeros.

    The member is deflated in a streaming way so building it never holds the payload.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("[Content_Types].xml", _DOCX_CONTENT_TYPES)
        zf.writestr("_rels/.rels", _DOCX_RELS)
        block = b"\x00" * (1024 * 1024)
        with zf.open("word/document.xml", "w", force_zip64=True) as member:
            for _ in range(decompressed_bytes // len(block)):
                member.write(block)
    return buf.getvalue()


_LAUGHS = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    + "]>\n"
)


def make_billion_laughs_xlsx() -> bytes:
    """A real XLSX whose shared-strings part declares the billion-laughs entity chain."""
    data = make_xlsx({"Sheet": [["hello", "world"]]})
    src = zipfile.ZipFile(io.BytesIO(data))
    parts: dict[str, str | bytes] = {name: src.read(name) for name in src.namelist()}
    target = "xl/sharedStrings.xml" if "xl/sharedStrings.xml" in parts else "xl/worksheets/sheet1.xml"
    body = bytes(parts[target]).decode("utf-8")
    body = body.split("?>", 1)[1] if body.startswith("<?xml") else body
    body = body.replace("hello", "&lol9;", 1)
    parts[target] = _LAUGHS + body
    return _zip(parts)
