"""Run a test module's async tests on both event loops `earshot run` may use.

A pytest plugin.  In a module::

    pytest_plugins = ["tests.loops"]
    pytestmark = pytest.mark.usefixtures("both_loops")

pytest-asyncio (1.4+) creates each test's loop with a factory from the
``pytest_asyncio_loop_factories`` hook and parametrizes the test over the
factories the hook returns for it, so every async test of such a module runs
twice, with the ids ``[asyncio]`` and ``[uvloop]``.  (Overriding the
``event_loop_policy`` fixture, the old way, is deprecated.)  Synchronous tests
have no loop and run once.

pytest reads hooks only from conftest.py files and plugins, never from a test
module: hence ``pytest_plugins``, and hence no ``from tests.loops import ...``
in the modules (a module imported before pytest registers it as a plugin gets a
PytestAssertRewriteWarning).  A plugin's hook answers for every test of the
session, so it tells the tests that asked for both loops (they use the
``both_loops`` fixture) from the rest, which get asyncio's default loop, as they
would without the hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import pytest_asyncio

FIXTURE = "both_loops"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class _Loop:
    """A loop factory that knows its name, so a test can check what it runs on."""

    def __init__(self, name: str, new: LoopFactory) -> None:
        self.name, self.new = name, new

    def __call__(self) -> asyncio.AbstractEventLoop:
        return self.new()

    def __repr__(self) -> str:
        return f"<{self.name} loop factory>"


def _new_uvloop() -> asyncio.AbstractEventLoop:
    uvloop = pytest.importorskip("uvloop")  # the [uvloop] variant is skipped where uvloop is missing
    return uvloop.new_event_loop()


#: what `earshot run` picks from (gateway/cli.py: ``uvloop.new_event_loop`` or asyncio's default)
#: (keyed by name: the keys are the test ids)
LOOP_FACTORIES: dict[str, LoopFactory] = {
    f.name: f for f in (_Loop("asyncio", asyncio.new_event_loop), _Loop("uvloop", _new_uvloop))
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    """The pytest-asyncio hook: both loops for tests that use ``both_loops``, asyncio for the rest.

    (pytest-asyncio requires a mapping for every test once any implementation exists.)
    """
    if FIXTURE in getattr(item, "fixturenames", ()):
        return LOOP_FACTORIES
    return {"asyncio": asyncio.new_event_loop}


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Which kind of loop this is: "uvloop" or "asyncio"."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


@pytest_asyncio.fixture(name=FIXTURE)
async def both_loops(request: pytest.FixtureRequest) -> None:
    """Ask for both loops; also fails a test that does not run on the loop its id names."""
    if not pytest_asyncio.is_async_test(request.node):
        return  # a synchronous test: no loop of its own, run once
    callspec = getattr(request.node, "callspec", None)
    factory = callspec.params.get("_asyncio_loop_factory") if callspec else None  # added by pytest-asyncio
    assert isinstance(factory, _Loop), f"{request.node.nodeid} is not parametrized over the event loops"
    running = asyncio.get_running_loop()
    assert loop_name(running) == factory.name, f"{request.node.nodeid} runs on {running!r}"
