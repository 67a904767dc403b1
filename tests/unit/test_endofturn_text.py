"""The words' half of semantic end-of-turn: does a transcript read as unfinished?"""

from __future__ import annotations

import pytest

from gateway.media.endofturn_text import unfinished


@pytest.mark.parametrize("text, why", [
    ("Please enter your...", "trailing mark"),
    ("...", "trailing mark"),
    ("You are currently the…", "trailing mark"),
    ("My account number is seven, three,", "trailing mark"),
    ("I was going to -", "trailing mark"),
    ("The reasons are:", "trailing mark"),
    ("I'd like to talk to the", "ends in 'the'"),
    ("Thanks. I was calling about my", "ends in 'my'"),  # only the last sentence counts
    ("It keeps dropping because", "ends in 'because'"),
    ("My account number is.", "ends in 'is'"),
    ("The problem is, um.", "ends in 'um'"),
    ("I want to cancel and.", "ends in 'and'"),
    ("Please press.", "ends in 'press'"),
    ("My account number is seven three.", "ends in a number"),
    ("You have two.", "ends in a number"),
    ("This message lasts 20.", "ends in a number"),
    ("There are currently.", "ends in 'are' + adverb"),
    ("The number was successfully.", "ends in 'was' + adverb"),
    ("To leave a message.", "a 'to' clause alone"),
])
def test_unfinished(text, why):
    assert unfinished(text) == why


@pytest.mark.parametrize("text", [
    "Thank you.",
    "Thank you very much for your help. Have a good day.",
    "Agent logged in.",  # "in" is a particle here
    "Please hold while we try to connect you.",
    "One moment please.",
    "Could you check it?",
    "Yes",  # no punctuation at all: judged by the last word only
    "To leave the conference, press 1.",  # a number after "press" is a whole instruction
    "If this is correct, press 1.",
    "Dial 9.",
    "Goodbye!",
    "Please enter a new extension.",  # a whole sentence, though the speaker may go on: the model's call
    "I'm calling to pay my bill.",  # "to" inside the sentence, not opening it
    "To Paris, please.",
    "",
    "   ",
])
def test_finished_or_unknown(text):
    assert unfinished(text) is None
