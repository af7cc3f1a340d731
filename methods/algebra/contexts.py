"""The contexts an edit is written for: every prompt row the value optimization and the key
passes run for a fact, with the token where the subject ends and the target that follows.

* cloze rows: the fact's own prompt behind each context template (``"{}"`` and short sampled
  texts ``"<text>. {}"``, ROME §3.1), the target after a space;
* question rows (``"question"`` in ``forms``): each of the fact's questions
  (:func:`edit.questions.questions_for`) as ``Question: …\\nAnswer:``;
* chat rows (``"chat"``): each question as a user turn of the model's own chat template,
  the assistant's answer the fact as a sentence that names the subject again
  (``chat_reply="sentence"``, the default): trained on the object alone opening the turn,
  the edit learns to open every reply about the subject with the object, and the reply
  talks about the object instead of the subject (docs/methods.md).

Row weights sum to 1 per fact: the cloze rows share ``1 - form_weight`` and the asked rows
``form_weight`` (all of it to the cloze rows when a fact has no asked rows). The fact's key
k* and its loss are these weighted means, so a form counts the same however many prompts it
has.

* ranked rows (``rank_weight`` > 0, the old object known): each question plainly and in the
  chat template (whatever ``forms`` lists), once followed by the new object and once by the
  old one (``Row.rank`` +1, −1, in that order). They take no part in the rows' NLL, the key
  or the most-probable stop; the objective asks that the new object be more likely than the
  old one right where the answer opens (what the teacher-forced question and chat scores
  read), without training the reply to open with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.lm import (
    encode,
    encode_continuation,
    last_token_of_span,
    mentions_in_continuation,
    span_in_continuation,
)
from edit.questions import FORMS, chat_prompt, end_of_turn, question_prompt, questions_for

# what a chat row's assistant turn is trained to say: the object alone, opening the turn; the
# fact as a sentence ("Ellie Kemper is a citizen of Croatia."), the subject named again; that
# sentence and the end of the turn; or the object after the fact's prompt as the turn's given
# opening ("Ellie Kemper is a citizen of" → "Croatia"); or the model's own reply when told
# the fact (``Fact.told``: "The developer of XPath is Xiaomi."), else the sentence
CHAT_REPLIES = ("sentence", "turn", "object", "prefixed", "context")  # the first: default


@dataclass(frozen=True)
class Row:
    """One prompt row of one fact, tokenized."""

    ids: list[int]  # the prompt's token ids
    lookup: int  # index in ``ids`` of the subject's last token
    target: list[int]  # token ids of the target after the prompt
    weight: float  # share of the fact's loss and key
    group: tuple  # rows of one group (one template or form slot) share opening tokens
    # indices in ``target`` of the last token of each later mention of the subject (a chat
    # reply that names it again): the written edit acts there too
    mentions: tuple[int, ...] = ()
    # indices in ``target`` of the object's tokens (all of a cloze target; in a chat row's
    # sentence, the object it ends on): what ``stop_object_only`` reads
    objects: tuple[int, ...] = ()
    # +1: the new object opening an asked form's answer, ranked above the next row's old
    # object there (-1); 0: a row of the loss, the key and the stop (``rank_weight``)
    rank: int = 0


@dataclass(frozen=True)
class Contexts:
    """Cloze templates plus the asked forms; :meth:`rows` builds a fact's rows."""

    templates: tuple[str, ...]
    forms: tuple[str, ...] = ()
    form_weight: float = 0.5
    chat_reply: str = CHAT_REPLIES[0]
    rank_weight: float = 0.0  # the ranked pairs' share of the loss, on top of the rows'

    @classmethod
    def of(cls, templates, config=None) -> Contexts:
        """Contexts from sampled templates and a method config's ``forms``/``form_weight``
        (a bare list of templates: cloze rows only)."""
        if isinstance(templates, Contexts):
            return templates
        if config is None:
            return cls(tuple(templates))
        return cls(tuple(templates), tuple(config.forms), config.form_weight, config.chat_reply,
                   config.rank_weight)  # fmt: skip

    def rows(self, tok, fact: Fact) -> list[Row]:
        cloze = [_cloze_row(tok, fact, t, ("cloze", i)) for i, t in enumerate(self.templates)]
        asked = []
        for k, q in enumerate(questions_for(fact) if self.forms else []):
            at = q.index(fact.subject) + len(fact.subject)
            if "question" in self.forms:
                text = question_prompt(q)
                asked.append(_row(tok, fact, text, text.index(q) + at, fact.target,
                                  ("question", k)))  # fmt: skip
            text = chat_prompt(tok, q) if "chat" in self.forms else None
            if text is not None and q in text:
                asked.append(_chat_row(tok, fact, text, text.rindex(q) + at, self.chat_reply,
                                       ("chat", k), dict(fact.told).get(q)))  # fmt: skip
        asked += self._openings(tok, fact)
        share = 1.0 - self.form_weight if asked else 1.0
        weighted = [_weigh(r, share / len(cloze)) for r in cloze]
        asked = [_weigh(r, self.form_weight / len(asked)) for r in asked]
        return weighted + asked + self._ranked(tok, fact)

    def _openings(self, tok, fact: Fact) -> list[Row]:
        """A chat row per ``fact.openings``: the question, then its reply's opening and the
        target (the reply round, ``edit.replies``)."""
        rows = []
        for k, (q, opening) in enumerate(fact.openings if "chat" in self.forms else ()):
            text = chat_prompt(tok, q)
            if text is None or q not in text or fact.subject not in q:
                continue
            end = text.rindex(q) + q.index(fact.subject) + len(fact.subject)
            rows.append(_row(tok, fact, text, end, f"{opening} {fact.target}", ("opening", k)))
        return rows

    def _ranked(self, tok, fact: Fact) -> list[Row]:
        """The ranked pairs (the new object's row, then the old object's) of each question,
        plainly and in the chat template; weight 0: a pair's share of the loss is
        ``rank_weight`` over the fact's pairs."""
        if not self.rank_weight or not fact.target_true:
            return []
        ranked = []
        for k, q in enumerate(questions_for(fact)):
            at = q.index(fact.subject) + len(fact.subject)
            for text in (question_prompt(q), chat_prompt(tok, q)):
                if text is None or q not in text:
                    continue
                end = text.rindex(q) + at
                ranked += [
                    dataclasses.replace(_row(tok, fact, text, end, obj, ("rank", k)), rank=sign)
                    for obj, sign in ((fact.target, 1), (fact.target_true, -1))
                ]
        return ranked


