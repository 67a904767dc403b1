"""Reading the examples' YAML files with errors that name the file, the line and the field."""

from __future__ import annotations

import re
from pathlib import Path
import yaml

from gateway.yamlfile import compose_file, scalar


class RulesError(ValueError):
    """A bad knowledge or routing file; the message is ``<file> line N: <field>: <problem>``."""


class Node:
    """A YAML mapping with its file and line, for messages that point at the problem."""

    def __init__(self, path: str | Path, node: yaml.Node, where: str = "") -> None:
        self.path = str(path)
        self.node = node
        self.where = where
        self.line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            self.fail("", "expected a mapping")
        self.items: dict[str, yaml.Node] = {}
        for key, value in node.value:
            self.items[str(scalar(key))] = value

    def fail(self, field: str, problem: str, node: yaml.Node | None = None) -> None:
        line = (node.start_mark.line + 1) if node is not None else self.line
        name = f"{self.where}{field}" if field else (self.where.rstrip(".") or "file")
        raise RulesError(f"{self.path} line {line}: {name}: {problem}")

    def check_keys(self, allowed: set[str]) -> None:
        for key, value in self.items.items():
            if key not in allowed:
                self.fail(key, f"unknown field (expected one of {', '.join(sorted(allowed))})", value)

    def text(self, field: str, *, required: bool = True, default: str = "", pattern: str | None = None) -> str:
        node = self.items.get(field)
        if node is None:
            if required:
                self.fail(field, "missing")
            return default
        value = scalar(node)
        if not isinstance(value, str) or not value.strip():
            self.fail(field, f"expected a non-empty string, got {value!r:.60}", node)
        if pattern and not re.match(pattern, value):
            self.fail(field, f"does not look right: {value!r:.60}", node)
        return value.strip()

    def number(self, field: str, default: int, low: int, high: int) -> int:
        node = self.items.get(field)
        if node is None:
            return default
        value = scalar(node)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(field, f"expected a whole number from {low} to {high}, got {value!r:.60}", node)
        return value

    def words(self, field: str) -> tuple[str, ...]:
        node = self.items.get(field)
        if node is None:
            return ()
        value = scalar(node)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(field, "expected a list of non-empty strings", node)
        return tuple(normalize(v) for v in value)

    def children(self, field: str) -> list[Node]:
        node = self.items.get(field)
        if node is None:
            self.fail(field, "missing")
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(field, "expected a non-empty list", node)
        return [Node(self.path, item, f"{field}[{i}].") for i, item in enumerate(node.value)]


def load(path: str | Path) -> Node:
    root = compose_file(path, RulesError, "file")
    if root is None:
        raise RulesError(f"{path}: empty file")
    return Node(path, root)


def normalize(text: str) -> str:
    """Lower case, words only, single spaces: what phrases and keywords are matched against."""
    return " ".join(re.findall(r"[\w']+", text.lower()))


def contains_phrase(normalized: str, phrase: str) -> bool:
    """Whole words: "bill" does not match "billion"."""
    return f" {phrase} " in f" {normalized} "
