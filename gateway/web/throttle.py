"""Slows down password guessing: progressive delays, then a temporary lockout.

Sans-I/O: fed keys and ``now`` (monotonic seconds), it only answers how long a
key must wait. The dashboard keys every login attempt twice, by the client
address and by the username tried, so guessing many passwords for one user
from many addresses, or one password for many users from one address, is
slowed either way. Waiting is enforced by refusing attempts that come too early
(answered at once with 429 and Retry-After, without checking the password),
not by holding connections open, so parallel attempts gain nothing and a
flood costs the server no scrypt hashes.

The store adds a persistent per-user lockout on top (see
:func:`gateway.store.users.record_failed_login`); this one is in memory, per
process, and also covers unknown usernames and addresses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable


@dataclass
class _Record:
    failures: int
    last_failure: float
    allowed_at: float  # no attempt before this time


class LoginThrottle:
    def __init__(
        self,
        *,
        free_failures: int = 3,
        base_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        lockout_failures: int = 10,
        lockout_s: float = 900.0,
        forget_after_s: float = 900.0,
        max_keys: int = 100_000,
    ) -> None:
        if free_failures < 0 or lockout_failures <= free_failures:
            raise ValueError("need 0 <= free_failures < lockout_failures")
        self.free_failures = free_failures
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.lockout_failures = lockout_failures
        self.lockout_s = lockout_s
        self.forget_after_s = forget_after_s
        self.max_keys = max_keys
        # oldest failure first, so the table stays bounded under a flood of new keys
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def delay_after(self, failures: int) -> float:
        """How long to wait after the n-th consecutive failure."""
        if failures >= self.lockout_failures:
            return self.lockout_s
        if failures <= self.free_failures:
            return 0.0
        return min(self.base_delay_s * 2 ** (failures - self.free_failures - 1), self.max_delay_s)

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now >= record.allowed_at and now - record.last_failure >= self.forget_after_s:
            del self._records[key]
            return None
        return record

    def wait(self, keys: Iterable[str], now: float) -> float:
        """Seconds before an attempt under all of ``keys`` is allowed; 0 when it is allowed now."""
        longest = 0.0
        for key in keys:
            record = self._get(key, now)
            if record is not None:
                longest = max(longest, record.allowed_at - now)
        return longest

    def failures(self, key: str, now: float) -> int:
        record = self._get(key, now)
        return 0 if record is None else record.failures

    def failure(self, keys: Iterable[str], now: float) -> float:
        """Record a failed attempt under every key; returns the wait it imposes."""
        longest = 0.0
        for key in keys:
            record = self._get(key, now)
            if record is None:
                record = _Record(failures=0, last_failure=now, allowed_at=now)
            record.failures += 1
            record.last_failure = now
            delay = self.delay_after(record.failures)
            record.allowed_at = now + delay
            self._records[key] = record
            self._records.move_to_end(key)
            longest = max(longest, delay)
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)
        return longest

    def success(self, key: str) -> None:
        """Forget the failures of ``key`` (the user's; never the address's, see the login)."""
        self._records.pop(key, None)
