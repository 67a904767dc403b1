"""The Whisper engine: a faster-whisper / CTranslate2 model and batched, synchronous decoding.

What it does beyond ``WhisperModel.transcribe()`` and why:

- Latency: a window fitted to the request instead of always 30 s
  (:mod:`.window`).
- Batching: the first window of several requests is decoded in one
  ``encode`` + ``generate`` call when their shapes allow (same frames and
  prompt length); :meth:`WhisperEngine.batch_key` tells the scheduler which
  requests those are, and a batched result equals the unbatched one.
- Hallucinations: the silence guard (:mod:`.guard`) runs here, wherever the
  engine runs.
- Words and translation (REST uploads): a request's ``task`` selects the
  decoder's task token, and ``word_timestamps`` aligns the decoded tokens
  with the audio through the model's cross-attention heads (CTranslate2's
  ``align``, as faster-whisper's own ``word_timestamps`` does) on the
  encoder output the decode already computed.
- Context. Offline transcription hears a short utterance inside the whole
  call and conditions each window on the text before it; a call leg's turns
  are decoded one by one, which costs accuracy on short turns (docs/asr.md).
  So a request may carry the leg's earlier text (``prompt``: only its last
  ``context_tokens`` tokens are used, a fixed length that keeps requests of
  different calls batchable, since CTranslate2 needs <|startoftranscript|>
  at one position in a batch) and, for finals, the audio of the previous
  turns with their transcript (``context_audio``/``context_text``). That
  audio goes into the window before the turn and its transcript is forced
  as the decoder's prefix, so the model only writes the new turn.

The same class runs in the gateway (embedded) and in ``earshot worker``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..interface import SAMPLE_RATE, TranscriptionRequest, TranscriptionResult, Word
from ..models import resolve_model
from ..wer import normalize
from .guard import GuardThresholds, collapse_repeats, compression_ratio, first_repeat, is_silence, speech_band_level_db
from .window import (
    CONTEXT_MARGIN_S,
    FULL_FRAMES,
    MAX_CONTEXT,
    MAX_TOKENS,
    MAX_WINDOW_S,
    WindowPolicy,
    split_audio,
)

__all__ = ["WhisperEngine", "resolve_compute_type", "resolve_device"]


def resolve_device(device: str) -> str:
    """"auto": "cuda" where CTranslate2 sees a CUDA GPU, else "cpu"."""
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    """"default": float16 on a GPU, int8 on a CPU. The packaged models are stored as
    float16, which CTranslate2 would otherwise run as float32 on a CPU: 1.5-2x slower
    than int8 for the same accuracy (docs/asr.md)."""
    if compute_type != "default":
        return compute_type
    return "float16" if resolve_device(device).startswith("cuda") else "int8"


@dataclass(frozen=True)
class _Window:
    """One encoder window's worth of audio to decode."""

    audio: np.ndarray
    language: str | None
    prompt: str | None
    frames: int
    context: int = MAX_CONTEXT  # at most this many of the prompt's last tokens
    prefix: str = ""  # transcript of the start of ``audio``, forced as the decoder's first tokens
    context_samples: int = 0  # how much of ``audio`` that prefix covers
    beam: int = 1  # beam size (1: greedy)
    task: str = "transcribe"  # or "translate"
    words: bool = False  # align the decoded words with the audio


# faster-whisper's defaults: punctuation joined to the word before (or after) it
_PREPEND_PUNCTUATIONS = "\"'“¿([{-"
_APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


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
    words: tuple[Word, ...] = ()  # seconds from the start of the window's audio


