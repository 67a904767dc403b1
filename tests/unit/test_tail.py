import io
import os
import subprocess
import sys
import uuid

import redis

from gateway.events import CALL_ENDED, CALL_STARTED, TURN_FINAL, TURN_PARTIAL, CallInfo, EventFactory
from gateway.tail import format_event, tail

REDIS_URL = "redis://127.0.0.1:6379/0"


def publish(stream: str) -> None:
    factory = EventFactory(CallInfo("call-0001", "sip-1", "sip:alice@pbx", "sip:support@earshot", 0.0))
    client = redis.Redis.from_url(REDIS_URL)
    for event in (
        factory.make(CALL_STARTED),
        factory.make(TURN_PARTIAL, {"turn": 1, "partial": 1, "start_ms": 300, "end_ms": 1300, "text": "please hold"},
                     leg="caller"),
        factory.make(TURN_FINAL, {"turn": 1, "start_ms": 300, "end_ms": 2100, "text": "Please hold the line."},
                     leg="caller", speech_end_monotonic=0.0),
        factory.make(CALL_ENDED, {"reason": "bye", "duration_ms": 4200}),
    ):
        client.xadd(stream, event.to_fields())
    client.close()


def test_tail_prints_transcripts_from_the_stream():
    stream = f"t-{uuid.uuid4().hex[:8]}:events"
    publish(stream)
    out = io.StringIO()
    try:
        assert tail(REDIS_URL, stream, from_start=True, count=3, out=out) == 0
    finally:
        redis.Redis.from_url(REDIS_URL).delete(stream)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # partials are skipped unless asked for
    assert "call started" in lines[0] and "sip:alice@pbx -> sip:support@earshot" in lines[0]
    assert "caller#1 Please hold the line." in lines[1] and "ms]" in lines[1]
    assert "call ended" in lines[2] and "bye" in lines[2]


def test_earshot_tail_command_with_partials_as_json():
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    publish(f"{prefix}:events")
    env = dict(os.environ, EARSHOT_STREAM_PREFIX=prefix, EARSHOT_REDIS_URL=REDIS_URL)
    try:
        done = subprocess.run([sys.executable, "-m", "gateway", "tail", "--from-start", "--partials", "--json",
                               "-n", "4"], capture_output=True, text=True, env=env, timeout=30)
    finally:
        redis.Redis.from_url(REDIS_URL).delete(f"{prefix}:events")
    assert done.returncode == 0, done.stderr
    assert [line.count('"type"') for line in done.stdout.splitlines()] == [1, 1, 1, 1]
    assert '"turn.partial"' in done.stdout


def test_unreadable_redis_is_reported_with_exit_code_1():
    out = io.StringIO()
    assert tail("redis://127.0.0.1:1/0", "x", count=1, out=out) == 1


def test_format_skips_unknown_types():
    assert format_event({"type": "something.else"}) is None


def test_format_shows_the_source_of_non_sip_sessions_and_escapes_control_characters():
    from gateway.events import DTMF, Source

    twilio = EventFactory(CallInfo("call-0002", source=Source("twilio", (("call_sid", "CA5f"),
                                                                         ("stream_sid", "MZ18"),
                                                                         ("account_sid", "")))))
    assert format_event(twilio.make(CALL_STARTED)).endswith("call started  twilio call_sid=CA5f stream_sid=MZ18")
    final = twilio.make(TURN_FINAL, {"turn": 1, "start_ms": 0, "end_ms": 900, "text": "red \x1b[31malert\x07\u2028"},
                        leg="agent")
    line = format_event(final)
    assert line.endswith("agent#1 red \\x1b[31malert\\x07\\u2028") and "\x1b" not in line
    failed = twilio.make(TURN_FINAL, {"turn": 2, "start_ms": 0, "end_ms": 900, "error": "asr-timeout"}, leg="agent")
    assert format_event(failed).endswith("agent#2 [asr-timeout]")
    assert format_event(twilio.make(DTMF, {"digit": "5"}, leg="caller")).endswith("dtmf 5")
    sip = EventFactory(CallInfo("call-0003", "s", "sip:\x1b]0;owned\x07@pbx", "sip:b@y", 0.0))
    assert "sip:\\x1b]0;owned\\x07@pbx -> sip:b@y" in format_event(sip.make(CALL_STARTED))
    # a v1 event (no source) and an invalid one
    v1 = sip.make(CALL_ENDED, {"reason": "bye", "duration_ms": 1500}).to_wire()
    del v1["source"]
    v1["schema"] = "earshot.event.v1"
    assert format_event(v1).endswith("call ended    (bye, 1.5 s)")
    assert format_event({**v1, "duration_ms": "long"}) is None


def test_tail_escapes_bidi_marks_and_bad_bytes_an_older_producer_published():
    """A From written raw into the stream (not cleaned at ingress: an older gateway) reaches the
    terminal of `earshot tail` escaped: no ESC, no bidi override, no lone surrogate to crash print()."""
    stream = f"earshot-test-tail-raw-{uuid.uuid4().hex}"
    factory = EventFactory(CallInfo("call-0004", "s\udcff", "sip:\u202eevil\x1b[2J\udcff@pbx", "sip:b@y", 0.0))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.xadd(stream, factory.make(CALL_STARTED).to_fields())
        out = io.StringIO()
        assert tail(REDIS_URL, stream, from_start=True, count=1, block_ms=100, out=out, idle_exit_s=2) == 0
    finally:
        client.delete(stream)
        client.close()
    line = out.getvalue()
    assert "sip:\\u202eevil\\x1b[2J\\udcff@pbx -> sip:b@y" in line
    assert not any(c in line for c in "\x1b\u202e\udcff")
    line.encode("utf-8")
