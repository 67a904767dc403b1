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


# -- the dashboard's policy: no stranger can lock anyone out ---------------------------------

from gateway.web.throttle import LoginGuard  # noqa: E402


def fail_until_refused(guard: LoginGuard, address: str, account: str, now: float, attempts: int) -> float:
    """Make ``attempts`` failed logins as soon as each is allowed; returns the time after the last."""
    for _ in range(attempts):
        now += guard.wait(address, account, now)
        guard.failure(address, account, now)
    return now


def test_a_stranger_guessing_locks_out_only_its_own_address_for_that_account():
    guard = LoginGuard()
    guard.success("198.51.100.1", "root")  # the admin logged in from their desk once
    now = fail_until_refused(guard, "203.0.113.9", "root", 0.0, 5)
    assert guard.locked_out("203.0.113.9", "root", now)
    assert guard.wait("203.0.113.9", "root", now) >= 899.0  # the guesser waits 15 minutes
    assert guard.wait("198.51.100.1", "root", now) == 0.0  # the admin logs in at once
    assert guard.wait("192.0.2.50", "root", now) == 0.0  # and so does anyone else, after five failures


def test_many_addresses_guessing_one_account_are_slowed_but_the_owner_is_not():
    guard = LoginGuard()
    guard.success("198.51.100.1", "root")
    now = 0.0
    for i in range(40):  # a botnet: four tries from each of ten addresses
        now = fail_until_refused(guard, f"203.0.113.{i % 10}", "root", now, 1)
    fresh = guard.wait("192.0.2.77", "root", now)
    assert 0.0 < fresh <= 30.0  # a new address waits, never longer than 30 s, never locked out
    assert not guard.locked_out("192.0.2.77", "root", now)
    assert guard.wait("198.51.100.1", "root", now) == 0.0  # the address that logged in before does not
    now += fresh
    assert guard.wait("192.0.2.77", "root", now) == 0.0


def test_one_address_spraying_many_accounts_is_stopped():
    guard = LoginGuard()
    now = 0.0
    for i in range(10):
        now = fail_until_refused(guard, "203.0.113.9", f"user{i}", now, 1)
    assert guard.wait("203.0.113.9", "someone-else", now) >= 899.0
    assert guard.wait("203.0.113.10", "someone-else", now) == 0.0


def test_a_success_clears_the_pair_but_not_the_address():
    guard = LoginGuard()
    now = fail_until_refused(guard, "a", "alice", 0.0, 4)
    assert guard.pair.failures("a|alice", now) == 4
    guard.success("a", "alice")
    assert guard.pair.failures("a|alice", now) == 0 and guard.address.failures("a", now) == 4
    assert guard.trusted("a", "alice") and not guard.trusted("a", "bob")


def test_trusted_addresses_are_bounded():
    guard = LoginGuard(trusted_per_account=3, max_accounts=2)
    for i in range(10):
        guard.success(f"10.0.0.{i}", "alice")
    assert [a for a in (f"10.0.0.{i}" for i in range(10)) if guard.trusted(a, "alice")] == \
        ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
    guard.success("x", "bob")
    guard.success("x", "carol")
    assert not guard.trusted("10.0.0.9", "alice") and guard.trusted("x", "carol")


def test_a_throttle_without_lockout_survives_huge_failure_counts():
    t = LoginThrottle(free_failures=1, max_delay_s=30.0, lockout_failures=2**62, lockout_s=30.0)
    assert t.delay_after(10_000) == 30.0
