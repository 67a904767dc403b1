"""bench/turn_latency.py's pure parts: how finals are judged against the true turns (false cuts,
the final that ends a turn, merged and lost turns), where a model answer fell, and reading the
gateway's end-of-turn debug lines."""

from __future__ import annotations

import datetime as dt

from bench.turn_latency import (
    ask_position,
    classify_call,
    interleave,
    mid_sentence_pauses,
    parse_asks,
)
from tests.fixtures_data import Turn

# a turn with a 600 ms mid-sentence pause, a plain turn, a turn with a 300 ms pause (not "mid-sentence")
TURNS = (
    Turn("my account number is seven three nine", 500, 4000, 600, ((1500, 2100),)),
    Turn("thank you", 5500, 6500, 80),
    Turn("one two three", 8000, 10000, 300, ((8800, 9100),)),
)


def final(start: float, end: float, reason: str = "silence") -> dict:
    return {"start": start, "end": end, "reason": reason}


def test_every_turn_ended_once_is_no_false_cut():
    finals = [final(450, 4100, "semantic"), final(5450, 6600), final(7950, 10100, "semantic")]
    verdict = classify_call(TURNS, finals)
    assert verdict["cuts"] == []
    assert [(e["final"], e["outcome"]) for e in verdict["ends"]] == [(0, "final"), (1, "final"), (2, "final")]


def test_a_final_ending_in_a_pause_is_a_false_cut_and_the_next_one_ends_the_turn():
    finals = [final(450, 1600), final(2050, 4100), final(5450, 6600)]
    verdict = classify_call(TURNS, finals)
    assert verdict["cuts"] == [{"final": 0, "turn": 0, "kind": "pause"}]
    assert verdict["ends"][0] == {"turn": 0, "final": 1, "outcome": "final"}
    # the third turn has no final at all
    assert verdict["ends"][2] == {"turn": 2, "final": None, "outcome": "lost"}


def test_an_early_end_outside_a_pause_counts_only_when_the_next_final_continues_the_turn():
    continued = classify_call(TURNS, [final(450, 3000), final(3100, 4100)])
    assert continued["cuts"] == [{"final": 0, "turn": 0, "kind": "early"}]
    # ending 150 ms before the true end is within the tolerance: it ends the turn
    close = classify_call(TURNS, [final(450, 3850), final(5450, 6600)])
    assert close["cuts"] == [] and close["ends"][0]["final"] == 0
    # an early end that nothing continues is not a cut (the turn's end is simply lost)
    alone = classify_call(TURNS, [final(450, 3000), final(5450, 6600)])
    assert alone["cuts"] == [] and alone["ends"][0]["outcome"] == "lost"


def test_a_final_spanning_two_turns_merges_them():
    verdict = classify_call(TURNS, [final(450, 6600), final(7950, 10100)])
    assert verdict["ends"][0] == {"turn": 0, "final": 0, "outcome": "merged"}
    assert verdict["ends"][1] == {"turn": 1, "final": 0, "outcome": "final"}
    assert verdict["cuts"] == []


def test_mid_sentence_pauses_count_only_400_ms_or_more():
    assert mid_sentence_pauses(TURNS) == 1


def test_ask_position():
    assert ask_position(TURNS, 1700) == "pause"
    assert ask_position(TURNS, 2250) == "pause"  # answered just after the pause ended
    assert ask_position(TURNS, 8900) == "other"  # a 300 ms pause is not a mid-sentence one
    assert ask_position(TURNS, 4200) == "end"
    assert ask_position(TURNS, 12000) == "end"
    assert ask_position(TURNS, 100) == "other"


def test_interleave_alternates_then_appends_the_rest():
    assert interleave(["p1", "p2", "p3"], ["f1"]) == ["p1", "f1", "p2", "p3"]


def test_parse_asks_reads_the_pipelines_debug_lines():
    lines = [
        "2026-12-02 07:01:02,345 DEBUG gateway.pipeline: abc-123/caller turn 2: P(complete) 0.912, ends it\n",
        "2026-12-02 07:01:05,000 DEBUG gateway.pipeline: abc-123/caller turn 3: P(complete) 0.120\n",
        "2026-12-02 07:01:05,001 INFO gateway.app: call abc-123 answered\n",
    ]
    asks = parse_asks(lines)
    wall = dt.datetime(2026, 12, 2, 7, 1, 2, 345000).timestamp()
    assert list(asks) == ["abc-123"]
    first, second = asks["abc-123"]
    assert abs(first["wall"] - wall) < 1e-6 and first["turn"] == 2 and first["p"] == 0.912 and first["ends"]
    assert second["turn"] == 3 and not second["ends"]


def test_parse_asks_reads_the_texts_verdicts_too():
    lines = [
        "2026-12-02 07:01:02,345 DEBUG gateway.pipeline: abc-123/caller turn 2: P(complete) 0.912\n",
        "2026-12-02 07:01:02,500 DEBUG gateway.pipeline: abc-123/caller turn 2: text ends it\n",
        "2026-12-02 07:01:04,000 DEBUG gateway.pipeline: abc-123/caller turn 3: text reads unfinished "
        "(ends in 'the'), keeps it open\n",
    ]
    ask, ended, kept = parse_asks(lines)["abc-123"]
    assert not ask.get("text") and ask["p"] == 0.912 and not ask["ends"]
    assert ended["text"] and ended["ends"] and ended["p"] is None and ended["turn"] == 2
    assert kept["text"] and not kept["ends"] and kept["reason"] == "ends in 'the'"
