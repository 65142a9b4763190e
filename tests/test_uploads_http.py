"""File uploads over HTTP: JSON base64 parts and multipart, what the model sees, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from conftest import MODEL
from fake_llm import FakeLLM
from samples import (
    make_billion_laughs_xlsx,
    make_docx,
    make_pdf,
    make_png,
    make_pptx,
    make_xlsx,
    make_zip_bomb,
)


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def upstream_user(fake_llm: FakeLLM, index: int = -1) -> Any:
    """The content of the last user message the upstream received."""
    return fake_llm.requests[index]["messages"][-1]["content"]


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p["type"] == "text")


async def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    data = io.BytesIO(orjson.dumps(body))
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/chat/completions", data=data, headers=headers) as r,
    ):
        return r.status, await r.json()


async def post_form(url: str, fields: list[tuple[str, bytes | str, str | None]]) -> tuple[int, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value, filename in fields:
        if filename is None:
            form.add_field(name, value)
        else:
            payload = io.BytesIO(value) if isinstance(value, bytes) else value  # large bytes: no warning
            form.add_field(name, payload, filename=filename, content_type="application/octet-stream")
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", data=form) as r:
        return r.status, await r.json()


async def test_json_image_goes_to_the_model_and_history_keeps_a_placeholder(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """An image_url data URL reaches the model as an image part; the next turn sees only [image: ...]."""
    png = make_png()
    await client.chat.completions.create(
        model=MODEL,
        extra_body={"session_id": "img"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this image"},
                    {"type": "image_url", "image_url": {"url": data_url("image/png", png)}},
                ],
            }
        ],
    )
    parts = upstream_user(fake_llm)
    assert parts[0] == {"type": "text", "text": "Describe this image"}
    assert parts[1]["type"] == "image_url"
    assert base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1]) == png
    await client.chat.completions.create(
        model=MODEL, extra_body={"session_id": "img"}, messages=[{"role": "user", "content": "and now?"}]
    )
    earlier = fake_llm.requests[-1]["messages"][1]["content"]
    assert isinstance(earlier, str) and "[image:" in earlier and "base64" not in earlier


async def test_json_file_part_pdf_text_reaches_the_model(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """OpenAI's file part with a PDF: the model gets its text in a [File: ...] block."""
    pdf = make_pdf(["Quarterly revenue grew by 42 percent", "Second page about costs"])
    await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarize this report"},
                    {
                        "type": "file",
                        "file": {"filename": "report.pdf", "file_data": data_url("application/pdf", pdf)},
                    },
                ],
            }
        ],
    )
    text = text_of(upstream_user(fake_llm))
    assert text.startswith("Summarize this report")
    assert "[File: report.pdf]" in text and "--- Page 1 ---" in text and "--- Page 2 ---" in text
    assert "Quarterly revenue grew by 42 percent" in text and "Second page about costs" in text


async def test_document_mime_in_image_url_is_treated_as_a_document(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    """A DOCX sent as an image_url data URL is extracted as a document, not sent as an image."""
    docx = make_docx(["Meeting notes: ship on Friday"])
    mime = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What was decided?"},
                    {"type": "image_url", "image_url": {"url": data_url(mime, docx)}},
                ],
            }
        ],
    )
    content = upstream_user(fake_llm)
    assert "ship on Friday" in text_of(content)
    assert isinstance(content, str) or all(p["type"] == "text" for p in content)


async def test_multipart_several_files(gateway: str, fake_llm: FakeLLM) -> None:
    """multipart/form-data with a PNG, an XLSX, a PPTX and a PDF: image part plus each document's text."""
    xlsx = make_xlsx({"Sales": [["region", "total"], ["north", 1200], ["south", 800]]})
    pptx = make_pptx([("Roadmap", "Launch in March")])
    status, data = await post_form(
        gateway,
        [
            ("message", "Compare these files", None),
            ("files", make_png(), "chart.png"),
            ("files", xlsx, "data.xlsx"),
            ("files", pptx, "deck.pptx"),
            ("files", make_pdf(["Budget is 5000 euros"]), "budget.pdf"),
            ("session_id", "my-session", None),
        ],
    )
    assert status == 200, data
    content = upstream_user(fake_llm)
    text = text_of(content)
    assert text.startswith("Compare these files")
    assert "[File: data.xlsx]" in text and "--- Sheet: Sales ---" in text and "north,1200" in text
    assert "[File: deck.pptx]" in text and "--- Slide 1 ---" in text and "Launch in March" in text
    assert "[File: budget.pdf]" in text and "Budget is 5000 euros" in text
    assert [p["type"] for p in content if p["type"] != "text"] == ["image_url"]


