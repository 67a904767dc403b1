"""AsrScheduler on its own: priorities, superseding, deadlines, fairness, bounds, batching, overload.

Pure scheduling, so the engine is replaced by the batch key alone and time by
fake clocks; tests/unit/test_asr_batching.py runs the same scheduler with the
real tiny.en engine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gateway.asr.interface import AsrOverloaded, AsrTimeout, Superseded, TranscriberClosed, TranscriptionRequest
from gateway.asr.scheduler import AsrScheduler, SchedulerLimits


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request(kind: str = "final", key: str = "", session: str = "", language: str | None = None,
            deadline: float | None = None, seconds: float = 1.0) -> TranscriptionRequest:
    return TranscriptionRequest(np.zeros(int(16000 * seconds), np.float32), kind, language=language, key=key,  # type: ignore[arg-type]
                                session=session, deadline=deadline)


def key_of(r: TranscriptionRequest, overloaded: bool) -> tuple[object, ...]:
    return (r.kind, r.language, overloaded)


def make(clock: Clock | None = None, **limits: object) -> AsrScheduler:
    clock = clock or Clock()
    return AsrScheduler(key_of, SchedulerLimits(**limits), wall_clock=clock)  # type: ignore[arg-type]


def take(s: AsrScheduler) -> list[TranscriptionRequest]:
    batch = s.next_batch(timeout=0)
    assert batch is not None
    s.finished(batch)
    return batch.requests


def test_finals_run_before_partials_in_submission_order() -> None:
    s = make(max_batch=1)
    p1 = request("partial", key="a")
    f1, f2 = request("final", key="b"), request("final", key="c")
    for r in (p1, f1, f2):
        s.submit(r)
    assert [take(s)[0] for _ in range(3)] == [f1, f2, p1]
    assert s.next_batch(timeout=0) is None


def test_a_newer_request_for_the_key_supersedes_the_waiting_partial() -> None:
    s = make(max_batch=1)
    old = s.submit(request("partial", key="a"))
    newer_partial = request("partial", key="a")
    new = s.submit(newer_partial)
    assert isinstance(old.exception(0), Superseded)
    final = request("final", key="a")
    s.submit(final)
    assert isinstance(new.exception(0), Superseded)
    assert take(s) == [final] and s.queued == 0
    assert s.dropped["superseded"] == 2
    # another key's partial is left alone
    other = s.submit(request("partial", key="b"))
    s.submit(request("partial", key="c"))
    assert not other.done()


def test_a_request_past_its_deadline_is_dropped_not_run() -> None:
    clock = Clock()
    s = make(clock, max_batch=4)
    late = s.submit(request(deadline=clock.now + 1.0))
    on_time = request(deadline=clock.now + 10.0)
    s.submit(on_time)
    clock.now += 2.0
    assert take(s) == [on_time]
    assert isinstance(late.exception(0), AsrTimeout)
    arrived_late = s.submit(request(deadline=clock.now - 0.1))
    assert isinstance(arrived_late.exception(0), AsrTimeout)
    assert s.dropped["deadline"] == 2 and s.queued == 0


def test_one_session_flooding_does_not_starve_another() -> None:
    """Round robin across sessions: a final of a quiet call waits for at most one of the
    flooding call's, not for its whole backlog."""
    s = make(max_batch=1)
    flood = [request(session="flood", key="flood/in") for _ in range(20)]
    for r in flood:
        s.submit(r)
    quiet = request(session="quiet", key="quiet/in")
    s.submit(quiet)
    order = [take(s)[0] for _ in range(21)]
    assert order.index(quiet) <= 1
    assert [r for r in order if r is not quiet] == flood  # FIFO within a session


def test_queue_bounds_shed_the_oldest_final_of_the_call_holding_the_most() -> None:
    """Bounded and fair: a call over its share loses its own oldest waiting final; a full lane
    takes room from the call holding the most, not from a quiet call; every final shed or
    refused gets AsrOverloaded (published as error asr-overload), none vanishes."""
    s = make(max_group_finals=3, max_finals=5, max_group_partials=1)
    futures = [s.submit(request(session="a")) for _ in range(4)]
    assert isinstance(futures[0].exception(0), AsrOverloaded)  # a's oldest made room for its newest
    assert "session 'a'" in str(futures[0].exception(0)) and "oldest" in str(futures[0].exception(0))
    assert not any(f.done() for f in futures[1:])
    others = [s.submit(request(session=f"s{i}")) for i in range(3)]
    # the lane is full when s2 comes: 'a' holds the most, so its oldest goes
    assert isinstance(futures[1].exception(0), AsrOverloaded) and "the queue" in str(futures[1].exception(0))
    assert not any(f.done() for f in others)
    s.submit(request(session="s0"))  # 'a' still holds the most: its oldest goes
    assert isinstance(futures[2].exception(0), AsrOverloaded)
    s.submit(request(session="s0"))  # now s0 holds the most: its own oldest goes
    assert isinstance(others[0].exception(0), AsrOverloaded) and "session 's0'" in str(others[0].exception(0))
    assert s.queued_finals == 5 and s.dropped["shed"] == 4 and s.dropped["queue-full"] == 0
    order: list[str] = []
    while s.queued_finals:
        order += [r.session for r in take(s)]
    assert sorted(order) == ["a", "s0", "s0", "s1", "s2"]
    # partials without a key cannot supersede each other, so the group bound holds them
    s.submit(request("partial", session="a"))
    assert isinstance(s.submit(request("partial", session="a")).exception(0), AsrOverloaded)


