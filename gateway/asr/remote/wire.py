"""The ASR pool's wire format: jobs and replies as Redis stream entries, and the key names.

Sans-I/O: plain functions from a :class:`~gateway.asr.interface.TranscriptionRequest`
to stream-entry fields and back, with every field of a received entry checked
(a worker must survive any entry a buggy or hostile producer writes; a bad one
becomes a :class:`WireError` naming the field, never a crash).

A job entry has three fields:

- ``meta``: JSON with the request's scalar fields (id, kind, key, session,
  turn, language, prompt, context text, deadline; ``task`` and
  ``word_timestamps`` only when a request sets them), the audio's sample rate
  and resampler, the lengths of the context's parts, the reply stream and
  the time it was sent;
- ``audio``: the turn as 16-bit little-endian PCM at ``meta.rate``;
- ``context``: the context audio the same way (optional).

Audio travels at its native rate: a telephone leg's request carries its
:class:`~gateway.asr.interface.SourceAudio`, 8 kHz 16-bit PCM, and the
worker upsamples it with the gateway's own resampler, turn by turn for the
context (``meta.context_parts``, each followed by ``meta.context_gap`` zero
samples), which rebuilds the engine's 16 kHz float32 samples exactly: the
pool decodes what the embedded transcriber would, from a quarter of the
bytes (a final with 10 s of context and a 5 s turn: 240 KB). A request
without a source goes as 16-bit PCM at 16 kHz (quantized: within half a
step of the float samples). A reply entry carries one ``reply`` field,
JSON: the result (with ``words`` as ``[word, start, end, probability]``
lists when it has any), or an error code with a message.

``task``, ``word_timestamps`` and ``words`` are optional, so the version
stays 1: a worker older than them ignores them (it transcribes a translate
job, without words), which only a mixed-version pool can meet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..interface import SAMPLE_RATE, TASKS, SourceAudio, TranscriptionRequest, TranscriptionResult, Word

__all__ = [
    "MAX_AUDIO_S",
    "WIRE_VERSION",
    "Job",
    "PoolNames",
    "Reply",
    "WireError",
    "decode_job",
    "decode_reply",
    "encode_job",
    "encode_reply",
    "float_from_pcm16",
    "pcm16_from_float",
]

WIRE_VERSION = 1
MAX_AUDIO_S = 120.0  # longer audio in one job is refused (a turn is at most max_turn_s)
RATES = (8000, 16000)
_MAX_TEXT = 16_384  # characters of prompt or context text
_MAX_WORDS = 10_000  # words in one result (MAX_AUDIO_S of fast speech is well under)


class WireError(ValueError):
    """An entry that is not a valid job or reply; ``reply_to`` when that much could be read."""

    def __init__(self, reason: str, *, request_id: str = "", reply_to: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id
        self.reply_to = reply_to


@dataclass(frozen=True)
class PoolNames:
    """Redis key names of one pool (all under the gateway's ``stream_prefix``)."""

    prefix: str = "earshot"
    group: str = "earshot-asr"  # the workers' consumer group on both job streams

    def jobs(self, kind: str) -> str:
        """Finals and partials have a stream each: a worker reads finals first."""
        return f"{self.prefix}:asr:jobs:{kind}"

    @property
    def job_streams(self) -> tuple[str, str]:
        return self.jobs("final"), self.jobs("partial")

    def replies(self, instance: str) -> str:
        """The reply stream of one gateway instance."""
        return f"{self.prefix}:asr:replies:{instance}"

    def cancel(self, request_id: str) -> str:
        """Present (with a TTL) when the gateway no longer wants the job's result."""
        return f"{self.prefix}:asr:cancel:{request_id}"

    def worker(self, worker_id: str) -> str:
        """A worker's heartbeat (JSON, with a TTL of a few heartbeats)."""
        return f"{self.prefix}:asr:worker:{worker_id}"

    @property
    def workers_pattern(self) -> str:
        return f"{self.prefix}:asr:worker:*"

    def gateway(self, instance: str) -> str:
        """A gateway instance's heartbeat (JSON, with a TTL)."""
        return f"{self.prefix}:gateway:{instance}"

    @property
    def gateways_pattern(self) -> str:
        return f"{self.prefix}:gateway:*"


def pcm16_from_float(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> 16-bit little-endian PCM (clipped, rounded)."""
    scaled = np.clip(np.rint(audio.astype(np.float64) * 32768.0), -32768, 32767)
    return scaled.astype("<i2").tobytes()


def float_from_pcm16(data: bytes) -> np.ndarray:
    """16-bit little-endian PCM -> float32 in [-1, 1)."""
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768.0))


@dataclass(frozen=True)
class Job:
    """A job as a worker reads it."""

    request: TranscriptionRequest
    reply_to: str
    sent_at: float  # the sender's wall clock
    rate: int  # sample rate the audio came in at


def encode_job(request: TranscriptionRequest, reply_to: str, sent_at: float) -> dict[str, bytes]:
    source = request.source
    meta: dict[str, Any] = {
        "v": WIRE_VERSION,
        "id": request.request_id,
        "kind": request.kind,
        "key": request.key,
        "session": request.session,
        "turn": request.turn,
        "language": request.language,
        "prompt": request.prompt,
        "context_text": request.context_text,
        "deadline": request.deadline,
        "rate": SAMPLE_RATE if source is None else source.rate,
        "reply": reply_to,
        "sent": sent_at,
    }
    if request.task != "transcribe":
        meta["task"] = request.task
    if request.word_timestamps:
        meta["word_timestamps"] = True
    has_context = request.context_audio is not None and request.context_audio.size > 0
    if source is None:
        fields = {"audio": pcm16_from_float(request.audio)}
        if has_context:
            fields["context"] = pcm16_from_float(request.context_audio)  # type: ignore[arg-type]
    else:
        meta["resampler"] = source.resampler
        fields = {"audio": source.audio.astype("<i2").tobytes()}
        if has_context:
            meta["context_parts"] = [int(part.size) for part in source.context]
            meta["context_gap"] = source.context_gap
            fields["context"] = b"".join(part.astype("<i2").tobytes() for part in source.context)
    fields["meta"] = json.dumps(meta, separators=(",", ":")).encode()
    return fields


def _field(fields: Mapping[Any, Any], name: str) -> bytes | None:
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else bytes(value)


def _text(meta: dict[str, Any], name: str, *, optional: bool = True, limit: int = _MAX_TEXT) -> str | None:
    value = meta.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WireError(f"meta.{name} must be a string")
    if len(value) > limit:
        raise WireError(f"meta.{name} is longer than {limit} characters")
    return value


def _pcm(data: bytes | None, name: str, rate: int) -> np.ndarray:
    """A field of 16-bit PCM as int16 samples, checked."""
    if data is None:
        raise WireError(f"field {name!r} is missing")
    if len(data) % 2:
        raise WireError(f"field {name!r} has an odd number of bytes (not 16-bit PCM)")
    if len(data) // 2 > MAX_AUDIO_S * rate:
        raise WireError(f"field {name!r} holds more than {MAX_AUDIO_S:.0f} s of audio")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def _upsample(pcm: np.ndarray, resampler: str) -> np.ndarray:
    from ...media.resample import upsample_8k_to_16k  # the gateway's own resampler: the same samples

    return np.ascontiguousarray(upsample_8k_to_16k(pcm, method=resampler), dtype=np.float32)


def _source_audio(meta: dict[str, Any], audio_raw: bytes | None, context_raw: bytes | None, rate: int
                  ) -> tuple[np.ndarray, np.ndarray | None, SourceAudio]:
    """8 kHz audio and context parts -> the 16 kHz samples the gateway's engine would decode."""
    from ...media.resample import RESAMPLERS

    resampler = meta.get("resampler", "polyphase")
    if resampler not in RESAMPLERS:
        raise WireError(f"meta.resampler must be one of {sorted(RESAMPLERS)}, got {resampler!r}")
    pcm = _pcm(audio_raw, "audio", rate)
    parts: tuple[np.ndarray, ...] = ()
    gap = 0
    context = None
    if context_raw:
        sizes = meta.get("context_parts")
        gap = meta.get("context_gap", 0)
        if not isinstance(sizes, list) or not sizes or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise WireError("meta.context_parts must list the context turns' lengths (positive integers)")
        if isinstance(gap, bool) or not isinstance(gap, int) or not 0 <= gap <= 5 * SAMPLE_RATE:
            raise WireError("meta.context_gap must be an integer from 0 to 80000 (16 kHz samples)")
        whole = _pcm(context_raw, "context", rate)
        if sum(sizes) != whole.size:
            raise WireError(f"meta.context_parts add up to {sum(sizes)} samples, field 'context' holds {whole.size}")
        bounds = np.cumsum([0, *sizes])
        parts = tuple(whole[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        silence = np.zeros(gap, np.float32)
        context = np.concatenate([piece for part in parts for piece in (_upsample(part, resampler), silence)])
    return _upsample(pcm, resampler), context, SourceAudio(rate, resampler, pcm, parts, gap)


def decode_job(fields: Mapping[Any, Any]) -> Job:
    """A job entry's fields -> :class:`Job`; :class:`WireError` names what is wrong."""
    raw = _field(fields, "meta")
    if raw is None:
        raise WireError("field 'meta' is missing")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"field 'meta' is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError("field 'meta' must be a JSON object")
    request_id = meta.get("id") if isinstance(meta.get("id"), str) else ""
    reply_to = meta.get("reply") if isinstance(meta.get("reply"), str) else ""
    try:
        if meta.get("v") != WIRE_VERSION:
            raise WireError(f"meta.v must be {WIRE_VERSION}, got {meta.get('v')!r}")
        if not request_id or len(request_id) > 128:
            raise WireError("meta.id must be a non-empty string of at most 128 characters")
        if not reply_to or len(reply_to) > 512:
            raise WireError("meta.reply must be a non-empty stream name")
        kind = meta.get("kind")
        if kind not in ("final", "partial"):
            raise WireError(f"meta.kind must be 'final' or 'partial', got {kind!r}")
        rate = meta.get("rate")
        if rate not in RATES or isinstance(rate, bool):
            raise WireError(f"meta.rate must be one of {RATES}, got {rate!r}")
        turn = meta.get("turn", 0)
        if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
            raise WireError("meta.turn must be a non-negative integer")
        deadline = meta.get("deadline")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not math.isfinite(deadline)):
            raise WireError("meta.deadline must be a number (seconds since the epoch) or null")
        sent = meta.get("sent", 0.0)
        if isinstance(sent, bool) or not isinstance(sent, (int, float)) or not math.isfinite(sent):
            raise WireError("meta.sent must be a number (seconds since the epoch)")
        language = _text(meta, "language", limit=16) or None
        prompt = _text(meta, "prompt")
        context_text = _text(meta, "context_text") or ""
        key = _text(meta, "key", limit=512) or ""
        session = _text(meta, "session", limit=512) or ""
        task = meta.get("task", "transcribe")
        if task not in TASKS:
            raise WireError(f"meta.task must be one of {list(TASKS)}, got {task!r:.40}")
        word_timestamps = meta.get("word_timestamps", False)
        if not isinstance(word_timestamps, bool):
            raise WireError("meta.word_timestamps must be true or false")
        context_raw = _field(fields, "context")
        source = None
        if rate == SAMPLE_RATE:
            audio_raw = _field(fields, "audio")
            _pcm(audio_raw, "audio", rate)  # checked
            audio = float_from_pcm16(audio_raw)  # type: ignore[arg-type]
            context = None
            if context_raw:
                _pcm(context_raw, "context", rate)
                context = float_from_pcm16(context_raw)
        else:
            audio, context, source = _source_audio(meta, _field(fields, "audio"), context_raw, rate)
        if context is not None and not context_text.strip():
            raise WireError("field 'context' needs its transcript in meta.context_text")
        try:
            request = TranscriptionRequest(
                audio=audio, kind=kind, language=language, prompt=prompt, key=key, context_audio=context,
                context_text=context_text if context is not None else "", deadline=deadline, session=session,
                turn=turn, request_id=request_id, source=source, task=task, word_timestamps=word_timestamps)
        except (TypeError, ValueError) as exc:
            raise WireError(str(exc)) from None
    except WireError as exc:
        exc.request_id, exc.reply_to = request_id, reply_to
        raise
    return Job(request, reply_to, float(sent), rate)


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one job: a result, or an error code (``asr-failed``, ``bad-request``)."""

    request_id: str
    result: TranscriptionResult | None
    error: str = ""
    message: str = ""
    worker: str = ""
    queued_s: float = 0.0  # from sent to started, by the two machines' clocks
    batch: int = 0  # size of the batch it was decoded in


_RESULT_FIELDS = ("text", "language", "language_probability", "avg_logprob", "no_speech_prob", "compression_ratio",
                  "audio_seconds", "processing_seconds", "model", "silence")


def encode_reply(reply: Reply) -> dict[str, bytes]:
    body: dict[str, Any] = {"v": WIRE_VERSION, "id": reply.request_id, "worker": reply.worker,
                            "queued_s": round(reply.queued_s, 4), "batch": reply.batch}
    if reply.result is not None:
        body["result"] = {name: getattr(reply.result, name) for name in _RESULT_FIELDS}
        if reply.result.words:
            body["result"]["words"] = [[w.word, w.start, w.end, w.probability] for w in reply.result.words]
    else:
        body["error"] = reply.error or "asr-failed"
        body["message"] = reply.message[:2000]
    return {"reply": json.dumps(body, separators=(",", ":")).encode()}


def decode_reply(fields: Mapping[Any, Any]) -> Reply:
    raw = _field(fields, "reply")
    if raw is None:
        raise WireError("field 'reply' is missing")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"field 'reply' is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != WIRE_VERSION:
        raise WireError(f"reply must be a JSON object with v={WIRE_VERSION}")
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise WireError("reply.id must be a non-empty string")
    worker = body.get("worker") if isinstance(body.get("worker"), str) else ""
    queued = body.get("queued_s", 0.0)
    batch = body.get("batch", 0)
    queued_s = float(queued) if isinstance(queued, (int, float)) and not isinstance(queued, bool) else 0.0
    batch_n = batch if isinstance(batch, int) and not isinstance(batch, bool) else 0
    result = body.get("result")
    if result is None:
        error = body.get("error")
        if not isinstance(error, str) or not error:
            raise WireError("reply needs 'result' or 'error'", request_id=request_id)
        message = body.get("message") if isinstance(body.get("message"), str) else ""
        return Reply(request_id, None, error, message, worker, queued_s, batch_n)
    if not isinstance(result, dict):
        raise WireError("reply.result must be an object", request_id=request_id)
    try:
        values = {name: result[name] for name in _RESULT_FIELDS}
    except KeyError as exc:
        raise WireError(f"reply.result.{exc.args[0]} is missing", request_id=request_id) from None
    for name in ("text", "language", "model"):
        if not isinstance(values[name], str):
            raise WireError(f"reply.result.{name} must be a string", request_id=request_id)
    if not isinstance(values["silence"], bool):
        raise WireError("reply.result.silence must be true or false", request_id=request_id)
    for name in ("language_probability", "avg_logprob", "no_speech_prob", "compression_ratio", "audio_seconds",
                 "processing_seconds"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WireError(f"reply.result.{name} must be a finite number", request_id=request_id)
        values[name] = float(value)
    words = _words(result.get("words"), request_id)
    return Reply(request_id, TranscriptionResult(**values, words=words), worker=worker, queued_s=queued_s,
                 batch=batch_n)


def _words(raw: object, request_id: str) -> tuple[Word, ...]:
    """``reply.result.words``: absent, or a list of ``[word, start, end, probability]``."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > _MAX_WORDS:
        raise WireError(f"reply.result.words must be a list of at most {_MAX_WORDS} words", request_id=request_id)
    words = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and len(item[0]) <= 256
                and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                        for v in item[1:])):
            raise WireError("reply.result.words items must be [word, start, end, probability]",
                            request_id=request_id)
        words.append(Word(item[0], float(item[1]), float(item[2]), float(item[3])))
    return tuple(words)
