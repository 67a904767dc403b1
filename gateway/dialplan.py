"""Dialplans: YAML routing rules that decide what happens to an incoming call.

Rules are tried in order; the first whose every ``match`` pattern matches wins.
``trunk`` matches the name of the trunk the call came from (the ``trunks``
setting), so a plan can route, tag or refuse per trunk.
A rule either transcribes the call (with tags, a language and a leg label that
end up in every event) or rejects it with a SIP status. No rule matching means
the call is rejected with 404, so a typo cannot silently transcribe everything.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .yamlfile import compose_file, scalar

MATCH_KEYS = ("to_user", "from_user", "to", "from", "source", "trunk")


class DialplanError(ValueError):
    """The dialplan file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class Route:
    rule: str
    action: str = "transcribe"  # or "reject"
    status: int = 403
    reason: str = "Forbidden"
    tags: tuple[str, ...] = ()
    language: str | None = None
    leg: str = "caller"
    redact: str | None = None  # PCI redaction for the call: pci or off; None: the redact setting (docs/redaction.md)


@dataclass
class Rule:
    name: str
    patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    route: Route = field(default_factory=lambda: Route(rule="default"))

    def matches(self, *, to_uri: str, from_uri: str, to_user: str, from_user: str, source: str,
                trunk: str = "") -> bool:
        values = {"to_user": to_user, "from_user": from_user, "to": to_uri, "from": from_uri, "trunk": trunk}
        for key, pattern in self.patterns.items():
            if not pattern.search(values[key]):
                return False
        if self.networks:
            try:
                address = ipaddress.ip_address(source)
            except ValueError:
                return False
            if not any(address in net for net in self.networks):
                return False
        return True


@dataclass
class Dialplan:
    rules: list[Rule]
    source: str = "<built-in>"

    @classmethod
    def accept_all(cls) -> "Dialplan":
        return cls([Rule(name="default")])

    def route(self, *, to_uri: str, from_uri: str, to_user: str, from_user: str, source: str,
              trunk: str = "") -> Route:
        """The first matching rule's route. ``trunk``: the name of the trunk the call came
        from (gateway/trunks.py), empty when unknown; ``trunk: "."`` matches any trunk."""
        for rule in self.rules:
            if rule.matches(to_uri=to_uri, from_uri=from_uri, to_user=to_user, from_user=from_user,
                            source=source, trunk=trunk):
                return rule.route
        return Route(rule="<no match>", action="reject", status=404, reason="Not Found")


def _fail(path: str, node: yaml.Node, message: str) -> DialplanError:
    return DialplanError(f"{path} line {node.start_mark.line + 1}: {message}")


def _mapping(node: yaml.Node, path: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{what} must be a mapping")
    return {str(k.value): (k, v) for k, v in node.value}


def load_dialplan(path: str | Path) -> Dialplan:
    path = str(path)
    root = compose_file(path, DialplanError, "dialplan")
    if root is None:
        raise DialplanError(f"{path}: empty dialplan (needs a 'rules' list)")
    top = _mapping(root, path, "the dialplan")
    for key, (knode, _v) in top.items():
        if key not in ("version", "rules"):
            raise _fail(path, knode, f"unknown key {key!r} (expected 'version' and 'rules')")
    if "rules" not in top:
        raise _fail(path, root, "missing 'rules'")
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
        raise _fail(path, rules_node, "'rules' must be a non-empty list")
    rules = [_rule(path, index, node) for index, node in enumerate(rules_node.value)]
    return Dialplan(rules, source=path)


def _rule(path: str, index: int, node: yaml.Node) -> Rule:
    items = _mapping(node, path, f"rule {index + 1}")
    allowed = {"name", "match", "action", "status", "reason", "tags", "language", "leg", "redact"}
    for key, (knode, _v) in items.items():
        if key not in allowed:
            raise _fail(path, knode, f"unknown rule key {key!r} (allowed: {', '.join(sorted(allowed))})")
    name = str(scalar(items["name"][1])) if "name" in items else f"rule-{index + 1}"
    patterns: dict[str, re.Pattern[str]] = {}
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    if "match" in items:
        for key, (knode, vnode) in _mapping(items["match"][1], path, "match").items():
            if key not in MATCH_KEYS:
                raise _fail(path, knode, f"unknown match key {key!r} (allowed: {', '.join(MATCH_KEYS)})")
            value = scalar(vnode)
            if key == "source":
                for cidr in value if isinstance(value, list) else [value]:
                    try:
                        networks.append(ipaddress.ip_network(str(cidr), strict=False))
                    except ValueError:
                        raise _fail(path, vnode, f"source: {cidr!r} is not an IP network") from None
                continue
            try:
                patterns[key] = re.compile(str(value))
            except re.error as exc:
                raise _fail(path, vnode, f"{key}: invalid regular expression: {exc}") from None
    action = str(scalar(items["action"][1])) if "action" in items else "transcribe"
    if action not in ("transcribe", "reject"):
        raise _fail(path, items["action"][1], f"action must be 'transcribe' or 'reject', not {action!r}")
    status = 403
    if "status" in items:
        status_value = scalar(items["status"][1])
        if not isinstance(status_value, int) or not 400 <= status_value <= 699:
            raise _fail(path, items["status"][1], "status must be a SIP final error code (400-699)")
        status = status_value
    tags: tuple[str, ...] = ()
    if "tags" in items:
        value = scalar(items["tags"][1])
        if not isinstance(value, list) or not all(isinstance(t, (str, int)) for t in value):
            raise _fail(path, items["tags"][1], "tags must be a list of words")
        tags = tuple(str(t) for t in value)
    language = str(scalar(items["language"][1])) if "language" in items else None
    leg = str(scalar(items["leg"][1])) if "leg" in items else "caller"
    redact = None
    if "redact" in items:
        value = scalar(items["redact"][1])
        redact = "off" if value is False else "pci" if value is True else str(value)  # YAML 1.1 reads off as false
        if redact not in ("pci", "off"):
            raise _fail(path, items["redact"][1], f"redact must be 'pci' or 'off', not {redact!r}")
    reason = str(scalar(items["reason"][1])) if "reason" in items else "Forbidden"
    route = Route(rule=name, action=action, status=status, reason=reason, tags=tags, language=language, leg=leg,
                  redact=redact)
    return Rule(name=name, patterns=patterns, networks=tuple(networks), route=route)