async def test_multipart_session_and_follow_up_keep_document_text(gateway: str, fake_llm: FakeLLM) -> None:
    """A follow-up question on the same session still has the document's text in its history."""
    status, _ = await post_form(
        gateway,
        [
            ("message", "Read this", None),
            ("files", b"The launch code is 7-4-1.\n", "notes.txt"),
            ("session_id", "docs", None),
        ],
    )
    assert status == 200
    status, _ = await post_json(
        gateway, {"messages": [{"role": "user", "content": "What is the code?"}], "session_id": "docs"}
    )
    assert status == 200
    history = fake_llm.requests[-1]["messages"][1]["content"]
    assert "[File: notes.txt]" in history and "7-4-1" in history


async def test_multipart_can_stream(gateway: str, fake_llm: FakeLLM) -> None:
    """stream=true in a multipart form gives SSE ending in [DONE]."""
    form = aiohttp.FormData()
    form.add_field("message", "hi")
    form.add_field("stream", "true")
    form.add_field("files", b"plain text file", filename="a.txt")
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", data=form) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    assert raw.rstrip().endswith("data: [DONE]") and "echo: hi" in raw


async def test_urlencoded_form_works_like_multipart(gateway: str, fake_llm: FakeLLM) -> None:
    """`curl -d "message=hi&session_id=x"` is accepted as form fields."""
    form = {"message": "hi", "session_id": "f"}
    async with aiohttp.ClientSession() as s, s.post(f"{gateway}/v1/chat/completions", data=form) as r:
        assert r.status == 200
        assert (await r.json())["choices"][0]["message"]["content"] == "echo: hi"


async def test_multipart_wrong_model_is_400(gateway: str) -> None:
    """The multipart model field is checked like the JSON one."""
    status, data = await post_form(gateway, [("message", "hi", None), ("model", "other", None)])
    assert status == 400 and data["error"]["param"] == "model"


BAD_UPLOADS: list[tuple[str, bytes, int, str]] = [
    ("bomb.docx", make_zip_bomb(), 422, "bomb.docx"),
    ("laughs.xlsx", make_billion_laughs_xlsx(), 422, "laughs.xlsx"),
    ("truncated.pdf", make_pdf(["some text here"] * 3)[:400], 422, "truncated.pdf"),
    ("secret.pdf", make_pdf(["classified"], user_pw="pw"), 422, "encrypted"),
    ("report.pdf", b"\x00\x01\x02garbage that is not a pdf\xff\xfe" * 10, 415, "report.pdf"),
    ("empty.txt", b"", 400, "empty.txt"),
    ("big.txt", b"a" * (10 * 1024 * 1024 + 1), 413, "big.txt"),
]


@pytest.mark.parametrize(("name", "data", "status", "needle"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
async def test_bad_multipart_uploads_get_clear_errors(
    gateway: str, fake_llm: FakeLLM, name: str, data: bytes, status: int, needle: str
) -> None:
    """Each bad file gets its precise 4xx naming the file; the model is never called; the server stays up."""
    got, body = await post_form(gateway, [("message", "read", None), ("files", data, name)])
    assert got == status, body
    assert needle in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert fake_llm.requests == []
    async with aiohttp.ClientSession() as s, s.get(f"{gateway}/health") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("name", "data", "status", "needle"), BAD_UPLOADS[:5], ids=[b[0] for b in BAD_UPLOADS[:5]]
)
async def test_bad_json_uploads_get_clear_errors(
    gateway: str, fake_llm: FakeLLM, name: str, data: bytes, status: int, needle: str
) -> None:
    """The same bad files as JSON file parts get the same errors."""
    got, body = await post_json(
        gateway,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "read"},
                        {
                            "type": "file",
                            "file": {
                                "filename": name,
                                "file_data": data_url("application/octet-stream", data),
                            },
                        },
                    ],
                }
            ]
        },
    )
    assert got == status, body
    assert needle in body["error"]["message"]


