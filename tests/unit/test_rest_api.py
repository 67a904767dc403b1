"""The OpenAI-compatible REST API (gateway/ingest/rest.py) against a real SessionHost.

The routes run in-process behind httpx's ASGI transport, over a real session
host (Silero VAD, the turn detector), real token auth on a migrated SQLite
store, and either the packaged tiny.en model (where the words matter) or the
stub transcriber (placeholder words: where only pieces, events and errors
are checked). Uploads are fixtures re-encoded in the containers clients send
(tests/upload_files.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny.en must never touch the network

from gateway.app import turn_config  # noqa: E402
from gateway.asr.interface import Word  # noqa: E402
from gateway.asr.stub import StubTranscriber  # noqa: E402
from gateway.asr.wer import word_error_rate  # noqa: E402
from gateway.asr.whisper import WhisperTranscriber  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.ingest import rest  # noqa: E402
from gateway.ingest.auth import ApiAuth, SessionLimits  # noqa: E402
from gateway.ingest.rest import ApiError, parse_options  # noqa: E402
from gateway.ingest.routes import ApiContext  # noqa: E402
from gateway.ingest.transcript import Segment, Transcript, render, timestamp  # noqa: E402
from gateway.ingest.upload import UploadError, cut, decode, sniff  # noqa: E402
from gateway.media.vad import BatchedVadRunner, SileroVad  # noqa: E402
from gateway.session import SessionHost  # noqa: E402
from gateway.store import migrate  # noqa: E402
from gateway.store.db import make_engine, make_sessionmaker  # noqa: E402
from gateway.store.users import create_token, create_user  # noqa: E402
from tests.fixtures_data import get_entry  # noqa: E402
from tests.upload_files import audio_files  # noqa: E402

CALLER = "caller_05_mixed.wav"  # 22.7 s, five turns
SHORT = "prompt_auth-incorrect.wav"  # 4.6 s, one sentence with a pause


# -- pure parts: options, formats, containers, cutting


def options(**fields: str) -> rest.Options:
    return parse_options(fields.items(), "transcribe")


def test_options_default_to_json_and_accept_what_the_sdk_sends() -> None:
    o = options(model="whisper-1")
    assert (o.response_format, o.language, o.prompt, o.temperature, o.stream, o.words) == \
        ("json", None, None, 0.0, False, False)
    o = parse_options([("model", "gpt-4o-transcribe"), ("response_format", "verbose_json"), ("language", "EN"),
                       ("temperature", "0.2"), ("stream", "true"), ("timestamp_granularities[]", "word"),
                       ("timestamp_granularities[]", "segment"), ("include[]", "logprobs")], "transcribe")
    assert (o.language, o.temperature, o.stream, o.words, o.segments) == ("en", 0.2, True, True, True)
    assert options(language="English").language == "en"
    words_only = parse_options([("response_format", "verbose_json"), ("timestamp_granularities[]", "word")],
                               "transcribe")
    assert words_only.words and not words_only.segments
    assert not options(response_format="json", **{"timestamp_granularities[]": "word"}).words  # verbose_json only
    assert not parse_options([("stream", "true")], "translate").stream  # translations do not stream


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": "diarized_json"}, "response_format"),
    ({"response_format": "xml"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "1.5"}, "temperature"),
    ({"temperature": "nan"}, "temperature"),
    ({"language": "klingon"}, "language"),
    ({"stream": "maybe"}, "stream"),
    ({"timestamp_granularities[]": "sentence"}, "timestamp_granularities[]"),
    ({"prompt": "x" * 20_000}, "prompt"),
])
def test_a_bad_option_is_a_400_naming_its_field(fields: dict[str, str], param: str) -> None:
    with pytest.raises(ApiError) as info:
        options(**fields)
    assert (info.value.status, info.value.param, info.value.type) == (400, param, "invalid_request_error")
    assert info.value.body()["error"].keys() == {"message", "type", "param", "code"}


def transcript() -> Transcript:
    return Transcript("transcribe", "en", 3725.5, (
        Segment(0, 0.25, 2.5, "Hello there.", -0.2, 1.1, 0.01),
        Segment(1, 3661.001, 3662.4996, "Goodbye.", -0.3, 0.9, 0.02),
    ), (Word(" Hello", 0.25, 0.8, 0.9), Word(" there.", 0.8, 2.5, 0.8), Word(" Goodbye.", 3661.001, 3662.4996, 0.7)))


def test_subtitle_formats() -> None:
    assert timestamp(3661.001) == "01:01:01,001" and timestamp(0.0006, ".") == "00:00:00.001"
    body, media = render(transcript(), "srt")
    assert body == ("1\n00:00:00,250 --> 00:00:02,500\nHello there.\n\n"
                    "2\n01:01:01,001 --> 01:01:02,500\nGoodbye.\n\n")
    assert media.startswith("application/x-subrip")
    body, media = render(transcript(), "vtt")
    assert body == ("WEBVTT\n\n00:00:00.250 --> 00:00:02.500\nHello there.\n\n"
                    "01:01:01.001 --> 01:01:02.500\nGoodbye.\n\n")
    assert render(transcript(), "text")[0] == "Hello there. Goodbye.\n"


def test_json_and_verbose_json_shapes() -> None:
    body, _ = render(transcript(), "json")
    assert body == {"text": "Hello there. Goodbye.", "usage": {"type": "duration", "seconds": 3725.5}}
    body, _ = render(transcript(), "verbose_json", words=True)
    assert (body["task"], body["language"], body["duration"]) == ("transcribe", "english", 3725.5)
    assert [s["text"] for s in body["segments"]] == [" Hello there.", " Goodbye."]
    assert body["segments"][1] | {"tokens": None} == {
        "id": 1, "seek": 366100, "start": 3661.001, "end": 3662.5, "text": " Goodbye.", "tokens": None,
        "temperature": 0.0, "avg_logprob": -0.3, "compression_ratio": 0.9, "no_speech_prob": 0.02}
    assert body["words"] == [{"word": "Hello", "start": 0.25, "end": 0.8}, {"word": "there.", "start": 0.8, "end": 2.5},
                             {"word": "Goodbye.", "start": 3661.001, "end": 3662.5}]
    translated = Transcript("translate", "de", 1.0, ())
    assert render(translated, "json")[0] == {"text": ""}  # translations report no usage


@pytest.mark.parametrize("container", ["wav", "wav-44k-stereo", "flac", "ogg", "mp3", "m4a", "webm"])
def test_every_container_decodes_to_the_same_audio(container: str) -> None:
    name, data = audio_files(SHORT)[container]
    reference = decode(io.BytesIO(audio_files(SHORT)["wav"][1]), max_seconds=60)
    pcm = decode(io.BytesIO(data), max_seconds=60)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert pcm.size / 16000 == pytest.approx(get_entry(SHORT).duration_ms / 1000, abs=0.15)  # AAC adds priming
    assert sniff(data[:16]) is not None
    # the same speech: level within a few dB of the original (lossy codecs, resampling)
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    ref = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
    assert abs(20 * np.log10(rms / ref)) < 1.5, (name, rms, ref)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 20, "not an audio file"),
    (b"%PDF-1.7\n" + bytes(200), "not an audio file"),
    (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n", "not an audio file"),  # playlists are never opened
    (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes(40), "cannot be decoded"),
    (b"fLaC" + bytes(100), "cannot be decoded"),
])
def test_what_is_not_audio_is_named(data: bytes, reason: str) -> None:
    with pytest.raises(UploadError, match=reason):
        decode(io.BytesIO(data), max_seconds=60)


def test_audio_longer_than_the_limit_is_refused() -> None:
    _, data = audio_files(SHORT)["flac"]
    with pytest.raises(UploadError, match="longer than") as info:
        decode(io.BytesIO(data), max_seconds=2.0)
    assert info.value.code == "audio_too_long"


def test_the_file_is_cut_where_the_speaker_paused() -> None:
    pcm = decode(io.BytesIO(audio_files(CALLER)["flac"][1]), max_seconds=60)
    vad = SileroVad()
    vad.add_stream("t")
    pieces = cut(pcm, lambda chunk: vad.infer({"t": chunk})["t"], turn_config(Settings()))
    turns = get_entry(CALLER).turns
    assert len(pieces) == len(turns)
    for piece, turn in zip(pieces, turns):  # each piece holds its turn, padding included
        assert piece.start_s * 1000 <= turn.start_ms + 100 and piece.end_s * 1000 >= turn.end_ms - 100
    assert all(a.end <= b.start for a, b in zip(pieces, pieces[1:]))
    assert [p.index for p in pieces] == list(range(len(pieces)))


# -- over HTTP


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('reststore') / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        user = create_user(s, "uploader", "a long enough password 1", "supervisor")
        _, token = create_token(s, user, "rest tests")
        s.commit()
    engine.dispose()
    return {"url": url, "token": token}


@pytest.fixture(scope="module")
def whisper():
    t = WhisperTranscriber("tiny.en", compute_type="int8", cpu_threads=2, local_files_only=True)
    yield t
    asyncio.run(t.close())


@dataclass
class Stack:
    api: ApiContext
    http: httpx.AsyncClient
    token: str
    published: list = field(default_factory=list)
    free: dict[str, int] = field(default_factory=lambda: {"slots": 8})

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def post(self, container: str = "flac", fixture: str = SHORT, path: str = "/v1/audio/transcriptions",
                   headers: dict[str, str] | None = None, files: Any = None, **data: Any) -> httpx.Response:
        if files is None:
            name, blob = audio_files(fixture)[container]
            files = {"file": (name, blob)}
        data.setdefault("model", "whisper-1")
        return await self.http.post(path, data=data, files=files,
                                    headers=self.auth() if headers is None else headers)

    async def settle(self) -> None:
        """Wait until every upload's job has published its events and ended its session."""
        jobs = list(self.api.extra["rest"].jobs)  # type: ignore[attr-defined]
        await asyncio.gather(*jobs)

    def events(self, call_id: str) -> list:
        return [e for e in self.published if e.call.call_id == call_id]


