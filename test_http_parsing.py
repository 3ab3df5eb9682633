"""The fast request-head reader of ``server.py`` against ``http.server``'s own parse_request.

``Handler._read_head`` replaces http.server's parsing for speed (STYLE.md:
a faster path ships with a differential property test). Hypothesis writes
request heads, odd bytes and all, and both readers read the same bytes in
memory. The property: for every head both accept, the same method, target,
version and header values; for every head ours refuses and http.server
takes, a rule of RFC 9110 or RFC 9112 that makes the refusal right, named
below; for every head that breaks one of those rules, a refusal (400); and
ours accepts where http.server refuses only as RFC 9112 section 2.2 asks.

Each generated part carries the names of the rules it breaks, so the test
knows the answer before either reader sees the bytes.
"""

from __future__ import annotations

import io
import re
import types
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import server

# The rules the fast reader enforces and http.server does not.
REQUEST_LINE = (
    "RFC 9112 section 3: request-line = method SP request-target SP HTTP-version, one SP each "
    "(a recipient MAY split on other whitespace, and need not); an invalid request-line SHOULD get 400"
)
METHOD = "RFC 9110 section 9.1: a method is a token (RFC 9112 section 3: an invalid request-line gets 400)"
TARGET = (
    "RFC 9112 section 3.2: a request-target is a URI reference, visible ASCII only (RFC 3986 section 2); "
    "an invalid request-line gets 400"
)
VERSION = (
    "RFC 9112 section 2.3: HTTP-version = 'HTTP/' DIGIT '.' DIGIT; a request line without one (HTTP/0.9) "
    "is not HTTP/1.1 (section 3: 400)"
)
SPACE_BEFORE_COLON = (
    "RFC 9112 section 5.1: no whitespace between field name and colon; a server MUST reject it with 400"
)
OBS_FOLD = "RFC 9112 section 5.2: a folded field line (obs-fold) MUST be rejected with 400 or replaced by SP"
FIRST_LINE_SPACE = (
    "RFC 9112 section 2.2: whitespace between the start-line and the first field line: the message MUST be "
    "rejected, or the line ignored"
)
FIELD_NAME = "RFC 9110 section 5.1: a field name is a token (RFC 9112 section 2.2: off the grammar, 400)"
CR_LF_NUL = "RFC 9110 section 5.5: a CR, LF or NUL in a field value MUST be rejected or replaced by SP"
CONTROL = (
    "RFC 9110 section 5.5: a field value is VCHAR, obs-text, SP and HTAB; another control character is off "
    "the grammar (RFC 9112 section 2.2: 400)"
)
REFUSED_BY_RULE = {
    REQUEST_LINE,
    METHOD,
    TARGET,
    VERSION,
    SPACE_BEFORE_COLON,
    OBS_FOLD,
    FIRST_LINE_SPACE,
    FIELD_NAME,
    CR_LF_NUL,
    CONTROL,
}
LINE_RULES = {REQUEST_LINE, METHOD, TARGET, VERSION}
FIELD_RULES = REFUSED_BY_RULE - LINE_RULES
# The one place where the server takes what http.server refuses (by_http_server skips that line).
EMPTY_LINE_FIRST = "RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before the request-line"

TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Latin-1 characters around the edges: controls, DEL, obs-text, and the ones
# Python's str.split and str.strip take for white space (\x0b, \x0c,
# \x1c-\x1f, \x85, \xa0).
ODD = "\t\x00\x01\x0b\x0c\r\x1c\x1f\x7f\x80\x85\xa0\xff"


@dataclass(frozen=True)
class Part:
    """Some bytes of a request head, and the rules they break."""

    text: str
    broken: frozenset[str] = frozenset()


def part(text: str, *broken: str) -> Part:
    return Part(text, frozenset(broken))


def value_rules(text: str) -> frozenset[str]:
    """The rules a field value breaks."""
    broken = set()
    if any(char in "\r\n\x00" for char in text):
        broken.add(CR_LF_NUL)
    if any((char < " " and char not in "\t\r\n\x00") or char == "\x7f" for char in text):
        broken.add(CONTROL)
    return frozenset(broken)


def rarely(usual: st.SearchStrategy[Part], odd: st.SearchStrategy[Part], one_in: int) -> st.SearchStrategy[Part]:
    """``odd`` one time in ``one_in``: most heads break no rule, so that both readers read them."""
    return st.integers(1, one_in).flatmap(lambda n: odd if n == 1 else usual)


def labelled(texts: list[str], *broken: str) -> st.SearchStrategy[Part]:
    return st.sampled_from(texts).map(lambda text: part(text, *broken))


