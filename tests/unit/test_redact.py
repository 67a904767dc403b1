"""PCI redaction (gateway/output/redact.py): the pure redactor, and the session hook that every
turn text and DTMF digit passes before any sink (docs/redaction.md).

The session tests run real sessions (real Silero VAD, real turn machinery, manual commits); a
transcriber that answers scripted texts stands in for Whisper, since what is checked is what
the session publishes for given words (tests/e2e/test_pci.py hears real speech)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from gateway.app import turn_config
from gateway.asr.stub import StubTranscriber
from gateway.asr.interface import TranscriptionRequest, TranscriptionResult
from gateway.config import ConfigError, Settings, load_settings
from gateway.dialplan import DialplanError, load_dialplan
from gateway.events import Event
from gateway.media.vad import BatchedVadRunner, SileroVad
from gateway.output.redact import CardContext, Redactor, luhn, plausible, redact, redact_words
from gateway.pipeline import TurnPublished
from gateway.session import LegSpec, SessionHost
from gateway.events import Source
from tests.fixtures_data import read_pcm16

VISA = "4111111111111111"


# -- single texts


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1111",
    "4111-1111-1111-1111.",
    "my card is four one one one one one one one one one one one one one one one",
    "four one one one, one one one one, um, one one one one, uh, one one one one.",
    "five five five five, five five five five, five five five five, four four four four",
    "three seven eight two eight two two four six three one oh oh oh five",  # Amex with "oh"
    "6011 1111 1111 1117",
    "four double one one, one one one one, triple one one, one one one one",
    "forty-one eleven, eleven eleven, eleven eleven, eleven eleven",
    "5555 5555 5555 4444 and 4111 1111 1111 1111",
])
def test_card_numbers_read_every_common_way_are_redacted(text):
    out = redact(text)
    assert "[REDACTED:card]" in out.text and out.count >= 1
    assert not any(ch.isdigit() for ch in out.text)
    assert not any(w in out.text for w in ("one one", "five five", "eleven", "double", "triple"))


@pytest.mark.parametrize("text", [
    "\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11",  # full-width
    "my card is \u0664\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661\u0661",  # Arabic-Indic
])
def test_card_numbers_in_other_digit_forms_are_redacted(text):
    """Digits that are not ASCII are still digits to a reader (and to int()), so they count."""
    assert redact(text).text.endswith("[REDACTED:card]")


@pytest.mark.parametrize("text", [
    "call me back on +1 555 123 4567",
    "my order number is 12345678901",
    "the total comes to $1,234.56",
    "we spoke on 12/05/2026 at 10:30",
    "the zip code is 94103",
    "press 1 for sales or 2 for support",
    "1234 5678 9012 3456",  # 16 digits that fail the Luhn check, no card words, no network's prefix
])
def test_near_misses_are_left_alone(text):
    assert redact(text).text == text


def test_cvv_and_expiry_in_a_card_context():
    out = redact("visa 4111 1111 1111 1111, expires oh four twenty seven, security code is one two three")
    assert out.text == "visa [REDACTED:card], expires [REDACTED:expiry], security code is [REDACTED:cvv]"
    assert out.count == 3
    assert redact("card number 4111 1111 1111 1111 04/27 123").text == \
        "card number [REDACTED:card] [REDACTED:expiry] [REDACTED:cvv]"
    assert redact("it expires in April 2027").text == "it expires in [REDACTED:expiry]"
    # outside a card context three digits are just three digits
    assert redact("room 123, floor 4").text == "room 123, floor 4"


def test_a_misheard_number_is_still_redacted_in_a_card_context():
    assert redact("my card number is 4111 1111 1111 1112").text == "my card number is [REDACTED:card]"
    assert redact("4111 1111 1111 1112", context=True).count == 1
    # without card words: a run of 13-19 digits that starts as Visa/MC/Amex/Discover numbers do
    # (tiny.en dropped two digits of 6011 0009 9013 9424 in tests/e2e/test_pci.py)
    assert redact("6 0 1 1 0 0 9 9 0 3 9 4 2 4").text == "[REDACTED:card]"
    assert redact("9 0 1 1 0 0 9 9 0 3 9 4 2 4").count == 0


def test_us_social_security_numbers():
    assert redact("it's 123-45-6789").text == "it's [REDACTED:ssn]"
    assert redact("my social security number is one two three four five six seven eight nine").text == \
        "my social security number is [REDACTED:ssn]"
    assert redact("123 45 6789").count == 0  # no context, not the dashed form
    assert redact("000-12-3456").count == 0  # never issued


def test_luhn_and_networks():
    assert luhn(VISA) and not luhn("4111111111111112")
    assert plausible("378282246310005") and plausible("5555555555554444") and not plausible("9111111111111111")


def test_word_timestamps_are_redacted_with_the_text():
    words = [(" my", 0.0, 0.2, 0.9), (" card", 0.2, 0.5, 0.9), (" is", 0.5, 0.6, 0.9)]
    words += [(f" {g}", 0.6 + i, 1.5 + i, 0.8) for i, g in enumerate(("4111", "1111", "1111", "1111."))]
    text = "".join(w[0] for w in words).strip()
    found = redact(text)
    lead = 1
    spans = [dataclasses.replace(s, start=s.start + lead, end=s.end + lead) for s in found.spans]
    out = redact_words(words, spans)
    assert [w[0] for w in out] == [" my", " card", " is", " [REDACTED:card]"]
    assert out[-1][1:3] == (0.6, 4.5) and out[-1][3] == 0.8


# -- a leg's turns


def test_a_card_read_over_three_finals_is_redacted_in_all_three():
    r: Redactor[int] = Redactor()
    assert r.final("my card number is four one one one", 0.0, 1) == []
    assert r.partial("one one one one", 0.5) is None  # never out while a final is held
    assert r.final("one one one one, one one one one", 1.0, 2) == []
    out = r.final("one one one one.", 2.0, 3)
    assert [(x.item, x.text, x.count) for x in out] == [
        (1, "my card number is [REDACTED:card]", 1), (2, "[REDACTED:card]", 1), (3, "[REDACTED:card].", 1)]
    assert r.final("thank you", 3.0, 4)[0].text == "thank you"


def test_a_held_final_goes_out_when_its_time_is_up_and_the_tail_still_joins():
    r: Redactor[int] = Redactor(hold_s=3.0)
    assert r.final("the number is 5555", 0.0, 1) == []
    assert r.deadline == 3.0 and r.due(2.9) == []
    assert [x.text for x in r.due(3.0)] == ["the number is 5555"]  # nothing to redact in it alone
    # the published tail's digits still join the next final: its part of the number is redacted
    assert [x.text for x in r.final("5555 5555 4444", 5.0, 2)] == ["[REDACTED:card]"]


def test_speech_extends_the_hold_up_to_its_cap():
    r: Redactor[int] = Redactor(hold_s=3.0, max_hold_s=25.0)
    r.final("4111", 0.0, 1)
    r.speech(1.0)
    assert r.deadline == 26.0  # the next turn's final, however long the turn
    assert r.final("1111", 6.0, 2) == [] and r.deadline == 9.0  # then hold_s again
    assert [x.text for x in r.final("1111 1111", 8.0, 3)] == ["[REDACTED:card]"] * 3


def test_at_most_max_held_finals_wait():
    r: Redactor[int] = Redactor(max_held=2)
    assert r.final("1234", 0.0, 1) == [] and r.final("5678", 0.1, 2) == []
    assert [x.item for x in r.final("9012", 0.2, 3)] == [1, 2, 3]


def test_partials_that_might_start_a_card_are_held_back():
    r: Redactor[int] = Redactor()
    assert r.partial("my card number is 4111", 0.0) is None
    assert r.partial("hello there", 0.0).text == "hello there"
    assert r.partial("it is 4111 1111 1111 1111 thanks", 0.0).text == "it is [REDACTED:card] thanks"


def test_a_question_on_one_leg_makes_the_next_digits_on_the_other_a_cvv():
    context = CardContext()
    agent: Redactor[int] = Redactor(context)
    caller: Redactor[int] = Redactor(context)
    assert agent.final("and what is the security code on the back", 0.0, 1)[0].count == 0
    out = caller.final("it's 123", 1.0, 1)
    assert out and out[0].text == "it's [REDACTED:cvv]"
    assert caller.final("and I live at 123 Main Street", 2.0, 2)[0].count == 0  # the expectation was used


def test_dtmf_is_masked_only_in_a_card_context():
    context = CardContext()
    assert context.dtmf("5", 0.0) is None
    context.mark(1.0)
    assert context.dtmf("5", 2.0) == "*" and context.dtmf("#", 2.0) is None
    assert context.dtmf("5", 200.0) is None  # the context has passed


# -- settings and dialplan


def test_the_redact_setting(tmp_path):
    assert Settings().redact == "pci"
    (tmp_path / "c.yaml").write_text("redact: off\nredact_hold_ms: 0\n")
    settings = load_settings(tmp_path / "c.yaml", environ={})
    assert settings.redact == "off" and settings.redact_hold_ms == 0
    with pytest.raises(ConfigError, match="redact"):
        load_settings(None, environ={"EARSHOT_REDACT": "maybe"})
    with pytest.raises(ConfigError, match="redact_hold_ms"):
        load_settings(None, environ={"EARSHOT_REDACT_HOLD_MS": "-1"})


def test_a_dialplan_rule_may_switch_redaction(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("rules:\n  - name: lab\n    redact: off\n  - name: rest\n")
    plan = load_dialplan(path)
    assert plan.rules[0].route.redact == "off" and plan.rules[1].route.redact is None
    path.write_text("rules:\n  - name: lab\n    redact: sometimes\n")
    with pytest.raises(DialplanError, match="line 3: redact"):
        load_dialplan(path)


# -- the session hook: what the publisher, listeners and observers receive


class ScriptedTranscriber(StubTranscriber):
    """Answers each final with the next of ``texts`` (partials with placeholder words)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = list(texts)

    def result(self, request: TranscriptionRequest) -> TranscriptionResult:
        base = super().result(request)
        if request.kind == "final" and self.texts:
            return dataclasses.replace(base, text=self.texts.pop(0))
        return base


