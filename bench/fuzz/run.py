"""The fuzz job: every fuzz target under atheris, one after another, with its seeds.

    .venv/bin/python bench/fuzz/run.py                       # the full job (2.6M inputs, about an hour on 1 core)
    .venv/bin/python bench/fuzz/run.py --target sdp --runs 50000
    .venv/bin/python bench/fuzz/run.py --scale 0.01 --no-write   # a smoke run

Not part of CI or of the default pytest run: it takes tens of minutes. The quick,
bounded property tests of the same cores are tests/unit/test_fuzz_properties.py.

Each target runs as its own process (``bench/fuzz/fuzz.py``) with ``-runs`` inputs,
starting from ``bench/fuzz/seeds/<target>`` plus the corpus it grew before
(``--work``, default ``/tmp/earshot-fuzz``: kept between runs, never committed).
libFuzzer stops a target at its first failure and saves the input as
``<work>/crashes/<target>-crash-*``; replay one with
``.venv/bin/python bench/fuzz/fuzz.py <target> <file>``. The job exits 1 if any target
failed. Results go to ``bench/results/fuzz.json`` (merged per target, so targets may be
run separately) and the "Fuzzing" section of bench/RESULTS.md, unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FUZZ = ROOT / "bench" / "fuzz"
RESULTS_JSON = ROOT / "bench" / "results" / "fuzz.json"

#: inputs per target in the full job, and the longest input libFuzzer may generate
PLAN: dict[str, tuple[int, int]] = {
    "framer": (200_000, 8192),
    "rtp": (200_000, 4096),
    "sdp": (200_000, 4096),
    "realtime": (200_000, 4096),
    "twilio": (200_000, 4096),
    "sip_message": (1_000_000, 4096),
    "useragent": (200_000, 8192),  # the slowest: a whole call flow per input
    "siprec_body": (200_000, 8192),  # split_body, then parse_metadata of the part it finds
    "siprec_metadata": (200_000, 8192),  # parse_metadata, merge, leg_for_label
}

#: libFuzzer dictionary (bench/fuzz/dicts/) of each target: protocol tokens mutations may insert
DICTS = {"sip_message": "sip", "useragent": "sip", "framer": "sip", "sdp": "sdp", "rtp": "rtp",
         "siprec_body": "siprec", "siprec_metadata": "siprec"}

#: What the fuzz job has found so far, each fixed, its input kept in bench/fuzz/regressions/ and a
#: test in tests/unit/test_fuzz_properties.py (kept here so the section says it after every run).
FOUND = (
    "realtime (found by the fuzzer, with the JSON mutator; seen in review first): a list or object as "
    "`input_audio_format` (or `eagerness`) raised TypeError (unhashable) out of `RealtimeConnection.receive`, "
    "ending the client's session instead of an `error` event",
    "sdp (found by the fuzzer): `a=ptime:30` + U+001D passed the `\\s` of the check and made float() raise "
    "ValueError out of `parse_sdp`, past the app's `except SdpError`; by review of the same pattern, `\u00b2` in "
    "the m= port, port count and formats (`str.isdigit()` is true for it, `int()` refuses it)",
    "sdp (by review while writing the target's invariants, which now check it): a bare CR inside `a=fmtp` was "
    "echoed into our SDP answer, a line break to CR-splitting peers",
    "sip_message (the same way): a bare CR inside a header value was kept and echoed in our responses (header "
    "injection for CR-splitting peers); now 400 `Bad Request - Bare CR in header`",
    "by review of the `isdigit()` pattern: `Session-Expires: \u00b2` raised inside the user agent "
    "(gateway/sip/session_timer.py), a Twilio `timestamp` of `\u00b2` raised out of `TwilioStream.receive`",
)

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
_FAILURE = re.compile(r"^(?:=+ Uncaught Python exception: =+|==\d+== ERROR: libFuzzer.*)$", re.M)


def _relative(arg: str) -> str:
    return arg.replace(str(ROOT) + os.sep, "")


def run_target(name: str, runs: int, max_len: int, work: Path, max_time: int) -> dict[str, object]:
    corpus = work / "corpus" / name
    crashes = work / "crashes"
    logs = work / "logs"
    for folder in (corpus, crashes, logs):
        folder.mkdir(parents=True, exist_ok=True)
    before = set(crashes.glob(f"{name}-*"))
    command = [sys.executable, str(FUZZ / "fuzz.py"), name, f"-runs={runs}", f"-max_len={max_len}",
               f"-max_total_time={max_time}", "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
               f"-artifact_prefix={crashes}/{name}-"]
    if name in DICTS:
        command.append(f"-dict={FUZZ / 'dicts' / DICTS[name]}.dict")
    command += [str(corpus), str(FUZZ / "seeds" / name)]
    log_path = logs / f"{name}.log"
    print(f"{name}: {runs} inputs ... (log {log_path})", flush=True)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - started
    text = log_path.read_text(encoding="utf-8", errors="replace")
    executed = re.search(r"stat::number_of_executed_units: (\d+)", text)
    statuses = _STATUS.findall(text)
    new_crashes = sorted(str(p) for p in set(crashes.glob(f"{name}-*")) - before)
    failure = _FAILURE.search(text)
    result: dict[str, object] = {
        "inputs": int(executed.group(1)) if executed else int(statuses[-1][0]) if statuses else 0,
        "seconds": round(seconds, 1),
        "exit_code": proc.returncode,
        "coverage": int(statuses[-1][1]) if statuses else None,
        "features": int(statuses[-1][2]) if statuses else None,
        "corpus": int(statuses[-1][3]) if statuses else None,
        "failures": len(new_crashes) if new_crashes else (1 if failure or proc.returncode else 0),
        "crash_files": new_crashes,
        "command": " ".join([".venv/bin/python", *[_relative(c) for c in command[1:]]]),
        "log": str(log_path),
    }
    if failure:
        result["failure"] = text[failure.start(): failure.start() + 3000]
    status = "FAILED" if result["failures"] else "ok"
    print(f"{name}: {status}, {result['inputs']} inputs in {seconds:.0f} s, coverage {result['coverage']}", flush=True)
    return result


def section(results: dict[str, dict[str, object]]) -> str:
    from bench.common import machine_description

    rows = []
    total = 0
    for name in PLAN:
        r = results.get(name)
        if r is None:
            rows.append(f"| {name} | not run | | | | |")
            continue
        total += int(r["inputs"])
        rate = int(r["inputs"]) / max(float(r["seconds"]), 0.1)
        code = str(r["code"])
        if " + uncommitted" in code:  # the tree is shared: name the commit and how much was uncommitted
            code = code.split(" + ")[0] + f" + uncommitted changes in {code.count(',') + 1} paths"
        rows.append(f"| {name} | {int(r['inputs']):,} | {float(r['seconds']):.0f} s ({rate:,.0f}/s) | "
                    f"{r['failures']} | {r['coverage']} / {r['corpus']} | {r['date']}, {code}, load {r.get('load', '?')} |")
    any_failed = any(r["failures"] for r in results.values())
    first = next(iter(results.values()), {})
    return f"""## Fuzzing (bench/fuzz/run.py)

