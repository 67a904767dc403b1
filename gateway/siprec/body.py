"""A SIPREC request body split into its SDP and its recording metadata (RFC 7866 section 8).

The body of a SIPREC INVITE (and of a re-INVITE or UPDATE) is ``multipart/mixed``
(RFC 2046 5.1) holding an ``application/sdp`` part and an
``application/rs-metadata+xml`` part with ``Content-Disposition: recording-session``.
SRCs differ in the details, so this is lenient where leniency is harmless: the
parts may come in any order (BroadWorks puts the metadata first), the boundary may
be quoted or not, lines may end in CRLF or a bare LF, the metadata type may be
the pre-RFC ``application/rs-metadata``, the disposition may be missing, the
closing delimiter may be missing, and parts of other types (ISUP, ...) are
ignored.  A metadata-only update has no SDP: its body is the metadata alone or a
multipart without an SDP part, and ``sdp`` is then empty.

It is strict where input is ambiguous (two SDP parts, two metadata parts) or
costly: at most :data:`MAX_PARTS` parts and :data:`MAX_BODY` bytes, the SIP
message limit, so a hostile body costs one linear scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_BODY", "MAX_PARTS", "METADATA_TYPES", "RecordingBody", "SiprecError", "split_body"]

#: Bytes of body at most: a SIP message over UDP or our TCP framer's limit cannot carry more.
MAX_BODY = 65536
#: Parts of a multipart body at most (SDP + metadata, and a few an SBC adds beside them).
MAX_PARTS = 8
#: RFC 2046 says 70; SRCs stay far below.  Longer is refused rather than scanned for.
MAX_BOUNDARY = 200
#: Content types of RFC 7865 metadata: the registered one, and the name of the drafts (older SBCs).
METADATA_TYPES = frozenset({"application/rs-metadata+xml", "application/rs-metadata"})
SDP_TYPE = "application/sdp"

_PRINTABLE = re.compile(r"[^\x21-\x7e]+")


class SiprecError(ValueError):
    """A SIPREC body or its metadata cannot be used.

    ``reason`` is short printable ASCII naming what is wrong (and where, for
    XML), without a status text: the user agent answers
    ``400 Bad Request - <reason>`` (:attr:`phrase`).
    """

    def __init__(self, reason: str) -> None:
        reason = reason.encode("ascii", "replace").decode("ascii")
        reason = "".join(c if " " <= c <= "~" else "?" for c in reason)[:120]
        super().__init__(reason)
        self.reason = reason

    @property
    def phrase(self) -> str:
        """The whole SIP reason phrase: ``Bad Request - <reason>``."""
        return f"Bad Request - {self.reason}"


@dataclass(frozen=True)
class RecordingBody:
    """The parts of a SIPREC body that matter.

    ``sdp``: the SDP offer (``b""`` when the body has none: a metadata-only update
    or a delayed offer); ``metadata``: the RFC 7865 XML, untouched, or None;
    ``metadata_type``: its content type, lower case, or None.
    """

    sdp: bytes
    metadata: bytes | None
    metadata_type: str | None


def _shown(value: str) -> str:
    """A value quoted inside a reason: printable, short."""
    return _PRINTABLE.sub("?", value)[:40]


def _params(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/mixed; boundary="a;b"'`` -> ``("multipart/mixed", {"boundary": "a;b"})``.

    Quoted strings may hold ``;`` and backslash escapes (RFC 2045 5.1)."""
    mtype, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        name = rest[start:i].strip().lower()
        val = ""
        if i < n and rest[i] == "=":
            i += 1
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] == '"':
                i += 1
                chars = []
                while i < n and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(rest[i])
                    i += 1
                i += 1  # the closing quote (or the end)
                val = "".join(chars)
                while i < n and rest[i] != ";":
                    i += 1
            else:
                start = i
                while i < n and rest[i] != ";":
                    i += 1
                val = rest[start:i].strip()
        if name and name not in params:
            params[name] = val
    return mtype.strip().lower(), params


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


