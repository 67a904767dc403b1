"""The official ``openai`` SDK, unchanged, against ``earshot run``'s ``/v1/audio/*`` and ``/v1/models``.

One gateway process (packaged tiny.en, api_auth on, a real API token made with
``earshot users``) serves the module. Every response format of
``client.audio.transcriptions.create``, streaming included, and
``client.audio.translations.create`` are checked against the fixtures'
reference texts, each upload in a different container (tests/upload_files.py);
what the gateway published to Redis and stored in SQL against what the client
got.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import GatewayProcess, add_user, new_token, read_events, running_gateway
from tests.fixtures_data import get_entry
from tests.upload_files import audio_files

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WER_BOUND = 0.3  # tiny.en on telephone-band recordings (measured 0.05-0.15 on these)
CALLER = "caller_02_conference.wav"  # 18 s, five turns
PROMPT = "prompt_privacy-unident.wav"  # 4.4 s, one sentence


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('rest') / 'earshot.db'}"
    add_user(url, "rest-user", "a long rest api password")
    token = new_token(url, "rest-user", "rest e2e")
    with running_gateway({"EARSHOT_DATABASE_URL": url, "EARSHOT_API_AUTH": "true", "EARSHOT_ASR_MODEL": "tiny.en"},
                         check_exit=False) as gw:
        yield gw, token, url


@pytest.fixture(scope="module")
def client(gateway) -> "openai.OpenAI":
    gw, token, _ = gateway
    return openai.OpenAI(api_key=token, base_url=f"http://127.0.0.1:{gw.http_port}/v1", max_retries=0, timeout=120)


def upload(name: str, container: str) -> tuple[str, bytes]:
    return audio_files(name)[container]


def reference(name: str) -> str:
    return get_entry(name).text


def test_json_text_srt_and_vtt(client) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=upload(CALLER, "wav"))
    assert word_error_rate(reference(CALLER), result.text) <= WER_BOUND, result.text
    assert result.usage is not None and result.usage.seconds == pytest.approx(18.06, abs=0.1)
    text = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=upload(PROMPT, "flac"),
                                              response_format="text")
    assert isinstance(text, str) and word_error_rate(reference(PROMPT), text) <= WER_BOUND, text
    srt = client.audio.transcriptions.create(model="openai/whisper-large-v3", file=upload(CALLER, "ogg"),
                                             response_format="srt")
    cues = [block.split("\n") for block in srt.strip().split("\n\n")]
    assert [c[0] for c in cues] == [str(n) for n in range(1, len(cues) + 1)] and len(cues) == 5
    assert all(" --> " in c[1] and "," in c[1] for c in cues)
    assert word_error_rate(reference(CALLER), " ".join(" ".join(c[2:]) for c in cues)) <= WER_BOUND
    vtt = client.audio.transcriptions.create(model="large-v3-turbo", file=upload(CALLER, "mp3"),
                                             response_format="vtt")
    assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == 5


def test_verbose_json_with_segments_and_words(client) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=upload(CALLER, "m4a"),
                                                response_format="verbose_json",
                                                timestamp_granularities=["word", "segment"], language="en")
    assert word_error_rate(reference(CALLER), result.text) <= WER_BOUND, result.text
    assert result.language == "english" and result.duration == pytest.approx(18.1, abs=0.15)
    assert result.segments is not None and len(result.segments) == 5
    assert result.words is not None and len(result.words) >= 0.75 * len(reference(CALLER).split())
    for turn, segment in zip(get_entry(CALLER).turns, result.segments):
        assert segment.start <= turn.start_ms / 1000 + 0.1 and segment.end >= turn.end_ms / 1000 - 0.1
        inside = [w for w in result.words if segment.start - 0.01 <= w.start < segment.end]
        assert " ".join(w.word for w in inside) == segment.text.strip()
        assert abs(inside[0].start - turn.start_ms / 1000) < 0.6  # the first word where the speaker started


def test_stream_true_is_server_sent_deltas_then_done(client) -> None:
    stream = client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=upload(CALLER, "webm"),
                                                stream=True)
    events = list(stream)
    assert [e.type for e in events] == ["transcript.text.delta"] * 5 + ["transcript.text.done"]
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    assert word_error_rate(reference(CALLER), events[-1].text) <= WER_BOUND, events[-1].text


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations deprecated
def test_translation_with_the_english_only_model_returns_english(client) -> None:
    result = client.audio.translations.create(model="whisper-1", file=upload(PROMPT, "wav-44k-stereo"))
    assert word_error_rate(reference(PROMPT), result.text) <= WER_BOUND, result.text
    verbose = client.audio.translations.create(model="whisper-1", file=upload(PROMPT, "mp3"),
                                               response_format="verbose_json")
    assert verbose.segments and verbose.text


def test_errors_are_the_sdks_exceptions(client, gateway) -> None:
    gw, _, _ = gateway
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("minutes.txt", b"Minutes of the meeting\n" * 40))
    assert info.value.body["param"] == "file" and "not an audio file" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=upload(PROMPT, "flac"), language="xx")
    assert info.value.body["param"] == "language"
    stranger = openai.OpenAI(api_key="not-a-token", base_url=client.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.audio.transcriptions.create(model="whisper-1", file=upload(PROMPT, "flac"))
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    anonymous = httpx.post(f"http://127.0.0.1:{gw.http_port}/v1/audio/transcriptions", data={"model": "whisper-1"},
                           files={"file": upload(PROMPT, "flac")}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_models(client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny.en" and {"whisper-1", "openai/whisper-large-v3", "large-v3-turbo"} <= set(ids)
    assert client.models.retrieve("whisper-1").owned_by == "earshot"


def test_the_upload_is_a_rest_session_in_redis_and_sql(client, gateway) -> None:
    gw, _, url = gateway
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=upload(CALLER, "flac"),
                                                                response_format="verbose_json")
    result = raw.parse()
    call_id, request_id = raw.headers["x-earshot-call-id"], raw.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while True:
        events = [e for e in read_events(gw.events_stream) if e["call_id"] == call_id]
        if events and events[-1]["type"] == "call.ended" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [e["type"] for e in events] == ["call.started"] + ["turn.final"] * 5 + ["call.ended"]
    assert all(e["source"] == {"kind": "rest", "request_id": request_id, "filename": "caller_02_conference.flac"}
               for e in events)
    finals = [e for e in events if e["type"] == "turn.final"]
    assert [f["text"] for f in finals] == [s.text.strip() for s in result.segments]
    assert [f["start_ms"] for f in finals] == [round(s.start * 1000) for s in result.segments]
    assert events[-1]["turns"] == 5

    from sqlalchemy import select

    from gateway.store.db import make_engine, make_sessionmaker
    from gateway.store.models import Call

    engine = make_engine(url)
    try:
        deadline = time.monotonic() + 30
        while True:
            with make_sessionmaker(engine)() as db:
                row = db.scalars(select(Call).where(Call.call_id == call_id)).first()
                stored = (row.source_kind, row.status, row.turn_count, [t.text for t in row.turns]) if row else None
            if stored and stored[1] != "live" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    finally:
        engine.dispose()
    assert stored is not None and stored[0] == "rest" and stored[1] != "live" and stored[2] == 5
    assert stored[3] == [f["text"] for f in finals]
