"""In-process Whisper (faster-whisper / CTranslate2) behind the Transcriber interface.

Three things matter for a live call and are handled here rather than by
``WhisperModel.transcribe()``:

- Latency. Whisper's encoder is trained on 30 s windows and faster-whisper
  pads every input to 30 s (``chunk_length`` does not change that: segments
  are padded to 3000 mel frames regardless). A 2 s turn then costs the same
  encoder time as a 30 s one. CTranslate2 accepts shorter mel inputs, so we
  compute the features ourselves and pad them only to the audio length plus
  a margin, rounded up to a bucket (see docs/asr.md for the measured effect
  on WER and latency). Without the margin the decoder loops on the last words.
- Scheduling. A single model serves every call: finals run before partials,
  and a queued partial is dropped once a newer request for the same stream
  arrives, because only the newest partial is worth showing.
- Hallucinations. Whisper transcribes silence and hum as "Thank you." or
  "you"; a transcript of nothing is worse than no transcript, so an energy
  gate runs before the model and Whisper's own confidence signals after it.
- Context. Offline transcription hears a short utterance inside the whole
  call and conditions each window on the text before it; a call leg's turns
  are decoded one by one, which costs accuracy on short turns (docs/asr.md).
  So a request may carry the leg's earlier text (``prompt``: only its last
  ``context_tokens`` tokens are used, a fixed length that keeps requests of
  different calls batchable, since CTranslate2 needs <|startoftranscript|>
  at one position in a batch) and, for finals, the audio of the previous
  turns with their transcript (``context_audio``/``context_text``). That
  audio goes into the 30 s window before the turn and its transcript is
  forced as the decoder's prefix, so the model only writes the new turn.
  The encoder pass costs the same (finals use the 30 s window anyway).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from gateway.asr.interface import (
    SAMPLE_RATE,
    Superseded,
    TranscriberClosed,
    TranscriptionRequest,
    TranscriptionResult,
)
from gateway.asr.models import resolve_model
from gateway.asr.wer import normalize

__all__ = ["GuardThresholds", "WhisperTranscriber", "WindowPolicy", "speech_band_level_db"]

logger = logging.getLogger(__name__)

_MAX_WINDOW_S = 30.0  # Whisper's positional embeddings cover 1500 positions = 30 s
_FRAMES_PER_S = 100  # mel hop of 10 ms
_FULL_FRAMES = int(_MAX_WINDOW_S * _FRAMES_PER_S)
_MAX_TOKENS = 448  # Whisper's decoder context
_MAX_CONTEXT = _MAX_TOKENS // 2 - 1  # previous-text tokens Whisper's prompt can hold (get_prompt keeps these)
_CONTEXT_MARGIN_S = 3.0  # context audio + turn must leave this much of the 30 s window free
_CONTEXT_WINDOW_MIN_S = 15.0  # a final heard after context audio: window >= this (docs/asr.md)


@dataclass(frozen=True)
class WindowPolicy:
    """How many seconds of (padded) audio the encoder sees.

    Bucketed (``fixed`` None): chunk length plus ``margin``, rounded up to a
    multiple of ``bucket``, at most 30 s. The margin matters: with less than
    a few seconds of padding after the speech the decoder tends to repeat the
    utterance instead of ending it. Buckets keep the set of input shapes
    small (on GPU each new shape may allocate).
    ``fixed``: always that many seconds (30 = faster-whisper's behaviour).
    ``finals_full``: finals use the 30 s window (after context audio, one
    fitted to it: see :meth:`frames`), partials the bucketed one: the
    measured accuracy cost of short windows is paid only by partials, which
    are superseded anyway and run far more often (docs/asr.md).
    """

    fixed: float | None = None
    margin: float = 5.0
    bucket: float = 5.0
    finals_full: bool = False

    @classmethod
    def parse(cls, window: str | float) -> WindowPolicy:
        """"auto" (short partials; 30 s finals, fitted after context audio), "short" (bucketed for all) or seconds (1-30)."""
        if window == "auto":
            return cls(finals_full=True)
        if window == "short":
            return cls()
        seconds = window
        if isinstance(window, str):
            try:
                seconds = float(window)
            except ValueError:
                seconds = None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 1.0 <= seconds <= _MAX_WINDOW_S:
            raise ValueError(f"window must be 'auto', 'short' or seconds between 1 and 30, got {window!r}")
        return cls(fixed=float(seconds))

    @property
    def max_chunk_seconds(self) -> float:
        """Longer audio is cut into chunks of at most this length, one window each."""
        return self.fixed if self.fixed is not None else _MAX_WINDOW_S - self.margin

    def frames(self, seconds: float, kind: str = "partial", with_context: bool = False) -> int:
        """Mel frames to pad a chunk of ``seconds`` to (always even: the encoder strides by 2).

        ``with_context``: ``seconds`` includes context audio heard before the turn.
        Such a final gets a bucketed window of at least 15 s instead of the full
        30 s: the window already holds earlier speech and its forced transcript,
        and on the fixtures that cost no word while cutting the encoder's time by
        about 40 %; a final heard alone keeps the 30 s window, which short
        utterances need (WER 0.042 against 0.053 at 20 s on 348 prompts).
        """
        if self.fixed is not None:
            window = self.fixed
        elif self.finals_full and kind == "final" and with_context:
            window = max(_CONTEXT_WINDOW_MIN_S, math.ceil((seconds + self.margin) / self.bucket) * self.bucket)
        elif self.finals_full and kind == "final":
            window = _MAX_WINDOW_S
        else:
            window = math.ceil((seconds + self.margin) / self.bucket) * self.bucket
        frames = round(min(window, _MAX_WINDOW_S) * _FRAMES_PER_S)
        return frames + frames % 2


@dataclass(frozen=True)
class GuardThresholds:
    """When a transcript counts as "no speech". Values measured in docs/asr.md.

    ``gate_db``: loudest frames' level in the 300-3400 Hz telephone band below
    which the model is not even run. ``no_speech_prob``/``logprob``: Whisper's
    own rule (no-speech token likely AND text unlikely). ``compression_ratio``:
    above it the text is a repetition loop. Texts in ``hallucinations`` (what
    Whisper says over silence) need ``hallucination_logprob`` and a no-speech
    probability under ``hallucination_no_speech`` to be believed.
    """

    gate_db: float = -50.0
    no_speech_prob: float = 0.6
    logprob: float = -1.0
    compression_ratio: float = 2.4
    hallucination_logprob: float = -0.5
    hallucination_no_speech: float = 0.3
    hallucinations: frozenset[str] = frozenset(
        {
            "you",
            "thank you",
            "thanks",
            "thank you very much",
            "thanks for watching",
            "thank you for watching",
            "thank you so much for watching",
            "please subscribe",
            "bye",
            "so",
            "okay",
            "oh",
            "um",
            "uh",
            "hmm",
            "the end",
        }
    )


def speech_band_level_db(audio: np.ndarray, percentile: float = 95.0) -> float:
    """Level (dBFS) of the louder 20 ms frames in the 300-3400 Hz telephone band.

    Band-limiting ignores mains hum and DC; a high percentile rather than the
    maximum ignores a single click. A full-scale sine gives about -3 dBFS.
    """
    frame = SAMPLE_RATE // 50
    n = audio.size // frame
    if n == 0:
        return -math.inf
    frames = audio[: n * frame].reshape(n, frame).astype(np.float64)
    spectrum = np.fft.rfft(frames * np.hanning(frame), axis=1)
    freqs = np.fft.rfftfreq(frame, 1.0 / SAMPLE_RATE)
    band = (freqs >= 300.0) & (freqs <= 3400.0)
    # Parseval with the Hann window's power gain (0.375): mean-square of the band component.
    power = 2.0 * (np.abs(spectrum[:, band]) ** 2).sum(axis=1) / (frame * frame * 0.375)
    level = float(np.percentile(power, percentile))
    return 10.0 * math.log10(level) if level > 1e-20 else -math.inf


@dataclass(frozen=True)
class _Window:
    """One encoder window's worth of audio to decode."""

    audio: np.ndarray
    language: str | None
    prompt: str | None
    frames: int
    context: int = _MAX_CONTEXT  # at most this many of the prompt's last tokens
    prefix: str = ""  # transcript of the start of ``audio``, forced as the decoder's first tokens
    context_samples: int = 0  # how much of ``audio`` that prefix covers
    beam: int = 1  # beam size (1: greedy)


@dataclass
class _Decoded:
    text: str
    frames: int  # encoder window used
    runaway: bool  # hit the token cap or compresses too well: the decoder did not find the end
    looping: bool  # runaway, or repeats a phrase: worth a second opinion from the full window
    tokens: int
    language: str
    language_probability: float
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class _Engine:
    """The model and one synchronous transcription; called from worker threads only."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str,
        compute_type: str,
        cpu_threads: int,
        workers: int,
        beam_size: int,
        policy: WindowPolicy,
        guard: GuardThresholds,
        local_files_only: bool,
        context_tokens: int = 32,
        decoder_threads: int = 1,
    ) -> None:
        from faster_whisper import (
            WhisperModel,  # heavy import, only where a model is used
        )

        self.model = WhisperModel(
            model_path,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=workers,
            local_files_only=local_files_only,
        )
        self.generator = self._decoder_model(model_path, cpu_threads, workers, decoder_threads)
        self.beam_size = beam_size
        self.policy = policy
        self.guard = guard
        self.context_tokens = context_tokens
        self._prompt_cache: dict[str, list[int]] = {}
        self.multilingual = self.model.model.is_multilingual
        self._tokenizers: dict[str, object] = {}
        self.fallbacks = 0  # short-window decodes redone with the full window

    def _decoder_model(self, model_path: str, cpu_threads: int, workers: int, decoder_threads: int):
        """The model instance ``generate`` runs on.

        On CPU the decoder's steps are too small to share between threads:
        measured with tiny.en, a step-by-step decode (the forced context prefix,
        then the new tokens) took 151 ms on one thread against 184 ms on two,
        and beam 2 took 189 against 299 ms, while the encoder wants both (415
        against 240 ms). So on CPU a second instance of the same weights with
        ``decoder_threads`` intra-op threads decodes what the first encoded (it
        costs the model's memory once more). On GPU, or with
        ``decoder_threads`` 0 or equal to ``cpu_threads``, one instance does both.
        """
        model = self.model.model
        if decoder_threads <= 0 or model.device != "cpu" or decoder_threads == cpu_threads:
            return model
        import ctranslate2
        from faster_whisper.utils import download_model

        path = model_path if os.path.isdir(model_path) else download_model(model_path, local_files_only=True)
        return ctranslate2.models.Whisper(path, device="cpu", compute_type=model.compute_type,
                                          intra_threads=decoder_threads, inter_threads=workers)

    def _tokenizer(self, language: str):
        from faster_whisper.tokenizer import Tokenizer

        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(
                self.model.hf_tokenizer, self.multilingual, task="transcribe", language=language
            )
        return self._tokenizers[language]

    def transcribe(self, request: TranscriptionRequest, model_name: str) -> TranscriptionResult:
        result = self.transcribe_batch([request], model_name)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transcribe_batch(
        self, requests: Sequence[TranscriptionRequest], model_name: str, *, overloaded: bool = False
    ) -> list[TranscriptionResult | BaseException]:
        """Transcribe several requests; the first window of each is decoded in one batch.

        Per request as with one: energy gate, 30 s re-decode of a looping short
        window, loop truncation, silence guard; later windows of a long turn
        run one by one (each is prompted with the previous one's text). A bad
        request (unsupported language) gets its exception in its slot and does
        not affect the others. ``overloaded``: finals take the partials'
        (short) window, see ``WhisperTranscriber(overload_backlog=...)``.
        """
        started = time.perf_counter()
        results: list[TranscriptionResult | BaseException | None] = [None] * len(requests)
        plans: list[tuple[int, list[np.ndarray], str | None, str]] = []  # (slot, chunks, language, window kind)
        for slot, request in enumerate(requests):
            language = request.language or ("en" if not self.multilingual else None)
            if self.multilingual and language is not None and language not in self.model.supported_languages:
                results[slot] = ValueError(f"language {language!r} is not supported by model {model_name!r}")
                continue
            if not self.multilingual and language not in (None, "en"):
                language = "en"  # an English-only model can only answer in English
            if speech_band_level_db(request.audio) < self.guard.gate_db:
                results[slot] = self._result(request, [], language, model_name, started)
                continue
            kind = "partial" if overloaded else request.kind  # an overload final decodes like a partial
            plans.append((slot, _split(request.audio, self.policy.max_chunk_seconds), language, kind))

        firsts = self.decode_batch([self._first_window(requests[slot], chunks, language, kind)
                                    for slot, chunks, language, kind in plans])
        for (slot, chunks, language, kind), first in zip(plans, firsts):
            request = requests[slot]
            heard: list[_Decoded] = []
            prompt = request.prompt
            context = self.context_tokens  # the caller's context; later windows of the turn get the whole previous window
            beam = self._beam(kind)
            try:
                for i, chunk in enumerate(chunks):
                    if i == 0:
                        decoded = first
                    else:
                        frames = self.policy.frames(chunk.size / SAMPLE_RATE, kind)
                        decoded = self.decode(chunk, language, prompt, frames, context, beam)
                    decoded = self._settle(decoded, chunk, language, prompt, context, beam)
                    if not self._is_silence(decoded):
                        heard.append(decoded)
                        prompt = decoded.text
                        context = _MAX_CONTEXT
            except Exception as exc:  # noqa: BLE001  # one request's failure stays in its slot
                results[slot] = exc
            else:
                results[slot] = self._result(request, heard, language, model_name, started)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _beam(self, kind: str) -> int:
        """Finals use the configured beam (offline transcription's default is 5); partials,
        superseded within a second anyway, and overload finals decode greedily."""
        return self.beam_size if kind == "final" else 1

    def _first_window(self, request: TranscriptionRequest, chunks: list[np.ndarray], language: str | None,
                      kind: str) -> _Window:
        """The request's first window, with its context audio in front where it fits."""
        audio = chunks[0]
        frames, with_context = self._window_frames(request, audio.size / SAMPLE_RATE, len(chunks), kind)
        if with_context:
            context = request.context_audio
            assert context is not None
            return _Window(np.concatenate((context, audio)), language, request.prompt, frames, self.context_tokens,
                           prefix=request.context_text, context_samples=context.size, beam=self._beam(kind))
        return _Window(audio, language, request.prompt, frames, self.context_tokens, beam=self._beam(kind))

    def uses_context(self, request: TranscriptionRequest, chunks: int, kind: str) -> bool:
        """Whether the request's context audio goes in front of its first window.

        Only for finals with the full-window policy (a window grown by context
        would make partials slower), only when the turn fits one window, and
        only whole: cutting the context would part it from its transcript.
        """
        context = request.context_audio
        return (
            context is not None
            and context.size > 0
            and chunks == 1
            and self.policy.frames(request.seconds, kind) >= _FULL_FRAMES
            and context.size + request.audio.size <= (_MAX_WINDOW_S - _CONTEXT_MARGIN_S) * SAMPLE_RATE
            and len(self.tokens(request.context_text)) <= _MAX_CONTEXT
        )

    def _window_frames(self, request: TranscriptionRequest, first_seconds: float, chunks: int,
                       kind: str) -> tuple[int, bool]:
        """Mel frames of the first window (a chunk of ``first_seconds``) and whether the
        request's context audio goes in front of it."""
        if self.uses_context(request, chunks, kind):
            assert request.context_audio is not None
            seconds = first_seconds + request.context_audio.size / SAMPLE_RATE
            return self.policy.frames(seconds, kind, with_context=True), True
        return self.policy.frames(first_seconds, kind), False

    def first_frames(self, request: TranscriptionRequest, kind: str) -> int:
        """Encoder window of the request's first chunk (the batch key's shape), before splitting."""
        limit = self.policy.max_chunk_seconds
        chunks = 1 if request.seconds <= limit else 2  # only "one or more" matters
        return self._window_frames(request, min(request.seconds, limit), chunks, kind)[0]

    def _settle(
        self, decoded: _Decoded, chunk: np.ndarray, language: str | None, prompt: str | None, context: int, beam: int
    ) -> _Decoded:
        """Second opinion for a looping short window, then cut what still loops."""
        if decoded.looping and decoded.frames < _FULL_FRAMES:
            # Short windows occasionally make the decoder repeat itself instead of
            # ending; the full 30 s window it was trained on rarely does.
            self.fallbacks += 1
            decoded = self.decode(chunk, language, prompt, _FULL_FRAMES, context, beam)
        if decoded.runaway:
            text = _collapse_repeats(decoded.text)
            decoded = replace(decoded, text=text, compression_ratio=_compression_ratio(text))
        return decoded

    def _result(
        self,
        request: TranscriptionRequest,
        heard: list[_Decoded],
        language: str | None,
        model_name: str,
        started: float,
    ) -> TranscriptionResult:
        elapsed = time.perf_counter() - started
        if not heard:
            return TranscriptionResult(
                text="",
                language=language or "",
                language_probability=0.0,
                avg_logprob=0.0,
                no_speech_prob=1.0,
                compression_ratio=0.0,
                audio_seconds=request.seconds,
                processing_seconds=elapsed,
                model=model_name,
                silence=True,
            )
        text = " ".join(d.text for d in heard)
        tokens = sum(d.tokens for d in heard) or 1
        first = heard[0]
        return TranscriptionResult(
            text=text,
            language=first.language,
            language_probability=first.language_probability,
            avg_logprob=sum(d.avg_logprob * d.tokens for d in heard) / tokens,
            no_speech_prob=min(d.no_speech_prob for d in heard),
            compression_ratio=_compression_ratio(text),
            audio_seconds=request.seconds,
            processing_seconds=elapsed,
            model=model_name,
            silence=False,
        )

    def decode(
        self,
        audio: np.ndarray,
        language: str | None,
        prompt: str | None,
        frames: int,
        context: int = _MAX_CONTEXT,
        beam: int = 1,
    ) -> _Decoded:
        """One greedy (or beam) pass over at most one window (``frames`` mel frames) of audio."""
        return self.decode_batch([_Window(audio, language, prompt, frames, context, beam=beam)])[0]

    def decode_batch(self, windows: Sequence[_Window]) -> list[_Decoded]:
        """Decode windows together where CTranslate2 allows it, results in input order.

        One ``encode`` + one ``generate`` per group of windows with the same
        frame count (one input tensor) and the same number of prompt tokens
        (CTranslate2 requires <|startoftranscript|> at the same position).
        """
        previous = [self.previous_tokens(w.prompt, w.context) for w in windows]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault((w.frames, len(previous[i]), w.beam), []).append(i)
        decoded: list[_Decoded | None] = [None] * len(windows)
        for members in groups.values():
            for i, d in zip(members, self._decode_group([windows[i] for i in members], [previous[i] for i in members])):
                decoded[i] = d
        return decoded  # type: ignore[return-value]

    def tokens(self, text: str | None) -> list[int]:
        """Tokens of ``text`` as the decoder continues it (leading space); thread-safe, the cache is only a hint."""
        if not text or not text.strip():
            return []
        tokens = self._prompt_cache.get(text)
        if tokens is None:
            tokens = self.model.hf_tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids
            if len(self._prompt_cache) >= 256:
                self._prompt_cache.clear()
            self._prompt_cache[text] = tokens
        return tokens

    def previous_tokens(self, prompt: str | None, context: int = _MAX_CONTEXT) -> list[int]:
        """The last ``context`` tokens of ``prompt``."""
        if context <= 0:
            return []
        return self.tokens(prompt)[-min(context, _MAX_CONTEXT) :]

    def _decode_group(self, windows: Sequence[_Window], previous: Sequence[list[int]]) -> list[_Decoded]:
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self.model
        # Pad the audio with zeros before the log-mel, as OpenAI's Whisper (and its
        # training) does; faster-whisper pads the log-mel with 0.0 instead, which is
        # not silence to the model (speech then gets higher no-speech probabilities).
        hop = model.feature_extractor.hop_length
        features = np.stack(
            [
                model.feature_extractor(np.pad(w.audio, (0, max(0, w.frames * hop - w.audio.size))))[:, : w.frames]
                for w in windows
            ]
        )
        encoder_output = model.encode(features)

        languages = [w.language for w in windows]
        language_probabilities = [1.0] * len(windows)
        if any(language is None for language in languages):
            for i, detected in enumerate(model.model.detect_language(encoder_output)):
                if languages[i] is None:
                    token, language_probabilities[i] = detected[0]
                    languages[i] = token[2:-2]
        tokenizers = [self._tokenizer(language) for language in languages]  # type: ignore[arg-type]
        prefixes = [self.tokens(w.prefix) for w in windows]
        prompts = [model.get_prompt(t, p, without_timestamps=True) + f for t, p, f in zip(tokenizers, previous, prefixes)]
        # Real speech stays well under 10 tokens/s; the cap stops a looping decoder early.
        caps = [
            min(_MAX_TOKENS, len(p) + int((w.audio.size - w.context_samples) / SAMPLE_RATE * 10) + 16)
            for p, w in zip(prompts, windows)
        ]
        max_length = max(caps)
        results = self.generator.generate(
            encoder_output,
            prompts,
            beam_size=windows[0].beam,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizers[0], [-1])),
        )
        out = []
        for i, result in enumerate(results):
            tokens = result.sequences_ids[0][len(prefixes[i]) :]  # the result repeats the forced prefix
            if caps[i] < max_length and len(tokens) >= (caps[i] - len(prompts[i])) // 2:
                # Decoded further than this window's own cap would have let it: alone, the
                # cap could have cut it (CTranslate2 stops at roughly half of max_length's
                # new tokens), so decode it again alone to give exactly the unbatched result.
                out.append(self._decode_group([windows[i]], [previous[i]])[0])
                continue
            # CTranslate2 returns the length-normalized cumulative log prob; Whisper's
            # avg_logprob divides by len + 1 (the end token).
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            text = tokenizers[i].decode(tokens).strip()
            compression_ratio = _compression_ratio(text)
            runaway = len(prompts[i]) + len(tokens) >= caps[i] or compression_ratio > self.guard.compression_ratio
            out.append(
                _Decoded(
                    text=text,
                    frames=windows[i].frames,
                    runaway=runaway,
                    looping=runaway or _first_repeat(normalize(text)) is not None,
                    tokens=len(tokens),
                    language=languages[i],  # type: ignore[arg-type]
                    language_probability=float(language_probabilities[i]),
                    avg_logprob=float(avg_logprob),
                    no_speech_prob=float(result.no_speech_prob),
                    compression_ratio=compression_ratio,
                )
            )
        return out

    def _is_silence(self, d: _Decoded) -> bool:
        g = self.guard
        words = normalize(d.text)
        if not words:
            return True
        if d.no_speech_prob > g.no_speech_prob and d.avg_logprob < g.logprob:
            return True
        if d.compression_ratio > g.compression_ratio:
            return True
        if " ".join(words) in g.hallucinations:
            return d.avg_logprob < g.hallucination_logprob or d.no_speech_prob > g.hallucination_no_speech
        return False


def _first_repeat(words: list[str]) -> tuple[int, int] | None:
    """(start, length) of the earliest phrase repeated back to back, or None.

    A single word counts when it occurs 4 times in a row ("five five five"
    is a phone number), a longer phrase when twice: the typical short-window
    failure is "Call forwarding. Call forwarding." A false alarm only costs
    one extra decode with the full window.
    """
    n = len(words)
    for start in range(n):
        for length in range(1, (n - start) // 2 + 1):
            times = 4 if length == 1 else 2
            if start + length * times > n:
                continue
            phrase = words[start : start + length]
            if all(words[start + k * length : start + (k + 1) * length] == phrase for k in range(1, times)):
                return start, length
    return None


def _collapse_repeats(text: str) -> str:
    """Cut a decoder loop after the first occurrence of the repeated phrase.

    "Press 9 for more entries. Press 9 for more entries. Press" -> "Press 9 for
    more entries." Whisper itself would resample at a higher temperature;
    one truncation is cheaper and keeps the words that were heard.
    """
    raw = text.split()
    found = _first_repeat([" ".join(normalize(word)) for word in raw])
    if found is None:
        return text
    start, length = found
    return " ".join(raw[: start + length])


def _split(audio: np.ndarray, max_seconds: float) -> list[np.ndarray]:
    """Cut audio longer than one window at its quietest 20 ms in the last 40% of each window."""
    limit = int(max_seconds * SAMPLE_RATE)
    if audio.size <= limit:
        return [audio]
    frame = SAMPLE_RATE // 50
    chunks = []
    start = 0
    while audio.size - start > limit:
        lo = start + int(limit * 0.6)
        region = audio[lo : start + limit]
        n = region.size // frame
        energy = (region[: n * frame].reshape(n, frame) ** 2).sum(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        chunks.append(audio[start:cut])
        start = cut
    chunks.append(audio[start:])
    return chunks


class _BatchFailed(Exception):
    """Placeholder result: the whole batch failed (then each request is retried alone)."""


@dataclass(eq=False)
class _Job:
    request: TranscriptionRequest
    future: concurrent.futures.Future[TranscriptionResult]
    superseded: bool = False


class WhisperTranscriber:
    """Transcriber running faster-whisper in worker threads of this process.

    CTranslate2 releases the GIL, so the event loop keeps serving RTP while a
    worker thread decodes. ``workers`` threads share one model (CTranslate2
    ``inter_threads``); ``cpu_threads`` is the intra-op thread count per worker.

    Cross-call batching: a worker that takes a request also takes up to
    ``max_batch - 1`` more from the head of the queue when they can share one
    encode + generate call (same kind, window, language and prompt length), which
    raised throughput by a measured 10-15 % on 2 CPU cores (docs/asr.md). It
    never waits for a batch to fill: an idle queue gives a batch of one, the
    unbatched path. Under overload (more than ``overload_backlog`` finals
    waiting; 0 = never) finals take the short window of partials, about 2.5x
    faster for +0.7 points WER, so latency stays bounded when finals arrive
    faster than 30 s windows can be decoded. ``context_tokens``: how many of
    the last tokens of a request's ``prompt`` (the leg's earlier text) the
    decoder is conditioned on; 0 decodes every request on its own.
    ``beam_size`` applies to finals; partials (and finals under overload)
    decode greedily. ``decoder_threads``: on CPU, decode on a second model
    instance with this many intra-op threads (0: the encoder's instance).
    """

    def __init__(
        self,
        model: str = "tiny.en",
        *,
        device: str = "auto",
        compute_type: str = "default",
        cpu_threads: int = 0,
        workers: int = 1,
        beam_size: int = 2,
        window: str | float = "auto",
        local_files_only: bool = False,
        guard: GuardThresholds | None = None,
        max_batch: int = 2,
        overload_backlog: int = 8,
        context_tokens: int = 32,
        decoder_threads: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        if isinstance(decoder_threads, bool) or not isinstance(decoder_threads, int) or decoder_threads < 0:
            raise ValueError(f"decoder_threads must be an integer of at least 0, got {decoder_threads!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer of at least 1, got {max_batch!r}")
        if isinstance(overload_backlog, bool) or not isinstance(overload_backlog, int) or overload_backlog < 0:
            raise ValueError(f"overload_backlog must be an integer of at least 0 (0 = off), got {overload_backlog!r}")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or not 0 <= context_tokens <= _MAX_CONTEXT:
            raise ValueError(f"context_tokens must be an integer from 0 to {_MAX_CONTEXT}, got {context_tokens!r}")
        self.name = f"whisper:{model}"
        self.model_name = model
        self.max_batch = max_batch
        self.overload_backlog = overload_backlog
        self._engine = _Engine(
            resolve_model(model, local_files_only=local_files_only),
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            workers=workers,
            beam_size=beam_size,
            policy=WindowPolicy.parse(window),
            guard=guard or GuardThresholds(),
            local_files_only=local_files_only,
            context_tokens=context_tokens,
            decoder_threads=decoder_threads,
        )
        self._lock = threading.Condition()
        self._heap: list[tuple[int, int, _Job]] = []
        self._queued_partials: dict[str, _Job] = {}
        self._queued_finals = 0  # finals in the heap, cancelled ones included until popped
        self._sequence = itertools.count()
        self._closed = False
        # Counters for metrics (read without the lock: ints, written by workers only).
        self.batches = 0  # model calls (one per batch, a lone request included)
        self.batched = 0  # requests that shared their call with at least one other
        self.overloaded = 0  # finals decoded with the short window because of a backlog
        self._threads = [
            threading.Thread(target=self._work, name=f"whisper-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a worker (superseded ones excluded)."""
        with self._lock:
            return sum(1 for _, _, job in self._heap if not job.superseded)

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        return await asyncio.wrap_future(self.submit(request))

    def submit(self, request: TranscriptionRequest) -> concurrent.futures.Future[TranscriptionResult]:
        """Queue a request; thread-safe. The asyncio API is :meth:`transcribe`."""
        if not isinstance(request, TranscriptionRequest):
            raise TypeError(f"expected a TranscriptionRequest, got {type(request).__name__}")
        job = _Job(request, concurrent.futures.Future())
        with self._lock:
            if self._closed:
                raise TranscriberClosed(f"{self.name} is closed")
            if request.key:
                older = self._queued_partials.pop(request.key, None)
                if older is not None:
                    older.superseded = True
                    if older.future.set_running_or_notify_cancel():
                        older.future.set_exception(Superseded(f"partial for {request.key!r} replaced by a newer request"))
                if request.kind == "partial":
                    self._queued_partials[request.key] = job
            if request.kind == "final":
                priority = 0
                self._queued_finals += 1
            else:
                priority = 1
            heapq.heappush(self._heap, (priority, next(self._sequence), job))
            self._lock.notify()
        return job.future

    def _batch_key(self, request: TranscriptionRequest, overloaded: bool) -> tuple[str, int, str | None, int]:
        """Requests with equal keys can share one encode + generate call (same input shape
        and prompt length; the prompts' texts may differ)."""
        engine = self._engine
        kind = "partial" if overloaded else request.kind
        prompt_length = len(engine.previous_tokens(request.prompt, engine.context_tokens))
        return request.kind, engine.first_frames(request, kind), request.language, prompt_length

    def _pop(self, key: tuple[str, int, str | None, int] | None = None, overloaded: bool = False) -> _Job | None:
        """The next runnable job; with ``key``, only if the head of the queue has that key.

        Only the head: taking a later compatible request past an incompatible
        one would break FIFO order within a kind. Called with the lock held.
        """
        while self._heap:
            job = self._heap[0][2]
            if job.superseded:
                heapq.heappop(self._heap)
                continue
            if key is not None and self._batch_key(job.request, overloaded) != key:
                return None
            heapq.heappop(self._heap)
            if job.request.kind == "final":
                self._queued_finals -= 1
            if self._queued_partials.get(job.request.key) is job:
                del self._queued_partials[job.request.key]
            if job.future.set_running_or_notify_cancel():  # False: the caller gave up
                return job
        return None

    def _next_jobs(self) -> tuple[list[_Job], bool] | None:
        """A batch to run and whether it is an overload batch; None once closed and drained."""
        with self._lock:
            while True:
                backlog = self._queued_finals
                first = self._pop()
                if first is not None:
                    overloaded = first.request.kind == "final" and 0 < self.overload_backlog < backlog
                    key = self._batch_key(first.request, overloaded)
                    jobs = [first]
                    while len(jobs) < self.max_batch and (job := self._pop(key, overloaded)) is not None:
                        jobs.append(job)
                    return jobs, overloaded
                if self._closed:
                    return None
                self._lock.wait()

    def _work(self) -> None:
        while (taken := self._next_jobs()) is not None:
            jobs, overloaded = taken
            self.batches += 1
            if len(jobs) > 1:
                self.batched += len(jobs)
            if overloaded:
                self.overloaded += len(jobs)
            results = self._run([job.request for job in jobs], overloaded)
            if len(jobs) > 1 and isinstance(results[0], _BatchFailed):
                # The batch as a whole failed: give every request its own chance.
                results = [self._run([job.request], overloaded)[0] for job in jobs]
            for job, result in zip(jobs, results):
                if isinstance(result, BaseException):  # delivered to the caller; the worker lives on
                    logger.error("transcription failed (%s, %.2f s): %r", job.request.kind, job.request.seconds, result)
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run(self, requests: list[TranscriptionRequest], overloaded: bool) -> list[TranscriptionResult | BaseException]:
        try:
            return self._engine.transcribe_batch(requests, self.model_name, overloaded=overloaded)
        except Exception as exc:
            logger.exception("transcription of %d request(s) failed", len(requests))
            return [_BatchFailed(exc)] * len(requests) if len(requests) > 1 else [exc]

    async def close(self) -> None:
        """Refuse new requests, drop queued partials, finish queued finals, stop the workers."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _, _, job in self._heap:
                    if job.request.kind == "partial" and not job.superseded:
                        job.superseded = True
                        if job.future.set_running_or_notify_cancel():
                            job.future.set_exception(TranscriberClosed(f"{self.name} closed before this partial ran"))
                self._queued_partials.clear()
                self._lock.notify_all()
        threads = [t for t in self._threads if t.is_alive()]
        if threads:
            await asyncio.to_thread(lambda: [t.join() for t in threads])