@pytest.fixture
async def make_host():
    runners = []

    def make(texts: list[str], **settings) -> SessionHost:
        s = Settings(**settings)
        runner = BatchedVadRunner(SileroVad())
        runners.append((runner, asyncio.create_task(runner.run())))
        published: list[Event] = []
        host = SessionHost(s, vad_runner=runner, transcriber=ScriptedTranscriber(texts), publish=published.append,
                           capacity=lambda: 4, turn_config=turn_config(s))
        host.published = published  # type: ignore[attr-defined]
        return host

    yield make
    for runner, task in runners:
        task.cancel()
        runner.close()


async def _turns(session, count: int) -> None:
    pcm, _ = read_pcm16("caller_03_greetings.wav")
    for _ in range(count):
        session.feed("caller", pcm[:16000], time.monotonic())  # 1 s of speech
        session.commit("caller", time.monotonic())
        await asyncio.sleep(0.05)


async def test_every_sink_of_a_session_gets_the_redacted_texts(make_host):
    host = make_host(["my card number is 4111 1111", "1111 1111", "thanks, that's all"])
    observed, heard = [], []
    session = host.open(Source("realtime", (("session_id", "s1"),)), [LegSpec("caller", manual_turns=True)],
                        observer=observed.append, listeners=[heard.append])
    await _turns(session, 3)
    await session.end("stop")
    finals = [e for e in host.published if e.type == "turn.final"]
    assert [e.data["text"] for e in finals] == ["my card number is [REDACTED:card]", "[REDACTED:card]",
                                                "thanks, that's all"]
    assert [e.data["redactions"] for e in finals] == [1, 1, 0]
    assert [e.number for e in host.published] == sorted(e.number for e in host.published)  # in order
    assert [e.data["text"] for e in heard if e.type == "turn.final"] == [e.data["text"] for e in finals]
    published = [o.event.data["text"] for o in observed if isinstance(o, TurnPublished)]
    assert published == [e.data["text"] for e in finals]  # what the Realtime API sends its client
    assert host.published[-1].type == "call.ended" and host.published[-1].data["turns"] == 3
    assert not any("4111" in e.to_fields()["data"] or "1111" in e.to_fields()["data"] for e in host.published)


