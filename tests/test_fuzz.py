"""Property-based fuzzing of POST /v1/chat/completions: whatever the body, a clean answer.

Random JSON values, mutated chat requests, mutated multipart forms and raw bytes under many
Content-Types go to one real gateway (the fake LLM behind it echoes). Every answer must be a
2xx that is a well-formed completion or stream, or a 4xx OpenAI error with an x-request-id;
never a 5xx, a hang, or a traceback in the log. The examples are derandomized, so a run is
repeatable, and share one gateway per test (hence the function-scoped-fixture health check
is suppressed on purpose: each example is one independent request).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import MODEL
from samples import make_png

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ERROR_KEYS = {"message", "type", "param", "code"}
PNG = make_png()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session for every example of a test."""
    async with aiohttp.ClientSession() as session:
        yield session


def _check_error(status: int, raw: bytes) -> None:
    body = orjson.loads(raw)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error" or status != 400, body


def _check_stream(raw: bytes) -> None:
    events = [e for e in raw.decode().split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]", events[-3:]
    for frame in events[:-1]:
        chunk = orjson.loads(frame.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk", chunk  # an error event has no object


async def exchange(http: aiohttp.ClientSession, url: str, data: bytes, ctype: str | None) -> int:
    """POST ``data``; check the answer is clean whatever it is; return its status."""
    headers = {} if ctype is None else {"Content-Type": ctype}
    async with asyncio.timeout(20):
        async with http.post(f"{url}/v1/chat/completions", data=data, headers=headers) as r:
            raw = await r.read()
    assert r.status < 500, raw[:500]
    assert r.headers.get("x-request-id"), r.headers
    if r.status >= 400:
        assert r.content_type == "application/json", raw[:200]
        _check_error(r.status, raw)
    elif r.content_type == "text/event-stream":
        _check_stream(raw)
    else:
        body = orjson.loads(raw)
        assert body["object"] == "chat.completion", body
        assert isinstance(body["choices"][0]["message"]["content"], str), body
    return r.status


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged at ERROR, and no record carrying an exception."""
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# -- JSON ---------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(["", " ", "\n\t ", "\x00", "\u202eexe.txt", "\ud800", "hi", "é"]) | st.integers(
    4000, 6000
).map(lambda n: "x" * n)
TEXT = st.text(max_size=12) | ODD_TEXT
NUMBER = st.integers() | st.floats() | st.sampled_from([0, -1, 2**63, -(2**70), 1e308, 0.5])
LEAF = st.none() | st.booleans() | NUMBER | TEXT
JSON = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=10
)
DATA_URLS = st.sampled_from(
    [
        "data:text/plain;base64," + base64.b64encode(b"fuzz file text").decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7 not really").decode(),
        "data:;base64,@@@",
        "data:image/png;base64,",
        "data:text/plain,plain%20text",
        "https://example.com/cat.png",
        "",
    ]
)
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "file", "input_audio", "TEXT", None, 3])},
    optional={
        "text": TEXT | JSON,
        "image_url": st.fixed_dictionaries({"url": DATA_URLS | JSON}) | DATA_URLS | JSON,
        "file": st.fixed_dictionaries({}, optional={"file_data": DATA_URLS | JSON, "filename": TEXT | JSON}),
    },
)
CONTENT = TEXT | st.lists(PART, max_size=4) | JSON
ROLE = st.sampled_from(["user", "user", "system", "developer", "assistant", "tool", "function", "USER", ""])
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE | JSON},
    optional={"content": CONTENT, "name": TEXT, "tool_calls": JSON, "tool_call_id": TEXT},
)
CHAT_FIELDS = {
    "model": st.sampled_from([MODEL, "gpt-4o", ""]) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON}) | JSON,
    "session_id": st.sampled_from(["s1", "fuzz", "x" * 200, "a\nb"]) | TEXT | JSON,
    "temperature": NUMBER | JSON,
    "max_tokens": NUMBER | JSON,
    "max_completion_tokens": NUMBER | JSON,
    "n": NUMBER,
    "tools": JSON,
    "user": TEXT,
    "metadata": JSON,
}


VALID_CONTENT = st.sampled_from(
    [
        "hi",
        [{"type": "text", "text": "read this"}],
        [
            {"type": "text", "text": "read this"},
            {"type": "file", "file": {"filename": "a.txt", "file_data": "data:text/plain;base64,aGk="}},
        ],
        [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
            }
        ],
    ]
)


@st.composite
def chat_requests(draw: st.DrawFn) -> tuple[object, bool]:
    """A valid chat request, then 0-3 mutations: wrong types, missing and extra fields, odd roles
    and message orders, huge or negative numbers, nested content parts."""
    messages: list[object] = [{"role": "user", "content": draw(VALID_CONTENT)}]
    if draw(st.booleans()):
        messages.insert(0, {"role": draw(st.sampled_from(["system", "developer"])), "content": "be brief"})
    body: dict[str, object] = {"model": MODEL, "messages": messages, "stream": draw(st.booleans())}
    mutations = draw(st.integers(0, 3))
    for _ in range(mutations):
        kind = draw(st.sampled_from(["field", "drop", "message", "insert", "content", "extra"]))
        if kind == "field":
            key = draw(st.sampled_from(sorted(CHAT_FIELDS)))
            body[key] = draw(CHAT_FIELDS[key])
        elif kind == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif kind == "message":
            messages[draw(st.integers(0, len(messages) - 1))] = draw(MESSAGE)
        elif kind == "insert":
            messages.insert(draw(st.integers(0, len(messages))), draw(MESSAGE))
        elif kind == "content":
            messages[-1] = {"role": "user", "content": draw(CONTENT)}
        else:
            body[draw(TEXT)] = draw(JSON)
    return body, mutations == 0  # an unmutated request must succeed


def encode_json(value: object) -> bytes:
    """Serialise with the standard library: it writes what orjson refuses (huge ints, NaN, lone
    surrogates as escapes), which is exactly the input worth sending."""
    return json.dumps(value).encode()


@FUZZ
@given(
    case=chat_requests() | chat_requests() | JSON.map(lambda value: (value, False)),
    ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
)
async def test_random_json_bodies_get_clean_answers(
    gateway: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    case: tuple[object, bool],
    ctype: str | None,
) -> None:
    """No JSON body, however wrong, gets a 5xx, a malformed answer, or a traceback in the log;
    a valid one gets its answer."""
    caplog.clear()
    body, valid = case
    status = await exchange(http, gateway, encode_json(body), ctype)
    assert status == 200 or not valid or ctype is None
    event(f"HTTP {status}")  # --hypothesis-show-statistics: how often each answer came
    no_tracebacks(caplog)


async def test_the_json_fuzzer_reaches_the_model(gateway: str, http: aiohttp.ClientSession) -> None:
    """A sanity check of the harness: a valid request through it gets a 200 echo."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert await exchange(http, gateway, encode_json(body), "application/json") == 200


# -- multipart ----------------------------------------------------------------------------------

FORM_NAMES = [b"message", b"files", b"file", b"files[]", b"session_id", b"model", b"stream", b"system"]
NAMES = st.sampled_from(
    [*FORM_NAMES, b"_charset_", b"bogus", b"fil\xe5s", b"", b"messa\x00ge", "résumé".encode()]
)
GOOD_FILENAMES = [
    None,
    b"a.txt",
    b"r\xe9sum\xe9.txt",
    "résumé.txt".encode(),
    b"../../etc/passwd",
    b"C:\\d\\x.txt",
]
FILENAMES = st.sampled_from([*GOOD_FILENAMES, b"", b'a\\"b.txt', b"\xff\xfe\x00", b"x" * 300])
DISPOSITIONS = st.sampled_from(
    [
        b'form-data; name="%(name)s"%(file)s',
        b"form-data; name=%(name)s%(file)s",
        b'form-data; name="%(name)s"; name="other"%(file)s',
        b'name="%(name)s"',
        b"form-data;;",
        b"form-data; name=\"%(name)s\"; filename*=UTF-8''%%E2%%82%%AC.txt",
        b"form-data; name=\"%(name)s\"; filename*=bogus''%%FF%%FE",
        b'form-data; name="%(name)s',
        b"attachment",
        b"",
    ]
)
EXTRA_HEADERS = st.lists(
    st.sampled_from(
        [
            b"Content-Type: text/plain",
            b"Content-Type: multipart/mixed",
            b"Content-Type: multipart/mixed; boundary=ZZ",
            b"Content-Length: 5",
            b"Content-Length: -1",
            b"Content-Transfer-Encoding: base64",
            b"Content-Encoding: gzip",
            b"X-\xff: y",
            b"no colon here",
            b"Content-Dis\xf0osition: form-data",
            b" folded continuation",
            b": empty name",
        ]
    ),
    max_size=2,
)
VALUES = st.sampled_from([b"hi", b"", b"  ", b"true", b"\xff\xfe", MODEL.encode(), b"plain text file", PNG])
PLAIN = b'form-data; name="%(name)s"%(file)s'
PART_BYTES = st.tuples(NAMES, FILENAMES, DISPOSITIONS, EXTRA_HEADERS, VALUES | st.binary(max_size=40))
GOOD_PART_BYTES = st.tuples(
    st.sampled_from([b"files", b"file", b"files[]"]),
    st.sampled_from(GOOD_FILENAMES),
    st.just(PLAIN),
    st.just([]),
    st.sampled_from([b"plain text file", PNG, "caf\u00e9".encode()]),
) | st.sampled_from(
    [
        (b"system", None, PLAIN, [], b"be brief"),
        (b"session_id", None, PLAIN, [], b"fuzz-form"),
        (b"stream", None, PLAIN, [], b"true"),
        (b"stream", None, PLAIN, [], b"false"),
        (b"model", None, PLAIN, [], MODEL.encode()),
    ]
)
BOUNDARIES = st.sampled_from(["XX", "nanobot-fuzz", "a" * 70, "b" * 71, "-", "with space"])


def _part(boundary: bytes, part: tuple[bytes, bytes | None, bytes, list[bytes], bytes]) -> bytes:
    name, filename, template, extra, value = part
    file = b"" if filename is None else b'; filename="' + filename + b'"'
    disposition = template % {b"name": name, b"file": file}
    head = [b"Content-Disposition: " + disposition, *extra]
    return b"--" + boundary + b"\r\n" + b"\r\n".join(head) + b"\r\n\r\n" + value + b"\r\n"


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """A valid multipart form (Latin-1 and UTF-8 file names, every alias), or one made of odd
    parts and then mutated: byte flips, cuts, inserted garbage, wrong or missing boundaries,
    garbage part headers, non-UTF-8 names. Returns the body, its Content-Type, and whether it
    is a valid form that must succeed."""
    valid = draw(st.booleans())
    boundary = draw(st.sampled_from(["XX", "nanobot-fuzz", "a" * 70]) if valid else BOUNDARIES)
    parts = draw(st.lists(GOOD_PART_BYTES if valid else GOOD_PART_BYTES | PART_BYTES, max_size=4))
    if valid or draw(st.booleans()):  # the forms worth fuzzing most start from a valid message
        parts.insert(0, (b"message", None, PLAIN, [], b"hello"))
    b = boundary.encode()
    body = b"".join(_part(b, p) for p in parts) + b"--" + b + b"--\r\n"
    if valid:
        return body, f"multipart/form-data; boundary={boundary}", True
    for _ in range(draw(st.sampled_from([0, 1, 2, 3]))):
        where = draw(st.integers(0, len(body)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if kind == "flip" and where < len(body):
            body = body[:where] + bytes([draw(st.integers(0, 255))]) + body[where + 1 :]
        elif kind == "cut":
            body = body[:where]
        elif kind == "insert":
            body = body[:where] + draw(st.binary(min_size=1, max_size=16)) + body[where:]
        else:
            body = body[:where] + body[where + draw(st.integers(1, 8)) :]
    header_boundary = draw(st.sampled_from([boundary, boundary, f'"{boundary}"', "other", "", "x" * 80, "é"]))
    ctype = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={header_boundary}",
                f"multipart/form-data; boundary={header_boundary}",
                "multipart/form-data",
                f"multipart/form-data; boundary={header_boundary}; charset=latin-1",
                f"multipart/form-data;boundary={header_boundary};boundary=second",
            ]
        )
    )
    return body, ctype, False


