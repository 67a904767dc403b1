"""The official ``openai`` SDK, unchanged, against ``earshot run``'s ``/v1/realtime``.

One gateway process serves the module (api_auth on, a real API token made with
``earshot users``); each test opens its own Realtime transcription session and
streams fixture speech at the speed it was spoken. What the SDK receives is
checked against the fixtures' reference texts, and what the gateway published
to Redis against what the client was told.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
from collections.abc import Iterator

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import GatewayProcess, add_user, new_token, read_events, running_gateway
from tests.fixtures_data import get_entry, read_g711, read_pcm16

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WER_BOUND = 0.25  # tiny.en on telephone-band prompts
FIRST = "prompt_pls-hold-while-try.wav"
SECOND = "prompt_cannot-complete-as-dialed.wav"
SHORT = "prompt_one-moment-please.wav"
SESSIONS_PER_TOKEN = 2


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('realtime') / 'earshot.db'}"
    add_user(url, "rt-user", "a long realtime password")
    token = new_token(url, "rt-user", "realtime e2e")
    with running_gateway({"EARSHOT_DATABASE_URL": url, "EARSHOT_API_AUTH": "true",
                          "EARSHOT_API_SESSIONS_PER_TOKEN": str(SESSIONS_PER_TOKEN)}, check_exit=False) as gw:
        yield gw, token


def client_for(gateway: tuple[GatewayProcess, str], token: str | None = None, *,
               beta: bool = False) -> "openai.AsyncOpenAI":
    """The GA client needs only ``base_url`` (it swaps http for ws); the beta one always
    dials wss:// unless ``websocket_base_url`` says otherwise."""
    gw, good = gateway
    base = f"127.0.0.1:{gw.http_port}/v1"
    return openai.AsyncOpenAI(api_key=token or good, base_url=f"http://{base}",
                              websocket_base_url=f"ws://{base}" if beta else None)


def pcm24k(name: str, silence_before_s: float = 0.0, silence_after_s: float = 0.0) -> bytes:
    pcm, rate = read_pcm16(name)
    up, _ = audioop.ratecv(pcm, 2, 1, rate, 24000, None)
    return bytes(int(24000 * silence_before_s) * 2) + up + bytes(int(24000 * silence_after_s) * 2)


