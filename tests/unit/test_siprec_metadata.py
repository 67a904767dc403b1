"""gateway.siprec.metadata: RFC 7865 metadata parsed safely and leniently, labels mapped to parties."""

from __future__ import annotations

import pytest

from gateway.siprec.body import SiprecError, split_body
from gateway.siprec.metadata import (MAX_BYTES, MAX_DEPTH, MAX_ELEMENTS, MAX_PARTIES, LegIdentity, RecordingMetadata,
                                     merge, number_of, parse_metadata)
from tests.siprec_samples import load, split

NS = "urn:ietf:params:xml:ns:recording:1"


def sample(name: str) -> RecordingMetadata:
    content_type, body = split(load(name))
    metadata = split_body(content_type, body).metadata
    assert metadata is not None
    return parse_metadata(metadata)


def doc(inner: str, ns: str = NS) -> bytes:
    return f'<?xml version="1.0"?><recording xmlns="{ns}">{inner}</recording>'.encode()


def party(pid: str, aor: str = "", name: str = "", extra: str = "") -> str:
    return f'<participant participant_id="{pid}"><nameID aor="{aor}"><name>{name}</name></nameID>{extra}</participant>'


def stream(sid: str, label: str) -> str:
    return f'<stream stream_id="{sid}" session_id="s"><label>{label}</label></stream>'


def assoc(pid: str, send: str = "", recv: str = "") -> str:
    return (f'<participantstreamassoc participant_id="{pid}">' + (f"<send>{send}</send>" if send else "")
            + (f"<recv>{recv}</recv>" if recv else "") + "</participantstreamassoc>")


# label -> (name, number, role) for every vendor sample
VENDORS = {
    "cisco_cube": {"1": ("Dana Whitfield", "4085550101", "customer"), "2": ("Agent 2001", "2001", "agent")},
    "oracle_acme": {"1001": ("Priya Raman", "7781", "agent"), "1002": ("+442079460958", "+442079460958", "customer")},
    "sonus_ribbon": {"1": ("BOSTON MA", "+16175550142", "customer"), "2": ("Support Desk", "+16175550900", "agent")},
    "audiocodes": {"1": ("Olu Adeyemi", "5201", "agent"), "2": ("0612345678", "0612345678", "customer")},
    "broadworks": {"1": ("+12125550168", "+12125550168", "customer"), "2": ("Sam Okafor", "3105", "agent")},
}
SESSIONS = {"cisco_cube": "UvDsPJsREeOgl9WQ5dEr5g==", "oracle_acme": "0000-0000-0000-0001-3a0e",
            "sonus_ribbon": "7+VJwdyHEeWIsgAQa++tRw==", "audiocodes": "0000-0000-0000-0000-3f2a9c110d5e",
            "broadworks": "ZDk0YzM3MzktMjcwZS00"}


@pytest.mark.parametrize("name", sorted(VENDORS))
def test_every_vendor_sample_maps_each_label_to_the_party_who_sends_it(name: str) -> None:
    meta = sample(name)
    assert meta.session_id == SESSIONS[name]
    assert len(meta.participants) == 2 and len(meta.streams) == 2
    assert sorted(p.role for p in meta.participants) == ["agent", "customer"]
    for label, (who, number, role) in VENDORS[name].items():
        ident = meta.leg_for_label(label)
        assert ident is not None, label
        assert (ident.label, ident.name, ident.number, ident.role) == (label, who, number, role)
        assert meta.participant(ident.participant_id).role == role  # type: ignore[union-attr]
    assert meta.leg_for_label("3") is None and meta.leg_for_label("") is None


def test_cisco_associations_and_aors() -> None:
    meta = sample("cisco_cube")
    dana, agent = meta.participants
    assert dana.aor == "sip:4085550101@127.0.0.1" and agent.aor == "sip:2001@127.0.0.1"
    a = meta.association(dana.participant_id)
    assert a is not None and a.send == ("UvDsPJsREeOgnNWQ5dEr5g==",) and a.recv == ("UvDsPJsREeOgotWQ5dEr5g==",)
    assert [s.label for s in meta.streams] == ["1", "2"]


