"""The pure parts of bench/load.py: the call schedule, sipp's injection file, parsing."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.common import percentile
from bench.load import (
    PlannedCall,
    clipped_mean,
    concurrency,
    fell_behind,
    injection_file,
    non_2xx,
    parse_metrics,
    plan_calls,
    rejected_calls,
    sipp_stats,
    window_latencies,
)

PLAN = dict(calls=50, duration_s=300.0, mean_hold_s=20.0, min_hold_s=3.0, max_hold_s=60.0, gateways=2, seed=7)


def test_plan_is_reproducible_sorted_and_bounded() -> None:
    plan = plan_calls(**PLAN)
    assert plan == plan_calls(**PLAN)
    assert plan != plan_calls(**{**PLAN, "seed": 8})
    arrivals = [c.arrival_s for c in plan]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 300.0
    assert all(c.arrival_s + c.hold_s <= 300.0 + 5.0 + 1e-6 for c in plan)  # ended within the tail
    assert all(c.hold_s <= 60.0 + 50 / 20.0 for c in plan)  # max hold (+ the ramp for ramped-in calls)


def test_ramp_brings_up_the_target_then_poisson_keeps_it() -> None:
    plan = plan_calls(**{**PLAN, "calls": 100, "duration_s": 2000.0})
    assert [c.arrival_s for c in plan[:100]] == [round(i / 20.0, 3) for i in range(100)]
    assert concurrency(plan, 100 / 20.0) == 100  # every ramped-in call is still up at the ramp's end
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(plan[100:], plan[101:])]
    rate = 100 / clipped_mean(20.0, 3.0, 60.0)
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.1)  # exponential gaps at calls / mean hold
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.15)  # an exponential's sd equals its mean
    mid = [concurrency(plan, t) for t in range(200, 1900, 50)]
    assert statistics.mean(mid) == pytest.approx(100, rel=0.15)  # Little's law


def test_clipped_mean_matches_sampling() -> None:
    rng = random.Random(3)
    draws = [min(max(rng.expovariate(1 / 20.0), 3.0), 60.0) for _ in range(50_000)]
    assert clipped_mean(20.0, 3.0, 60.0) == pytest.approx(statistics.mean(draws), rel=0.02)
    assert clipped_mean(20.0, 1e-9, 1e9) == pytest.approx(20.0)


def test_calls_are_dealt_round_robin() -> None:
    plan = plan_calls(**{**PLAN, "gateways": 3})
    assert [c.gateway for c in plan[:7]] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("bad", [dict(calls=0), dict(gateways=0), dict(min_hold_s=30.0), dict(max_hold_s=10.0),
                                 dict(duration_s=0.0)])
def test_plan_refuses_bad_arguments(bad: dict) -> None:
    with pytest.raises(ValueError, match="plan_calls"):
        plan_calls(**{**PLAN, **bad})


def test_injection_file_is_what_uac_load_reads() -> None:
    text = injection_file([PlannedCall(0.0, 12.3456, 0), PlannedCall(1.5, 4.0, 1)], [5070, 5080])
    assert text == "SEQUENTIAL\n0;12346;5070\n1500;4000;5080\n"


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile(list(map(float, range(101))), 95) == 95.0
    assert math.isnan(percentile([], 50))


def test_parse_metrics_and_rejections() -> None:
    text = """# HELP earshot_calls_total Calls offered, by outcome
# TYPE earshot_calls_total counter
earshot_calls_total{outcome="answered"} 7.0
earshot_calls_total{outcome="ended-bye"} 6.0
earshot_calls_total{outcome="cancelled"} 1.0
earshot_calls_total{outcome="dialplan"} 2.0
earshot_calls_total{outcome="busy"} 3.0
earshot_rtp_lost_packets_total 4.0
garbage line here
"""
    m = parse_metrics(text)
    assert m['earshot_calls_total{outcome="answered"}'] == 7.0
    assert m["earshot_rtp_lost_packets_total"] == 4.0
    assert "garbage line" not in " ".join(m)
    assert rejected_calls(m) == 5.0


def test_sipp_outputs() -> None:
    stats = "StartTime;TotalCallCreated;SuccessfulCall(C);FailedCall(C)\nx;1;1;0\ny;9;8;1\n"
    assert sipp_stats(stats) == {"StartTime": "y", "TotalCallCreated": "9", "SuccessfulCall(C)": "8",
                                 "FailedCall(C)": "1"}
    assert sipp_stats("") == {}
    log = ("2026-12-03 Aborting call on unexpected message while expecting '200', received 'SIP/2.0 503 "
           "Service Unavailable\nVia: SIP/2.0/UDP 127.0.0.1:5070\nSIP/2.0 200 OK\nSIP/2.0 486 Busy Here\n")
    assert non_2xx(log) == 2


def test_window_latencies_and_behind() -> None:
    finals = [(1.0, 100.0), (5.0, 200.0), (9.0, 300.0)]
    assert window_latencies(finals, 2.0, 9.0) == [200.0, 300.0]
    ok = {"packets_accepted": 10_000.0, "lost_packets": 5.0, "late_packets": 4.0, "latency_p95_ms": 500.0,
          "sipp_failed": 0, "sipp_created": 100, "window_s": 30.0}
    assert fell_behind(ok, 300.0) == []
    assert fell_behind({**ok, "lost_packets": 20.0}, 300.0) == ["RTP lost+late over 0.1 %"]
    assert "turn p95" in fell_behind({**ok, "latency_p95_ms": 900.0}, 300.0)[0]
    assert fell_behind({**ok, "sipp_failed": 2}, None) == ["over 1 % of sipp calls failed"]