def check_forms(config) -> None:
    """One-line errors for a config's ``forms`` and ``form_weight``."""
    unknown = [f for f in config.forms if f not in FORMS]
    if unknown:
        raise InvalidRequest(
            f"forms must be among {', '.join(FORMS)}, got {', '.join(map(str, unknown))}"
        )
    if config.chat_reply not in CHAT_REPLIES:
        raise InvalidRequest(
            f"chat_reply must be {' or '.join(CHAT_REPLIES)}, got {config.chat_reply!r}"
        )
    if not 0 <= config.form_weight < 1:
        raise InvalidRequest(f"form_weight must be in [0, 1), got {config.form_weight}")
    if not config.rank_weight >= 0:
        raise InvalidRequest(f"rank_weight must be >= 0, got {config.rank_weight}")


def _cloze_row(tok, fact: Fact, template: str, group: tuple) -> Row:
    prompt = template.format(fact.prompt)  # still holds the subject's "{}"
    text = prompt.format(fact.subject)
    return _row(tok, fact, text, prompt.index("{}") + len(fact.subject), fact.target, group)


def _chat_row(tok, fact: Fact, text: str, subject_end: int, reply: str, group: tuple,
              told: str | None = None) -> Row:  # fmt: skip
    """A chat row: ``text`` the question in the chat template, the subject ending at
    ``subject_end``; what follows as ``reply`` says (:data:`CHAT_REPLIES`); ``told``: the
    model's own reply to the question when told the fact, if it states it."""
    if reply == "object":
        return _row(tok, fact, text, subject_end, fact.target, group)
    if reply == "sentence" or (reply == "context" and told is None):
        return _row(tok, fact, text, subject_end, f"{fact.statement}.", group)
    if reply == "context":
        return _row(tok, fact, text, subject_end, told, group)
    if reply == "turn":
        return _row(tok, fact, text, subject_end, f"{fact.statement}.{end_of_turn(tok)}", group)
    # "prefixed": the reply opens with the fact's prompt, read at the subject named in it
    opened = text + fact.text
    return _row(tok, fact, opened, len(text) + fact.prompt.index("{}") + len(fact.subject),
                fact.target, group)  # fmt: skip


def _row(tok, fact: Fact, text: str, subject_end: int, target: str, group: tuple) -> Row:
    ids = encode(tok, text)
    lookup = last_token_of_span(tok, text, subject_end)
    mentions = mentions_in_continuation(tok, target, fact.subject, after=text)
    objects = span_in_continuation(tok, target, fact.target, after=text)
    return Row(ids, lookup, encode_continuation(tok, target, after=text), 0.0, group,
               tuple(mentions), tuple(objects))  # fmt: skip


def _weigh(row: Row, weight: float) -> Row:
    return dataclasses.replace(row, weight=weight)
