"""Splitting a SIP byte stream (TCP) into messages (RFC 3261 section 18.3).

On a stream the only message boundary is the header block's end plus
Content-Length, which is therefore mandatory.  The framer is deliberately
paranoid: it refuses a stream as soon as it can tell it is not SIP (a TLS
ClientHello, an HTTP probe, binary junk), when a message would exceed
``max_message_bytes``, or when Content-Length is missing or unreadable,
because after any of these the stream can never be resynchronised and the
only safe move is to answer 400 (when possible) and close.

CRLF keep-alives (RFC 5626 3.5.1) are counted as they arrive, keeping only the
last three bytes of the run, and at most ``MAX_IDLE_BYTES`` CR/LF bytes that
do not form a ping may precede a start line: a peer streaming CR (or LF) bytes
neither grows memory nor gets each read rescanned, and is refused. The header
search resumes where the previous read stopped, so a message trickled in a byte
at a time costs linear time. ``activity`` counts what is worth keeping a
connection for (a message or a ping): the transport's idle timer follows it,
not every byte.
"""

from __future__ import annotations

import re

__all__ = ["FramingError", "StreamFramer"]

_START_LINE_RE = re.compile(rb"(SIP/\d+\.\d+ .*|[A-Za-z0-9!%*_+`'~.\-]+ \S+ SIP/\d+\.\d+\s*)")
MAX_IDLE_BYTES = 512  # CR/LF bytes before a start line that are not CRLFCRLF pings
_PING = b"\r\n\r\n"
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
        self.activity = 0  # messages framed + pings seen
        self._buffer = bytearray()
        self._tail = b""  # the last (up to 3) bytes of the current CR/LF run, for a ping split across reads
        self._run = 0  # CR/LF bytes since the last ping in the current run
        self._scanned = 0  # header-end search already done up to here (the current message)
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
                self.activity += 1
        except FramingError as exc:
            self._buffer.clear()
            self._error = exc
            exc.messages = messages
            raise
        return messages

    def _next(self) -> bytes | None:
        buf = self._buffer
        if self._scanned == 0 and buf[:1] in (b"\r", b"\n"):
            skip = len(buf) - len(buf.lstrip(b"\r\n"))
            self._idle_bytes(bytes(buf[:skip]))
            del buf[:skip]
        if not buf:
            return None
        self._tail, self._run = b"", 0
        line_end = buf.find(b"\n")
        if line_end >= 0:
            first = bytes(buf[:line_end]).rstrip(b"\r")
            if not _START_LINE_RE.fullmatch(first):
                raise FramingError("Bad Request - Not a SIP message")
        elif len(buf) > 1024 or not _looks_like_start(bytes(buf)):
            raise FramingError("Bad Request - Not a SIP message")
        end, sep = _header_end(buf, max(0, self._scanned - 3))
        if end < 0:
            if len(buf) > self.max_message_bytes:
                raise FramingError("Bad Request - Message too large")
            self._scanned = max(1, len(buf))
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
        self._scanned = 0
        return message

    def _idle_bytes(self, run: bytes) -> None:
        """Count the CRLFCRLF pings in a run of CR/LF bytes between messages."""
        joined = self._tail + run
        found = joined.count(_PING)
        if found:
            self.pings += found
            self.activity += found
            rest = joined[joined.rfind(_PING) + 4 :]
            self._run = len(rest)
        else:
            rest = joined
            self._run += len(run)
        self._tail = rest[-3:]
        if self._run > MAX_IDLE_BYTES:
            raise FramingError("Bad Request - Line breaks without a message")


def _header_end(buf: bytearray, start: int = 0) -> tuple[int, int]:
    """Index of the blank line ending the headers and its length."""
    crlf = buf.find(b"\r\n\r\n", start)
    lf = buf.find(b"\n\n", start)
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
