"""Wait for something to happen instead of sleeping a fixed time and hoping it did.

``await wait_for(condition, timeout, what)`` polls ``condition`` until it returns
something truthy and returns that value, or fails the test with "timed out after N s
waiting for <what>" once ``timeout`` seconds have passed.  Pick a generous ``timeout``:
a passing test returns as soon as the condition holds, so the bound only decides how
long a broken test takes to fail, and a short one turns a loaded machine into a flaky
test.

``condition`` may be a plain callable or return an awaitable.  ``what`` may be a
callable, evaluated only on failure, to report the state at that moment.

The tests that wait all run on an event loop, so there is only an async variant.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT,
    what: str | Callable[[], str] = "the condition",
    *,
    poll: float = POLL_INTERVAL,
) -> T:
    """Poll ``condition`` on the running loop until it is truthy (returned) or ``timeout`` passes (test fails)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {_describe(what)}")
        await asyncio.sleep(poll)

