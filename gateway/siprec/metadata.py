"""RFC 7865 recording metadata: who the parties of a recorded call are, and who sends which stream.

The metadata is XML an SRC sends beside the SDP (and again, complete or partial,
in re-INVITEs and UPDATEs).  What a transcript needs from it is, for each SDP
``a=label``, the party speaking on that stream: :meth:`RecordingMetadata.leg_for_label`.

Parsing is safe first: the XML comes from the network, so a DOCTYPE or ENTITY
declaration is refused before the parser sees the text (no billion laughs, no
external entities), and size, nesting depth and element count are capped while
parsing (:data:`MAX_BYTES`, :data:`MAX_DEPTH`, :data:`MAX_ELEMENTS`).

It is lenient second, because SRCs follow the RFC loosely (docs/siprec.md lists
the shapes): elements are matched by local name in any namespace and with any
prefix (RFC 7865's ``urn:ietf:params:xml:ns:recording:1``, the drafts'
``urn:ietf:params:xml:ns:recording`` that Oracle/Acme SBCs send, Ribbon's
``rs:`` prefix, even an undeclared prefix); ids are attributes (``participant_id``,
``stream_id``, ``session_id``, or the drafts' ``id``) or child elements;
send/recv associations are ``<participantstreamassoc>`` elements or nested in
``<participant>`` (the drafts, Acme); a party's address is ``<nameID aor=...>``
with a ``<name>``, or ``<aor>``/``<name>`` children.

Roles: the calling party is ``customer`` and every other party ``agent``.  The
calling party is the one an explicit hint names (a ``callingParty``-style
extension set true, or a role element), else the party sending the first
stream, else the first party listed.  A role once given is kept across
:func:`merge` unless the update carries a hint of its own.
"""

from __future__ import annotations

import re
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from .body import SiprecError

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_PARTIES",
    "LegIdentity",
    "Participant",
    "RecordingMetadata",
    "StreamAssociation",
    "StreamInfo",
    "merge",
    "parse_metadata",
]

#: Bytes of metadata at most (it rides in a SIP body: the SIP message limit).
MAX_BYTES = 65536
#: Element nesting at most (RFC 7865 documents nest 4 deep; vendor extensions a few more).
MAX_DEPTH = 24
#: Elements at most in one document.
MAX_ELEMENTS = 4096
#: Participants, streams and associations each at most (a conference of 64 is generous).
MAX_PARTIES = 64
#: Characters of one id, label, name or AoR kept at most.
MAX_VALUE = 512

ROLES = ("customer", "agent", "unknown")
RECORDING_NAMESPACES = ("urn:ietf:params:xml:ns:recording:1", "urn:ietf:params:xml:ns:recording")

#: Extension elements (local names, lower case) whose true/false says "this party placed the call".
CALLER_FLAGS = frozenset({"callingparty", "callerorig", "iscaller", "caller", "calling", "originator",
                          "isoriginator"})
#: ... and whose true says "this party was called".
CALLED_FLAGS = frozenset({"calledparty", "iscalled", "called", "callee"})
#: Extension elements naming a role, and the words each role goes by.
ROLE_ELEMENTS = frozenset({"role", "participantrole", "partyrole", "participant-role"})
CUSTOMER_WORDS = frozenset({"customer", "caller", "calling", "callingparty", "originator", "a-party", "aparty"})
AGENT_WORDS = frozenset({"agent", "callee", "called", "calledparty", "terminator", "b-party", "bparty"})
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_DECLARATION = re.compile(r"<!(?!--|\[CDATA\[)", re.IGNORECASE)
_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)
_TEL_VISUAL = re.compile(r"[-.() ]")


@dataclass(frozen=True)
class Participant:
    """One party of the recorded call.

    ``aor``: the address of record (``sip:``/``sips:``/``tel:`` URI, "" when none);
    ``number``: the AoR's user part, or a tel: URI's digits without visual separators;
    ``role``: ``customer``, ``agent`` or ``unknown``; ``role_hint``: the role an
    explicit vendor hint gave (None when the role was inferred), kept so
    :func:`merge` knows which roles an update may change.
    """

    participant_id: str
    name: str = ""
    aor: str = ""
    number: str = ""
    role: str = "unknown"
    role_hint: str | None = None


