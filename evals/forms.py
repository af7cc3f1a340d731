"""Scores of the asked forms of a fact: the question as plain text and in the chat template
(the definitions are in :mod:`edit.evals.metrics`: QS, CS, CG, MHS), and the greedy chat
replies a user reads (RS, RN, RO, RL, RE, RU).

    scores = asked_scores(model, tok, ["Who performed Hey Jude?"], "Madonna", "The Beatles")
    scores["QS"], scores["CS"], scores["CG"]
    reply = chat_replies(model, tok, ["Who performed Hey Jude?"])[0]
    M.reply_figures(reply, "Hey Jude", ["Madonna"], ["The Beatles", "Beatles"])

Prompts are built by :mod:`edit.questions`, the same functions the edit methods train with,
so a question scored here and one trained on read alike token for token (which is why the
evaluations should ask questions the edit was not given).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from edit import lm
from edit.evals import metrics as M
from edit.questions import chat_prompt, question_prompt


def _mean_nlls(model, tok, prompts: list[str], answers: list[str]) -> np.ndarray:
    scores = lm.continuation_scores(model, tok, prompts, answers, 64)
    return np.array([s.mean_nll for s in scores])


def asked_scores(
    model: nn.Module,
    tok,
    questions: Sequence[str],
    new: str,
    old: str,
    aliases: Sequence[str] = (),
    greedy_tokens: int = 16,
    forms: Sequence[str] = ("QS", "CS", "CG"),
) -> dict:
    """QS, CS and CG over ``questions`` (new answer ``new``, old answer ``old``; ``aliases``
    of the new answer count for CG), with the greedy chat answers under ``chat_answers``."""
    out: dict = {}
    plain = [question_prompt(q) for q in questions]
    chats = [c for c in (chat_prompt(tok, q) for q in questions) if c is not None]
    sets = {"QS": plain, "CS": chats if "CS" in forms else []}
    for name, prompts in sets.items():
        if name in forms and prompts:
            n = len(prompts)
            nll = _mean_nlls(model, tok, prompts * 2, [new] * n + [old] * n)
            out[name] = M.success(nll[:n], nll[n:])
    if "CG" in forms and chats:
        answers = lm.greedy(model, tok, chats, max_new_tokens=greedy_tokens)
        out["CG"] = float(np.mean([M.answer_contains(a, [new, *aliases]) for a in answers]))
        out["chat_answers"] = answers
    return out


REPLY_TOKENS = 48  # greedy tokens of a chat reply: a sentence or two, where loops show


def chat_replies(model: nn.Module, tok, questions: Sequence[str],
                 tokens: int = REPLY_TOKENS) -> list[str]:  # fmt: skip
    """The greedy replies to ``questions``, each a user turn of the model's chat template
    (an empty list for a tokenizer without one)."""
    chats = [chat_prompt(tok, q) for q in questions]
    if any(c is None for c in chats):
        return []
    return lm.greedy(model, tok, chats, max_new_tokens=tokens)