async def make_stack(store: dict[str, str], transcriber: Any, **settings: Any) -> Stack:
    s = Settings(database_url=store["url"], **settings)
    stack_ref: list[Stack] = []
    host = SessionHost(s, vad_runner=BatchedVadRunner(SileroVad()), transcriber=transcriber,
                       publish=lambda e: stack_ref[0].published.append(e),
                       capacity=lambda: stack_ref[0].free["slots"] - len(host.sessions), turn_config=turn_config(s))
    api = ApiContext(s, host, ApiAuth(s), SessionLimits(s.api_sessions_per_token), model_name=s.asr_model)
    app = Starlette(routes=rest.routes(api))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://earshot", timeout=120)
    stack = Stack(api, http, store["token"])
    stack_ref.append(stack)
    return stack


@pytest.fixture
async def stub(store):
    stack = await make_stack(store, StubTranscriber())
    yield stack
    await stack.http.aclose()


@pytest.fixture
async def real(store, whisper):
    stack = await make_stack(store, whisper, asr_model="tiny.en")
    yield stack
    await stack.http.aclose()


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body.keys() == {"error"} and body["error"].keys() == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic eDp5"}])
async def test_no_or_a_wrong_token_is_401(stub: Stack, headers: dict[str, str]) -> None:
    response = await stub.post(headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["code"] == "invalid_api_key"
    assert (await stub.http.get("/v1/models", headers=headers)).status_code == 401
    assert stub.published == []  # no session for a stranger


async def test_an_upload_that_is_not_audio_is_400_with_the_reason(stub: Stack) -> None:
    response = await stub.post(files={"file": ("notes.txt", b"these are my meeting notes\n" * 10, "text/plain")})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "file" and "not an audio file" in error["message"] and "flac" in error["message"]
    response = await stub.post(files={"file": ("broken.wav", b"RIFF\x00\x00\x00\x00WAVE" + bytes(64))})
    assert response.status_code == 400 and "cannot be decoded" in error_of(response)["message"]
    response = await stub.http.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, headers=stub.auth())
    assert response.status_code == 400 and error_of(response)["param"] == "file"
    response = await stub.post(response_format="yaml")
    assert response.status_code == 400 and error_of(response)["param"] == "response_format"
    assert stub.published == []  # a refused upload opens no session
    assert stub.api.limits.open_count(await stub.api.auth.bearer(stub.auth()["Authorization"])) == 0


