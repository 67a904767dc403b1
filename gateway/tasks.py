"""Stopping background tasks so that a shutdown always ends.

``task.cancel(); await task`` is not enough here: redis-py's asyncio client can
swallow a cancellation. When the cancel lands while a command is in flight, the
command may complete and return normally to a task that is still marked
cancelling (seen with redis-py 8.1: one cancel in five or so during a SET or a
pipeline). A ``while True`` loop around Redis calls then goes on forever, and
whoever awaits it after cancelling it waits forever: a gateway that never exits
on SIGTERM. :func:`stop_tasks` cancels again until each task has ended, and
gives up (logging which task) after a bound instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

__all__ = ["stop_tasks"]

#: How often a task that survived its cancellation is cancelled again.
RECANCEL_INTERVAL_S = 0.05


async def stop_tasks(tasks: Iterable[asyncio.Future[object]], timeout: float = 5.0) -> set[asyncio.Future[object]]:
    """Cancel ``tasks`` and wait until each has ended, re-cancelling those that go on.

    Returns the tasks still running after ``timeout`` seconds (logged; empty when all
    stopped). Exceptions of the tasks are consumed, not raised: a background task's
    failure is its own to log. Cancelling the caller still cancels this wait.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL_S, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
    for task in pending:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.warning("task %s did not stop within %.1f s of its cancellation", name, timeout)
    return pending
