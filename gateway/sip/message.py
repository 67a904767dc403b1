"""SIP message model, parser and serializer (RFC 3261 section 7 and 25).

The parser is deliberately two-faced: liberal in what RFC 3261 allows to vary
(header case, compact names, line folding, whitespace around separators, bare
LF line ends from sloppy stacks) and strict about anything that would make us
mis-route a response or mis-match a transaction (Request-Line syntax, Via,
CSeq, Content-Length).  Every rejection carries a short reason phrase that the
user agent sends back verbatim as the reason of its 400, so the peer's
operator can see *what* was wrong, and a ``partial`` request holding the
headers that could be read, so that 400 can be addressed at all.

Header values are decoded as UTF-8 with ``surrogateescape``: valid UTF-8
(display names in RFC 4475 "wsinv") reads naturally, and arbitrary bytes
survive a parse/serialize round trip unchanged when echoed back in a response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "Headers",
    "NameAddress",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "SipUri",
    "Via",
    "canonical_name",
    "extract_sdp",
    "parse_cseq",
    "parse_message",
    "serialize",
    "split_list",
]

ENCODING = "utf-8"
ERRORS = "surrogateescape"

# RFC 3261 section 7.3.3 plus the compact forms registered since.
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id",
    "f": "from",
    "t": "to",
    "v": "via",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

# Headers whose grammar is a comma-separated list, so that several values may
# share one header line (RFC 3261 section 7.3.1).  Authorization-style headers
# are not here: their commas separate parameters, not values.
LIST_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "content-encoding",
        "content-language",
        "allow-events",
        "in-reply-to",
        "path",
        "service-route",
        "warning",
        "alert-info",
        "call-info",
        "error-info",
        "p-asserted-identity",
        "p-preferred-identity",
        "reason",
    }
)

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE_RE = re.compile(rf"({_TOKEN}) (\S+) (\S+)")
_STATUS_LINE_RE = re.compile(r"SIP/(\d+)\.(\d+) (\d+)(?: (.*))?", re.IGNORECASE | re.DOTALL)
_VERSION_RE = re.compile(r"SIP/(\d+)\.(\d+)", re.IGNORECASE)
_URI_START_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_HEADER_NAME_RE = re.compile(rf"{_TOKEN}")
_DIGITS_RE = re.compile(r"[0-9]+")
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)")

MAX_CSEQ = 2**31 - 1
MAX_CONTENT_LENGTH = 1 << 24
# Bounds on the header section, checked before anything else is parsed: every lookup
# walks the header list, so thousands of headers would make one datagram cost
# milliseconds of loop time. Real trunks send a few dozen lines, none near 8 KB.
MAX_HEADER_LINES = 200
MAX_HEADER_LINE = 8192


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name: ``"i"`` and ``"CALL-ID"`` -> ``"call-id"``."""
    lowered = name.strip().lower()
    return COMPACT_FORMS.get(lowered, lowered)


def split_list(value: str) -> list[str]:
    """Split a list-header value on top-level commas.

    Commas inside quoted strings (display names such as ``"Bell, Alexander"``)
    and inside ``<...>`` (URIs may carry commas in their user part) do not
    split.  Empty elements (``a,,b``) are kept as empty strings so that callers
    validating a header can notice them.
    """
    parts: list[str] = []
    buf: list[str] = []
    in_quotes = False
    in_angle = False
    escaped = False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if in_quotes:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
            buf.append(ch)
            continue
        if ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf).strip())
    if len(parts) == 1 and parts[0] == "":
        return []
    return parts


