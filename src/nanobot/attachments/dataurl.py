"""``data:`` URLs, the only way a JSON request may carry a file inline."""

from __future__ import annotations

import binascii

from nanobot.errors import PayloadTooLargeError, RequestError

_WHITESPACE = b" \t\r\n"
# MIME-style base64 wraps lines; allow that much whitespace before refusing unread.
_WHITESPACE_SLACK = 1.1


def decode_data_url(url: str, *, param: str, max_bytes: int) -> tuple[str, bytes]:
    """Decode ``data:<mime>[;params];base64,<data>`` into ``(mime, bytes)``.

    The server never fetches URLs: ``http(s)://`` and any other scheme is a 400. The
    payload must be strict base64 (line breaks are tolerated); the decoded size is
    checked against ``max_bytes`` *before* decoding, so a huge string is never decoded.
    ``mime`` is the client's claim, lower-cased; callers sniff the bytes anyway.
    """
    if url[:5].lower() != "data:":
        scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
        what = f"{scheme}:// URLs are" if scheme in ("http", "https", "ftp", "file") else "this value is"
        raise RequestError(
            f"{param}: {what} not accepted; send the file as a base64 data: URL or a multipart "
            "upload (the server never fetches URLs)",
            param=param,
        )
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or params[-1] != "base64":
        raise RequestError(
            f"{param}: the data: URL must be base64-encoded (data:<type>;base64,...)", param=param
        )
    mime = params[0] or "application/octet-stream"
    max_encoded = (max_bytes + 2) // 3 * 4
    if len(payload) > max_encoded * _WHITESPACE_SLACK + 64:
        raise _too_large(param, len(payload) * 3 // 4, max_bytes)
    encoded = payload.encode("ascii", errors="replace").translate(None, _WHITESPACE)
    padding = len(encoded) - len(encoded.rstrip(b"="))
    decoded_size = len(encoded) * 3 // 4 - min(padding, 2)
    if decoded_size > max_bytes:
        raise _too_large(param, decoded_size, max_bytes)
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except binascii.Error as exc:
        raise RequestError(f"{param}: the data: URL holds invalid base64 ({exc})", param=param) from exc
    return mime, data


def _too_large(param: str, size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{param}: the file is about {size:,} bytes; the limit is {limit:,} bytes", param=param
    )
