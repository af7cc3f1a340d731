"""The forms in which a fact is asked: the cloze prompt, a plain question, the chat template.

An edit written for the cloze prompt "Ellie Kemper is a citizen of" must also answer
"What is the country of citizenship of Ellie Kemper?", asked plainly or in the model's chat
template. The edit methods optimize over these forms and the evaluations score them, both
through the functions here, so that what is trained and what is measured are built alike:

    >>> questions_for(Fact("{} is a citizen of", "Ellie Kemper", "Croatia"))
    ['Ellie Kemper is a citizen of what?', 'What is Ellie Kemper a citizen of?']
    >>> question_prompt("Who performed Hey Jude?")
    'Question: Who performed Hey Jude?\\nAnswer:'

Questions come from the request (``Fact.questions``) or are made from the cloze template by
grammar alone (no relation table): an echo question ("X is a citizen of what?") for every
template, and a wh-question for the common shapes "The R of X is" → "What is the R of X?",
"X is/was <words>" → "What is/was X <words>?" (and for a past passive with its agent, "X was
developed by" → "Who developed X?"), "X's R is" → "What is X's R?".
"""

from __future__ import annotations

import re

from edit.facts import Fact

FORMS = ("question", "chat")  # the asked forms besides the cloze prompt itself
_AUX = re.compile(r"^\{\} (is|was|are|were|has|had) (.+)$")
_OF = re.compile(r"^(The .+) \{\} (is|was)$", re.IGNORECASE)
_POSSESSIVE = re.compile(r"^\{\}'s (.+) (is|was)$")
# a past passive with its agent: "{} was developed by" → "Who developed X?" (regular verbs,
# whose participle is their past tense)
_PASSIVE_BY = re.compile(r"^\{\} (?:was|were) ([a-z]+ed) by$")


def questions_for(fact: Fact) -> list[str]:
    """The questions that ask for the fact's object: the request's own, else made from the
    cloze template (see the module docstring). Each contains the subject literally."""
    if fact.questions:
        return list(fact.questions)
    prompt = " ".join(fact.prompt.split()).rstrip(" ,:;")
    if prompt.endswith("{}"):  # the subject closes the prompt: nothing to ask about
        return []
    made = [prompt.format(fact.subject) + " what?"]
    if m := _OF.match(prompt):
        relation = m[1][0].lower() + m[1][1:]  # "the official language of"
        made.append(f"What {m[2]} {relation} {fact.subject}?")
    elif m := _AUX.match(prompt):
        made.append(f"What {m[1]} {fact.subject} {m[2]}?")
        if by := _PASSIVE_BY.match(prompt):
            made.append(f"Who {by[1]} {fact.subject}?")
    elif m := _POSSESSIVE.match(prompt):
        made.append(f"What {m[2]} {fact.subject}'s {m[1]}?")
    return list(dict.fromkeys(made))


def question_prompt(question: str) -> str:
    """A question as plain text, the answer to follow (after a space)."""
    return f"Question: {question}\nAnswer:"


def chat_prompt(tok, question: str) -> str | None:
    """The question as one user turn in the tokenizer's own chat template, opened for the
    assistant's answer; None when the tokenizer has no chat template."""
    if not getattr(tok, "chat_template", None):
        return None
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def end_of_turn(tok) -> str:
    """What the chat template writes after an assistant's words to close its turn (e.g.
    ``<|im_end|>``), without the line break after it; empty without a chat template."""
    if not getattr(tok, "chat_template", None):
        return ""
    marker = "\u2063"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
        tokenize=False,
    )
    return text[text.rindex(marker) + len(marker) :].rstrip("\n")