def test_oracle_calling_party_extension_beats_stream_order() -> None:
    """The agent is listed first and sends the first stream: only ``apkt:callingParty`` says who called."""
    meta = sample("oracle_acme")
    assert meta.first_sender() == "pa-agent-7781"
    assert [(p.participant_id, p.role) for p in meta.participants] == [("pa-agent-7781", "agent"),
                                                                       ("pa-caller-5550", "customer")]
    # nested <send>/<recv> became associations
    assert meta.association("pa-caller-5550").send == ("st-1002",)  # type: ignore[union-attr]
    without_hint = load("oracle_acme").replace(b"<apkt:callingParty>true", b"<apkt:x>true").replace(
        b"<apkt:callingParty>false", b"<apkt:x>false").replace(b"callingParty>", b"x>")
    content_type, body = split(without_hint)
    plain = parse_metadata(split_body(content_type, body).metadata or b"")
    assert plain.leg_for_label("1001").role == "customer"  # type: ignore[union-attr]  # the rule: first stream's sender


def test_tel_and_sip_numbers() -> None:
    assert number_of("tel:+1-303-555-0187") == "+13035550187"
    assert number_of("tel:+1 (303) 555.0187;phone-context=example.com") == "+13035550187"
    assert number_of("sip:+442079460958@carrier.example.net;user=phone") == "+442079460958"
    assert number_of("<sips:alice:secret@example.com>") == "alice"
    assert number_of("sip:+1555%32@x;transport=tcp") == "+15552"
    assert number_of("sip:4417;phone-context=x@host") == "4417"
    assert number_of("sip:example.com") == "" and number_of("mailto:a@b") == "" and number_of("") == ""


def test_avaya_metadata_only_reinvite_adds_the_agent_mid_call() -> None:
    first = sample("avaya_sbce_invite")
    assert [p.name for p in first.participants] == ["Miguel Ortega"]
    caller = first.leg_for_label("caller-stream")
    assert caller == LegIdentity("caller-stream", "QXZheWFQYXJ0eTAwMDE=", "Miguel Ortega", "+13035550187", "customer")
    assert first.leg_for_label("callee-stream") is None  # nobody on the second m-line yet
    content_type, body = split(load("avaya_sbce_reinvite"))
    update = parse_metadata(split_body(content_type, body).metadata or b"")
    assert update.datamode == "partial"
    merged = merge(first, update)
    assert [(p.name, p.role) for p in merged.participants] == [("Miguel Ortega", "customer"), ("Hannah Lee", "agent")]
    assert merged.leg_for_label("caller-stream") == caller
    agent = merged.leg_for_label("callee-stream")
    assert agent is not None and (agent.name, agent.number, agent.role) == ("Hannah Lee", "4417", "agent")
    assert merged.session_id == first.session_id and len(merged.streams) == 2


def test_merge_keeps_roles_updates_fields_and_takes_a_new_hint() -> None:
    first = parse_metadata(doc(party("a", "sip:100@x", "Ann") + party("b", "sip:200@x", "Bob") + stream("s1", "1")
                               + stream("s2", "2") + assoc("a", "s1") + assoc("b", "s2")))
    assert [p.role for p in first.participants] == ["customer", "agent"]
    # a complete update listing Bob first, sending the first stream, gives him no new role
    swapped = parse_metadata(doc(party("b", "sip:200@x", "Robert") + party("a") + stream("s2", "2")
                                 + assoc("b", "s2")))
    merged = merge(first, swapped)
    assert [(p.participant_id, p.name, p.aor, p.role) for p in merged.participants] == [
        ("a", "Ann", "sip:100@x", "customer"), ("b", "Robert", "sip:200@x", "agent")]
    # an explicit hint in an update does change it
    hinted = parse_metadata(doc(party("b", extra="<extensiondata><x:callingParty xmlns:x='urn:x'>true"
                                               "</x:callingParty></extensiondata>")))
    again = merge(merged, hinted)
    assert {p.participant_id: p.role for p in again.participants}["b"] == "customer"
    # a new association replaces the old one of that participant
    moved = merge(first, parse_metadata(doc(assoc("a", "s2") + assoc("b", "s1"))))
    assert moved.leg_for_label("1").participant_id == "b"  # type: ignore[union-attr]