async def stream(send, audio: bytes, bytes_per_s: int, chunk_ms: int = 100) -> None:
    """Send ``audio`` in ``chunk_ms`` pieces at the pace it plays."""
    step = bytes_per_s * chunk_ms // 1000
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(audio), step)):
        await send(base64.b64encode(audio[offset:offset + step]).decode())
        delay = start + (i + 1) * chunk_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def collect(connection, until, timeout: float) -> list:
    """Server events until ``until(events)`` holds (or the timeout: the caller's asserts then say what is missing)."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            events.append(await asyncio.wait_for(connection.recv(), left))
        except asyncio.TimeoutError:
            break
    return events


class Recorder:
    """Reads the connection in the background while the test streams audio."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.events: list = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.connection:
            self.events.append(event)

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.type == kind]

    async def wait(self, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def session_events(gw: GatewayProcess, session_id: str, timeout: float = 30) -> list[dict]:
    """The gateway's Redis events of the Realtime session, once its call.ended is in."""
    deadline = time.monotonic() + timeout
    while True:
        mine = [e for e in read_events(gw.events_stream)
                if e.get("source", {}).get("kind") == "realtime" and e["source"].get("session_id") == session_id]
        if any(e["type"] == "call.ended" for e in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.3)


async def test_sessions_per_token_limit(gateway):
    """First in the module: no earlier session is still finishing and holding a slot."""
    from websockets.exceptions import ConnectionClosed

    client = client_for(gateway)
    held = [await client.realtime.connect(extra_query={"intent": "transcription"}).enter()
            for _ in range(SESSIONS_PER_TOKEN)]
    try:
        for conn in held:
            assert (await asyncio.wait_for(conn.recv(), 10)).type == "session.created"
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as refused:
            event = await asyncio.wait_for(refused.recv(), 10)
            assert event.type == "error" and event.error.code == "session_limit_reached", event
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(refused.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    finally:
        for conn in held:
            await conn.close()


async def test_ga_transcription_session_streams_two_turns(gateway):
    gw, _ = gateway
    client = client_for(gateway)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        session_id = created.session.id
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 500},
                "noise_reduction": {"type": "near_field"},
            }},
        })
        updated = await conn.recv()
        assert updated.type == "session.updated", updated
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 500
        recorder = Recorder(conn)
        append = lambda audio: conn.input_audio_buffer.append(audio=audio)  # noqa: E731
        await stream(append, pcm24k(FIRST, 0.5, 1.2), 48000)
        # bad events between the turns: each answered by an error; the session carries on
        await conn.send({"type": "input_audio_buffer.frobnicate", "event_id": "evt_bad_1"})
        await conn.input_audio_buffer.append(audio="this is not base64!")
        await stream(append, pcm24k(SECOND, 0.0, 1.5), 48000)
        await recorder.wait(lambda r: len(r.of("conversation.item.input_audio_transcription.completed")) >= 2, 30)
        await recorder.stop()
    events = recorder.events
    kinds = [e.type for e in events]
    errors = recorder.of("error")
    assert [e.error.code for e in errors] == ["invalid_value", "invalid_base64"], errors
    assert "input_audio_buffer.frobnicate" in errors[0].error.message and errors[0].error.event_id == "evt_bad_1"
    started = recorder.of("input_audio_buffer.speech_started")
    stopped = recorder.of("input_audio_buffer.speech_stopped")
    committed = recorder.of("input_audio_buffer.committed")
    completed = recorder.of("conversation.item.input_audio_transcription.completed")
    deltas = recorder.of("conversation.item.input_audio_transcription.delta")
    assert len(completed) == 2, kinds
    assert len(started) == len(stopped) == len(committed) == 2, kinds
    items = [e.item_id for e in started]
    assert [e.item_id for e in stopped] == items == [e.item_id for e in committed] == [e.item_id for e in completed]
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == items[0]
    assert started[0].audio_start_ms < stopped[0].audio_end_ms < started[1].audio_start_ms < stopped[1].audio_end_ms
    # first turn's speech starts about 0.5 s in (minus the 300 ms prefix padding)
    assert 0 <= started[0].audio_start_ms <= 700
    for item in items:
        assert [e.type for e in events if getattr(e, "item_id", None) == item][0] == "input_audio_buffer.speech_started"
        assert any(d.item_id == item for d in deltas), f"no delta for {item}: {kinds}"
    # partials arrive while the speaker is still talking: deltas before speech_stopped
    def first(kind: str, item: str) -> int:
        return next(i for i, e in enumerate(events) if e.type == kind and e.item_id == item)

    assert any(first("conversation.item.input_audio_transcription.delta", item)
               < first("input_audio_buffer.speech_stopped", item) for item in items), kinds
    assert len({e.event_id for e in events}) == len(events)
    for reference, event in zip((get_entry(FIRST).text, get_entry(SECOND).text), completed):
        assert word_error_rate(reference, event.transcript) <= WER_BOUND, (reference, event.transcript)
        assert event.usage.type == "duration" and event.usage.seconds > 1.0
    # what the gateway published for the same session
    published = session_events(gw, session_id)
    assert [e["type"] for e in published][0] == "call.started"
    assert published[-1]["type"] == "call.ended" and published[-1]["reason"] == "client-closed"
    finals = [e for e in published if e["type"] == "turn.final"]
    assert [e["text"] for e in finals] == [e.transcript for e in completed]
    assert all(e["leg"] == "caller" for e in finals)


async def test_no_token_gets_an_error_event_and_close(gateway):
    client = client_for(gateway, token="not-a-real-token")
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        event = await asyncio.wait_for(conn.recv(), 10)
        assert event.type == "error"
        assert event.error.code == "invalid_api_key" and event.error.type == "authentication_error"
        from websockets.exceptions import ConnectionClosed

        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_beta_transcription_session_with_g711_ulaw(gateway):
    gw, _ = gateway
    client = client_for(gateway, beta=True)
    async with client.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.type == "transcription_session.created"
        # the SDK's beta union has no model for this event: it arrives untyped, its session a dict
        session_id = created.session["id"]
        await conn.transcription_session.update(session={
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
        })
        updated = await conn.recv()
        assert updated.type == "transcription_session.updated"
        assert updated.session.input_audio_format == "g711_ulaw"
        ulaw, codec = read_g711(SECOND)
        assert codec == "PCMU"
        recorder = Recorder(conn)
        silence = b"\xff" * 8000
        await stream(lambda audio: conn.input_audio_buffer.append(audio=audio), ulaw + silence, 8000, chunk_ms=20)
        await recorder.wait(lambda r: r.of("conversation.item.input_audio_transcription.completed"), 20)
        await recorder.stop()
    completed = recorder.of("conversation.item.input_audio_transcription.completed")
    assert len(completed) == 1, [e.type for e in recorder.events]
    assert recorder.of("input_audio_buffer.speech_started") and recorder.of("input_audio_buffer.committed")
    assert word_error_rate(get_entry(SECOND).text, completed[0].transcript) <= WER_BOUND, completed[0].transcript
    published = session_events(gw, session_id)
    assert [e["text"] for e in published if e["type"] == "turn.final"] == [completed[0].transcript]


