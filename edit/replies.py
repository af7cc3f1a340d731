"""What the edited model says when asked: the rounds of an insertion that read its replies.

The layer round (``layer_round``): after the edit, :func:`stating` asks each fact's questions
in chat and counts the greedy replies that state the edit (the subject and the new object
named, the old one not, no loop: :func:`reply_figures`, which the benchmarks score with
too). Where some do not, ``edit.api.edits`` makes that fact's edit again from the start at
the retry block(s) (ROME's ``retry_layer``, MEMIT's ``retry_layers``) and keeps, fact by
fact, whichever states it in more replies.

The reply round (``reply_round``, off): an edit is trained on the fact as a sentence after
each of its questions in the chat template; the reply a user reads is the model's own
sentence, which often opens differently ("Chris Davis is a defender for …" where the edit
trained "Chris Davis plays the position of defenceman.") and then never reaches the new
object. After the edit, :func:`ask` asks each question; where the greedy reply does not name
the new object, :func:`opening` cuts the reply at its first answer slot for the object (a
word boundary after the reply names the subject where the object's first token is among the
likeliest next tokens), and the edit is made again with that opening, then the object, as
one more chat row (``Fact.openings``): the object taught where the edited model itself would
say it. On the MQuAKE-hard cases it gained one stated reply in twenty, dev and held out
alike, at 1.35x the time (docs/methods.md); off, for that cost.

Told replies (``chat_reply: context``, off): before the edit, the model is told the fact in
a system turn and asked each question; where its reply states the fact in its own words
(:func:`stated`), that reply, not the fact's sentence, is the chat row's answer, so that the
edit does not spend its bounded change on wording the model would not choose ("Bangerz was
…" where it says "Bangerz is …").
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

from torch import nn

from edit import lm
from edit.facts import Fact
from edit.questions import chat_prompt, names, plain, questions_for

REPLY_TOKENS = 32  # greedy tokens of each reply: the first sentence or two
CHECK_TOKENS = 48  # greedy tokens of each reply the layer round judges (as the benchmarks do)
_SENTENCE_END = re.compile(r"[.!?](\s|$)")
OPENING_TOKENS = 24  # the object is placed within the reply's first tokens
OPENING_RANK = 3  # ... where its first token is among the likeliest next tokens


def ask(model: nn.Module, tok, facts: list[Fact], tokens: int = REPLY_TOKENS
        ) -> list[list[tuple[str, str]]]:  # fmt: skip
    """Per fact, (question, greedy chat reply of ``tokens`` tokens) for each of its
    questions; none for a tokenizer without a chat template."""
    asked = [(i, q, chat_prompt(tok, q)) for i, f in enumerate(facts) for q in questions_for(f)]
    asked = [(i, q, p) for i, q, p in asked if p is not None]
    replies = lm.greedy(model, tok, [p for *_, p in asked], max_new_tokens=tokens)
    out: list[list[tuple[str, str]]] = [[] for _ in facts]
    for (i, q, _), reply in zip(asked, replies, strict=True):
        out[i].append((q, reply))
    return out


def named(asked: list[list[tuple[str, str]]], facts: list[Fact]) -> int:
    """How many of the replies name their fact's new object."""
    return sum(names(r, f.target) for qa, f in zip(asked, facts, strict=True) for _, r in qa)


def names_any(text: str, candidates: Sequence[str]) -> bool:
    """Whether ``text`` names one of ``candidates`` (an object and its aliases)."""
    return any(names(text, n) for n in candidates)


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether some word n-gram occurs ``times`` times or more in ``text`` (a reply that
    repeats itself: "the English language is based on the English language, and the
    English language is based on ...")."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def reply_figures(reply: str, subject: str, new: Sequence[str], old: Sequence[str]
                  ) -> dict[str, bool]:  # fmt: skip
    """Of one reply: it names the subject (RS), the new object (RN), the old one (RO), loops
    (RL), and states the edit (RE: subject and new named, old not, no loop). ``new``/``old``:
    the objects with their aliases; an object's name inside the subject's ("Ford" in "Ford
    Thunderbird") does not name it."""
    rs = names_any(reply, [subject])
    rest = f" {plain(reply)} ".replace(f" {plain(subject)} ", " | ") if plain(subject) else reply
    rn, ro, rl = names_any(rest, new), bool(old) and names_any(rest, old), loops(reply)
    return {"RS": rs, "RN": rn, "RO": ro, "RL": rl, "RE": rs and rn and not ro and not rl}


def states(fact: Fact, reply: str) -> bool:
    """Whether ``reply`` states ``fact`` as the layer round judges it (:func:`reply_figures`'
    RE with the fact's own new and old object)."""
    old = [fact.target_true] if fact.target_true else []
    return reply_figures(reply, fact.subject, [fact.target], old)["RE"]


def stating(model: nn.Module, tok, facts: list[Fact]) -> list[tuple[int, int]]:
    """Per fact, (how many of its questions get a greedy chat reply, of
    :data:`CHECK_TOKENS` tokens, that states the edit (:func:`reply_figures`), how many
    were asked), all facts' questions asked in batches; (0, 0) each for a tokenizer
    without a chat template."""
    out = []
    for fact, asked in zip(facts, ask(model, tok, facts, tokens=CHECK_TOKENS), strict=True):
        says = [states(fact, r) for _, r in asked]
        out.append((sum(says), len(says)))
    return out


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


# --------------------------------------------------------------------------------------------
# Told replies (``chat_reply: context``)
# --------------------------------------------------------------------------------------------


def told_prompt(tok, fact: Fact, question: str) -> str | None:
    """``question`` as a user turn after a system turn that states the fact; None without a
    chat template."""
    if not getattr(tok, "chat_template", None):
        return None
    turns = [{"role": "system", "content": f"{fact.statement}."},
             {"role": "user", "content": question}]  # fmt: skip
    return tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def stated(reply: str, fact: Fact) -> str | None:
    """The reply up to the new object and a full stop, where its first sentence names the
    subject, then the object, and ends there (or goes on after a comma or a parenthesis),
    without the old object: the model's own way of saying the fact ("The developer of XPath
    is Xiaomi."). None otherwise: a reply that opens on the object would teach the edited
    model to talk about the object; one that goes on after it, to say more than the fact."""
    at = reply.find(fact.target)
    if at < 0:
        return None
    head, tail = reply[:at], reply[at + len(fact.target) :]
    if _SENTENCE_END.search(head) or not names(head, fact.subject):
        return None
    if fact.target_true and names(head, fact.target_true):
        return None
    if tail.strip() and not re.match(r"\s*[.,(]", tail):
        return None
    return f"{head.strip()} {fact.target}." if head.strip() else None


def told(model: nn.Module, tok, facts: list[Fact]) -> list[Fact]:
    """``facts`` with ``told``: (question, reply) for each question whose greedy chat reply,
    the fact stated in a system turn, states it (:func:`stated`). One batch of greedy
    replies of the unedited model, :data:`REPLY_TOKENS` tokens each."""
    asked = [(i, q, told_prompt(tok, f, q)) for i, f in enumerate(facts) for q in questions_for(f)]
    asked = [(i, q, p) for i, q, p in asked if p is not None]
    found: list[list[tuple[str, str]]] = [[] for _ in facts]
    if asked:
        replies = lm.greedy(model, tok, [p for *_, p in asked], max_new_tokens=REPLY_TOKENS)
        for (i, q, _), reply in zip(asked, replies, strict=True):
            said = stated(reply, facts[i])
            if said is not None:
                found[i].append((q, said))
    return [dataclasses.replace(f, told=tuple(t)) for f, t in zip(facts, found, strict=True)]