class WhisperEngine:
    """A faster-whisper model and synchronous, batched transcription; called from runner threads.

    ``model``: a spec for :func:`gateway.asr.models.resolve_model` (packaged
    ``tiny.en``, a CTranslate2 directory, a size name or hub id). ``device``
    ``auto`` takes a CUDA GPU where CTranslate2 sees one, else the CPU;
    ``compute_type`` ``default`` is float16 on a GPU and int8 on a CPU (see
    :func:`resolve_compute_type`). ``threads``: runner threads sharing the
    model (CTranslate2 ``inter_threads``); ``cpu_threads`` the intra-op
    threads of each. ``beam_size`` applies to finals; partials (and finals of
    an overload batch) decode greedily. ``context_tokens``: how many of the
    last tokens of a request's ``prompt`` the decoder is conditioned on (0:
    none). ``decoder_threads``: on CPU, decode on a second model instance
    with this many intra-op threads (0: the encoder's instance).
    Raises :class:`~gateway.asr.models.ModelNotFound` (or the loader's own
    error) when the model cannot be loaded.
    """

    def __init__(
        self,
        model: str = "tiny.en",
        *,
        device: str = "auto",
        compute_type: str = "default",
        cpu_threads: int = 0,
        threads: int = 1,
        beam_size: int = 2,
        window: str | float | WindowPolicy = "auto",
        guard: GuardThresholds | None = None,
        local_files_only: bool = False,
        context_tokens: int = 32,
        decoder_threads: int = 1,
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be an integer of at least 1, got {beam_size!r}")
        if isinstance(decoder_threads, bool) or not isinstance(decoder_threads, int) or decoder_threads < 0:
            raise ValueError(f"decoder_threads must be an integer of at least 0, got {decoder_threads!r}")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) \
                or not 0 <= context_tokens <= MAX_CONTEXT:
            raise ValueError(f"context_tokens must be an integer from 0 to {MAX_CONTEXT}, got {context_tokens!r}")
        from faster_whisper import WhisperModel  # heavy import, only where a model is used

        policy = window if isinstance(window, WindowPolicy) else WindowPolicy.parse(window)
        model_path = resolve_model(model, local_files_only=local_files_only)
        device = resolve_device(device)
        compute_type = resolve_compute_type(compute_type, device)
        self.name = f"whisper:{model}"
        self.model_name = model
        self.threads = threads
        self.device = device
        self.compute_type = compute_type
        self.model = WhisperModel(
            model_path,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=threads,
            local_files_only=local_files_only,
        )
        self.generator = self._decoder_model(model_path, cpu_threads, threads, decoder_threads)
        self.beam_size = beam_size
        self.policy = policy
        self.guard = guard or GuardThresholds()
        self.context_tokens = context_tokens
        self._prompt_cache: dict[str, list[int]] = {}
        self.multilingual = self.model.model.is_multilingual
        self._tokenizers: dict[str, object] = {}
        self.fallbacks = 0  # short-window decodes redone with the full window

    def batch_key(self, request: TranscriptionRequest, overloaded: bool) -> Hashable:
        """Requests with equal keys can share one encode + generate call: same kind, input
        shape (window frames), language, prompt length (the prompts' texts may differ),
        task and word alignment."""
        kind = "partial" if overloaded else request.kind
        prompt_length = len(self.previous_tokens(request.prompt, self.context_tokens))
        return (request.kind, self.first_frames(request, kind), request.language, prompt_length,
                request.task, request.word_timestamps)

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

    def _tokenizer(self, language: str, task: str = "transcribe"):
        from faster_whisper.tokenizer import Tokenizer

        key = (language, task)
        if key not in self._tokenizers:
            self._tokenizers[key] = Tokenizer(self.model.hf_tokenizer, self.multilingual, task=task, language=language)
        return self._tokenizers[key]

    def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        result = self.transcribe_batch([request])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transcribe_batch(
        self, requests: Sequence[TranscriptionRequest], *, overloaded: bool = False
    ) -> list[TranscriptionResult | BaseException]:
        """Transcribe several requests; the first window of each is decoded in one batch.

        Per request as with one: energy gate, 30 s re-decode of a looping short
        window, loop truncation, silence guard; later windows of a long turn
        run one by one (each is prompted with the previous one's text). A bad
        request (unsupported language) gets its exception in its slot and does
        not affect the others. ``overloaded``: finals take the partials'
        (short) window, see :class:`~gateway.asr.scheduler.SchedulerLimits`.
        """
        started = time.perf_counter()
        model_name = self.model_name
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
            plans.append((slot, split_audio(request.audio, self.policy.max_chunk_seconds), language, kind))

        firsts = self.decode_batch([self._first_window(requests[slot], chunks, language, kind)
                                    for slot, chunks, language, kind in plans])
        for (slot, chunks, language, kind), first in zip(plans, firsts):
            request = requests[slot]
            heard: list[tuple[_Decoded, int]] = []  # (window, its first sample in the request's audio)
            offset = 0
            prompt = request.prompt
            context = self.context_tokens  # the caller's context; later windows of the turn get the whole previous window
            beam = self._beam(kind)
            options = {"task": request.task, "words": request.word_timestamps}
            try:
                for i, chunk in enumerate(chunks):
                    if i == 0:
                        decoded = first
                    else:
                        frames = self.policy.frames(chunk.size / SAMPLE_RATE, kind)
                        decoded = self.decode(chunk, language, prompt, frames, context, beam, **options)
                    decoded = self._settle(decoded, chunk, language, prompt, context, beam, **options)
                    if not self._is_silence(decoded):
                        heard.append((decoded, offset))
                        prompt = decoded.text
                        context = MAX_CONTEXT
                    offset += chunk.size
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
        options = {"beam": self._beam(kind), "task": request.task, "words": request.word_timestamps}
        if with_context:
            context = request.context_audio
            assert context is not None
            return _Window(np.concatenate((context, audio)), language, request.prompt, frames, self.context_tokens,
                           prefix=request.context_text, context_samples=context.size, **options)
        return _Window(audio, language, request.prompt, frames, self.context_tokens, **options)

    def uses_context(self, request: TranscriptionRequest, chunks: int, kind: str) -> bool:
        """Whether the request's context audio goes in front of its first window.

        Only for finals with the full-window policy (a window grown by context
        would make partials slower), only when the turn fits one window, and
        only whole: cutting the context would part it from its transcript.
        Never with word timestamps: the words are aligned from the decoder's
        start, which the forced context transcript would move.
        """
        context = request.context_audio
        return (
            not request.word_timestamps
            and context is not None
            and context.size > 0
            and chunks == 1
            and self.policy.frames(request.seconds, kind) >= FULL_FRAMES
            and context.size + request.audio.size <= (MAX_WINDOW_S - CONTEXT_MARGIN_S) * SAMPLE_RATE
            and len(self.tokens(request.context_text)) <= MAX_CONTEXT
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
        self, decoded: _Decoded, chunk: np.ndarray, language: str | None, prompt: str | None, context: int, beam: int,
        *, task: str = "transcribe", words: bool = False,
    ) -> _Decoded:
        """Second opinion for a looping short window, then cut what still loops."""
        if decoded.looping and decoded.frames < FULL_FRAMES:
            # Short windows occasionally make the decoder repeat itself instead of
            # ending; the full 30 s window it was trained on rarely does.
            self.fallbacks += 1
            decoded = self.decode(chunk, language, prompt, FULL_FRAMES, context, beam, task=task, words=words)
        if decoded.runaway:
            text = collapse_repeats(decoded.text)
            # the words said before the loop was cut keep their times
            decoded = replace(decoded, text=text, compression_ratio=compression_ratio(text),
                              words=decoded.words[:len(text.split())])
        return decoded

    def _result(
        self,
        request: TranscriptionRequest,
        windows: list[tuple[_Decoded, int]],
        language: str | None,
        model_name: str,
        started: float,
    ) -> TranscriptionResult:
        elapsed = time.perf_counter() - started
        heard = [decoded for decoded, _ in windows]
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
        words = tuple(
            replace(w, start=round(w.start + offset / SAMPLE_RATE, 3), end=round(w.end + offset / SAMPLE_RATE, 3))
            for decoded, offset in windows for w in decoded.words
        )
        return TranscriptionResult(
            text=text,
            language=first.language,
            language_probability=first.language_probability,
            avg_logprob=sum(d.avg_logprob * d.tokens for d in heard) / tokens,
            no_speech_prob=min(d.no_speech_prob for d in heard),
            compression_ratio=compression_ratio(text),
            audio_seconds=request.seconds,
            processing_seconds=elapsed,
            model=model_name,
            silence=False,
            words=words,
        )

    def decode(
        self,
        audio: np.ndarray,
        language: str | None,
        prompt: str | None,
        frames: int,
        context: int = MAX_CONTEXT,
        beam: int = 1,
        *,
        task: str = "transcribe",
        words: bool = False,
    ) -> _Decoded:
        """One greedy (or beam) pass over at most one window (``frames`` mel frames) of audio."""
        return self.decode_batch([_Window(audio, language, prompt, frames, context, beam=beam, task=task,
                                          words=words)])[0]

    def decode_batch(self, windows: Sequence[_Window]) -> list[_Decoded]:
        """Decode windows together where CTranslate2 allows it, results in input order.

        One ``encode`` + one ``generate`` per group of windows with the same
        frame count (one input tensor) and the same number of prompt tokens
        (CTranslate2 requires <|startoftranscript|> at the same position);
        windows whose words are aligned are grouped apart from the others.
        """
        previous = [self.previous_tokens(w.prompt, w.context) for w in windows]
        groups: dict[tuple[int, int, int, bool], list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault((w.frames, len(previous[i]), w.beam, w.words), []).append(i)
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

    def previous_tokens(self, prompt: str | None, context: int = MAX_CONTEXT) -> list[int]:
        """The last ``context`` tokens of ``prompt``."""
        if context <= 0:
            return []
        return self.tokens(prompt)[-min(context, MAX_CONTEXT) :]

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
        tokenizers = [self._tokenizer(language, w.task)  # type: ignore[arg-type]
                      for language, w in zip(languages, windows)]
        prefixes = [self.tokens(w.prefix) for w in windows]
        prompts = [model.get_prompt(t, p, without_timestamps=True) + f for t, p, f in zip(tokenizers, previous, prefixes)]
        # Real speech stays well under 10 tokens/s; the cap stops a looping decoder early.
        caps = [
            min(MAX_TOKENS, len(p) + int((w.audio.size - w.context_samples) / SAMPLE_RATE * 10) + 16)
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
        out: list[_Decoded] = []
        aligned: dict[int, list[int]] = {}  # windows whose words to align, once all are decoded: their tokens
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
            ratio = compression_ratio(text)
            runaway = len(prompts[i]) + len(tokens) >= caps[i] or ratio > self.guard.compression_ratio
            out.append(
                _Decoded(
                    text=text,
                    frames=windows[i].frames,
                    runaway=runaway,
                    looping=runaway or first_repeat(normalize(text)) is not None,
                    tokens=len(tokens),
                    language=languages[i],  # type: ignore[arg-type]
                    language_probability=float(language_probabilities[i]),
                    avg_logprob=float(avg_logprob),
                    no_speech_prob=float(result.no_speech_prob),
                    compression_ratio=ratio,
                )
            )
            if windows[i].words:
                aligned[i] = [t for t in tokens if t < tokenizers[i].eot]
        if aligned:
            self._align(windows, features, encoder_output, tokenizers, out, aligned)
        return out

    def _align(self, windows: Sequence[_Window], features: np.ndarray, encoder_output, tokenizers: list,
               out: list[_Decoded], tokens_of: dict[int, list[int]]) -> None:
        """Word timings (``out[i].words``) of the decoded windows in ``tokens_of``, from their text tokens.

        CTranslate2 aligns a batch against one start sequence, so windows are
        aligned together per language and task; a subset of the batch is
        encoded again (only when one batch mixes detected languages).
        """
        from faster_whisper.transcribe import merge_punctuations

        hop = self.model.feature_extractor.hop_length
        by_start: dict[tuple[int, ...], list[int]] = {}
        for i, tokens in tokens_of.items():
            if tokens:
                by_start.setdefault(tuple(tokenizers[i].sot_sequence), []).append(i)
        for start, members in by_start.items():
            tokenizer = tokenizers[members[0]]
            tokens = [tokens_of[i] for i in members]
            encoded = encoder_output if len(members) == len(windows) else self.model.encode(features[members])
            frames = [max(1, min(windows[i].frames, -(-windows[i].audio.size // hop))) for i in members]
            alignments = self.generator.align(encoded, list(start), tokens, frames)
            for i, text_tokens, alignment in zip(members, tokens, alignments):
                timings = _word_timings(tokenizer, text_tokens, alignment, self.model.tokens_per_second)
                merge_punctuations(timings, _PREPEND_PUNCTUATIONS, _APPEND_PUNCTUATIONS)
                limit = windows[i].audio.size / SAMPLE_RATE
                out[i].words = tuple(
                    Word(t["word"], round(min(float(t["start"]), limit), 3), round(min(float(t["end"]), limit), 3),
                         round(float(t["probability"]), 4))
                    for t in timings if t["word"]
                )

    def _is_silence(self, d: _Decoded) -> bool:
        return is_silence(d.text, d.avg_logprob, d.no_speech_prob, d.compression_ratio, self.guard)


def _word_timings(tokenizer, text_tokens: list[int], alignment, tokens_per_second: float) -> list[dict]:
    """faster-whisper's ``find_alignment`` for one alignment result: the words of ``text_tokens``
    with start, end (seconds from the window's start) and mean token probability."""
    text_indices = np.array([pair[0] for pair in alignment.alignments])
    time_indices = np.array([pair[1] for pair in alignment.alignments])
    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1 or text_indices.size == 0:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / tokens_per_second
    if jump_times.size <= boundaries[-1]:
        return []
    probabilities = alignment.text_token_probs
    return [
        {"word": word, "tokens": tokens, "start": jump_times[a], "end": jump_times[b],
         "probability": float(np.mean(probabilities[a:b])) if b > a else 0.0}
        for word, tokens, a, b in zip(words, word_tokens, boundaries[:-1], boundaries[1:])
    ]