def test_merge_is_bounded() -> None:
    meta = parse_metadata(doc("".join(party(f"p{i}") for i in range(MAX_PARTIES))))
    with pytest.raises(SiprecError, match="more than"):
        merge(meta, parse_metadata(doc(party("one-more"))))


def test_participant_id_as_child_element_and_aor_children() -> None:
    xml = doc("<participant><participant_id>p1</participant_id><aor>tel:5551234</aor><name>Kim</name>"
              "</participant>" + stream("s1", "7") + assoc("p1", "s1"))
    ident = parse_metadata(xml).leg_for_label("7")
    assert ident is not None and (ident.participant_id, ident.name, ident.number) == ("p1", "Kim", "5551234")


def test_old_namespace_and_any_prefix_and_no_namespace() -> None:
    inner = party("a", "sip:1@x", "A") + stream("s1", "1") + assoc("a", "s1")
    for xml in (doc(inner, "urn:ietf:params:xml:ns:recording"), doc(inner, "urn:example:other"),
                f"<recording>{inner}</recording>".encode(),
                f'<q:recording xmlns:q="{NS}">{inner.replace("<", "<q:").replace("<q:/", "</q:")}</q:recording>'.encode()):
        assert parse_metadata(xml).leg_for_label("1").name == "A"  # type: ignore[union-attr]


def test_an_undeclared_prefix_is_read_leniently() -> None:
    xml = (b'<rs:recording><rs:participant rs:participant_id="a"><rs:nameID aor="sip:9@x"><rs:name>Nine</rs:name>'
           b'</rs:nameID></rs:participant><rs:stream stream_id="s"><rs:label>1</rs:label></rs:stream>'
           b'<rs:participantstreamassoc participant_id="a"><rs:send>s</rs:send></rs:participantstreamassoc>'
           b"</rs:recording>")
    assert parse_metadata(xml).leg_for_label("1").number == "9"  # type: ignore[union-attr]


def test_utf16_and_latin1_documents() -> None:
    text = f'<?xml version="1.0" encoding="UTF-16"?><recording xmlns="{NS}">{party("a", "sip:1@x", "Zoë")}</recording>'
    assert parse_metadata(text.encode("utf-16")).participants[0].name == "Zoë"
    latin = text.replace("UTF-16", "ISO-8859-1").encode("latin-1")
    assert parse_metadata(latin).participants[0].name == "Zoë"


def test_vendor_hints_then_label_order() -> None:
    # a stream extension naming its sender; the label being a participant id; a role word as the label
    meta = parse_metadata(doc(party("a", "sip:1@x", "Cust") + party("b", "sip:2@x", "Agt")
                              + '<stream stream_id="s1"><label>L1</label><extensiondata><v:participant xmlns:v="urn:v">'
                                'b</v:participant></extensiondata></stream>'))
    assert meta.leg_for_label("L1").participant_id == "b"  # type: ignore[union-attr]
    assert [p.role for p in meta.participants] == ["agent", "customer"]  # b sends the first stream
    assert meta.leg_for_label("a").participant_id == "a"  # type: ignore[union-attr]
    assert meta.leg_for_label("caller").participant_id == "b"  # type: ignore[union-attr]
    assert meta.leg_for_label("agent").participant_id == "a"  # type: ignore[union-attr]
    # label order: streams nobody sends, paired with parties that send nothing, in document order
    ordered = parse_metadata(doc(party("x", "sip:10@x") + party("y", "sip:20@x") + party("z", "sip:30@x")
                                 + stream("s1", "5") + stream("s2", "6") + stream("s3", "7") + assoc("y", "s3")))
    assert [ordered.leg_for_label(label).participant_id for label in "567"] == ["x", "z", "y"]  # type: ignore[union-attr]
    assert [p.role for p in ordered.participants] == ["customer", "agent", "agent"]