def split_body(content_type: str, body: bytes) -> RecordingBody:
    """The SDP and the metadata of a SIPREC request body.

    ``content_type``: the request's Content-Type header value ("" when absent).
    Raises :class:`SiprecError` for a body that cannot be split unambiguously.
    """
    if len(body) > MAX_BODY:
        raise SiprecError(f"body over {MAX_BODY} bytes")
    mtype, params = _params(content_type or "")
    if not mtype:
        if body.strip():
            raise SiprecError("body without Content-Type")
        return RecordingBody(b"", None, None)
    if mtype == SDP_TYPE:
        return RecordingBody(body, None, None)
    if mtype in METADATA_TYPES:
        return RecordingBody(b"", body, mtype)
    if not mtype.startswith("multipart/"):
        raise SiprecError(f"unsupported body type {_shown(mtype)}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise SiprecError("multipart without boundary")
    if len(boundary) > MAX_BOUNDARY:
        raise SiprecError("multipart boundary too long")
    return _split_multipart(boundary.encode("latin-1", "replace"), body)


def _split_multipart(boundary: bytes, body: bytes) -> RecordingBody:
    delimiter = b"--" + boundary
    # Each line, its end kept; a delimiter line is the delimiter (optionally "--"), then
    # only transport padding (RFC 2046: spaces and tabs), then the line end.
    lines = body.split(b"\n")
    parts: list[list[bytes]] = []
    current: list[bytes] | None = None
    closed = False
    for index, line in enumerate(lines):
        bare = line[:-1] if line.endswith(b"\r") else line
        if bare.startswith(delimiter):
            tail = bare[len(delimiter):]
            is_close = tail.startswith(b"--")
            if is_close:
                tail = tail[2:]
            if not tail.strip(b" \t"):
                if current is not None:
                    parts.append(current)
                if is_close:
                    closed = True
                    break
                if len(parts) >= MAX_PARTS:
                    raise SiprecError(f"multipart with more than {MAX_PARTS} parts")
                current = []
                continue
        if current is not None:
            current.append(line + (b"\n" if index < len(lines) - 1 else b""))
    if not closed and current is not None:
        parts.append(current)  # no closing delimiter: the last part runs to the end (lenient)
    if not parts:
        raise SiprecError("multipart without parts (boundary not found)")

    sdp: bytes | None = None
    metadata: bytes | None = None
    metadata_type: str | None = None
    for number, part_lines in enumerate(parts, 1):
        ptype, disposition, encoding, content = _part(b"".join(part_lines), number)
        if encoding not in ("", "7bit", "8bit", "binary"):
            raise SiprecError(f"part {number}: unsupported Content-Transfer-Encoding {_shown(encoding)}")
        if ptype == SDP_TYPE:
            if sdp is not None:
                raise SiprecError("multipart with two SDP parts")
            sdp = content
        elif ptype in METADATA_TYPES:
            if disposition not in ("", "recording-session"):
                continue  # metadata meant for something else than this recording session
            if metadata is not None:
                raise SiprecError("multipart with two metadata parts")
            metadata, metadata_type = content, ptype
    return RecordingBody(sdp if sdp is not None else b"", metadata, metadata_type)


def _part(raw: bytes, number: int) -> tuple[str, str, str, bytes]:
    """``(content type, disposition, transfer encoding, content)`` of one part.

    The line break before the next delimiter belongs to the delimiter (RFC 2046),
    so one trailing CRLF or LF is removed from the content."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.startswith(b"\r\n") or raw.startswith(b"\n"):
        head, content = b"", raw[2:] if raw.startswith(b"\r\n") else raw[1:]  # no part headers (RFC 2046 default)
    else:
        match = re.search(rb"\r?\n\r?\n", raw)
        if match is None:
            head, content = raw, b""
        else:
            head, content = raw[: match.start()], raw[match.end():]
    headers: dict[str, str] = {}
    name = ""
    for line in re.split(rb"\r?\n", head):
        if not line.strip():
            continue
        if line[:1] in (b" ", b"\t") and name:  # folded continuation
            headers[name] += " " + _text(line).strip()
            continue
        field, sep, value = line.partition(b":")
        if not sep:
            raise SiprecError(f"part {number}: bad header line")
        name = _text(field).strip().lower()
        if name == "c":
            name = "content-type"
        headers.setdefault(name, _text(value).strip())
    ptype = _params(headers.get("content-type", "text/plain"))[0]
    disposition = _params(headers.get("content-disposition", ""))[0]
    encoding = headers.get("content-transfer-encoding", "").strip().lower()
    return ptype, disposition, encoding, content
