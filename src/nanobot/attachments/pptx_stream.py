"""Streaming PPTX text extraction: slide by slide, paragraph by paragraph, within a budget.

python-pptx loads every slide (and its lxml tree) before the first character comes out -
11-15x the file size for a text-heavy 10 MB deck - and cannot stop early. This reader
follows the same rules with ``ElementTree.iterparse`` and keeps only the path of open
elements in memory (each element is unlinked from its parent once its end is handled):

* slide order is ``p:sldIdLst/p:sldId`` in ``ppt/presentation.xml``, each ``r:id``
  resolved through ``ppt/_rels/presentation.xml.rels`` (file names do not matter);
* a slide gives the text of each shape's text frame (``p:sp`` in the shape tree or a
  group), paragraphs joined by newlines, runs and fields concatenated, ``a:br`` as a
  newline; and each table row (``a:tr``) as its cells' text joined by `` | ``;
  blank frames and rows are skipped;
* then ``Notes: `` and the text of the notes slide's body placeholder, the notes slide
  being the slide's ``.../notesSlide`` relationship.

The caller has run the zip pre-scan (bombs, DOCTYPE/ENTITY) before any of this.
"""

from __future__ import annotations

import contextlib
import functools
import posixpath
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Generator, Iterator
from typing import IO

from nanobot.attachments.collect import TextCollector

_PREFIXES = {
    "http://schemas.openxmlformats.org/drawingml/2006/main": "a",
    "http://schemas.openxmlformats.org/presentationml/2006/main": "p",
    "http://purl.oclc.org/ooxml/drawingml/main": "a",  # ISO 29500 Strict
    "http://purl.oclc.org/ooxml/presentationml/main": "p",
}
_SHAPE_PARENTS = ("p:spTree", "p:grpSp")
_TABLE_PATH = ["p:graphicFrame", "a:graphic", "a:graphicData", "a:tbl", "a:tr"]
_BODY_PATH = ["p:spTree", "p:sp", "p:nvSpPr", "p:nvPr", "p:ph"]
_RUNS = ("a:r", "a:fld")
_NOTES_REL = "/notesSlide"

Pieces = Generator[str, None, None]


def read_slides(zf: zipfile.ZipFile, max_chars: int) -> str:
    """Each slide under ``--- Slide N ---``: text frames, table rows (``a | b``), then notes."""
    slides = slide_parts(zf)
    out = TextCollector(max_chars)
    for number, part in enumerate(slides, 1):
        if not (out.add(f"--- Slide {number} ---\n") and _collect(_slide_pieces(zf, part), out)):
            left = len(slides) - number
            rest = f"the rest of slide {number}"
            return out.result(f"{rest} and {left:,} more slides" if left else rest)
    return out.result()


def slide_parts(zf: zipfile.ZipFile) -> list[str]:
    """The slide part names in presentation order (ids that lead to no part are skipped)."""
    main = "ppt/presentation.xml"
    targets = {rel_id: target for rel_id, _type, target in _relationships(zf, main)}
    order: list[str] = []
    with zf.open(main) as stream:
        for _event, elem in ET.iterparse(stream):
            if elem.tag.rpartition("}")[2] == "sldId":
                rel_id = next((v for k, v in elem.attrib.items() if k.endswith("}id")), "")
                if rel_id in targets:
                    order.append(targets[rel_id])
            elem.clear()
    return [part for part in order if _exists(zf, part)]


def _slide_pieces(zf: zipfile.ZipFile, part: str) -> Pieces:
    """The output pieces of one slide: its shapes' text, then its notes."""
    with zf.open(part) as stream:
        yield from _drawing_pieces(stream, notes=False)
    notes = next((t for _id, kind, t in _relationships(zf, part) if kind.endswith(_NOTES_REL)), None)
    if notes is not None and _exists(zf, notes):
        with zf.open(notes) as stream:
            yield from _drawing_pieces(stream, notes=True)


def _collect(pieces: Pieces, out: TextCollector) -> bool:
    """Feed ``pieces`` into ``out``; ``False`` (and the part closed) once the budget is spent."""
    with contextlib.closing(pieces):
        for piece in pieces:
            if not out.add(piece):
                return False
    return True


def _drawing_pieces(stream: IO[bytes], *, notes: bool) -> Pieces:
    """Output pieces of a slide part, or of a notes slide part's body placeholder (``notes``)."""
    reader = _PartReader(notes)
    open_elems: list[ET.Element] = []
    for event, elem in ET.iterparse(stream, events=("start", "end")):
        name = _name(elem.tag)
        if event == "start":
            reader.start(name, elem)
            open_elems.append(elem)
            continue
        piece = reader.end(name, elem)
        open_elems.pop()
        if open_elems:  # unlink the finished element: the tree never grows past the open path
            open_elems[-1].remove(elem)
        if piece:
            yield piece


@functools.lru_cache(maxsize=512)
def _name(tag: str) -> str:
    """``a:t``-style name of a DrawingML or PresentationML tag; ``?:local`` for other namespaces."""
    namespace, _, local = tag[1:].rpartition("}") if tag.startswith("{") else ("", "", tag)
    return f"{_PREFIXES.get(namespace, '?')}:{local}"


