"""``asr_backend: openai``: each turn sent to an OpenAI-compatible ``/v1/audio/transcriptions``.

Any server that speaks that API will do: vLLM, speaches / faster-whisper-server,
a hosted service, or another Earshot. Same contract as the pool: finals
before partials, a waiting partial superseded by a newer request for its key,
:class:`AsrTimeout` at the request's deadline, the energy gate applied here
(a server would turn silence into "Thank you."), errors as
:class:`~gateway.asr.interface.TranscriptionError` with a code.

A request's ``task`` "translate" goes to ``/v1/audio/translations``, and
``word_timestamps`` asks for ``timestamp_granularities[]=word`` (the words of a
verbose_json answer become the result's ``words``).

What the API cannot carry: context audio. Only text context goes, as the
request's ``prompt`` (the leg's earlier text followed by the transcript of
the turns just before). docs/gpu.md and bench/RESULTS.md give what that
costs in accuracy, measured against the embedded backend.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import math
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..interface import (
    AsrTimeout,
    Superseded,
    TranscriberClosed,
    TranscriptionError,
    TranscriptionRequest,
    TranscriptionResult,
    Word,
)
from ..whisper.guard import GuardThresholds, compression_ratio, is_silence, speech_band_level_db
from .wire import pcm16_from_float

log = logging.getLogger(__name__)

__all__ = ["OpenAITranscriber"]

PROMPT_CHARS = 800  # the API keeps about 224 tokens of prompt


class HttpAsrError(TranscriptionError):
    code = "asr-failed"


def wav_bytes(audio: Any, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV file of float32 audio."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16_from_float(audio))
    return out.getvalue()


class _PrioritySlots:
    """``n`` slots; a final waiting for one is served before any partial."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {
            "final": collections.deque(), "partial": collections.deque()}

    async def acquire(self, kind: str) -> None:
        if self._free > 0 and not self._waiting["final"] and (kind == "final" or not self._waiting["partial"]):
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[kind].append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over just as we gave up
            else:
                self._waiting[kind].remove(future)
            raise

    def release(self) -> None:
        for kind in ("final", "partial"):
            queue = self._waiting[kind]
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)
                    return
        self._free += 1


@dataclass
class OpenAIStats:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # kind -> HTTP requests
    timeouts: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: int = 0
    gated: int = 0  # requests answered "silence" by the energy gate without a request
    superseded: int = 0