@dataclass(frozen=True)
class StreamInfo:
    """One recorded stream: RFC 7865 ``<stream>``; ``label`` matches an SDP ``a=label``."""

    stream_id: str
    label: str = ""
    session_id: str = ""
    participant_hint: str = ""  # a vendor extension naming the sending participant ("" when none)


@dataclass(frozen=True)
class StreamAssociation:
    """Which streams one participant sends and receives (``<participantstreamassoc>``)."""

    participant_id: str
    send: tuple[str, ...] = ()
    recv: tuple[str, ...] = ()


@dataclass(frozen=True)
class LegIdentity:
    """Who speaks on the stream with SDP label ``label``: what a leg's events carry."""

    label: str
    participant_id: str
    name: str
    number: str
    role: str


@dataclass(frozen=True)
class RecordingMetadata:
    """A parsed RFC 7865 document (or several merged: :func:`merge`).

    ``datamode``: ``complete`` or ``partial`` (RFC 7865 6.1.1; ``complete`` when absent).
    """

    session_id: str = ""
    participants: tuple[Participant, ...] = ()
    streams: tuple[StreamInfo, ...] = ()
    associations: tuple[StreamAssociation, ...] = ()
    datamode: str = "complete"
    _senders: dict[str, str] = field(init=False, repr=False, compare=False)
    _by_id: dict[str, Participant] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        senders: dict[str, str] = {}
        for assoc in self.associations:
            for sid in assoc.send:
                senders.setdefault(sid, assoc.participant_id)
        by_id: dict[str, Participant] = {}
        for party in self.participants:
            by_id.setdefault(party.participant_id, party)
        object.__setattr__(self, "_senders", senders)  # frozen: derived once, here
        object.__setattr__(self, "_by_id", by_id)

    def participant(self, participant_id: str) -> Participant | None:
        return self._by_id.get(participant_id)

    def association(self, participant_id: str) -> StreamAssociation | None:
        for assoc in self.associations:
            if assoc.participant_id == participant_id:
                return assoc
        return None

    def sender_of(self, stream_id: str) -> str | None:
        """The participant id that sends ``stream_id`` by the metadata's associations."""
        return self._senders.get(stream_id) or None

    def leg_for_label(self, label: str) -> LegIdentity | None:
        """The party that sends the stream labelled ``label``, or None when nobody can be told.

        In order: the participant whose ``send`` association names the stream (by its
        stream id, or leniently by the label itself); a vendor hint (an extension of the
        stream naming a participant id, the label being a participant id, or the label
        being a role word such as ``caller`` or ``agent``); then label order: the streams
        nobody is associated with, in document order, paired with the participants that
        send nothing, in document order.
        """
        label = (label or "").strip()
        if not label:
            return None
        streams = [s for s in self.streams if s.label == label]
        for stream in streams:
            pid = self._stream_sender(stream)
            if pid is not None:
                return self._identity(label, pid)
        pid = self.sender_of(label)  # a label where the stream id goes, and no <stream> for it
        if pid is not None and self.participant(pid) is not None:
            return self._identity(label, pid)
        if self.participant(label) is not None:
            return self._identity(label, label)
        word = label.lower()
        wanted = "customer" if word in CUSTOMER_WORDS else "agent" if word in AGENT_WORDS else None
        if wanted is not None:
            for party in self.participants:
                if party.role == wanted:
                    return self._identity(label, party.participant_id)
        if streams:
            pid = self._by_order(streams[0])
            if pid is not None:
                return self._identity(label, pid)
        return None

    def _stream_sender(self, stream: StreamInfo) -> str | None:
        """The sender of ``stream`` by association (its id, or its label) or by a stream extension."""
        for pid in (self.sender_of(stream.stream_id), self.sender_of(stream.label) if stream.label else None,
                    stream.participant_hint or None):
            if pid is not None and self.participant(pid) is not None:
                return pid
        return None

    def _by_order(self, stream: StreamInfo) -> str | None:
        """Label order: the n-th stream nobody sends goes to the n-th participant sending nothing."""
        unsent = [s for s in self.streams if self._stream_sender(s) is None]
        if stream not in unsent:
            return None
        idle = [p for p in self.participants if not self._sends_anything(p.participant_id)]
        index = unsent.index(stream)
        return idle[index].participant_id if index < len(idle) else None

    def _sends_anything(self, participant_id: str) -> bool:
        known = {s.stream_id for s in self.streams} | {s.label for s in self.streams}
        assoc = self.association(participant_id)
        if assoc is not None and any(sid in known for sid in assoc.send):
            return True
        return any(s.participant_hint == participant_id for s in self.streams)

    def first_sender(self) -> str | None:
        """The participant sending the first stream (document order) as :meth:`leg_for_label` maps
        it, leaving out role-word labels (the roles are what this decides)."""
        for stream in self.streams:
            pid = self._stream_sender(stream)
            if pid is None and self.participant(stream.label) is not None:
                pid = stream.label
            if pid is None:
                pid = self._by_order(stream)
            if pid is not None:
                return pid
        return None

    def _identity(self, label: str, participant_id: str) -> LegIdentity:
        party = self.participant(participant_id)
        assert party is not None
        return LegIdentity(label=label, participant_id=party.participant_id, name=party.name, number=party.number,
                           role=party.role)


