"""Checks an Office (OOXML) zip before any parser sees it: zip bombs and XML entity tricks.

Declared sizes in a zip are the attacker's word, so the pre-scan inflates every member
in 1 MiB chunks and counts the bytes that actually come out: more than
:data:`MAX_UNZIPPED_BYTES` in total, or a member inflating more than
:data:`MAX_RATIO` times its compressed size (past 1 MiB), is refused as a zip bomb
before any memory is spent on it. The parsers then read the same, now bounded, bytes.

No genuine Office part has a document type declaration, and every XML entity trick
(billion laughs, external entities) needs one, so any member that is XML and contains
``<!DOCTYPE`` or ``<!ENTITY`` - in UTF-8 or, for parts written in UTF-16/32, in that
encoding - is refused. XML parts in other encodings (UTF-7, EBCDIC...) are refused too,
since the needle search could not see through them. ``.svg`` media are not parsed by
any extractor and are skipped (illustrators' SVGs often carry a DOCTYPE).
"""

from __future__ import annotations

import codecs
import re
import zipfile
from typing import IO

from nanobot.attachments.failures import Unreadable

MiB = 1024 * 1024
MAX_UNZIPPED_BYTES = 100 * MiB
MAX_RATIO = 200
RATIO_FLOOR = MiB  # small members may compress extremely well (runs of spaces) and cost nothing
MAX_MEMBERS = 10_000
CHUNK = MiB

_XML_SUFFIXES = (".xml", ".rels", ".vml")
_DECLARED_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_SAFE_ENCODINGS = frozenset(
    {
        *("utf-8", "utf8", "us-ascii", "ascii"),
        *("utf-16", "utf-16le", "utf-16be", "utf-32", "utf-32le", "utf-32be"),
        *("iso-8859-1", "latin1", "latin-1", "iso-8859-15", "windows-1252", "cp1252"),
    }
)
_UNICODE_SIGNATURES = (  # BOMs and the byte pattern of "<" when there is no BOM
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (b"<\x00\x00\x00", "utf-32-le"),
    (b"\x00\x00\x00<", "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
    (b"<\x00", "utf-16-le"),
    (b"\x00<", "utf-16-be"),
)


def prescan(zf: zipfile.ZipFile) -> None:
    """Inflate every member with a byte budget and refuse bombs and DOCTYPEs (raises Unreadable)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise Unreadable(f"has too many parts ({len(infos):,}; the limit is {MAX_MEMBERS:,})")
    total = 0
    for info in infos:
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise Unreadable("is encrypted")
        with zf.open(info) as member:
            total = _scan_member(info, member, total)


def _scan_member(info: zipfile.ZipInfo, member: IO[bytes], total: int) -> int:
    needles: tuple[bytes, ...] = ()
    odd_encoding = False  # reported after the bomb checks, which are the more telling reason
    tail = b""
    produced = 0
    while chunk := member.read(CHUNK):
        if produced == 0:
            needles, odd_encoding = _xml_needles(info.filename, chunk)
        produced += len(chunk)
        total += len(chunk)
        if total > MAX_UNZIPPED_BYTES:
            raise Unreadable(
                f"expands to more than {MAX_UNZIPPED_BYTES // MiB} MiB when unzipped (refused as a zip bomb)"
            )
        if produced > RATIO_FLOOR and produced > MAX_RATIO * max(info.compress_size, 1):
            raise Unreadable(
                f"has a part ({info.filename}) compressed more than {MAX_RATIO}:1 (refused as a zip bomb)"
            )
        if needles:
            window = tail + chunk
            if any(needle in window for needle in needles):
                raise Unreadable(f"has an XML part ({info.filename}) with a DOCTYPE or ENTITY declaration")
            tail = window[-32:]
    if odd_encoding:
        raise Unreadable(f"has an XML part ({info.filename}) in an unsupported encoding")
    return total


def _xml_needles(name: str, head: bytes) -> tuple[tuple[bytes, ...], bool]:
    """The byte strings to refuse in a member starting with ``head`` (none if it is not XML),
    and whether it is XML in an encoding the search cannot see through."""
    lowered = name.lower()
    if lowered.endswith(".svg"):
        return (), False
    encoding = "utf-8"
    for signature, codec in _UNICODE_SIGNATURES:
        if head.startswith(signature):
            encoding = codec
            break
    prolog = head[:256].decode(encoding, errors="replace").lstrip("\ufeff \t\r\n")
    named_xml = lowered.endswith(_XML_SUFFIXES)
    if not prolog.startswith("<"):
        return (), named_xml
    declared = _DECLARED_ENCODING.search(prolog.encode("ascii", errors="replace"))
    odd = declared is not None and declared.group(1).decode().lower() not in _SAFE_ENCODINGS
    return ("<!DOCTYPE".encode(encoding), "<!ENTITY".encode(encoding)), odd
