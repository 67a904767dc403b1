"""The Realtime transcription protocol core, without sockets: client JSON and leg observations
in, server events and session actions out (gateway/ingest/realtime/protocol.py)."""

from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import pytest

from gateway.events import TURN_FINAL, TURN_PARTIAL, CallInfo, EventFactory, Source
from gateway.ingest.realtime.protocol import (
    MAX_APPEND_BYTES,
    SEMANTIC_EAGERNESS,
    Clear,
    Commit,
    EndSession,
    EndTurn,
    FeedNarrow,
    FeedWideband,
    OpenSession,
    RealtimeConnection,
    ServerEvent,
    TurnDetection,
    session_turn_config,
)
from gateway.media import g711
from gateway.media.turn import TurnConfig
from gateway.pipeline import SpeechStarted, SpeechStopped, TurnDropped, TurnEndHeard, TurnPublished

#: the gateway's defaults (config.py): a 100 ms speculative final and tail
BASE = TurnConfig(silence_ms=500, pad_before_ms=300, pad_after_ms=100, speculative_ms=100)
NOW = 1000.0  # fake monotonic time handed to receive()
WALL = 1_700_000_000.0  # fake wall clock for expires_at


def connection(**kwargs) -> RealtimeConnection:
    counter = itertools.count(1)
    kwargs.setdefault("base_turn", BASE)
    return RealtimeConnection(session_id="sess_test", ids=lambda prefix: f"{prefix}_{next(counter)}",
                              clock=lambda: WALL, model_name="tiny.en", **kwargs)


def send(conn: RealtimeConnection, event: dict | str, now: float = NOW) -> list:
    return conn.receive(event if isinstance(event, str) else json.dumps(event), now)


def events(outputs: list) -> list[dict]:
    return [o.to_wire() for o in outputs if isinstance(o, ServerEvent)]


def actions(outputs: list) -> list:
    return [o for o in outputs if not isinstance(o, ServerEvent)]


def only_error(outputs: list) -> dict:
    assert actions(outputs) == []
    (event,) = events(outputs)
    assert event["type"] == "error", event
    return event["error"]


def append(audio: bytes) -> dict:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()}


def ga_update(**audio_input) -> dict:
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_input}}}


FACTORY = EventFactory(CallInfo(call_id="call-1", source=Source("realtime", (("session_id", "sess_test"),))))


def partial(turn: int, text: str) -> TurnPublished:
    return TurnPublished("caller", turn, FACTORY.make(TURN_PARTIAL, {
        "turn": turn + 1, "partial": 1, "start_ms": 0, "end_ms": 1000, "text": text}, leg="caller"))


def final(turn: int, text: str, start_ms: int = 200, end_ms: int = 2200, error: str | None = None) -> TurnPublished:
    data = {"turn": turn + 1, "start_ms": start_ms, "end_ms": end_ms, "text": text, "reason": "silence"}
    if error:
        data["error"] = error
    return TurnPublished("caller", turn, FACTORY.make(TURN_FINAL, data, leg="caller"))


def pcm24(ms: int) -> bytes:
    return (np.sin(np.arange(24 * ms) / 7.0) * 8000).astype("<i2").tobytes()


# -- session.created and the dialects ------------------------------------------------------

def test_ga_session_created_describes_the_gateway_defaults():
    (created,) = connection().start()
    wire = created.to_wire()
    assert wire["type"] == "session.created" and wire["event_id"] == "event_1"
    session = wire["session"]
    assert session["type"] == "transcription" and session["id"] == "sess_test"
    assert session["expires_at"] == int(WALL) + 1800
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    assert session["audio"]["input"]["transcription"]["model"] == "tiny.en"
    assert json.loads(created.to_json()) == wire


def test_beta_header_gets_the_legacy_session_shape():
    conn = connection(beta=True)
    (created,) = conn.start()
    assert created.type == "transcription_session.created"
    assert created.fields["session"]["input_audio_format"] == "pcm16"
    assert created.fields["session"]["turn_detection"]["type"] == "server_vad"
    assert conn.flavor == "beta"


