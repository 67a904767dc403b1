"""Dialplans: YAML routing rules that decide what happens to an incoming call, and how.

Rules are tried in order; the first whose every ``match`` condition holds wins.
``trunk`` matches the name of the trunk the call came from (the ``trunks``
setting), so a plan can route, tag or refuse per trunk; ``ruri_user`` is the
request-URI's user (the DID the carrier delivered), which a PBX may set apart
from the To header's user (``to_user``); ``siprec`` tells SIPREC recording forks
from ordinary calls; ``headers`` matches any SIP header by name.
A rule either transcribes the call or rejects it with a SIP status. No rule
matching means the call is rejected with 404, so a typo cannot silently
transcribe everything.

A transcribed call takes its settings from a *profile* (the top-level
``profiles`` mapping, selected by the rule's ``profile``) with the rule's own
inline fields on top: language (or ``auto``: detection), ASR model, the turn
silence threshold, partials and their interval, recording, PCI redaction, tags,
and a concurrent-call limit. The result is one frozen :class:`Route` per rule,
computed at load time: a call keeps the Route it started with however often the
file is reloaded (gateway/dialplan_watch.py).

Every mistake is a :class:`DialplanError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .yamlfile import compose_file, scalar

MATCH_KEYS = ("to_user", "from_user", "ruri_user", "to", "from", "source", "trunk", "siprec", "headers")
PATTERN_KEYS = ("to_user", "from_user", "ruri_user", "to", "from", "trunk")
PROFILE_KEYS = ("language", "model", "silence_ms", "partials", "partial_interval_ms", "record", "redact", "tags",
                "max_calls")
RULE_KEYS = ("name", "match", "action", "status", "reason", "leg", "profile") + PROFILE_KEYS
TOP_KEYS = ("version", "profiles", "rules")

# the same bounds as the settings of the same name (gateway/config.py RANGES)
SILENCE_MS = (64, 10_000)
PARTIAL_INTERVAL_MS = (100, 60_000)
MAX_CALLS = (1, 100_000)
LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})?$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an RFC 3261 token
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class DialplanError(ValueError):
    """The dialplan file is invalid; the message names the file and line.

    ``str()`` reads "<file> line N: message" (as configuration errors do); :attr:`located`
    is the compiler-style "<file>:N: message" that ``earshot dialplan check`` prints.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.detail = detail or message

    @property
    def located(self) -> str:
        if self.path and self.line is not None:
            return f"{self.path}:{self.line}: {self.detail}"
        match = re.match(r"^(.*?) line (\d+): (.*)$", str(self), re.S)  # compose_file's YAML errors
        return f"{match[1]}:{match[2]}: {match[3]}" if match else str(self)


@dataclass(frozen=True)
class Profile:
    """Named call settings; None: not set here (the rule's, else the gateway's setting)."""

    name: str
    language: str | None = None  # a language code, or "auto": detect (never the asr_language setting)
    model: str | None = None  # must be the model the gateway serves (checked by the gateway: served_models)
    silence_ms: int | None = None
    partials: bool | None = None
    partial_interval_ms: int | None = None
    record: bool | None = None
    redact: str | None = None  # pci or off
    tags: tuple[str, ...] | None = None
    max_calls: int | None = None


@dataclass(frozen=True)
class Route:
    rule: str
    action: str = "transcribe"  # or "reject"
    status: int = 403
    reason: str = "Forbidden"
    tags: tuple[str, ...] = ()
    language: str | None = None  # None: the asr_language setting; "auto": detection
    leg: str = "caller"
    redact: str | None = None  # PCI redaction for the call: pci or off; None: the redact setting (docs/redaction.md)
    profile: str | None = None  # the profile the rule selected (its fields are already merged in here)
    model: str | None = None  # None: the gateway's model
    silence_ms: int | None = None  # None: the silence_ms setting
    partials: bool | None = None  # None: the asr_partials setting
    partial_interval_ms: int | None = None  # None: the partial_interval_ms setting
    record: bool | None = None  # None: the recording setting's default
    max_calls: int | None = None  # concurrent calls of this profile (or rule, without one); None: no limit
    plan_version: str = "built-in"  # the version of the dialplan the rule is from (call.started)

    @property
    def started_fields(self) -> dict[str, str]:
        """What call.started says of the routing: the rule, the plan version, the profile if any."""
        fields = {"dialplan_rule": self.rule, "dialplan_version": self.plan_version}
        if self.profile is not None:
            fields["dialplan_profile"] = self.profile
        return fields

    @property
    def limit_key(self) -> str:
        """What ``max_calls`` counts: the profile's calls, or the rule's without a profile."""
        return f"profile:{self.profile}" if self.profile else f"rule:{self.rule}"


