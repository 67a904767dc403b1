"""The Twilio Media Streams core, without sockets: Twilio's messages in, session actions out.

Messages are built in the shape Twilio's Media Streams documentation publishes
(``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop``).
"""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest.twilio.protocol import (TRACK_LEGS, LegAudio, LegDtmf, MarkReceived, ProtocolError,
                                            StreamStarted, StreamStopped, TwilioStream)
from gateway.media import g711

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA1234567890abcdef1234567890abcdef"
ACCOUNT = "AC1234567890abcdef1234567890abcdef"
CHUNK = 160  # 20 ms of mu-law


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(tracks=("inbound",), params=None, media_format=None) -> str:
    return json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": SID,
        "start": {"accountSid": ACCOUNT, "streamSid": SID, "callSid": CALL, "tracks": list(tracks),
                  "customParameters": params or {},
                  "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    })


def media(track: str, timestamp, ulaw: bytes, chunk: int = 1) -> str:
    return json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": SID,
                       "media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp),
                                 "payload": base64.b64encode(ulaw).decode()}})


def tone(n: int = CHUNK, value: int = 0x10) -> bytes:
    return bytes([value]) * n


def audio(actions) -> list[LegAudio]:
    return [a for a in actions if isinstance(a, LegAudio)]


def errors(actions) -> list[str]:
    return [a.code for a in actions if isinstance(a, ProtocolError)]


def started_stream(tracks=("inbound", "outbound")) -> TwilioStream:
    s = TwilioStream()
    assert s.receive(connected(), 0.0) == []
    actions = s.receive(start(tracks), 0.0)
    assert isinstance(actions[0], StreamStarted)
    return s


def test_start_opens_one_leg_per_track_with_the_sids_and_parameters():
    s = TwilioStream()
    s.receive(connected(), 0.0)
    [started] = s.receive(start(("inbound", "outbound"), {"token": "tok", "tags": "vip"}), 0.0)
    assert started == StreamStarted(SID, CALL, ACCOUNT, ("caller", "agent"), (("token", "tok"), ("tags", "vip")))
    assert started.parameter("token") == "tok"
    assert TRACK_LEGS == {"inbound": "caller", "outbound": "agent"}


def test_connect_stream_sends_inbound_only_and_a_missing_tracks_list_means_inbound():
    [started] = TwilioStream().receive(start(("inbound",)), 0.0)
    assert started.legs == ("caller",)
    msg = json.loads(start())
    del msg["start"]["tracks"]
    [started] = TwilioStream().receive(json.dumps(msg), 0.0)
    assert started.legs == ("caller",)


def test_media_is_decoded_mu_law_on_its_tracks_leg():
    s = started_stream()
    ulaw = bytes(range(256))[:CHUNK]
    [a] = s.receive(media("inbound", 0, ulaw), 0.0)
    assert a == LegAudio("caller", g711.decode(ulaw, "PCMU"), 0)
    [b] = s.receive(media("outbound", 0, ulaw), 0.0)
    assert b.leg == "agent" and len(b.pcm) == 2 * CHUNK


def test_contiguous_timestamps_fill_nothing():
    s = started_stream()
    for i in range(50):
        [a] = s.receive(media("inbound", i * 20, tone()), i * 0.02)
        assert a.filled == 0 and len(a.pcm) == 2 * CHUNK
    assert s.legs["caller"].fed == 50 * CHUNK


def test_a_gap_in_timestamps_is_filled_with_silence_so_offsets_stay_in_stream_time():
    s = started_stream()
    s.receive(media("inbound", 0, tone()), 0.0)
    [a] = s.receive(media("inbound", 100, tone()), 0.1)  # 20..100 ms omitted
    assert a.filled == 80 * 8
    assert a.pcm[:2 * a.filled] == bytes(2 * a.filled)
    assert a.pcm[2 * a.filled:] == g711.decode(tone(), "PCMU")
    assert s.legs["caller"].fed == 120 * 8


def test_the_two_legs_stay_aligned_when_one_track_starts_late():
    s = started_stream()
    for i in range(100):  # 2 s of caller audio
        s.receive(media("inbound", i * 20, tone()), i * 0.02)
    [a] = s.receive(media("outbound", 1500, tone()), 2.0)  # the agent's first audio, 1.5 s in
    assert a.filled == 1500 * 8
    assert s.legs["agent"].fed == (1500 + 20) * 8  # its next sample sits at 1520 ms of stream time


