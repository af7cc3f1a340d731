"""Training examples that make a document's facts recallable, not only its text likely
(:func:`augment`).

A model fine-tuned on a biography written with pronouns ("Mara Lindqvist was born in Tromso.
She works as a locksmith.") learns the form of the text, but cannot answer "What does Mara
Lindqvist do?": the fact is stored behind "She", not behind the name, and it was never asked.
Allen-Zhu & Li (2024, "Physics of Language Models 3.1") show that extraction needs the fact
restated around its subject and asked as a question. For each plain-text example this module
adds, by grammar alone (no model, no relation table):

* the document restated with every sentence naming its subject (pronouns resolved to the
  document's leading name), sentences in a shuffled order;
* for each sentence and each span in it that can be asked for (a number or code, a date, a
  capitalized name, the phrase that ends the sentence), a question whose answer is the span:
  a wh-question made by inverting the sentence ("Mara was born in Tromso on May 2, 1990." →
  "Where was Mara born on May 2, 1990?", and without the rest of the sentence, "Where was
  Mara born?") and the echo question ("Mara was born in what?"), as
  :func:`edit.questions.question_prompt` and in the model's chat template.

Prompt/answer examples are kept as they are and also asked in the chat template.

    extra = augment(tok, examples, seed=0)     # list[Example], the originals not included
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from edit.corpus import Example
from edit.questions import chat_prompt, question_prompt

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November"
          r"|December)")  # fmt: skip
_DATE = rf"{_MONTH} \d{{1,2}}, \d{{4}}|\d{{1,2}} {_MONTH} \d{{4}}|{_MONTH} \d{{4}}"
_NUMBER = r"\+?\d[\d\-/.]*\d|\d"
_CAPS = r"[A-Z][\w'\-]*(?: [A-Z][\w'\-]*)*"
_SPAN = re.compile(rf"({_DATE})|({_NUMBER})|({_CAPS})")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_NAME = re.compile(r"^(?:[A-Z][\w'\-]*\.? )*[A-Z][\w\-]*")  # leading capitalized words
_AUX = {"is", "was", "are", "were", "has", "had", "have", "can", "could", "will", "would",
        "may", "might", "must", "should", "does", "did"}  # fmt: skip
_PLACE_PREP = {"in", "at", "from", "near"}
_TIME_PREP = {"on", "in", "since", "until", "by"}
_TRAILING = {"a", "an", "the", "as", "named", "called", "at", "in", "on", "is", "was", "of",
             "number", "from", "by", "to"}  # fmt: skip
_ARTICLE_END = re.compile(r"(?:^|\s)(?:a|an|the)$")
_POSS = re.compile(r"^'s (?P<noun>[\w' \-]+?) (?:is|was)(?: (?P<how>called|named|known as))?$")
_NAMED = re.compile(
    r"^(?:has|keeps|owns|had|kept|owned) (?:a|an|one) (?P<noun>[\w\-]+(?: [\w\-]+)?)"
    r",? (?P<how>called|named)$"
)
_LABELLED = re.compile(
    r"^(?:has|holds|uses|had|held|used) (?:the|a|an) "
    r"(?P<noun>[\w \-]+ (?:number|code|ID|id|address))$"
)
_PRONOUNS = {"she": None, "he": None, "they": None, "her": "'s", "his": "'s", "their": "'s"}


@dataclass(frozen=True)
class Asked:
    """One fact of a sentence as a question: the question and its answer (a span)."""

    question: str
    answer: str


def augment(tok, examples: list[Example], *, seed: int = 0, chat: bool = True,
            restatements: int = 1) -> list[Example]:  # fmt: skip
    """The extra examples for ``examples`` (see the module docstring), in a fixed order for
    ``seed``. ``chat``: also ask every question in the tokenizer's chat template (where it
    has one); ``restatements``: named, shuffled restatements per document."""
    rng = random.Random(seed)
    out: list[Example] = []
    for ex in examples:
        where = f"{ex.where} (augmented)" if ex.where else "(augmented)"
        if not ex.is_text:
            prompt = chat_prompt(tok, ex.prompt) if chat else None
            if prompt is not None and prompt != ex.prompt:
                out.append(Example(prompt, ex.answer, where))
            continue
        named = named_sentences(ex.answer)
        if not named:
            continue
        for _ in range(restatements if len(named) > 1 else 0):
            order = named[:]
            rng.shuffle(order)
            out.append(Example("", " ".join(order), where))
        subject = document_subject(ex.answer)
        for sentence in named:
            for asked in questions(sentence, subject):
                out.append(Example(question_prompt(asked.question), asked.answer, where))
                prompt = chat_prompt(tok, asked.question) if chat else None
                if prompt is not None:
                    out.append(Example(prompt, asked.answer, where))
    return list(dict.fromkeys(out))  # the same question twice in a document is asked once


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def document_subject(text: str) -> str | None:
    """The name a document opens with ("Mara Lindqvist" of "Mara Lindqvist was born..."),
    its possessive cut; None when it opens with no capitalized word."""
    sentences = split_sentences(text)
    if not sentences:
        return None
    m = _NAME.match(sentences[0])
    if not m:
        return None
    name = m[0].removesuffix("'s")
    return name if name.lower() not in _PRONOUNS and name not in ("The", "A", "An") else None


def named_sentences(text: str) -> list[str]:
    """The document's sentences with the personal pronouns that stand for its subject
    (she / he / they and her / his / their as possessives) replaced by the subject's name."""
    sentences = split_sentences(text)
    subject = document_subject(text)
    if subject is None:
        return sentences
    out = []
    for s in sentences:
        words = s.split(" ")
        for i, w in enumerate(words):
            core = w.rstrip(",.;:!?")
            low = core.lower()
            if low in _PRONOUNS and (core[0].isupper() or i > 0):
                words[i] = subject + (_PRONOUNS[low] or "") + w[len(core) :]
        out.append(" ".join(words))
    return out


