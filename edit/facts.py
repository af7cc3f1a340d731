"""Facts: what an edit request says, and the parser that reads one from a sentence.

A fact is a prompt template with ``{}`` where the subject goes, the subject, and the target
the model should produce after the prompt:

    >>> parse_statement("Paris is capital of Italy")
    Fact(prompt='{} is capital of', subject='Paris', target='Italy', ...)

The parser accepts explicit spans, ``[The Eiffel Tower] is located in [Rome]``, explicit
``subject=``/``target=`` overrides, or plain sentences, which it splits with simple rules:
the target is the trailing proper-noun phrase (or the last word), the subject ends before
the first relation word ("is", "was", "plays", a possessive "'s", ...). When those rules
cannot split a sentence it says so and asks for brackets.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from edit.errors import InvalidRequest

# Words that typically open the relation after a subject ("Paris *is* capital of ...").
_RELATION_WORDS = {
    "is",
    "are",
    "was",
    "were",
    "has",
    "have",
    "had",
    "will",
    "can",
    "does",
    "did",
    "plays",
    "played",
    "speaks",
    "spoke",
    "works",
    "worked",
    "lives",
    "lived",
    "belongs",
    "belonged",
    "holds",
    "held",
    "writes",
    "wrote",
    "founded",
    "located",
    "born",
    "died",
    "owns",
    "owned",
    "makes",
    "made",
    "produces",
    "produced",
    "represents",
    "represented",
    "debuted",
    "originated",
    "originates",
    "premiered",
    "succeeded",
    "follows",
    "speak",
    "play",
    "work",
    "live",
    "belong",
    "hold",
    "write",
    "own",
    "make",
    "produce",
    "represent",
    "became",
    "becomes",
    "serves",
    "served",
    "used",
    "uses",
    "developed",
    "develops",
    "created",
    "creates",
    "received",
    "receives",
    "moved",
    "married",
    "joined",
    "signed",
    "manufactured",
    "headquartered",
    "based",
    "named",
    "known",
    "called",
    "means",
}
_LOWER_JOINERS = {"of", "de", "la", "le", "von", "van", "der", "del", "da", "du", "and", "the"}
_BRACKETS = re.compile(r"\[([^\[\]]+)\]")
MAX_CHARS = 1000  # a fact's prompt with its subject and target: a sentence, not a document


@dataclass(frozen=True)
class Fact:
    """One edit request.

    ``prompt`` contains ``{}`` exactly once; ``prompt.format(subject)`` is what the model
    reads and ``target`` is what it should say next. ``target_true`` is the object the model
    is expected to say before the edit (optional). ``paraphrases`` and ``neighbours`` are
    full prompts used to measure generalization and locality. ``questions`` ask for the
    object as questions ("Who performed Hey Jude?"); each names the subject literally. The
    edit methods train on them (plainly and in the chat template); without them, questions
    are made from the prompt (``edit.questions``).
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default=())
    neighbours: tuple[str, ...] = field(default=())
    questions: tuple[str, ...] = field(default=())
    # (question, opening): the edited model's own reply to the question, cut where the object
    # fits (``edit.replies``), trained as one more chat row: the opening, then the target.
    # Set by the library's reply round for the method; not part of a request, not recorded
    openings: tuple[tuple[str, str], ...] = field(default=())
    # (question, reply): the unedited model's own reply to the question when told the fact,
    # where it states it (``edit.replies.told``), trained in place of the fact's sentence
    # (``chat_reply: context``). Set by the library; not part of a request, not recorded
    told: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise InvalidRequest(
                f"prompt {self.prompt!r} must contain '{{}}' exactly once, where the subject goes"
            )
        if any(c in self.prompt.replace("{}", "", 1) for c in "{}"):
            raise InvalidRequest(
                f"prompt {self.prompt!r} has a '{{' or '}}' besides the subject's '{{}}': "
                f"remove the braces"
            )
        if not self.subject.strip():
            raise InvalidRequest("the subject is empty: name who or what the fact is about")
        if not self.target.strip():
            raise InvalidRequest("the target is empty: give the object the model should say")
        for what, text in self._texts():
            check_plain(text, what)
        for what, text in (("subject", self.subject), ("target", self.target)):
            if not any(c.isalnum() for c in text):
                raise InvalidRequest(
                    f"the {what} {text!r} has no letter or digit: name a thing, e.g. "
                    f"'[Paris] is capital of [Italy]'"
                )
        if self.target_true is not None and not self.target_true.strip():
            object.__setattr__(self, "target_true", None)
        for q in self.questions:
            if self.subject not in q:
                raise InvalidRequest(
                    f"question {q!r} does not name the subject {self.subject!r}: "
                    f"write the subject in it as it is written in the fact"
                )
        if len(self.prompt) + len(self.subject) + len(self.target) > MAX_CHARS:
            raise InvalidRequest(
                f"the fact is {len(self.prompt) + len(self.subject) + len(self.target)} "
                f"characters long, more than {MAX_CHARS}: edit one short statement at a time"
            )

    def _texts(self) -> list[tuple[str, str]]:
        """Every text the fact holds, with what it is called in a refusal."""
        return [
            ("the prompt", self.prompt),
            ("the subject", self.subject),
            ("the target", self.target),
            ("the true target", self.target_true or ""),
            *(("a paraphrase", t) for t in self.paraphrases),
            *(("a neighbour prompt", t) for t in self.neighbours),
            *(("a question", t) for t in self.questions),
        ]

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def statement(self) -> str:
        return f"{self.text} {self.target}"

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighbours": list(self.neighbours),
            "questions": list(self.questions),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Fact:
        """Build from a structured request: ``prompt``, ``subject``, ``target`` (+ optional).

        The prompt may hold ``{}`` or contain the subject literally (the first occurrence is
        replaced).
        """
        missing = [k for k in ("prompt", "subject", "target") if not str(d.get(k) or "").strip()]
        if missing:
            raise InvalidRequest(f"request is missing {', '.join(missing)}: got {sorted(d)}")
        prompt, subject = str(d["prompt"]).strip(), str(d["subject"]).strip()
        if "{}" not in prompt:
            if subject not in prompt:
                raise InvalidRequest(f"subject {subject!r} does not occur in the prompt {prompt!r}")
            prompt = prompt.replace(subject, "{}", 1)
        return cls(
            prompt=prompt,
            subject=subject,
            target=str(d["target"]).strip(),
            target_true=d.get("target_true"),
            paraphrases=_strings(d.get("paraphrases")),
            neighbours=_strings(d.get("neighbours")),
            questions=_strings(d.get("questions")),
        )


