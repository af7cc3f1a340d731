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
template, and a wh-question for the common shapes, asked as a person would ask it:

* "The R of X is" → "What is the R of X?", "Who is …" when R names a person's role
  ("director", "author", "head coach": an agent noun);
* "X is/was <words> <prep> the N of" → "Which N is/was X <words> <prep>?" ("X is located in
  the continent of" → "Which continent is X located in?");
* "X <verb>s [<prep>] the N of" → "What N does X <verb> [<prep>]?" ("X plays the position
  of" → "What position does X play?");
* "X is/was <words>" → "What is/was X <words>?", "Who …" when the words end with "by" or are
  "married to"; for a past passive with its agent also the active ("X was developed by" →
  "Who developed X?");
* "X's R is" → "What is X's R?" ("Who …" for an agent noun);
* "The N that X <verb>s is" → "What N does X <verb>?"; "The N that <verb>ed X is" → "Which N
  <verb>ed X?".
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
_PREP = r"in|at|on|to|with|from|for|of"
# "{} is located in the continent of" → "Which continent is X located in?"
_WHICH = re.compile(rf"^\{{\}} (is|was|are|were) ([a-z ]+?) ({_PREP}) the ([a-z]+) of$")
# "{} plays the position of" → "What position does X play?"
_DOES = re.compile(rf"^\{{\}} ([a-z]+?)s (?:({_PREP}) )?the ([a-z]+) of$")
# "The type of music that {} plays is", "The company that produced {} is"
_THAT_DOES = re.compile(r"^The (.+) that \{\} ([a-z]+?)s (?:is|was)$")
_THAT_DID = re.compile(r"^The (.+) that ([a-z]+ed) \{\} (?:is|was)$")
# nouns that name a person's role: asked with "Who" ("the director", "the head coach")
_AGENT = re.compile(
    r"(?:er|or|ist|president|student|agent|person|coach|child|children|wife|husband|spouse"
    r"|man|woman|son|daughter|mother|father|parent|sibling|brother|sister|partner|head)$"
)
# words with those endings that do not name a person
_THING = {"center", "centre", "number", "water", "river", "border", "letter", "power", "paper",
          "quarter", "headquarter", "order", "cover", "chapter", "color", "colour", "floor",
          "door", "flavor", "flavour", "error", "motor", "sector", "corridor", "season",
          "reason", "prison", "poison", "lesson", "comparison"}  # fmt: skip


def questions_for(fact: Fact) -> list[str]:
    """The questions that ask for the fact's object: the request's own, else made from the
    cloze template (see the module docstring). Each contains the subject literally."""
    if fact.questions:
        return list(fact.questions)
    prompt = " ".join(fact.prompt.split()).rstrip(" ,:;")
    if prompt.endswith("{}"):  # the subject closes the prompt: nothing to ask about
        return []
    made = [prompt.format(fact.subject) + " what?"]
    if asked := _wh_question(prompt, fact.subject):
        made.append(asked)
    if by := _PASSIVE_BY.match(prompt):
        made.append(f"Who {by[1]} {fact.subject}?")
    return list(dict.fromkeys(made))


def _wh_question(prompt: str, subject: str) -> str | None:
    """The wh-question for the prompt's shape (module docstring), None for other shapes."""
    if m := _THAT_DOES.match(prompt):
        return f"What {m[1]} does {subject} {m[2]}?"
    if m := _THAT_DID.match(prompt):
        return f"Which {m[1]} {m[2]} {subject}?"
    if m := _OF.match(prompt):
        relation = m[1][0].lower() + m[1][1:]  # "the official language of"
        return f"{_wh(relation.removesuffix(' of'))} {m[2]} {relation} {subject}?"
    if m := _WHICH.match(prompt):
        return f"Which {m[4]} {m[1]} {subject} {m[2]} {m[3]}?"
    if m := _DOES.match(prompt):
        verb = "have" if m[1] == "ha" else m[1]  # "has" is the one irregular third person
        return f"What {m[3]} does {subject} {verb}{' ' + m[2] if m[2] else ''}?"
    if m := _AUX.match(prompt):
        who = m[2].endswith(" by") or m[2] == "married to"
        return f"{'Who' if who else 'What'} {m[1]} {subject} {m[2]}?"
    if m := _POSSESSIVE.match(prompt):
        return f"{_wh(m[1])} {m[2]} {subject}'s {m[1]}?"
    return None


def _wh(noun_phrase: str) -> str:
    """Who for a noun phrase that names a person's role (its last word an agent noun), else
    What."""
    noun = noun_phrase.split()[-1]
    return "Who" if _AGENT.search(noun) and noun not in _THING else "What"


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


def plain(text: str) -> str:
    """``text`` as its lower-cased words, one space apart (case and punctuation aside)."""
    return " ".join(re.findall(r"\w+", text.lower()))


def names(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` as whole words, case and punctuation aside."""
    words = plain(name)
    return bool(words) and f" {words} " in f" {plain(text)} "
