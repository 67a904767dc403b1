"""The login throttle: progressive delays, lockout, forgetting, and its memory bound."""

from hypothesis import given, settings, strategies as st

from gateway.web.throttle import LoginThrottle

KEYS = ("addr:192.0.2.7", "user:alice")


def test_first_failures_are_free_then_delays_double():
    t = LoginThrottle(free_failures=3, base_delay_s=1.0, max_delay_s=60.0, lockout_failures=10, lockout_s=900.0)
    now = 1000.0
    waits = []
    for _ in range(9):
        assert t.wait(KEYS, now) == 0.0  # each attempt made once the previous wait ran out
        waits.append(t.failure(KEYS, now))
        now += waits[-1]
    assert waits == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_attempt_during_the_delay_is_refused_with_the_time_left():
    t = LoginThrottle(free_failures=1, base_delay_s=5.0)
    t.failure(KEYS, 0.0)
    t.failure(KEYS, 0.0)  # second failure: 5 s
    assert t.wait(KEYS, 2.0) == 3.0
    assert t.wait(KEYS, 5.0) == 0.0


def test_lockout_after_many_failures():
    t = LoginThrottle(free_failures=2, base_delay_s=0.5, max_delay_s=4.0, lockout_failures=6, lockout_s=900.0)
    now = 0.0
    for _ in range(6):
        now += t.wait(KEYS, now)
        last = t.failure(KEYS, now)
    assert last == 900.0
    assert t.wait(KEYS, now + 899.0) == 1.0
    assert t.wait(KEYS, now + 900.0) == 0.0


def test_address_and_user_are_counted_separately():
    t = LoginThrottle(free_failures=0, base_delay_s=10.0)
    t.failure(("addr:a", "user:alice"), 0.0)
    assert t.wait(("addr:a", "user:bob"), 1.0) == 9.0  # same address, another user: still slowed
    assert t.wait(("addr:b", "user:alice"), 1.0) == 9.0  # another address, same user: still slowed
    assert t.wait(("addr:b", "user:bob"), 1.0) == 0.0


def test_success_clears_only_the_key_given():
    t = LoginThrottle(free_failures=0, base_delay_s=10.0)
    t.failure(KEYS, 0.0)
    t.success("user:alice")
    assert t.wait(("user:alice",), 1.0) == 0.0
    assert t.wait(("addr:192.0.2.7",), 1.0) == 9.0


def test_failures_are_forgotten_after_a_quiet_period():
    t = LoginThrottle(free_failures=3, forget_after_s=600.0)
    for i in range(3):
        t.failure(KEYS, float(i))
    assert t.failures("user:alice", 100.0) == 3
    assert t.failures("user:alice", 700.0) == 0
    assert t.failure(KEYS, 700.0) == 0.0  # counting starts over


def test_table_is_bounded_under_a_flood_of_new_keys():
    t = LoginThrottle(max_keys=100)
    for i in range(1000):
        t.failure((f"user:u{i}",), 0.0)
    assert len(t._records) == 100
    assert t.failures("user:u999", 0.0) == 1  # the newest are kept
    assert t.failures("user:u0", 0.0) == 0


# no wall-clock deadline (Hypothesis' default is 200 ms per example): the throttle runs on
# the test's own clock, so a slow example only means a loaded machine (the suite runs on
# a shared 2-core one), and a deadline would fail it, or report it as Flaky, for that alone
@settings(deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=40))
def test_delay_never_shrinks_while_failing_and_never_exceeds_the_lockout(gaps):
    t = LoginThrottle()
    now = 0.0
    previous = 0.0
    for gap in gaps:
        now += gap
        now += t.wait(KEYS, now)
        wait = t.failure(KEYS, now)
        assert 0.0 <= wait <= t.lockout_s
        if t.failures("user:alice", now) > 1:
            assert wait >= previous
        previous = wait
