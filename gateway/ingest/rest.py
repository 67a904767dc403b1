"""OpenAI-compatible REST transcription: ``POST /v1/audio/transcriptions``, ``/v1/audio/translations``
and ``GET /v1/models``, so a client of OpenAI's audio API works against Earshot unchanged.

An upload is a session like a call (source ``rest``: ``call.started``, one
``turn.final`` per piece of speech, ``call.ended``), so it reaches Redis, the
SQL store and the dashboard like any call. The file is decoded and cut at
pauses by the same VAD and turn detector a live leg uses
(:mod:`gateway.ingest.upload`, in a thread: a long file must not stall the
event loop that carries the calls); its pieces go to the gateway's own
transcriber a few at a time, so the scheduler (or the pool) batches them
with everything else while a long file never floods the queue that live
calls' finals wait in. Results come back in order, with each piece's
timestamps offset by where it starts in the file.

The response shapes are :mod:`gateway.ingest.transcript`'s; errors have
OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and
status codes, which the SDKs turn into their exception classes. Any model
name is accepted and served by the configured model (``whisper-1``,
``openai/whisper-large-v3``... are what clients send by default). The
client may leave once it has sent the file: the pieces still go out as
events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..asr.interface import (
    TranscriberClosed,
    TranscriptionError,
    TranscriptionRequest,
    TranscriptionResult,
    Word,
)
from ..events import TURN_FINAL, Source
from ..output.redact import Release, redact, redact_words
from ..identity import safe_text
from ..pipeline import _result_fields
from ..session import Session, SessionLimit
from .auth import LimitExceeded
from .transcript import RESPONSE_FORMATS, Segment, Transcript, language_code, render
from .upload import Piece, UploadError, cut, decode

if TYPE_CHECKING:
    from ..media.vad import SileroVad
    from .routes import ApiContext

__all__ = ["ALIASES", "ApiError", "Options", "RestApi", "parse_options", "routes"]

log = logging.getLogger(__name__)

LEG = "upload"  # the one leg of an upload's session
#: model names clients send by default; all are served by the configured model
ALIASES = (
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "whisper-large-v3",
    "whisper-large-v3-turbo",
    "openai/whisper-large-v3",
    "openai/whisper-large-v3-turbo",
    "large-v3",
    "large-v3-turbo",
    "distil-large-v3",
    "Systran/faster-whisper-large-v3",
)
MAX_AUDIO_S = 4 * 3600.0  # decoded length of one upload (16 kHz int16: 460 MB)
FORM_SLACK = 1 << 20  # bytes of multipart framing and text fields allowed beside the file
MIB = 1 << 20


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str]) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**headers, **self.headers})


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class Options:
    """The request's form fields, checked."""

    task: str  # "transcribe" or "translate" (the endpoint)
    model: str
    language: str | None
    prompt: str | None
    temperature: float
    response_format: str
    stream: bool
    words: bool  # timestamp_granularities[] has "word" (verbose_json only)
    segments: bool  # verbose_json lists segments: asked for, or no granularity named


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")
MAX_PROMPT = 16_384