def test_a_flooding_call_cannot_take_a_quiet_calls_place_in_a_full_queue() -> None:
    s = make(max_batch=1, max_group_finals=100, max_finals=10)
    flood = [s.submit(request(session="flood")) for _ in range(10)]
    quiet = s.submit(request(session="quiet"))
    assert not quiet.done()  # admitted: the flood's oldest made room
    assert isinstance(flood[0].exception(0), AsrOverloaded)
    late_flood = s.submit(request(session="flood"))
    assert not late_flood.done() and isinstance(flood[1].exception(0), AsrOverloaded)
    first_two = [take(s)[0].session for _ in range(2)]
    assert "quiet" in first_two  # and round robin serves it at once


def test_batches_take_compatible_heads_of_every_session() -> None:
    s = make(max_batch=3)
    a1, a2 = request(session="a"), request(session="a")
    b1 = request(session="b", language="de")  # incompatible with a1
    c1 = request(session="c")
    for r in (a1, a2, b1, c1):
        s.submit(r)
    first = take(s)
    assert first == [a1, c1, a2]  # a1, then the compatible heads in round-robin order; b1 is not
    assert take(s) == [b1]
    assert (s.batches, s.batched) == (2, 3)


def test_a_batch_waits_for_company_up_to_batch_wait() -> None:
    s = AsrScheduler(key_of, SchedulerLimits(max_batch=4, batch_wait_s=2.0))
    s.submit(request(session="a"))
    joiner = request(session="b")
    threading.Timer(0.2, lambda: s.submit(joiner)).start()
    started = time.monotonic()
    batch = s.next_batch(timeout=5)
    elapsed = time.monotonic() - started
    assert batch is not None and len(batch.jobs) == 2 and batch.requests[1] is joiner
    assert 1.5 <= elapsed <= 5 and batch.waited >= 1.5  # waited the window out: it never filled
    # a full batch does not wait
    s2 = AsrScheduler(key_of, SchedulerLimits(max_batch=2, batch_wait_s=5.0))
    s2.submit(request(session="a"))
    s2.submit(request(session="b"))
    started = time.monotonic()
    assert len(s2.next_batch(timeout=1).jobs) == 2  # type: ignore[union-attr]
    assert time.monotonic() - started < 1.0


def test_overload_flags_batches_while_more_finals_wait_than_the_backlog() -> None:
    s = make(max_batch=1, overload_backlog=2)
    for i in range(4):
        s.submit(request(session=f"s{i}"))
    flags = []
    for _ in range(4):
        batch = s.next_batch(timeout=0)
        assert batch is not None
        flags.append(batch.overloaded)
        s.finished(batch)
    assert flags == [True, True, False, False] and s.overloaded == 2


def test_cancelled_and_withdrawn_requests_never_run() -> None:
    s = make(max_batch=4)
    kept = request(session="a")
    withdrawn = s.submit(request(session="b"))
    cancelled = request(session="c")
    s.submit(kept)
    s.submit(cancelled)
    assert withdrawn.cancel()  # the caller gave up (a speculative final whose speaker went on)
    assert s.cancel(cancelled.request_id) and not s.cancel("no-such-id")
    assert s.queued == 1 and take(s) == [kept]
    assert s.dropped["cancelled"] == 2


def test_close_drops_partials_and_drains_finals() -> None:
    s = make(max_batch=1)
    final = request()
    partial = s.submit(request("partial", key="x"))
    s.submit(final)
    s.close()
    assert isinstance(partial.exception(0), TranscriberClosed)
    with pytest.raises(TranscriberClosed):
        s.submit(request())
    assert take(s) == [final]
    assert s.next_batch() is None  # closed and empty: runner threads end


def test_paused_holds_everything_back_and_idle_tracks_running_batches() -> None:
    s = make(max_batch=1)
    with s.paused():
        s.submit(request())
        assert s.next_batch(timeout=0.05) is None
    batch = s.next_batch(timeout=0)
    assert batch is not None and not s.idle
    assert not s.wait_idle(0.01)
    s.finished(batch)
    assert s.idle and s.wait_idle(0)


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_batch": 1.5}, {"overload_backlog": -1},
                                 {"batch_wait_s": -0.1}, {"batch_wait_s": float("nan")}, {"max_group_finals": 0}])
def test_bad_limits_name_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SchedulerLimits(**bad)  # type: ignore[arg-type]