def test_roles_with_nothing_said_and_role_elements() -> None:
    only = parse_metadata(doc(party("a") + party("b")))
    assert [p.role for p in only.participants] == ["customer", "agent"]
    assert only.leg_for_label("1") is None  # no streams at all: nobody can be told
    roles = parse_metadata(doc(party("a", extra="<role>agent</role>") + party("b")))
    assert [p.role for p in roles.participants] == ["agent", "customer"]
    attr = parse_metadata(doc('<participant participant_id="a" role="called"/><participant participant_id="b"/>'))
    assert [p.role for p in attr.participants] == ["agent", "customer"]
    assert parse_metadata(doc("")).participants == ()


# -- safety ------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<recording xmlns="urn:ietf:params:xml:ns:recording:1"><participant participant_id="&lol9;"/></recording>"""
XXE = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<recording><participant participant_id="&x;"/></recording>')


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, XXE, b"<!doctype recording><recording/>",
                                 b'\xef\xbb\xbf<!DOCTYPE r SYSTEM "http://example.com/x.dtd"><recording/>',
                                 '<!DOCTYPE r>'.encode("utf-16")], ids=["billion-laughs", "xxe", "doctype",
                                                                         "external-dtd", "utf16-doctype"])
def test_dtds_and_entities_are_refused_before_parsing(xml: bytes) -> None:
    with pytest.raises(SiprecError, match="DOCTYPE/ENTITY declarations are refused"):
        parse_metadata(xml)


def test_an_undefined_entity_is_an_error_not_an_expansion() -> None:
    with pytest.raises(SiprecError, match="not well-formed"):
        parse_metadata(b'<recording><participant participant_id="&x;"/></recording>')


def test_size_depth_and_element_count_are_capped() -> None:
    with pytest.raises(SiprecError, match=f"over {MAX_BYTES} bytes"):
        parse_metadata(doc(" " * MAX_BYTES))
    deep = "<e>" * MAX_DEPTH + "</e>" * MAX_DEPTH
    with pytest.raises(SiprecError, match="nested over"):
        parse_metadata(doc(deep))
    parse_metadata(doc("<e>" * (MAX_DEPTH - 1) + "</e>" * (MAX_DEPTH - 1)))
    with pytest.raises(SiprecError, match=f"over {MAX_ELEMENTS} elements"):
        parse_metadata(doc("<e/>" * MAX_ELEMENTS))
    with pytest.raises(SiprecError, match=f"more than {MAX_PARTIES} participants"):
        parse_metadata(doc("".join(party(f"p{i}") for i in range(MAX_PARTIES + 1))))


def test_repeated_associations_are_capped() -> None:
    """Hundreds of associations for one participant: what is kept stays bounded (so the work of
    merging them does too)."""
    xml = doc(party("a") + "".join(assoc("a", f"s{i}", f"r{i}") for i in range(500)))
    assert len(xml) < MAX_BYTES
    a = parse_metadata(xml).association("a")
    assert a is not None and a.send == tuple(f"s{i}" for i in range(MAX_PARTIES))
    assert a.recv == tuple(f"r{i}" for i in range(MAX_PARTIES))


@pytest.mark.parametrize("xml,reason", [
    (b"", "metadata is empty"),
    (b"   ", "metadata is empty"),
    (b"<recording>", "metadata is not well-formed XML: no element found: line 1"),
    (b"<recording><participant></recording>", "mismatched tag: line 1, column 26"),
    (b"<session/>", "metadata root is <session>, not <recording>"),
    (doc("<participant/>"), "metadata participant 1 without participant_id"),
    (doc("<stream/>"), "metadata stream 1 without stream_id or label"),
    (doc("<participantstreamassoc><send>s</send></participantstreamassoc>"),
     "participantstreamassoc 1 without participant_id"),
    (b"<recording>\n\n<x/><!ENTITY a 'b'></recording>", "metadata line 3: DOCTYPE/ENTITY"),
])
def test_bad_metadata_names_what_and_where(xml: bytes, reason: str) -> None:
    with pytest.raises(SiprecError) as caught:
        parse_metadata(xml)
    assert reason in caught.value.reason
    assert caught.value.reason.isascii() and caught.value.reason.isprintable()


def test_comments_and_cdata_are_fine() -> None:
    xml = doc("<!-- a comment --><participant participant_id='a'><nameID aor='sip:1@x'><name><![CDATA[A & B]]>"
              "</name></nameID></participant>")
    assert parse_metadata(xml).participants[0].name == "A & B"