def test_together_query_string_dialect():
    conn = connection(beta=True, query={"model": "openai/whisper-large-v3", "input_audio_format": "pcm_s16le_16000",
                                        "threshold": "0.3", "min_silence_duration_ms": "400",
                                        "speech_pad_ms": "200", "min_speech_duration_ms": "150",
                                        "max_speech_duration_s": "5.0"})
    (created,) = conn.start()
    assert conn.flavor == "together" and created.type == "session.created"
    session = created.fields["session"]
    assert session["model"] == "openai/whisper-large-v3" and session["input_audio_format"] == "pcm_s16le_16000"
    assert session["turn_detection"] == {"type": "server_vad", "threshold": 0.3, "prefix_padding_ms": 200,
                                         "silence_duration_ms": 400}
    (opened, feed) = send(conn, append(bytes(3200)))
    assert isinstance(opened, OpenSession) and opened.wideband and not opened.manual_turns
    assert (opened.turn_config.threshold, opened.turn_config.silence_ms, opened.turn_config.pad_before_ms,
            opened.turn_config.min_speech_ms, opened.turn_config.max_turn_s) == (0.3, 400, 200, 150, 5.0)
    assert isinstance(feed, FeedWideband) and feed.samples.size == 1600  # 16 kHz taken as it is


def test_query_turn_detection_none_means_manual_commits():
    conn = connection(query={"input_audio_format": "g711_ulaw", "turn_detection": "none", "language": "en"})
    conn.start()
    (opened, _feed) = send(conn, append(b"\xff" * 800))
    assert opened.manual_turns and not opened.wideband and opened.language == "en"


def test_bad_query_parameters_are_reported_after_session_created_and_skipped():
    conn = connection(query={"input_audio_format": "mp3", "threshold": "loud", "min_silence_duration_ms": "-5"})
    created, *errors = conn.start()
    assert created.type == "session.created"
    assert [(e.fields["error"]["code"], e.fields["error"]["param"]) for e in errors] == [
        ("invalid_value", "input_audio_format"), ("invalid_value", "threshold"),
        ("invalid_value", "min_silence_duration_ms")]
    assert conn.config.format == "audio/pcm"
    assert conn.config.turn_detection.silence_duration_ms is None  # the gateway's own silence stays


# -- session.update ------------------------------------------------------------------------

