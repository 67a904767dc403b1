"""Whisper (faster-whisper / CTranslate2): window policy, silence guard, engine, embedded transcriber.

``engine`` is what decodes; ``transcriber`` hosts it in the gateway process
(the embedded backend), and :mod:`gateway.asr.remote.worker` hosts the same
engine behind Redis Streams. Importing this package does not import
faster-whisper; building an engine does.
"""

from .engine import WhisperEngine, resolve_compute_type, resolve_device
from .guard import GuardThresholds, speech_band_level_db
from .transcriber import WhisperTranscriber
from .window import WindowPolicy

__all__ = [
    "GuardThresholds",
    "WhisperEngine",
    "WhisperTranscriber",
    "WindowPolicy",
    "resolve_compute_type",
    "resolve_device",
    "speech_band_level_db",
]
