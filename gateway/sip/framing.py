"""Splitting a SIP byte stream (TCP) into messages (RFC 3261 section 18.3).

On a stream the only message boundary is the header block's end plus
Content-Length, which is therefore mandatory.  The framer is deliberately
paranoid: it refuses a stream as soon as it can tell it is not SIP (a TLS
ClientHello, an HTTP probe, binary junk), when a message would exceed
``max_message_bytes``, or when Content-Length is missing or unreadable,
because after any of these the stream can never be resynchronised and the
only safe move is to answer 400 (when possible) and close.
"""

from __future__ import annotations

import re

__all__ = ["FramingError", "StreamFramer"]

_START_LINE_RE = re.compile(rb"(SIP/\d+\.\d+ .*|[A-Za-z0-9!%*_+`'~.\-]+ \S+ SIP/\d+\.\d+\s*)")
_CONTENT_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


class FramingError(ValueError):
    """The stream cannot be framed any further.

    ``reason`` is a 400 reason phrase; ``messages`` are the complete messages
    framed before the fault (to be processed normally); ``head`` is the
    offending message's header block, if one was read, so the transport can
    try to address a 400.
    """

    def __init__(self, reason: str, messages: list[bytes] | None = None, head: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.messages = messages or []
        self.head = head


class StreamFramer:
    """Feed stream bytes, get whole messages.  CRLF keep-alives are skipped
    and counted in ``pings`` (RFC 5626 double-CRLF pings deserve a CRLF pong)."""

    def __init__(self, max_message_bytes: int = 65536) -> None:
        self.max_message_bytes = max_message_bytes
        self.pings = 0
        self._buffer = bytearray()
        self._idle = bytearray()
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise FramingError(self._error.reason)
        self._buffer += data
        messages: list[bytes] = []
        try:
            while self._buffer:
                message = self._next()
                if message is None:
                    break
                messages.append(message)
        except FramingError as exc:
            self._buffer.clear()
            self._error = exc
            exc.messages = messages
            raise
        return messages

    def _next(self) -> bytes | None:
        buf = self._buffer
        skip = 0
        while skip < len(buf) and buf[skip] in (0x0D, 0x0A):
            skip += 1
        if skip:
            # Pings may arrive split across reads: keep the run of CR/LF bytes.
            self._idle += buf[:skip]
            del buf[:skip]
            while (at := self._idle.find(b"\r\n\r\n")) >= 0:
                self.pings += 1
                del self._idle[: at + 4]
        if not buf:
            return None
        self._idle.clear()
        line_end = buf.find(b"\n")
        if line_end >= 0:
            first = bytes(buf[:line_end]).rstrip(b"\r")
            if not _START_LINE_RE.fullmatch(first):
                raise FramingError("Bad Request - Not a SIP message")
        elif len(buf) > 1024 or not _looks_like_start(bytes(buf)):
            raise FramingError("Bad Request - Not a SIP message")
        end, sep = _header_end(buf)
        if end < 0:
            if len(buf) > self.max_message_bytes:
                raise FramingError("Bad Request - Message too large")
            return None
        head = bytes(buf[:end])
        unfolded = re.sub(rb"\r?\n[ \t]+", b" ", head)
        values = {m.group(1) for m in _CONTENT_LENGTH_RE.finditer(unfolded)}
        if not values:
            raise FramingError("Bad Request - Missing Content-Length", head=head)
        if len(values) > 1:
            raise FramingError("Bad Request - Multiple Content-Length", head=head)
        (value,) = values
        if not value.isdigit() or len(value) > 9:
            raise FramingError("Bad Request - Invalid Content-Length", head=head)
        total = end + sep + int(value)
        if total > self.max_message_bytes:
            raise FramingError("Bad Request - Message too large", head=head)
        if len(buf) < total:
            return None
        message = bytes(buf[:total])
        del buf[:total]
        return message


def _header_end(buf: bytearray) -> tuple[int, int]:
    """Index of the blank line ending the headers and its length."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    if lf >= 0:
        return lf, 2
    return -1, 0


def _looks_like_start(partial: bytes) -> bool:
    """Could this unterminated first line still become a SIP start line?"""
    partial = partial.removesuffix(b"\r")
    if b"SIP/".startswith(partial[:4]):
        return True
    method = partial.split(b" ", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9!%*_+`'~.\-]*", method) is not None and all(32 <= c < 127 for c in partial)