class OpenAITranscriber:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        model: str = "whisper-1",
        concurrency: int = 4,
        default_timeout_s: float = 15.0,
        guard: GuardThresholds | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{model}"
        self._api_key = api_key
        self._slots = _PrioritySlots(concurrency)
        self.default_timeout_s = default_timeout_s
        self.guard = guard or GuardThresholds()
        self._wall = clock
        self._client: Any = None
        self._in_flight: dict[str, asyncio.Task[TranscriptionResult]] = {}  # key -> its partial's task
        self._tasks: set[asyncio.Task[TranscriptionResult]] = set()  # every request in flight
        self._response_format = "verbose_json"
        self._closed = False
        self.stats = OpenAIStats()

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx.Timeout(self.default_timeout_s, connect=5.0))

    async def close(self) -> None:
        """Refuse new requests, drop partials in flight, let finals in flight finish (each within
        its own deadline), then close the connection pool."""
        self._closed = True
        for task in list(self._in_flight.values()):
            task.cancel()
        finals = [t for t in self._tasks if not t.done()]
        if finals:
            await asyncio.wait(finals)  # each is bounded by its deadline (the HTTP timeout)
        if self._client is not None:
            await self._client.aclose()

    @property
    def queued(self) -> int:
        return len(self._tasks)

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        if self._closed:
            raise TranscriberClosed(f"{self.name} is closed")
        if self._client is None:
            await self.start()
        if request.key:
            older = self._in_flight.pop(request.key, None)
            if older is not None and not older.done():
                self.stats.superseded += 1
                older.cancel(Superseded.__name__)
        deadline = request.deadline if request.deadline is not None else self._wall() + self.default_timeout_s
        started = time.perf_counter()
        if speech_band_level_db(request.audio) < self.guard.gate_db:
            self.stats.gated += 1
            return self._silence(request, time.perf_counter() - started)
        task = asyncio.ensure_future(self._request(request, started, deadline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if request.key and request.kind == "partial":
            self._in_flight[request.key] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - self._wall()))
        except asyncio.TimeoutError:
            task.cancel()
            self.stats.timeouts[request.kind] += 1
            raise AsrTimeout(f"no result for {request.kind} {request.request_id} from {self.base_url} by its deadline") \
                from None
        except asyncio.CancelledError:
            if task.cancelled() and request.kind == "partial" and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                if self._closed:
                    raise TranscriberClosed(f"{self.name} closed before this partial's result came") from None
                raise Superseded(f"partial for {request.key!r} replaced by a newer request") from None
            task.cancel()
            raise
        finally:
            if self._in_flight.get(request.key) is task:
                del self._in_flight[request.key]

    async def _request(self, request: TranscriptionRequest, started: float, deadline: float) -> TranscriptionResult:
        await self._slots.acquire(request.kind)
        try:
            self.stats.requests[request.kind] += 1
            response = await self._post(request, self._response_format, deadline)
            if response.status_code in (400, 422) and self._response_format == "verbose_json":
                retry = await self._post(request, "json", deadline)
                if retry.status_code == 200:  # the server knows json but not verbose_json: keep to json
                    log.info("%s refused verbose_json; asking for json from now on", self.base_url)
                    self._response_format = "json"
                response = retry
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # httpx transport errors
            self.stats.errors += 1
            raise HttpAsrError(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        finally:
            self._slots.release()
        if response.status_code != 200:
            self.stats.errors += 1
            raise HttpAsrError(f"{self.base_url} answered {response.status_code}: {response.text[:300]}")
        try:
            body = response.json()
        except ValueError:
            self.stats.errors += 1
            raise HttpAsrError(f"{self.base_url} answered 200 without JSON") from None
        return self._result(request, body, time.perf_counter() - started)

    async def _post(self, request: TranscriptionRequest, response_format: str, deadline: float) -> Any:
        data: dict[str, Any] = {"model": self.model, "response_format": response_format, "temperature": "0"}
        if request.language and request.task == "transcribe":  # translations take no language
            data["language"] = request.language
        if request.word_timestamps and response_format == "verbose_json":
            data["timestamp_granularities[]"] = ["word", "segment"]
        prompt = " ".join(part for part in (request.prompt, request.context_text) if part and part.strip())
        if prompt:
            data["prompt"] = prompt[-PROMPT_CHARS:]
        files = {"file": ("turn.wav", wav_bytes(request.audio), "audio/wav")}
        left = max(0.05, deadline - self._wall())  # the request's own deadline, not a fixed timeout
        path = "/audio/translations" if request.task == "translate" else "/audio/transcriptions"
        return await self._client.post(path, data=data, files=files,
                                       timeout=httpx.Timeout(left, connect=min(5.0, left)))

    def _silence(self, request: TranscriptionRequest, elapsed: float) -> TranscriptionResult:
        return TranscriptionResult(text="", language=request.language or "", language_probability=0.0,
                                   avg_logprob=0.0, no_speech_prob=1.0, compression_ratio=0.0,
                                   audio_seconds=request.seconds, processing_seconds=elapsed, model=self.name,
                                   silence=True)

    def _result(self, request: TranscriptionRequest, body: Any, elapsed: float) -> TranscriptionResult:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            self.stats.errors += 1
            raise HttpAsrError(f"{self.base_url} answered without a 'text' string")
        text = body["text"].strip()
        segments = body.get("segments") if isinstance(body.get("segments"), list) else []
        logprobs = [s.get("avg_logprob") for s in segments if isinstance(s, dict)]
        no_speech = [s.get("no_speech_prob") for s in segments if isinstance(s, dict)]
        avg_logprob = _mean(logprobs, 0.0)
        no_speech_prob = min((v for v in no_speech if _number(v)), default=0.0)
        ratio = compression_ratio(text)
        language = body.get("language") if isinstance(body.get("language"), str) else (request.language or "")
        silence = is_silence(text, avg_logprob, no_speech_prob, ratio, self.guard) if segments else not text
        return TranscriptionResult(
            text="" if silence else text, language=_iso_language(language), language_probability=1.0 if language else 0.0,
            avg_logprob=avg_logprob, no_speech_prob=no_speech_prob, compression_ratio=ratio,
            audio_seconds=request.seconds, processing_seconds=elapsed, model=self.name, silence=silence,
            words=() if silence or not request.word_timestamps else _words(body.get("words")))


def _words(raw: object) -> tuple[Word, ...]:
    """verbose_json ``words`` ({word, start, end}); malformed items are skipped."""
    if not isinstance(raw, list):
        return ()
    return tuple(Word(item["word"], float(item["start"]), float(item["end"]), 1.0) for item in raw
                 if isinstance(item, dict) and isinstance(item.get("word"), str)
                 and _number(item.get("start")) and _number(item.get("end")))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list[Any], default: float) -> float:
    numbers = [float(v) for v in values if _number(v)]
    return sum(numbers) / len(numbers) if numbers else default


_LANGUAGE_NAMES = {"english": "en", "spanish": "es", "french": "fr", "german": "de", "italian": "it",
                   "portuguese": "pt", "dutch": "nl"}


def _iso_language(language: str) -> str:
    """verbose_json names the language ("english"); events carry ISO 639-1 ("en")."""
    return _LANGUAGE_NAMES.get(language.lower(), language)