class Headers:
    """Ordered, case-insensitive multi-map of SIP header fields.

    Names are kept as written (so a response echoes ``v:`` as ``v:``) but
    looked up by their canonical long form, so ``get("Via")`` also finds
    compact ``v`` lines.  ``get`` returns the first *value*: for list headers
    that is the first comma-separated element, which is what "the top Via"
    means in RFC 3261.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(n, v) for n, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """All values of ``name`` in order; list headers are split on commas."""
        key = canonical_name(name)
        out: list[str] = []
        for n, v in self._items:
            if canonical_name(n) != key:
                continue
            if key in LIST_HEADERS:
                out.extend(split_list(v))
            else:
                out.append(v)
        return out

    def raw(self, name: str) -> list[str]:
        """Header field values exactly as they appeared, one per header line."""
        key = canonical_name(name)
        return [v for n, v in self._items if canonical_name(n) == key]

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` field by one, kept at the first one's position."""
        key = canonical_name(name)
        out: list[tuple[str, str]] = []
        placed = False
        for n, v in self._items:
            if canonical_name(n) == key:
                if not placed:
                    out.append((name, value))
                    placed = True
            else:
                out.append((n, v))
        if not placed:
            out.append((name, value))
        self._items = out

    def remove(self, name: str) -> None:
        key = canonical_name(name)
        self._items = [(n, v) for n, v in self._items if canonical_name(n) != key]

    def copy(self) -> Headers:
        return Headers(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical_name(name)
        return any(canonical_name(n) == key for n, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class SipRequest:
    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""


@dataclass
class SipResponse:
    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""


class SipParseError(ValueError):
    """A message that cannot be processed.

    ``reason`` is a short phrase for the response's reason phrase; ``status``
    is the response code to use (400, or 505 for an unsupported SIP version);
    ``partial`` holds the request as far as it could be read (``None`` for
    responses or when even the Request-Line was unreadable).
    """

    def __init__(self, reason: str, partial: SipRequest | None = None, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial
        self.status = status


# --------------------------------------------------------------------------
# Small parsed types


def _split_semicolons(text: str) -> list[str]:
    """Split on top-level ``;`` (quoted strings and ``<...>`` protected)."""
    parts: list[str] = []
    buf: list[str] = []
    in_quotes = in_angle = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif in_quotes:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == ";" and not in_angle:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return parts


def _parse_params(chunks: list[str], what: str) -> dict[str, str | None]:
    """``name[=value]`` chunks -> ordered dict with lower-cased names.

    Whitespace around ``=`` is LWS and allowed (RFC 4475 "wsinv"); an empty
    chunk (``;;``) or a non-token name is an error.
    """
    params: dict[str, str | None] = {}
    for chunk in chunks:
        name, sep, value = chunk.partition("=")
        name = name.strip()
        if not _TOKEN_RE.fullmatch(name):
            raise ValueError(f"Malformed {what} parameter")
        if sep:
            value = value.strip()
            if not value:
                raise ValueError(f"Malformed {what} parameter")
            if value.startswith('"') and (len(value) < 2 or not value.endswith('"')):
                raise ValueError(f"Malformed {what} parameter")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _split_host_port(text: str, what: str) -> tuple[str, int | None]:
    text = text.strip()
    m = _HOST_RE.match(text)
    if not m:
        raise ValueError(f"Malformed {what} host")
    host = m.group(1)
    rest = text[m.end() :].strip()
    port: int | None = None
    if rest:
        if not rest.startswith(":"):
            raise ValueError(f"Malformed {what} host")
        digits = rest[1:].strip()
        if not _DIGITS_RE.fullmatch(digits) or len(digits) > 5 or not 0 < int(digits) <= 65535:
            raise ValueError(f"Invalid {what} port")
        port = int(digits)
    if host.startswith("["):
        host = host[1:-1]
    return host, port


def format_host(host: str) -> str:
    """Bracket IPv6 literals for use in URIs, Via and host:port."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class SipUri:
    """A ``sip:``/``sips:`` URI.  ``user`` stays %-escaped, as received."""

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str | None = None
    scheme: str = "sip"

    @classmethod
    def parse(cls, text: str) -> SipUri:
        text = text.strip()
        scheme, colon, rest = text.partition(":")
        scheme = scheme.lower()
        if not colon or scheme not in ("sip", "sips"):
            raise ValueError("Unsupported URI scheme")
        if any(c in rest for c in " \t<>\"\r\n"):
            raise ValueError("Malformed URI")
        headers: str | None = None
        user = password = None
        at = rest.find("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            if not userinfo:
                raise ValueError("Malformed URI")
            user, sep, pw = userinfo.partition(":")
            password = pw if sep else None
        rest, qmark, hdrs = rest.partition("?")
        if qmark:
            headers = hdrs
        hostport, *param_chunks = rest.split(";")
        host, port = _split_host_port(hostport, "URI")
        if not host:
            raise ValueError("Malformed URI")
        params = _parse_params(param_chunks, "URI")
        return cls(host=host, user=user, password=password, port=port, params=params, headers=headers, scheme=scheme)

    def __str__(self) -> str:
        out = f"{self.scheme}:"
        if self.user is not None:
            out += self.user
            if self.password is not None:
                out += f":{self.password}"
            out += "@"
        out += format_host(self.host)
        if self.port is not None:
            out += f":{self.port}"
        out += _format_params(self.params)
        if self.headers is not None:
            out += f"?{self.headers}"
        return out


@dataclass
class Via:
    """One Via value: ``SIP/2.0/UDP host:port;branch=...;rport``."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        m = re.match(r"\s*SIP\s*/\s*2\.0\s*/\s*(" + _TOKEN + r")\s+(.*)$", text, re.IGNORECASE | re.DOTALL)
        if not m:
            raise ValueError("Malformed Via")
        transport = m.group(1).upper()
        sent_by, *chunks = _split_semicolons(m.group(2))
        try:
            host, port = _split_host_port(sent_by, "Via")
            params = _parse_params(chunks, "Via")
        except ValueError:
            raise ValueError("Malformed Via") from None
        if "branch" in params and not params["branch"]:
            raise ValueError("Malformed Via")
        return cls(transport=transport, host=host, port=port, params=params)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def rport(self) -> bool:
        return "rport" in self.params

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    def sent_by(self) -> tuple[str, int]:
        """Host (lower-cased) and port, defaulted as RFC 3261 17.2.3 compares them."""
        return self.host.lower(), self.port or 5060

    def __str__(self) -> str:
        out = f"SIP/2.0/{self.transport} {format_host(self.host)}"
        if self.port is not None:
            out += f":{self.port}"
        return out + _format_params(self.params)


def _read_quoted(text: str, start: int) -> int:
    """Index just past the quoted string starting at ``text[start] == '"'``."""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    raise ValueError("Unterminated quoted string")


@dataclass
class NameAddress:
    """``"Display" <uri>;params`` as in From, To, Contact, Route.

    ``uri`` is kept as text: From/To may legitimately carry ``tel:`` or other
    schemes we never need to dissect.
    """

    uri: str
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, what: str = "address") -> NameAddress:
        text = text.strip()
        display: str | None = None
        try:
            if text.startswith('"'):
                end = _read_quoted(text, 0)
                display = text[1 : end - 1]
                rest = text[end:].lstrip()
                if not rest.startswith("<"):
                    raise ValueError
            else:
                lt = text.find("<")
                semi = text.find(";")
                if lt >= 0 and (semi < 0 or lt < semi):
                    words = text[:lt].split()
                    if not all(_TOKEN_RE.fullmatch(w) for w in words):
                        raise ValueError
                    display = " ".join(words) or None
                    rest = text[lt:]
                else:
                    rest = None
            if rest is not None:
                gt = rest.find(">")
                if gt < 0:
                    raise ValueError
                uri = rest[1:gt]
                after = rest[gt + 1 :]
            else:
                uri, sep, after = text.partition(";")
                uri = uri.rstrip()  # SEMI = SWS ";" SWS
                after = sep + after
            if not uri or uri != uri.strip() or not _URI_START_RE.match(uri) or any(c in uri for c in " \t<>"):
                raise ValueError
            after = after.strip()
            if after and not after.startswith(";"):
                raise ValueError
            chunks = _split_semicolons(after)[1:] if after else []
            params = _parse_params(chunks, what)
        except ValueError as exc:
            if str(exc) == "Unterminated quoted string":
                raise ValueError(f"Unterminated quoted string in {what}") from None
            raise ValueError(f"Malformed {what}") from None
        return cls(uri=uri, display_name=display, params=params)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        out = f"<{self.uri}>"
        if self.display_name:
            name = self.display_name
            if not all(_TOKEN_RE.fullmatch(w) for w in name.split()):
                name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out = f"{name} {out}"
        return out + _format_params(self.params)


def parse_cseq(value: str) -> tuple[int, str]:
    """``"314159 INVITE"`` -> ``(314159, "INVITE")``; raises ValueError."""
    parts = value.split()
    if len(parts) != 2 or not _DIGITS_RE.fullmatch(parts[0]) or not _TOKEN_RE.fullmatch(parts[1]):
        raise ValueError("Malformed CSeq")
    if len(parts[0]) > 10 or int(parts[0]) > MAX_CSEQ:
        raise ValueError("CSeq number out of range")
    return int(parts[0]), parts[1]


# --------------------------------------------------------------------------
# Parsing


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Header section and body; tolerant of bare-LF line ends."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return data[:crlf], data[crlf + 4 :]
    if lf >= 0:
        return data[:lf].rstrip(b"\r"), data[lf + 2 :]
    # No blank line: a UDP message may simply end after its headers.
    return data.rstrip(b"\r\n"), b""


def _unfold(head: str) -> list[str]:
    """Header lines with continuation lines (leading SP/HT) joined by one space."""
    lines: list[str] = []
    for line in re.split(r"\r?\n", head):
        if line[:1] in (" ", "\t") and lines:
            lines[-1] = lines[-1].rstrip() + " " + line.strip()
        else:
            lines.append(line)
    return lines


def _parse_header_lines(lines: list[str], headers: Headers) -> str | None:
    """Fill ``headers``; return a reason phrase at the first bad line."""
    for line in lines:
        if not line.strip():
            return "Bad Request - Malformed header line"
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _HEADER_NAME_RE.fullmatch(name):
            return "Bad Request - Malformed header line"
        if "\r" in value:  # a bare CR: echoed in our responses, a line break to CR-splitting peers
            return "Bad Request - Bare CR in header"
        headers.add(name, value.strip(" \t"))
    return None


def _content_length(headers: Headers) -> tuple[int | None, str | None]:
    values = [v.strip() for v in headers.raw("content-length")]
    if not values:
        return None, None
    if len(set(values)) > 1:
        return None, "Bad Request - Multiple Content-Length"
    value = values[0]
    if not _DIGITS_RE.fullmatch(value) or len(value) > 9 or int(value) > MAX_CONTENT_LENGTH:
        return None, "Bad Request - Invalid Content-Length"
    return int(value), None


def _validate_request(req: SipRequest) -> str | None:
    h = req.headers
    vias = h.get_all("via")
    if not vias:
        return "Bad Request - Missing Via"
    try:
        for v in vias:
            Via.parse(v)
    except ValueError:
        return "Bad Request - Malformed Via"
    call_ids = h.raw("call-id")
    if not call_ids or not call_ids[0]:
        return "Bad Request - Missing Call-ID"
    if len(call_ids) > 1 or any(c.isspace() for c in call_ids[0]):
        return "Bad Request - Malformed Call-ID"
    for name in ("From", "To"):
        raw = h.raw(name)
        if not raw:
            return f"Bad Request - Missing {name}"
        if len(raw) > 1:
            return f"Bad Request - Multiple {name}"
        try:
            NameAddress.parse(raw[0], name)
        except ValueError as exc:
            return f"Bad Request - {exc}"
    cseqs = h.raw("cseq")
    if not cseqs:
        return "Bad Request - Missing CSeq"
    if len(cseqs) > 1:
        return "Bad Request - Multiple CSeq"
    try:
        _, method = parse_cseq(cseqs[0])
    except ValueError as exc:
        return f"Bad Request - {exc}"
    if method != req.method:
        return "Bad Request - CSeq method mismatch"
    mf = h.raw("max-forwards")
    if mf:
        value = mf[0].strip()
        if len(mf) > 1 or not _DIGITS_RE.fullmatch(value) or int(value) > 255:
            return "Bad Request - Invalid Max-Forwards"
    return None


def _validate_response(resp: SipResponse) -> str | None:
    h = resp.headers
    try:
        vias = h.get_all("via")
        if not vias:
            return "Missing Via"
        Via.parse(vias[0])
        for name in ("from", "to"):
            NameAddress.parse(h.get(name) or "", name)
        if not h.get("call-id"):
            return "Missing Call-ID"
        parse_cseq(h.get("cseq") or "")
    except ValueError as exc:
        return str(exc)
    return None


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """Parse one whole SIP message (a UDP datagram or a framed TCP message).

    Raises :class:`SipParseError`.  Bytes past Content-Length are ignored
    (RFC 3261 18.3); a body shorter than Content-Length is an error.
    Without Content-Length the body is the rest of the datagram.
    """
    data = data.lstrip(b"\r\n")
    if not data:
        raise SipParseError("Bad Request - Empty message")
    head_bytes, rest = _split_head(data)
    _check_head_size(head_bytes)
    head = head_bytes.decode(ENCODING, ERRORS)
    lines = _unfold(head)
    start = lines[0]
    header_lines = lines[1:]

    if start[:4].upper() == "SIP/":
        m = _STATUS_LINE_RE.fullmatch(start)
        if not m or len(m.group(3)) != 3 or not 100 <= int(m.group(3)) <= 699:
            raise SipParseError("Malformed Status-Line")
        if (m.group(1), m.group(2)) != ("2", "0"):
            raise SipParseError("Version Not Supported", status=505)
        resp = SipResponse(int(m.group(3)), (m.group(4) or "").strip())
        problem = _parse_header_lines(header_lines, resp.headers)
        if problem:
            raise SipParseError(problem)
        length, problem = _content_length(resp.headers)
        if problem:
            raise SipParseError(problem)
        if length is not None:
            if len(rest) < length:
                raise SipParseError("Bad Request - Content-Length mismatch")
            rest = rest[:length]
        resp.body = rest
        problem = _validate_response(resp)
        if problem:
            raise SipParseError(problem)
        return resp

    m = _REQUEST_LINE_RE.fullmatch(start)
    if not m:
        # Still read the headers so the 400 can be addressed.
        partial = SipRequest(start.split(" ", 1)[0][:32] or "UNKNOWN", "")
        _parse_header_lines(header_lines, partial.headers)
        raise SipParseError("Bad Request - Malformed Request-Line", partial)
    method, uri, version = m.groups()
    req = SipRequest(method, uri)
    problem = _parse_header_lines(header_lines, req.headers)
    if problem:
        raise SipParseError(problem, req)
    if not _URI_START_RE.match(uri) or any(c in uri for c in "<>\""):
        raise SipParseError("Bad Request - Malformed Request-URI", req)
    vm = _VERSION_RE.fullmatch(version)
    if not vm:
        raise SipParseError("Bad Request - Malformed Request-Line", req)
    if (vm.group(1), vm.group(2)) != ("2", "0"):
        raise SipParseError("Version Not Supported", req, status=505)
    length, problem = _content_length(req.headers)
    if problem:
        raise SipParseError(problem, req)
    if length is not None:
        if len(rest) < length:
            raise SipParseError("Bad Request - Content-Length mismatch", req)
        rest = rest[:length]
    req.body = rest
    problem = _validate_request(req)
    if problem:
        raise SipParseError(problem, req)
    return req


def _check_head_size(head: bytes) -> None:
    """Refuse an oversized header section cheaply (counting bytes in C, no decoding);
    the first lines still make a ``partial`` so the 400 can be addressed."""
    lines = head.count(b"\n") + 1
    problem = None
    if lines > MAX_HEADER_LINES + 1:  # + the start line
        problem = "Bad Request - Too Many Headers"
    elif len(head) > MAX_HEADER_LINE and any(len(line) > MAX_HEADER_LINE for line in head.split(b"\n")):
        problem = "Bad Request - Header Line Too Long"
    if problem is None:
        return
    kept = [line[:MAX_HEADER_LINE] for line in head.split(b"\n", MAX_HEADER_LINES + 1)[: MAX_HEADER_LINES + 1]]
    partial: SipRequest | None = None
    text = b"\n".join(kept).decode(ENCODING, ERRORS)
    lines_ = _unfold(text)
    m = _REQUEST_LINE_RE.fullmatch(lines_[0].rstrip("\r"))
    if m:
        partial = SipRequest(m.group(1), m.group(2))
        _parse_header_lines([line.rstrip("\r") for line in lines_[1:]], partial.headers)
    raise SipParseError(problem, partial)


def serialize(msg: SipRequest | SipResponse) -> bytes:
    """Wire form of ``msg``; Content-Length is set from the body."""
    if isinstance(msg, SipRequest):
        start = f"{msg.method} {msg.uri} SIP/2.0"
    else:
        start = f"SIP/2.0 {msg.status} {msg.reason}"
    headers = msg.headers.copy()
    headers.set(_existing_name(headers, "Content-Length"), str(len(msg.body)))
    lines = [start]
    for name, value in headers:
        lines.append(f"{name}: {value}" if value else f"{name}:")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode(ENCODING, ERRORS) + msg.body


def _existing_name(headers: Headers, name: str) -> str:
    key = canonical_name(name)
    for n, _ in headers:
        if canonical_name(n) == key:
            return n
    return name


# --------------------------------------------------------------------------
# Bodies


def media_type(content_type: str | None) -> str:
    """``"Application/SDP; charset=x"`` -> ``"application/sdp"``."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def extract_sdp(content_type: str | None, body: bytes) -> bytes | None:
    """The SDP in a body: the body itself, or the ``application/sdp`` part
    of a multipart body (SIP-I/SIP-T trunks wrap SDP with ISUP that way).
    ``None`` when there is no SDP to be had."""
    mtype = media_type(content_type)
    if mtype == "application/sdp":
        return body
    if not mtype.startswith("multipart/") or content_type is None:
        return None
    boundary = None
    for chunk in _split_semicolons(content_type)[1:]:
        name, _, value = chunk.partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode(ENCODING, ERRORS)
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        part = part[2:] if part.startswith(b"\r\n") else part.lstrip(b"\n")
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = part.partition(b"\n\n")
        if not sep:
            continue
        part_type = "text/plain"
        for line in re.split(rb"\r?\n", head):
            field_name, _, field_value = line.partition(b":")
            if field_name.strip().lower() in (b"content-type", b"c"):
                part_type = field_value.decode(ENCODING, ERRORS)
        if media_type(part_type) == "application/sdp":
            if content.endswith(b"\r\n"):
                content = content[:-2]
            elif content.endswith(b"\n"):
                content = content[:-1]
            return content
    return None