async def test_a_held_final_is_published_after_redact_hold_ms(make_host):
    host = make_host(["call me on 5555"], redact_hold_ms=300)
    session = host.open(Source("realtime", (("session_id", "s2"),)), [LegSpec("caller", manual_turns=True)])
    await _turns(session, 1)
    await asyncio.sleep(0.1)
    assert not [e for e in host.published if e.type == "turn.final"]  # held
    await asyncio.sleep(0.5)
    finals = [e for e in host.published if e.type == "turn.final"]
    assert [e.data["text"] for e in finals] == ["call me on 5555"]
    assert finals[0].data["redactions"] == 0
    await session.end("stop")


async def test_redaction_off_publishes_the_words_as_heard(make_host):
    host = make_host(["4111 1111 1111 1111"], redact="off")
    session = host.open(Source("realtime", (("session_id", "s3"),)), [LegSpec("caller", manual_turns=True)])
    await _turns(session, 1)
    session.dtmf("caller", "5", 100, time.monotonic())
    await session.end("stop")
    final = next(e for e in host.published if e.type == "turn.final")
    assert final.data["text"] == "4111 1111 1111 1111" and "redactions" not in final.data
    # and per session (a dialplan rule's redact: pci on a gateway with redact: off)
    host2 = make_host(["4111 1111 1111 1111"], redact="off")
    session2 = host2.open(Source("realtime", (("session_id", "s4"),)), [LegSpec("caller", manual_turns=True)],
                          redact="pci")
    await _turns(session2, 1)
    await session2.end("stop")
    assert next(e for e in host2.published if e.type == "turn.final").data["text"] == "[REDACTED:card]"