def parse_options(fields: Iterable[tuple[str, str]], task: str) -> Options:
    """Form fields (name, value) -> :class:`Options`; :class:`ApiError` 400 names a bad field.

    Fields the API defines but Earshot has no use for (``include[]``,
    ``chunking_strategy``, ``known_speaker_names[]``...) are ignored.
    """
    values: dict[str, list[str]] = {}
    for name, value in fields:
        values.setdefault(name, []).append(value)

    def one(name: str) -> str | None:
        found = values.get(name)
        return found[-1] if found else None

    model = (one("model") or "").strip()
    response_format = (one("response_format") or "json").strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format {response_format!r:.40} is not supported: use one of "
                       f"{', '.join(RESPONSE_FORMATS)}", param="response_format", code="invalid_value")
    language = None
    raw_language = (one("language") or "").strip()
    if raw_language:
        language = language_code(raw_language)
        if language is None:
            raise ApiError(400, f"language {raw_language!r:.40} is not one Whisper knows: give an ISO 639-1 "
                           "code such as 'en'", param="language", code="invalid_value")
    prompt = one("prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT:
        raise ApiError(400, f"prompt is longer than {MAX_PROMPT} characters", param="prompt", code="invalid_value")
    temperature = 0.0
    raw_temperature = (one("temperature") or "").strip()
    if raw_temperature:
        try:
            temperature = float(raw_temperature)
        except ValueError:
            temperature = float("nan")
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, f"temperature must be a number from 0 to 1, got {raw_temperature!r:.40}",
                           param="temperature", code="invalid_value")
    raw_stream = (one("stream") or "").strip().lower()
    if raw_stream not in _TRUE + _FALSE:
        raise ApiError(400, f"stream must be true or false, got {raw_stream!r:.40}", param="stream",
                       code="invalid_value")
    granularities = [v.strip().lower() for name in ("timestamp_granularities[]", "timestamp_granularities")
                     for value in values.get(name, []) for v in value.split(",") if v.strip()]
    for granularity in granularities:
        if granularity not in ("word", "segment"):
            raise ApiError(400, f"timestamp_granularities[] may hold 'word' and 'segment', not {granularity!r:.40}",
                           param="timestamp_granularities[]", code="invalid_value")
    verbose = response_format == "verbose_json"
    return Options(
        task=task,
        model=model,
        language=language,
        prompt=prompt if prompt and prompt.strip() else None,
        temperature=temperature,
        response_format=response_format,
        stream=raw_stream in _TRUE and task == "transcribe",  # translations do not stream in the API
        words=verbose and "word" in granularities,
        segments=not granularities or "segment" in granularities,
    )


@dataclass(frozen=True)
class _Outcome:
    piece: Piece
    result: TranscriptionResult | None
    error: str = ""  # the TranscriptionError code when there is no result
    redactions: int | None = None  # spans PCI redaction replaced in the text (None: redaction off)