def test_a_timestamp_far_ahead_of_the_wall_clock_fills_at_most_max_ahead_and_re_anchors():
    s = started_stream()
    s.receive(media("inbound", 0, tone()), 0.0)
    actions = s.receive(media("inbound", 3_600_000, tone()), 0.02)  # "an hour later", 20 ms after start
    assert errors(actions) == ["timestamp-ahead"]
    [a] = audio(actions)
    assert a.filled <= 5_000 * 8  # max_ahead_ms, not an hour of silence
    assert len(a.pcm) == 2 * (a.filled + CHUNK)
    # the timeline was re-anchored: the next message is contiguous again
    actions = s.receive(media("inbound", 3_600_020, tone()), 0.04)
    assert errors(actions) == [] and audio(actions)[0].filled == 0


def test_one_gap_is_never_filled_beyond_max_fill_even_late_in_a_long_stream():
    s = TwilioStream(max_fill_ms=1_000)
    s.receive(start(), 0.0)
    s.receive(media("inbound", 0, tone()), 0.0)
    actions = s.receive(media("inbound", 30_000, tone()), 40.0)  # within the wall clock, but 30 s of gap
    assert errors(actions) == ["timestamp-ahead"]
    assert audio(actions)[0].filled == 1_000 * 8


def test_a_timestamp_going_backwards_keeps_the_audio_and_re_anchors():
    s = started_stream()
    s.receive(media("inbound", 0, tone()), 0.0)
    s.receive(media("inbound", 20, tone()), 0.02)
    actions = s.receive(media("inbound", 0, tone()), 0.04)  # a replayed timestamp
    assert errors(actions) == ["timestamp-rewind"]
    assert len(audio(actions)[0].pcm) == 2 * CHUNK  # not dropped
    actions = s.receive(media("inbound", 20, tone()), 0.06)
    assert errors(actions) == [] and audio(actions)[0].filled == 0
    assert s.legs["caller"].fed == 4 * CHUNK


def test_a_bad_or_missing_timestamp_places_the_audio_right_after_the_previous():
    s = started_stream()
    s.receive(media("inbound", 0, tone()), 0.0)
    actions = s.receive(media("inbound", "soon", tone()), 0.02)
    assert errors(actions) == ["invalid-timestamp"] and audio(actions)[0].filled == 0
    msg = json.loads(media("inbound", 0, tone()))
    del msg["media"]["timestamp"]
    actions = s.receive(json.dumps(msg), 0.04)
    assert errors(actions) == [] and audio(actions)[0].filled == 0
    assert s.legs["caller"].fed == 3 * CHUNK


def test_bad_messages_are_reported_and_the_stream_goes_on():
    s = started_stream()
    assert errors(s.receive("{not json", 0.0)) == ["invalid-json"]
    assert errors(s.receive("[1, 2]", 0.0)) == ["invalid-message"]
    assert errors(s.receive(json.dumps({"sequenceNumber": "3"}), 0.0)) == ["invalid-message"]
    assert errors(s.receive(json.dumps({"event": "transcribe-faster"}), 0.0)) == ["unknown-event"]
    assert errors(s.receive(b"\x00\x01", 0.0)) == ["binary-frame"]
    bad = json.loads(media("inbound", 0, tone()))
    bad["media"]["payload"] = "***not base64***"
    assert errors(s.receive(json.dumps(bad), 0.0)) == ["invalid-payload"]
    bad["media"]["payload"] = 12
    assert errors(s.receive(json.dumps(bad), 0.0)) == ["invalid-payload"]
    assert errors(s.receive(media("sideways", 0, tone()), 0.0)) == ["unknown-track"]
    assert errors(s.receive(json.dumps({"event": "media"}), 0.0)) == ["invalid-media"]
    assert errors(s.receive(json.dumps({"event": "start", "start": {}}), 0.0)) == ["duplicate-start"]
    # the stream is still up: good media is still placed, from where the timeline was
    [a] = s.receive(media("inbound", 0, tone()), 0.0)
    assert a.leg == "caller" and a.filled == 0
    assert s.stats.errors["invalid-payload"] == 2 and sum(s.stats.errors.values()) == 10