def test_ga_session_update_maps_server_vad_onto_the_turn_config():
    conn = connection()
    conn.start()
    out = send(conn, ga_update(format={"type": "audio/pcm", "rate": 24000},
                               transcription={"model": "gpt-4o-transcribe", "language": "en-US", "prompt": "billing"},
                               turn_detection={"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                               "silence_duration_ms": 700},
                               noise_reduction={"type": "near_field"}))
    (updated,) = events(out)
    assert updated["type"] == "session.updated"
    audio_in = updated["session"]["audio"]["input"]
    assert audio_in["transcription"] == {"model": "gpt-4o-transcribe", "language": "en", "prompt": "billing"}
    assert audio_in["turn_detection"] == {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                          "silence_duration_ms": 700}
    assert audio_in["noise_reduction"] == {"type": "near_field"}
    (opened, _feed) = send(conn, append(pcm24(100)))
    cfg = opened.turn_config
    assert (cfg.threshold, cfg.pad_before_ms, cfg.silence_ms) == (0.6, 200, 700)
    assert (cfg.speculative_ms, cfg.pad_after_ms, cfg.max_turn_s) == (100, 100, BASE.max_turn_s)
    assert opened.language == "en"


def test_short_silence_clamps_the_speculative_final_and_the_tail():
    for asked, silence in ((0, 64), (50, 64), (80, 80), (20_000, 10_000)):
        cfg = session_turn_config(TurnDetection(silence_duration_ms=asked), BASE)
        assert cfg.silence_ms == silence
        assert cfg.pad_after_ms <= cfg.speculative_ms < cfg.silence_ms  # TurnConfig's own rule held
    # a threshold below the gateway's end-of-speech hysteresis drops the gateway's neg_threshold
    cfg = session_turn_config(TurnDetection(threshold=0.2), TurnConfig(threshold=0.5, neg_threshold=0.4))
    assert cfg.threshold == 0.2 and cfg.neg_threshold is None
    assert session_turn_config(TurnDetection(threshold=0.0), BASE).threshold == 0.01


@pytest.mark.parametrize(("eagerness", "expected"), [("low", (0.7, 2000)), ("medium", (0.5, 1500)),
                                                     ("auto", (0.5, 1500)), ("high", (0.3, 800))])
def test_semantic_vad_eagerness_picks_the_semantic_policy(eagerness, expected):
    conn = connection()
    conn.start()
    (updated,) = events(send(conn, ga_update(turn_detection={"type": "semantic_vad", "eagerness": eagerness})))
    assert updated["session"]["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": eagerness}
    (opened, _feed) = send(conn, append(pcm24(50)))
    cfg = opened.turn_config
    assert cfg.policy == "semantic"
    assert (cfg.semantic_threshold, cfg.semantic_max_silence_ms) == expected == SEMANTIC_EAGERNESS[eagerness]
    assert cfg.semantic_min_silence_ms == BASE.semantic_min_silence_ms  # the gateway's own pause to ask at
    # the VAD and turn bounds otherwise stay the gateway's
    assert (cfg.threshold, cfg.pad_before_ms, cfg.max_turn_s) == (BASE.threshold, BASE.pad_before_ms, BASE.max_turn_s)


def test_semantic_vad_eagerness_orders_patience():
    low, medium, high = (SEMANTIC_EAGERNESS[e] for e in ("low", "medium", "high"))
    assert low[0] > medium[0] > high[0] and low[1] > medium[1] > high[1]


def test_server_vad_is_the_silence_policy_and_semantic_vad_fits_a_gateways_settings():
    semantic_base = TurnConfig(policy="semantic", pad_after_ms=150, speculative_ms=200,
                               semantic_min_silence_ms=900, semantic_max_silence_ms=2500)
    assert session_turn_config(TurnDetection(), semantic_base).policy == "silence"
    assert session_turn_config(TurnDetection(silence_duration_ms=300), semantic_base).silence_ms == 300
    # the gateway asks after 900 ms of pause, longer than high eagerness waits at most: asked sooner
    cfg = session_turn_config(TurnDetection("semantic_vad", eagerness="high"), semantic_base)
    assert (cfg.semantic_min_silence_ms, cfg.semantic_max_silence_ms) == (799, 800)
    assert cfg.pad_after_ms <= cfg.semantic_min_silence_ms  # TurnConfig's own rule held
    short = TurnConfig(pad_after_ms=150, speculative_ms=150, silence_ms=200)
    cfg = session_turn_config(TurnDetection("semantic_vad", eagerness="low"), short)
    assert cfg.policy == "semantic" and cfg.pad_after_ms == 150 <= cfg.semantic_min_silence_ms


def test_turn_detection_null_is_manual_and_the_update_is_partial():
    conn = connection()
    conn.start()
    send(conn, ga_update(transcription={"language": "de"}))
    (updated,) = events(send(conn, ga_update(turn_detection=None)))
    audio_in = updated["session"]["audio"]["input"]
    assert audio_in["turn_detection"] is None
    assert audio_in["transcription"]["language"] == "de"  # kept: only what an update names changes
    (opened, _feed) = send(conn, append(pcm24(50)))
    assert opened.manual_turns and opened.language == "de"


def test_beta_transcription_session_update():
    conn = connection(beta=True)
    conn.start()
    out = send(conn, {"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_alaw", "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}, "input_audio_noise_reduction": None}})
    (updated,) = events(out)
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_alaw"
    assert updated["session"]["turn_detection"]["silence_duration_ms"] == 300
    # Together's clients name the same event "transcription_session.updated"
    (again,) = events(send(conn, {"type": "transcription_session.updated", "session": {"turn_detection": None}}))
    assert again["type"] == "transcription_session.updated" and again["session"]["turn_detection"] is None


def test_session_update_with_legacy_fields_replies_in_the_legacy_shape():
    conn = connection()
    conn.start()
    (updated,) = events(send(conn, {"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}))
    assert updated["type"] == "session.updated" and updated["session"]["input_audio_format"] == "g711_ulaw"


# -- bad input: an error naming it, and the session goes on ------------------------------

BAD_EVENTS = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_event", None),
    ({"audio": "AAAA"}, "missing_required_parameter", "type"),
    ({"type": "input_audio_buffer.frobnicate"}, "invalid_value", "type"),
    ({"type": "response.create"}, "invalid_value", "type"),
    ({"type": "session.update"}, "missing_required_parameter", "session"),
    ({"type": "session.update", "session": "pcm"}, "invalid_type", "session"),
    ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
    (ga_update(format={"type": "audio/pcm", "rate": 44100}), "invalid_value", "session.audio.input.format.rate"),
    (ga_update(format={"type": "audio/opus"}), "invalid_value", "session.audio.input.format.type"),
    (ga_update(format="pcm16"), "invalid_type", "session.audio.input.format"),
    (ga_update(turn_detection={"type": "push_to_talk"}), "invalid_value", "session.audio.input.turn_detection.type"),
    (ga_update(turn_detection={"type": "server_vad", "threshold": 1.5}), "invalid_value",
     "session.audio.input.turn_detection.threshold"),
    (ga_update(turn_detection={"type": "server_vad", "silence_duration_ms": "500"}), "invalid_value",
     "session.audio.input.turn_detection.silence_duration_ms"),
    (ga_update(turn_detection={"type": "server_vad", "prefix_padding_ms": True}), "invalid_value",
     "session.audio.input.turn_detection.prefix_padding_ms"),
    (ga_update(turn_detection={"type": "semantic_vad", "eagerness": "eager"}), "invalid_value",
     "session.audio.input.turn_detection.eagerness"),
    (ga_update(transcription={"language": "English please"}), "invalid_value",
     "session.audio.input.transcription.language"),
    (ga_update(transcription={"model": 7}), "invalid_type", "session.audio.input.transcription.model"),
    (ga_update(noise_reduction={"type": "studio"}), "invalid_value", "session.audio.input.noise_reduction.type"),
    ({"type": "transcription_session.update", "session": {"input_audio_format": "pcm24"}}, "invalid_value",
     "session.input_audio_format"),
    ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
    ({"type": "input_audio_buffer.append", "audio": [1, 2]}, "invalid_type", "audio"),
    ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_base64", "audio"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", None),
]


@pytest.mark.parametrize(("event", "code", "param"), BAD_EVENTS)
def test_bad_input_gets_a_specific_error_and_the_session_stays_up(event, code, param):
    conn = connection()
    conn.start()
    before = conn.config
    error = only_error(send(conn, event))
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert error["message"]
    assert conn.config == before  # a rejected update changes nothing
    out = send(conn, append(pcm24(40)))  # and the session goes on
    assert [type(a) for a in actions(out)] == [OpenSession, FeedWideband]


def test_error_names_the_unknown_event_and_echoes_its_event_id():
    conn = connection()
    conn.start()
    error = only_error(send(conn, {"type": "conversation.frobnicate", "event_id": "evt_42"}))
    assert "conversation.frobnicate" in error["message"] and error["event_id"] == "evt_42"


def test_binary_message_is_an_error():
    conn = connection()
    conn.start()
    assert only_error(conn.receive(b"\x00\x01", NOW))["code"] == "invalid_event"


def test_oversized_append_is_refused_before_decoding():
    conn = connection()
    conn.start()
    error = only_error(send(conn, {"type": "input_audio_buffer.append", "audio": "A" * (MAX_APPEND_BYTES + 4)}))
    assert error["code"] == "input_audio_buffer_append_too_large" and error["param"] == "audio"
    assert actions(send(conn, {"type": "input_audio_buffer.append", "audio": "AAAA" * 1000}))  # a normal one works


# -- audio -----------------------------------------------------------------------------------

def test_pcm24_is_resampled_to_16k_and_opens_the_session_once():
    conn = connection()
    conn.start()
    first = send(conn, append(pcm24(100)), now=5.0)
    assert [type(a) for a in first] == [OpenSession, FeedWideband]
    second = send(conn, append(pcm24(100)), now=5.1)
    assert [type(a) for a in second] == [FeedWideband]
    assert second[0].now == 5.1 and second[0].samples.dtype == np.int16
    total = first[1].samples.size + second[0].samples.size
    assert 3000 <= total <= 3200  # 200 ms at 16 kHz, less the resampler's delay


def test_odd_pcm_bytes_wait_for_their_pair():
    conn = connection(query={"input_audio_format": "pcm_s16le_16000"})
    conn.start()
    samples = np.arange(1, 101, dtype="<i2").tobytes()
    out1 = send(conn, append(samples[:51]))
    out2 = send(conn, append(samples[51:]))
    got = np.concatenate([a.samples for a in actions(out1) + actions(out2) if isinstance(a, FeedWideband)])
    assert got.tolist() == list(range(1, 101))


@pytest.mark.parametrize(("name", "codec"), [("g711_ulaw", "PCMU"), ("g711_alaw", "PCMA")])
def test_g711_is_decoded_onto_a_narrowband_leg(name, codec):
    conn = connection(beta=True)
    conn.start()
    send(conn, {"type": "transcription_session.update", "session": {"input_audio_format": name}})
    payload = g711.encode((np.sin(np.arange(800) / 5.0) * 9000).astype("<i2").tobytes(), codec)
    opened, feed = send(conn, append(payload))
    assert isinstance(opened, OpenSession) and not opened.wideband
    assert isinstance(feed, FeedNarrow) and feed.pcm == g711.decode(payload, codec)


def test_ga_pcmu_and_pcma_formats():
    for kind in ("audio/pcmu", "audio/pcma"):
        conn = connection()
        conn.start()
        (updated,) = events(send(conn, ga_update(format={"type": kind})))
        assert updated["session"]["audio"]["input"]["format"] == {"type": kind}
        assert isinstance(send(conn, append(b"\xd5" * 160))[1], FeedNarrow)


def test_16k_pcm_in_the_ga_shape_is_taken_as_it_is():
    conn = connection()
    conn.start()
    (updated,) = events(send(conn, ga_update(format={"type": "audio/pcm", "rate": 16000})))
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
    opened, feed = send(conn, append(bytes(640)))
    assert opened.wideband and feed.samples.size == 320


def test_empty_append_does_nothing():
    conn = connection()
    conn.start()
    assert send(conn, {"type": "input_audio_buffer.append", "audio": ""}) == []


# -- server VAD: observations become OpenAI events -----------------------------------------

def vad_session() -> RealtimeConnection:
    conn = connection()
    conn.start()
    send(conn, append(pcm24(1000)))
    return conn


def test_a_turn_from_speech_started_to_completed():
    conn = vad_session()
    (started,) = [e.to_wire() for e in conn.observe(SpeechStarted("caller", 0, 200), 0)]
    assert started["type"] == "input_audio_buffer.speech_started" and started["audio_start_ms"] == 200
    item = started["item_id"]
    (d1,) = [e.to_wire() for e in conn.observe(partial(0, "Please hold"), 0)]
    assert (d1["type"], d1["item_id"], d1["delta"], d1["content_index"]) == (
        "conversation.item.input_audio_transcription.delta", item, "Please hold", 0)
    (d2,) = [e.to_wire() for e in conn.observe(partial(0, "Please hold while we"), 0)]
    assert d2["delta"] == " while we"
    assert conn.observe(partial(0, "Please, hold while"), 0) == []  # a revision: nothing to add
    stopped, committed = [e.to_wire() for e in conn.observe(SpeechStopped("caller", 0, 2300), 0)]
    assert (stopped["type"], stopped["audio_end_ms"], stopped["item_id"]) == (
        "input_audio_buffer.speech_stopped", 2300, item)
    assert (committed["type"], committed["item_id"], committed["previous_item_id"]) == (
        "input_audio_buffer.committed", item, None)
    delta, completed = [e.to_wire() for e in conn.observe(final(0, "Please hold while we try."), 0)]
    assert delta["delta"] == " try."
    assert completed == {"type": "conversation.item.input_audio_transcription.completed",
                         "event_id": completed["event_id"], "item_id": item, "content_index": 0,
                         "transcript": "Please hold while we try.", "usage": {"type": "duration", "seconds": 2.0}}
    assert conn.observe(final(0, "again"), 0) == []  # one completion per item


def test_a_final_that_revises_the_partials_sends_no_delta_and_the_whole_transcript():
    conn = vad_session()
    conn.observe(SpeechStarted("caller", 0, 0), 0)
    conn.observe(partial(0, "Your call can up"), 0)
    conn.observe(SpeechStopped("caller", 0, 2000), 0)
    (completed,) = [e.to_wire() for e in conn.observe(final(0, "Your call cannot be completed."), 0)]
    assert completed["transcript"] == "Your call cannot be completed."


def test_items_chain_through_previous_item_id():
    conn = vad_session()
    ids = []
    for turn in range(3):
        ids.append(conn.observe(SpeechStarted("caller", turn, turn * 3000), 0)[0].fields["item_id"])
        committed = conn.observe(SpeechStopped("caller", turn, turn * 3000 + 2000), 0)[1].fields
        assert committed["previous_item_id"] == (ids[turn - 1] if turn else None)
    assert len(set(ids)) == 3


def test_failed_transcription():
    conn = vad_session()
    conn.observe(SpeechStarted("caller", 0, 0), 0)
    conn.observe(SpeechStopped("caller", 0, 2000), 0)
    (failed,) = [e.to_wire() for e in conn.observe(final(0, "", error="asr-timeout"), 0)]
    assert failed["type"] == "conversation.item.input_audio_transcription.failed"
    assert failed["error"]["code"] == "asr-timeout" and failed["content_index"] == 0


def test_too_short_a_burst_completes_empty_as_openai_does():
    conn = vad_session()
    item = conn.observe(SpeechStarted("caller", 0, 100), 0)[0].fields["item_id"]
    out = [e.to_wire() for e in conn.observe(TurnDropped("caller", 0, "too-short"), 0)]
    assert [e["type"] for e in out] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                        "conversation.item.input_audio_transcription.completed"]
    assert all(e["item_id"] == item for e in out) and out[-1]["transcript"] == ""
    assert out[0]["audio_end_ms"] == 1000  # as far as the audio went


def test_no_speech_after_commit_completes_empty():
    conn = vad_session()
    conn.observe(SpeechStarted("caller", 0, 100), 0)
    conn.observe(SpeechStopped("caller", 0, 900), 0)
    (completed,) = [e.to_wire() for e in conn.observe(TurnDropped("caller", 0, "no-speech"), 0)]
    assert completed["transcript"] == "" and completed["type"].endswith(".completed")


def test_clear_drops_the_open_turn_quietly():
    conn = vad_session()
    conn.observe(SpeechStarted("caller", 0, 100), 0)
    out = send(conn, {"type": "input_audio_buffer.clear"})
    assert actions(out) == [Clear(0)]
    assert [e["type"] for e in events(out)] == ["input_audio_buffer.cleared"]
    assert conn.observe(TurnDropped("caller", 0, "cleared"), 0) == []
    assert conn.observe(final(0, "late"), 0) == []


def test_clear_before_any_audio_just_confirms():
    conn = connection()
    conn.start()
    out = send(conn, {"type": "input_audio_buffer.clear"})
    assert actions(out) == [] and events(out)[0]["type"] == "input_audio_buffer.cleared"


def test_together_deltas_carry_the_whole_text():
    conn = connection(query={"input_audio_format": "pcm_s16le_16000"})
    conn.start()
    send(conn, append(bytes(3200)))
    conn.observe(SpeechStarted("caller", 0, 0), 0)
    assert conn.observe(partial(0, "The quick"), 0)[0].fields["delta"] == "The quick"
    assert conn.observe(partial(0, "The quack brown"), 0)[0].fields["delta"] == "The quack brown"
    conn.observe(SpeechStopped("caller", 0, 2000), 0)
    delta, completed = conn.observe(final(0, "The quick brown fox"), 0)
    assert delta.fields["delta"] == completed.fields["transcript"] == "The quick brown fox"


def test_a_final_the_leg_ended_by_itself_is_committed_first():
    conn = vad_session()
    out = [e.to_wire() for e in conn.observe(final(4, "split at max length"), 0)]
    assert [e["type"] for e in out] == ["input_audio_buffer.committed",
                                        "conversation.item.input_audio_transcription.delta",
                                        "conversation.item.input_audio_transcription.completed"]


# -- manual turns ----------------------------------------------------------------------------

def manual_session() -> RealtimeConnection:
    conn = connection()
    conn.start()
    send(conn, ga_update(turn_detection=None))
    return conn


def test_manual_commit_round_trip():
    conn = manual_session()
    send(conn, append(pcm24(500)), now=3.0)
    out = send(conn, {"type": "input_audio_buffer.commit"}, now=3.5)
    assert out == [Commit(0, 3.5)]
    (committed,) = [e.to_wire() for e in conn.committed(0, 0)]
    assert committed["type"] == "input_audio_buffer.committed" and committed["previous_item_id"] is None
    delta, completed = [e.to_wire() for e in conn.observe(final(0, "One moment, please."), 0)]
    assert delta["delta"] == completed["transcript"] == "One moment, please."
    assert delta["item_id"] == completed["item_id"] == committed["item_id"]
    # the buffer was emptied by the commit
    assert only_error(send(conn, {"type": "input_audio_buffer.commit"}))["code"] == "input_audio_buffer_commit_empty"


def test_manual_commit_needs_100_ms():
    conn = manual_session()
    send(conn, append(pcm24(60)))
    error = only_error(send(conn, {"type": "input_audio_buffer.commit"}))
    assert error["code"] == "input_audio_buffer_commit_empty" and "100ms" in error["message"]
    send(conn, append(pcm24(60)))
    assert send(conn, {"type": "input_audio_buffer.commit"}) == [Commit(0, NOW)]


def test_manual_clear_empties_the_buffer():
    conn = manual_session()
    send(conn, append(pcm24(500)))
    assert actions(send(conn, {"type": "input_audio_buffer.clear"})) == [Clear(0)]
    assert only_error(send(conn, {"type": "input_audio_buffer.commit"}))["code"] == "input_audio_buffer_commit_empty"


def test_commit_the_session_refused_is_an_error():
    conn = manual_session()
    send(conn, append(pcm24(500)))
    send(conn, {"type": "input_audio_buffer.commit"})
    (error,) = conn.committed(0, None)
    assert error.fields["error"]["code"] == "input_audio_buffer_commit_empty"


# -- generations: reconfiguration and server-VAD commits ------------------------------------

def test_vad_commit_ends_the_open_turn_in_the_same_session():
    conn = vad_session()
    item = conn.observe(SpeechStarted("caller", 0, 300), 0)[0].fields["item_id"]
    assert send(conn, {"type": "input_audio_buffer.commit"}) == [EndTurn(0)]
    assert conn.generation == 0  # the Earshot session goes on
    # the leg ends the turn: stopped + committed, the final completes the same item
    stopped = conn.observe(SpeechStopped("caller", 0, 1000), 0)
    assert [e.type for e in stopped] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    assert stopped[0].fields["item_id"] == item
    assert conn.observe(TurnEndHeard("caller", 0), 0) == []
    assert conn.observe(final(0, "flushed"), 0)[-1].fields["transcript"] == "flushed"
    # nothing appended since: a second commit is an error
    error = only_error(send(conn, {"type": "input_audio_buffer.commit"}))
    assert error["code"] == "input_audio_buffer_commit_empty"
    # more audio, then a commit while no turn is open: an item with an empty transcript
    assert [type(a) for a in send(conn, append(pcm24(100)))] == [FeedWideband]
    assert send(conn, {"type": "input_audio_buffer.commit"}) == [EndTurn(0)]
    out = [e.to_wire() for e in conn.observe(TurnEndHeard("caller", None), 0)]
    assert [e["type"] for e in out] == ["input_audio_buffer.committed",
                                        "conversation.item.input_audio_transcription.completed"]
    assert out[0]["previous_item_id"] == item and out[1]["transcript"] == ""
    assert out[0]["item_id"] == out[1]["item_id"] != item


def test_update_that_changes_the_media_after_audio_starts_a_new_generation():
    conn = vad_session()
    out = send(conn, ga_update(turn_detection={"type": "server_vad", "silence_duration_ms": 900}))
    assert [type(a) for a in actions(out)] == [FeedWideband, EndSession]
    assert actions(out)[-1].reason == "session-update"
    assert events(out)[-1]["type"] == "session.updated"
    opened = send(conn, append(pcm24(50)))[0]
    assert opened.generation == 1 and opened.turn_config.silence_ms == 900


def test_update_that_changes_nothing_for_the_media_keeps_the_session():
    conn = vad_session()
    out = send(conn, ga_update(transcription={"model": "whisper-1", "prompt": "x"}, noise_reduction=None))
    assert actions(out) == []
    assert [type(a) for a in send(conn, append(pcm24(50)))] == [FeedWideband]


def test_close_ends_the_open_session_and_silences_the_connection():
    conn = vad_session()
    conn.observe(SpeechStarted("caller", 0, 0), 0)
    out = conn.close(NOW)
    assert out[-1] == EndSession(0, "client-closed")
    assert conn.observe(final(0, "said before leaving"), 0) == []
    assert conn.receive(json.dumps(append(pcm24(10))), NOW) == []


def test_close_without_audio_has_nothing_to_end():
    conn = connection()
    conn.start()
    assert conn.close(NOW) == []


def test_every_event_id_is_unique():
    conn = vad_session()
    out = list(conn.start())
    for turn in range(5):
        out += conn.observe(SpeechStarted("caller", turn, turn * 100), 0)
        out += conn.observe(partial(turn, "a"), 0)
        out += conn.observe(SpeechStopped("caller", turn, turn * 100 + 50), 0)
        out += conn.observe(final(turn, "a b"), 0)
    out += [o for o in send(conn, "nope") if isinstance(o, ServerEvent)]
    ids = [e.event_id for e in out]
    assert len(ids) == len(set(ids)) == 1 + 5 * 6 + 1
