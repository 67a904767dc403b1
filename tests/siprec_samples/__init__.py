"""Hand-written SIPREC requests modelled on what real SRCs send (see README.md here).

The ``.sip`` files are kept with LF line ends and ``Content-Length: 0`` so they stay
readable and editable; :func:`load` gives the message as it goes on the wire: CRLF
line ends (or bare LF with ``crlf=False``, as some SRCs send) and the right
Content-Length.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the samples, by name (file name without ``.sip``)
NAMES = tuple(sorted(p.stem for p in HERE.glob("*.sip")))


def load(name: str, *, crlf: bool = True, to_tag: str = "TO-TAG") -> bytes:
    """The sample ``name`` as wire bytes; ``to_tag`` replaces the ``TO-TAG`` placeholder
    of in-dialog requests (the tag our UA gave in its answer)."""
    text = (HERE / f"{name}.sip").read_text(encoding="utf-8").replace("\r\n", "\n").replace("TO-TAG", to_tag)
    head, _, body = text.partition("\n\n")
    eol = "\r\n" if crlf else "\n"
    head, body = head.replace("\n", eol), body.replace("\n", eol)
    length = len(body.encode("utf-8"))
    head = re.sub(r"(?im)^Content-Length:[ \t]*\d+", f"Content-Length: {length}", head, count=1)
    return (head + eol + eol + body).encode("utf-8")


def split(message: bytes) -> tuple[str, bytes]:
    """``(Content-Type value, body)`` of a loaded sample, without a SIP parser."""
    sep = b"\r\n\r\n" if b"\r\n\r\n" in message else b"\n\n"
    head, _, body = message.partition(sep)
    match = re.search(rb"(?im)^Content-Type:[ \t]*([^\r\n]*)", head)
    assert match is not None, "sample without Content-Type"
    return match.group(1).decode("utf-8"), body
