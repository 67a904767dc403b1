"""Reading YAML files whose errors must name the file and line (config, dialplans)."""

from __future__ import annotations

from pathlib import Path

import yaml


def compose_file(path: str | Path, error: type[Exception], what: str) -> yaml.Node | None:
    """The file's YAML node tree (None for an empty file); nodes keep their line marks.

    Raises ``error`` with "<path>: cannot read <what>: ..." or "<path> line N: not valid YAML: ...".
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # where the first bad byte is, as an editor counts it: line and column (both 1-based)
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                    f"save the {what} as UTF-8") from None
    try:
        return yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def scalar(node: yaml.Node) -> object:
    """The Python value of one YAML node."""
    return yaml.safe_load(yaml.serialize(node))
