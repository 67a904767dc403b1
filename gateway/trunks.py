"""Trunks: the SIP peers Earshot takes calls from, by source network.

Earshot's SIP port faces SBCs and PBXs, never the open internet, so a request is
only worth any state when its source address belongs to a configured trunk. The
``trunks:`` setting lists them::

    trunks:
      - name: pbx
        networks: [10.1.2.0/24, "2001:db8::/64"]
        max_calls: 50              # 0: only the global max_calls
        auth: {username: pbx, password: s3cret, algorithms: [SHA-256, MD5], challenge: 401}
        transport: any             # any | tls
        srtp: optional             # off | optional | required
        tls_client_cert: false

With no ``trunks`` configured, loopback (127.0.0.0/8, ::1) is the one trusted
trunk, named ``loopback``, so the embedded default (PBX and Earshot on one host)
keeps working; anything else must be configured on purpose.

Parsing keeps the YAML node so every mistake names the file and line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .yamlfile import scalar

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TRUNKS",
    "LOOPBACK",
    "Network",
    "Trunk",
    "TrunkAuth",
    "TrunkError",
    "TrunkTable",
    "describe_trunk",
    "parse_trunks",
    "trunks_from_node",
    "trunks_from_text",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALGORITHMS = ("SHA-256", "MD5")  # RFC 8760: SHA-256 first, MD5 for PBXs that know nothing else
TRANSPORTS = ("any", "tls")
SRTP_MODES = ("off", "optional", "required")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class TrunkError(ValueError):
    """A ``trunks`` entry is invalid; the message says where (file and line) and what."""


@dataclass(frozen=True)
class TrunkAuth:
    """Digest credentials a trunk must present (RFC 3261 22, RFC 8760)."""

    username: str
    password: str = field(repr=False)  # never in logs or `earshot config`
    algorithms: tuple[str, ...] = ALGORITHMS
    realm: str = ""  # empty: "earshot"
    challenge: int = 401  # or 407 (Proxy-Authenticate), for trunks that expect a proxy


@dataclass(frozen=True)
class Trunk:
    name: str
    networks: tuple[Network, ...]
    auth: TrunkAuth | None = None
    max_calls: int = 0  # 0: only the global max_calls
    transport: str = "any"  # any | tls  (tls: requests over UDP/TCP from this trunk are refused)
    srtp: str = "optional"  # off | optional | required  (required: an RTP/AVP-only offer gets 488)
    tls_client_cert: bool = False  # require a client certificate verified against tls_ca_file


LOOPBACK = Trunk(
    name="loopback",
    networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
)
DEFAULT_TRUNKS: tuple[Trunk, ...] = (LOOPBACK,)


class TrunkTable:
    """Source address -> trunk; the most specific network wins (longest prefix),
    so a /32 for one PBX can carry its own credentials inside a trunk's /24."""

    def __init__(self, trunks: tuple[Trunk, ...] | list[Trunk] = ()) -> None:
        self.trunks: tuple[Trunk, ...] = tuple(trunks) or DEFAULT_TRUNKS
        entries = [(net, trunk) for trunk in self.trunks for net in trunk.networks]
        self._entries = sorted(entries, key=lambda e: -e[0].prefixlen)
        self._by_name = {t.name: t for t in self.trunks}

    def match(self, host: str) -> Trunk | None:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.1.2.3 from a dual-stack socket
        for net, trunk in self._entries:
            if address.version == net.version and address in net:
                return trunk
        return None

    def get(self, name: str) -> Trunk | None:
        return self._by_name.get(name)

    @property
    def implicit(self) -> bool:
        """True when no trunk was configured (loopback only)."""
        return self.trunks is DEFAULT_TRUNKS


# -- parsing ---------------------------------------------------------------------------

_TRUNK_KEYS = ("name", "networks", "auth", "max_calls", "transport", "srtp", "tls_client_cert")
_AUTH_KEYS = ("username", "password", "algorithms", "realm", "challenge")


def _where(path: str, node: yaml.Node) -> str:
    return f"{path} line {node.start_mark.line + 1}"


def _fail(path: str, node: yaml.Node, message: str) -> TrunkError:
    return TrunkError(f"{_where(path, node)}: trunks: {message}")


def _mapping(path: str, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value).strip().replace("-", "_").lower()
        if key not in allowed:
            raise _fail(path, key_node, f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})")
        if key in out:
            raise _fail(path, key_node, f"{key!r} given twice in {what}")
        out[key] = (key_node, value_node)
    return out


def _string(path: str, node: yaml.Node, what: str, *, empty: bool = False) -> str:
    value = scalar(node)
    if isinstance(value, (dict, list)) or value is None or isinstance(value, bool):
        raise _fail(path, node, f"{what} must be a string")
    text = str(value)
    if not empty and not text.strip():
        raise _fail(path, node, f"{what} must not be empty")
    return text


def trunks_from_node(node: yaml.Node, path: str) -> tuple[Trunk, ...]:
    """The ``trunks`` list from its YAML node; errors name ``path`` and the line."""
    if isinstance(node, yaml.ScalarNode) and scalar(node) in (None, ""):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise _fail(path, node, "must be a list of trunks (each a mapping with name and networks)")
    trunks: list[Trunk] = []
    names: set[str] = set()
    for index, item in enumerate(node.value):
        trunk = _trunk(path, index, item)
        if trunk.name in names:
            raise _fail(path, item, f"trunk name {trunk.name!r} used twice")
        names.add(trunk.name)
        trunks.append(trunk)
    return tuple(trunks)


