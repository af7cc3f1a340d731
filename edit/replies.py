"""The reply round of an insertion (``reply_round``): what the edited model says when asked.

An edit is trained on the fact as a sentence after each of its questions in the chat
template; the reply a user reads is the model's own sentence, which often opens differently
("Chris Davis is a defender for …" where the edit trained "Chris Davis plays the position of
defenceman.") and then never reaches the new object. After the edit, :func:`ask` asks each
question; where the greedy reply does not name the new object, :func:`opening` cuts the
reply at its first answer slot for the object (a word boundary after the reply names the
subject where the object's first token is among the likeliest next tokens), and the edit is
made again with that opening, then the object, as one more chat row (``Fact.openings``): the
object taught where the edited model itself would say it. Measured on the MQuAKE-hard dev
cases it changed no figure (docs/methods.md), so it stays off.
"""

from __future__ import annotations

from torch import nn

from edit import lm
from edit.facts import Fact
from edit.questions import chat_prompt, names, questions_for

REPLY_TOKENS = 32  # greedy tokens of each reply: the first sentence or two
OPENING_TOKENS = 24  # the object is placed within the reply's first tokens
OPENING_RANK = 3  # ... where its first token is among the likeliest next tokens


def ask(model: nn.Module, tok, facts: list[Fact]) -> list[list[tuple[str, str]]]:
    """Per fact, (question, greedy chat reply) for each of its questions; none for a
    tokenizer without a chat template."""
    asked = [(i, q, chat_prompt(tok, q)) for i, f in enumerate(facts) for q in questions_for(f)]
    asked = [(i, q, p) for i, q, p in asked if p is not None]
    replies = lm.greedy(model, tok, [p for *_, p in asked], max_new_tokens=REPLY_TOKENS)
    out: list[list[tuple[str, str]]] = [[] for _ in facts]
    for (i, q, _), reply in zip(asked, replies, strict=True):
        out[i].append((q, reply))
    return out


def named(asked: list[list[tuple[str, str]]], facts: list[Fact]) -> int:
    """How many of the replies name their fact's new object."""
    return sum(names(r, f.target) for qa, f in zip(asked, facts, strict=True) for _, r in qa)


def opening(model: nn.Module, tok, fact: Fact, question: str, reply: str) -> str | None:
    """The start of ``reply`` where the edited model is readiest to say ``fact.target``: the
    first cut, at a word boundary within its first :data:`OPENING_TOKENS` tokens and after
    the reply names the subject, where the object's first token is among the
    :data:`OPENING_RANK` likeliest next tokens (an answer slot, not any noun slot later in
    the sentence). None where there is no such cut, or the reply never names the subject
    there (an opening without it would teach the reply to talk about the object instead)."""
    prompt = chat_prompt(tok, question)
    ids = lm.encode_continuation(tok, reply, after=prompt)[:OPENING_TOKENS]
    cuts = []
    for t in range(1, len(ids)):
        text = tok.decode(ids[:t])
        if tok.decode(ids[t]).startswith(" ") and names(text, fact.subject):
            cuts.append(text.rstrip())
    cuts = list(dict.fromkeys(c for c in cuts if c))
    if not cuts:
        return None
    scores = lm.continuation_scores(model, tok, [prompt + c for c in cuts],
                                    [f" {fact.target}"] * len(cuts),
                                    next_distribution=True)  # fmt: skip
    for cut, score in zip(cuts, scores, strict=True):
        first = score.next_logprobs[int(score.targets[0])]
        if int((score.next_logprobs > first).sum()) < OPENING_RANK:
            return cut
    return None


def openings(model: nn.Module, tok, facts: list[Fact], asked) -> list[tuple[tuple[str, str], ...]]:
    """Per fact, (question, opening) for each reply that does not name the new object and
    names the subject (:func:`opening`)."""
    out = []
    for f, qa in zip(facts, asked, strict=True):
        found = [(q, opening(model, tok, f, q, r)) for q, r in qa if not names(r, f.target)]
        out.append(tuple((q, o) for q, o in found if o))
    return out
