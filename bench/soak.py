"""Soak: one gateway at a steady call load for an hour, its resources sampled every minute.

Usage:
    .venv/bin/python bench/soak.py [--duration 3600] [--calls 8] [--interval 60] [--asr tiny.en]
        [--mean-hold 30] [--max-calls 2000] [--seed 1] [--no-write]

Why: the load bench (bench/load.py) answers "how many calls", over a minute; a
leak only shows over hours. So this runs the whole embedded path (SIP, RTP, VAD,
Whisper, Redis publisher, persister into SQLite, the dashboard's HTTP server) at a
steady load for ``--duration`` and samples, every ``--interval``:

* the gateway process: RSS, open file descriptors, threads, CPU;
* Redis: length of the events stream, keys under the gateway's prefix (per-call
  streams and marks, which expire), used memory;
* SQL: rows of calls, turns, call_events;
* calls: held now, answered so far; turn latency p50/p95 (turn.final ``latency_ms``)
  of the finals written in that interval; RTP drops; publisher backlog; persister lag.

The soak is bounded in time (``--duration``) and in count (``--max-calls``: the plan
is cut there). The gateway runs with a short per-call stream TTL and a small events
stream cap (``SOAK_ENV``) so that the Redis series reach their steady state inside
the hour: a bound that holds is then visible, not assumed.

At the end the gateway is stopped with SIGTERM (it must exit 0), and what Redis
published is checked against SQL: every distinct turn.final ``event_id`` read from
the events stream during the run is one final turn row, and every answered call is
one calls row.

Writes bench/results/soak.json, one PNG per series (bench/results/soak_*.png) and the
"soak" section of bench/RESULTS.md, with the least-squares slope of each series over
the second half of the run (after warm-up), per hour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
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
    load_snapshot,
    machine_description,
    metrics,
    now_utc,
    percentile,
    process_cpu_seconds,
    start_gateway,
    write_section,
)
from bench.load import (  # noqa: E402
    LIMITS_ENV,
    add_call_law_arguments,
    fmt,
    injection_file,
    plan_calls,
    rss_kib,
    sipp_command,
    sipp_stats,
    speech_file,
)
from gateway.events import parse_fields  # noqa: E402
from tests.e2e.harness import REDIS_URL  # noqa: E402

# short per-call stream TTL and a small events cap: the Redis series level off inside the hour
SOAK_ENV = {
    "EARSHOT_CALL_STREAM_TTL_S": "600",
    "EARSHOT_STREAM_MAXLEN": "5000",
}
SQL_TABLES = ("calls", "turns", "call_events")


# -- pure helpers -------------------------------------------------------------------------

def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t seconds, value) points, in value units per hour (nan if < 2 points)."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600.0


def second_half(samples: list[dict], key: str) -> list[tuple[float, float]]:
    """(t, value) of the samples in the second half of the run (the warm-up excluded)."""
    if not samples:
        return []
    end = samples[-1]["t"]
    return [(s["t"], float(s[key])) for s in samples if s["t"] >= end / 2 and s.get(key) is not None
            and not (isinstance(s[key], float) and math.isnan(s[key]))]


def latency_by_load(samples: list[dict], buckets: tuple[tuple[int, int], ...] = ((0, 4), (5, 7), (8, 10_000))
                    ) -> list[tuple[str, int, float, int, float]]:
    """Per band of calls held at the sample: (band, samples in the first half, median p50 there,
    samples in the second half, median p50 there). Latency that follows the load but not the
    clock is saturation, not a leak; the same band in both halves shows which."""
    if not samples:
        return []
    end = samples[-1]["t"]
    out = []
    for low, high in buckets:
        halves = []
        for first in (True, False):
            values = [s["latency_p50_ms"] for s in samples
                      if low <= s.get("active_calls", -1) <= high and (s["t"] < end / 2) == first
                      and not math.isnan(s["latency_p50_ms"])]
            halves.append((len(values), statistics.median(values) if values else float("nan")))
        label = f"{low}-{high}" if high < 10_000 else f"{low}+"
        out.append((label, halves[0][0], halves[0][1], halves[1][0], halves[1][1]))
    return out


def cut_plan(plan: list, max_calls: int) -> list:
    """The first ``max_calls`` calls of a plan (the count bound of the soak)."""
    return plan[:max_calls]


@dataclass
class FinalsReader:
    """Reads the events stream incrementally (it is trimmed during the run), keeping every
    distinct turn.final event_id and each final's (entry time s, latency_ms)."""

    client: redis.Redis
    stream: str
    last_id: str = "0-0"

    def __post_init__(self) -> None:
        self.final_ids: set[str] = set()
        self.duplicates = 0
        self.finals: list[tuple[float, float]] = []
        self.calls_started: set[str] = set()

    def read(self) -> None:
        while True:
            entries = self.client.xrange(self.stream, min=f"({self.last_id}", count=1000) \
                if self.last_id != "0-0" else self.client.xrange(self.stream, count=1000)
            if not entries:
                return
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                self.last_id = eid
                event = parse_fields(fields)
                kind = event.get("type")
                if kind == "turn.final":
                    event_id = str(event.get("event_id"))
                    if event_id in self.final_ids:
                        self.duplicates += 1
                        continue
                    self.final_ids.add(event_id)
                    if event.get("latency_ms") is not None:
                        self.finals.append((int(eid.split("-")[0]) / 1000.0, float(event["latency_ms"])))
                elif kind == "call.started":
                    self.calls_started.add(str(event.get("call_id")))


