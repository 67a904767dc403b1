"""The pool's wire format: jobs and replies round-trip, and any entry a worker reads is either a
valid job or a WireError naming what is wrong (never another exception)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.asr.interface import SourceAudio, TranscriptionRequest, TranscriptionResult
from gateway.asr.remote.wire import (
    PoolNames,
    Reply,
    WireError,
    decode_job,
    decode_reply,
    encode_job,
    encode_reply,
    pcm16_from_float,
)
from gateway.media.resample import upsample_8k_to_16k

RNG = np.random.default_rng(7)


def noise(seconds: float) -> np.ndarray:
    return (RNG.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def full_request() -> TranscriptionRequest:
    return TranscriptionRequest(noise(5.0), "final", language="en", prompt="earlier text", key="call-1/caller",
                                context_audio=noise(10.0), context_text="the turn before", deadline=1_800_000_000.5,
                                session="call-1", turn=3)


def test_a_job_round_trips_with_every_field() -> None:
    request = full_request()
    fields = encode_job(request, "earshot:asr:replies:gw-1", sent_at=1_799_999_999.0)
    job = decode_job(fields)
    got = job.request
    assert job.reply_to == "earshot:asr:replies:gw-1" and job.sent_at == 1_799_999_999.0 and job.rate == 16000
    for name in ("kind", "language", "prompt", "key", "context_text", "deadline", "session", "turn", "request_id"):
        assert getattr(got, name) == getattr(request, name), name
    # 16-bit PCM: within half a step of the float samples
    assert np.max(np.abs(got.audio - request.audio)) <= 0.5 / 32768 + 1e-7
    assert got.context_audio is not None and request.context_audio is not None
    assert np.max(np.abs(got.context_audio - request.context_audio)) <= 0.5 / 32768 + 1e-7
    assert got.audio.dtype == np.float32


def test_a_final_with_ten_seconds_of_context_is_compact() -> None:
    fields = encode_job(full_request(), "r", 0.0)
    size = sum(len(v) for v in fields.values())
    assert size == pytest.approx(15 * 16000 * 2, rel=0.01)  # int16: half the engine's float32
    assert size < 500_000


def telephone_request(resampler: str = "polyphase") -> TranscriptionRequest:
    """A final as the leg pipeline builds it: 16 kHz samples and their 8 kHz source."""
    turn = (RNG.standard_normal(8000 * 3) * 3000).astype(np.int16)
    heard = [(RNG.standard_normal(n) * 2000).astype(np.int16) for n in (8000 * 2, 12345)]
    gap = np.zeros(4800, np.float32)
    context = np.concatenate([x for pcm in heard for x in (upsample_8k_to_16k(pcm, resampler), gap)])
    return TranscriptionRequest(upsample_8k_to_16k(turn, resampler), "final", context_audio=context,
                                context_text="two turns before", prompt="older text", session="c", key="c/caller",
                                source=SourceAudio(8000, resampler, turn, tuple(heard), 4800))


@pytest.mark.parametrize("resampler", ["polyphase", "ratecv"])
def test_a_telephone_request_goes_at_8khz_and_comes_back_exactly(resampler: str) -> None:
    request = telephone_request(resampler)
    fields = encode_job(request, "r", 0.0)
    assert len(fields["audio"]) == request.source.audio.size * 2  # type: ignore[union-attr]  # 8 kHz int16
    assert len(fields["context"]) == sum(part.size * 2 for part in request.source.context)  # type: ignore[union-attr]
    got = decode_job(fields).request
    np.testing.assert_array_equal(got.audio, request.audio)  # bit for bit: the engine decodes the same samples
    assert got.context_audio is not None
    np.testing.assert_array_equal(got.context_audio, request.context_audio)
    assert got.source is not None and got.source.resampler == resampler


def test_a_final_with_ten_seconds_of_context_at_8khz_is_a_quarter_of_float32() -> None:
    turn = np.zeros(8000 * 5, np.int16)
    context = (np.zeros(8000 * 10, np.int16),)
    request = TranscriptionRequest(upsample_8k_to_16k(turn), "final", context_audio=np.zeros(16000 * 10 + 4800, np.float32),
                                   context_text="x", source=SourceAudio(8000, "polyphase", turn, context, 4800))
    size = sum(len(v) for v in encode_job(request, "r", 0.0).values())
    assert size < 15 * 8000 * 2 + 1000  # 240 KB of PCM and a little JSON


@pytest.mark.parametrize(("change", "names"), [
    ({"resampler": "sinc-best"}, "meta.resampler"),
    ({"context_parts": [1, 2]}, "add up to"),
    ({"context_parts": "all"}, "meta.context_parts"),
    ({"context_parts": [0, 16000 * 3]}, "meta.context_parts"),
    ({"context_gap": -1}, "meta.context_gap"),
])
def test_a_bad_source_description_names_its_field(change: dict[str, object], names: str) -> None:
    fields = encode_job(telephone_request(), "r", 0.0)
    meta = json.loads(fields["meta"])
    meta.update(change)
    with pytest.raises(WireError, match=names):
        decode_job({**fields, "meta": json.dumps(meta).encode()})


def test_8khz_audio_is_resampled_as_the_gateway_does() -> None:
    pcm = (RNG.standard_normal(8000) * 3000).astype(np.int16)
    fields = encode_job(TranscriptionRequest(noise(1.0), "partial"), "r", 0.0)
    meta = json.loads(fields["meta"])
    meta["rate"] = 8000
    fields = {"meta": json.dumps(meta).encode(), "audio": pcm.astype("<i2").tobytes()}
    job = decode_job(fields)
    assert job.rate == 8000
    np.testing.assert_array_equal(job.request.audio, upsample_8k_to_16k(pcm))


def bad(meta_change: dict[str, object] | None = None, **fields: object) -> dict[str, object]:
    good = encode_job(full_request(), "earshot:asr:replies:gw-1", 0.0)
    meta = json.loads(good["meta"])
    for key, value in (meta_change or {}).items():
        if value is ...:
            del meta[key]
        else:
            meta[key] = value
    out: dict[str, object] = {**good, "meta": json.dumps(meta).encode()}
    for key, value in fields.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("entry", "names"), [
    ({"audio": b"\x00\x00"}, "field 'meta' is missing"),
    ({"meta": b"{not json", "audio": b""}, "not JSON"),
    ({"meta": b"[1, 2]", "audio": b""}, "JSON object"),
    (bad({"v": 2}), "meta.v"),
    (bad({"kind": "interim"}), "meta.kind"),
    (bad({"rate": 44100}), "meta.rate"),
    (bad({"turn": -1}), "meta.turn"),
    (bad({"deadline": "soon"}), "meta.deadline"),
    (bad({"prompt": 7}), "meta.prompt"),
    (bad({"prompt": "x" * 20000}), "meta.prompt is longer"),
    (bad({"reply": ""}), "meta.reply"),
    (bad({"id": ...}), "meta.id"),
    (bad(audio=None), "field 'audio' is missing"),
    (bad(audio=b"\x00\x00\x00"), "odd number of bytes"),
    (bad(audio=b"\x00\x00" * (16000 * 121)), "more than 120 s"),
    (bad({"context_text": ""}), "context_text"),
])
def test_a_bad_job_names_its_field(entry: dict[str, object], names: str) -> None:
    with pytest.raises(WireError, match=names) as caught:
        decode_job(entry)
    if b"earshot:asr:replies:gw-1" in entry.get("meta", b""):  # type: ignore[operator]
        assert caught.value.reply_to == "earshot:asr:replies:gw-1"  # the worker can still answer


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["meta", "audio", "context", b"meta", "other"]),
                       st.one_of(st.binary(max_size=64), st.text(max_size=64)), max_size=4),
       st.dictionaries(st.sampled_from(["v", "id", "kind", "rate", "reply", "deadline", "turn", "prompt", "key"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                                 st.lists(st.integers(), max_size=2)), max_size=9))
def test_any_entry_is_a_job_or_a_wire_error(fields: dict[object, object], meta: dict[str, object]) -> None:
    for entry in (fields, {**fields, "meta": json.dumps(meta).encode(), "audio": b"\x00\x01" * 10}):
        try:
            job = decode_job(entry)
        except WireError:
            continue
        assert isinstance(job.request, TranscriptionRequest)


def result() -> TranscriptionResult:
    return TranscriptionResult(text="hello there", language="en", language_probability=1.0, avg_logprob=-0.2,
                               no_speech_prob=0.01, compression_ratio=1.1, audio_seconds=2.0,
                               processing_seconds=0.3, model="whisper:tiny.en", silence=False)


def test_replies_round_trip() -> None:
    ok = decode_reply(encode_reply(Reply("r1", result(), worker="w1", queued_s=0.25, batch=3)))
    assert ok.result == result() and (ok.request_id, ok.worker, ok.batch) == ("r1", "w1", 3)
    assert ok.queued_s == pytest.approx(0.25)
    failed = decode_reply(encode_reply(Reply("r2", None, "asr-failed", "CUDA out of memory", "w1")))
    assert failed.result is None and (failed.error, failed.message) == ("asr-failed", "CUDA out of memory")


def result_body(**change: object) -> dict[str, object]:
    return {**json.loads(encode_reply(Reply("r", result()))["reply"])["result"], **change}


@pytest.mark.parametrize(("body", "names"), [
    ({"v": 1, "id": "r"}, "'result' or 'error'"),
    ({"v": 1}, "reply.id"),
    ({"v": 1, "id": "r", "result": {"text": "x"}}, "is missing"),
    ({"v": 1, "id": "r", "result": result_body(avg_logprob="low")}, "avg_logprob"),
    ({"v": 1, "id": "r", "result": result_body(silence="no")}, "silence"),
    ({"v": 1, "id": "r", "result": result_body(text=5)}, "text"),
])
def test_a_bad_reply_names_its_field(body: dict[str, object], names: str) -> None:
    with pytest.raises(WireError, match=names):
        decode_reply({"reply": json.dumps(body).encode()})
    with pytest.raises(WireError, match="not JSON"):
        decode_reply({"reply": b"\xff"})


def test_pcm16_conversion_clips_and_rounds() -> None:
    pcm = np.frombuffer(pcm16_from_float(np.array([0.0, 1.5, -1.5, 0.5, -0.25], np.float32)), "<i2")
    assert pcm.tolist() == [0, 32767, -32768, 16384, -8192]


def test_key_names() -> None:
    names = PoolNames("earshot")
    assert names.job_streams == ("earshot:asr:jobs:final", "earshot:asr:jobs:partial")
    assert names.replies("gw-1") == "earshot:asr:replies:gw-1" and names.group == "earshot-asr"
    assert names.worker("w1") == "earshot:asr:worker:w1" and names.gateway("gw-1") == "earshot:gateway:gw-1"


def test_task_and_word_timestamps_travel_only_when_set() -> None:
    plain = json.loads(encode_job(full_request(), "r", 0.0)["meta"])
    assert "task" not in plain and "word_timestamps" not in plain  # what every call's job looks like
    request = TranscriptionRequest(noise(2.0), "final", task="translate", word_timestamps=True)
    got = decode_job(encode_job(request, "r", 0.0)).request
    assert (got.task, got.word_timestamps) == ("translate", True)
    assert (decode_job(encode_job(full_request(), "r", 0.0)).request.task) == "transcribe"


@pytest.mark.parametrize(("change", "names"), [
    ({"task": "summarize"}, "meta.task"),
    ({"word_timestamps": "yes"}, "meta.word_timestamps"),
])
def test_a_bad_task_or_word_flag_names_its_field(change: dict[str, object], names: str) -> None:
    fields = encode_job(full_request(), "r", 0.0)
    meta = json.loads(fields["meta"])
    meta.update(change)
    with pytest.raises(WireError, match=names):
        decode_job({**fields, "meta": json.dumps(meta).encode()})


def test_words_round_trip_in_a_reply() -> None:
    from dataclasses import replace

    from gateway.asr.interface import Word

    words = (Word(" hello", 0.0, 0.42, 0.9), Word(" there", 0.42, 0.8, 0.75))
    with_words = replace(result(), words=words)
    assert decode_reply(encode_reply(Reply("r1", with_words))).result == with_words
    assert "words" not in json.loads(encode_reply(Reply("r1", result()))["reply"])["result"]
    for bad in ([["hello", 0.0, "late", 1.0]], [["hello", 0.0]], "hello", [[1, 0.0, 1.0, 1.0]]):
        with pytest.raises(WireError, match="words"):
            decode_reply({"reply": json.dumps({"v": 1, "id": "r", "result": result_body(words=bad)}).encode()})