async def test_dtmf_after_card_words_is_published_as_stars(make_host):
    host = make_host(["please key in your card number now"])
    session = host.open(Source("realtime", (("session_id", "s5"),)), [LegSpec("caller", manual_turns=True)])
    session.dtmf("caller", "4", 100, time.monotonic())  # before: as pressed
    await _turns(session, 1)
    await asyncio.sleep(0.1)
    for digit in "4111":
        session.dtmf("caller", digit, 100, time.monotonic())
    session.dtmf("caller", "#", 100, time.monotonic())
    await session.end("stop")
    dtmf = [e.data for e in host.published if e.type == "dtmf"]
    assert [d["digit"] for d in dtmf] == ["4", "*", "*", "*", "*", "#"]
    assert [d.get("redactions") for d in dtmf] == [None, 1, 1, 1, 1, None]
    assert host.published[-1].data["dtmf"] == 6


def test_a_rest_upload_piece_is_redacted_in_its_text_and_words():
    from gateway.asr.interface import Word
    from gateway.ingest.rest import _Outcome, _redacted
    from gateway.ingest.upload import Piece

    words = tuple(Word(w, i * 0.5, i * 0.5 + 0.4, 0.9) for i, w in
                  enumerate([" My", " card", " is", " 4111", " 1111", " 1111", " 1111."]))
    result = TranscriptionResult(text=" My card is 4111 1111 1111 1111.", language="en", language_probability=1.0,
                                 avg_logprob=-0.1, no_speech_prob=0.0, compression_ratio=1.0, audio_seconds=4.0,
                                 processing_seconds=0.1, model="tiny.en", silence=False, words=words)
    r: Redactor = Redactor()
    outcome = _Outcome(Piece(0, 0, 64000, "silence"), result)
    (release,) = r.final(result.text.strip(), 0.0, (outcome, None))
    out = _redacted(release)
    assert out.redactions == 1 and out.result.text == "My card is [REDACTED:card]."
    assert [w.word for w in out.result.words] == [" My", " card", " is", " [REDACTED:card]"]
    assert (out.result.words[-1].start, out.result.words[-1].end) == (1.5, 3.4)