async def test_a_file_over_the_size_limit_is_413(store) -> None:
    stack = await make_stack(store, StubTranscriber(), api_max_upload_mb=1)
    try:
        big = audio_files(CALLER)["wav-44k-stereo"]  # 4 MB
        response = await stack.post(files={"file": big})
        assert response.status_code == 413 and error_of(response)["code"] == "file_too_large"
        # a body without Content-Length is counted as it arrives
        boundary = "b0undary"

        async def chunks():
            yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n\r\n".encode()
            for i in range(0, len(big[1]), 65536):
                yield big[1][i:i + 65536]
            yield f"\r\n--{boundary}--\r\n".encode()

        response = await stack.http.post("/v1/audio/transcriptions", content=chunks(), headers={
            **stack.auth(), "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 413
        assert (await stack.post()).status_code == 200  # a small file still goes through
    finally:
        await stack.http.aclose()


async def test_session_limits_are_429_per_token_and_503_for_the_gateway(stub: Stack) -> None:
    caller = await stub.api.auth.bearer(stub.auth()["Authorization"])
    assert caller is not None
    with stub.api.limits.hold(caller), stub.api.limits.hold(caller):
        stub.api.limits.per_token = 2
        response = await stub.post()
        assert response.status_code == 429 and error_of(response)["code"] == "rate_limit_exceeded"
    stub.free["slots"] = 0
    response = await stub.post()
    assert response.status_code == 503 and error_of(response) | {"message": ""} == {
        "message": "", "type": "server_error", "param": None, "code": "capacity"}
    stub.api.host.draining = True
    assert error_of(await stub.post())["code"] == "draining"
    assert stub.api.limits.open_count(caller) == 0  # every refusal gave its slot back


async def test_an_upload_is_a_rest_session_with_one_final_per_piece(stub: Stack) -> None:
    response = await stub.post(fixture=CALLER, response_format="verbose_json", language="en")
    assert response.status_code == 200
    call_id = response.headers["x-earshot-call-id"]
    assert response.headers["x-request-id"]
    await stub.settle()
    events = stub.events(call_id)
    assert [e.type for e in events] == ["call.started"] + ["turn.final"] * 5 + ["call.ended"]
    wire = events[0].to_dict()
    assert wire["source"] == {"kind": "rest", "request_id": response.headers["x-request-id"],
                              "filename": "caller_05_mixed.flac"}
    assert events[0].data["legs"] == ["upload"] and events[0].data["language"] == "en"
    finals = [e.to_dict() for e in events if e.type == "turn.final"]
    assert [f["turn"] for f in finals] == [1, 2, 3, 4, 5] and all(f["leg"] == "upload" for f in finals)
    assert all(f["asr"]["model"] == "stub" and f["reason"] == "silence" for f in finals[:-1])
    assert events[-1].data["turns"] == 5 and events[-1].data["reason"] == "completed"
    # the response's segments are the pieces the events carry, at the same offsets in the file
    body = response.json()
    assert body["duration"] == pytest.approx(22.67, abs=0.05)
    assert [(round(s["start"] * 1000), round(s["end"] * 1000)) for s in body["segments"]] == \
        [(f["start_ms"], f["end_ms"]) for f in finals]
    assert [s["text"].strip() for s in body["segments"]] == [f["text"] for f in finals]
    for turn, final in zip(get_entry(CALLER).turns, finals):
        assert final["start_ms"] <= turn.start_ms + 100 and final["end_ms"] >= turn.end_ms - 100
    assert stub.api.host.sessions == {}


async def test_srt_and_vtt_have_one_cue_per_piece(stub: Stack) -> None:
    srt = await stub.post(fixture=CALLER, response_format="srt")
    vtt = await stub.post(fixture=CALLER, response_format="vtt", container="mp3")
    text = await stub.post(fixture=CALLER, response_format="text", container="wav-44k-stereo")  # 4 MB: spooled to disk
    assert srt.status_code == vtt.status_code == text.status_code == 200
    assert srt.text.count(" --> ") == 5 and srt.text.startswith("1\n00:00:00,")
    assert vtt.text.startswith("WEBVTT\n\n") and vtt.text.count(" --> ") == 5
    assert text.headers["content-type"].startswith("text/plain") and text.text.endswith("\n")


async def test_stream_sends_one_delta_per_piece_then_done(stub: Stack) -> None:
    response = await stub.post(fixture=CALLER, stream="true", container="m4a")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 5 + ["transcript.text.done"]
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    assert events[1]["delta"].startswith(" ") and not events[0]["delta"].startswith(" ")


async def test_silence_is_an_empty_transcript_and_a_session_without_turns(stub: Stack) -> None:
    response = await stub.post(files={"file": ("silence.wav", audio_files("silence_10s.wav")["wav"][1])},
                               response_format="verbose_json")
    assert response.status_code == 200
    assert response.json()["text"] == "" and response.json()["segments"] == []
    await stub.settle()
    events = stub.events(response.headers["x-earshot-call-id"])
    assert [e.type for e in events] == ["call.started", "call.ended"] and events[-1].data["turns"] == 0


async def test_models_lists_the_configured_model_and_the_aliases(stub: Stack) -> None:
    body = (await stub.http.get("/v1/models", headers=stub.auth())).json()
    ids = [m["id"] for m in body["data"]]
    assert body["object"] == "list" and ids[0] == "tiny.en"
    assert {"whisper-1", "openai/whisper-large-v3", "large-v3-turbo", "gpt-4o-transcribe"} <= set(ids)
    assert all(m["object"] == "model" and m["owned_by"] == "earshot" for m in body["data"])
    one = await stub.http.get("/v1/models/openai/whisper-large-v3", headers=stub.auth())
    assert one.json()["id"] == "openai/whisper-large-v3"
    missing = await stub.http.get("/v1/models/dall-e-3", headers=stub.auth())
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    # any name is served by the configured model
    assert (await stub.post(model="Systran/faster-distil-whisper-small.en")).status_code == 200


# -- with Whisper (tiny.en)


@pytest.mark.slow
async def test_the_words_match_the_reference_in_every_format(real: Stack) -> None:
    reference = get_entry(CALLER).text
    plain = await real.post(fixture=CALLER, container="flac")
    assert plain.status_code == 200, plain.text
    assert word_error_rate(reference, plain.json()["text"]) <= 0.3, plain.json()["text"]
    verbose = await real.post(fixture=CALLER, container="mp3", response_format="verbose_json",
                              **{"timestamp_granularities[]": ["word", "segment"]})
    body = verbose.json()
    assert word_error_rate(reference, body["text"]) <= 0.3, body["text"]
    assert body["language"] == "english" and len(body["segments"]) == 5
    words = body["words"]
    assert len(words) == pytest.approx(len(reference.split()), rel=0.25)
    assert " ".join(w["word"] for w in words) == body["text"]
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and all(w["start"] <= w["end"] for w in words)
    for segment in body["segments"]:  # each segment's words lie inside it: offsets added per piece
        inside = [w for w in words if segment["start"] - 0.01 <= w["start"] < segment["end"]]
        assert " ".join(w["word"] for w in inside) == segment["text"].strip()
    # word times follow the reference turns: the first word of each turn starts near the turn's start
    for turn, segment in zip(get_entry(CALLER).turns, body["segments"]):
        first = next(w for w in words if w["start"] >= segment["start"] - 0.01)
        assert abs(first["start"] - turn.start_ms / 1000) < 0.6, (first, turn)
    await real.settle()
    finals = [e for e in real.events(verbose.headers["x-earshot-call-id"]) if e.type == "turn.final"]
    assert " ".join(e.data["text"] for e in finals) == body["text"]
    assert all(e.data["asr"]["model"] == "tiny.en" and e.data["confidence"]["avg_logprob"] > -1 for e in finals)


@pytest.mark.slow
async def test_translation_of_english_speech_with_an_english_only_model_is_english(real: Stack) -> None:
    response = await real.post(path="/v1/audio/translations", fixture=SHORT, container="ogg",
                               response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "translate" and "usage" not in body
    assert word_error_rate(get_entry(SHORT).text, body["text"]) <= 0.25, body["text"]


async def _started(stack: Stack, timeout: float = 30.0) -> str:
    """The call id of the first upload session the host opened."""
    for _ in range(int(timeout / 0.01)):
        started = [e for e in stack.published if e.type == "call.started"]
        if started:
            return started[0].call.call_id
        await asyncio.sleep(0.01)
    raise AssertionError("no upload session opened")


@pytest.mark.slow
async def test_a_client_that_leaves_still_gets_its_pieces_published(real: Stack) -> None:
    request = asyncio.create_task(real.post(fixture=CALLER))
    call_id = await _started(real)
    request.cancel()  # the client gives up while the pieces are being transcribed
    await asyncio.gather(request, return_exceptions=True)
    await real.settle()
    events = real.events(call_id)
    assert [e.type for e in events] == ["call.started"] + ["turn.final"] * 5 + ["call.ended"]
    assert word_error_rate(get_entry(CALLER).text, " ".join(e.data["text"] for e in events[1:-1])) <= 0.3
    caller = await real.api.auth.bearer(real.auth()["Authorization"])
    assert real.api.limits.open_count(caller) == 0  # its slot came back when the job was done


@pytest.mark.slow
async def test_a_drain_ends_the_session_and_nothing_is_published_after_call_ended(real: Stack) -> None:
    request = asyncio.create_task(real.post(fixture=CALLER))
    call_id = await _started(real)
    await real.api.host.close("shutdown")
    response = await request
    await real.settle()
    events = real.events(call_id)
    assert events[-1].type == "call.ended" and events[-1].data["reason"] == "shutdown"
    assert [e.type for e in events].count("call.ended") == 1
    assert response.status_code == 200 and response.json()["text"]  # the client still gets its transcript
