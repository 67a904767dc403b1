"""End of speech -> turn.final in Redis, measured from the caller's side.

Usage:
    .venv/bin/python bench/turn_latency.py [--silence 500 300] [--concurrency 1 8]
        [--variant default] [--variant threads1:EARSHOT_ASR_THREADS=1] [--no-write]

For each variant and silence threshold a fresh gateway runs with its defaults
otherwise (tiny.en in process, partials on). Calls: sipp does the SIP signalling
(bench/uac_signalling.xml); the media comes from bench/common.py's RtpSender,
which paces 20 ms G.711 packets of the fixture and records the wall-clock send
time of every packet. Fixtures: the five caller files and the flite
conversation (1 s or more of silence between turns), one call at a time for
"1 call", and 8 calls started 250 ms apart for "8 calls".

End of speech of a turn = the send time of the packet holding the last voiced
sample of the fixture manifest's turn (its ``end_ms``). Arrival = the Redis
entry id's millisecond timestamp of the turn.final (Redis runs on this
machine, same clock); the time a blocking XREAD here returned it is reported
too. A final is matched to the manifest turns its ``start_ms``..``end_ms``
overlaps (the call-time origin is the first packet's send time minus the
call.started time); if it covers several, the last one's end counts. The
gateway's own ``latency_ms`` field is reported beside it.

Writes the "turn_latency" section of bench/RESULTS.md and bench/results/turn_latency.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    code_version,
    Caller,
    CallPlan,
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
from gateway.config import Settings  # noqa: E402
from tests.fixtures_data import get_entry  # noqa: E402

FILES = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
         "caller_04_outbound_call.wav", "caller_05_mixed.wav", "flite_awb_conversation.wav"]
WARMUP = "prompt_agent-alreadyon.wav"
TARGET_ABOVE_SILENCE_MS = 300
STAGGER_S = 0.25


def _iso_to_epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def measure_call(plan: CallPlan) -> list[dict]:
    """One row per turn.final of the call: the independent and the gateway's latency."""
    started = next(a for a in plan.events if a.event["type"] == "call.started")
    stream = plan.stream
    if stream is None or not stream.sent_wall:
        return []
    origin_ms = (stream.sent_wall[0] - _iso_to_epoch(started.event["time"])) * 1000.0
    rows = []
    for arrival in plan.events:
        event = arrival.event
        if event["type"] != "turn.final":
            continue
        start = event["start_ms"] - origin_ms
        end = event["end_ms"] - origin_ms
        covered = [t for t in plan.entry.turns if t.start_ms < end and t.end_ms > start]
        row = {"file": plan.entry.file, "turn": event["turn"], "reason": event["reason"],
               "text": event["text"], "gateway_latency_ms": event.get("latency_ms"),
               "asr_processing_ms": event.get("asr", {}).get("processing_ms"),
               "speculative": event.get("asr", {}).get("speculative"), "matched": bool(covered)}
        if covered:
            speech_end_ms = max(t.end_ms for t in covered)
            sent = stream.sent_at_ms(speech_end_ms - 1)
            row.update({
                "speech_end_ms": speech_end_ms,
                "turns_covered": len(covered),
                "latency_ms": arrival.id_ms - sent * 1000.0,
                "xread_latency_ms": (arrival.seen - sent) * 1000.0,
            })
        rows.append(row)
    return rows


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


def run_setting(silence_ms: int, concurrencies: list[int], variant: str, extra_env: dict[str, str]) -> dict:
    env = {"EARSHOT_PERSIST": "false", "EARSHOT_SILENCE_MS": str(silence_ms),
           "EARSHOT_RTP_PORT_MIN": "36000", "EARSHOT_RTP_PORT_MAX": "36198", **extra_env}
    gw = start_gateway(env)
    sender = RtpSender()
    caller = Caller(gw, sender)
    token = uuid.uuid4().hex[:6]
    out: dict = {"silence_ms": silence_ms, "variant": variant, "env": extra_env, "runs": {}}
    try:
        caller.run_call(CallPlan(get_entry(WARMUP), f"lat-{token}-warmup@127.0.0.1"), hold_ms=1000)
        for calls in concurrencies:
            load = load_snapshot()
            t0, busy0, gw0 = time.monotonic(), machine_busy_seconds(), process_cpu_seconds(gw.proc.pid)
            plans = []
            if calls == 1:
                for i, name in enumerate(FILES):
                    plans.append(caller.run_call(CallPlan(get_entry(name), f"lat-{token}-1-{i}@127.0.0.1")))
            else:
                with ThreadPoolExecutor(max_workers=calls) as pool:
                    futures = []
                    for i in range(calls):
                        plan = CallPlan(get_entry(FILES[i % len(FILES)]), f"lat-{token}-{calls}-{i}@127.0.0.1")
                        futures.append(pool.submit(caller.run_call, plan))
                        time.sleep(STAGGER_S)
                    plans = [f.result() for f in futures]
            wall = time.monotonic() - t0
            gateway_cores = (process_cpu_seconds(gw.proc.pid) - gw0) / wall
            machine_cores = (machine_busy_seconds() - busy0) / wall
            rows = [row for plan in plans for row in measure_call(plan)]
            expected = sum(len(p.entry.turns) for p in plans)
            failed = [p.sip_call_id for p in plans if p.sipp_rc != 0 or not p.ended]
            out["runs"][calls] = {"rows": rows, "expected_turns": expected, "failed_calls": failed, "load": load,
                                  "gateway_cores": gateway_cores, "machine_cores": machine_cores}
            print(f"{variant}: silence {silence_ms} ms, {calls} calls: {len(rows)} finals for {expected} turns",
                  flush=True)
        out["metrics"] = {k: v for k, v in metrics(gw.http_port).items() if "latency" in k or "asr" in k}
    finally:
        caller.close()
        sender.close()
        gw.stop()
    return out


