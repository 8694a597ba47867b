"""A request's head: its request line and header fields, read as http.server reads them,
with less code and more strictly.

Why not http.server's own: it hands the fields to the `email` package's parser, about
13 µs a request warm and 160 µs when terraform has just run and left the CPU's caches
cold (the case of every apply), for a few lines of `name: value`. This reader takes a few
µs either way. It also refuses what RFC 9112 (5.1, 5.2) says a server must not take as a
field, where the email parser let it through: a line without a colon or with a space
before it (`Content-Length : 5`, a way to smuggle a length past a proxy), a folded line
(obs-fold), and control characters in a value. Everything else is as before: the same
limits (65,536 bytes a line, fewer than 100 fields), the same statuses, and the fields
in an `http.client.HTTPMessage` (case-insensitive `get`, `get_all`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from http.client import HTTPMessage
from typing import Protocol

#: The longest header line, and how many lines a head may have (with its blank line):
#: http.client's limits, which http.server applied.
MAX_LINE = 65536
MAX_LINES = 100
#: The most bytes of header lines a head may have in all. Without it, 99 lines of 64 KiB
#: each (6.5 MB) were read and held for every connection that sent them.
MAX_FIELD_BYTES = 256 * 1024

#: A token (RFC 9110, 5.6.2): a field name (5.1), a method (9.1).
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_NAME = re.compile(_TCHARS.encode())
#: What a field value may not hold: control characters but horizontal tab.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: What separates a request line's words: SP, or the whitespace RFC 9112 (3) lets a
#: server take for SP (HTAB, VT, FF, a bare CR). `str.split()` took `\x1c`-`\x1f`, `\x85`
#: and `\xa0` for separators too, where a proxy in front sees one word.
_SEPARATORS = re.compile(r"[ \t\x0b\x0c\r]+")
#: What a request line may not hold: the other control characters.
_LINE_CONTROL = re.compile(r"[\x00-\x08\x0a\x0e-\x1f\x7f]")
_METHOD = re.compile(_TCHARS)


class Lines(Protocol):
    """What the fields are read from: a buffered reader of the connection."""

    def readline(self, size: int = -1, /) -> bytes:
        """A line of at most `size` bytes."""
        ...


class BadHead(Exception):
    """A head that cannot be served: the status to answer, and what to log."""

    def __init__(self, status: HTTPStatus, message: str, explain: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.explain = explain


@dataclass(frozen=True)
class RequestLine:
    """A request line's parts; `keep_alive` when its version keeps the connection."""

    command: str
    path: str
    version: str
    keep_alive: bool


def request_line(text: str) -> RequestLine | None:
    """The parts of a request line (without its line end), None for an empty one; raises
    BadHead as http.server answered it, but that a version below 1.0 (HTTP/0.9, or no
    version at all) is refused with 505 (it would get an answer without a status line or
    headers), and that no message repeats the line: a client whose lines end in a bare
    CR sends its whole head as one line, its token among the words. Stricter than
    http.server: words are split on RFC 9112's whitespace only, the line may hold no
    other control character, and the method is a token (400 each)."""
    words = _SEPARATORS.split(text.strip(" \t\x0b\x0c\r"))
    if words == [""]:
        return None
    if _LINE_CONTROL.search(text):
        raise BadHead(HTTPStatus.BAD_REQUEST, "Bad request line (a control character)")
    keep_alive = False
    version = "HTTP/0.9"
    if len(words) >= 3:
        version = words[-1]
        number = _version(version)
        if not (1, 0) <= number < (2, 0):
            raise BadHead(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                          f"Invalid HTTP version ({number[0]}.{number[1]})")
        keep_alive = number >= (1, 1)
    if not 2 <= len(words) <= 3:
        raise BadHead(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({len(words)} words)")
    command, path = words[:2]
    if _METHOD.fullmatch(command) is None:
        raise BadHead(HTTPStatus.BAD_REQUEST, "Bad request method (not a token)")
    if len(words) == 2:
        if command != "GET":
            raise BadHead(HTTPStatus.BAD_REQUEST, "Bad HTTP/0.9 request type")
        raise BadHead(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/0.9 is not supported")
    # As http.server does (gh-87389): a path starting with // could be taken for a host.
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return RequestLine(command, path, version, keep_alive)


def _version(version: str) -> tuple[int, int]:
    """`HTTP/major.minor` as numbers (RFC 2145: each an integer, leading zeros ignored)."""
    parts = version[5:].split(".") if version.startswith("HTTP/") else []
    if len(parts) != 2 or not all(p.isdigit() and p.isascii() and len(p) <= 10
                                  for p in parts):
        raise BadHead(HTTPStatus.BAD_REQUEST, "Bad request version")
    return int(parts[0]), int(parts[1])


def read_fields(rfile: Lines) -> HTTPMessage:
    """The header fields up to the blank line (or the end of the stream); raises BadHead
    for a line too long, too many lines or too many bytes in all (431), or a line that is
    no field (400)."""
    fields = HTTPMessage()
    left = MAX_FIELD_BYTES
    for _ in range(MAX_LINES):
        line = rfile.readline(min(MAX_LINE, left) + 1)
        if len(line) > MAX_LINE:
            raise BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long",
                          "header line")
        left -= len(line)
        if left < 0:
            raise BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many header bytes",
                          f"more than {MAX_FIELD_BYTES} bytes of header fields")
        if line in (b"\r\n", b"\n", b""):
            return fields
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t\r\n")
        if not colon or _NAME.fullmatch(name) is None or _CONTROL.search(value):
            # The line is not echoed: it may carry a credential.
            raise BadHead(HTTPStatus.BAD_REQUEST, "Bad header field")
        fields[name.decode("ascii")] = value.decode("iso-8859-1")
    raise BadHead(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers",
                  f"got more than {MAX_LINES} headers")
