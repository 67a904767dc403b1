"""Trunks (gateway/trunks.py): the `trunks` setting, its errors with file and line, address matching."""

from __future__ import annotations

import ipaddress
import json

import pytest

from gateway.config import ConfigError, describe, load_settings
from gateway.trunks import LOOPBACK, Trunk, TrunkAuth, TrunkTable

CONFIG = """\
sip_port: 5070
trunks:
  - name: carrier
    networks: [10.0.0.0/8]
    max_calls: 40
  - name: pbx
    networks: 10.1.2.3/32
    auth:
      username: pbx
      password: s3cret
      algorithms: [md5, SHA-256]
      challenge: 407
    srtp: "off"
    transport: ANY
"""


def test_trunks_from_the_configuration_file(tmp_path) -> None:
    path = tmp_path / "earshot.yaml"
    path.write_text(CONFIG)
    settings = load_settings(path, environ={})
    carrier, pbx = settings.trunks
    assert carrier == Trunk("carrier", (ipaddress.ip_network("10.0.0.0/8"),), max_calls=40)
    assert pbx.auth == TrunkAuth("pbx", "s3cret", ("SHA-256", "MD5"), "", 407)  # SHA-256 first, whatever the order
    assert (pbx.srtp, pbx.transport) == ("off", "any")
    assert "s3cret" not in repr(settings)
    shown = json.dumps(describe(settings))
    assert "s3cret" not in shown and '"10.1.2.3/32"' in shown


def test_trunks_from_the_environment() -> None:
    settings = load_settings(environ={"EARSHOT_TRUNKS": '[{"name": "a", "networks": ["192.0.2.0/24"]}]'})
    assert [t.name for t in settings.trunks] == ["a"]


@pytest.mark.parametrize(("text", "message"), [
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/33]\n", "line 3: trunks: a: '10.0.0.0/33' is not an IP network"),
    ("trunks:\n  - name: a\n", "line 2: trunks: trunk 1 needs 'networks'"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    maxcalls: 3\n", "line 4: trunks: unknown key 'maxcalls'"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    max_calls: -1\n", "line 4: trunks: a: max_calls must be"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    auth: {username: u}\n", "line 4: trunks: a: auth needs 'password'"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    auth: {username: u, password: p, algorithms: [SHA1]}\n",
     "line 4: trunks: a: auth algorithms must be SHA-256 and/or MD5"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    auth: {username: u, password: p, challenge: 403}\n",
     "line 4: trunks: a: auth challenge must be 401 or 407"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n  - name: a\n    networks: [10.0.0.0/8]\n",
     "line 4: trunks: trunk name 'a' used twice"),
    ("trunks:\n  - name: a\n    networks: [10.0.0.0/8]\n    srtp: always\n", "line 4: trunks: a: srtp must be one of"),
    ("trunks: 10.0.0.0/8\n", "line 1: trunks: must be a list of trunks"),
], ids=["cidr", "no-networks", "unknown-key", "max-calls", "no-password", "algorithm", "challenge", "twice",
        "srtp", "not-a-list"])
def test_mistakes_name_the_file_and_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "earshot.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert f"{path} {message}" in str(info.value)


def test_most_specific_network_wins() -> None:
    wide = Trunk("carrier", (ipaddress.ip_network("10.0.0.0/8"),))
    narrow = Trunk("pbx", (ipaddress.ip_network("10.1.2.3/32"), ipaddress.ip_network("2001:db8::/64")))
    table = TrunkTable((wide, narrow))
    assert table.match("10.1.2.3") is narrow
    assert table.match("10.1.2.4") is wide
    assert table.match("2001:db8::7") is narrow
    assert table.match("::ffff:10.9.9.9") is wide  # v4-mapped from a dual-stack socket
    assert table.match("192.0.2.1") is None
    assert table.match("127.0.0.1") is None  # configured trunks replace the implicit loopback one
    assert table.match("not-an-address") is None


def test_no_trunks_configured_trusts_only_loopback() -> None:
    table = TrunkTable(load_settings(environ={}).trunks)
    assert table.implicit
    assert table.match("127.0.0.1") is LOOPBACK and table.match("127.9.9.9") is LOOPBACK
    assert table.match("::1") is LOOPBACK
    assert table.match("192.168.1.10") is None
