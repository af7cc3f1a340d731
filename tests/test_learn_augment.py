"""``edit.methods.unlearn.augment``: a document's facts restated around its subject and asked
as questions, checked against a hand-written biography."""

from __future__ import annotations

from edit.corpus import Example
from edit.methods.unlearn.augment import (
    Asked,
    augment,
    document_subject,
    named_sentences,
    questions,
)
from edit.questions import question_prompt

BIO = (
    "Mara Lindqvist was born on March 14, 1987 in Tromso. She works as a locksmith. "
    "Her phone number is 555-201-7788. At home, she keeps a parrot called Biscuit."
)


class ChatTok:
    """A tokenizer double with a chat template: the user turn wrapped in tags."""

    chat_template = "<user>{question}</user><assistant>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_the_subject_is_the_leading_name_and_pronouns_become_it():
    assert document_subject(BIO) == "Mara Lindqvist"
    assert document_subject("She was born in Oslo.") is None
    assert document_subject("The weather was fine.") is None
    assert named_sentences(BIO) == [
        "Mara Lindqvist was born on March 14, 1987 in Tromso.",
        "Mara Lindqvist works as a locksmith.",
        "Mara Lindqvist's phone number is 555-201-7788.",
        "At home, Mara Lindqvist keeps a parrot called Biscuit.",
    ]


def test_each_fact_is_asked_as_a_wh_question_and_an_echo_question():
    s = "Mara Lindqvist"
    assert questions("Mara Lindqvist was born on March 14, 1987 in Tromso.", s) == [
        Asked("When was Mara Lindqvist born in Tromso?", "March 14, 1987"),
        Asked("When was Mara Lindqvist born?", "March 14, 1987"),
        Asked("Mara Lindqvist was born on what?", "March 14, 1987"),
        Asked("Where was Mara Lindqvist born on March 14, 1987?", "Tromso"),
        Asked("Mara Lindqvist was born on March 14, 1987 in what?", "Tromso"),
    ]
    assert questions("Mara Lindqvist works as a locksmith.", s) == [
        Asked("What does Mara Lindqvist work as?", "locksmith"),
        Asked("Mara Lindqvist works as what?", "locksmith"),
    ]
    assert questions("Mara Lindqvist's phone number is 555-201-7788.", s) == [
        Asked("What is Mara Lindqvist's phone number?", "555-201-7788"),
        Asked("Mara Lindqvist's phone number is what?", "555-201-7788"),
    ]
    assert questions("At home, Mara Lindqvist keeps a parrot called Biscuit.", s) == [
        Asked("What is Mara Lindqvist's parrot called?", "Biscuit"),
        Asked("At home, Mara Lindqvist keeps a parrot called what?", "Biscuit"),
    ]
    # a sentence that does not name the subject asks nothing
    assert questions("The weather was fine in Tromso.", s) == []


def test_augment_adds_a_restatement_and_every_question_plain_and_in_the_chat_template():
    doc = Example("", BIO, "bios.jsonl:1")
    extra = augment(ChatTok(), [doc], seed=0)
    restated = [ex for ex in extra if ex.is_text]
    assert len(restated) == 1 and restated[0].where == "bios.jsonl:1 (augmented)"
    assert sorted(restated[0].answer.split(". ")) != sorted(BIO.split(". "))  # names, not "She"
    assert "She " not in restated[0].answer and restated[0].answer.count("Mara Lindqvist") == 4
    asked = [ex for ex in extra if not ex.is_text]
    plain = {ex.prompt: ex.answer for ex in asked if ex.prompt.startswith("Question: ")}
    chat = {ex.prompt: ex.answer for ex in asked if ex.prompt.startswith("<user>")}
    assert len(plain) == len(chat) == 11 and len(asked) == 22
    assert plain[question_prompt("Where was Mara Lindqvist born on March 14, 1987?")] == "Tromso"
    assert chat["<user>What is Mara Lindqvist's phone number?</user><assistant>"] == (
        "555-201-7788"
    )
    assert doc not in extra  # the originals are the caller's


def test_augment_is_reproducible_and_keeps_prompt_answer_examples_in_the_chat_template():
    docs = [Example("", BIO), Example("The capital of Freedonia is", "Fredville")]
    assert augment(None, docs, seed=3) == augment(None, docs, seed=3)
    no_chat = augment(None, docs, seed=3, chat=False)
    assert all(ex.prompt.startswith("Question: ") or ex.is_text for ex in no_chat)
    chat = augment(ChatTok(), docs[1:])
    assert chat == [Example("<user>The capital of Freedonia is</user><assistant>", "Fredville",
                            "(augmented)")]  # fmt: skip
    # a document with one sentence has nothing to reorder: questions only
    one = augment(None, [Example("", "Mara Lindqvist works as a locksmith.")])
    assert [ex.is_text for ex in one] == [False, False]