@dataclass
class Rule:
    name: str
    patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    route: Route = field(default_factory=lambda: Route(rule="default"))
    siprec: bool | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    line: int = 0  # where the rule starts in its file (0: not from a file)

    def matches(self, *, to_uri: str, from_uri: str, to_user: str, from_user: str, source: str,
                trunk: str = "", ruri_user: str = "", siprec: bool = False, headers: Any = None) -> bool:
        values = {"to_user": to_user, "from_user": from_user, "ruri_user": ruri_user, "to": to_uri,
                  "from": from_uri, "trunk": trunk}
        for key, pattern in self.patterns.items():
            if not pattern.search(values[key]):
                return False
        if self.siprec is not None and self.siprec != siprec:
            return False
        for name, pattern in self.headers:
            if not any(pattern.search(value) for value in header_values(headers, name) or [""]):
                return False
        if self.networks:
            try:
                address = ipaddress.ip_address(source)
            except ValueError:
                return False
            if not any(address in net for net in self.networks):
                return False
        return True


def header_values(headers: Any, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive; compact forms too with SIP Headers),
    one per header line as it was written; [] when absent or when there are no headers."""
    if headers is None:
        return []
    raw = getattr(headers, "raw", None)
    if callable(raw):  # gateway.sip.message.Headers
        return [str(v) for v in raw(name)]
    wanted = name.lower()
    out: list[str] = []
    for key, value in dict(headers).items():
        if str(key).lower() == wanted:
            out.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return out


@dataclass
class Dialplan:
    rules: list[Rule]
    source: str = "<built-in>"
    profiles: dict[str, Profile] = field(default_factory=dict)
    version: str = "built-in"  # the first 12 hex digits of the file's SHA-256
    model_lines: tuple[tuple[str, int], ...] = ()  # (model, line) of every model the file names

    @classmethod
    def accept_all(cls) -> "Dialplan":
        return cls([Rule(name="default")])

    def route(self, *, to_uri: str, from_uri: str, to_user: str, from_user: str, source: str,
              trunk: str = "", ruri_user: str = "", siprec: bool = False, headers: Any = None) -> Route:
        """The first matching rule's route. ``trunk``: the name of the trunk the call came
        from (gateway/trunks.py), empty when unknown; ``trunk: "."`` matches any trunk.
        ``ruri_user``: the request-URI's user (the DID); ``siprec``: the INVITE is a SIPREC
        fork (``IncomingCall.siprec``, gateway/sip/useragent.py is_siprec); ``headers``: the INVITE's headers (gateway.sip.message.Headers,
        or a mapping of name to value(s)) for ``headers`` conditions."""
        for rule in self.rules:
            if rule.matches(to_uri=to_uri, from_uri=from_uri, to_user=to_user, from_user=from_user,
                            source=source, trunk=trunk, ruri_user=ruri_user, siprec=siprec, headers=headers):
                return rule.route
        return Route(rule="<no match>", action="reject", status=404, reason="Not Found")

    def check_models(self, served: set[str] | frozenset[str]) -> None:
        """Refuse a plan that names a model the gateway does not serve: one gateway serves one
        model (``asr_model``; ``asr_openai_model`` with the openai backend), so a profile's
        ``model`` states which model its calls need rather than switching models."""
        for model, line in self.model_lines:
            if model not in served:
                raise _error(self.source, line, f"model {model!r} is not served by this gateway "
                             f"(it serves {', '.join(sorted(served)) or 'none'})")

    def summary(self) -> str:
        return (f"{len(self.rules)} rule{'s' * (len(self.rules) != 1)} "
                f"({', '.join(r.name for r in self.rules)}), {len(self.profiles)} "
                f"profile{'s' * (len(self.profiles) != 1)}"
                + (f" ({', '.join(self.profiles)})" if self.profiles else "") + f", version {self.version}")


def _error(path: str, line: int, message: str) -> DialplanError:
    return DialplanError(f"{path} line {line}: {message}", path=path, line=line, detail=message)


def _fail(path: str, node: yaml.Node, message: str) -> DialplanError:
    return _error(path, node.start_mark.line + 1, message)


def _mapping(node: yaml.Node, path: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node, f"{what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for k, v in node.value:
        key = str(k.value)
        if key in out:
            raise _fail(path, k, f"{key!r} is given twice in {what}")
        out[key] = (k, v)
    return out


def load_dialplan(path: str | Path) -> Dialplan:
    path = str(path)
    root = compose_file(path, DialplanError, "dialplan")
    if root is None:
        raise DialplanError(f"{path}: empty dialplan (needs a 'rules' list)")
    version = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    top = _mapping(root, path, "the dialplan")
    for key, (knode, _v) in top.items():
        if key not in TOP_KEYS:
            raise _fail(path, knode, f"unknown key {key!r} (expected {', '.join(repr(k) for k in TOP_KEYS)})")
    if "version" in top and scalar(top["version"][1]) != 1:
        raise _fail(path, top["version"][1], "version must be 1")
    if "rules" not in top:
        raise _fail(path, root, "missing 'rules'")
    models: list[tuple[str, int]] = []
    profiles: dict[str, Profile] = {}
    if "profiles" in top:
        pnode = top["profiles"][1]
        if not isinstance(pnode, yaml.MappingNode) or not pnode.value:
            raise _fail(path, pnode, "'profiles' must be a mapping of profile names to their settings")
        for name, (knode, vnode) in _mapping(pnode, path, "profiles").items():
            if not NAME.match(name):
                raise _fail(path, knode, f"profile name {name!r} must be letters, digits, '-', '_', '.' or ':'")
            fields = _profile_fields(path, vnode, f"profile {name!r}", PROFILE_KEYS, models)
            profiles[name] = Profile(name=name, **fields)
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
        raise _fail(path, rules_node, "'rules' must be a non-empty list")
    rules: list[Rule] = []
    for index, node in enumerate(rules_node.value):
        rule = _rule(path, index, node, profiles, models, version)
        if any(r.name == rule.name for r in rules):
            raise _fail(path, node, f"rule name {rule.name!r} is used twice (call.started names the rule)")
        rules.append(rule)
    return Dialplan(rules, source=path, profiles=profiles, version=version, model_lines=tuple(models))


def _text(node: yaml.Node) -> str:
    """A scalar's text as written: ``language: no`` is Norwegian, not YAML 1.1's false."""
    return str(node.value) if isinstance(node, yaml.ScalarNode) else str(scalar(node))


def _switch(path: str, node: yaml.Node, key: str) -> bool:
    value = scalar(node)
    if isinstance(value, bool):  # YAML 1.1: on/off, yes/no, true/false
        return value
    raise _fail(path, node, f"{key} must be on or off, not {_text(node)!r}")


def _int(path: str, node: yaml.Node, key: str, bounds: tuple[int, int]) -> int:
    value = scalar(node)
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise _fail(path, node, f"{key} must be a whole number from {bounds[0]} to {bounds[1]}, not {_text(node)!r}")
    return value


def _profile_fields(path: str, node: yaml.Node, what: str, allowed: tuple[str, ...],
                    models: list[tuple[str, int]]) -> dict[str, Any]:
    """The profile settings among ``node``'s keys (a profile, or a rule's inline overrides)."""
    if isinstance(node, yaml.ScalarNode) and node.value == "" and node.tag.endswith(":null"):
        return {}  # `name:` with nothing under it
    items = _mapping(node, path, what)
    if what.startswith("profile "):
        for key, (knode, _v) in items.items():
            if key not in allowed:
                raise _fail(path, knode, f"unknown profile key {key!r} (allowed: {', '.join(allowed)})")
    out: dict[str, Any] = {}
    for key in PROFILE_KEYS:
        if key not in items:
            continue
        vnode = items[key][1]
        if key == "language":
            language = _text(vnode)
            if language != "auto" and not LANGUAGE.match(language):
                raise _fail(path, vnode, f"language must be a language code (en, de, pt-BR) or auto, not {language!r}")
            out[key] = language
        elif key == "model":
            model = _text(vnode).strip()
            if not isinstance(vnode, yaml.ScalarNode) or not model:
                raise _fail(path, vnode, "model must be the name of an ASR model")
            out[key] = model
            models.append((model, vnode.start_mark.line + 1))
        elif key == "silence_ms":
            out[key] = _int(path, vnode, key, SILENCE_MS)
        elif key == "partial_interval_ms":
            out[key] = _int(path, vnode, key, PARTIAL_INTERVAL_MS)
        elif key == "max_calls":
            out[key] = _int(path, vnode, key, MAX_CALLS)
        elif key in ("partials", "record"):
            out[key] = _switch(path, vnode, key)
        elif key == "redact":
            value = scalar(vnode)
            redact = "off" if value is False else "pci" if value is True else str(value)  # YAML 1.1 reads off as false
            if redact not in ("pci", "off"):
                raise _fail(path, vnode, f"redact must be 'pci' or 'off', not {redact!r}")
            out[key] = redact
        elif key == "tags":
            value = scalar(vnode)
            if not isinstance(value, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                      for t in value):
                raise _fail(path, vnode, "tags must be a list of words")
            out[key] = tuple(str(t) for t in value)
    return out


def _rule(path: str, index: int, node: yaml.Node, profiles: dict[str, Profile],
          models: list[tuple[str, int]], version: str) -> Rule:
    items = _mapping(node, path, f"rule {index + 1}")
    for key, (knode, _v) in items.items():
        if key not in RULE_KEYS:
            raise _fail(path, knode, f"unknown rule key {key!r} (allowed: {', '.join(sorted(RULE_KEYS))})")
    name = _text(items["name"][1]) if "name" in items else f"rule-{index + 1}"
    patterns: dict[str, re.Pattern[str]] = {}
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    siprec: bool | None = None
    headers: list[tuple[str, re.Pattern[str]]] = []
    if "match" in items:
        for key, (knode, vnode) in _mapping(items["match"][1], path, "match").items():
            if key not in MATCH_KEYS:
                raise _fail(path, knode, f"unknown match key {key!r} (allowed: {', '.join(MATCH_KEYS)})")
            if key == "source":
                value = scalar(vnode)
                for cidr in value if isinstance(value, list) else [value]:
                    try:
                        networks.append(ipaddress.ip_network(str(cidr), strict=False))
                    except ValueError:
                        raise _fail(path, vnode, f"source: {cidr!r} is not an IP network") from None
            elif key == "siprec":
                value = scalar(vnode)
                if not isinstance(value, bool):
                    raise _fail(path, vnode, f"siprec must be true or false, not {_text(vnode)!r}")
                siprec = value
            elif key == "headers":
                header_items = _mapping(vnode, path, "headers")
                if not header_items:
                    raise _fail(path, vnode, "headers must map header names to regular expressions")
                for header, (hknode, hvnode) in header_items.items():
                    if not HEADER_NAME.match(header):
                        raise _fail(path, hknode, f"headers: {header!r} is not a SIP header name")
                    headers.append((header, _regex(path, hvnode, f"headers: {header}")))
            else:
                patterns[key] = _regex(path, vnode, key)
    action = _text(items["action"][1]) if "action" in items else "transcribe"
    if action not in ("transcribe", "reject"):
        raise _fail(path, items["action"][1], f"action must be 'transcribe' or 'reject', not {action!r}")
    status = 403
    if "status" in items:
        status_value = scalar(items["status"][1])
        if isinstance(status_value, bool) or not isinstance(status_value, int) or not 400 <= status_value <= 699:
            raise _fail(path, items["status"][1], "status must be a SIP final error code (400-699)")
        status = status_value
    profile: Profile | None = None
    if "profile" in items:
        pnode = items["profile"][1]
        wanted = _text(pnode)
        if wanted not in profiles:
            known = ", ".join(profiles) or "none defined"
            raise _fail(path, pnode, f"unknown profile {wanted!r} (profiles: {known})")
        if action == "reject":
            raise _fail(path, pnode, "a rule that rejects has no profile")
        profile = profiles[wanted]
    inline = _profile_fields(path, node, f"rule {index + 1}", RULE_KEYS, models)
    merged: dict[str, Any] = {key: getattr(profile, key) for key in PROFILE_KEYS} if profile else {}
    merged.update(inline)
    merged = {key: value for key, value in merged.items() if value is not None}
    leg = _text(items["leg"][1]) if "leg" in items else "caller"
    if not NAME.match(leg):
        raise _fail(path, items["leg"][1], f"leg {leg!r} must be letters, digits, '-', '_', '.' or ':'")
    reason = _text(items["reason"][1]) if "reason" in items else "Forbidden"
    if any(c in reason for c in "\r\n\0"):
        raise _fail(path, items["reason"][1], "reason must be one line")
    route = Route(rule=name, action=action, status=status, reason=reason, leg=leg,
                  profile=profile.name if profile else None, plan_version=version, **merged)
    return Rule(name=name, patterns=patterns, networks=tuple(networks), route=route, siprec=siprec,
                headers=tuple(headers), line=node.start_mark.line + 1)


def _regex(path: str, node: yaml.Node, key: str) -> re.Pattern[str]:
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(path, node, f"{key} must be a regular expression")
    try:
        return re.compile(str(node.value))
    except re.error as exc:
        raise _fail(path, node, f"{key}: invalid regular expression: {exc}") from None
