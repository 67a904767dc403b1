"""pytest-timeout, with the stacks of the asyncio tasks when a test hangs.

pyproject.toml gives every test a time limit (pytest-timeout, ``signal`` method): a test
that hangs fails, and the run goes on, instead of using up CI's limit. When a coroutine
test hangs, the main thread's stack only shows the event loop waiting in ``select``; what
is stuck is a task awaiting something that never comes. So this plugin's SIGALRM handler
first prints every task of the running loop with its stack, then hands over to
pytest-timeout (thread stacks, then the test fails).
"""

from __future__ import annotations

import asyncio
import io
import signal
import sys
import threading
from typing import Any

import pytest


def _dump_tasks() -> None:
    loop = asyncio.events._get_running_loop()
    if loop is None:
        return
    out = io.StringIO()
    tasks = asyncio.all_tasks(loop)
    print(f"\n+++ Timeout: {len(tasks)} asyncio task(s) of the running loop +++", file=out)
    for task in tasks:
        print(f"--- {task.get_name()}: {task.get_coro()!r}", file=out)
        task.print_stack(limit=40, file=out)
    sys.stderr.write(out.getvalue())
    sys.stderr.flush()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own timer
    import pytest_timeout

    def handler(signum: int, frame: object) -> None:
        __tracebackhide__ = True
        _dump_tasks()
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