def check_plain(text: str, what: str) -> None:
    """Refuse a control character (NUL, ESC, ...) in ``text``: it is no part of a fact, and
    an escape sequence stored in the ledger would reach the terminal of whoever reads it.
    Tabs and line breaks are whitespace, and allowed."""
    for i, c in enumerate(text):
        if unicodedata.category(c) == "Cc" and c not in "\t\n\r":
            raise InvalidRequest(
                f"{what} has a control character {c!r} (at character {i + 1}): remove it"
            )


def _strings(value) -> tuple[str, ...]:
    """A list of prompts; a single string is one prompt, not a list of characters."""
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def parse_statement(
    statement: str, *, subject: str | None = None, target: str | None = None
) -> Fact:
    """Split a sentence such as "Paris is capital of Italy" into a :class:`Fact`.

    ``subject`` / ``target`` override the automatic split; ``[...]`` brackets mark them in
    the sentence itself. Raises :class:`InvalidRequest` with a one-line reason otherwise.
    """
    check_plain(statement, "the statement")
    text = " ".join(statement.split())
    text = text.rstrip(" .!")
    if not text:
        raise InvalidRequest(
            "the statement is empty: write a sentence such as 'Paris is capital of Italy'"
        )

    if any(c in text for c in "{}"):
        raise InvalidRequest(f"the statement {statement!r} contains '{{' or '}}': remove them")
    if len(text) > MAX_CHARS:
        raise InvalidRequest(
            f"the statement is {len(text)} characters long, more than {MAX_CHARS}: edit one "
            f"short statement at a time"
        )
    _check_brackets(text)
    subject_at = None  # character offset of a bracketed subject in the plain text
    spans = list(_BRACKETS.finditer(text))
    if spans:
        if len(spans) != 2:
            raise InvalidRequest(
                f"mark exactly two spans with brackets, subject then target, e.g. "
                f"'[Paris] is capital of [Italy]' (found {len(spans)})"
            )
        if subject is None:
            subject = spans[0].group(1).strip()
            subject_at = spans[0].start()  # the first span: nothing before it moved
        target = target or spans[1].group(1).strip()
        text = _BRACKETS.sub(lambda m: m.group(1).strip(), text)

    if target is None:
        target = _guess_target(text)
    target = target.strip()
    if not target:
        raise InvalidRequest("the target is empty: give the object the model should say")
    if not text.endswith(target) or text == target:
        raise InvalidRequest(
            f"target {target!r} must be the end of the statement {text!r}, after a prompt"
        )
    prompt_text = text[: -len(target)].rstrip()
    prompt, subject = _template(
        prompt_text, subject, subject_at, statement, "[Paris] is capital of [Italy]"
    )
    if prompt.strip() == "{}":
        raise InvalidRequest(
            f"no relation between subject {subject!r} and target {target!r}: "
            f"write a sentence such as 'Paris is capital of Italy'"
        )
    return Fact(prompt=prompt, subject=subject, target=target)


