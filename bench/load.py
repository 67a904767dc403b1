"""Calls per box: real SIP calls carrying speech against 1..N gateway processes.

Usage:
    .venv/bin/python bench/load.py [--calls 50 100 200] [--gateways 1 2] [--duration 60]
        [--mean-hold 20] [--min-hold 3] [--max-hold 60] [--asr stub|tiny.en] [--seed 1] [--no-write]

Why: media_plane.py measures one gateway under a fixed block of identical calls; an
operator sizing a box needs calls that come and go the way they do on a trunk, and
the answer to "does a second gateway process on the same box carry more?". So this
bench drives one sipp (an independent SIP stack, bench/uac_load.xml) against N
``earshot run`` processes (distinct SIP/RTP/HTTP ports and stream prefixes, one
Redis), with

* arrivals: first ``calls`` calls ramped in at ``--ramp-rate`` per second (so the
  box starts at the target load instead of climbing for minutes), then a Poisson
  process at rate calls / mean hold (Little's law keeps ``calls`` up on average);
* hold times: exponential with ``--mean-hold``, clipped to [min, max] (the ramped-in
  calls draw the same law: an exponential's remaining life is the same exponential);
  no call outlives ``duration + --tail`` (each is cut at a random point of the tail),
  which bounds the run;
* calls dealt round-robin to the gateways, so every gateway count sees the same
  schedule (same seed) from the same load generator.

Each call streams the five caller fixtures (real speech, mu-law, 20 ms PCMU) in a
loop for its hold time. The gateway runs with ``EARSHOT_ASR_MODEL=stub`` by default
(every part of a call but Whisper) so the numbers are the media path's; ``--asr
tiny.en`` puts Whisper in.

sipp sends every call's RTP from one source port: the strict RTP latch checks the
host only, so that is fine. It also sends every INVITE from one address, which the
per-source SIP limits (docs/sip.md) would throttle: the bench raises
sip_invite_rate, sip_source_msgs_per_s, sip_source_bytes_per_s and sip_max_unacked
in the gateways' environment (see LIMITS_ENV).

Measured per step (gateway count x call count), steady window = after the ramp until
the last arrival: calls attempted/answered/failed (sipp, and the gateways'
earshot_calls_total), peak calls held, media drops (RTP lost/late/overrun/foreign,
kernel UDP errors), turn latency p50/p95 (turn.final ``latency_ms`` from the events
in Redis, turns that ended in the window), gateway CPU seconds per call-second,
peak RSS, and whether the gateways fell behind (stops the climb for that count).

Writes bench/results/load.json and the "load" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.common import (  # noqa: E402
    BENCH,
    code_version,
    free_udp_port,
    load_snapshot,
    machine_busy_seconds,
    machine_description,
    metrics,
    now_utc,
    percentile,
    process_cpu_seconds,
    start_gateway,
    udp_counters,
    write_section,
)
from gateway.events import parse_fields  # noqa: E402
from tests.e2e.harness import REDIS_URL  # noqa: E402

SCENARIO = BENCH / "uac_load.xml"
# one sipp source address sends every INVITE: lift the per-source limits (docs/sip.md)
LIMITS_ENV = {
    "EARSHOT_SIP_INVITE_RATE": "10000",
    "EARSHOT_SIP_SOURCE_MSGS_PER_S": "1000000",
    "EARSHOT_SIP_SOURCE_BYTES_PER_S": "1000000000",
    "EARSHOT_SIP_MAX_UNACKED": "10000",
}
DROP_COUNTERS = ("earshot_rtp_lost_packets_total", "earshot_rtp_late_packets_total",
                 "earshot_rtp_overrun_samples_total", "earshot_rtp_foreign_packets_total")
BEHIND_DROP_FRACTION = 0.001  # lost + late packets over 0.1 % of accepted ones
BEHIND_LATENCY_FACTOR = 2.0  # p95 over twice (+ 200 ms) the first step's of that gateway count


# -- the schedule (pure) ------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedCall:
    arrival_s: float
    hold_s: float
    gateway: int


def _hold(rng: random.Random, mean_s: float, min_s: float, max_s: float) -> float:
    return min(max(rng.expovariate(1.0 / mean_s), min_s), max_s)


def clipped_mean(mean_s: float, min_s: float, max_s: float) -> float:
    """Mean of an exponential (mean ``mean_s``) clipped to [min_s, max_s]: a + integral_a^b P(X > x) dx.
    The arrival rate uses it, so Little's law holds for the holds actually drawn."""
    return min_s + mean_s * (math.exp(-min_s / mean_s) - math.exp(-max_s / mean_s))


