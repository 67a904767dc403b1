"""Slows down password guessing without letting a stranger lock anyone out.

Sans-I/O: fed keys and ``now`` (monotonic seconds), it only answers how long a
key must wait. Waiting is enforced by refusing attempts that come too early
(answered at once with 429 and Retry-After, without checking the password), not
by holding connections open, so parallel attempts gain nothing and a flood
costs the server no scrypt hashes.

:class:`LoginGuard` is the dashboard's policy, over three counts:

* per (client address, account): a few free failures, then doubling delays,
  then a 15-minute lockout of *that address for that account*: a guesser is
  stopped, the account's owner elsewhere is not;
* per client address (any account): doubling delays, then a lockout of the
  address: one address spraying passwords over many accounts is stopped;
* per account (from every address): many free failures, then delays capped at
  ``max_delay_s`` and never a lockout; addresses that logged in to the account
  successfully (the owner's) are exempt, so a distributed guesser is slowed
  while the owner is not held up at all.

There is no account-wide lockout: with one, anyone who can reach the login
form could lock out the admin by typing five wrong passwords. The tables are in
memory, per process, bounded.
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
        doublings = failures - self.free_failures - 1
        if doublings > 60:  # far past max_delay_s; and 2**n would overflow a float
            return self.max_delay_s
        return min(self.base_delay_s * 2 ** doublings, self.max_delay_s)

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
        """Forget the failures of ``key``."""
        self._records.pop(key, None)


NEVER = 2**62  # failures: a lockout that never comes


class LoginGuard:
    """The dashboard's login throttling (see the module docstring): address, address+account
    and account counts, the last one skipped for addresses the account logged in from."""

    def __init__(
        self,
        *,
        address: LoginThrottle | None = None,
        pair: LoginThrottle | None = None,
        account: LoginThrottle | None = None,
        trusted_per_account: int = 16,
        max_accounts: int = 10_000,
    ) -> None:
        # one address, any account: three free, 1 s doubling to 60 s, 15 min after ten
        self.address = address or LoginThrottle()
        # one address, one account: locked out for 15 min after five
        self.pair = pair or LoginThrottle(free_failures=2, lockout_failures=5, lockout_s=900.0)
        # one account, every address but the owner's: ten free, then at most 30 s apart, no lockout
        self.account = account or LoginThrottle(free_failures=10, base_delay_s=1.0, max_delay_s=30.0,
                                                lockout_failures=NEVER, lockout_s=30.0)
        self.trusted_per_account = trusted_per_account
        self.max_accounts = max_accounts
        self._trusted: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    @staticmethod
    def _pair(address: str, account: str) -> str:
        return f"{address}|{account}"

    def trusted(self, address: str, account: str) -> bool:
        """True when ``address`` logged in to ``account`` before (in this process)."""
        return address in self._trusted.get(account, ())

    def wait(self, address: str, account: str, now: float) -> float:
        """Seconds before this address may try this account; 0 when it may now."""
        wait = max(self.address.wait((address,), now), self.pair.wait((self._pair(address, account),), now))
        if not self.trusted(address, account):
            wait = max(wait, self.account.wait((account,), now))
        return wait

    def failure(self, address: str, account: str, now: float) -> float:
        """Record a failed attempt; returns the wait it imposes on this address for this account."""
        wait = max(self.address.failure((address,), now), self.pair.failure((self._pair(address, account),), now))
        account_wait = self.account.failure((account,), now)
        return wait if self.trusted(address, account) else max(wait, account_wait)

    def locked_out(self, address: str, account: str, now: float) -> bool:
        """True when this address is locked out of this account (not just slowed)."""
        return self.pair.failures(self._pair(address, account), now) >= self.pair.lockout_failures

    def success(self, address: str, account: str) -> None:
        """A login succeeded: the pair's count goes, the address becomes trusted for the account.

        The address keeps its own count (a valid login must not reset guessing at
        other accounts), and so does the account (a guesser elsewhere goes on waiting).
        """
        self.pair.success(self._pair(address, account))
        addresses = self._trusted.setdefault(account, OrderedDict())
        addresses[address] = None
        addresses.move_to_end(address)
        while len(addresses) > self.trusted_per_account:
            addresses.popitem(last=False)
        self._trusted.move_to_end(account)
        while len(self._trusted) > self.max_accounts:
            self._trusted.popitem(last=False)
