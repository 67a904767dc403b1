"""Dialplan reloads: on SIGHUP and on file change, under active calls, and a bad file kept out.

The first half drives :class:`DialplanSource` directly; the second a started Gateway with
real UDP calls: a call answered before the reload keeps its profile's turn settings, a call
after it gets the new ones, and ``call.started`` says which plan version routed each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from gateway.dialplan import Dialplan, DialplanError, load_dialplan
from gateway.dialplan_watch import DialplanSource
from tests.unit.test_dialplan_gateway import leg_config, started_of
from tests.unit.test_gateway_failures import (  # noqa: F401  (make_gateway, open_peer: fixtures)
    G711,
    Caller,
    make_gateway,
    open_peer,
    published_events,
    wait_until,
)


def plan_text(silence: int, tag: str) -> str:
    return (f"profiles:\n  queue: {{silence_ms: {silence}, tags: [{tag}]}}\n"
            "rules:\n  - name: queue\n    match: {to_user: '^1000$'}\n    profile: queue\n  - name: rest\n")


BROKEN = "profiles:\n  queue: {silence_ms: 700}\nrules:\n  - name: queue\n    profile: qeueu\n"


def replace(path, text: str) -> None:
    """As editors and config management do: write a temporary file, rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- DialplanSource ---------------------------------------------------------------------------

def test_poll_reloads_only_a_changed_file(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))
    source = DialplanSource.from_file(path)
    first = source.version
    assert source.poll() is None  # unchanged
    replace(path, plan_text(300, "b"))
    result = source.poll()
    assert result is not None and result.ok and result.changed and result.version != first
    assert source.plan.rules[0].route.silence_ms == 300
    assert source.poll() is None and source.reloads == 1


def test_a_bad_file_is_refused_and_the_old_plan_stays(tmp_path, caplog):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))
    source = DialplanSource.from_file(path)
    plan, version = source.plan, source.version
    path.write_text(BROKEN)  # in place
    with caplog.at_level(logging.ERROR, "gateway.dialplan_watch"):
        result = source.poll()
    assert result is not None and not result.ok and result.version == version
    assert result.error == f"{path}:5: unknown profile 'qeueu' (profiles: queue)"
    assert source.plan is plan and source.refused == 1
    assert f"version {version} stays in force: {path}:5: unknown profile 'qeueu'" in caplog.text
    assert source.poll() is None  # the same bad file is not tried again every poll
    replace(path, plan_text(500, "c"))  # fixed: taken
    fixed = source.poll()
    assert fixed is not None and fixed.ok and source.plan.rules[0].route.silence_ms == 500


def test_a_file_the_gateway_refuses_stays_out(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))

    def validate(plan: Dialplan) -> None:
        plan.check_models({"tiny.en"})

    source = DialplanSource.from_file(path, validate)
    path.write_text("profiles:\n  p: {model: large-v3}\nrules:\n  - profile: p\n")
    result = source.reload("SIGHUP")
    assert not result.ok and result.error.startswith(f"{path}:2: model 'large-v3' is not served")
    assert source.plan.rules[0].name == "queue"


def test_the_first_load_raises(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(BROKEN)
    with pytest.raises(DialplanError, match="line 5: unknown profile"):
        DialplanSource.from_file(path)


def test_a_file_gone_for_a_moment_keeps_the_plan(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))
    source = DialplanSource.from_file(path)
    path.unlink()
    assert source.poll() is None and source.plan.rules[0].route.silence_ms == 700
    path.write_text(plan_text(900, "z"))
    result = source.poll()
    assert result is not None and result.ok and source.plan.rules[0].route.silence_ms == 900


# -- through a started gateway ----------------------------------------------------------------

async def call_in(gateway, peer, to_user: str = "1000") -> Caller:
    caller = Caller(peer, to_user=to_user)
    assert (await caller.invite(G711)).status == 200
    await wait_until(lambda: caller.to_tag in gateway.calls, "the call")
    return caller


def metric(gateway, name: str) -> str:
    return "\n".join(line for line in gateway.metrics.render().decode().splitlines() if line.startswith(name))


async def test_sighup_reloads_under_an_active_call_and_refuses_a_broken_file(make_gateway, open_peer, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))
    gateway = await make_gateway(dialplan=load_dialplan(path), dialplan_poll_s=0)  # SIGHUP only
    gateway.reload_on_sighup()
    peer = await open_peer(gateway)
    v1 = gateway.dialplan.version
    assert f'earshot_dialplan_version{{version="{v1}"}} 1.0' in metric(gateway, "earshot_dialplan_version")

    before = await call_in(gateway, peer)
    replace(path, plan_text(300, "b"))
    await asyncio.sleep(0.3)
    assert gateway.dialplan.version == v1  # no polling: nothing happens until the signal
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: gateway.dialplan.version != v1, "the reload on SIGHUP")
    v2 = gateway.dialplan.version
    after = await call_in(gateway, peer)

    assert before.to_tag in gateway.calls  # the active call was not touched
    assert leg_config(gateway, before)[0].silence_ms == 700
    assert leg_config(gateway, after)[0].silence_ms == 300
    started_before, started_after = await started_of(gateway, before), await started_of(gateway, after)
    assert (started_before["dialplan_version"], started_before["tags"]) == (v1, ["a"])
    assert (started_after["dialplan_version"], started_after["tags"], started_after["dialplan_profile"]) == \
        (v2, ["b"], "queue")

    path.write_text(BROKEN)
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: gateway.dialplan_source.refused == 1, "the broken file to be refused")
    assert gateway.dialplan.version == v2
    third = await call_in(gateway, peer)
    assert (await started_of(gateway, third))["dialplan_version"] == v2
    assert leg_config(gateway, third)[0].silence_ms == 300
    assert 'earshot_dialplan_reloads_total{result="refused"} 1.0' in metric(gateway, "earshot_dialplan_reloads")
    assert 'earshot_dialplan_reloads_total{result="ok"} 1.0' in metric(gateway, "earshot_dialplan_reloads")
    assert f'version="{v2}"' in metric(gateway, "earshot_dialplan_version")
    assert f'version="{v1}"' not in metric(gateway, "earshot_dialplan_version")

    for caller in (before, after, third):
        assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the calls to end")


async def test_a_changed_file_is_reloaded_without_a_signal(make_gateway, open_peer, tmp_path, caplog):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_text(700, "a"))
    gateway = await make_gateway(dialplan=load_dialplan(path), dialplan_poll_s=0.05)
    peer = await open_peer(gateway)
    v1 = gateway.dialplan.version
    before = await call_in(gateway, peer)

    with caplog.at_level(logging.INFO, "gateway.dialplan_watch"):
        path.write_text(BROKEN)  # in place: the same inode, a new size and mtime
        await wait_until(lambda: gateway.dialplan_source.refused == 1, "the broken file to be refused")
        assert gateway.dialplan.version == v1
        refused_call = await call_in(gateway, peer)
        assert leg_config(gateway, refused_call)[0].silence_ms == 700

        replace(path, plan_text(400, "b"))  # renamed over: a new inode
        await wait_until(lambda: gateway.dialplan.version != v1, "the reload on file change")
    assert f"version {gateway.dialplan.version} in force (was {v1})" in caplog.text
    after = await call_in(gateway, peer)
    assert leg_config(gateway, before)[0].silence_ms == 700
    assert leg_config(gateway, after)[0].silence_ms == 400
    assert (await started_of(gateway, after))["tags"] == ["b"]
    for caller in (before, refused_call, after):
        assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the calls to end")
