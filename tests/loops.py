"""Run a test module on both event loops `earshot run` may use.

In a module: ``event_loop_policy = both_loops()`` (pytest-asyncio reads that fixture).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


def _policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def both_loops() -> Any:
    """An autouse ``event_loop_policy`` fixture parametrized over asyncio and uvloop."""
    return pytest.fixture(params=["asyncio", "uvloop"], autouse=True, name="event_loop_policy")(_policy)