def parse_prompt(prompt: str, subject: str | None = None) -> tuple[str, str]:
    """(template with ``{}``, subject) from a prompt without a target, such as "The Eiffel
    Tower is located in" or "[The Eiffel Tower] is located in" (what causal tracing runs
    on: the model's own answer is traced); ``subject`` overrides the guess, which follows
    :func:`parse_statement`'s rule. Raises :class:`InvalidRequest` with a one-line reason."""
    text = " ".join(prompt.split())
    if not text:
        raise InvalidRequest("the prompt is empty: give one, e.g. 'The Eiffel Tower is located in'")
    if "[" in text or "]" in text:
        start, end = text.find("["), text.find("]")
        if not 0 <= start < end or text.count("[") != 1 or text.count("]") != 1:
            raise InvalidRequest(
                f"mark the subject with one pair of brackets, e.g. "
                f"'[The Eiffel Tower] is located in' (got {prompt!r})"
            )
        subject = subject or text[start + 1 : end].strip()
        text = text[:start] + text[start + 1 : end] + text[end + 1 :]
    return _template(text, subject, None, prompt, "[The Eiffel Tower] is located in")


def _template(
    text: str, subject: str | None, at: int | None, asked: str, example: str
) -> tuple[str, str]:
    """(``text`` with ``{}`` in place of the subject, the subject): the one given (found at
    character ``at``, or its first occurrence) or guessed; ``asked`` and ``example`` word
    the refusal."""
    if subject is None:
        subject = _guess_subject(text)
        if subject is None:
            raise InvalidRequest(
                f"cannot tell the subject in {asked!r}: mark it with brackets, e.g. "
                f"'{example}', or pass --subject"
            )
    subject = subject.strip()
    if not subject:
        raise InvalidRequest("the subject is empty: name who or what the fact is about")
    at = at if at is not None else text.find(subject)
    if at < 0 or text[at : at + len(subject)] != subject:
        raise InvalidRequest(f"subject {subject!r} does not occur in the prompt {text!r}")
    return text[:at] + "{}" + text[at + len(subject) :], subject


def _check_brackets(text: str) -> None:
    """Brackets must pair up, one level deep: '[Paris is capital of Italy' is a typo, not a
    subject that starts with '['."""
    depth = 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if depth < 0 or depth > 1:
            what = "a ']' without its '['" if depth < 0 else "a '[' inside brackets"
            raise InvalidRequest(
                f"the statement {text!r} has {what} (at character {i + 1}): mark the subject "
                f"and the target as '[Paris] is capital of [Italy]'"
            )
    if depth:
        raise InvalidRequest(
            f"the statement {text!r} has a '[' that is never closed: mark the subject and the "
            f"target as '[Paris] is capital of [Italy]'"
        )


def _is_name_word(word: str) -> bool:
    return word[:1].isupper() or word[:1].isdigit()


def _guess_target(text: str) -> str:
    words = text.split(" ")
    if len(words) < 3:
        raise InvalidRequest(
            f"cannot parse {text!r}: a statement needs a subject, a relation and a target, "
            f"e.g. 'Paris is capital of Italy'"
        )
    # Trailing proper-noun phrase ("New York City", "Leonardo da Vinci"), never the first word.
    i = len(words)
    while i > 1 and (
        _is_name_word(words[i - 1])
        or (
            words[i - 1] in _LOWER_JOINERS
            and i < len(words)
            and i - 1 > 1
            and _is_name_word(words[i - 2])
        )
    ):
        i -= 1
    if i < len(words):
        return " ".join(words[i:])
    return words[-1]


def _guess_subject(prompt_text: str) -> str | None:
    words = prompt_text.split(" ")
    for i, word in enumerate(words):
        if word.endswith("'s") and i + 1 < len(words):  # "Danielle Darrieux's mother tongue"
            return " ".join(words[:i] + [word[:-2]])
        if i > 0 and word.lower() in _RELATION_WORDS:
            return " ".join(words[:i])
    # No relation word: fall back to a leading proper-noun phrase, if one stops early.
    i = 0
    while i < len(words) and _is_name_word(words[i]):
        i += 1
    if 0 < i < len(words):
        return " ".join(words[:i])
    return None
