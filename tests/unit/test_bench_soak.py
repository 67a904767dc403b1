"""The pure parts of bench/soak.py, and its reader of the events stream against the real Redis."""

from __future__ import annotations

import json
import math
import uuid

import pytest
import redis

from bench.load import plan_calls
from bench.soak import FinalsReader, cut_plan, second_half, slope_per_hour
from tests.conftest import REDIS_URL


def test_slope_per_hour_of_a_line_and_of_flat_noise() -> None:
    line = [(t * 60.0, 100.0 + 0.5 * t) for t in range(61)]  # +0.5 per minute
    assert slope_per_hour(line) == pytest.approx(30.0)
    flat = [(t * 60.0, 10.0 + (1 if t % 2 else -1)) for t in range(60)]
    assert abs(slope_per_hour(flat)) < 1.0
    assert math.isnan(slope_per_hour([(0.0, 1.0)]))
    assert math.isnan(slope_per_hour([(5.0, 1.0), (5.0, 2.0)]))  # no spread in time


def test_second_half_skips_the_warm_up_and_missing_values() -> None:
    samples = [{"t": float(t), "rss": float(t), "p50": float("nan") if t == 8 else 1.0} for t in range(11)]
    assert [t for t, _ in second_half(samples, "rss")] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert [t for t, _ in second_half(samples, "p50")] == [5.0, 6.0, 7.0, 9.0, 10.0]
    assert second_half([], "rss") == []


def test_the_plan_is_cut_at_the_count_bound() -> None:
    plan = plan_calls(calls=8, duration_s=600.0, mean_hold_s=30.0, min_hold_s=5.0, max_hold_s=120.0,
                      gateways=1, seed=1, ramp_rate=2.0)
    assert len(plan) > 50
    assert cut_plan(plan, 50) == plan[:50]
    assert cut_plan(plan, 10_000) == plan


def test_finals_reader_reads_incrementally_across_trimming_and_counts_duplicates() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    stream = f"earshot-test-soak-{uuid.uuid4().hex[:8]}:events"
    try:
        def add(kind: str, event_id: str, **extra: object) -> None:
            client.xadd(stream, {"data": json.dumps({"type": kind, "event_id": event_id, **extra})})

        add("call.started", "c1-0", call_id="c1")
        add("turn.final", "c1-1", latency_ms=120.0)
        add("turn.partial", "c1-2")
        reader = FinalsReader(client, stream)
        reader.read()
        assert reader.final_ids == {"c1-1"} and reader.calls_started == {"c1"}
        assert [ms for _, ms in reader.finals] == [120.0]
        # trimmed between reads: what was read stays counted, only newer entries are read next
        client.xtrim(stream, maxlen=0)
        add("turn.final", "c1-3", latency_ms=80.0)
        add("turn.final", "c1-1", latency_ms=120.0)  # an at-least-once duplicate
        reader.read()
        assert reader.final_ids == {"c1-1", "c1-3"}
        assert reader.duplicates == 1
        assert sorted(ms for _, ms in reader.finals) == [80.0, 120.0]
        reader.read()  # nothing new
        assert len(reader.finals) == 2
    finally:
        client.delete(stream)
        client.close()


def test_latency_by_load_splits_by_calls_held_and_by_half() -> None:
    from bench.soak import latency_by_load

    samples = [{"t": float(t), "active_calls": float(3 if t % 2 else 9), "latency_p50_ms": 1000.0 if t % 2 else 8000.0}
               for t in range(20)]
    samples[5]["latency_p50_ms"] = float("nan")  # an interval without finals
    rows = {band: rest for band, *rest in latency_by_load(samples)}
    assert rows["0-4"] == [4, 1000.0, 5, 1000.0]
    assert rows["8+"] == [5, 8000.0, 5, 8000.0]
    assert rows["5-7"][0] == 0 and math.isnan(rows["5-7"][1])
    assert latency_by_load([]) == []
