"""The typed events: building (strict), the wire form, decoding (validating), v1 events."""

import json

import pytest

from gateway.events import (
    CALL_ENDED,
    CALL_STARTED,
    DTMF,
    TURN_FINAL,
    TURN_PARTIAL,
    AsrInfo,
    CallInfo,
    Confidence,
    Event,
    EventError,
    EventFactory,
    Source,
    TurnFinal,
    decode_fields,
)
from tests.pg_server import recorded_call

TWILIO = Source("twilio", (("call_sid", "CA5f"), ("stream_sid", "MZ18"), ("account_sid", "AC02")))


def final_data(**overrides):
    data = {"turn": 2, "start_ms": 4180, "end_ms": 7020, "text": "Please hold.", "reason": "silence",
            "partials": 2, "language": "en",
            "confidence": {"avg_logprob": -0.21, "no_speech_prob": 0.01, "compression_ratio": 1.1,
                           "language_probability": 1.0},
            "asr": {"model": "tiny.en", "audio_ms": 2840, "processing_ms": 140.2, "speculative": True}}
    data.update(overrides)
    return data


def test_every_recorded_event_survives_the_wire_unchanged():
    for source in (None, TWILIO):
        for event in recorded_call(["one two three", "four five"], digits="5#", source=source):
            wire = json.loads(event.to_fields()["data"])
            back = Event.from_wire(wire)
            assert back.to_wire() == wire
            assert (back.type, back.event_id, back.number, back.leg, back.data) == \
                (event.type, event.event_id, event.number, event.leg, event.data)
            assert back.call.source == event.call.source and back.time.timestamp() == pytest.approx(event.created_at)


def test_the_compatibility_accessors_other_code_reads():
    factory = EventFactory(CallInfo("s1", source=Source("realtime", (("session_id", "sess_1"),))))
    final = factory.make(TURN_FINAL, final_data(reason="commit"), leg="caller")
    assert final.type == "turn.final" and final.leg == "caller" and final.event_id == "s1:000001"
    assert final.data["text"] == "Please hold." and final.data.get("error") is None
    assert final.data["asr"]["speculative"] is True
    assert isinstance(final.payload, TurnFinal) and final.payload.confidence == Confidence(-0.21, 0.01, 1.1, 1.0)
    assert final.payload.asr == AsrInfo("tiny.en", 2840.0, 140.2, True)
    failed = factory.make(TURN_FINAL, {"turn": 3, "start_ms": 8000, "end_ms": 9000, "text": "",
                                       "reason": "silence", "partials": 0, "error": "asr-timeout"}, leg="caller")
    assert failed.data.get("error") == "asr-timeout" and "confidence" not in failed.data
    # the typed payload is accepted as it is
    again = factory.make(TURN_FINAL, final.payload, leg="caller")
    assert again.payload is final.payload and again.number == 3
    # a non-SIP event carries its source and no SIP fields
    wire = final.to_wire()
    assert wire["source"] == {"kind": "realtime", "session_id": "sess_1"}
    assert not {"sip_call_id", "from", "to"} & set(wire)


@pytest.mark.parametrize("kind, data, leg, message", [
    (TURN_FINAL, {"turn": 1, "end_ms": 5}, "caller", "start_ms: missing"),
    (TURN_FINAL, final_data(turn=0), "caller", "turn: 0 out of range"),
    (TURN_FINAL, final_data(turn="two"), "caller", "turn: expected a number"),
    (TURN_FINAL, final_data(start_ms=-1), "caller", "start_ms: -1 out of range"),
    (TURN_FINAL, final_data(end_ms=2**31), "caller", "end_ms: 2147483648 out of range"),
    (TURN_FINAL, final_data(text="x" * 100_001), "caller", "text: longer than 100000"),
    (TURN_FINAL, final_data(error="e" * 33), "caller", "error: longer than 32"),
    (TURN_FINAL, final_data(words=[]), "caller", "words: unknown field in a turn.final payload"),
    (TURN_FINAL, final_data(confidence={"avg_logprob": float("nan")}), "caller",
     "confidence.avg_logprob: expected a finite number"),
    (TURN_FINAL, final_data(confidence={"certainty": 1}), "caller", "confidence.certainty: unknown field"),
    (TURN_FINAL, final_data(asr={"speculative": "yes"}), "caller", "asr.speculative: expected true or false"),
    (TURN_FINAL, final_data(asr=[1]), "caller", "asr: expected an object"),
    (TURN_FINAL, final_data(), None, "leg: expected a non-empty string"),
    (TURN_PARTIAL, {"turn": 1, "start_ms": 0, "end_ms": 5, "text": "hi"}, "caller", "partial: missing"),
    (TURN_PARTIAL, {"turn": 1, "partial": 1, "start_ms": 0, "end_ms": 5}, "caller", "text: missing"),
    (DTMF, {"digit": ""}, "caller", "digit: expected a non-empty string"),
    (DTMF, {"digit": "123456789"}, "caller", "digit: longer than 8"),
    (CALL_STARTED, {"legs": ["caller", ""]}, None, "legs: expected a list of non-empty strings"),
    (CALL_STARTED, {"codec": "PCMU", "sdp": "v=0"}, None, "sdp: unknown field"),
    (CALL_ENDED, {"reason": "r" * 33}, None, "reason: longer than 32"),
    (CALL_ENDED, {"rtp": {"packets": True}}, None, "rtp.packets: expected a number"),
    ("call.exploded", {}, None, "unknown event type"),
])
def test_building_refuses_a_bad_payload_naming_the_field(kind, data, leg, message):
    factory = EventFactory(CallInfo("c1", "sip-1", "sip:a@x", "sip:b@y", 0.0))
    with pytest.raises(EventError, match=message):
        factory.make(kind, data, leg=leg)
    assert factory.make(CALL_STARTED).number == 1  # a refused event takes no number