class _Frame:
    """One text frame's paragraphs, handed on as soon as the frame is known not to be blank.

    The output equals ``prefix + "\\n".join(paragraphs) + "\\n"`` when that join is not
    blank, nothing otherwise - but it streams, so a huge frame can stop mid-way.
    """

    __slots__ = ("pending", "prefix", "started")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pending: list[str] = []  # leading paragraphs while all of them are blank
        self.started = False

    def paragraph(self, text: str) -> str | None:
        """The piece to emit for the next paragraph, if any yet."""
        if self.started:
            return "\n" + text
        self.pending.append(text)
        if not text.strip():
            return None
        self.started = True
        head = self.prefix + "\n".join(self.pending)
        self.pending.clear()
        return head

    def close(self) -> str | None:
        """The frame's final newline (nothing for a blank frame)."""
        return "\n" if self.started else None


class _PartReader:
    """State of one slide or notes slide part, driven by iterparse start/end events."""

    __slots__ = ("body_done", "cell", "frame", "in_body", "line", "notes", "path", "row")

    def __init__(self, notes: bool) -> None:
        self.notes = notes
        # names of the open elements, the current one last, after blanks so that looking
        # a few levels up never runs off the start, whatever the root element is
        self.path: list[str] = [""] * 6
        self.line: list[str] = []  # text of the paragraph being read
        self.frame: _Frame | None = None  # the text frame being read, if it is wanted
        self.row: list[str] | None = None  # cell texts of the table row being read
        self.cell: list[str] | None = None  # paragraphs of the table cell being read
        self.in_body = False  # notes: the current top-level shape is the body placeholder
        self.body_done = False  # notes: the body placeholder was read (only the first counts)

    def start(self, name: str, elem: ET.Element) -> None:
        """An element opened (its attributes are known, its content is not)."""
        path = self.path
        path.append(name)
        if name == "p:txBody" and path[-2] == "p:sp" and self._wants_frame():
            self.frame = _Frame("Notes: " if self.notes else "")
        elif self.notes:
            if name == "p:ph" and path[-5:] == _BODY_PATH:
                self.in_body = elem.get("type") == "body"
            elif name == "p:sp" and path[-2] == "p:spTree":
                self.in_body = False
        elif name == "a:tr" and path[-5:] == _TABLE_PATH and path[-6] in _SHAPE_PARENTS:
            self.row = []
        elif name == "a:tc" and self.row is not None:
            self.cell = []

    def _wants_frame(self) -> bool:
        if not self.notes:
            return self.path[-3] in _SHAPE_PARENTS
        return self.path[-3] == "p:spTree" and self.in_body and not self.body_done

    def end(self, name: str, elem: ET.Element) -> str | None:
        """An element closed; the piece of output it completes, if any."""
        path = self.path
        path.pop()
        if name == "a:t":
            if path[-1] in _RUNS and path[-2] == "a:p":
                self.line.append(elem.text or "")
        elif name == "a:br":
            if path[-1] == "a:p":
                self.line.append("\n")
        elif name == "a:p":
            return self._paragraph_end(path[-1])
        elif name == "p:txBody" and self.frame is not None:
            piece, self.frame = self.frame.close(), None
            return piece
        elif name == "a:tc" and self.row is not None and self.cell is not None:
            self.row.append("\n".join(self.cell))
            self.cell = None
        elif name == "a:tr" and self.row is not None:
            text, self.row = " | ".join(self.row), None
            return text + "\n" if text.strip() else None
        elif name == "p:sp" and self.notes and self.in_body and path[-1] == "p:spTree":
            self.body_done = True
        return None

    def _paragraph_end(self, parent: str) -> str | None:
        text = "".join(self.line)
        self.line.clear()
        if parent == "p:txBody" and self.frame is not None:
            return self.frame.paragraph(text)
        if parent == "a:txBody" and self.cell is not None and self.path[-2] == "a:tc":
            self.cell.append(text)
        return None


# --- package relationships ------------------------------------------------------------


def _relationships(zf: zipfile.ZipFile, part: str) -> Iterator[tuple[str, str, str]]:
    """``(Id, Type, target part name)`` of each internal relationship of ``part``."""
    folder, _, file_name = part.rpartition("/")
    rels = posixpath.join(folder, "_rels", file_name + ".rels")
    if not _exists(zf, rels):
        return
    with zf.open(rels) as stream:
        for _event, elem in ET.iterparse(stream):
            if elem.tag.rpartition("}")[2] == "Relationship" and elem.get("TargetMode") != "External":
                target = elem.get("Target", "")
                resolved = target[1:] if target.startswith("/") else posixpath.join(folder, target)
                yield elem.get("Id", ""), elem.get("Type", ""), posixpath.normpath(resolved)
            elem.clear()


def _exists(zf: zipfile.ZipFile, name: str) -> bool:
    try:
        zf.getinfo(name)
    except KeyError:
        return False
    return True
