"""Reading YAML files whose errors must name the file and line (config, dialplans)."""

from __future__ import annotations

from pathlib import Path

import yaml


def compose_file(path: str | Path, error: type[Exception], what: str) -> yaml.Node | None:
    """The file's YAML node tree (None for an empty file); nodes keep their line marks.

    Raises ``error`` with "<path>: cannot read <what>: ..." or "<path> line N: not valid YAML: ...".
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        return yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def scalar(node: yaml.Node) -> object:
    """The Python value of one YAML node."""
    return yaml.safe_load(yaml.serialize(node))