async def test_unprocessable_file_raises_the_sdk_exception(client: openai.AsyncOpenAI) -> None:
    """A corrupt document is a 422, which the openai SDK raises as UnprocessableEntityError."""
    with pytest.raises(openai.UnprocessableEntityError):
        await client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "file",
                            "file": {
                                "filename": "t.pdf",
                                "file_data": data_url("application/pdf", b"%PDF-1.7\n"),
                            },
                        },
                    ],
                }
            ],
        )


async def test_remote_urls_are_refused(gateway: str, fake_llm: FakeLLM) -> None:
    """An http(s) image URL is a 400: the server never fetches URLs."""
    status, body = await post_json(
        gateway,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                }
            ]
        },
    )
    assert status == 400 and "never fetches URLs" in body["error"]["message"]
    assert fake_llm.requests == []


async def test_garbage_base64_names_the_part(gateway: str) -> None:
    """Malformed base64 is a 400 naming the content part."""
    status, body = await post_json(
        gateway,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64!!"}},
                    ],
                }
            ]
        },
    )
    assert status == 400
    assert (
        "messages[0].content[1]" in body["error"]["message"]
        or body["error"]["param"] == "messages[0].content[1]"
    )


async def test_oversized_base64_is_413(gateway: str) -> None:
    """A JSON file part over 10 MB after decoding is a 413."""
    big = data_url("text/plain", b"a" * (10 * 1024 * 1024 + 3))
    status, body = await post_json(
        gateway,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "file", "file": {"filename": "big.txt", "file_data": big}}],
                }
            ]
        },
    )
    assert status == 413 and body["error"]["code"] == "payload_too_large"


async def test_traversal_file_name_is_only_a_label(gateway: str, fake_llm: FakeLLM) -> None:
    """A raw ../../etc/passwd file name (as curl sends it) becomes the label 'passwd' and builds no path."""
    boundary = "nanobotboundary"
    raw = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="message"\r\n\r\nx\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="../../etc/passwd"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway}/v1/chat/completions", data=raw, headers=headers) as r,
    ):
        assert r.status == 200
    text = text_of(upstream_user(fake_llm))
    assert "[File: passwd]" in text and "../" not in text


async def test_too_many_files_is_400(gateway: str, fake_llm: FakeLLM) -> None:
    """17 files (more than api.maxFiles) is a 400."""
    fields: list[tuple[str, bytes | str, str | None]] = [("message", "x", None)]
    fields += [("files", b"text", f"f{i}.txt") for i in range(17)]
    status, body = await post_form(gateway, fields)
    assert status == 400 and "16" in body["error"]["message"]


async def test_hundred_parts_is_400(gateway: str) -> None:
    """A form with 100 parts is refused with a 400, and the server keeps answering."""
    fields: list[tuple[str, bytes | str, str | None]] = [("message", "x", None)] * 100
    status, _ = await post_form(gateway, fields)
    assert status == 400
    status, _ = await post_json(gateway, {"messages": [{"role": "user", "content": "still there?"}]})
    assert status == 200


async def test_request_over_max_request_bytes_is_413(start_gateway: Callable[..., Awaitable[str]]) -> None:
    """The whole multipart body is bounded by api.maxRequestBytes."""
    url = await start_gateway({"api": {"maxRequestBytes": 100_000}})
    status, body = await post_form(
        url, [("message", "x", None)] + [("files", b"a" * 40_000, f"{i}.txt") for i in range(3)]
    )
    assert status == 413 and "maxRequestBytes" in body["error"]["message"]


async def post_raw(url: str, body: bytes, boundary: str = "XX") -> tuple[int, Any, str | None]:
    """POST a hand-written multipart body; the status, the JSON answer and the x-request-id."""
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r,
    ):
        return r.status, await r.json(), r.headers.get("x-request-id")