def _trunk(path: str, index: int, node: yaml.Node) -> Trunk:
    what = f"trunk {index + 1}"
    items = _mapping(path, node, what, _TRUNK_KEYS)
    for required in ("name", "networks"):
        if required not in items:
            raise _fail(path, node, f"{what} needs {required!r}")
    name = _string(path, items["name"][1], "name")
    if not _NAME_RE.fullmatch(name):
        raise _fail(path, items["name"][1], f"name {name!r} must be a word (letters, digits, - _ .; up to 64)")
    networks = _networks(path, items["networks"][1], name)
    kwargs: dict[str, Any] = {}
    if "max_calls" in items:
        value = scalar(items["max_calls"][1])
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
            raise _fail(path, items["max_calls"][1], f"{name}: max_calls must be an integer 0 (no own limit) to 100000")
        kwargs["max_calls"] = value
    for key, allowed in (("transport", TRANSPORTS), ("srtp", SRTP_MODES)):
        if key in items:
            value = _string(path, items[key][1], key).strip().lower()
            if value not in allowed:
                raise _fail(path, items[key][1], f"{name}: {key} must be one of {', '.join(allowed)}, got {value!r}")
            kwargs[key] = value
    if "tls_client_cert" in items:
        value = scalar(items["tls_client_cert"][1])
        if not isinstance(value, bool):
            raise _fail(path, items["tls_client_cert"][1], f"{name}: tls_client_cert must be true or false")
        kwargs["tls_client_cert"] = value
    if "auth" in items:
        kwargs["auth"] = _auth(path, items["auth"][1], name)
    return Trunk(name=name, networks=networks, **kwargs)


def _networks(path: str, node: yaml.Node, name: str) -> tuple[Network, ...]:
    values = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not values:
        raise _fail(path, node, f"{name}: networks must list at least one CIDR network")
    out: list[Network] = []
    for value_node in values:
        text = _string(path, value_node, f"{name}: network").strip()
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise _fail(path, value_node, f"{name}: {text!r} is not an IP network (CIDR, e.g. 10.0.0.0/24)") from None
    return tuple(out)


def _auth(path: str, node: yaml.Node, name: str) -> TrunkAuth:
    items = _mapping(path, node, f"{name}: auth", _AUTH_KEYS)
    for required in ("username", "password"):
        if required not in items:
            raise _fail(path, node, f"{name}: auth needs {required!r}")
    username = _string(path, items["username"][1], "auth username")
    password = _string(path, items["password"][1], "auth password")
    if any(c in username for c in '"\\\r\n'):
        raise _fail(path, items["username"][1], f"{name}: auth username must not contain quotes, backslashes or line breaks")
    kwargs: dict[str, Any] = {}
    if "algorithms" in items:
        anode = items["algorithms"][1]
        raw = scalar(anode)
        values = raw if isinstance(raw, list) else [raw]
        algorithms: list[str] = []
        for value in values:
            canonical = {a.lower(): a for a in ALGORITHMS}.get(str(value).strip().lower())
            if canonical is None:
                raise _fail(path, anode, f"{name}: auth algorithms must be SHA-256 and/or MD5, got {value!r}")
            if canonical not in algorithms:
                algorithms.append(canonical)
        if not algorithms:
            raise _fail(path, anode, f"{name}: auth algorithms must not be empty")
        # RFC 8760 section 2.4: the server's preferred (strongest) algorithm first
        kwargs["algorithms"] = tuple(a for a in ALGORITHMS if a in algorithms)
    if "realm" in items:
        realm = _string(path, items["realm"][1], "auth realm", empty=True)
        if any(c in realm for c in '"\\\r\n'):
            raise _fail(path, items["realm"][1], f"{name}: auth realm must not contain quotes, backslashes or line breaks")
        kwargs["realm"] = realm
    if "challenge" in items:
        value = scalar(items["challenge"][1])
        if value not in (401, 407) or isinstance(value, bool):
            raise _fail(path, items["challenge"][1], f"{name}: auth challenge must be 401 or 407, got {value!r}")
        kwargs["challenge"] = value
    return TrunkAuth(username=username, password=password, **kwargs)


def trunks_from_text(text: str, where: str) -> tuple[Trunk, ...]:
    """The ``trunks`` list from YAML (or JSON) text, e.g. an environment variable."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise TrunkError(f"{where}: trunks: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if node is None:
        return ()
    return trunks_from_node(node, where)


def parse_trunks(value: object, where: str) -> tuple[Trunk, ...]:
    """Settings' entry point: already-parsed trunks pass through, text is parsed."""
    if isinstance(value, tuple) and all(isinstance(t, Trunk) for t in value):
        return value
    if isinstance(value, list) and all(isinstance(t, Trunk) for t in value):
        return tuple(value)
    if isinstance(value, str):
        return trunks_from_text(value, where)
    if value is None:
        return ()
    raise TrunkError(f"{where}: trunks: expected a list of trunks")


def describe_trunk(trunk: Trunk) -> dict[str, Any]:
    """A trunk as plain JSON data for `earshot config`; the password is masked."""
    auth = None
    if trunk.auth is not None:
        auth = {"username": trunk.auth.username, "password": "***", "algorithms": list(trunk.auth.algorithms),
                "realm": trunk.auth.realm, "challenge": trunk.auth.challenge}
    return {"name": trunk.name, "networks": [str(n) for n in trunk.networks], "auth": auth,
            "max_calls": trunk.max_calls, "transport": trunk.transport, "srtp": trunk.srtp,
            "tls_client_cert": trunk.tls_client_cert}
