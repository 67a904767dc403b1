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


# -- match keys: request-URI user, SIPREC, headers ---------------------------------------------

from gateway.dialplan import Dialplan, Route, header_values  # noqa: E402
from gateway.sip.message import Headers  # noqa: E402


def plan_of(tmp_path, text: str) -> Dialplan:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return load_dialplan(path)


def call(plan, *, ruri_user="", to_user="1000", from_user="alice", siprec=False, headers=None, trunk="loopback",
         source="127.0.0.1") -> Route:
    return plan.route(to_uri=f"sip:{to_user}@pbx", from_uri=f"sip:{from_user}@pbx", to_user=to_user,
                      from_user=from_user, source=source, trunk=trunk, ruri_user=ruri_user, siprec=siprec,
                      headers=headers)


def test_ruri_user_matches_the_request_uri_not_the_to_header(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: did\n    match: {ruri_user: '^4930123$'}\n  - name: rest\n")
    # a PBX that keeps the dialled name in To but delivers the DID in the request-URI
    assert call(plan, ruri_user="4930123", to_user="sales").rule == "did"
    assert call(plan, ruri_user="", to_user="4930123").rule == "rest"  # to_user is the To header's


def test_old_callers_of_route_still_work(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: u\n    match: {to_user: '^1000$', from_user: '^alice$'}\n")
    assert route(plan).rule == "u"  # route() without ruri_user, siprec or headers


@pytest.mark.parametrize("siprec, expected", [(True, "fork"), (False, "plain")])
def test_siprec_true_and_false_select_by_kind(tmp_path, siprec, expected):
    plan = plan_of(tmp_path, "rules:\n  - name: fork\n    match: {siprec: true}\n"
                             "  - name: plain\n    match: {siprec: false}\n")
    assert call(plan, siprec=siprec).rule == expected


def test_without_a_siprec_key_both_kinds_match(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: any\n")
    assert call(plan, siprec=True).rule == call(plan, siprec=False).rule == "any"


def test_headers_match_by_case_insensitive_name_and_regex(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: campaign\n    match:\n      headers:\n"
                             "        x-campaign: '^spring-'\n        User-Agent: 'Avaya'\n  - name: rest\n")
    headers = Headers([("X-Campaign", "spring-2027"), ("user-agent", "Avaya SBCE 8.1")])
    assert call(plan, headers=headers).rule == "campaign"
    assert call(plan, headers=Headers([("X-Campaign", "autumn"), ("User-Agent", "Avaya")])).rule == "rest"
    assert call(plan, headers=Headers([("User-Agent", "Avaya")])).rule == "rest"  # header absent
    assert call(plan).rule == "rest"  # no headers at all
    assert call(plan, headers={"X-CAMPAIGN": "spring-1", "USER-AGENT": ["Avaya"]}).rule == "campaign"


def test_a_header_given_twice_matches_if_either_line_does(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: diverted\n    match:\n      headers: {Diversion: '<sip:8000@'}\n"
                             "  - name: rest\n")
    headers = Headers([("Diversion", "<sip:7000@pbx>;reason=busy"), ("Diversion", "<sip:8000@pbx>;reason=no-answer")])
    assert call(plan, headers=headers).rule == "diverted"
    assert header_values(headers, "diversion") == ["<sip:7000@pbx>;reason=busy", "<sip:8000@pbx>;reason=no-answer"]


def test_compact_header_forms_are_found_by_the_long_name(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: f\n    match:\n      headers: {From: 'alice'}\n  - name: rest\n")
    assert call(plan, headers=Headers([("f", "<sip:alice@pbx>;tag=1")])).rule == "f"


def test_a_header_regex_for_absence(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: no-ua\n    match:\n      headers: {User-Agent: '^$'}\n"
                             "  - name: rest\n")
    assert call(plan, headers=Headers([])).rule == "no-ua"
    assert call(plan, headers=Headers([("User-Agent", "x")])).rule == "rest"


def test_every_condition_of_a_rule_must_hold(tmp_path):
    plan = plan_of(tmp_path, "rules:\n  - name: all\n    match:\n      trunk: '^carrier$'\n      ruri_user: '^49'\n"
                             "      from_user: '^\\+1'\n      siprec: false\n      source: 10.0.0.0/8\n"
                             "      headers: {X-Queue: sales}\n  - name: rest\n")
    ok = dict(trunk="carrier", ruri_user="4930", from_user="+1555", source="10.1.1.1",
              headers=Headers([("X-Queue", "sales")]))
    assert call(plan, **ok).rule == "all"
    for key, value in [("trunk", "lab"), ("ruri_user", "3330"), ("from_user", "555"), ("source", "192.0.2.1"),
                       ("headers", Headers([])), ("siprec", True)]:
        assert call(plan, **{**ok, key: value}).rule == "rest", key


# -- profiles ---------------------------------------------------------------------------------

PROFILES = """\
version: 1
profiles:
  sales:
    language: de
    model: tiny.en
    silence_ms: 700
    partials: off
    partial_interval_ms: 500
    record: on
    redact: pci
    tags: [sales]
    max_calls: 2
  detect:
    language: auto
rules:
  - name: sales-did
    match: {ruri_user: '^4930'}
    profile: sales
  - name: sales-fast
    match: {ruri_user: '^4931'}
    profile: sales
    silence_ms: 300
    partials: on
    tags: [sales, fast]
    redact: off
  - name: world
    match: {ruri_user: '^00'}
    profile: detect
  - name: plain
    language: fr
"""


def test_a_rule_takes_its_profiles_settings(tmp_path):
    plan = plan_of(tmp_path, PROFILES)
    r = call(plan, ruri_user="4930111")
    assert (r.rule, r.profile, r.language, r.model, r.silence_ms, r.partials, r.partial_interval_ms, r.record,
            r.redact, r.tags, r.max_calls) == ("sales-did", "sales", "de", "tiny.en", 700, False, 500, True, "pci",
                                               ("sales",), 2)
    assert r.limit_key == "profile:sales"
    assert r.started_fields == {"dialplan_rule": "sales-did", "dialplan_version": plan.version,
                                "dialplan_profile": "sales"}


def test_inline_fields_override_the_profile(tmp_path):
    r = call(plan_of(tmp_path, PROFILES), ruri_user="4931")
    assert (r.profile, r.silence_ms, r.partials, r.tags, r.redact, r.language, r.max_calls) == \
        ("sales", 300, True, ("sales", "fast"), "off", "de", 2)


def test_language_auto_and_rules_without_a_profile(tmp_path):
    plan = plan_of(tmp_path, PROFILES)
    assert call(plan, ruri_user="0044").language == "auto"
    plain = call(plan, ruri_user="5")
    assert (plain.rule, plain.profile, plain.language, plain.silence_ms, plain.partials, plain.record) == \
        ("plain", None, "fr", None, None, None)
    assert plain.limit_key == "rule:plain"
    assert plain.started_fields == {"dialplan_rule": "plain", "dialplan_version": plan.version}  # no profile


def test_language_no_is_norwegian_not_false(tmp_path):
    assert call(plan_of(tmp_path, "rules:\n  - language: no\n")).language == "no"


def test_plan_summary_version_and_models(tmp_path):
    plan = plan_of(tmp_path, PROFILES)
    assert plan.summary().startswith("4 rules (sales-did, sales-fast, world, plain), 2 profiles (sales, detect)")
    assert len(plan.version) == 12
    assert [m for m, _line in plan.model_lines] == ["tiny.en"]
    plan.check_models({"tiny.en"})
    with pytest.raises(DialplanError, match=r"line 5: model 'tiny.en' is not served by this gateway \(it serves base\)"):
        plan.check_models({"base"})
    (tmp_path / "plan.yaml").write_text(PROFILES.replace("fr", "it"))
    assert load_dialplan(tmp_path / "plan.yaml").version != plan.version


@pytest.mark.parametrize("text, message", [
    # top level
    ("rulez: []\n", r"line 1: unknown key 'rulez'"),
    ("version: 2\nrules:\n  - name: a\n", r"line 1: version must be 1"),
    ("profiles: []\nrules:\n  - name: a\n", r"line 1: 'profiles' must be a mapping"),
    ("rules:\n  - name: a\n  - name: a\n", r"line 3: rule name 'a' is used twice"),
    ("rules:\n  - name: a\n    name: b\n", r"line 3: 'name' is given twice"),
    # match keys
    ("rules:\n  - match: {ruri_user: '[0-9'}\n", r"line 2: ruri_user: invalid regular expression"),
    ("rules:\n  - match: {from_user: '(?P<'}\n", r"line 2: from_user: invalid regular expression"),
    ("rules:\n  - match: {trunk: '*'}\n", r"line 2: trunk: invalid regular expression"),
    ("rules:\n  - match: {did: '^1'}\n", r"line 2: unknown match key 'did'"),
    ("rules:\n  - match: {siprec: maybe}\n", r"line 2: siprec must be true or false, not 'maybe'"),
    ("rules:\n  - match:\n      headers: [X-A]\n", r"line 3: headers must be a mapping"),
    ("rules:\n  - match:\n      headers: {}\n", r"line 3: headers must map header names"),
    ("rules:\n  - match:\n      headers: {'X A': b}\n", r"line 3: headers: 'X A' is not a SIP header name"),
    ("rules:\n  - match:\n      headers:\n        X-A: '('\n", r"line 4: headers: X-A: invalid regular expression"),
    ("rules:\n  - match:\n      headers:\n        X-A: [a, b]\n", r"line 4: headers: X-A must be a regular"),
    # profiles
    ("profiles:\n  p:\n    langauge: de\nrules:\n  - profile: p\n", r"line 3: unknown profile key 'langauge'"),
    ("profiles:\n  p bad: {}\nrules:\n  - name: a\n", r"line 2: profile name 'p bad' must be"),
    ("profiles:\n  p: [de]\nrules:\n  - profile: p\n", r"line 2: profile 'p' must be a mapping"),
    ("rules:\n  - name: a\n    profile: sales\n", r"line 3: unknown profile 'sales' \(profiles: none defined\)"),
    ("profiles:\n  p: {}\nrules:\n  - profile: q\n", r"line 4: unknown profile 'q' \(profiles: p\)"),
    ("profiles:\n  p: {}\nrules:\n  - action: reject\n    profile: p\n", r"line 5: a rule that rejects has no profile"),
    ("profiles:\n  p: {language: english}\nrules:\n  - profile: p\n", r"line 2: language must be a language code"),
    ("profiles:\n  p: {model: ''}\nrules:\n  - profile: p\n", r"line 2: model must be the name of an ASR model"),
    ("profiles:\n  p: {silence_ms: 10}\nrules:\n  - profile: p\n", r"line 2: silence_ms must be a whole number from 64"),
    ("profiles:\n  p: {silence_ms: 0.5}\nrules:\n  - profile: p\n", r"line 2: silence_ms must be a whole number"),
    ("profiles:\n  p: {partials: sometimes}\nrules:\n  - profile: p\n", r"line 2: partials must be on or off"),
    ("profiles:\n  p: {partial_interval_ms: 50}\nrules:\n  - profile: p\n",
     r"line 2: partial_interval_ms must be a whole number from 100 to 60000"),
    ("profiles:\n  p: {record: 1}\nrules:\n  - profile: p\n", r"line 2: record must be on or off"),
    ("profiles:\n  p: {redact: all}\nrules:\n  - profile: p\n", r"line 2: redact must be 'pci' or 'off'"),
    ("profiles:\n  p: {tags: sales}\nrules:\n  - profile: p\n", r"line 2: tags must be a list of words"),
    ("profiles:\n  p: {max_calls: 0}\nrules:\n  - profile: p\n", r"line 2: max_calls must be a whole number from 1"),
    ("profiles:\n  p: {max_calls: yes}\nrules:\n  - profile: p\n", r"line 2: max_calls must be a whole number"),
    # inline on a rule, the same checks
    ("rules:\n  - name: a\n    silence_ms: 20000\n", r"line 3: silence_ms must be a whole number"),
    ("rules:\n  - name: a\n    partials: maybe\n", r"line 3: partials must be on or off"),
    ("rules:\n  - name: a\n    leg: 'two words'\n", r"line 3: leg 'two words' must be"),
    ("rules:\n  - name: a\n    reason: \"a\\nb\"\n", r"line 3: reason must be one line"),
    ("rules:\n  - name: a\n    status: true\n", r"line 3: status must be a SIP final error code"),
])
def test_every_mistake_names_its_line(tmp_path, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(DialplanError, match=message):
        load_dialplan(path)


def test_the_error_also_reads_file_colon_line(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - name: a\n    profile: nope\n")
    with pytest.raises(DialplanError) as info:
        load_dialplan(path)
    assert info.value.located == f"{path}:3: unknown profile 'nope' (profiles: none defined)"
    assert (info.value.path, info.value.line) == (str(path), 3)
    path.write_text("rules:\n  - name: x\n   bad: [\n")  # YAML errors come from compose_file
    with pytest.raises(DialplanError) as info:
        load_dialplan(path)
    assert info.value.located.startswith(f"{path}:3: not valid YAML")


# -- earshot dialplan check ---------------------------------------------------------------------

from gateway.cli import main  # noqa: E402


def test_check_prints_ok_and_a_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    path = tmp_path / "plan.yaml"
    path.write_text(PROFILES)
    assert main(["dialplan", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {path}: 4 rules (sales-did, sales-fast, world, plain), 2 profiles (sales, detect)")


def test_check_prints_file_line_message_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - name: a\n    match: {to_user: '('}\n")
    assert main(["dialplan", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{path}:3: to_user: invalid regular expression")
    assert captured.out == ""


def test_check_with_a_config_checks_the_models_served(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    path = tmp_path / "plan.yaml"
    path.write_text(PROFILES)
    config = tmp_path / "earshot.yaml"
    config.write_text("asr_model: base\n")
    assert main(["dialplan", "check", str(path), "-c", str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:5: model 'tiny.en' is not served by this gateway")
    config.write_text("asr_model: tiny.en\n")
    assert main(["dialplan", "check", str(path), "-c", str(config)]) == 0


def test_check_refuses_a_silence_the_turn_settings_cannot_take(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - name: a\n  - name: quick\n    silence_ms: 100\n")
    # the default pad_after_ms (100) cannot fit in a 100 ms silence: refused with or without a configuration
    assert main(["dialplan", "check", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}:3: rule 'quick': need pad_after_ms <= speculative_ms")
    config = tmp_path / "earshot.yaml"
    config.write_text("pad_after_ms: 50\nspeculative_ms: 60\n")
    assert main(["dialplan", "check", str(path), "-c", str(config)]) == 0


def test_bundled_and_example_dialplans_check(capsys, monkeypatch):
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    for name in ("dialplans/default.yaml", "dialplans/contact-center.yaml"):
        assert main(["dialplan", "check", name]) == 0, capsys.readouterr().err