@FUZZ
@given(form=multipart_bodies())
async def test_random_multipart_bodies_get_clean_answers(
    gateway: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    form: tuple[bytes, str, bool],
) -> None:
    """No multipart body, however malformed, gets a 5xx, a malformed answer, or a traceback;
    a valid form gets its answer."""
    caplog.clear()
    body, ctype, valid = form
    status = await exchange(http, gateway, body, ctype)
    assert status == 200 or not valid
    event(f"HTTP {status}")  # --hypothesis-show-statistics: how often each answer came
    no_tracebacks(caplog)


# -- anything else --------------------------------------------------------------------------------

CTYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "application/json",
        "application/vnd.api+json",
        "text/plain",
        "application/xml",
        "multipart/mixed; boundary=x",
        "",
        None,
    ]
)
URLENCODED = st.lists(
    st.tuples(
        st.sampled_from([b"message", b"session_id", b"stream", b"model", b"system", b"files", b"%ff", b""]),
        st.sampled_from(
            [b"hi", b"", b"+", b"%e9t%C3%A9", b"%ff%fe", b"%", b"true", b"maybe", MODEL.encode()]
        ),
    ),
    max_size=4,
).map(lambda pairs: b"&".join(k + b"=" + v for k, v in pairs))


@FUZZ
@given(raw=st.binary(max_size=200) | URLENCODED, ctype=CTYPES)
async def test_random_bytes_under_any_content_type_get_clean_answers(
    gateway: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, raw: bytes, ctype: str | None
) -> None:
    """Raw bytes and urlencoded forms under any Content-Type get a clean answer, never a 5xx."""
    caplog.clear()
    status = await exchange(http, gateway, raw, ctype)
    event(f"HTTP {status}")  # --hypothesis-show-statistics: how often each answer came
    no_tracebacks(caplog)


def test_fuzzed_multipart_examples_include_valid_forms() -> None:
    """A sanity check of the generator: the unmutated valid form parses as what it says."""
    body = _part(b"XX", (b"message", None, PLAIN, [], b"hi")) + b"--XX--\r\n"
    assert body == b'--XX\r\nContent-Disposition: form-data; name="message"\r\n\r\nhi\r\n--XX--\r\n'