def test_a_source_id_the_kind_does_not_have_is_refused():
    with pytest.raises(EventError, match="source.callSid: not an id of a twilio source"):
        EventFactory(CallInfo("c1", source=Source("twilio", (("callSid", "CA1"),))))
    with pytest.raises(EventError, match="unknown source kind 'fax'"):
        Source("fax")


def good_wire(**overrides):
    event = EventFactory(CallInfo("c1", source=TWILIO)).make(TURN_FINAL, final_data(), leg="agent")
    wire = event.to_wire()
    wire.update(overrides)
    return wire


@pytest.mark.parametrize("change, message", [
    ({"schema": "earshot.event.v9"}, "schema: unknown schema"),
    ({"type": "call.exploded"}, "type: unknown event type"),
    ({"event_id": ""}, "event_id: expected a non-empty string"),
    ({"call_id": "c" * 65}, "call_id: longer than 64"),
    ({"time": "yesterday"}, "time: not an ISO 8601 time"),
    ({"time": "2026-11-24T15:02:11"}, "time: no time zone"),
    ({"tags": ["ok", ""]}, "tags: expected a list of non-empty strings"),
    ({"source": None}, "source: missing"),
    ({"source": {"kind": "fax"}}, "source.kind: unknown source kind"),
    ({"source": {"kind": "twilio", "call_sid": 5}}, "source.call_sid: expected a string"),
    ({"source": "twilio"}, "source: expected an object"),
    ({"leg": ""}, "leg: expected a non-empty string"),
    ({"turn": None}, "turn: missing"),
    ({"latency_ms": "fast"}, "latency_ms: expected a finite number"),
    ({"from": 5}, "from: expected a string"),
])
def test_decoding_names_the_field_at_fault(change, message):
    with pytest.raises(EventError, match=message):
        Event.from_wire(good_wire(**change))


def test_decoding_ignores_fields_it_does_not_know():
    event = Event.from_wire(good_wire(words=[{"w": "please"}], confidence={"avg_logprob": -0.2, "new": 1}))
    assert event.payload.confidence == Confidence(avg_logprob=-0.2)
    assert "words" not in event.to_wire()
    assert Event.from_wire(good_wire(source={"kind": "twilio", "call_sid": "CA1", "later_id": "x"})).source.get(
        "later_id") == "x"


def test_decode_fields_reasons():
    with pytest.raises(EventError, match="not valid JSON"):
        decode_fields({b"data": b"{nope"})
    with pytest.raises(EventError, match="not UTF-8"):
        decode_fields({b"data": b"\xff"})
    with pytest.raises(EventError, match="not a JSON object"):
        decode_fields({"data": "[1]"})
    with pytest.raises(ValueError, match="no 'data' field"):
        decode_fields({"x": "1"})


V1_FINAL = {
    "schema": "earshot.event.v1", "type": "turn.final", "event_id": "6f0c:000004", "call_id": "6f0c",
    "sip_call_id": "a84b4c76e66710", "from": "sip:alice@pbx.example", "to": "sip:support@earshot",
    "tags": ["support"], "time": "2026-11-24T15:02:11.482Z", "leg": "caller", "turn": 2, "start_ms": 4180,
    "end_ms": 7020, "text": "Please hold while I try that extension.", "reason": "silence", "partials": 2,
    "language": "en", "confidence": {"avg_logprob": -0.21, "no_speech_prob": 0.01, "compression_ratio": 1.1,
                                     "language_probability": 1.0},
    "asr": {"model": "tiny.en", "audio_ms": 2840, "processing_ms": 140.2, "speculative": True},
    "latency_ms": 512.3,
}


def test_v1_events_read_as_sip_sessions():
    event = Event.from_wire(V1_FINAL)
    assert event.schema == "earshot.event.v1" and event.number == 4
    assert event.source == Source("sip", (("call_id", "a84b4c76e66710"),))
    assert (event.call.from_uri, event.call.to_uri, event.call.tags) == \
        ("sip:alice@pbx.example", "sip:support@earshot", ("support",))
    assert event.payload.latency_ms == 512.3 and event.payload.text.startswith("Please hold")
    assert event.time.isoformat() == "2026-11-24T15:02:11.482000+00:00"
    # written again it is a v2 event with the same fields, plus its source
    wire = event.to_wire()
    assert wire["schema"] == "earshot.event.v2" and wire["source"]["kind"] == "sip"
    assert {k: v for k, v in wire.items() if k not in ("schema", "source")} == \
        {k: v for k, v in V1_FINAL.items() if k != "schema"}
    # v1 had no source: one in a v1 event is ignored, its absence is fine
    started = {**V1_FINAL, "type": "call.started", "event_id": "6f0c:000001", "codec": "PCMU",
               "remote_media": None, "legs": ["caller"]}
    assert Event.from_wire(started).payload.remote_media is None
    with pytest.raises(EventError, match="source: missing"):
        Event.from_wire({**V1_FINAL, "schema": "earshot.event.v2"})
