"""CPU cost of everything a call costs but Whisper, for 50, 200 and 500 concurrent calls.

Usage:
    .venv/bin/python bench/media_plane.py [--calls 50 200 500] [--seconds 60] [--rate 50]
        [--variant NAME:EARSHOT_X=V ...] [--variant-calls 500] [--profile 500] [--no-write]

The gateway runs with EARSHOT_ASR_MODEL=stub (gateway/asr/stub.py): RTP receive,
jitter buffer, G.711 decode, batched Silero VAD, turn detection, resampling of
every turn, and the partials and finals that a placeholder transcriber returns
at once, published to Redis and persisted to SQLite by the gateway's own
persister, as on a real call; only Whisper is left out. sipp places the calls (bench/uac_speech.xml) and streams a real
recording with ``rtp_stream``: the five caller fixtures, mu-law, concatenated
and cut to ``--seconds``, as 20 ms PCMU packets over loopback, one call per
``1/rate`` s. A fresh gateway is started for each call count.

Measured, for each count:

* calls per core = calls / (gateway CPU seconds / wall seconds), from
  /proc/<pid>/stat over the steady-state window in which all calls are up
  (``earshot_active_calls`` == calls, sampled every second);
* the load generator's (sipp's) own CPU over the same window;
* packets: sent (calls x packets per call, all calls completed per sipp) vs
  accepted by the gateway (earshot_rtp_packets), the gateway's lost/late
  counts, and the kernel's UDP drops (/proc/net/snmp Udp InErrors and
  RcvbufErrors deltas over the whole run, machine-wide);
* VAD tick time (earshot_vad_tick_seconds) against its 32 ms budget;
* events published to Redis and stored in SQL (earshot_published_events,
  earshot_persister_stored).

All rows of one run measure the same code: a run whose tree changes while it
runs records which code each gateway loaded.

Writes the "media_plane" section of bench/RESULTS.md and bench/results/media_plane.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    code_version,
    free_udp_port,
    load_snapshot,
    machine_busy_seconds,
    machine_description,
    metrics,
    now_utc,
    process_cpu_seconds,
    start_gateway,
    udp_counters,
    write_section,
)
from tests.fixtures_data import read_g711  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CALLERS = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
           "caller_04_outbound_call.wav", "caller_05_mixed.wav"]
SCENARIO = BENCH / "uac_speech.xml"
HOLD_MS = 2000


def speech_file(seconds: float, directory: Path) -> tuple[Path, int]:
    """The caller fixtures as one raw mu-law file of whole 20 ms packets; (path, packets)."""
    data = bytearray()
    while len(data) < seconds * 8000:
        for name in CALLERS:
            payload, codec = read_g711(name)
            if codec == "PCMA":
                payload = audioop.lin2ulaw(audioop.alaw2lin(payload, 2), 2)
            data += payload
    packets = int(seconds * 8000) // 160
    path = directory / f"callers_{seconds:g}s.ulaw"
    path.write_bytes(bytes(data[:packets * 160]))
    return path, packets


def expected_turns(packets: int) -> int:
    """Manifest turns with at least 250 ms of speech in the first ``packets`` of the concatenated callers."""
    from tests.fixtures_data import get_entry

    length_ms, offset, count = packets * 20, 0, 0
    while offset < length_ms:
        for name in CALLERS:
            entry = get_entry(name)
            # a turn needs min_speech_ms (250) of its speech inside the audio to be detected
            count += sum(1 for t in entry.turns if offset + t.start_ms + 250 < length_ms)
            offset += entry.duration_ms
            if offset >= length_ms:
                break
    return count


def sipp_stats(path: Path) -> dict[str, str]:
    try:
        rows = [line.rstrip("\n").split(";") for line in path.read_text().splitlines() if line.strip()]
        return dict(zip(rows[0], rows[-1]))
    except (OSError, IndexError):
        return {}


_SCAFFOLD = ("<frozen runpy>", "gateway/__main__.py", "gateway/cli.py", "asyncio/runners.py", "base_events.py",
             "asyncio/events.py", "threading.py", "concurrent/futures/thread.py")


def summarize_profile(raw: Path, seconds: float, rate: int) -> list[str]:
    """Per thread: share of wall time with a Python stack (running or waiting for the
    CPU/GIL); then the main thread's heaviest functions, inclusive."""
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0].strip('"'))
        threads[thread] += int(count)
        if thread != "MainThread":
            continue
        seen = set()
        for frame in frames[1:]:
            name = re.sub(r":\d+\)$", ")", frame)
            if name not in seen and not any(s in name for s in _SCAFFOLD):
                seen.add(name)
                inclusive[name] += int(count)
    total = seconds * rate
    lines = [", ".join(f"{t}: {n / total:.0%} of wall time active" for t, n in threads.most_common())]
    lines += [f"{n / total:5.1%}  {name}" for name, n in inclusive.most_common(16)]
    return lines