methods = rarely(
    labelled(["GET", "POST", "HEAD", "DELETE", "OPTIONS", "BREW", "get", "M-SEARCH"]),
    labelled(["GE(T", "PO:ST", "GET\x01", "G\xe9T"], METHOD),
    15,
)
targets = rarely(
    labelled(["/", "/api/client-registry", "/api/users?x=1&y", "//evil.example/x", "*", "http://h/p", "/a%20b"]),
    labelled([f"/a{odd}b" for odd in ODD if odd not in "\t\x0b\x0c\r"], TARGET),
    10,
)
versions = rarely(
    labelled(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/3.0", "http/1.1", "HTTP/1"]),
    labelled(["HTTP/1.10", "HTTP/01.1", "HTTP/1.01"], VERSION),
    15,
)
separators = rarely(st.just(part(" ")), labelled(["  ", "\t", "\x0b", "\x0c", " \t"], REQUEST_LINE), 20)
line_ends = st.sampled_from(["\r\n", "\r\n", "\n"])


@st.composite
def request_lines(draw: st.DrawFn) -> Part:
    method, target, version = draw(methods), draw(targets), draw(versions)
    first, second = draw(separators), draw(separators)
    around = draw(rarely(st.just(part("")), labelled([" ", "\t"], REQUEST_LINE), 20))
    parts = [method, first, target]
    if draw(st.integers(1, 20)) == 1:  # no version: HTTP/0.9's "GET /"
        parts += [part("", VERSION)]
    else:
        parts += [second, version]
    parts = [around, *parts] if draw(st.booleans()) else [*parts, around]
    return Part("".join(p.text for p in parts) + draw(line_ends), frozenset().union(*(p.broken for p in parts)))


names = rarely(
    labelled(["Host", "Content-Length", "Content-Type", "X-Note", "Authorization", "Connection", "host"]),
    labelled(["X A", "X(A)", "", "X\x01", "X\xe9", "From x"], FIELD_NAME),
    20,
)
plain_values = st.text(st.sampled_from(TCHAR + ' ,;=/"()'), max_size=10)
values = rarely(
    plain_values.map(part),
    st.builds(lambda a, odd, b: a + odd + b, plain_values, st.sampled_from(ODD), plain_values).map(
        lambda text: Part(text, value_rules(text))
    ),
    5,
)
ows = st.sampled_from(["", " ", " ", "\t", " \t "])


@st.composite
def field_lines(draw: st.DrawFn) -> Part:
    name, value = draw(names), draw(values)
    before_colon = draw(rarely(st.just(part("")), labelled([" ", "\t"], SPACE_BEFORE_COLON), 20))
    line = f"{name.text}{before_colon.text}:{draw(ows)}{value.text}{draw(ows)}{draw(line_ends)}"
    broken = name.broken | value.broken | before_colon.broken
    fold = draw(rarely(st.just(part("")), labelled([" more", "\tmore", " ", " a b"], OBS_FOLD), 20))
    if fold.text:
        line += fold.text + draw(line_ends)
    return Part(line, broken | fold.broken)


@st.composite
def heads(draw: st.DrawFn) -> Part:
    """A request head: maybe an empty line first, a request line, field lines, the empty line."""
    parts = []
    if draw(st.integers(1, 10)) == 1:
        parts.append(part("\r\n"))
    parts.append(draw(request_lines()))
    if draw(st.integers(1, 30)) == 1:
        parts.append(part(" X-First: 1\r\n", FIRST_LINE_SPACE))
    parts += draw(st.lists(field_lines(), max_size=6))
    text = "".join(p.text for p in parts) + "\r\n"
    return Part(text, frozenset().union(*(p.broken for p in parts)))


# --- The two readers, on bytes ----------------------------------------------


@dataclass(frozen=True)
class Head:
    """What a reader made of a head."""

    method: str
    target: str
    version: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Refused:
    status: int | None  # None: http.server closed without an answer


class Reference(BaseHTTPRequestHandler):
    """http.server's parse_request on bytes, its refusals recorded instead of sent."""

    protocol_version = "HTTP/1.1"

    def __init__(self, data: bytes) -> None:  # no socket, no server: only what parse_request reads
        self.rfile, self.wfile = io.BytesIO(data), io.BytesIO()
        self.client_address = ("127.0.0.1", 0)
        self.refused: int | None = None

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.refused = code

    def log_message(self, format: str, *args: object) -> None:
        pass


def by_http_server(data: bytes) -> Head | Refused:
    """http.server's reading, but for one empty line first, which it closes on and RFC 9112 section 2.2 ignores."""
    if data.startswith((b"\r\n", b"\n")):  # EMPTY_LINE_FIRST
        data = data.partition(b"\n")[2]
    handler = Reference(data)
    handler.raw_requestline = handler.rfile.readline(server.MAX_LINE + 1)
    if not handler.parse_request():
        return Refused(handler.refused)
    headers: dict[str, str] = {}
    for name, value in handler.headers.items():
        # RFC 9112 section 5: OWS after a value is not part of it; http.server keeps it.
        name, value = name.lower(), value.rstrip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Head(handler.command, handler.path, handler.request_version, headers)


def by_server(data: bytes, *, fast_http: bool = True) -> Head | Refused:
    handler = server.Handler.__new__(server.Handler)  # no socket: only what parse_request reads
    handler.rfile, handler.wfile = io.BytesIO(data), io.BytesIO()
    handler.client_address = ("127.0.0.1", 0)
    handler.server = types.SimpleNamespace(config=server.Config(fast_http=fast_http))
    handler.raw_requestline = handler.rfile.readline(server.MAX_LINE + 1)
    try:
        handler.parse_request()
    except server.BadFraming as refusal:
        return Refused(refusal.status)
    return Head(handler.command, handler.path, handler.request_version, dict(handler.headers))


# --- The property ---------------------------------------------------------------


@given(heads())
@example(part("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"))
@example(part("GET\t/\tHTTP/1.1\r\n\r\n", REQUEST_LINE))
@example(part("GET /\r\n\r\n", VERSION))
@example(part("GET / HTTP/1.1\r\nContent-Length : 2\r\n\r\n", SPACE_BEFORE_COLON))
@example(part("GET / HTTP/1.1\r\nX-Note: one\r\n two\r\n\r\n", OBS_FOLD))
@example(part("GET / HTTP/1.1\r\nAuthorization: Bearer t\x0b\r\n\r\n", CONTROL))
@example(part("GET / HTTP/1.1\r\nAuthorization: Bearer t\xa0\r\n\r\n"))
@example(part("\r\nGET / HTTP/1.1\r\n\r\n"))
def test_the_fast_reader_reads_what_http_server_reads_and_refuses_only_by_rule(head: Part) -> None:
    """Proves HTTP-8.2-HEADERS."""
    data = head.text.encode("latin-1")
    ours, reference = by_server(data), by_http_server(data)
    refused_by_rule = head.broken & REFUSED_BY_RULE

    if refused_by_rule:
        # 400, or 505 for a request line of HTTP/2 or later, read before the rest.
        assert isinstance(ours, Refused), (sorted(refused_by_rule), ours)
        later = not refused_by_rule & LINE_RULES and re.search(rb" HTTP/[2-9]\.[0-9]\r?\n", data)
        assert ours.status == (HTTPStatus.HTTP_VERSION_NOT_SUPPORTED if later else HTTPStatus.BAD_REQUEST)
    elif isinstance(ours, Head) and isinstance(reference, Head):
        assert ours == reference
    elif isinstance(ours, Head):
        pytest.fail(f"ours takes what http.server refuses: {reference}")
    else:
        # Ours refuses with no rule broken: so does http.server, for the same
        # reason (a version of 2 or more, a lower-case "http", no minor).
        assert isinstance(reference, Refused), f"ours refuses what http.server reads as {reference}"
        assert ours.status == (reference.status or HTTPStatus.BAD_REQUEST)


@given(heads())
def test_with_fast_http_off_the_server_reads_heads_as_http_server_does(head: Part) -> None:
    """Proves HTTP-8.2-HEADERS."""
    data = head.text.encode("latin-1")
    ours, reference = by_server(data, fast_http=False), by_http_server(data)

    if isinstance(reference, Head) and isinstance(ours, Head):
        assert ours == reference
    elif isinstance(reference, Refused):
        assert isinstance(ours, Refused)
    else:
        # http.server's own reader, but the rules of field lines hold: a line
        # it could not read as a field (and would drop without a word), a
        # folded one, a control character in a value, is refused.
        assert head.broken & FIELD_RULES, (head, ours)


@pytest.mark.parametrize(
    ("limit", "status"),
    [
        (b"GET / HTTP/1.1\r\nX: " + b"a" * server.MAX_LINE + b"\r\n\r\n", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (server.MAX_HEADERS + 1) + b"\r\n", 431),
    ],
    ids=["a header line over the limit", "too many header lines"],
)
def test_both_readers_keep_http_servers_limits(limit: bytes, status: int) -> None:
    """Proves HTTP-8.1-STATUSES."""
    reference = by_http_server(limit)
    assert isinstance(reference, Refused)
    assert by_server(limit) == by_server(limit, fast_http=False) == Refused(status)
