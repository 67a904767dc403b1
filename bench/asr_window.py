"""Measure WER and latency of Whisper encoder window policies on real telephone prompts.

Usage:
    .venv/bin/python bench/asr_window.py --model tiny.en --threads 2 \
        --policies 30 short short:2:2 [--n 60] [--noise] [--show]

Speech: the Asterisk core prompts (8 kHz, upsampled to 16 kHz), references
from core-sounds-en.txt.gz, every k-th eligible prompt so the selection is
stable. Policy syntax: "30" = fixed 30 s window (faster-whisper's own
behaviour), "short" = audio + 5 s rounded up to 5 s, "short:MARGIN:BUCKET" =
audio + margin rounded up to the bucket.
Requests are finals (so "auto" equals "30"; "short" is what partials get).
Each request runs alone through the same code path as WhisperTranscriber
(energy gate, decode, guard), so times are per-request latencies.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.asr.interface import TranscriptionRequest
from gateway.asr.models import resolve_model
from gateway.asr.wer import corpus_wer, normalize, word_error_rate
from gateway.asr.whisper import GuardThresholds, WhisperEngine, WindowPolicy, speech_band_level_db

SOUNDS = Path("/usr/share/asterisk/sounds/en")
TEXTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")


def read_wav_16k(path: Path) -> np.ndarray:
    """8 kHz 16-bit wav -> 16 kHz float32, band-limited 2x upsampling via the FFT."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, path
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float64) / 32768.0
    if rate == 16000:
        return x.astype(np.float32)
    assert rate == 8000, (path, rate)
    return upsample(x)


def upsample(x: np.ndarray) -> np.ndarray:
    """Band-limited 2x upsampling (8 -> 16 kHz) via the FFT."""
    x = np.asarray(x, np.float64)
    spectrum = np.fft.rfft(x)
    y = np.fft.irfft(np.concatenate([spectrum, np.zeros(x.size - spectrum.size + 1)]), 2 * x.size) * 2
    return y.astype(np.float32)


def sox_8k(effects: list[str], ulaw: bool = False) -> np.ndarray:
    """Generate 8 kHz audio with sox (optionally through G.711 u-law), as float in [-1, 1]."""
    fmt = ["-e", "u-law", "-b", "8"] if ulaw else ["-e", "signed", "-b", "16"]
    raw = subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", *fmt, "-t", "raw", "-", *effects],
                         capture_output=True, check=True).stdout
    if ulaw:
        raw = subprocess.run(["sox", "-t", "raw", "-r", "8000", "-c", "1", *fmt, "-", "-t", "raw", "-e", "signed",
                              "-b", "16", "-"], input=raw, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).astype(np.float64) / 32768.0