class UploadJob:
    """One upload's pieces through the transcriber, their events, and the session's end.

    Runs as a task of its own: a client that disconnects does not stop it,
    and its slot of the caller's session limit is held until it is done.
    """

    def __init__(self, session: Session, pcm: np.ndarray, pieces: list[Piece], options: Options, *,
                 in_flight: int, final_timeout_s: float, release: Callable[[], None]) -> None:
        self.session = session
        self.pcm = pcm
        self.pieces = pieces
        self.options = options
        self.outcomes: list[asyncio.Future[_Outcome]] = [asyncio.get_running_loop().create_future() for _ in pieces]
        self._in_flight = asyncio.Semaphore(in_flight)
        self._timeout = final_timeout_s
        self._release = release
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name=f"earshot-upload-{self.session.id}")
        return self.task

    async def _run(self) -> None:
        published = 0
        tasks = [asyncio.create_task(self._transcribe(piece)) for piece in self.pieces]
        try:
            redactor = self.session.redactor(LEG)  # docs/redaction.md: pieces are read like a leg's turns
            for index, (task, future) in enumerate(zip(tasks, self.outcomes)):
                outcome = await task
                if redactor is None:
                    ready = [(outcome, future)]
                else:
                    text = outcome.result.text.strip() if outcome.result is not None else ""
                    now = time.monotonic()
                    releases = redactor.final(text, now, (outcome, future))
                    if index == len(tasks) - 1:
                        releases += redactor.flush(now)
                    ready = [(_redacted(release), release.item[1]) for release in releases]
                for done, its_future in ready:
                    if self._publish(done, published + 1):
                        published += 1
                    its_future.set_result(done)
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            for future in self.outcomes:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else TranscriberClosed("upload cancelled"))
            if not isinstance(exc, Exception):
                raise
            log.exception("upload %s failed", self.session.id)
        finally:
            try:
                await self.session.end("completed", {"turns": published})
            finally:
                self._release()

    async def _transcribe(self, piece: Piece) -> _Outcome:
        options = self.options
        async with self._in_flight:
            audio = self.pcm[piece.start:piece.end].astype(np.float32) * np.float32(1.0 / 32768.0)
            request = TranscriptionRequest(
                audio=audio, kind="final", language=options.language, prompt=options.prompt,
                session=self.session.id, turn=piece.index,
                deadline=time.time() + self._timeout if self._timeout else None,
                task=options.task,  # type: ignore[arg-type]
                word_timestamps=options.words,
            )
            try:
                return _Outcome(piece, await self.session.host.transcriber.transcribe(request))
            except TranscriptionError as exc:
                log.warning("no transcript for upload %s piece %d: %s (%s)", self.session.id, piece.index,
                            exc.code, exc)
                return _Outcome(piece, None, exc.code)
            except TranscriberClosed:
                return _Outcome(piece, None, "asr-closed")
            except ValueError as exc:  # the recognizer refused the request (an unsupported language)
                log.warning("upload %s piece %d refused: %s", self.session.id, piece.index, exc)
                return _Outcome(piece, None, "bad-request")
            except Exception:
                log.exception("ASR failed for upload %s piece %d", self.session.id, piece.index)
                return _Outcome(piece, None, "asr-failed")

    def _publish(self, outcome: _Outcome, turn: int) -> bool:
        """The piece's ``turn.final``, with the fields a call's finals carry; False when there is none."""
        result, session = outcome.result, self.session
        text = result.text.strip() if result is not None else ""
        if session.ended or (not text and not outcome.error):
            return False  # the gateway ended the session (drain), or no words in this piece
        piece = outcome.piece
        data: dict[str, Any] = {
            "turn": turn,
            "start_ms": round(piece.start_s * 1000),
            "end_ms": round(piece.end_s * 1000),
            "text": text,
            "reason": piece.reason,
            "partials": 0,
        }
        if result is not None:
            data.update(_result_fields(result))
            data["asr"]["speculative"] = False
        else:
            data["error"] = outcome.error
        if outcome.redactions is not None:
            data["redactions"] = outcome.redactions
        session.publish(session.events.make(TURN_FINAL, data, leg=LEG))
        return True


def _redacted(release: "Release[tuple[_Outcome, asyncio.Future[_Outcome]]]") -> _Outcome:
    """The outcome with its text (and word timestamps) as the redactor released them."""
    outcome = release.item[0]
    result = outcome.result
    if result is None:
        return dataclasses.replace(outcome, redactions=release.count)
    words = result.words
    if words and release.count:
        joined = "".join(w.word for w in words)
        if joined.strip() == result.text.strip():
            lead = len(joined) - len(joined.lstrip())
            spans = [dataclasses.replace(s, start=s.start + lead, end=s.end + lead) for s in release.spans]
        else:  # the words do not spell the text exactly: read them on their own, as a card context
            spans = list(redact(joined, context=True).spans)
        words = tuple(Word(*w) for w in redact_words(((w.word, w.start, w.end, w.probability) for w in words),
                                                      spans))
    return dataclasses.replace(outcome, redactions=release.count,
                               result=dataclasses.replace(result, text=release.text, words=words))


def _transcript(options: Options, outcomes: list[_Outcome], duration: float) -> Transcript:
    segments: list[Segment] = []
    words: list[Word] = []
    language = ""
    for outcome in outcomes:
        result = outcome.result
        if result is None or not result.text.strip():
            continue
        piece = outcome.piece
        language = language or result.language
        segments.append(Segment(len(segments), piece.start_s, piece.end_s, result.text.strip(), result.avg_logprob,
                                result.compression_ratio, result.no_speech_prob))
        words.extend(Word(w.word, piece.start_s + w.start, piece.start_s + w.end, w.probability)
                     for w in result.words)
    return Transcript(options.task, language or options.language or "", duration, tuple(segments), tuple(words))


