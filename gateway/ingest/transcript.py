"""A file's transcript and the OpenAI audio API's response formats of it.

Pure functions: :class:`Transcript` (segments, one per piece the file was
cut into, and words when asked for) in; the body of a ``json``, ``text``,
``srt``, ``vtt`` or ``verbose_json`` response out, shaped as the OpenAI API
answers, which is what its SDKs parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..asr.interface import Word

__all__ = ["LANGUAGES", "RESPONSE_FORMATS", "Segment", "Transcript", "language_code", "render", "timestamp"]

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")

#: Whisper's languages, ISO 639-1 code (a few are longer) -> the name verbose_json reports
LANGUAGES: dict[str, str] = {code: name.replace("_", " ") for code, name in (pair.split(":") for pair in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
    "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
    "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
    "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
    "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician "
    "mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
    "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
    "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit "
    "lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
    "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())}
_CODES = {name: code for code, name in LANGUAGES.items()}


def language_code(value: str) -> str | None:
    """An ISO 639-1 code (``en``, ``EN``) or a name (``English``) -> Whisper's code; None if unknown."""
    value = value.strip().lower()
    if value in LANGUAGES:
        return value
    return _CODES.get(value)


@dataclass(frozen=True)
class Segment:
    """One piece of the file and what was said in it (seconds from the file's start)."""

    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    task: str  # "transcribe" or "translate"
    language: str  # ISO code of the speech ("" when nothing was heard)
    duration: float  # seconds of audio in the file
    segments: tuple[Segment, ...]
    words: tuple[Word, ...] = ()  # seconds from the file's start

    @property
    def text(self) -> str:
        return " ".join(segment.text for segment in self.segments if segment.text)


def timestamp(seconds: float, separator: str = ",") -> str:
    """``HH:MM:SS,mmm`` (SRT) or, with ``separator="."``, ``HH:MM:SS.mmm`` (WebVTT)."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cues(transcript: Transcript) -> list[Segment]:
    return [s for s in transcript.segments if s.text]


def srt(transcript: Transcript) -> str:
    return "".join(f"{n}\n{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text}\n\n"
                   for n, s in enumerate(_cues(transcript), 1))


def vtt(transcript: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text}\n\n"
                                  for s in _cues(transcript))


def verbose_json(transcript: Transcript, *, segments: bool = True, words: bool = False,
                 usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": LANGUAGES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    if segments:
        body["segments"] = [
            {"id": s.id, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
             "text": " " + s.text, "tokens": [], "temperature": 0.0, "avg_logprob": round(s.avg_logprob, 4),
             "compression_ratio": round(s.compression_ratio, 3), "no_speech_prob": round(s.no_speech_prob, 4)}
            for s in _cues(transcript)
        ]
    if words:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                         for w in transcript.words if w.word.strip()]
    if usage:
        body["usage"] = {"type": "duration", "seconds": round(transcript.duration, 3)}
    return body


def render(transcript: Transcript, response_format: str, *, segments: bool = True, words: bool = False
           ) -> tuple[str | dict[str, Any], str]:
    """The response body (a JSON object or text) and its media type."""
    usage = transcript.task == "transcribe"  # translations report no usage
    if response_format == "json":
        body: dict[str, Any] = {"text": transcript.text}
        if usage:
            body["usage"] = {"type": "duration", "seconds": round(transcript.duration, 3)}
        return body, "application/json"
    if response_format == "verbose_json":
        return verbose_json(transcript, segments=segments, words=words, usage=usage), "application/json"
    if response_format == "text":
        return transcript.text + "\n", "text/plain; charset=utf-8"
    if response_format == "srt":
        return srt(transcript), "application/x-subrip; charset=utf-8"
    if response_format == "vtt":
        return vtt(transcript), "text/vtt; charset=utf-8"
    raise ValueError(f"unknown response_format {response_format!r}")