def references() -> dict[str, str]:
    refs = {}
    with gzip.open(TEXTS, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            refs[name.strip()] = text.strip()
    return refs


def speech_set(n: int) -> list[tuple[str, str, np.ndarray]]:
    eligible = []
    for name, text in sorted(references().items()):
        path = SOUNDS / f"{name}.wav"
        text = re.sub(r"\(.*?\)", "", text).strip()  # "(note: does not say 2)", "(tone plays)"
        if "/" in name or "[" in text or "<" in text or not path.exists() or len(normalize(text)) == 0:
            continue
        audio = read_wav_16k(path)
        if audio.size / 16000 > 29.0:
            continue
        eligible.append((name, text, audio))
    step = max(1, len(eligible) // n)
    return eligible[::step][:n]


def noise_set() -> list[tuple[str, np.ndarray]]:
    """Non-speech telephone audio: Asterisk silence and tones, plus sox noise and hum."""
    items = [
        ("asterisk silence/1-5 (5 s)", np.concatenate([read_wav_16k(SOUNDS / f"silence/{i}.wav") for i in range(1, 6)])),
        ("asterisk beep", read_wav_16k(SOUNDS / "beep.wav")),
        ("asterisk ascending-2tone", read_wav_16k(SOUNDS / "ascending-2tone.wav")),
        ("digital silence 3 s", np.zeros(48000, np.float32)),
    ]
    synth = {
        "white noise -60 dBFS": ["whitenoise", "vol", "0.001"],
        "pink noise -45 dBFS": ["pinknoise", "vol", "0.0056"],
        "brown noise -35 dBFS": ["brownnoise", "vol", "0.018"],
        "white noise -30 dBFS (u-law)": ["whitenoise", "vol", "0.0316"],
    }
    for label, effect in synth.items():
        items.append((label, upsample(sox_8k(["synth", "4", *effect], ulaw="u-law" in label))))
    t = np.arange(4 * 8000) / 8000
    hum = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((60, 120, 180, 300, 420), 1))
    items.append(("hum 60 Hz+harmonics -20 dBFS", upsample(0.1 * hum / np.abs(hum).max())))
    items.append(("hum 50 Hz -12 dBFS", upsample(0.25 * np.sin(2 * np.pi * 50 * t))))
    return items


def parse_policy(text: str) -> WindowPolicy:
    """WindowPolicy.parse syntax, plus "short:MARGIN:BUCKET" to try other buckets."""
    if text.startswith("short:"):
        _, margin, bucket = text.split(":")
        return WindowPolicy(margin=float(margin), bucket=float(bucket))
    return WindowPolicy.parse(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--policies", nargs="+", default=["30", "short"])
    parser.add_argument("--noise", action="store_true", help="also report guard signals on non-speech")
    parser.add_argument("--reference", action="store_true", help="also run faster-whisper's transcribe()")
    parser.add_argument("--json", help="write per-prompt results here")
    parser.add_argument("--show", action="store_true", help="print every hypothesis")
    args = parser.parse_args()

    speech = speech_set(args.n)
    seconds = [a.size / 16000 for _, _, a in speech]
    print(f"{len(speech)} prompts, {sum(seconds):.0f} s audio, {min(seconds):.1f}-{max(seconds):.1f} s each, "
          f"{sum(len(normalize(t)) for _, t, _ in speech)} reference words")
    levels = [speech_band_level_db(a) for _, _, a in speech]
    print(f"speech band level (p95 frames): min {min(levels):.1f} dBFS, median {statistics.median(levels):.1f}")
    report = {"model": args.model, "threads": args.threads, "compute_type": args.compute_type,
              "load_before": os.getloadavg(), "policies": {}}

    # One runner per policy; every prompt goes through all of them in turn, so
    # load from other processes on this shared machine hits them alike.
    runners: dict[str, object] = {}
    engines: dict[str, WhisperEngine] = {}
    for spec in args.policies:
        policy = parse_policy(spec)
        engine = WhisperEngine(
            args.model, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads,
            threads=1, beam_size=args.beam_size, window=policy, guard=GuardThresholds(), local_files_only=True,
        )
        engines[spec] = engine
        runners[spec] = lambda audio, engine=engine: engine.transcribe(TranscriptionRequest(audio, "final")).text
    if args.reference:
        # faster-whisper's own pipeline (30 s window, log-mel zero padding), same decoding options.
        from faster_whisper import WhisperModel

        model = WhisperModel(resolve_model(args.model), device="cpu", compute_type=args.compute_type,
                             cpu_threads=args.threads)
        options = {"beam_size": args.beam_size, "temperature": 0.0, "without_timestamps": True,
                   "condition_on_previous_text": False, "vad_filter": False,
                   "language": None if model.model.is_multilingual else "en"}
        runners["faster-whisper"] = lambda audio: " ".join(
            seg.text.strip() for seg in model.transcribe(audio, **options)[0])

    rows: dict[str, list[dict]] = {spec: [] for spec in runners}
    for run in runners.values():
        run(speech[0][2])  # warm-up
    for engine in engines.values():
        engine.fallbacks = 0
    for name, text, audio in speech:
        for spec, run in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            hyp = run(audio)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows[spec].append({"name": name, "seconds": audio.size / 16000, "ms": wall * 1000, "cpu_ms": cpu * 1000,
                               "ref": text, "hyp": hyp, "wer": word_error_rate(text, hyp)})
            if args.show:
                print(f"  {spec:>10s} {name:28s} {rows[spec][-1]['wer']:.2f} {wall * 1000:6.0f} ms | {hyp}")
    report["load_after"] = os.getloadavg()

    for spec, spec_rows in rows.items():
        times = sorted(r["ms"] for r in spec_rows)
        summary = {
            "wer": corpus_wer((r["ref"], r["hyp"]) for r in spec_rows),
            "mean_ms": statistics.fmean(times),
            "p95_ms": times[round(0.95 * (len(times) - 1))],
            "mean_cpu_ms": statistics.fmean(r["cpu_ms"] for r in spec_rows),
            "empty_on_speech": sum(not r["hyp"] for r in spec_rows),
        }
        if spec in engines:
            summary["fallbacks"] = engines[spec].fallbacks
        report["policies"][spec] = {"summary": summary, "rows": spec_rows}
        print(f"{spec:>14s}: WER {summary['wer']:.3f}  mean {summary['mean_ms']:.0f} ms  p95 {summary['p95_ms']:.0f} ms"
              f"  cpu {summary['mean_cpu_ms']:.0f} ms  empty {summary['empty_on_speech']}"
              f"  30 s fallbacks {summary.get('fallbacks', '-')}")
    print(f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}")

    if args.noise:
        # What the model says over non-speech with the guard bypassed (raw) and applied.
        for spec, engine in engines.items():
            print(f"non-speech, window {spec}:")
            for label, audio in noise_set():
                result = engine.transcribe(TranscriptionRequest(audio, "final"))
                raw = engine.decode(audio, None if engine.multilingual else "en", None,
                                    engine.policy.frames(audio.size / 16000, "final"))
                print(f"    {label:32s} band {speech_band_level_db(audio):6.1f} dBFS  raw {raw.text[:26]!r:28s} "
                      f"nsp={raw.no_speech_prob:.2f} lp={raw.avg_logprob:.2f} cr={raw.compression_ratio:.2f} "
                      f"-> silence={result.silence} {result.text!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