def plan_calls(*, calls: int, duration_s: float, mean_hold_s: float, min_hold_s: float, max_hold_s: float,
               gateways: int, seed: int, ramp_rate: float = 20.0, tail_s: float = 5.0) -> list[PlannedCall]:
    """The calls of one step, sorted by arrival.

    ``calls`` arrive first at ``ramp_rate`` per second, then Poisson arrivals at
    ``calls / clipped_mean(...)`` per second until ``duration_s``; every call ends by
    ``duration_s + tail_s``. Call i goes to gateway ``i % gateways``.
    """
    if calls < 1 or gateways < 1 or duration_s <= 0 or ramp_rate <= 0:
        raise ValueError("plan_calls: calls, gateways, duration_s and ramp_rate must be positive")
    if not 0 < min_hold_s <= mean_hold_s <= max_hold_s:
        raise ValueError(f"plan_calls: need 0 < min_hold_s ({min_hold_s}) <= mean_hold_s ({mean_hold_s}) "
                         f"<= max_hold_s ({max_hold_s})")
    rng = random.Random(seed)
    arrivals = [i / ramp_rate for i in range(calls)]
    ramp_s = calls / ramp_rate
    t = ramp_s
    rate = calls / clipped_mean(mean_hold_s, min_hold_s, max_hold_s)
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        arrivals.append(t)
    out = []
    for i, arrival in enumerate(arrivals):
        hold = _hold(rng, mean_hold_s, min_hold_s, max_hold_s)
        if i < calls:
            hold += ramp_s - arrival  # the ramped-in calls are all up at the end of the ramp
        cut = duration_s + rng.uniform(0.0, tail_s) - arrival
        out.append(PlannedCall(round(arrival, 3), round(max(min(hold, cut), 0.5), 3), i % gateways))
    return out


def injection_file(plan: list[PlannedCall], sip_ports: list[int]) -> str:
    """sipp's -inf text for bench/uac_load.xml: ``ARRIVAL_MS;HOLD_MS;SIP_PORT`` per call."""
    lines = ["SEQUENTIAL"]
    lines += [f"{round(c.arrival_s * 1000)};{round(c.hold_s * 1000)};{sip_ports[c.gateway]}" for c in plan]
    return "\n".join(lines) + "\n"


def concurrency(plan: list[PlannedCall], at_s: float) -> int:
    """Calls of the plan up at ``at_s`` (signalling time not counted)."""
    return sum(1 for c in plan if c.arrival_s <= at_s < c.arrival_s + c.hold_s)


# -- parsing (pure) -----------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value} (comments and unparsable lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def rejected_calls(m: dict[str, float]) -> float:
    """Calls the gateway refused (non-2xx final answers): earshot_calls_total outcomes other than
    answered, cancelled and ended-*."""
    total = 0.0
    for key, value in m.items():
        match = re.fullmatch(r'earshot_calls_total\{outcome="([^"]*)"\}', key)
        if match and match.group(1) != "answered" and match.group(1) != "cancelled" \
                and not match.group(1).startswith("ended-"):
            total += value
    return total


def sipp_stats(text: str) -> dict[str, str]:
    """The last row of sipp's -trace_stat CSV (``;``-separated, header first)."""
    rows = [line.rstrip("\n").split(";") for line in text.splitlines() if line.strip()]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1]))


def non_2xx(errors_log: str) -> int:
    """Final SIP responses 300-699 sipp logged as unexpected (its -trace_err file)."""
    return len(re.findall(r"SIP/2\.0 [3-6]\d\d ", errors_log))