# ---------------------------------------------------------------------------
# Safe XML


def _decode(xml: bytes) -> str:
    """The document as text: UTF-8 (the RFC's), UTF-16 with a BOM, else Latin-1 for
    lenience; its XML declaration removed, since the text is re-encoded."""
    if xml.startswith(b"\xef\xbb\xbf"):
        text = xml[3:].decode("utf-8", "replace")
    elif xml[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = xml.decode("utf-16", "replace")
    else:
        try:
            text = xml.decode("utf-8")
        except UnicodeDecodeError:
            text = xml.decode("latin-1")
    return _XML_DECL.sub("", text, count=1)


def _local(tag: object) -> str:
    """``{ns}Name`` or ``prefix:Name`` -> ``name`` (lower case): names are matched leniently."""
    if not isinstance(tag, str):
        return ""  # a comment or processing instruction
    if tag.startswith("{"):
        tag = tag.rpartition("}")[2]
    return tag.rpartition(":")[2].lower()


_UNBOUND_PREFIX = re.compile(r"(</?)[A-Za-z_][\w.-]*:(?=[A-Za-z_])")
_PREFIXED_ATTR = re.compile(r"(\s)(?!xml:)[A-Za-z_][\w.-]*:([A-Za-z_][\w.-]*\s*=)")
_XMLNS_ATTR = re.compile(r"\s+xmlns(?::[\w.-]+)?\s*=\s*(\"[^\"]*\"|'[^']*')")


def _parse_tree(text: str) -> ET.Element:
    parser = ET.XMLPullParser(events=("start", "end"))
    depth = elements = 0
    root: ET.Element | None = None
    data = text.encode("utf-8")
    try:
        for offset in range(0, len(data), 8192):  # fed in chunks: depth and count are checked as it goes
            parser.feed(data[offset: offset + 8192])
            for event, element in parser.read_events():
                if event == "start":
                    depth += 1
                    elements += 1
                    if root is None:
                        root = element  # type: ignore[assignment]
                    if depth > MAX_DEPTH:
                        raise SiprecError(f"metadata nested over {MAX_DEPTH} elements deep")
                    if elements > MAX_ELEMENTS:
                        raise SiprecError(f"metadata over {MAX_ELEMENTS} elements")
                else:
                    depth -= 1
        parser.close()
        for _ in parser.read_events():
            pass
    except ET.ParseError as exc:
        raise SiprecError(f"metadata is not well-formed XML: {exc}") from None
    if root is None:
        raise SiprecError("metadata is empty")
    return root


def _parse_xml(xml: bytes) -> ET.Element:
    if len(xml) > MAX_BYTES:
        raise SiprecError(f"metadata over {MAX_BYTES} bytes")
    text = _decode(xml)
    found = _DECLARATION.search(text)
    if found is not None:  # <!DOCTYPE, <!ENTITY, <!ELEMENT ...: no DTD processing at all
        line = text.count("\n", 0, found.start()) + 1
        raise SiprecError(f"metadata line {line}: DOCTYPE/ENTITY declarations are refused")
    if not text.strip():
        raise SiprecError("metadata is empty")
    try:
        return _parse_tree(text)
    except SiprecError as exc:
        if "unbound prefix" not in exc.reason:
            raise
    # An SRC that uses a prefix it never declared: read the document without prefixes.
    stripped = _PREFIXED_ATTR.sub(r"\1\2", _UNBOUND_PREFIX.sub(r"\1", _XMLNS_ATTR.sub("", text)))
    return _parse_tree(stripped)


# ---------------------------------------------------------------------------
# Reading the tree


def _clean(value: str | None) -> str:
    if not value:
        return ""
    return " ".join(value.split())[:MAX_VALUE]


def _children(element: ET.Element, *names: str) -> Iterator[ET.Element]:
    for child in element:
        if _local(child.tag) in names:
            yield child


def _first_text(element: ET.Element, *names: str) -> str:
    for child in _children(element, *names):
        text = _clean("".join(child.itertext()))
        if text:
            return text
    return ""


def _attr(element: ET.Element, *names: str) -> str:
    for key, value in element.attrib.items():
        if _local(key) in names:
            cleaned = _clean(value)
            if cleaned:
                return cleaned
    return ""


def _ident(element: ET.Element, kind: str) -> str:
    """An element's id: ``<kind>_id`` or ``id`` attribute (RFC / drafts), or such a child element."""
    names = (f"{kind}_id", f"{kind}id", kind, "id")
    return _attr(element, *names) or _first_text(element, *names)


def number_of(aor: str) -> str:
    """The number (or user) an AoR names: ``sip:+15551230001@host;user=phone`` -> ``+15551230001``,
    ``tel:+1-555-123-0001;phone-context=x`` -> ``+15551230001``; "" for none."""
    uri = aor.strip().strip("<>").strip()
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep:
        return ""
    if scheme == "tel":
        digits = rest.split(";", 1)[0]
        return _clean(_TEL_VISUAL.sub("", urllib.parse.unquote(digits)))[:64]
    if scheme in ("sip", "sips"):
        if "@" not in rest:
            return ""
        user = rest.rsplit("@", 1)[0].split(":", 1)[0]  # no password
        user = user.split(";", 1)[0]  # no user parameters (;phone-context=...)
        return _clean(urllib.parse.unquote(user))[:64]
    return ""


def _flag(text: str) -> bool | None:
    word = text.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


def _role_hint(party: ET.Element) -> str | None:
    """An explicit role from vendor data anywhere inside the participant element."""
    for element in party.iter():
        name = _local(element.tag)
        text = _clean("".join(element.itertext())) if len(element) == 0 else _clean(element.text)
        if name in CALLER_FLAGS:
            flag = _flag(text)
            if flag is not None:
                return "customer" if flag else "agent"
        elif name in CALLED_FLAGS:
            flag = _flag(text)
            if flag is not None:
                return "agent" if flag else "customer"
        elif name in ROLE_ELEMENTS:
            word = text.lower()
            if word in CUSTOMER_WORDS:
                return "customer"
            if word in AGENT_WORDS:
                return "agent"
    for key, value in party.attrib.items():  # <participant ... role="agent"> / callingParty="true"
        name = _local(key)
        if name in CALLER_FLAGS and _flag(value) is not None:
            return "customer" if _flag(value) else "agent"
        if name in ROLE_ELEMENTS and value.strip().lower() in CUSTOMER_WORDS | AGENT_WORDS:
            return "customer" if value.strip().lower() in CUSTOMER_WORDS else "agent"
    return None


def _name_and_aor(party: ET.Element) -> tuple[str, str]:
    name = aor = ""
    for name_id in _children(party, "nameid"):
        aor = aor or _attr(name_id, "aor") or _first_text(name_id, "aor")
        name = name or _first_text(name_id, "name")
    aor = aor or _attr(party, "aor") or _first_text(party, "aor")
    name = name or _first_text(party, "name")
    return name, aor


def _stream_refs(element: ET.Element, kind: str) -> tuple[str, ...]:
    refs: list[str] = []
    for child in _children(element, kind):
        ref = _clean("".join(child.itertext())) or _ident(child, "stream")
        for token in ref.split():  # some SRCs list several ids in one element
            if token not in refs and len(refs) < MAX_PARTIES:
                refs.append(token)
    return tuple(refs)


def _stream_participant_hint(stream: ET.Element) -> str:
    for element in stream.iter():
        if element is stream:
            continue
        if _local(element.tag) in ("participant_id", "participantid", "participant", "participantref", "sender"):
            text = _clean(element.text) or _ident(element, "participant")
            if text:
                return text
    return ""


def _add_association(assocs: dict[str, StreamAssociation], pid: str, send: Iterable[str], recv: Iterable[str]) -> None:
    old = assocs.get(pid, StreamAssociation(pid))
    if len(old.send) >= MAX_PARTIES and len(old.recv) >= MAX_PARTIES:
        return  # bounded: repeated associations cannot grow without end
    assocs[pid] = StreamAssociation(pid, tuple(dict.fromkeys((*old.send, *send)))[:MAX_PARTIES],
                                    tuple(dict.fromkeys((*old.recv, *recv)))[:MAX_PARTIES])


def parse_metadata(xml: bytes) -> RecordingMetadata:
    """The RFC 7865 document ``xml``, safely and leniently; :class:`SiprecError` when unusable."""
    root = _parse_xml(xml)
    if _local(root.tag) != "recording":
        raise SiprecError(f"metadata root is <{_local(root.tag)[:30]}>, not <recording>")
    datamode = _first_text(root, "datamode").lower()
    datamode = datamode if datamode in ("complete", "partial") else "complete"
    session_id = ""
    for session in _children(root, "session"):
        session_id = _ident(session, "session")
        if session_id:
            break
    parties: list[tuple[Participant, str | None]] = []
    seen: set[str] = set()
    assocs: dict[str, StreamAssociation] = {}
    streams: list[StreamInfo] = []
    for index, element in enumerate(_children(root, "participant"), 1):
        pid = _ident(element, "participant")
        if not pid:
            raise SiprecError(f"metadata participant {index} without participant_id")
        name, aor = _name_and_aor(element)
        send, recv = _stream_refs(element, "send"), _stream_refs(element, "recv")
        if send or recv:
            _add_association(assocs, pid, send, recv)
        if pid in seen:
            continue
        if len(parties) >= MAX_PARTIES:
            raise SiprecError(f"metadata with more than {MAX_PARTIES} participants")
        seen.add(pid)
        parties.append((Participant(pid, name=name, aor=aor, number=number_of(aor)), _role_hint(element)))
    stream_ids: set[str] = set()
    for index, element in enumerate(_children(root, "stream"), 1):
        sid = _ident(element, "stream")
        label = _first_text(element, "label")
        if not sid and not label:
            raise SiprecError(f"metadata stream {index} without stream_id or label")
        sid = sid or label
        if sid in stream_ids:
            continue
        if len(streams) >= MAX_PARTIES:
            raise SiprecError(f"metadata with more than {MAX_PARTIES} streams")
        stream_ids.add(sid)
        streams.append(StreamInfo(sid, label=label, session_id=_attr(element, "session_id", "session"),
                                  participant_hint=_stream_participant_hint(element)))
    for index, element in enumerate(_children(root, "participantstreamassoc"), 1):
        pid = _ident(element, "participant")
        if not pid:
            raise SiprecError(f"metadata participantstreamassoc {index} without participant_id")
        if pid not in assocs and len(assocs) >= MAX_PARTIES:
            raise SiprecError(f"metadata with more than {MAX_PARTIES} participantstreamassoc")
        _add_association(assocs, pid, _stream_refs(element, "send"), _stream_refs(element, "recv"))
    base = RecordingMetadata(session_id=session_id, participants=tuple(p for p, _ in parties),
                             streams=tuple(streams), associations=tuple(assocs.values()), datamode=datamode)
    return _with_roles(base, {p.participant_id: h for p, h in parties if h is not None}, {})


def _with_roles(meta: RecordingMetadata, hints: dict[str, str], kept: dict[str, str]) -> RecordingMetadata:
    """Roles for every participant: ``hints`` (explicit, this document) win, then ``kept``
    (roles an earlier document gave), then the rule: the calling party is the customer."""
    roles: dict[str, str] = {}
    for party in meta.participants:
        pid = party.participant_id
        if pid in hints:
            roles[pid] = hints[pid]
        elif party.role_hint is not None and pid not in kept:
            roles[pid] = party.role_hint
        elif pid in kept:
            roles[pid] = kept[pid]
    if "customer" not in roles.values():
        undecided = [p.participant_id for p in meta.participants if p.participant_id not in roles]
        caller = None
        first = meta.first_sender()
        if first in undecided:
            caller = first
        elif undecided and not any(p.participant_id in kept for p in meta.participants):
            caller = undecided[0]  # nobody sends a known stream: the first party listed
        if caller is not None:
            roles[caller] = "customer"
    out = []
    for party in meta.participants:
        pid = party.participant_id
        hint = hints.get(pid, party.role_hint)
        out.append(replace(party, role=roles.get(pid, "agent"), role_hint=hint))
    return replace(meta, participants=tuple(out))


def merge(previous: RecordingMetadata, update: RecordingMetadata) -> RecordingMetadata:
    """``previous`` with ``update`` applied: what a metadata-only re-INVITE or UPDATE says.

    RFC 7865 lets an update be partial (only what changed) or complete; either way
    parties and streams are kept by id (a transcript already names them), an update's
    non-empty fields replace the old ones, new parties and streams are appended, and a
    participant's send/recv association in the update replaces its old one.  Roles
    given before are kept unless the update carries an explicit hint for that party.
    """
    parties = {p.participant_id: p for p in previous.participants}
    hints: dict[str, str] = {}
    for party in update.participants:
        old = parties.get(party.participant_id)
        if party.role_hint is not None:
            hints[party.participant_id] = party.role_hint
        if old is None:
            parties[party.participant_id] = replace(party, role="unknown")
        else:
            parties[party.participant_id] = replace(
                old, name=party.name or old.name, aor=party.aor or old.aor,
                number=party.number if party.aor else old.number,
                role_hint=party.role_hint if party.role_hint is not None else old.role_hint)
    if len(parties) > MAX_PARTIES:
        raise SiprecError(f"metadata with more than {MAX_PARTIES} participants")
    streams = {s.stream_id: s for s in previous.streams}
    for stream in update.streams:
        old_stream = streams.get(stream.stream_id)
        streams[stream.stream_id] = stream if old_stream is None else replace(
            old_stream, label=stream.label or old_stream.label, session_id=stream.session_id or old_stream.session_id,
            participant_hint=stream.participant_hint or old_stream.participant_hint)
    if len(streams) > MAX_PARTIES:
        raise SiprecError(f"metadata with more than {MAX_PARTIES} streams")
    assocs = {a.participant_id: a for a in previous.associations}
    for assoc in update.associations:
        assocs[assoc.participant_id] = assoc
    kept = {p.participant_id: p.role for p in previous.participants if p.role in ("customer", "agent")}
    merged = RecordingMetadata(
        session_id=update.session_id or previous.session_id,
        participants=tuple(parties.values()),
        streams=tuple(streams.values()),
        associations=tuple(assocs.values()),
        datamode=update.datamode,
    )
    return _with_roles(merged, hints, kept)
