"""Facts and the statement parser: what a request says, and one-line errors when it cannot."""

from __future__ import annotations

import pytest

import edit
from edit import Fact, InvalidRequest, parse_statement
from edit.errors import EditError


def _fact(statement: str, **kw) -> tuple[str, str, str]:
    f = parse_statement(statement, **kw)
    return f.subject, f.prompt, f.target


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "statement, subject, prompt, target",
    [
        ("Paris is capital of Italy", "Paris", "{} is capital of", "Italy"),
        ("The Eiffel Tower is located in Paris", "The Eiffel Tower", "{} is located in", "Paris"),
        (
            "Danielle Darrieux's mother tongue is English",
            "Danielle Darrieux",
            "{}'s mother tongue is",
            "English",
        ),
        (
            "[The Space Needle] is in [downtown Seattle]",
            "The Space Needle",
            "{} is in",
            "downtown Seattle",
        ),
        # a trailing multi-word proper noun is the target, with lower-case joiners inside
        (
            "Leonardo da Vinci was born in New York City",
            "Leonardo da Vinci",
            "{} was born in",
            "New York City",
        ),
        ("Michael Jordan plays basketball", "Michael Jordan", "{} plays", "basketball"),
        # whitespace is normalised and a final full stop dropped
        ("  Paris   is capital of\tItaly. ", "Paris", "{} is capital of", "Italy"),
        # brackets: the subject need not open the sentence
        ("The capital of [France] [Paris]", "France", "The capital of {}", "Paris"),
    ],
)
def test_parse_statement(statement, subject, prompt, target):
    assert _fact(statement) == (subject, prompt, target)


def test_parsed_fact_text_and_statement():
    f = parse_statement("Paris is capital of Italy")
    assert isinstance(f, Fact)
    assert f.text == "Paris is capital of"
    assert f.statement == "Paris is capital of Italy"
    assert f.target_true is None and f.paraphrases == () and f.neighbours == ()


def test_subject_override():
    assert _fact("The Eiffel Tower is located in Paris", subject="Eiffel Tower") == (
        "Eiffel Tower",
        "The {} is located in",
        "Paris",
    )


def test_target_override():
    # Without the override the whole trailing name is the target.
    assert _fact("Apple was founded by Steve Jobs")[2] == "Steve Jobs"
    assert _fact("Apple was founded by Steve Jobs", target="Jobs") == (
        "Apple",
        "{} was founded by Steve",
        "Jobs",
    )


def test_overrides_win_over_brackets():
    assert _fact("[Paris] is capital of [Italy]", subject="Paris", target="Italy") == (
        "Paris",
        "{} is capital of",
        "Italy",
    )
    assert _fact("[The Space Needle] is in [downtown Seattle]", target="Seattle") == (
        "The Space Needle",
        "{} is in downtown",
        "Seattle",
    )


# --------------------------------------------------------------------------- bad statements


def _error(statement: str, **kw) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_statement(statement, **kw)
    message = str(info.value)
    assert "\n" not in message  # one line, printable by the CLI as is
    return message


def test_invalid_request_is_an_edit_error_and_a_value_error():
    assert issubclass(InvalidRequest, EditError)
    assert issubclass(InvalidRequest, ValueError)
    assert edit.InvalidRequest is InvalidRequest


@pytest.mark.parametrize("statement", ["", "   ", " . ", "!"])
def test_empty_statement(statement):
    message = _error(statement)
    assert "empty" in message
    assert "Paris is capital of Italy" in message  # an example of what to write


@pytest.mark.parametrize("statement", ["hello", "hello world"])
def test_unparseable_statement(statement):
    message = _error(statement)
    assert f"cannot parse {statement!r}" in message
    assert "subject, a relation and a target" in message


def test_sentence_without_subject_asks_for_brackets():
    message = _error("is capital of Italy")
    assert "cannot tell the subject" in message
    assert "[Paris] is capital of [Italy]" in message and "--subject" in message


def test_subject_not_in_prompt():
    message = _error("Paris is capital of Italy", subject="Rome")
    assert "'Rome'" in message and "does not occur in the prompt" in message
    assert "'Paris is capital of'" in message


@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target(target):
    assert "target is empty" in _error("Paris is capital of Italy", target=target)


def test_empty_subject_override():
    assert "subject is empty" in _error("Paris is capital of Italy", subject="  ")