MALFORMED_FORMS = {
    "bad header byte": b'--XX\r\nContent-Dis\xf0osition: form-data; name="message"\r\n\r\nhi\r\n--XX--\r\n',
    "non-UTF-8 field name": (
        b'--XX\r\nContent-Disposition: form-data; name="fil\xe5s"\r\n\r\nhi\r\n--XX--\r\n'
    ),
    "no name": b"--XX\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--XX--\r\n",
    "header line too long": b"--XX\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\nhi\r\n--XX--\r\n",
    "no closing boundary": b'--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nhi',
    "no opening boundary": b"just some bytes\r\n",
    "bad _charset_ part": b'--XX\r\nContent-Disposition: form-data; name="_charset_"\r\n\r\n'
    + b"x" * 40
    + b'\r\n--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nhi\r\n--XX--\r\n',
}


@pytest.mark.parametrize("body", MALFORMED_FORMS.values(), ids=MALFORMED_FORMS.keys())
async def test_malformed_multipart_is_a_400_in_openai_shape(
    gateway: str, fake_llm: FakeLLM, body: bytes
) -> None:
    """A malformed form is a 400 OpenAI error with an x-request-id, never a 500 (or a plain-text one)."""
    status, data, rid = await post_raw(gateway, body)
    assert status == 400, data
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error" and rid
    assert fake_llm.requests == []


async def test_non_utf8_field_name_is_named_readably(gateway: str) -> None:
    """An unknown field with a Latin-1 name is named in the 400 (decoded as Latin-1), never garbled."""
    status, data, _ = await post_raw(gateway, MALFORMED_FORMS["non-UTF-8 field name"])
    assert status == 400 and "'filås'" in data["error"]["message"] and data["error"]["param"] == "filås"


def latin1_form(filename: bytes, content: bytes, content_type: str = "text/plain") -> bytes:
    return (
        b'--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nsummarize\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n'
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + content + b"\r\n--XX--\r\n"
    )


async def test_latin1_file_name_uploads_fine(gateway: str, fake_llm: FakeLLM) -> None:
    """A file name in Latin-1 bytes (as some clients send it) is only a label: the upload works and
    the file's text reaches the model under that name."""
    status, data, _ = await post_raw(gateway, latin1_form(b"r\xe9sum\xe9.txt", b"hello from the file"))
    assert status == 200, data
    text = text_of(upstream_user(fake_llm))
    assert "[File: résumé.txt]" in text and "hello from the file" in text


async def test_rfc5987_file_name_wins(gateway: str, fake_llm: FakeLLM) -> None:
    """filename*=UTF-8''… (RFC 7578/5987) names the file, over the ASCII fallback filename."""
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nread\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="files"; filename="fallback.txt"; '
        b"filename*=UTF-8''%E2%82%AC-report.txt\r\n\r\nnumbers\r\n--XX--\r\n"
    )
    status, data, _ = await post_raw(gateway, body)
    assert status == 200, data
    assert "[File: €-report.txt]" in text_of(upstream_user(fake_llm))


async def test_latin1_image_name_does_not_break_the_session(gateway: str, fake_llm: FakeLLM) -> None:
    """An image with a Latin-1 file name is answered, and the session keeps working afterwards
    (its history label used to be undecodable text that failed every later turn)."""
    body = latin1_form(b"photo-\xe9t\xe9.png", make_png(), "image/png")
    status, data, _ = await post_raw(gateway, body)
    assert status == 200, data
    status, data = await post_json(gateway, {"messages": [{"role": "user", "content": "and now?"}]})
    assert status == 200, data
    assert "photo-été.png" in fake_llm.requests[-1]["messages"][1]["content"]


async def test_undecodable_content_type_is_a_clean_400(gateway: str) -> None:
    """A multipart Content-Type with raw non-UTF-8 bytes and no boundary gets a 400 OpenAI error
    with an x-request-id (its text quoted in the error used to break the JSON error body)."""
    host, port = gateway.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b"--XX--\r\n"
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
        b"Content-Type: multipart/form-data; name=caf\xe9\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), raw[:300]
    assert b"\r\nx-request-id: " in head.lower()
    error = orjson.loads(payload)["error"]
    assert "boundary" in error["message"] and error["type"] == "invalid_request_error"