async def test_manual_commit(gateway):
    gw, _ = gateway
    client = client_for(gateway)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        session_id = created.session.id
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}})
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.audio.input.turn_detection is None
        await conn.input_audio_buffer.commit()
        empty = await conn.recv()
        assert empty.type == "error" and empty.error.code == "input_audio_buffer_commit_empty"
        audio = pcm24k(SHORT, 0.3, 0.3)
        for offset in range(0, len(audio), 9600):  # 200 ms pieces, as fast as they go: no VAD to wait for
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[offset:offset + 9600]).decode())
        await conn.input_audio_buffer.commit()
        events = await collect(conn, lambda got: any(
            e.type == "conversation.item.input_audio_transcription.completed" for e in got), 20)
    kinds = [e.type for e in events]
    assert "input_audio_buffer.speech_started" not in kinds
    assert kinds[0] == "input_audio_buffer.committed", kinds
    completed = events[-1]
    assert completed.type == "conversation.item.input_audio_transcription.completed", kinds
    assert completed.item_id == events[0].item_id
    assert word_error_rate(get_entry(SHORT).text, completed.transcript) <= WER_BOUND, completed.transcript
    published = session_events(gw, session_id)
    finals = [e for e in published if e["type"] == "turn.final"]
    assert [e["text"] for e in finals] == [completed.transcript] and finals[0]["reason"] == "commit"


async def test_disconnect_mid_turn_publishes_what_was_said(gateway):
    """The client goes while the speaker is still talking: the turn is finalised and published."""
    gw, _ = gateway
    client = client_for(gateway)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        session_id = created.session.id
        await stream(lambda audio: conn.input_audio_buffer.append(audio=audio), pcm24k(FIRST, 0.3, 0.0), 48000)
    published = session_events(gw, session_id)
    finals = [e for e in published if e["type"] == "turn.final"]
    assert len(finals) == 1, published
    assert word_error_rate(get_entry(FIRST).text, finals[0]["text"]) <= WER_BOUND, finals[0]["text"]
    assert published[-1]["type"] == "call.ended" and published[-1]["reason"] == "client-closed"


async def test_together_ai_query_string_dialect(gateway):
    """Together AI's clients: raw websockets, 16 kHz PCM and VAD settings in the query, commit at the end."""
    import websockets

    gw, token = gateway
    pcm, rate = read_pcm16(SHORT)
    # up to 100 ms after the last word: the VAD cannot end the turn by silence, the commit must
    pcm = pcm[: (get_entry(SHORT).turns[-1].end_ms + 100) * rate // 1000 * 2]
    pcm16k, _ = audioop.ratecv(pcm, 2, 1, rate, 16000, None)
    url = (f"ws://127.0.0.1:{gw.http_port}/v1/realtime?model=openai/whisper-large-v3"
           "&input_audio_format=pcm_s16le_16000&min_silence_duration_ms=400&speech_pad_ms=200")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}",
                                                           "OpenAI-Beta": "realtime=v1"}) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        assert created["session"]["model"] == "openai/whisper-large-v3"
        assert created["session"]["turn_detection"]["silence_duration_ms"] == 400
        for offset in range(0, len(pcm16k), 8192):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm16k[offset:offset + 8192]).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        got: list[dict] = []
        deadline = time.monotonic() + 20
        while not any(e["type"] == "conversation.item.input_audio_transcription.completed" for e in got):
            got.append(json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))))
    completed = [e for e in got if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert word_error_rate(get_entry(SHORT).text, completed[0]["transcript"]) <= WER_BOUND, completed
    deltas = [e["delta"] for e in got if e["type"] == "conversation.item.input_audio_transcription.delta"]
    assert deltas and deltas[-1] == completed[0]["transcript"]  # Together's deltas carry the whole text
    # the commit ended the turn in place: one session, no restart
    published = session_events(gw, created["session"]["id"])
    finals = [e for e in published if e["type"] == "turn.final"]
    assert [f["text"] for f in finals] == [c["transcript"] for c in completed if c["transcript"]], published
    assert [f["reason"] for f in finals] == ["commit"]
    assert len({e["call_id"] for e in published}) == 1
    assert not any(e["type"] == "call.ended" and e["reason"] != "client-closed" for e in published)


async def test_subprotocol_token_and_oversized_append(gateway):
    """A browser client's way in (the token as a subprotocol), and an append over the limit."""
    import websockets

    gw, token = gateway
    url = f"ws://127.0.0.1:{gw.http_port}/v1/realtime?intent=transcription"
    async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{token}"],
                                  max_size=None) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": "big",
                                  "audio": "A" * (15 * 1024 * 1024 + 4)}))
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))["error"]
        assert (error["code"], error["param"], error["event_id"]) == (
            "input_audio_buffer_append_too_large", "audio", "big")
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))  # still up
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "input_audio_buffer.cleared"