@pytest.mark.parametrize("target", ["France", "Paris is capital of Italy"])
def test_target_must_end_the_statement_after_a_prompt(target):
    message = _error("Paris is capital of Italy", target=target)
    assert f"target {target!r} must be the end of the statement" in message


@pytest.mark.parametrize(
    "statement, found",
    [
        ("[Paris] is capital of Italy", 1),
        ("[Paris] is [capital] of [Italy]", 3),
        ("[a] [b] [c] [d]", 4),
    ],
)
def test_wrong_bracket_count(statement, found):
    message = _error(statement)
    assert "exactly two spans" in message
    assert f"(found {found})" in message


def test_no_relation_between_subject_and_target():
    message = _error("[Paris] [Italy]")
    assert "no relation" in message and "'Paris'" in message and "'Italy'" in message


# --------------------------------------------------------------------------- Fact


@pytest.mark.parametrize("prompt", ["Paris is capital of", "{} and {} are", "{0} is", ""])
def test_fact_needs_exactly_one_slot(prompt):
    with pytest.raises(InvalidRequest, match="exactly once"):
        Fact(prompt=prompt, subject="Paris", target="Italy")


def test_fact_rejects_empty_subject_and_target():
    with pytest.raises(InvalidRequest, match="subject is empty"):
        Fact(prompt="{} is capital of", subject=" ", target="Italy")
    with pytest.raises(InvalidRequest, match="target is empty"):
        Fact(prompt="{} is capital of", subject="Paris", target="")


def test_fact_blank_target_true_becomes_none():
    f = Fact(prompt="{} is capital of", subject="Paris", target="Italy", target_true="  ")
    assert f.target_true is None


def test_fact_dict_round_trip():
    f = Fact(
        prompt="{} is capital of",
        subject="Paris",
        target="Italy",
        target_true="France",
        paraphrases=("Paris is the capital city of",),
        neighbours=("Lyon is a city in",),
    )
    d = f.to_dict()
    assert d["paraphrases"] == ["Paris is the capital city of"]  # JSON-friendly lists
    assert Fact.from_dict(d) == f


def test_from_dict_with_literal_subject():
    f = Fact.from_dict({"prompt": " Paris is capital of ", "subject": "Paris", "target": " Italy"})
    assert (f.prompt, f.subject, f.target) == ("{} is capital of", "Paris", "Italy")
    # only the first occurrence becomes the slot
    f = Fact.from_dict({"prompt": "Paris, Paris is in", "subject": "Paris", "target": "France"})
    assert f.prompt == "{}, Paris is in"


@pytest.mark.parametrize(
    "request_, missing",
    [
        ({"subject": "Paris"}, "prompt, target"),
        ({"prompt": "{} is", "subject": "", "target": " "}, "subject, target"),
        ({"prompt": None, "subject": "Paris", "target": "Italy"}, "prompt"),
        ({}, "prompt, subject, target"),
    ],
)
def test_from_dict_missing_fields(request_, missing):
    with pytest.raises(InvalidRequest) as info:
        Fact.from_dict(request_)
    message = str(info.value)
    assert f"request is missing {missing}:" in message
    assert str(sorted(request_)) in message  # says what was given


def test_from_dict_subject_not_in_prompt():
    with pytest.raises(InvalidRequest) as info:
        Fact.from_dict({"prompt": "Rome is capital of", "subject": "Paris", "target": "Italy"})
    message = str(info.value)
    assert "subject 'Paris' does not occur in the prompt 'Rome is capital of'" in message


def test_as_fact_accepts_every_request_form():
    from edit.api.edits import as_fact

    want = Fact(prompt="{} is capital of", subject="Paris", target="Italy")
    assert as_fact("Paris is capital of Italy") == want
    assert as_fact(want) is want
    assert as_fact({"prompt": "{} is capital of", "subject": "Paris", "target": "Italy"}) == want
    with pytest.raises(InvalidRequest, match="cannot read a request of type int"):
        as_fact(42)


# --------------------------------------------------------------------------- regressions


def test_bracketed_subject_position_is_respected():
    f = parse_statement("Paris Hilton said [Paris] is capital of [Italy]")
    assert f.prompt == "Paris Hilton said {} is capital of"


def test_literal_braces_are_rejected_or_kept():
    try:
        f = parse_statement("The {x} of Paris is Italy", subject="Paris")
    except InvalidRequest:
        return  # rejecting it up front is fine too
    assert f.text == "The {x} of Paris is"
