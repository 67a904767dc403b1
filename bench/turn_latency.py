"""End of speech -> turn.final in Redis, measured from the caller's side, for each turn policy
side by side: false cuts, missed ends, WER and where the time goes.

Usage:
    .venv/bin/python bench/turn_latency.py [--policies silence semantic] [--silence 500]
        [--concurrency 1 8] [--variant NAME:EARSHOT_X=V,...] [--files F ...] [--no-write]
    .venv/bin/python bench/turn_latency.py --offline [--files F ...]   # counts only, no gateways: see offline()

Policies (docs/turns.md): ``silence`` = EARSHOT_TURN_DETECTION=silence (the turn ends after
EARSHOT_SILENCE_MS of silence) and ``semantic`` = EARSHOT_TURN_DETECTION=semantic (Smart Turn v3.2
asked at each pause of ``semantic_min_silence_ms``, the turn ends when it says complete or after
``semantic_max_silence_ms``); both with the gateway's defaults otherwise (tiny.en in process,
partials on). ``--variant`` adds (or, given alone with ``--policies``, replaces) configurations.
All gateways run at once, one per configuration; for "1 call" each fixture is called on every
gateway in turn before the next fixture (so a change of load on the shared machine hits all
policies alike), for "8 calls" each gateway gets its 8 calls in turn. Calls: sipp does the SIP
signalling (bench/uac_signalling.xml); the media comes from bench/common.py's RtpSender, which paces
20 ms G.711 packets and records the wall-clock send time of every packet. Fixtures: five caller
files and the flite conversation (1 s or more of silence between turns, no pause inside a turn
of 500 ms or more) and every ``paused`` fixture of the manifest (speakers pausing 400-900 ms
inside a sentence, true turn bounds and pauses in the manifest); "1 call" = all of them one after
another, "8 calls" = 8 calls started 250 ms apart, half paused ones, half the others.

A final's bounds (``start_ms``..``end_ms``, padding included) are put on the fixture's timeline
(origin: the first packet's send time minus the call.started time). Then, per call:

* a final that ends inside a true turn is a **false cut**: its end lies in one of the turn's
  manifest ``pauses``, or anywhere more than 200 ms before the turn's end while the next final
  starts before that end (continues the same turn). The rate is per **mid-sentence pause**: the
  pauses of 400 ms or more inside the calls' true turns.
* the final that **ends** a true turn is the one ending between 200 ms before the turn's end and
  the next turn's start; a final covering the next turn's start too joins two turns ("merged").
  Under ``semantic`` an end-of-turn final with reason ``silence`` came from the
  ``semantic_max_silence_ms`` fallback: the model did not say complete, a **missed end**.
* latency: end of speech of a turn = the send time of the packet holding the manifest's last
  voiced sample of the turn (its ``end_ms``); arrival = the Redis entry id's millisecond timestamp
  of the final that ends it (Redis runs on this machine, same clock), for finals with reason
  ``silence`` or ``semantic``. The time a blocking XREAD here returned it is reported too, and the
  gateway's own ``latency_ms`` (from the arrival of the chunk holding the end of speech to the XADD).
* WER: each call's finals' texts in turn order against the fixture's reference (gateway.asr.wer,
  corpus WER over the calls).
* stages, from the end of speech: the decision (semantic finals: the time of the gateway's debug
  log line ``P(complete) ..., ends it``, which is written as the model's answer ends the turn, or
  ``text ends it`` when the speculative final's text came after the model's "complete"; the
  gateway runs with EARSHOT_LOG_LEVEL=debug under every policy for that), the final built (the
  event's ``time``: ASR and the previous final done), the XADD (Redis entry id). The silence
  policy's decision has no timestamp of its own (no event or log line marks it).

Writes the "turn_latency" section of bench/RESULTS.md and bench/results/turn_latency.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    code_version,
    Caller,
    CallPlan,
    GatewayProcess,
    RtpSender,
    load_snapshot,
    machine_busy_seconds,
    machine_description,
    metrics,
    now_utc,
    percentile,
    process_cpu_seconds,
    start_gateway,
    write_section,
)
from gateway.asr.wer import corpus_wer  # noqa: E402
from gateway.config import Settings  # noqa: E402
from tests.fixtures_data import Turn, get_entry, load_manifest  # noqa: E402

FILES = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
         "caller_04_outbound_call.wav", "caller_05_mixed.wav", "flite_awb_conversation.wav"]
WARMUP = "prompt_agent-alreadyon.wav"
POLICIES = {"silence": {"EARSHOT_TURN_DETECTION": "silence"}, "semantic": {"EARSHOT_TURN_DETECTION": "semantic"}}
TARGET_SEMANTIC_P50_MS = 300  # end of speech -> turn.final, one call, semantic (issue 13)
TARGET_FALSE_CUT_RATE = 0.05  # per mid-sentence pause
CUT_TOLERANCE_MS = 200  # a final ending this close to the true turn's end ends the turn
MID_SENTENCE_PAUSE_MS = 400
STAGGER_S = 0.25
HOLD_MS = 2000  # silence after the audio before hanging up: more than semantic_max_silence_ms
RTP_PORTS_PER_GATEWAY = 200

_ASK_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG gateway\.pipeline: (\S+)/\S+ turn (\d+): "
                       r"P\(complete\) ([0-9.]+)(, ends it)?")
# the semantic policy's second signal: the speculative final's text (docs/turns.md)
_TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG gateway\.pipeline: (\S+)/\S+ turn (\d+): "
                        r"text (?:(ends it)|reads unfinished \((.*)\), keeps it open)")


def _iso_to_epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def paused_files() -> list[str]:
    return [e.file for e in load_manifest() if e.kind == "paused"]


def interleave(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """a0 b0 a1 b1 ... then the rest of the longer one: any first 2n calls are half of each."""
    out = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


# -- the gateway's end-of-turn answers (debug log) ----------------------------------------

def parse_asks(lines: Sequence[str]) -> dict[str, list[dict]]:
    """The end-of-turn model's answers from the gateway's debug log, by call id: wall time (the
    log's local-time stamp, ms), the leg's turn index, P(complete), whether it ended the turn.
    The text's verdicts (``text`` True, ``p`` None) come in the same list: the text ended the
    turn (the model had said complete first), or read as unfinished (``reason``)."""
    out: dict[str, list[dict]] = {}
    for line in lines:
        m = _ASK_LINE.match(line)
        if m is None:
            t = _TEXT_LINE.match(line)
            if t is not None:
                stamp = dt.datetime.strptime(t.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.setdefault(t.group(2), []).append({"wall": stamp, "turn": int(t.group(3)), "p": None,
                                                       "ends": bool(t.group(4)), "text": True,
                                                       "reason": t.group(5)})
            continue
        stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.setdefault(m.group(2), []).append({"wall": stamp, "turn": int(m.group(3)),
                                               "p": float(m.group(4)), "ends": bool(m.group(5))})
    return out


# -- classifying one call's finals against its true turns ---------------------------------

def _in_pause(turn: Turn, at_ms: float) -> bool:
    return any(start <= at_ms <= end for start, end in turn.pauses)


def mid_sentence_pauses(turns: Sequence[Turn]) -> int:
    return sum(1 for t in turns for start, end in t.pauses if end - start >= MID_SENTENCE_PAUSE_MS)


def classify_call(turns: Sequence[Turn], finals: Sequence[dict]) -> dict:
    """Finals (dicts with ``start``, ``end`` on the fixture's timeline in ms and ``reason``, in turn
    order) against the true turns.

    Returns ``cuts``: one entry per false cut (final index, true turn index, "pause" when its end
    lies in one of the turn's pauses, else "early"), and ``ends``: per true turn, the index of the
    final that ends it and how ("final" | "merged" | "lost")."""
    cuts = []
    for i, f in enumerate(finals):
        for k, t in enumerate(turns):
            if not (t.start_ms < f["end"] < t.end_ms - CUT_TOLERANCE_MS):
                continue
            if _in_pause(t, f["end"]):
                cuts.append({"final": i, "turn": k, "kind": "pause"})
            elif i + 1 < len(finals) and finals[i + 1]["start"] < t.end_ms:
                cuts.append({"final": i, "turn": k, "kind": "early"})
            break
    ends = []
    for k, t in enumerate(turns):
        next_start = turns[k + 1].start_ms if k + 1 < len(turns) else float("inf")
        ending = [i for i, f in enumerate(finals)
                  if f["start"] < t.end_ms and t.end_ms - CUT_TOLERANCE_MS <= f["end"] < next_start]
        if ending:
            ends.append({"turn": k, "final": ending[-1], "outcome": "final"})
            continue
        merged = [i for i, f in enumerate(finals) if f["start"] < t.end_ms and f["end"] >= next_start]
        ends.append({"turn": k, "final": merged[0] if merged else None, "outcome": "merged" if merged else "lost"})
    return {"cuts": cuts, "ends": ends}


def ask_position(turns: Sequence[Turn], audio_ms: float) -> str:
    """Where in the fixture a model answer came: "pause" (in a true turn's pause of 400 ms or
    more), "end" (after a true turn's end, before the next turn), or "other"."""
    for k, t in enumerate(turns):
        if t.start_ms <= audio_ms <= t.end_ms:
            return "pause" if any(s <= audio_ms <= e + 200 and e - s >= MID_SENTENCE_PAUSE_MS
                                  for s, e in t.pauses) else "other"
        next_start = turns[k + 1].start_ms if k + 1 < len(turns) else float("inf")
        if t.end_ms < audio_ms < next_start:
            return "end"
    return "other"


# -- one call ------------------------------------------------------------------------------

def measure_call(plan: CallPlan, asks: dict[str, list[dict]], pad_after_ms: int) -> dict:
    """The call's finals on the fixture's timeline, classified, with the latency of turn ends.

    ``pad_after_ms``: the gateway's padding after a turn's speech; a final's end minus it is where
    the gateway's VAD heard the speech end."""
    entry = plan.entry
    out: dict = {"file": entry.file, "kind": entry.kind, "reference": entry.text, "sip_call_id": plan.sip_call_id,
                 "mid_sentence_pauses": mid_sentence_pauses(entry.turns), "true_turns": len(entry.turns),
                 "finals": [], "cuts": [], "ends": [], "asks": [], "texts": [], "hypothesis": ""}
    started = next((a for a in plan.events if a.event["type"] == "call.started"), None)
    stream = plan.stream
    if started is None or stream is None or not stream.sent_wall:
        out["ends"] = [{"turn": k, "final": None, "outcome": "lost"} for k in range(len(entry.turns))]
        return out
    origin_ms = (stream.sent_wall[0] - _iso_to_epoch(started.event["time"])) * 1000.0
    call_asks = asks.get(started.event["call_id"], [])
    first_sent = stream.sent_wall[0]

    def audio_ms_at(wall: float) -> float:
        """Fixture position of the last packet sent by ``wall`` (20 ms packets)."""
        sent = sum(1 for t in stream.sent_wall if t <= wall)
        return sent * 20.0 if sent < len(stream.sent_wall) else len(stream.sent_wall) * 20.0 + (
            wall - stream.sent_wall[-1]) * 1000.0

    finals = []
    for arrival in sorted((a for a in plan.events if a.event["type"] == "turn.final"), key=lambda a: a.event["turn"]):
        event = arrival.event
        asr = event.get("asr", {})
        built = _iso_to_epoch(event["time"])
        finals.append({"turn": event["turn"], "reason": event["reason"], "text": event["text"],
                       "start": event["start_ms"] - origin_ms, "end": event["end_ms"] - origin_ms,
                       "id_ms": arrival.id_ms, "seen": arrival.seen, "built": built,
                       "gateway_latency_ms": event.get("latency_ms"), "asr_processing_ms": asr.get("processing_ms"),
                       "speculative": asr.get("speculative")})
    verdict = classify_call(entry.turns, finals)
    for end in verdict["ends"]:
        if end["final"] is None:
            continue
        f = finals[end["final"]]
        t = entry.turns[end["turn"]]
        sent = stream.sent_at_ms(t.end_ms - 1)
        vad_end_ms = f["end"] - pad_after_ms
        vad_sent = stream.sent_at_ms(vad_end_ms - 1)
        f.update({"ends_turn": end["turn"], "ends_how": end["outcome"], "speech_end_ms": t.end_ms,
                  "latency_ms": f["id_ms"] - sent * 1000.0, "xread_latency_ms": (f["seen"] - sent) * 1000.0,
                  "built_ms": (f["built"] - sent) * 1000.0, "publish_ms": f["id_ms"] - f["built"] * 1000.0,
                  "vad_end_lag_ms": vad_end_ms - t.end_ms, "vad_end_sent_ms": (vad_sent - sent) * 1000.0})
        if f["gateway_latency_ms"] is not None:
            # both from the VAD's end of speech: what the gateway's own clock does not see
            f["transport_ms"] = f["id_ms"] - vad_sent * 1000.0 - f["gateway_latency_ms"]
        if f["reason"] == "semantic":
            decided = [a["wall"] for a in call_asks if a["ends"] and a["wall"] <= f["built"] + 0.002]
            if decided:
                f["decision_ms"] = (max(decided) - sent) * 1000.0
                f["decision_to_built_ms"] = (f["built"] - max(decided)) * 1000.0
    for cut in verdict["cuts"]:
        finals[cut["final"]]["false_cut"] = cut["kind"]
    for a in call_asks:
        pos = audio_ms_at(a["wall"])
        out["texts" if a.get("text") else "asks"].append({**a, "audio_ms": pos, "where": ask_position(entry.turns, pos),
                            "since_first_packet_s": a["wall"] - first_sent})
    out.update({"finals": finals, "cuts": verdict["cuts"], "ends": verdict["ends"],
                "hypothesis": " ".join(f["text"] for f in finals if f["text"])})
    return out


# -- running -------------------------------------------------------------------------------

def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """"NAME" or "NAME:VAR=VALUE,VAR=VALUE" (gateway environment on top of its defaults)."""
    name, _, spec = text.partition(":")
    env = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("EARSHOT_"):
            raise SystemExit(f"bad variant {text!r}: expected NAME:EARSHOT_X=VALUE,...")
        env[key] = value
    return name, env


class Rig:
    """One gateway of a configuration and its caller, with the CPU it used during its own calls."""

    def __init__(self, name: str, env: dict[str, str], silence_ms: int, index: int) -> None:
        self.name, self.env, self.silence_ms = name, env, silence_ms
        port_min = 36000 + index * RTP_PORTS_PER_GATEWAY
        full = {"EARSHOT_PERSIST": "false", "EARSHOT_SILENCE_MS": str(silence_ms), "EARSHOT_LOG_LEVEL": "debug",
                "EARSHOT_RTP_PORT_MIN": str(port_min), "EARSHOT_RTP_PORT_MAX": str(port_min + RTP_PORTS_PER_GATEWAY - 2),
                **env}
        self.gw: GatewayProcess = start_gateway(full)
        self.sender = RtpSender()
        self.caller = Caller(self.gw, self.sender)
        self.token = uuid.uuid4().hex[:6]

    def cpu(self) -> float:
        return process_cpu_seconds(self.gw.proc.pid)

    def call(self, name: str, tag: str) -> CallPlan:
        return self.caller.run_call(CallPlan(get_entry(name), f"lat-{self.token}-{tag}@127.0.0.1"), hold_ms=HOLD_MS)

    def close(self) -> None:
        self.caller.close()
        self.sender.close()
        self.gw.stop()


class Meter:
    """Wall time and CPU (this rig's gateway, the other gateways, the machine) over its own calls."""

    def __init__(self) -> None:
        self.wall = self.own = self.others = self.machine = 0.0

    def measure(self, rig: Rig, others: Sequence[Rig], work: Callable[[], object]) -> object:
        t0, busy0, own0 = time.monotonic(), machine_busy_seconds(), rig.cpu()
        others0 = sum(o.cpu() for o in others)
        result = work()
        self.wall += time.monotonic() - t0
        self.own += rig.cpu() - own0
        self.others += sum(o.cpu() for o in others) - others0
        self.machine += machine_busy_seconds() - busy0
        return result

    def cores(self) -> dict[str, float]:
        wall = self.wall or float("nan")
        return {"gateway_cores": self.own / wall, "other_gateway_cores": self.others / wall,
                "rest_cores": max(0.0, (self.machine - self.own - self.others) / wall), "wall_s": self.wall}


def run_all(configs: list[tuple[str, dict[str, str]]], silence_ms: int, concurrencies: list[int],
            files_one: list[str], files_many: list[str]) -> list[dict]:
    rigs: list[Rig] = []
    try:
        for i, (name, env) in enumerate(configs):
            rigs.append(Rig(name, env, silence_ms, i))
        for rig in rigs:
            rig.call(WARMUP, "warmup")
        results = {rig.name: {"variant": rig.name, "env": rig.env, "silence_ms": silence_ms, "runs": {}}
                   for rig in rigs}
        for calls in concurrencies:
            meters = {rig.name: Meter() for rig in rigs}
            plans: dict[str, list[CallPlan]] = {rig.name: [] for rig in rigs}
            load = load_snapshot()
            if calls == 1:
                for i, name in enumerate(files_one):
                    for rig in rigs:
                        others = [o for o in rigs if o is not rig]
                        plans[rig.name].append(meters[rig.name].measure(  # type: ignore[arg-type]
                            rig, others, lambda rig=rig, i=i, name=name: rig.call(name, f"1-{i}")))
            else:
                for rig in rigs:
                    others = [o for o in rigs if o is not rig]

                    def burst(rig: Rig = rig, calls: int = calls) -> list[CallPlan]:
                        with ThreadPoolExecutor(max_workers=calls) as pool:
                            futures = []
                            for i in range(calls):
                                futures.append(pool.submit(rig.call, files_many[i % len(files_many)], f"{calls}-{i}"))
                                time.sleep(STAGGER_S)
                            return [f.result() for f in futures]

                    plans[rig.name] = meters[rig.name].measure(rig, others, burst)  # type: ignore[assignment]
            for rig in rigs:
                asks = parse_asks(list(rig.gw.output))
                pad = int(rig.env.get("EARSHOT_PAD_AFTER_MS", Settings().pad_after_ms))
                measured = [measure_call(p, asks, pad) for p in plans[rig.name]]
                failed = [p.sip_call_id for p in plans[rig.name] if p.sipp_rc != 0 or not p.ended]
                results[rig.name]["runs"][calls] = {"calls": measured, "failed_calls": failed, "load": load,
                                                   **meters[rig.name].cores()}
                finals = sum(len(c["finals"]) for c in measured)
                print(f"{rig.name}: {calls} calls: {finals} finals for {sum(c['true_turns'] for c in measured)} "
                      f"true turns", flush=True)
        for rig in rigs:
            results[rig.name]["metrics"] = {k: v for k, v in metrics(rig.gw.http_port).items()
                                            if "latency" in k or "asr" in k or "turns" in k}
        return list(results.values())
    finally:
        for rig in rigs:
            rig.close()


# -- summarising ---------------------------------------------------------------------------

def _med(values: list[float]) -> float:
    return percentile(values, 50)


def _fmt(value: float, digits: int = 0) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def summarize(run: dict, semantic: bool) -> dict:
    """The numbers of one policy at one concurrency."""
    calls = run["calls"]
    finals = [f for c in calls for f in c["finals"]]
    enders = [f for f in finals if "ends_turn" in f and f["reason"] in ("silence", "semantic")]
    lat = [f["latency_ms"] for f in enders]
    by_reason = {r: [f["latency_ms"] for f in enders if f["reason"] == r] for r in ("semantic", "silence")}
    ends = [e for c in calls for e in c["ends"]]
    end_reasons = [c["finals"][e["final"]]["reason"] for c in calls for e in c["ends"] if e["outcome"] == "final"]
    pauses = sum(c["mid_sentence_pauses"] for c in calls)
    cuts = [cut for c in calls for cut in c["cuts"]]
    paused_calls = [c for c in calls if c["kind"] == "paused"]
    asks = [a for c in calls for a in c["asks"]]
    texts = [a for c in calls for a in c.get("texts", [])]
    s = {
        "true_turns": len(ends), "finals": len(finals), "timed": len(enders),
        "p50": percentile(lat, 50), "p95": percentile(lat, 95),
        "p50_semantic": percentile(by_reason["semantic"], 50), "p50_fallback": percentile(by_reason["silence"], 50),
        "p95_fallback": percentile(by_reason["silence"], 95),
        "xread_p50": percentile([f["xread_latency_ms"] for f in enders], 50),
        "xread_p95": percentile([f["xread_latency_ms"] for f in enders], 95),
        "own_p50": percentile([f["gateway_latency_ms"] for f in enders if f["gateway_latency_ms"] is not None], 50),
        "own_p95": percentile([f["gateway_latency_ms"] for f in enders if f["gateway_latency_ms"] is not None], 95),
        "asr_p50": _med([f["asr_processing_ms"] for f in enders if f["asr_processing_ms"] is not None]),
        "asr_p95": percentile([f["asr_processing_ms"] for f in enders if f["asr_processing_ms"] is not None], 95),
        "speculative": sum(1 for f in enders if f["speculative"]),
        "pauses": pauses, "false_cuts": len(cuts),
        "cuts_in_pause": sum(1 for c in cuts if c["kind"] == "pause"),
        "cuts_early": sum(1 for c in cuts if c["kind"] == "early"),
        "false_cut_rate": len(cuts) / pauses if pauses else float("nan"),
        "ended_semantic": end_reasons.count("semantic"), "ended_silence": end_reasons.count("silence"),
        "ended_other": sum(1 for r in end_reasons if r not in ("semantic", "silence")),
        "merged": sum(1 for e in ends if e["outcome"] == "merged"),
        "lost": sum(1 for e in ends if e["outcome"] == "lost"),
        "wer": corpus_wer((c["reference"], c["hypothesis"]) for c in calls),
        "wer_paused": corpus_wer((c["reference"], c["hypothesis"]) for c in paused_calls) if paused_calls
        else float("nan"),
        "wer_other": corpus_wer((c["reference"], c["hypothesis"]) for c in calls if c["kind"] != "paused"),
        "failed": len(run["failed_calls"]),
        "stray": sum(1 for f in finals if "ends_turn" not in f and "false_cut" not in f),
        # stages (medians over the timed finals)
        "stage_decision": _med([f["decision_ms"] for f in enders if "decision_ms" in f]),
        "stage_decision_to_built": _med([f["decision_to_built_ms"] for f in enders if "decision_to_built_ms" in f]),
        "stage_built": _med([f["built_ms"] for f in enders]),
        "stage_publish": _med([f["publish_ms"] for f in enders]),
        "stage_transport": _med([f["transport_ms"] for f in enders if "transport_ms" in f]),
        "stage_vad_end": _med([f["vad_end_sent_ms"] for f in enders]),
        "stage_vad_lag_audio": _med([f["vad_end_lag_ms"] for f in enders]),
        "decisions_timed": sum(1 for f in enders if "decision_ms" in f),
        "asks": len(asks),
        "asks_end": [a["p"] for a in asks if a["where"] == "end"],
        "asks_pause": [a["p"] for a in asks if a["where"] == "pause"],
        "asks_other": [a["p"] for a in asks if a["where"] == "other"],
        "text_unfinished": {w: sum(1 for a in texts if not a["ends"] and a["where"] == w) for w in ("end", "pause", "other")},
        "text_ended": sum(1 for a in texts if a["ends"]),
    }
    s["missed_ends"] = s["ended_silence"] if semantic else None
    s["missed_rate"] = (s["ended_silence"] / (s["ended_semantic"] + s["ended_silence"])
                        if semantic and s["ended_semantic"] + s["ended_silence"] else float("nan"))
    return s


def _asks_cell(values: list[float], threshold: float) -> str:
    if not values:
        return "—"
    return f"{len(values)}: median {_med(values):.2f}, {sum(1 for p in values if p >= threshold)} at or above {threshold:g}"


# -- offline: every pause's answers, for policies the gateway does not run -----------------------

OFFLINE_PAUSES_MS = (160, 320, 512)  # pause lengths (whole 32 ms chunks) at which the model is asked again


def offline(files: list[str]) -> dict:
    """Each fixture through the gateway's Silero VAD and semantic turn detector (its defaults),
    with an oracle ending exactly the true turns, so that every pause is asked about with the
    context the gateway would give it; at each pause Smart Turn's P(complete) at several pause
    lengths (while the pause lasts) and tiny.en's transcript of the speculative final (beam 2,
    no context). Then false cuts / missed ends of policies decided from those numbers alone:
    the model alone at several thresholds, with the text rule, and asking again as the pause grows
    with a falling threshold. No SIP, no timing: counts only."""
    import numpy as np
    from faster_whisper import WhisperModel

    from gateway.app import turn_config
    from gateway.asr.models import resolve_model
    from gateway.media.endofturn import SmartTurn
    from gateway.media.endofturn_text import unfinished
    from gateway.media.resample import upsample_8k_to_16k
    from gateway.media.turn import EndOfTurnQuery, TurnDetector
    from gateway.media.vad import SileroVad
    from tests.fixtures_data import read_pcm16

    settings = Settings()
    config = dataclasses.replace(turn_config(settings), policy="semantic", partial_interval_ms=0)
    vad, model = SileroVad(), SmartTurn()
    asr = WhisperModel(resolve_model(settings.asr_model), device="cpu", compute_type="int8", cpu_threads=1)
    pauses: list[dict] = []
    for name in files:
        entry = get_entry(name)
        pcm = np.frombuffer(read_pcm16(name)[0], np.int16)
        pcm = np.concatenate([pcm, np.zeros(2 * 8000, np.int16)])
        vad.add_stream(name)
        detector = TurnDetector(config, 8000)
        probs, here = [], []
        for i in range(len(pcm) // 256):
            chunk = pcm[i * 256:(i + 1) * 256]
            p = vad.infer({name: chunk})[name]
            probs.append(p)
            for event in detector.feed(chunk, p):
                if isinstance(event, EndOfTurnQuery):
                    voiced = detector._last_voiced_end  # noqa: SLF001  # bench introspection
                    where = ask_position(entry.turns, voiced / 8 + config.semantic_min_silence_ms)
                    here.append({"file": name, "start": detector._turn_start, "voiced": voiced, "where": where})  # noqa: SLF001
                    detector.answer(event.query, 1.0 if where == "end" else 0.0)
        vad.remove_stream(name)
        voiced_chunks = np.asarray(probs) >= config.threshold
        for p in here:
            c = p["voiced"] // 256
            later = np.nonzero(voiced_chunks[c:])[0]
            resumes = (c + int(later[0])) * 256 if len(later) else len(pcm)
            p["p"] = {}
            for ms in OFFLINE_PAUSES_MS:
                end = p["voiced"] + ms * 8
                if end <= resumes:
                    p["p"][ms] = float(model.predict([upsample_8k_to_16k(pcm[max(p["start"], end - 64000):end])])[0])
            audio = upsample_8k_to_16k(pcm[p["start"]:p["voiced"] + config.pad_after_ms * 8])
            segments, _ = asr.transcribe(audio, language="en", beam_size=settings.asr_beam_size, without_timestamps=True,
                                         condition_on_previous_text=False)
            p["text"] = " ".join(seg.text.strip() for seg in segments)
            p["unfinished"] = unfinished(p["text"])
        pauses.extend(here)
        print(f"offline: {name}: {len(here)} pauses asked about", flush=True)
    first = OFFLINE_PAUSES_MS[0]

    def counts(label: str, ends) -> dict:
        return {"policy": label, "false_cuts": sum(1 for p in pauses if p["where"] == "pause" and ends(p)),
                "pauses": sum(1 for p in pauses if p["where"] == "pause"),
                "missed_ends": sum(1 for p in pauses if p["where"] == "end" and not ends(p)),
                "turn_ends": sum(1 for p in pauses if p["where"] == "end")}

    rows = []
    for threshold in (0.5, 0.7, 0.9):
        rows.append(counts(f"model alone, {threshold:g} at {first} ms", lambda p, t=threshold: p["p"].get(first, 0) >= t))
        rows.append(counts(f"model {threshold:g} at {first} ms + text", lambda p, t=threshold: p["p"].get(first, 0) >= t
                           and p["unfinished"] is None))
    falling = list(zip(OFFLINE_PAUSES_MS, (0.5, 0.4, 0.3)))
    label = ", ".join(f"{t:g} at {ms} ms" for ms, t in falling)
    rows.append(counts(f"asked again, falling: {label}", lambda p: any(p["p"].get(ms, -1) >= t for ms, t in falling)))
    rows.append(counts(f"asked again, falling: {label}; + text", lambda p: any(p["p"].get(ms, -1) >= t for ms, t in falling)
                       and p["unfinished"] is None))
    for r in rows:
        print(f"{r['policy']}: false cuts {r['false_cuts']} of {r['pauses']} mid-sentence pauses "
              f"({r['false_cuts'] / max(1, r['pauses']):.1%}), missed ends {r['missed_ends']} of {r['turn_ends']}")
    return {"date": now_utc(), "code": code_version(), "pauses": pauses, "policies": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES),
                        help="turn policies side by side (default: silence semantic)")
    parser.add_argument("--silence", type=int, default=500, help="EARSHOT_SILENCE_MS of every gateway")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variant", action="append", default=[],
                        help='more gateway configurations: "NAME:EARSHOT_X=V,EARSHOT_Y=W" (repeatable)')
    parser.add_argument("--files", nargs="+", default=None,
                        help="fixtures to call (default: the caller files, the flite conversation, every paused one)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--offline", action="store_true",
                        help="no gateways: every pause's model answers and transcript, policies counted offline "
                             "(writes bench/results/turn_offline.json)")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/turn_latency.py", *sys.argv[1:]])
    if args.offline:
        found = offline(list(args.files) if args.files else FILES + paused_files())
        if not args.no_write:
            (BENCH / "results" / "turn_offline.json").write_text(json.dumps({"command": command, **found}, indent=1),
                                                                 encoding="utf-8")
        return 0

    configs = [(name, dict(POLICIES[name])) for name in args.policies] + [parse_variant(v) for v in args.variant]
    if not configs:
        raise SystemExit("nothing to run: no --policies and no --variant")
    if args.files:
        files_one = list(args.files)
        files_many = interleave([f for f in files_one if get_entry(f).kind == "paused"],
                                [f for f in files_one if get_entry(f).kind != "paused"])
    else:
        files_one = FILES + paused_files()
        files_many = interleave(paused_files(), FILES)
    code = code_version()
    started = time.monotonic()
    results = run_all(configs, args.silence, args.concurrency, files_one, files_many)
    wall = time.monotonic() - started
    defaults = Settings()
    model_cost = ""
    cost: dict[int, tuple[float, float]] = {}
    if any(env.get("EARSHOT_TURN_DETECTION") == "semantic" for _, env in configs):
        # the model's own cost, which the decision stage above includes, measured here after the gateways stopped
        from gateway.media.endofturn import measure as measure_model

        cost = measure_model((1, 8), repeats=5)
        model_cost = ("The end-of-turn model alone (gateway.media.endofturn.measure, this machine, right after the run, "
                      "1 onnxruntime thread, best of 5): " + "; ".join(
                          f"batch {n}: {total:.0f} ms ({feat:.0f} ms of it features)" for n, (feat, total) in cost.items())
                      + ".")
    threshold = defaults.semantic_threshold

    summaries: dict[tuple[str, int], dict] = {}
    lat_lines, quality_lines, stage_lines, ask_lines, loads = [], [], [], [], []
    for result in results:
        semantic = result["env"].get("EARSHOT_TURN_DETECTION") == "semantic"
        for calls, run in result["runs"].items():
            s = summaries[(result["variant"], calls)] = summarize(run, semantic)
            result["runs"][calls]["summary"] = s
            name = result["variant"]
            if result["variant"] == results[0]["variant"]:
                loads.append(f"{calls} calls: {run['load']}")
            by_model = f"{_fmt(s['p50_semantic'])} / {_fmt(s['p50_fallback'])}" if semantic else "—"
            lat_lines.append(
                f"| {name} | {calls} | {s['timed']} of {s['true_turns']} | **{_fmt(s['p50'])}** | {_fmt(s['p95'])} "
                f"| {by_model} | {_fmt(s['xread_p50'])} / {_fmt(s['xread_p95'])} "
                f"| {_fmt(s['own_p50'])} / {_fmt(s['own_p95'])} | {_fmt(s['asr_p50'])} / {_fmt(s['asr_p95'])} "
                f"| {s['speculative']}/{s['timed']} | {s['failed']} | {run['gateway_cores']:.2f} / "
                f"{run['other_gateway_cores']:.2f} / {run['rest_cores']:.2f} |")
            missed = (f"{s['missed_ends']} ({s['missed_rate']:.0%}); {_fmt(s['p50_fallback'])} / {_fmt(s['p95_fallback'])}"
                      if semantic else "—")
            quality_lines.append(
                f"| {name} | {calls} | {s['pauses']} | **{s['false_cuts']}** ({s['cuts_in_pause']} in a pause, "
                f"{s['cuts_early']} elsewhere) | **{s['false_cut_rate']:.1%}** | {s['ended_semantic']} / "
                f"{s['ended_silence']} / {s['ended_other']} / {s['merged']} / {s['lost']} | {missed} "
                f"| {s['stray']} | **{s['wer']:.2%}** | {_fmt(s['wer_paused'] * 100, 2)}% / {s['wer_other']:.2%} |")
            decision = (f"{_fmt(s['stage_decision'])} ({s['decisions_timed']} finals)" if semantic
                        else "not exposed")
            stage_lines.append(
                f"| {name} | {calls} | {_fmt(s['stage_vad_end'])} ({_fmt(s['stage_vad_lag_audio'])} ms of audio) "
                f"| {decision} | {_fmt(s['stage_decision_to_built']) if semantic else '—'} | {_fmt(s['stage_built'])} "
                f"| {_fmt(s['asr_p50'])} | {_fmt(s['stage_publish'])} | **{_fmt(s['p50'])}** "
                f"| {_fmt(round(s['stage_transport'], 1) + 0.0, 1)} |")
            if semantic:
                u = s["text_unfinished"]
                ask_lines.append(f"| {name} | {calls} | {s['asks']} | {_asks_cell(s['asks_end'], threshold)} "
                                 f"| {_asks_cell(s['asks_pause'], threshold)} | {_asks_cell(s['asks_other'], threshold)} "
                                 f"| {u['end']} / {u['pause']} / {u['other']} | {s['text_ended']} |")

    verdicts = []
    names = [r["variant"] for r in results]
    for calls in args.concurrency:
        if "silence" in names and "semantic" in names:
            a, b = summaries[("semantic", calls)], summaries[("silence", calls)]
            verdicts.append(f"{calls} call{'s' if calls > 1 else ''}: semantic/silence p50 {a['p50']:.0f}/{b['p50']:.0f} ms "
                            f"= {a['p50'] / b['p50']:.2f}, p95 {a['p95']:.0f}/{b['p95']:.0f} ms = {a['p95'] / b['p95']:.2f}; "
                            f"WER {a['wer']:.2%} vs {b['wer']:.2%} ({'no worse' if a['wer'] <= b['wer'] else 'worse'})")
    for (name, calls), s in summaries.items():
        if name == "semantic" or dict(configs).get(name, {}).get("EARSHOT_TURN_DETECTION") == "semantic":
            if calls == 1:
                verdicts.append(f"{name}, 1 call: p50 {s['p50']:.0f} ms after the end of speech "
                                f"({'meets' if s['p50'] <= TARGET_SEMANTIC_P50_MS else 'misses'} the target of "
                                f"{TARGET_SEMANTIC_P50_MS} ms); the turns the model ended: p50 "
                                f"{_fmt(s['p50_semantic'])} ms; {s['missed_ends']} missed ends of "
                                f"{s['ended_semantic'] + s['ended_silence']} ({s['missed_rate']:.0%})")
            verdicts.append(f"{name}, {calls} call{'s' if calls > 1 else ''}: false cuts {s['false_cuts']} of "
                            f"{s['pauses']} mid-sentence pauses = {s['false_cut_rate']:.1%} "
                            f"({'meets' if s['false_cut_rate'] <= TARGET_FALSE_CUT_RATE else 'misses'} the target of "
                            f"{TARGET_FALSE_CUT_RATE:.0%})")
    described = "; ".join(f"`{name}` = " + (", ".join(f"{k}={v}" for k, v in env.items()) or "gateway defaults")
                          for name, env in configs)
    many = max(args.concurrency)
    body = f"""## Turn latency: end of speech -> turn.final in Redis, silence vs semantic turn policy (bench/turn_latency.py)

Command: `{command}`
Date: {now_utc()}; wall time {wall:.0f} s.
Machine: {machine_description()}.
Code: {code}.
Load at the start of each run: {'; '.join(loads)}.

Gateway defaults (tiny.en in process on CPU, partials on, speculative_ms {defaults.speculative_ms}, pad_after_ms
{defaults.pad_after_ms}, asr_beam_size {defaults.asr_beam_size} for finals, asr_workers {defaults.asr_workers};
semantic: semantic_min_silence_ms {defaults.semantic_min_silence_ms}, semantic_max_silence_ms
{defaults.semantic_max_silence_ms}, semantic_threshold {defaults.semantic_threshold}, Smart Turn v3.2 on CPU) except
EARSHOT_SILENCE_MS={args.silence}, EARSHOT_LOG_LEVEL=debug (for the model's answer times) and: {described}. All gateways up at
once; "1 call" = each fixture called on every gateway in turn, then the next fixture ({len(files_one)} calls per
gateway: {', '.join(files_one)}); "{many} calls" = {many} calls started {STAGGER_S * 1000:.0f} ms apart on one gateway, then
on the next ({', '.join(files_many[i % len(files_many)] for i in range(many))}). sipp signalling; media from bench/common.py's paced RTP sender, which
records the send time of every 20 ms packet; hang-up {HOLD_MS} ms after the audio. One warm-up call per gateway.

Latency: end of speech = send time of the packet holding the manifest's last voiced sample of a true turn; arrival =
the Redis entry id's ms timestamp of the final that ends the turn (ends between {CUT_TOLERANCE_MS} ms before the turn's
end and the next turn's start), reason `silence` or `semantic` only. The cores column is CPU over each gateway's own
calls (/proc): that gateway, the other (idle) gateway, everything else on the machine (this script, sipp, other
engineers' work).

| policy | calls | turn ends timed | p50 ms | p95 ms | p50 ended by the model / by max silence | XREAD-arrival p50 / p95 | gateway `latency_ms` p50 / p95 | ASR processing_ms p50 / p95 | speculative result used | failed calls | cores: gateway / other gateway / everything else |
|---|---|---|---:|---:|---|---|---|---|---|---:|---|
{chr(10).join(lat_lines)}

False cuts: finals ending inside a true turn: in one of the manifest's pauses of the turn, or more than
{CUT_TOLERANCE_MS} ms before its end with the next final continuing it ("elsewhere"). Rate = false cuts per mid-sentence
pause (pauses of {MID_SENTENCE_PAUSE_MS} ms or more inside the calls' true turns; all are in the paused fixtures). Turn
ends: how each true turn's end was finalised: by the model (reason `semantic`) / by silence (under `semantic` the
`semantic_max_silence_ms` fallback: a missed end) / other reasons (flush, max_length) / merged with the next turn into
one final / lost (no final ends it). Other finals: neither a false cut nor a turn's end (a piece of a turn
after a cut that does not reach its end, or words over silence). WER: each call's finals joined against the fixture's reference (corpus WER).

| policy | calls | mid-sentence pauses | false cuts | false cuts per pause | turn ends: model / silence / other / merged / lost | missed ends (rate); their latency p50 / p95 ms | other finals | WER | WER paused / other fixtures |
|---|---|---:|---|---:|---|---|---:|---:|---|
{chr(10).join(quality_lines)}

Where the time goes from the end of speech (medians over the timed finals; wall-clock ms after the true end of
speech, i.e. the send time of the packet holding the manifest's last voiced sample): *VAD end* = the send time of
the packet holding the end of speech as the gateway's VAD heard it (the final's `end_ms` minus pad_after_ms; in
brackets how much later in the audio that is than the manifest's -40 dBFS end: Silero's hangover and the 32 ms
chunks); *decision* = the gateway's debug line logging the model's "complete" that ended the turn (semantic finals
only: it covers the chunk filling, the VAD tick, semantic_min_silence_ms of pause and the model's answer, which
no event or log line separates; the silence policy's decision, nominally 16 silent chunks = 512 ms after the last
voiced chunk, has no timestamp at all); *decision -> built* = from there to the final's event `time` (ms
precision: what is left of the speculative ASR, the wait for the previous final); *built* = the event's `time`;
*ASR* = the transcription's own `processing_ms` (it starts with the speculation, 4 silent chunks after the last
voiced one under both policies; its queue wait is not separable); *built -> XADD* = the Redis entry id minus the
event `time` (the publisher's queue and MULTI/EXEC); *XADD* = the latency of the first table; *outside the
gateway's clock* = XADD minus the VAD end's send time minus the gateway's `latency_ms` (loopback UDP, the jitter
buffer, the chunk filling: what happens before the gateway stamps the chunk's arrival). {model_cost}

| policy | calls | VAD end | decision | decision -> built | built | ASR processing_ms | built -> XADD | XADD (p50) | outside the gateway's clock |
|---|---|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(stage_lines)}

The model's answers (every ask, from the debug log), by where in the fixture the answer came: after a true turn's
end, in a mid-sentence pause ({MID_SENTENCE_PAUSE_MS} ms or more), elsewhere (short dips inside a turn). With
`semantic_text` (the default) the speculative final's text is read too (gateway/media/endofturn_text.py): the
last two columns count the pauses whose text read as unfinished (which keeps the turn open whatever the model said)
and the turns the text ended (the model had said complete before the text was in):

| policy | calls | asks | at turn ends | in mid-sentence pauses | elsewhere | text read unfinished: at turn ends / in pauses / elsewhere | ended when the text came |
|---|---|---:|---|---|---|---|---:|
{chr(10).join(ask_lines)}

{chr(10).join('- ' + v for v in verdicts)}

Per-final rows, the model's answers and the classification: bench/results/turn_latency.json.
"""
    # experiments (--no-write) keep the recorded results intact
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    print(f"raw results in {out_dir}")
    (out_dir / "turn_latency.json").write_text(json.dumps({"date": now_utc(), "command": command, "code": code,
                                                          "model_cost_ms": cost, "results": results},
                                                         indent=1, default=str),
                                               encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("turn_latency", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