def window_latencies(finals: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """latency_ms of the (entry time s, latency_ms) finals whose entry lies in [start, end]."""
    return [lat for when, lat in finals if start <= when <= end]


# -- one step -----------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sipp_media_port() -> int:
    """An even port below the gateways' RTP ranges (30000 up) with the next three free: sipp's
    RTP port (one source for every call) must not take a port a gateway will offer."""
    import socket

    for port in range(26000, 29996, 4):
        socks = []
        try:
            for p in range(port, port + 4):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free media port for sipp in 26000-29999")


def sipp_command(sip_port: int, inf: Path, audio: Path, *, calls: int, timeout_s: int, errors_file: Path,
                 stats_file: Path, stats_every_s: int) -> list[str]:
    """sipp running bench/uac_load.xml over the injection file ``inf`` (each line names its gateway's
    port; ``sip_port`` is only the default destination), ``calls`` calls in all, stats every
    ``stats_every_s`` seconds (shared with soak.py)."""
    return [
        "sipp", f"127.0.0.1:{sip_port}", "-sf", str(SCENARIO), "-s", "1000", "-inf", str(inf),
        "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-bind_local",
        "-mp", str(sipp_media_port()), "-t", "u1",
        "-key", "rtp_stream_arg", f"{audio},-1,0",
        "-m", str(calls), "-r", "1000", "-l", str(calls + 10),
        "-max_retrans", "3", "-recv_timeout", "20000", "-timeout", f"{timeout_s}s", "-timeout_error",
        "-nostdin", "-trace_err", "-error_file", str(errors_file),
        "-trace_stat", "-stf", str(stats_file), "-fd", str(stats_every_s),
    ]


def _metrics_or_empty(http_port: int) -> dict[str, float]:
    try:
        return metrics(http_port)
    except OSError:
        return {}


def speech_file(directory: Path) -> Path:
    from bench.media_plane import speech_file as concatenated

    return concatenated(60.0, directory)[0]


def run_step(n_gateways: int, calls: int, args: argparse.Namespace, audio: Path, log_dir: Path) -> dict:
    plan = plan_calls(calls=calls, duration_s=args.duration, mean_hold_s=args.mean_hold, min_hold_s=args.min_hold,
                      max_hold_s=args.max_hold, gateways=n_gateways, seed=args.seed, ramp_rate=args.ramp_rate,
                      tail_s=args.tail)
    per_gw = max(sum(1 for c in plan if c.gateway == g) for g in range(n_gateways))
    code = code_version()
    gws = []
    tag = f"{n_gateways}gw_{calls}"
    try:
        for g in range(n_gateways):
            rtp_min = 30000 + g * 6000
            env = {
                "EARSHOT_ASR_MODEL": args.asr,
                "EARSHOT_DATABASE_URL": f"sqlite:///{log_dir / f'earshot-{tag}-{g}.db'}",
                "EARSHOT_MAX_CALLS": str(per_gw + 50),
                "EARSHOT_RTP_PORT_MIN": str(rtp_min),
                "EARSHOT_RTP_PORT_MAX": str(rtp_min + min(4 * per_gw + 200, 5998)),
                "EARSHOT_LOG_LEVEL": "warning",
                **LIMITS_ENV,
            }
            gws.append(start_gateway(env))
        inf = log_dir / f"{tag}.csv"
        inf.write_text(injection_file(plan, [gw.sip_port for gw in gws]), encoding="utf-8")
        run_s = args.duration + args.tail
        timeout_s = int(run_s + 40)
        stats_file, errors_file = log_dir / f"sipp_{tag}_stats.csv", log_dir / f"sipp_{tag}_errors.log"
        sipp_args = sipp_command(gws[0].sip_port, inf, audio, calls=len(plan), timeout_s=timeout_s,
                                 errors_file=errors_file, stats_file=stats_file, stats_every_s=1)
        before = [metrics(gw.http_port) for gw in gws]
        udp_before = udp_counters()
        samples: list[dict] = []
        metric_errors: list[str] = []
        sipp = subprocess.Popen(sipp_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(log_dir / f"sipp_{tag}.stderr", "wb"))
        t0_wall, t0 = time.time(), time.monotonic()
        try:
            deadline = t0 + timeout_s + 15
            while sipp.poll() is None and time.monotonic() < deadline:
                t = time.monotonic()
                row = {"t": t - t0, "busy": machine_busy_seconds(), "gw": []}
                for gw in gws:
                    try:
                        m = metrics(gw.http_port)
                    except OSError as exc:  # a gateway too busy to answer in 10 s, or gone: record, go on
                        metric_errors.append(f"{t - t0:.0f} s, {gw.http_port}: {exc}")
                        m = {}
                    row["gw"].append({"active": m.get("earshot_active_calls", 0.0),
                                      "cpu": process_cpu_seconds(gw.proc.pid), "rss_kib": rss_kib(gw.proc.pid),
                                      "rx": m.get("earshot_rtp_packets_total", 0.0)})
                try:
                    row["sipp_cpu"] = process_cpu_seconds(sipp.pid)
                except (OSError, ValueError):
                    row["sipp_cpu"] = float("nan")
                samples.append(row)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
            if sipp.poll() is None:
                sipp.kill()
            sipp_rc = sipp.wait()
        finally:
            if sipp.poll() is None:
                sipp.kill()
                sipp.wait()
        ended = time.monotonic()
        while time.monotonic() - ended < 30 and any(_metrics_or_empty(gw.http_port).get("earshot_active_calls", 0.0) > 0
                                                    for gw in gws):
            time.sleep(0.2)
        drain_s = time.monotonic() - ended
        time.sleep(1.0)
        after = [_metrics_or_empty(gw.http_port) for gw in gws]
        udp_after = udp_counters()
        finals: list[tuple[float, float]] = []
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for gw in gws:
                for entry_id, fields in client.xrange(gw.events_stream):
                    event = parse_fields(fields)
                    if event.get("type") == "turn.final" and event.get("latency_ms") is not None:
                        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        finals.append((int(eid.split("-")[0]) / 1000.0 - t0_wall, float(event["latency_ms"])))
                client.delete(gw.events_stream)
                for key in client.scan_iter(match=f"{gw.prefix}:*", count=1000):
                    client.delete(key)
        finally:
            client.close()
    finally:
        rcs = [gw.stop() for gw in gws]

    ramp_s = calls / args.ramp_rate
    window = [s for s in samples if ramp_s + 1 <= s["t"] <= args.duration]
    result: dict = {"gateways": n_gateways, "calls": calls, "code": code, "planned_calls": len(plan),
                    "planned_mean_hold_s": sum(c.hold_s for c in plan) / len(plan),
                    "planned_concurrency_mid": concurrency(plan, (ramp_s + args.duration) / 2),
                    "sipp_rc": sipp_rc, "gateway_exit": rcs, "hangup_drain_s": round(drain_s, 1),
                    "metrics_errors": metric_errors}
    stats = sipp_stats(stats_file.read_text() if stats_file.exists() else "")
    errors_log = errors_file.read_text(errors="replace") if errors_file.exists() else ""
    result.update({
        "sipp_created": int(stats.get("TotalCallCreated", "0") or 0),
        "sipp_successful": int(stats.get("SuccessfulCall(C)", "0") or 0),
        "sipp_failed": int(stats.get("FailedCall(C)", "0") or 0),
        "sipp_non_2xx": non_2xx(errors_log),
        "answered": sum(delta(a, b, 'earshot_calls_total{outcome="answered"}') for a, b in zip(after, before)),
        "rejected": sum(rejected_calls(a) - rejected_calls(b) for a, b in zip(after, before)),
        "held_peak": max((sum(g["active"] for g in s["gw"]) for s in samples), default=0.0),
        "rss_peak_mib": [round(max((s["gw"][g]["rss_kib"] for s in samples), default=0) / 1024, 1)
                         for g in range(n_gateways)],
        "packets_accepted": sum(delta(a, b, "earshot_rtp_packets_total") for a, b in zip(after, before)),
        "udp_in_errors": udp_after.get("InErrors", 0) - udp_before.get("InErrors", 0),
        "udp_rcvbuf_errors": udp_after.get("RcvbufErrors", 0) - udp_before.get("RcvbufErrors", 0),
        "turns": len(finals),
    })
    for name in DROP_COUNTERS:
        result[name.removeprefix("earshot_rtp_").removesuffix("_total")] = sum(delta(a, b, name)
                                                                              for a, b in zip(after, before))
    if len(window) >= 3:
        first, last = window[0], window[-1]
        wall = last["t"] - first["t"]
        cpu = sum(last["gw"][g]["cpu"] - first["gw"][g]["cpu"] for g in range(n_gateways))
        call_s = sum(sum(g["active"] for g in s["gw"]) * (s2["t"] - s["t"]) for s, s2 in zip(window, window[1:]))
        lat = window_latencies(finals, first["t"], last["t"])
        result.update({
            "window_s": round(wall, 1),
            "mean_held": call_s / wall if wall > 0 else 0.0,
            "gateway_cores": cpu / wall,
            "cpu_s_per_call_s": cpu / call_s if call_s > 0 else float("nan"),
            "calls_per_core": call_s / cpu if cpu > 0 else float("nan"),
            "sipp_cores": (last["sipp_cpu"] - first["sipp_cpu"]) / wall,
            "other_cores": (last["busy"] - first["busy"] - cpu - (last["sipp_cpu"] - first["sipp_cpu"])) / wall,
            "turns_in_window": len(lat),
            "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
            "latency_max_ms": max(lat, default=float("nan")),
        })
    else:
        result["window_s"] = 0.0
    return result


def fell_behind(result: dict, baseline_p95: float | None) -> list[str]:
    """Why this step shows a gateway that could not keep up (empty: it kept up)."""
    why = []
    accepted = max(result.get("packets_accepted", 0.0), 1.0)
    if (result.get("lost_packets", 0.0) + result.get("late_packets", 0.0)) / accepted > BEHIND_DROP_FRACTION:
        why.append("RTP lost+late over 0.1 %")
    p95 = result.get("latency_p95_ms", float("nan"))
    if baseline_p95 is not None and not math.isnan(p95) and p95 > BEHIND_LATENCY_FACTOR * baseline_p95 + 200:
        why.append(f"turn p95 {p95:.0f} ms > 2x first step's {baseline_p95:.0f} + 200")
    if result.get("sipp_failed", 0) > 0.01 * max(result.get("sipp_created", 0), 1):
        why.append("over 1 % of sipp calls failed")
    if result.get("window_s", 0.0) == 0.0:
        why.append("no steady window")
    return why


def fmt(value: object, spec: str = ".0f") -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def add_call_law_arguments(parser: argparse.ArgumentParser, *, mean_hold: float, min_hold: float,
                           max_hold: float, ramp_rate: float) -> None:
    """The hold-time law and ramp options (--mean-hold, --min-hold, --max-hold, --ramp-rate), shared with soak.py."""
    parser.add_argument("--mean-hold", type=float, default=mean_hold, help="mean of the exponential hold, s")
    parser.add_argument("--min-hold", type=float, default=min_hold, help="holds clipped to at least this, s")
    parser.add_argument("--max-hold", type=float, default=max_hold, help="holds clipped to at most this, s")
    parser.add_argument("--ramp-rate", type=float, default=ramp_rate, help="calls per second while ramping in")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 100, 200], help="target concurrent calls")
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 2], help="gateway process counts")
    parser.add_argument("--duration", type=float, default=60.0, help="arrival window per step, s (max 600)")
    add_call_law_arguments(parser, mean_hold=20.0, min_hold=3.0, max_hold=60.0, ramp_rate=20.0)
    parser.add_argument("--tail", type=float, default=5.0, help="every call ends within this after --duration")
    parser.add_argument("--asr", default="stub", help="EARSHOT_ASR_MODEL (stub: media path only; tiny.en: Whisper)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-total-s", type=float, default=0.0,
                        help="start no step that would end after this many seconds of the run (0: no limit)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", type=Path, help="only write the report again from this load.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        for key, value in saved["args"].items():
            if key not in ("render", "no_write"):
                setattr(args, key, value)
        report(saved["results"], args, saved["command"], saved.get("loads", []), saved.get("notes", []),
               Path(tempfile.gettempdir()), final=True, date=saved["date"])
        return 0
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if any(c / args.ramp_rate + 3 >= args.duration for c in args.calls):
        parser.error("--duration must exceed calls / --ramp-rate + 3 s (no steady window otherwise)")
    command = " ".join([".venv/bin/python bench/load.py", *sys.argv[1:]])
    log_dir = Path(tempfile.mkdtemp(prefix="earshot-load-"))
    audio = speech_file(log_dir)
    results: list[dict] = []
    loads: list[str] = []
    notes: list[str] = []
    baseline: dict[int, float | None] = {}
    stopped: set[int] = set()
    began = time.monotonic()
    step_s = args.duration + args.tail + 30  # + start, drain, reading the events (an estimate)
    for calls in sorted(args.calls):  # same load for every gateway count, alternating
        for n in args.gateways:
            if n in stopped:
                continue
            if args.max_total_s and time.monotonic() - began + step_s > args.max_total_s:
                notes.append(f"{n} gw x {calls} not run: --max-total-s {args.max_total_s:g} s would be exceeded")
                continue
            loads.append(f"before {n} gw x {calls}: {load_snapshot()}")
            result = run_step(n, calls, args, audio, log_dir)
            why = fell_behind(result, baseline.get(n))
            result["fell_behind"] = why
            if n not in baseline and not math.isnan(result.get("latency_p95_ms", float("nan"))):
                baseline[n] = result["latency_p95_ms"]
            print(json.dumps(result), flush=True)
            results.append(result)
            if why:
                stopped.add(n)
            # written after every step: a run cut short keeps what it measured
            report(results, args, command, loads, notes, log_dir)
    report(results, args, command, loads, notes, log_dir, final=True)
    return 0


def report(results: list[dict], args: argparse.Namespace, command: str, loads: list[str], notes: list[str],
           log_dir: Path, final: bool = False, date: str = "") -> None:
    rows = []
    for r in results:
        rows.append(
            f"| {r['gateways']} | {r['calls']} | {r['planned_calls']} | {r['sipp_created']} / {r['answered']:.0f} / "
            f"{r['sipp_failed']} ({r['sipp_non_2xx']} non-2xx) / {r['rejected']:.0f} | {r['held_peak']:.0f} "
            f"| {fmt(r.get('mean_held', float('nan')), '.1f')} "
            f"| {r['lost_packets']:.0f} / {r['late_packets']:.0f} / {r['overrun_samples']:.0f} / "
            f"{r['foreign_packets']:.0f} | {r['udp_in_errors']} / {r['udp_rcvbuf_errors']} "
            f"| {fmt(r.get('latency_p50_ms', float('nan')))} / {fmt(r.get('latency_p95_ms', float('nan')))} "
            f"({r.get('turns_in_window', 0)}) | {fmt(r.get('gateway_cores', float('nan')), '.2f')} "
            f"| {fmt(r.get('cpu_s_per_call_s', float('nan')) * 1000, '.1f')} "
            f"| **{fmt(r.get('calls_per_core', float('nan')))}** | {fmt(r.get('sipp_cores', float('nan')), '.2f')} "
            f"| {fmt(r.get('other_cores', float('nan')), '.2f')} | {' / '.join(f'{x:.0f}' for x in r['rss_peak_mib'])} "
            f"| {r['hangup_drain_s']} | {'; '.join(r['fell_behind']) or 'no'} |")
    ratios = []
    by = {(r["gateways"], r["calls"]): r for r in results}
    for calls in sorted(args.calls):
        one = by.get((1, calls))
        for n in args.gateways:
            other = by.get((n, calls))
            if n == 1 or one is None or other is None or one["fell_behind"] or other["fell_behind"]:
                continue  # a row that fell behind overstates the calls it held (see the note below the table)
            a, b = one.get("cpu_s_per_call_s", float("nan")), other.get("cpu_s_per_call_s", float("nan"))
            pa, pb = one.get("latency_p95_ms", float("nan")), other.get("latency_p95_ms", float("nan"))
            ratios.append(f"{calls} calls: CPU per call-second {n} gw / 1 gw = {b / a:.2f}; "
                          f"turn p95 {n} gw / 1 gw = {pb / pa:.2f}")
    kept = "; ".join(
        f"{n} gw: {max((r['calls'] for r in results if r['gateways'] == n and not r['fell_behind']), default='none')}"
        for n in sorted({r["gateways"] for r in results}))
    body = f"""## Calls per box: 1..N gateway processes under arriving calls (bench/load.py)

Command: `{command}`
Date: {date or now_utc()}.
Machine: {machine_description()}.
Code: {'; '.join(sorted({r['code'] for r in results}))}.
Load: {'; '.join(loads)}.

One sipp 3.6.1 (`bench/uac_load.xml`, one SIP socket, one RTP source port) drives every gateway of a step;
fresh gateways (`EARSHOT_ASR_MODEL={args.asr}`, SQLite each, one Redis) per step. Calls: the target count ramped
in at {args.ramp_rate:g}/s, then Poisson arrivals at target / (mean of the clipped hold law) for {args.duration:g} s in all; holds
exponential, mean {args.mean_hold:g} s, clipped to [{args.min_hold:g}, {args.max_hold:g}] s, all ended within
{args.tail:g} s after; seed {args.seed}; calls dealt round-robin to the gateways. Each call loops the five caller
fixtures (real speech) as 20 ms PCMU. sipp creates every call of a step at its start at 1000/s and each waits
its arrival time, so an arrival is late by at most the call's creation offset (calls / 1000 s). Per-source SIP
limits raised for the one sipp source:
{', '.join(f'{k}={v}' for k, v in LIMITS_ENV.items())}. Steady window: from 1 s after the ramp to the last
arrival, sampled every 1 s. CPU per call-second = gateways' CPU s (/proc/<pid>/stat) / integral of
earshot_active_calls over the window; calls per core is its inverse. Turn latency: turn.final `latency_ms`
(end of speech to Redis accepting the event) of the finals written in the window. Drops are the gateways'
counters over the whole step; kernel UDP errors are machine-wide. Behind = RTP lost+late > 0.1 % of accepted
packets, or p95 > 2x the first step's of that gateway count + 200 ms, or > 1 % sipp calls failed; a gateway
count that falls behind is not run at higher counts.

| gateways | target calls | planned | sipp created / answered / sipp failed (non-2xx seen) / gateway rejected | peak held | mean held in window | RTP lost / late / overrun samples / foreign | kernel UDP InErrors / RcvbufErrors | turn p50 / p95 ms (finals) | gateway cores | CPU ms per call-second | calls per core | sipp cores | other processes' cores | peak RSS MiB per gateway | drain after last BYE s | fell behind |
|---:|---:|---:|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---|
{chr(10).join(rows)}

In a row that fell behind, earshot_active_calls did not fall as calls hung up (peak held close to every call of
the step: the gateway ends a call only after its queued audio is processed), so that row's held counts, CPU
per call-second and calls per core overstate what it carried; ratios skip such rows.

Same-run ratios (rows that kept up): {'; '.join(ratios) or 'none'}.
Highest target kept up (of those run): {kept}.
{(chr(10).join(notes) + chr(10)) if notes else ''}
Raw numbers: bench/results/load.json.
"""
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    raw = {"date": date or now_utc(), "command": command, "machine": machine_description(),
           "args": {k: v for k, v in vars(args).items() if k != "render"}, "loads": loads, "notes": notes, "results": results}
    (out_dir / "load.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    if final:
        print(f"raw results in {out_dir}; logs in {log_dir}")
        print(body)
    if not args.no_write:
        write_section("load", body)


if __name__ == "__main__":
    sys.exit(main())