def test_media_on_a_track_start_did_not_announce_is_dropped():
    s = started_stream(("inbound",))
    assert errors(s.receive(media("outbound", 0, tone()), 0.0)) == ["unknown-track"]
    assert "agent" not in s.legs


def test_media_before_start_is_dropped_and_reported():
    s = TwilioStream()
    assert errors(s.receive(media("inbound", 0, tone()), 0.0)) == ["media-before-start"]
    assert isinstance(s.receive(start(), 0.0)[0], StreamStarted)


def test_an_oversized_media_message_is_dropped():
    s = TwilioStream(max_media_ms=100)
    s.receive(start(), 0.0)
    assert errors(s.receive(media("inbound", 0, tone(8 * 200)), 0.0)) == ["oversized-media"]
    assert audio(s.receive(media("inbound", 0, tone(8 * 100)), 0.0))


def test_a_media_format_other_than_mulaw_8k_mono_is_fatal():
    s = TwilioStream()
    [err] = s.receive(start(media_format={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}), 0.0)
    assert err.code == "unsupported-media-format" and err.fatal
    assert s.started is None


def test_an_invalid_start_is_reported_and_a_later_good_one_is_taken():
    s = TwilioStream()
    assert errors(s.receive(json.dumps({"event": "start"}), 0.0)) == ["invalid-start"]
    msg = json.loads(start())
    msg["start"]["streamSid"] = "x" * 500
    assert errors(s.receive(json.dumps(msg), 0.0)) == ["invalid-start"]
    msg = json.loads(start(("inbound", "both")))
    actions = s.receive(json.dumps(msg), 0.0)
    assert isinstance(actions[0], StreamStarted) and errors(actions) == ["unknown-track"]


def test_dtmf_becomes_a_digit_on_the_caller_leg():
    s = started_stream()
    msg = {"event": "dtmf", "streamSid": SID, "sequenceNumber": "5", "dtmf": {"track": "inbound_track", "digit": "5"}}
    assert s.receive(json.dumps(msg), 0.0) == [LegDtmf("caller", "5")]
    msg["dtmf"]["digit"] = "55"
    assert errors(s.receive(json.dumps(msg), 0.0)) == ["invalid-dtmf"]
    msg["dtmf"]["digit"] = "#"
    assert s.receive(json.dumps(msg), 0.0) == [LegDtmf("caller", "#")]
    outbound_only = started_stream(("outbound",))
    assert outbound_only.receive(json.dumps(msg), 0.0) == [LegDtmf("caller", "#")]


def test_mark_is_accepted():
    s = started_stream()
    msg = {"event": "mark", "streamSid": SID, "sequenceNumber": "4", "mark": {"name": "greeting done"}}
    assert s.receive(json.dumps(msg), 0.0) == [MarkReceived("greeting done")]


def test_stop_ends_the_stream_once():
    s = started_stream()
    stop = json.dumps({"event": "stop", "sequenceNumber": "9", "streamSid": SID,
                       "stop": {"accountSid": ACCOUNT, "callSid": CALL}})
    assert s.receive(stop, 0.0) == [StreamStopped("stop")]
    assert errors(s.receive(media("inbound", 0, tone()), 0.0)) == ["after-stop"]
    assert s.close() == []


def test_a_socket_closed_without_stop_ends_the_stream_as_client_closed():
    s = started_stream()
    s.receive(media("inbound", 0, tone()), 0.0)
    assert s.close() == [StreamStopped("client-closed")]
    assert s.close() == []
    assert TwilioStream().close() == []  # never started: nothing to end


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=4), max_leaves=12)
messages = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=20),
    st.builds(lambda e, body: json.dumps({"event": e, **body}),
              st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop", "other"]),
              st.dictionaries(st.sampled_from(["start", "media", "dtmf", "mark", "stop", "streamSid"]),
                              json_values, max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=12))
def test_no_message_sequence_raises(seq):
    s = started_stream() if len(seq) % 2 else TwilioStream()
    for i, message in enumerate(seq):
        for action in s.receive(message, i * 0.02):
            assert isinstance(action, (StreamStarted, LegAudio, LegDtmf, MarkReceived, StreamStopped, ProtocolError))
            if isinstance(action, LegAudio):
                assert action.leg in s.legs and len(action.pcm) % 2 == 0
    s.close()