def run_one(calls: int, audio: Path, packets: int, rate: float, log_dir: Path, *,
            variant: str = "default", extra_env: dict[str, str] | None = None, profile_s: float = 0.0) -> dict:
    audio_ms = packets * 20
    env = {
        "EARSHOT_ASR_MODEL": "stub",
        "EARSHOT_DATABASE_URL": f"sqlite:///{log_dir / f'earshot-{calls}-{variant}.db'}",
        "EARSHOT_MAX_CALLS": str(calls + 50),
        "EARSHOT_RTP_PORT_MIN": "40000",
        "EARSHOT_RTP_PORT_MAX": str(40000 + 4 * calls + 200),
        "EARSHOT_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    code = code_version()  # the tree changes under us: record what this gateway process loaded
    gw = start_gateway(env)
    pid = gw.proc.pid
    spawn_s = (calls - 1) / rate
    timeout_s = int(spawn_s + (audio_ms + HOLD_MS) / 1000 + 60)
    stats_file = log_dir / f"sipp_{calls}.csv"
    sipp_args = [
        "sipp", f"127.0.0.1:{gw.sip_port}", "-sf", str(SCENARIO), "-s", "1000",
        "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-bind_local",
        "-mp", str(46000 + 2 * (calls % 500)), "-t", "u1",
        "-key", "rtp_stream_arg", f"{audio},1,0", "-d", str(audio_ms + HOLD_MS),
        "-m", str(calls), "-r", str(rate), "-l", str(calls),
        "-max_retrans", "3", "-recv_timeout", "20000", "-timeout", f"{timeout_s}s", "-timeout_error",
        "-nostdin", "-trace_err", "-error_file", str(log_dir / f"sipp_{calls}_errors.log"),
        "-trace_stat", "-stf", str(stats_file), "-fd", "1",
    ]
    udp_before = udp_counters()
    # wall, gateway cpu, sipp cpu, active calls, packets accepted, machine busy cpu
    samples: list[tuple[float, float, float, float, float, float]] = []
    py_spy = shutil.which("py-spy") or os.environ.get("PY_SPY", "")
    profiler: subprocess.Popen[bytes] | None = None
    profile_raw = log_dir / f"py-spy_{calls}_{variant}.txt"
    sipp = subprocess.Popen(sipp_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(log_dir / f"sipp_{calls}.stderr", "wb"))
    try:
        deadline = time.monotonic() + timeout_s + 15
        while sipp.poll() is None and time.monotonic() < deadline:
            t = time.monotonic()
            m = metrics(gw.http_port)
            try:
                sipp_cpu = process_cpu_seconds(sipp.pid)
            except (OSError, ValueError):
                sipp_cpu = float("nan")
            samples.append((t, process_cpu_seconds(pid), sipp_cpu, m.get("earshot_active_calls", 0.0),
                            m.get("earshot_rtp_packets_total", 0.0), machine_busy_seconds()))
            if profile_s and py_spy and profiler is None and samples[-1][3] >= calls:
                profiler = subprocess.Popen([py_spy, "record", "--pid", str(pid), "-d", str(int(profile_s)),
                                             "-r", "25", "--threads", "--nonblocking", "-f", "raw",
                                             "-o", str(profile_raw)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
        if sipp.poll() is None:
            sipp.kill()
        sipp_rc = sipp.wait()
        # the last BYE was answered when sipp exits; a gateway that kept up ends that
        # call at once, one that fell behind first drains the audio it still holds
        exited = time.monotonic()
        while time.monotonic() - exited < 60 and metrics(gw.http_port).get("earshot_active_calls", 0.0) > 0:
            time.sleep(0.1)
        drain_s = time.monotonic() - exited
        time.sleep(1)  # counters settle
        final = metrics(gw.http_port)
        udp_after = udp_counters()
    finally:
        if sipp.poll() is None:
            sipp.kill()
            sipp.wait()
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
            profiler.wait()
        gw.stop()

    full = [s for s in samples if s[3] >= calls]
    result: dict = {"calls": calls, "variant": variant, "env": extra_env or {}, "sipp_rc": sipp_rc, "packets_per_call": packets,
                    "hangup_drain_s": drain_s, "code": code}
    if profiler is not None and profile_raw.exists():
        result["profile"] = summarize_profile(profile_raw, profile_s, 25)
    if len(full) >= 3:
        first, last = full[1], full[-1]  # skip the first second after the last call came up
        wall = last[0] - first[0]
        gw_cpu = last[1] - first[1]
        sipp_cpu = last[2] - first[2]
        result.update({
            "window_s": wall, "gateway_cpu_s": gw_cpu, "gateway_cores": gw_cpu / wall,
            "calls_per_core": calls / (gw_cpu / wall) if gw_cpu > 0 else float("inf"),
            "sipp_cores": sipp_cpu / wall,
            "rx_pps": (last[4] - first[4]) / wall,
            # everything else on the machine (other engineers' work, this script's polling)
            "other_cores": (last[5] - first[5] - gw_cpu - sipp_cpu) / wall,
        })
    else:
        result["window_s"] = 0.0
    stats = sipp_stats(stats_file)
    successful = int(stats.get("SuccessfulCall(C)", "0") or 0)
    result.update({
        "sipp_successful": successful,
        "sipp_failed": int(stats.get("FailedCall(C)", "0") or 0),
        "max_active": max((s[3] for s in samples), default=0),
        "packets_sent": successful * packets,
        "packets_received": final.get("earshot_rtp_packets_total", 0.0),
        "lost": final.get("earshot_rtp_lost_packets_total", 0.0),
        "late": final.get("earshot_rtp_late_packets_total", 0.0),
        "duplicates": final.get("earshot_rtp_duplicate_packets_total", 0.0),
        "foreign": final.get("earshot_rtp_foreign_packets_total", 0.0),
        "udp_in_errors": udp_after.get("InErrors", 0) - udp_before.get("InErrors", 0),
        "udp_rcvbuf_errors": udp_after.get("RcvbufErrors", 0) - udp_before.get("RcvbufErrors", 0),
        "vad_tick_mean_ms": 1000 * final.get("earshot_vad_tick_seconds_sum", 0.0)
        / max(final.get("earshot_vad_tick_seconds_count", 0.0), 1),
        "vad_ticks": final.get("earshot_vad_tick_seconds_count", 0.0),
        "vad_ticks_over_32ms": final.get("earshot_vad_tick_seconds_count", 0.0)
        - final.get('earshot_vad_tick_seconds_bucket{le="0.032"}', 0.0),
        "turns": sum(v for k, v in final.items() if k.startswith("earshot_turns_total")),
        "published_events": final.get("earshot_published_events_total", 0.0),
        "stored_events": final.get("earshot_persister_stored_total", 0.0),
        "expected_turns": calls * expected_turns(packets),
    })
    return result


def code_line(results: list[dict]) -> str:
    """The commit every row measured, or each row's where they differ (the tree changed mid-run)."""
    codes = {r["code"] for r in results}
    if len(codes) == 1:
        return f"{codes.pop()} (every row)"
    return "rows differ: " + "; ".join(f"{r['calls']} {r['variant']}: {r['code']}" for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per call")
    parser.add_argument("--rate", type=float, default=50.0, help="new calls per second")
    parser.add_argument("--variant", action="append", default=None,
                        help='extra runs at --variant-calls: "NAME:EARSHOT_X=V,EARSHOT_Y=W" (repeatable; default: '
                             'partials-off:EARSHOT_ASR_PARTIALS=false and asyncio-loop:EARSHOT_EVENT_LOOP=asyncio; "none": no variants)')
    parser.add_argument("--variant-calls", type=int, default=500)
    parser.add_argument("--profile", type=int, nargs="*", default=[500],
                        help="call counts to profile with py-spy (on PATH or $PY_SPY) for 20 s of the steady window")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/media_plane.py", *sys.argv[1:]])

    log_dir = Path(tempfile.mkdtemp(prefix="earshot-media-plane-"))
    audio, packets = speech_file(args.seconds, log_dir)
    loads = []
    results = []
    variants = args.variant if args.variant is not None else [
        "partials-off:EARSHOT_ASR_PARTIALS=false", "asyncio-loop:EARSHOT_EVENT_LOOP=asyncio"]
    runs: list[tuple[int, str, dict[str, str]]] = [(calls, "default", {}) for calls in args.calls]
    for spec in variants:
        if spec == "none":  # --variant none: the call counts only
            continue
        name, _, settings = spec.partition(":")
        env = dict(item.split("=", 1) for item in settings.split(",") if item)
        if not all(key.startswith("EARSHOT_") for key in env):
            raise SystemExit(f"bad variant {spec!r}: expected NAME:EARSHOT_X=VALUE,...")
        runs.append((args.variant_calls, name, env))
    for calls, variant, env in runs:
        label = f"{calls} calls" + ("" if variant == "default" else f" ({variant})")
        loads.append(f"before {label}: {load_snapshot()}")
        result = run_one(calls, audio, packets, args.rate, log_dir, variant=variant, extra_env=env,
                         profile_s=20.0 if calls in args.profile else 0.0)
        print(json.dumps(result), flush=True)
        results.append(result)

    rows = []
    for r in results:
        gateway_drops = r["packets_sent"] - r["packets_received"]
        rows.append(
            f"| {r['calls']}{'' if r['variant'] == 'default' else ', ' + r['variant']} | {r.get('window_s', 0):.0f} | {r.get('gateway_cores', float('nan')):.3f} "
            f"| **{r.get('calls_per_core', float('nan')):.0f}** | {r.get('sipp_cores', float('nan')):.3f} "
            f"| {r['packets_sent']} | {r['packets_received']:.0f} | {gateway_drops:.0f} | {r['lost']:.0f} "
            f"| {r['late']:.0f} | {r['udp_in_errors']} / {r['udp_rcvbuf_errors']} "
            f"| {r['vad_tick_mean_ms']:.2f} | {r['vad_ticks_over_32ms']:.0f} of {r['vad_ticks']:.0f} "
            f"| {r['hangup_drain_s']:.1f} | {r['turns']:.0f} of {r['expected_turns']} "
            f"| {r['published_events']:.0f} / {r['stored_events']:.0f} "
            f"| {r['sipp_successful']}/{r['calls']} | {r.get('other_cores', float('nan')):.2f} |")
    profiles = []
    for r in results:
        if r.get("profile"):
            label = f"{r['calls']} calls{'' if r['variant'] == 'default' else ', ' + r['variant']}"
            profiles.append(f"py-spy, {label}, 20 s of the steady window at 25 Hz: {r['profile'][0]}. Main thread, "
                            "inclusive share of wall time (scaffolding omitted):\n```\n"
                            + "\n".join(r["profile"][1:]) + "\n```")
    body = f"""## Media plane capacity (bench/media_plane.py)

Command: `{command}`
Date: {now_utc()}.
Machine: {machine_description()}.
Code: {code_line(results)}.
Variants (same call count, one setting changed): {'; '.join(variants) or 'none'}.
Load: {'; '.join(loads)}.

Gateway with `EARSHOT_ASR_MODEL=stub` (RTP, jitter buffer, G.711 decode, batched Silero VAD, turn detection,
resampling of every turn, and the partials and finals of a placeholder transcriber that answers at once, published
to Redis and stored in SQLite by the gateway's persister: the whole path but Whisper), a fresh process per row. Load generator: sipp 3.6.1
(`bench/uac_speech.xml`, `rtp_stream`) on the same 2 cores, {args.rate:g} new calls/s, each streaming
{args.seconds:g} s of the five caller fixtures (real speech, mu-law) as 20 ms PCMU packets over loopback, then
{HOLD_MS} ms of hold before BYE. CPU from /proc/<pid>/stat over the steady window (all calls up, sampled
every 1 s); calls per core = calls / (gateway CPU s / wall s). Packets sent = completed calls x {packets}.
Kernel UDP errors are machine-wide deltas over the run (other work on the machine counts too). "Other
processes' cores" = machine-wide busy CPU (/proc/stat) minus gateway and sipp over the same window: the
competition on this shared machine (Redis, which stores the events, counts here too). It is shown as measured,
and can read slightly below zero on a quiet machine: the kernel counts a process's time (/proc/<pid>/stat) and
the machine's (/proc/stat) with separate per-tick accounting, and the three files are read a few milliseconds
apart, so near zero the difference is noise of a few hundredths of a core.

| calls | window s | gateway cores | calls per core | sipp cores | packets sent | accepted by gateway | sent - accepted | lost | late | kernel UDP InErrors / RcvbufErrors | VAD tick mean ms | VAD ticks > 32 ms | last call's end after its BYE, s | turns detected (of manifest turns) | events published / stored | calls completed | other processes' cores in the window |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|---|---|---:|
{chr(10).join(rows)}

A VAD tick is one pass of the batched runner: one round of one 32 ms chunk per call, plus up to 7 more rounds
for calls with a backlog, so a tick over 32 ms is followed by catch-up rounds rather than lost audio. Whether the
plane kept up in real time shows in the last columns: a gateway that falls behind holds audio (packets accepted
but processed late), ends turns late, drains the backlog after each BYE (at most 32 s of it per call), and then
detects fewer turns than the manifest holds.
"Last call's end after its BYE" is how long the gateway took, after answering the last BYE, to drain and end
that call (polled every 0.1 s): about how far behind real time the media plane was at the end.
Packets not accepted while `lost`, `late` and the kernel counters stay 0 were still queued in a call's socket
when the call ended (the loop was behind), i.e. the gateway dropped them.

{(chr(10) + chr(10)).join(profiles)}

Raw numbers: bench/results/media_plane.json.
"""
    # experiments (--no-write) keep the recorded results intact
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    print(f"raw results in {out_dir}")
    (out_dir / "media_plane.json").write_text(json.dumps({"date": now_utc(), "command": command,
                                                         "results": results}, indent=1), encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("media_plane", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
