"""Sessions from any source: legs fed telephone or wideband audio, manual commits, observations.

Real Silero VAD and turn detection on a fixture recording; the stub transcriber (placeholder
words) stands in for Whisper, since what is checked here is where turns start and end and what
the session publishes, not the words.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gateway.app import turn_config
from gateway.asr.stub import StubTranscriber
from gateway.config import Settings
from gateway.events import Source
from gateway.media.vad import BatchedVadRunner, SileroVad
from gateway.media.wideband import Decimator, SampleHistory, StreamResampler
from gateway.pipeline import SpeechStarted, SpeechStopped, TurnDropped, TurnEndHeard, TurnPublished
from gateway.session import LegSpec, SessionHost, SessionLimit
from tests.fixtures_data import read_pcm16

FIXTURE = "caller_03_greetings.wav"


@pytest.fixture
async def host():
    settings = Settings()
    runner = BatchedVadRunner(SileroVad())
    task = asyncio.create_task(runner.run())
    published: list = []
    slots = {"free": 4}
    host = SessionHost(settings, vad_runner=runner, transcriber=StubTranscriber(), publish=published.append,
                       capacity=lambda: slots["free"] - len(host.sessions), turn_config=turn_config(settings))
    host.published = published  # type: ignore[attr-defined]
    yield host
    task.cancel()
    runner.close()


async def _stream(feed, pcm: bytes, step: int) -> None:
    """Feed in pieces, letting the VAD runner keep up (faster than real time)."""
    for i in range(0, len(pcm), step):
        feed(pcm[i:i + step])
        await asyncio.sleep(0.001)


def _finals(events, leg=None):
    return [e for e in events if e.type == "turn.final" and (leg is None or e.leg == leg)]


async def test_a_narrowband_and_a_wideband_leg_find_the_same_turns(host):
    pcm, rate = read_pcm16(FIXTURE)
    assert rate == 8000
    observed: list = []
    session = host.open(Source("twilio", (("call_sid", "CA1"), ("stream_sid", "MZ1"))),
                        [LegSpec("caller"), LegSpec("agent", wideband=True)], observer=observed.append)
    up = StreamResampler(8000)
    await _stream(lambda p: (session.feed("caller", p, time.monotonic()),
                             session.feed_wideband("agent", up.feed(p), time.monotonic())), pcm, 320)
    await session.end("stop")
    events = host.published
    assert events[0].type == "call.started" and events[-1].type == "call.ended"
    assert events[0].data["legs"] == ["caller", "agent"]
    wire = events[0].to_dict()
    assert wire["source"] == {"kind": "twilio", "call_sid": "CA1", "stream_sid": "MZ1"}
    assert "sip_call_id" not in wire and "from" not in wire
    narrow, wide = _finals(events, "caller"), _finals(events, "agent")
    assert len(narrow) >= 3
    assert len(wide) == len(narrow)
    for a, b in zip(narrow, wide):  # the VAD hears the decimated copy: bounds agree within a chunk or two
        assert abs(a.data["start_ms"] - b.data["start_ms"]) <= 64
        assert abs(a.data["end_ms"] - b.data["end_ms"]) <= 64
    # observations: every published final was preceded by its speech_started and speech_stopped
    for leg in ("caller", "agent"):
        mine = [o for o in observed if o.leg == leg]
        started = {o.turn for o in mine if isinstance(o, SpeechStarted)}
        stopped = {o.turn for o in mine if isinstance(o, SpeechStopped)}
        finals = {o.turn for o in mine if isinstance(o, TurnPublished) and o.event.type == "turn.final"}
        assert finals and finals <= stopped <= started
    assert events[-1].data["turns"] == len(narrow) + len(wide)
    # the wideband leg's ASR audio is the 16 kHz stream itself, not an 8 kHz round trip
    assert all(e.data["asr"]["audio_ms"] > 0 for e in wide)


async def test_manual_commits_make_turns_and_an_empty_commit_makes_none(host):
    pcm, _ = read_pcm16(FIXTURE)
    observed: list = []
    session = host.open(Source("realtime", (("session_id", "s1"),)), [LegSpec("caller", manual_turns=True)],
                        observer=observed.append)
    session.feed("caller", pcm[:16000], time.monotonic())  # 1 s
    assert session.legs["caller"].uncommitted_ms == 1000
    assert session.commit("caller", time.monotonic()) == 0
    assert session.commit("caller", time.monotonic()) is None  # nothing new
    session.feed("caller", pcm[16000:24000], time.monotonic())
    session.clear("caller")
    assert session.commit("caller", time.monotonic()) is None  # cleared
    session.feed("caller", pcm[24000:40000], time.monotonic())  # left uncommitted: the end commits it
    await session.end("client-closed")
    finals = _finals(host.published)
    assert [(f.data["start_ms"], f.data["end_ms"], f.data["reason"]) for f in finals] == [
        (0, 1000, "commit"), (1500, 2500, "commit")]
    assert not any(isinstance(o, (SpeechStarted, SpeechStopped)) for o in observed)
    assert host.published[-1].data["reason"] == "client-closed"


async def test_clear_drops_the_open_turn(host):
    pcm, _ = read_pcm16(FIXTURE)
    observed: list = []
    session = host.open(Source("realtime"), [LegSpec("caller")], observer=observed.append)
    # feed until the VAD has opened a turn, then clear it
    for i in range(0, len(pcm), 320):
        session.feed("caller", pcm[i:i + 320], time.monotonic())
        await asyncio.sleep(0.001)
        if any(isinstance(o, SpeechStarted) for o in observed):
            break
    await asyncio.sleep(0.1)
    session.clear("caller")
    await session.end("client-closed")
    dropped = [o for o in observed if isinstance(o, TurnDropped)]
    assert [o.reason for o in dropped] == ["cleared"]
    assert not _finals(host.published)


async def test_sessions_share_the_gateway_capacity(host):
    opened = [host.open(Source("rest"), [LegSpec("caller")]) for _ in range(4)]
    with pytest.raises(SessionLimit):
        host.open(Source("rest"), [LegSpec("caller")])
    await opened[0].end("done")
    host.open(Source("rest"), [LegSpec("caller")])
    host.draining = True
    with pytest.raises(SessionLimit) as info:
        host.open(Source("rest"), [LegSpec("caller")])
    assert info.value.reason == "draining"
    await host.close()
    assert not host.sessions


def test_decimator_output_does_not_depend_on_how_the_input_is_cut():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(16_001) * 3000).astype(np.int16)
    whole = Decimator().feed(x)
    d = Decimator()
    pieces = np.concatenate([d.feed(x[i:i + n]) for i, n in _cuts(x.size, rng)])
    assert whole.size == 8001
    assert np.array_equal(whole, pieces)
    # a 1 kHz tone passes, a 6 kHz tone (above the 8 kHz rate's Nyquist) is removed
    t = np.arange(16_000) / 16_000
    low = Decimator().feed((np.sin(2 * np.pi * 1000 * t) * 10_000).astype(np.int16))[200:]
    high = Decimator().feed((np.sin(2 * np.pi * 6000 * t) * 10_000).astype(np.int16))[200:]
    assert np.abs(low).max() > 9000
    assert np.abs(high).max() < 50


def _cuts(total, rng):
    i = 0
    while i < total:
        n = int(rng.integers(1, 700))
        yield i, n
        i += n


def test_sample_history_keeps_the_recent_samples_by_absolute_index():
    h = SampleHistory(keep=1000)
    for start in range(0, 10_000, 100):
        h.append(np.arange(start, start + 100, dtype=np.int16))
    assert h.end == 10_000
    assert np.array_equal(h.slice(9_000, 9_010), np.arange(9_000, 9_010, dtype=np.int16))
    assert not h.slice(0, 10).any()  # trimmed long ago: silence
    tail = h.slice(9_995, 10_005)
    assert np.array_equal(tail[:5], np.arange(9_995, 10_000)) and not tail[5:].any()


def test_stream_resampler_keeps_the_duration_of_24_khz_audio():
    r = StreamResampler(24_000)
    tone = (np.sin(2 * np.pi * 440 * np.arange(48_000) / 24_000) * 8000).astype(np.int16)
    out = np.concatenate([r.feed(tone[i:i + 480].tobytes()) for i in range(0, tone.size, 480)] + [r.flush()])
    assert abs(out.size - 32_000) <= 32
    with pytest.raises(ValueError):
        StreamResampler(4000)


async def test_end_turn_cuts_the_open_turn_after_the_audio_fed_so_far(host):
    pcm, _ = read_pcm16(FIXTURE)
    observed: list = []
    session = host.open(Source("realtime"), [LegSpec("caller")], observer=observed.append)
    # feed until the VAD has opened a turn and 0.4 s more, then ask for the turn to end there
    started_at = None
    for i in range(0, len(pcm), 320):
        session.feed("caller", pcm[i:i + 320], time.monotonic())
        await asyncio.sleep(0.001)
        if started_at is None and any(isinstance(o, SpeechStarted) for o in observed):
            started_at = i
        if started_at is not None and i - started_at >= 6400:
            break
    fed_ms = (i + 320) // 16
    session.end_turn("caller")
    for _ in range(200):
        if any(isinstance(o, TurnEndHeard) for o in observed):
            break
        await asyncio.sleep(0.01)
    heard = [o for o in observed if isinstance(o, TurnEndHeard)]
    assert heard == [TurnEndHeard("caller", 0)]
    stopped = [o for o in observed if isinstance(o, SpeechStopped)]
    assert [o.turn for o in stopped] == [0]
    assert observed.index(stopped[0]) < observed.index(heard[0])
    assert stopped[0].audio_end_ms <= fed_ms
    # nothing open now: a second end_turn ends nothing
    session.end_turn("caller")
    assert [o for o in observed if isinstance(o, TurnEndHeard)][-1] == TurnEndHeard("caller", None)
    await session.end("client-closed")
    finals = _finals(host.published)
    assert finals[0].data["reason"] == "commit"
    assert finals[0].data["end_ms"] <= fed_ms