Coverage-guided fuzzing with atheris {first.get('atheris', '?')} (libFuzzer) of every sans-I/O
protocol core, one target at a time, each from the seed corpus in `bench/fuzz/seeds/` plus the corpus
earlier runs grew. What counts as a failure is defined per target in `bench/fuzz/targets.py`: any
exception other than the module's documented error (`SipParseError`, `FramingError`, `SdpError`,
`RtpError`, `SiprecError`; none at all from `UserAgent.receive`, whose internal-error safety net and ERROR logs count
as failures, from `RtpReceiver`, `RealtimeConnection.receive` and `TwilioStream.receive`), or a broken
invariant (parse/serialize round trips of SIP and SDP, no bare CR in a parsed SIP header or in our SDP
answer, our answer re-reading as sent, SRTP keys only where the policy allows, audio chunks contiguous on
the call timeline and never ahead of the wall clock by more than the receiver's documented bound, framed
messages within the size limit, Twilio fill bounded by the stream clock, SIPREC parts taken from the body
as they are, every SDP label mapped only to a participant of the metadata with that participant's role, a
merge never dropping a party nor changing a role without a hint, reasons fit for a SIP reason phrase). The
user agent is driven with and without admission control (loopback, a digest trunk, an unverified trunk) and
with session timers on. The SIPREC targets run on the body splitter and the RFC 7865 metadata parser alone
(gateway/siprec/); the user agent target does not send SIPREC INVITEs.

Machine: {first.get('machine', machine_description())}; one fuzzer process at a time on a machine
shared with other work. The command of the first target: `{first.get('command', '')}` (the others with their own
`-runs` and `-max_len`, see `PLAN` in bench/fuzz/run.py). Raw results: bench/results/fuzz.json.

| target | inputs run | time | failures (uncaught exceptions or broken invariants) | coverage (libFuzzer edges) / corpus | run (UTC, code, load average at the end) |
|---|---:|---:|---:|---|---|
{chr(10).join(rows)}

**{total:,} inputs in total, {'FAILURES: see bench/results/fuzz.json' if any_failed else '0 failures'}.**

Defects found while building and running the fuzz job (all fixed, each with its input in
`bench/fuzz/regressions/` and a test in tests/unit/test_fuzz_properties.py):

{chr(10).join('- ' + f for f in FOUND)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", choices=sorted(PLAN), help="only this target (repeatable)")
    parser.add_argument("--runs", type=int, help="inputs per target (default: the PLAN's)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the PLAN's inputs (e.g. 0.01 to smoke)")
    parser.add_argument("--max-time", type=int, default=3600, help="seconds per target at most (default 3600)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("EARSHOT_FUZZ_WORK", "/tmp/earshot-fuzz")),
                        help="grown corpora, crashes and logs (default /tmp/earshot-fuzz)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/fuzz.json or RESULTS.md")
    args = parser.parse_args()
    try:
        import atheris  # noqa: F401
        from importlib.metadata import version
        atheris_version = version("atheris")
    except ImportError:
        print("atheris is not installed: .venv/bin/pip install atheris", file=sys.stderr)
        return 2
    from bench.common import code_version, machine_description, now_utc

    results: dict[str, dict[str, object]] = {}
    if RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text(encoding="utf-8"))
    failed = False
    for name in args.target or list(PLAN):
        default_runs, max_len = PLAN[name]
        runs = args.runs or max(1, round(default_runs * args.scale))
        result = run_target(name, runs, max_len, args.work, args.max_time)
        result.update(date=now_utc(), code=code_version(), machine=machine_description(), atheris=atheris_version,
                      load=" ".join(Path("/proc/loadavg").read_text().split()[:3]))
        failed |= bool(result["failures"])
        if not args.no_write:
            results[name] = result
            RESULTS_JSON.parent.mkdir(exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.no_write:
        from bench.common import write_section

        write_section("fuzz", section(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
