"""Dialplan rules and profiles through a started Gateway: real UDP INVITEs, the events it publishes.

``route()`` alone once passed while real calls never matched a user rule (the users reached
the router empty), so each match key and each profile field is checked here on the path a
call takes: SIP in, the rule and profile in ``call.started``, the profile's turn settings on
the call's leg.
"""

from __future__ import annotations

from pathlib import Path

from gateway.app import call_partials, call_turn_config
from gateway.config import load_settings
from gateway.dialplan import Route, load_dialplan
from tests.pg_server import engine, pg_store_url, session, store_url  # noqa: F401  (fixtures)
from tests.unit.test_gateway_failures import (  # noqa: F401  (make_gateway, open_peer: fixtures)
    G711,
    Caller,
    assert_left_no_trace,
    assert_rejected,
    make_gateway,
    open_peer,
    published_events,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
CONTACT_CENTER = ROOT / "dialplans/contact-center.yaml"


class HeaderCaller(Caller):
    """A Caller whose requests carry extra header lines."""

    def __init__(self, *args: object, extra: list[str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.extra = extra

    def request(self, method: str, **kwargs: object) -> bytes:  # type: ignore[override]
        data = super().request(method, **kwargs)  # type: ignore[arg-type]
        head, _, rest = data.partition(b"User-Agent: earshot-failure-tests\r\n")
        return head + b"User-Agent: earshot-failure-tests\r\n" + "".join(f"{h}\r\n" for h in self.extra).encode() \
            + rest


def leg_config(gateway, caller):  # the call's one leg pipeline: its turn settings and partials switch
    call = gateway.calls[caller.to_tag]
    (pipeline,) = call.session.legs.values()
    return pipeline._config, pipeline._partials


async def started_of(gateway, caller) -> dict:
    events = [e for e in await published_events(gateway) if e["type"] == "call.started"
              and e["sip_call_id"] == caller.call_id]
    assert len(events) == 1, events
    return events[0]


async def test_reject_anonymous_and_a_did_selects_its_profile(make_gateway, open_peer):
    gateway = await make_gateway(dialplan=load_dialplan(CONTACT_CENTER))
    peer = await open_peer(gateway)

    anonymous = Caller(peer, from_user="anonymous")
    assert_rejected(await anonymous.invite(G711), anonymous, 403, "Anonymous calls are not transcribed")
    assert_left_no_trace(gateway)

    # the DID is in the request-URI; the To header names the queue the PBX dialled
    international = Caller(peer, to_user="queue")
    international.remote_target = f"sip:0044207946@127.0.0.1:{peer.gateway_port}"
    assert (await international.invite(G711)).status == 200
    await wait_until(lambda: international.to_tag in gateway.calls, "the international call")
    config, partials = leg_config(gateway, international)
    assert (config.silence_ms, partials) == (700, False)  # the international profile's
    started = await started_of(gateway, international)
    assert (started["dialplan_rule"], started["dialplan_profile"], started["language"], started["tags"]) == \
        ("international", "international", None, ["international"])  # language auto: detection
    assert started["dialplan_version"] == gateway.dialplan.version

    service = Caller(peer, to_user="0044207946")  # the same number in To only: not the DID rule
    service.remote_target = f"sip:queue@127.0.0.1:{peer.gateway_port}"
    assert (await service.invite(G711)).status == 200
    await wait_until(lambda: service.to_tag in gateway.calls, "the service call")
    started = await started_of(gateway, service)
    assert (started["dialplan_rule"], started["dialplan_profile"], started["language"]) == \
        ("service", "service-en", "en")
    config, partials = leg_config(gateway, service)
    assert (config.silence_ms, config.partial_interval_ms, partials) == (600, 1000, True)
    for caller in (international, service):
        assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the calls to end")


async def test_header_and_siprec_rules_through_the_gateway(make_gateway, open_peer):
    gateway = await make_gateway(dialplan=load_dialplan(CONTACT_CENTER))
    peer = await open_peer(gateway)
    vip = HeaderCaller(peer, extra=["x-queue: vip"])  # header names are case-insensitive
    assert (await vip.invite(G711)).status == 200
    await wait_until(lambda: vip.to_tag in gateway.calls, "the vip call")
    started = await started_of(gateway, vip)
    assert (started["dialplan_rule"], started["dialplan_profile"], started["tags"]) == \
        ("vip-queue", "service-en", ["service", "vip"])
    assert leg_config(gateway, vip)[0].silence_ms == 800  # the rule's inline override
    assert (await vip.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the vip call to end")


async def test_a_profiles_max_calls_answers_503_beyond(make_gateway, open_peer, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("profiles:\n  small: {max_calls: 1, tags: [small]}\nrules:\n"
                    "  - name: one\n    match: {to_user: '^1$'}\n    profile: small\n  - name: rest\n")
    gateway = await make_gateway(dialplan=load_dialplan(path))
    peer = await open_peer(gateway)
    first = Caller(peer, to_user="1")
    assert (await first.invite(G711)).status == 200
    await wait_until(lambda: first.to_tag in gateway.calls, "the first call")
    second = Caller(peer, to_user="1")
    response = await second.invite(G711)
    assert_rejected(response, second, 503, "Service Unavailable - Profile Call Limit Reached")
    assert response.headers.get("retry-after")
    other = Caller(peer, to_user="2")  # another rule: not counted against the profile
    assert (await other.invite(G711)).status == 200
    assert (await first.bye()).status == 200
    await wait_until(lambda: first.to_tag not in gateway.calls, "the first call to end")
    third = Caller(peer, to_user="1")  # the slot is free again
    assert (await third.invite(G711)).status == 200
    for caller in (other, third):
        assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the calls to end")
    assert gateway._limit_calls == {"profile:small": set()}


def test_profile_turn_settings_over_the_gateways():
    settings = load_settings(environ={})
    base = call_turn_config(settings, Route(rule="r"))
    assert (base.silence_ms, base.partial_interval_ms) == (settings.silence_ms, settings.partial_interval_ms)
    quick = call_turn_config(settings, Route(rule="r", silence_ms=300, partial_interval_ms=400))
    assert (quick.silence_ms, quick.partial_interval_ms, quick.pad_after_ms) == (300, 400, settings.pad_after_ms)
    off = call_turn_config(settings, Route(rule="r", partials=False))
    assert off.partial_interval_ms == 0 and not call_partials(settings, Route(rule="r", partials=False))
    quiet = load_settings(environ={"EARSHOT_ASR_PARTIALS": "false"})
    assert call_turn_config(quiet, Route(rule="r")).partial_interval_ms == 0
    on = call_turn_config(quiet, Route(rule="r", partials=True))  # a profile may switch partials on
    assert on.partial_interval_ms == quiet.partial_interval_ms and call_partials(quiet, Route(rule="r", partials=True))
    http = load_settings(environ={"EARSHOT_ASR_BACKEND": "openai", "EARSHOT_ASR_OPENAI_URL": "http://127.0.0.1:9/v1"})  # one HTTP request each: never by profile
    assert not call_partials(http, Route(rule="r", partials=True))
    short = load_settings(environ={"EARSHOT_SPECULATIVE_MS": "400", "EARSHOT_SILENCE_MS": "800"})
    pulled = call_turn_config(short, Route(rule="r", silence_ms=200))  # speculative final pulled in under it
    assert (pulled.silence_ms, pulled.speculative_ms) == (200, 168)


def test_the_store_keeps_the_rule_and_profile_of_call_started(session):  # noqa: F811  (the pg session fixture)
    import uuid

    from gateway.events import CALL_STARTED, CallInfo, EventFactory, Source
    from gateway.persister import parse_entry, store_events
    from gateway.store.models import Call

    info = CallInfo(str(uuid.uuid4()), "sip-1", "sip:alice@pbx", "sip:4930@earshot", 1_800_000_000.0, ("sales",),
                    Source("sip", (("call_id", "sip-1"), ("transport", "udp"))))
    started = EventFactory(info).make(CALL_STARTED, {"codec": "PCMU", "dialplan_rule": "sales-did",
                                                     "dialplan_profile": "sales", "dialplan_version": "0123456789ab",
                                                     "language": "de", "legs": ["caller"]})
    store_events(session, [parse_entry("1-0", started.to_fields())])
    session.commit()
    call = session.get(Call, info.call_id)
    assert (call.dialplan_rule, call.dialplan_profile) == ("sales-did", "sales")


async def test_a_siprec_rule_tells_recording_forks_from_calls(make_gateway, open_peer, tmp_path):
    from tests.unit.test_siprec_gateway import AGENT, CUSTOMER, RecordingClient, metadata, multipart, recording_sdp

    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - name: no-forks\n    match: {siprec: true}\n    action: reject\n    status: 488\n"
                    "    reason: Not Acceptable Here - no recordings here\n"
                    "  - name: calls\n    match: {siprec: false}\n")
    gateway = await make_gateway(dialplan=load_dialplan(path))
    peer = await open_peer(gateway)
    src = RecordingClient(peer)  # Require: siprec, a +sip.src Contact, SDP and metadata
    body = multipart(recording_sdp([("1", 4000), ("2", 4002)]), metadata([CUSTOMER, AGENT]))
    assert_rejected(await src.invite(body), src, 488, "Not Acceptable Here - no recordings here")
    assert_left_no_trace(gateway)
    plain = Caller(peer)
    assert (await plain.invite(G711)).status == 200
    await wait_until(lambda: plain.to_tag in gateway.calls, "the plain call")
    assert (await started_of(gateway, plain))["dialplan_rule"] == "calls"
    assert (await plain.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the plain call to end")