def _failure(outcomes: list[_Outcome]) -> ApiError | None:
    failed = [o for o in outcomes if o.result is None]
    if not failed:
        return None
    code = failed[0].error
    return ApiError(503, f"no transcript for {len(failed)} of {len(outcomes)} pieces of the audio ({code}); "
                    "the recognizer is overloaded or stopping", type="server_error", code=code)


_INTERNAL = ApiError(500, "the upload failed inside Earshot (see its log)", type="server_error", code="internal_error")


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class RestApi:
    """The endpoints, over the gateway's :class:`~gateway.ingest.routes.ApiContext`."""

    def __init__(self, api: "ApiContext") -> None:
        self.api = api
        self.created = int(time.time())
        self._vad: "SileroVad | None" = None
        self._vad_lock = threading.Lock()
        self.jobs: set[asyncio.Task[None]] = set()

    # -- models
    def model_ids(self) -> list[str]:
        served = self.api.model_name or self.api.settings.asr_model
        return list(dict.fromkeys((served, *ALIASES)))

    def _model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "earshot"}

    async def models(self, request: Request) -> Response:
        headers = {"x-request-id": uuid.uuid4().hex}
        try:
            await self._caller(request)
        except ApiError as err:
            return err.response(headers)
        return JSONResponse({"object": "list", "data": [self._model(m) for m in self.model_ids()]}, headers=headers)

    async def model(self, request: Request) -> Response:
        headers = {"x-request-id": uuid.uuid4().hex}
        try:
            await self._caller(request)
            model_id = request.path_params["model"]
            if model_id not in self.model_ids():
                raise ApiError(404, f"The model {model_id!r:.100} does not exist; GET /v1/models lists those "
                               "served (any name is accepted for transcription)", param="model",
                               code="model_not_found")
        except ApiError as err:
            return err.response(headers)
        return JSONResponse(self._model(model_id), headers=headers)

    # -- transcription
    async def transcriptions(self, request: Request) -> Response:
        return await self._handle(request, "transcribe")

    async def translations(self, request: Request) -> Response:
        return await self._handle(request, "translate")

    async def _caller(self, request: Request):
        caller = await self.api.auth.bearer(request.headers.get("authorization"))
        if caller is None:
            raise ApiError(401, "Missing or invalid API token: send 'Authorization: Bearer <token>' with a token "
                           "from 'earshot users token NAME'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return caller

    async def _handle(self, request: Request, task: str) -> Response:
        request_id = uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        try:
            job = await self._start(request, task, request_id)
        except ApiError as err:
            return err.response(headers)
        headers["x-earshot-call-id"] = job.session.id
        if job.options.stream:
            return StreamingResponse(self._stream(job), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        try:
            outcomes = [await asyncio.shield(future) for future in job.outcomes]
        except Exception:
            return _INTERNAL.response(headers)
        failure = _failure(outcomes)
        if failure is not None:
            return failure.response(headers)
        transcript = _transcript(job.options, outcomes, job.pcm.size / 16000)
        body, media_type = render(transcript, job.options.response_format, segments=job.options.segments,
                                  words=job.options.words)
        if isinstance(body, dict):
            return JSONResponse(body, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    async def _start(self, request: Request, task: str, request_id: str) -> UploadJob:
        """Everything up to the transcription: auth, limits, the form, decoding, cutting, the session."""
        caller = await self._caller(request)
        settings = self.api.settings
        limit = settings.api_max_upload_mb * MIB
        too_large = ApiError(413, f"the file is larger than {settings.api_max_upload_mb} MB, the most this "
                             "Earshot takes (api_max_upload_mb)", param="file", code="file_too_large")
        length = request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > limit + FORM_SLACK:
            raise too_large
        hold = self.api.limits.hold(caller)
        try:
            hold.__enter__()
        except LimitExceeded as exc:
            raise ApiError(429, f"this token already has {exc.limit} sessions open (api_sessions_per_token)",
                           type="requests", code="rate_limit_exceeded") from None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                hold.__exit__(None, None, None)

        try:
            try:
                form = await self._form(request, limit + FORM_SLACK)
            except _TooLarge:
                raise too_large from None
            try:
                options = parse_options(((k, v) for k, v in form.multi_items() if isinstance(v, str)), task)
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "'file' is required: the audio as a multipart/form-data file field",
                                   param="file", code="invalid_value")
                if upload.size is not None and upload.size > limit:
                    raise too_large
                try:
                    pcm = await asyncio.to_thread(decode, upload.file, max_seconds=MAX_AUDIO_S)
                except UploadError as exc:
                    raise ApiError(400, f"{exc.reason}", param="file", code=exc.code) from None
                filename = safe_text(upload.filename, 255) or "upload"  # caller-controlled (gateway/identity.py)
            finally:
                await form.close()
            pieces = await asyncio.to_thread(self._cut, pcm, f"rest/{request_id}")
            language = options.language or settings.asr_language or None
            try:
                session = self.api.host.open(Source("rest", (("request_id", request_id), ("filename", filename))),
                                             [], language=language, started={"legs": [LEG]})
            except SessionLimit as exc:
                message = ("Earshot is shutting down" if exc.reason == "draining"
                           else "Earshot is at its limit of concurrent sessions (max_calls); try again later")
                raise ApiError(503, message, type="server_error", code=exc.reason) from None
            log.info("upload %s (%s, %.1f s): %d pieces, %s", session.id, filename, pcm.size / 16000, len(pieces),
                     task)
            job = UploadJob(session, pcm, pieces, options, in_flight=max(4, settings.asr_max_batch),
                            final_timeout_s=settings.asr_final_timeout_s, release=release)
            self.jobs.add(job.start())
            job.task.add_done_callback(self.jobs.discard)  # type: ignore[union-attr]
            return job
        except BaseException:
            release()
            raise

    async def _form(self, request: Request, limit: int) -> FormData:
        """The multipart form, refusing bodies over ``limit`` bytes while they arrive."""
        received = 0
        receive = request.receive

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge()
            return message

        try:
            return await Request(request.scope, counted).form(max_files=1, max_fields=64)
        except HTTPException as exc:  # malformed multipart
            raise ApiError(400, f"the body is not valid multipart/form-data: {exc.detail}", param="file",
                           code="invalid_value") from None

    def _cut(self, pcm: np.ndarray, key: str) -> list[Piece]:
        with self._vad_lock:
            if self._vad is None:
                from ..media.vad import SileroVad

                self._vad = SileroVad()
            vad = self._vad
        vad.add_stream(key)
        try:
            return cut(pcm, lambda chunk: vad.infer({key: chunk})[key], self.api.host.turn_config)
        finally:
            vad.remove_stream(key)

    async def _stream(self, job: UploadJob) -> AsyncIterator[bytes]:
        """``transcript.text.delta`` per piece, in order, then ``transcript.text.done``."""
        outcomes: list[_Outcome] = []
        said = False
        for future in job.outcomes:
            try:
                outcome = await asyncio.shield(future)
            except Exception:
                yield _sse(_INTERNAL.body())
                return
            if outcome.result is None:
                yield _sse(_failure([outcome]).body())  # type: ignore[union-attr]
                return
            outcomes.append(outcome)
            text = outcome.result.text.strip()
            if text:
                yield _sse({"type": "transcript.text.delta", "delta": " " + text if said else text})
                said = True
        transcript = _transcript(job.options, outcomes, job.pcm.size / 16000)
        yield _sse({"type": "transcript.text.done", "text": transcript.text})


def routes(api: "ApiContext") -> list[BaseRoute]:
    rest = RestApi(api)
    api.extra["rest"] = rest
    return [
        Route("/v1/audio/transcriptions", rest.transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", rest.translations, methods=["POST"]),
        Route("/v1/models", rest.models, methods=["GET"]),
        Route("/v1/models/{model:path}", rest.model, methods=["GET"]),
    ]
