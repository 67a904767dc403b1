"""Every number setting refuses what is outside its range, NaN and infinities, naming itself:
from a file, from the environment and from the command line alike."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gateway.config import RANGES, ConfigError, Settings, load_settings

NUMBERS = {f.name: f.type for f in dataclasses.fields(Settings) if f.type in ("int", "float")}


def test_every_number_setting_has_a_range_that_holds_its_default() -> None:
    assert set(RANGES) == set(NUMBERS)
    defaults = Settings()
    for name, (low, high) in RANGES.items():
        assert low <= getattr(defaults, name) <= high, name


def invalid_values(name: str) -> list[str]:
    low, high = RANGES[name]
    step = 1 if NUMBERS[name] == "int" else max(abs(high - low) * 1e-3, 1e-3)
    values = [low - step, high + step, -1e12, 1e12]
    out = [str(int(v)) if NUMBERS[name] == "int" else repr(float(v)) for v in values]
    if NUMBERS[name] == "float":
        out += ["nan", "inf", "-inf"]
    return out


CASES = [(name, value) for name in sorted(RANGES) for value in invalid_values(name)]


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_an_invalid_number_is_refused_naming_the_field(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: must be a number from ") as caught:
        load_settings(environ={f"EARSHOT_{name.upper()}": value})
    got = float(value)
    low, high = RANGES[name]
    assert math.isnan(got) or not low <= got <= high
    assert str(caught.value).endswith("(from the file and environment given)")


@pytest.mark.parametrize("name", sorted(RANGES))
def test_a_file_value_out_of_range_is_refused_too(name: str, tmp_path) -> None:
    low, _high = RANGES[name]
    path = tmp_path / "earshot.yaml"
    path.write_text(f"{name}: {low - 1}\n")
    with pytest.raises(ConfigError, match=rf"^{name}: must be a number from "):
        load_settings(path, environ={})


def test_the_command_line_is_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match="^sip_port: must be a number from 1 to 65535"):
        load_settings(environ={}, sip_port=0)
    with pytest.raises(ConfigError, match="^asr_max_batch: must be a number from 1 to 256"):
        load_settings(environ={}, asr_max_batch=0)


# The values the review found accepted, written out here rather than derived from
# RANGES, so that a range widened by mistake fails too.
FOUND_ACCEPTED = {
    "rtp_jitter_ms": ["-1", "-60"],
    "partial_interval_ms": ["0", "-1000"],
    "stream_maxlen": ["0", "-1"],
    "retry_after_s": ["0", "-30"],
    "drain_timeout_s": ["-1", "nan", "inf"],
    "publish_buffer": ["0", "-1"],
    "min_speech_ms": ["0", "-250"],
    "asr_threads": ["-1", "100000"],
    "media_timeout_s": ["0", "-30", "nan", "inf", "-inf"],
}
FOUND_CASES = [(name, value) for name, values in FOUND_ACCEPTED.items() for value in values]


@pytest.mark.parametrize(("name", "value"), FOUND_CASES, ids=[f"{n}={v}" for n, v in FOUND_CASES])
def test_the_values_the_review_found_accepted_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: "):
        load_settings(environ={f"EARSHOT_{name.upper()}": value})