# -- sampling -----------------------------------------------------------------------------

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def sql_counts(db_path: Path) -> dict[str, int]:
    """Row counts, read-only (the persister writes the same file meanwhile)."""
    out: dict[str, int] = {}
    if not db_path.exists():
        return {t: 0 for t in SQL_TABLES}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        for table in SQL_TABLES:
            try:
                out[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            except sqlite3.OperationalError:  # not migrated yet
                out[table] = 0
        try:
            out["final_turns"] = con.execute("SELECT count(*) FROM turns WHERE final").fetchone()[0]
        except sqlite3.OperationalError:
            out["final_turns"] = 0
    finally:
        con.close()
    return out


def redis_sample(client: redis.Redis, prefix: str, stream: str) -> dict[str, int]:
    keys = sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
    return {"events_xlen": int(client.xlen(stream)), "prefix_keys": keys,
            "redis_used_mib": round(int(client.info("memory")["used_memory"]) / 2**20, 2)}


def _metric(m: dict[str, float], name: str) -> float:
    return m.get(name, float("nan"))


def _sum_metric(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


# -- the run ------------------------------------------------------------------------------

def run(args: argparse.Namespace, log_dir: Path) -> dict:
    plan = cut_plan(plan_calls(calls=args.calls, duration_s=args.duration, mean_hold_s=args.mean_hold,
                               min_hold_s=args.min_hold, max_hold_s=args.max_hold, gateways=1, seed=args.seed,
                               ramp_rate=args.ramp_rate, tail_s=5.0), args.max_calls)
    audio = speech_file(log_dir)
    db_path = log_dir / "earshot-soak.db"
    env = {
        "EARSHOT_ASR_MODEL": args.asr,
        "EARSHOT_DATABASE_URL": f"sqlite:///{db_path}",
        "EARSHOT_MAX_CALLS": str(args.calls * 3 + 20),
        "EARSHOT_RTP_PORT_MIN": "30000",
        "EARSHOT_RTP_PORT_MAX": str(30000 + 4 * (args.calls * 3 + 20) + 200),
        "EARSHOT_LOG_LEVEL": "warning",
        **LIMITS_ENV,
        **SOAK_ENV,
    }
    code = code_version()
    gw = start_gateway(env)
    client = redis.Redis.from_url(REDIS_URL)
    reader = FinalsReader(client, gw.events_stream)
    samples: list[dict] = []
    errors: list[str] = []
    inf = log_dir / "soak.csv"
    inf.write_text(injection_file(plan, [gw.sip_port]), encoding="utf-8")
    timeout_s = int(args.duration + 5 + 60)
    stats_file, errors_file = log_dir / "sipp_soak_stats.csv", log_dir / "sipp_soak_errors.log"
    sipp_args = sipp_command(gw.sip_port, inf, audio, calls=len(plan), timeout_s=timeout_s, errors_file=errors_file,
                             stats_file=stats_file, stats_every_s=60)
    rc = None
    try:
        sipp = subprocess.Popen(sipp_args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(log_dir / "sipp_soak.stderr", "wb"))
        t0_wall, t0 = time.time(), time.monotonic()
        cpu0 = process_cpu_seconds(gw.proc.pid)
        last_cpu, last_t = cpu0, 0.0
        last_m: dict[str, float] = {}
        next_at = 0.0
        deadline = t0 + timeout_s + 30
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            if now >= next_at:
                next_at += args.interval
                try:
                    m = metrics(gw.http_port)
                except OSError as exc:
                    errors.append(f"{now:.0f} s: metrics: {exc}")
                    m = {}
                reader.read()
                start = t0_wall + max(0.0, now - args.interval)
                lat = [ms for when, ms in reader.finals if start <= when <= t0_wall + now]
                cpu = process_cpu_seconds(gw.proc.pid)
                row = {
                    "t": round(now, 1),
                    "active_calls": _metric(m, "earshot_active_calls"),
                    "answered": _metric(m, 'earshot_calls_total{outcome="answered"}'),
                    "rss_mib": round(rss_kib(gw.proc.pid) / 1024, 1),
                    "fds": open_fds(gw.proc.pid),
                    "threads": threads(gw.proc.pid),
                    "gateway_cores": round((cpu - last_cpu) / (now - last_t), 3) if samples and now > last_t else float("nan"),
                    "finals": len(lat),
                    "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
                    "rtp_lost": _metric(m, "earshot_rtp_lost_packets_total") - last_m.get("earshot_rtp_lost_packets_total", 0.0),
                    "rtp_late": _metric(m, "earshot_rtp_late_packets_total") - last_m.get("earshot_rtp_late_packets_total", 0.0),
                    "publish_backlog": _sum_metric(m, "earshot_publish_backlog"),
                    "persister_lag": _sum_metric(m, "earshot_persister_lag"),
                    **redis_sample(client, gw.prefix, gw.events_stream),
                    **sql_counts(db_path),
                }
                last_cpu, last_t, last_m = cpu, now, (m or last_m)
                samples.append(row)
                print(json.dumps(row), flush=True)
                if args.out_dir is not None:  # a run cut short keeps what it sampled
                    (args.out_dir / "soak.partial.json").write_text(json.dumps(samples), encoding="utf-8")
            if sipp.poll() is not None and now >= args.duration:
                break
            time.sleep(min(1.0, max(0.0, next_at - (time.monotonic() - t0))))
        if sipp.poll() is None:
            sipp.kill()
        sipp_rc = sipp.wait()
        # let the last calls end and the persister catch up, then stop the gateway
        settle = time.monotonic()
        while time.monotonic() - settle < 60:
            try:
                m = metrics(gw.http_port)
            except OSError:
                break
            if m.get("earshot_active_calls", 0.0) == 0 and _sum_metric(m, "earshot_persister_lag") == 0:
                break
            time.sleep(1.0)
        reader.read()
        final_metrics = m
    finally:
        rc = gw.stop(120)
        for key in client.scan_iter(match=f"{gw.prefix}:*", count=1000):
            client.delete(key)
        client.close()
    counts = sql_counts(db_path)
    stats = sipp_stats(stats_file.read_text() if stats_file.exists() else "")
    return {
        "code": code, "planned_calls": len(plan), "sipp_rc": sipp_rc, "gateway_exit": rc,
        "sipp_created": int(stats.get("TotalCallCreated", "0") or 0),
        "sipp_successful": int(stats.get("SuccessfulCall(C)", "0") or 0),
        "sipp_failed": int(stats.get("FailedCall(C)", "0") or 0),
        "answered": final_metrics.get('earshot_calls_total{outcome="answered"}', float("nan")),
        "redis_final_ids": len(reader.final_ids), "redis_final_duplicates": reader.duplicates,
        "redis_calls_started": len(reader.calls_started),
        "sql_final_turns": counts.get("final_turns", 0), "sql_calls": counts.get("calls", 0),
        "sql_turns": counts.get("turns", 0), "sql_call_events": counts.get("call_events", 0),
        "metrics_errors": errors, "samples": samples,
        "latency_all_p50_ms": percentile([ms for _, ms in reader.finals], 50),
        "latency_all_p95_ms": percentile([ms for _, ms in reader.finals], 95),
    }


# -- report -------------------------------------------------------------------------------

SERIES = [  # (file stem, title, [(sample key, label)], unit)
    ("memory", "Gateway RSS", [("rss_mib", "RSS")], "MiB"),
    ("fds", "Gateway file descriptors and threads", [("fds", "open fds"), ("threads", "threads")], "count"),
    ("calls", "Calls held", [("active_calls", "active calls")], "calls"),
    ("redis_stream", "Redis: events stream length and keys under the prefix",
     [("events_xlen", "XLEN events"), ("prefix_keys", "keys (per-call streams, marks)")], "count"),
    ("redis_memory", "Redis used memory", [("redis_used_mib", "used_memory")], "MiB"),
    ("sql_rows", "SQL rows", [("calls", "calls"), ("turns", "turns"), ("call_events", "call_events")], "rows"),
    ("latency", "End of speech -> turn.final, per interval",
     [("latency_p50_ms", "p50"), ("latency_p95_ms", "p95")], "ms"),
    ("cpu", "Gateway CPU", [("gateway_cores", "cores")], "cores"),
]


def plot(samples: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for stem, title, keys, unit in SERIES:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
        for key, label in keys:
            xs = [s["t"] / 60 for s in samples if s.get(key) is not None]
            ys = [s[key] for s in samples if s.get(key) is not None]
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        name = f"soak_{stem}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        names.append(name)
    return names


def report(result: dict, args: argparse.Namespace, command: str, load: str, date: str, pngs: list[str]) -> str:
    samples = result["samples"]
    keys = ["rss_mib", "fds", "threads", "active_calls", "events_xlen", "prefix_keys", "redis_used_mib",
            "calls", "turns", "call_events", "latency_p50_ms", "latency_p95_ms", "gateway_cores"]
    rows = []
    for key in keys:
        values = [float(s[key]) for s in samples if s.get(key) is not None and not math.isnan(float(s[key]))]
        if not values:
            continue
        rows.append(f"| {key} | {fmt(values[0], '.1f')} | {fmt(min(values), '.1f')} | {fmt(max(values), '.1f')} | {fmt(values[-1], '.1f')} "
                    f"| {fmt(slope_per_hour(second_half(samples, key)), '.2f')} |")
    lost = sum(s["rtp_lost"] for s in samples if not math.isnan(s["rtp_lost"]))
    late = sum(s["rtp_late"] for s in samples if not math.isnan(s["rtp_late"]))
    minutes = "\n".join(
        f"| {s['t'] / 60:.1f} | {fmt(s['active_calls'], '.0f')} | {fmt(s['answered'], '.0f')} | {s['rss_mib']} | {s['fds']} "
        f"| {s['threads']} | {s['events_xlen']} | {s['prefix_keys']} | {s['redis_used_mib']} | {s['calls']} | {s['turns']} "
        f"| {s['finals']} | {fmt(s['latency_p50_ms'], '.0f')} / {fmt(s['latency_p95_ms'], '.0f')} "
        f"| {fmt(s['gateway_cores'], '.2f')} | {fmt(s['persister_lag'], '.0f')} |"
        for s in samples)
    consistent = (result["redis_final_ids"] == result["sql_final_turns"] and result["redis_final_duplicates"] == 0)
    return f"""## Soak: one gateway, steady load, sampled every {args.interval:g} s (bench/soak.py)

Command: `{command}`
Date: {date}.
Machine: {machine_description()}.
Code: {result['code']}.
Load before the run: {load}.

One `earshot run` (`EARSHOT_ASR_MODEL={args.asr}`, in-process Whisper, SQLite store with the persister inside,
one Redis; {', '.join(f'{k}={v}' for k, v in SOAK_ENV.items())} so the Redis series level off within the hour),
driven by one sipp (`bench/uac_load.xml`): {args.calls} calls ramped in, then Poisson arrivals keeping {args.calls}
up on average, holds exponential mean {args.mean_hold:g} s clipped to [{args.min_hold:g}, {args.max_hold:g}] s, for
{args.duration:g} s; at most {args.max_calls} calls (planned: {result['planned_calls']}). Each call loops the five
caller fixtures (real speech).

Outcome: sipp created {result['sipp_created']}, successful {result['sipp_successful']}, failed {result['sipp_failed']}
(sipp exit {result['sipp_rc']}); gateway answered {fmt(result['answered'], '.0f')}, exit status {result['gateway_exit']}
after SIGTERM; RTP lost {lost:.0f}, late {late:.0f} packets over the run; metrics scrapes that failed:
{len(result['metrics_errors'])}. Turn latency over all {result['redis_final_ids']} finals:
p50 {fmt(result['latency_all_p50_ms'], '.0f')} ms, p95 {fmt(result['latency_all_p95_ms'], '.0f')} ms.

Redis vs SQL after the stop: {result['redis_final_ids']} distinct turn.final event_ids read from the events stream
({result['redis_final_duplicates']} duplicates), {result['sql_final_turns']} final turn rows in SQL; {result['redis_calls_started']}
call.started events, {result['sql_calls']} call rows: {'consistent' if consistent else 'NOT consistent'}.

Each series: first, min, max, last sample, and least-squares slope over the second half of the run (per hour):

| series | first | min | max | last | slope per hour (2nd half) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Turn latency (p50 of each sample's interval) by calls held at the sample, first half against second half of the run:

| calls held | samples, 1st half | median p50 ms, 1st half | samples, 2nd half | median p50 ms, 2nd half |
|---|---:|---:|---:|---:|
{chr(10).join(f"| {b} | {n1} | {fmt(m1, '.0f')} | {n2} | {fmt(m2, '.0f')} |" for b, n1, m1, n2, m2 in latency_by_load(samples))}

Plots: {', '.join(f'[{p}](results/{p})' for p in pngs)}.

{chr(10).join(f'![{p}](results/{p})' for p in pngs)}

<details><summary>Every sample</summary>

| minute | held | answered | RSS MiB | fds | threads | XLEN events | prefix keys | Redis MiB | SQL calls | SQL turns | finals | p50 / p95 ms | cores | persister lag |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|
{minutes}

</details>

Raw numbers: bench/results/soak.json.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="arrival window, s (max 4 h)")
    parser.add_argument("--calls", type=int, default=4, help="concurrent calls held on average")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    add_call_law_arguments(parser, mean_hold=30.0, min_hold=5.0, max_hold=120.0, ramp_rate=2.0)
    parser.add_argument("--max-calls", type=int, default=2000, help="at most this many calls in all")
    parser.add_argument("--asr", default="tiny.en", help="EARSHOT_ASR_MODEL (tiny.en: Whisper in process; stub)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", type=Path, help="only write the report and plots again from this soak.json")
    args = parser.parse_args()
    if not 0 < args.duration <= 4 * 3600:
        parser.error("--duration must be in (0, 14400]")
    if not 1 <= args.interval <= args.duration / 2:
        parser.error("--interval must be at least 1 s and at most half of --duration")
    if args.max_calls < 1 or args.calls < 1:
        parser.error("--calls and --max-calls must be positive")
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    args.out_dir = out_dir
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        for key, value in saved["args"].items():
            if key not in ("render", "no_write", "out_dir"):
                setattr(args, key, value)
        result, command, load, date = saved["result"], saved["command"], saved["load"], saved["date"]
    else:
        command = " ".join([".venv/bin/python bench/soak.py", *sys.argv[1:]])
        load = load_snapshot()
        date = now_utc()
        log_dir = Path(tempfile.mkdtemp(prefix="earshot-soak-"))
        result = run(args, log_dir)
        raw = {"date": date, "command": command, "machine": machine_description(), "load": load,
               "args": {k: v for k, v in vars(args).items() if k not in ("render", "out_dir")}, "result": result}
        (out_dir / "soak.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
        print(f"logs in {log_dir}")
    pngs = plot(result["samples"], out_dir)
    body = report(result, args, command, load, date, pngs)
    print(body)
    if not args.no_write:
        write_section("soak", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