def summarize(variant: str, silence_ms: int, calls: int, run: dict) -> tuple[str, dict]:
    rows = [r for r in run["rows"] if r["matched"] and r["reason"] == "silence"]
    lat = [r["latency_ms"] for r in rows]
    xread = [r["xread_latency_ms"] for r in rows]
    own = [r["gateway_latency_ms"] for r in rows if r["gateway_latency_ms"] is not None]
    asr = [r["asr_processing_ms"] for r in rows if r["asr_processing_ms"] is not None]
    speculative = sum(1 for r in rows if r["speculative"])
    other = len(run["rows"]) - len(rows)
    s = {
        "n": len(rows), "p50": percentile(lat, 50), "p95": percentile(lat, 95),
        "xread_p50": percentile(xread, 50), "xread_p95": percentile(xread, 95),
        "own_p50": percentile(own, 50), "own_p95": percentile(own, 95),
        "asr_p50": percentile(asr, 50), "asr_p95": percentile(asr, 95),
    }
    line = (f"| {variant} | {silence_ms} | {calls} | {len(rows)} of {run['expected_turns']} | **{s['p50']:.0f}** | {s['p95']:.0f} "
            f"| **{s['p50'] - silence_ms:.0f}** | {s['p95'] - silence_ms:.0f} | {s['xread_p50']:.0f} / "
            f"{s['xread_p95']:.0f} | {s['own_p50']:.0f} / {s['own_p95']:.0f} | {s['asr_p50']:.0f} / "
            f"{s['asr_p95']:.0f} | {speculative}/{len(rows)} | {other} | {len(run['failed_calls'])} "
            f"| {run['gateway_cores']:.2f} / {max(0.0, run['machine_cores'] - run['gateway_cores']):.2f} |")
    return line, s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silence", type=int, nargs="+", default=[500, 300])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variant", action="append", default=None,
                        help='gateway configurations to compare: "default", or "NAME:EARSHOT_X=V,EARSHOT_Y=W" '
                             "(repeatable; default: just the gateway's defaults)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/turn_latency.py", *sys.argv[1:]])

    code = code_version()
    started = time.monotonic()
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    results = [run_setting(silence, args.concurrency, name, env) for name, env in variants for silence in args.silence]
    wall = time.monotonic() - started

    lines, verdicts, loads = [], [], []
    for result in results:
        for calls, run in result["runs"].items():
            line, s = summarize(result["variant"], result["silence_ms"], calls, run)
            lines.append(line)
            loads.append(f"{result['variant']}, silence {result['silence_ms']} ms / {calls} calls: {run['load']}")
            if calls == 1:
                above = s["p50"] - result["silence_ms"]
                verdicts.append(f"{result['variant']}, silence {result['silence_ms']} ms, 1 call: p50 {above:.0f} ms above the "
                                f"threshold ({'meets' if above <= TARGET_ABOVE_SILENCE_MS else 'misses'} the "
                                f"target of {TARGET_ABOVE_SILENCE_MS} ms)")
    described = "; ".join(f"`{name}` = " + (", ".join(f"{k}={v}" for k, v in env.items()) or "gateway defaults")
                          for name, env in variants)
    _defaults = Settings()
    body = f"""## Turn latency: end of speech -> turn.final in Redis (bench/turn_latency.py)

Command: `{command}`
Date: {now_utc()}; wall time {wall:.0f} s.
Machine: {machine_description()}.
Code: {code}.
Load at the start of each run: {'; '.join(loads)}.

Gateway defaults (tiny.en in process on CPU, partials on, speculative_ms {_defaults.speculative_ms}, asr_beam_size {_defaults.asr_beam_size} for finals, asr_decoder_threads {_defaults.asr_decoder_threads}, asr_threads {_defaults.asr_threads} = CTranslate2's
default, asr_workers {_defaults.asr_workers}) except EARSHOT_SILENCE_MS and the variant's settings: {described}. A fresh gateway per
variant and silence threshold. sipp signalling; media from bench/common.py's paced RTP sender, which records the send time
of every 20 ms packet. Calls: {', '.join(FILES)}; "1 call" = one after another, "8 calls" = 8 calls started
{STAGGER_S * 1000:.0f} ms apart. End of speech = send time of the packet holding the fixture manifest's last
voiced sample of the turn; arrival = the Redis entry id's ms timestamp. One warm-up call before measuring.
Only finals with reason `silence` that match a manifest turn are counted. The last column is CPU over the run
(/proc): the gateway's, and the rest of the machine's (this script, sipp, other engineers' work).

| variant | silence ms | calls | finals measured | p50 ms | p95 ms | p50 - silence | p95 - silence | XREAD-arrival p50 / p95 | gateway `latency_ms` p50 / p95 | ASR processing_ms p50 / p95 | speculative result used | other finals (not matched / not `silence`) | failed calls | cores: gateway / everything else |
|---|---:|---:|---|---:|---:|---:|---:|---|---|---|---|---:|---:|---|
{chr(10).join(lines)}

{chr(10).join('- ' + v for v in verdicts)}

Per-turn rows: bench/results/turn_latency.json.
"""
    # experiments (--no-write) keep the recorded results intact
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    print(f"raw results in {out_dir}")
    (out_dir / "turn_latency.json").write_text(json.dumps({"date": now_utc(), "command": command, "code": code,
                                                          "results": results}, indent=1, default=str),
                                               encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("turn_latency", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
