import pytest

from gateway.dialplan import DialplanError, load_dialplan


def route(plan, to_user="1000", from_user="alice", source="127.0.0.1", trunk="loopback"):
    return plan.route(to_uri=f"sip:{to_user}@pbx", from_uri=f"sip:{from_user}@pbx", to_user=to_user,
                      from_user=from_user, source=source, trunk=trunk)


def test_bundled_dialplan_routes():
    plan = load_dialplan("dialplans/default.yaml")
    assert route(plan, from_user="anonymous").rule == "reject-anonymous"
    assert route(plan, from_user="anonymous").action == "reject"
    assert route(plan, to_user="support").tags == ("support",)
    assert route(plan, to_user="2000").rule == "default"


def test_bundled_dialplan_accepts_only_calls_from_a_trunk():
    plan = load_dialplan("dialplans/default.yaml")
    assert route(plan, trunk="pbx-east").rule == "support"
    no_trunk = route(plan, trunk="")
    assert (no_trunk.action, no_trunk.status) == ("reject", 404)


def test_trunk_rules_match_the_trunk_name(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(
        "rules:\n"
        "  - name: carrier\n    match: {trunk: '^carrier$'}\n    tags: [carrier]\n"
        "  - name: refuse\n    match: {trunk: '^lab'}\n    action: reject\n    status: 403\n"
    )
    plan = load_dialplan(path)
    assert route(plan, trunk="carrier").tags == ("carrier",)
    assert route(plan, trunk="carrier2").status == 404
    assert route(plan, trunk="lab-1").rule == "refuse"


def test_first_match_wins_and_source_networks(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(
        "rules:\n"
        "  - name: trunk\n    match: {source: [10.0.0.0/8], to_user: '^9'}\n    tags: [trunk]\n    language: de\n"
        "  - name: rest\n    action: reject\n    status: 404\n    reason: Unknown number\n"
    )
    plan = load_dialplan(path)
    hit = route(plan, to_user="9123", source="10.1.2.3")
    assert (hit.rule, hit.language, hit.tags) == ("trunk", "de", ("trunk",))
    miss = route(plan, to_user="9123", source="192.0.2.1")
    assert (miss.rule, miss.action, miss.status, miss.reason) == ("rest", "reject", 404, "Unknown number")


def test_no_match_rejects_with_404(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - match: {to_user: '^1$'}\n")
    assert route(load_dialplan(path), to_user="2").status == 404


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - match: {to_user: '('}\n", r"line 2: to_user: invalid regular expression"),
    ("rules:\n  - name: x\n    actoin: reject\n", r"line 3: unknown rule key 'actoin'"),
    ("rules:\n  - match: {source: not-a-net}\n", r"line 2: source: 'not-a-net' is not an IP network"),
    ("rules:\n  - action: drop\n", r"line 2: action must be 'transcribe' or 'reject'"),
    ("rules:\n  - action: reject\n    status: 200\n", r"line 3: status must be a SIP final error code"),
    ("rules: []\n", r"line 1: 'rules' must be a non-empty list"),
    ("version: 1\n", r"missing 'rules'"),
])
def test_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(DialplanError, match=message):
        load_dialplan(path)