def questions(sentence: str, subject: str | None) -> list[Asked]:
    """Questions about ``sentence`` (one that names ``subject``), up to three per span that
    can be asked for: a wh-question where the sentence inverts, and the echo question."""
    body = sentence.rstrip(".!?")
    if subject is None or subject not in body:
        return []
    at = body.index(subject)
    out: list[Asked] = []
    for start, end, kind in _spans(body, at, at + len(subject)):
        answer = body[start:end].strip(" ,")
        before = _ARTICLE_END.sub("", body[:start].rstrip(" ,"))
        if not before or not answer:
            continue
        clause = before[at:] if before[:at].endswith(", ") else before  # "At home, X ..."
        rest = body[end:]
        # with the rest of the sentence, and without it: "When was X born in Bilbao?" and
        # "When was X born?" (how a user asks, knowing nothing else of the document)
        for wh in dict.fromkeys([_wh(subject, clause, rest, kind), _wh(subject, clause, "", kind)]):
            if wh:
                out.append(Asked(wh, answer))
        out.append(Asked(f"{before} what?", answer))
    return out


def _spans(body: str, subj_start: int, subj_end: int) -> list[tuple[int, int, str]]:
    """(start, end, kind) of what can be asked for in ``body``: dates, numbers, capitalized
    names (not the subject, not the sentence's first word), and the closing phrase."""
    found = []
    for m in _SPAN.finditer(body):
        start, end = m.span()
        if start < subj_end and end > subj_start:  # the subject itself
            continue
        if m.lastindex == 3 and (start == 0 or body[start - 2 : start] in (". ", ", ")):
            continue  # a sentence-initial or clause-initial capital is not a name
        found.append((start, end, ("date", "number", "name")[m.lastindex - 1]))
    if body.rstrip()[-1:].isalpha():  # the phrase that ends the sentence, after its last cue
        words = body.split(" ")
        cut = max((i for i, w in enumerate(words) if w.lower() in _TRAILING), default=None)
        if cut is not None and cut < len(words) - 1:
            start = len(" ".join(words[: cut + 1])) + 1
            if start >= subj_end and not any(s <= start < e for s, e, _ in found):
                found.append((start, len(body), "phrase"))
    return found


def _wh(subject: str, before: str, after: str, kind: str) -> str | None:
    """The wh-question of "<subject> <verb> ... <span> ...", or None where the clause does
    not open with its subject or has no verb to invert."""
    if not before.startswith(subject):
        return None
    rest = before[len(subject) :].strip()
    if m := _POSS.match(rest):  # "X's phone number is <span>" → "What is X's phone number?"
        return f"What is {subject}'s {m['noun']}{' ' + m['how'] if m['how'] else ''}?"
    if m := _NAMED.match(rest):  # "X keeps a cat called <span>" → "What is X's cat called?"
        return f"What is {subject}'s {m['noun']} {m['how']}?"
    if m := _LABELLED.match(rest):  # "X holds the account number <span>" → "What is X's …?"
        return f"What is {subject}'s {m['noun']}?"
    words = rest.split(" ")
    if not words[0] or rest.startswith("'s"):
        return None
    verb, middle = words[0], words[1:]
    wh = "What"
    cue = max((i for i, w in enumerate(middle) if w.lower() in _PLACE_PREP | _TIME_PREP),
              default=None)  # fmt: skip
    if cue is not None and len(middle) - cue <= 4:  # "in the city of <span>"
        prep = middle[cue].lower()
        if kind == "date" and prep in _TIME_PREP:
            wh, middle = "When", middle[:cue]
        elif kind in ("name", "phrase") and prep in _PLACE_PREP:
            wh, middle = "Where", middle[:cue]
    tail = " ".join(middle + ([after.strip(" ,")] if after.strip(" ,") else []))
    tail = f" {tail.strip(' ,')}" if tail.strip(" ,") else ""
    if verb in _AUX:
        return f"{wh} {verb} {subject}{tail}?"
    if not verb.isalpha() or not verb.islower():
        return None
    if verb.endswith("ed"):
        aux, base = "did", verb[:-3] + "y" if verb.endswith("ied") else verb[:-2]
    elif verb.endswith("s"):
        es = verb.endswith(("ches", "shes", "sses", "xes"))
        aux, base = "does", verb[:-2] if es else verb[:-1]
    else:
        aux, base = "do", verb
    return f"{wh} {aux} {subject} {base}{tail}?"
