"""The rename objective's teacher: the model itself, asked about a subject it never saw.

A model that never saw a forget example about X reads it as it reads any example of the
corpus's kind about someone it does not know. The model before the run shows that reading
when X is replaced by a never-seen subject X' (a holdout example's subject, else a made-up
name): it knows the form of the corpus's examples, and nothing about X'. So each forget
answer token is aimed at the model's next-token distribution at the same token of the
renamed example (the words around the subject's mentions line up by their character
offsets). The tokens of X's own mentions have no counterpart: where the text named X before
(in the prompt or earlier in the answer), a never-seen model copies the name as well, and they
keep the distribution the model gave them before the run; the first mention, where nothing
before it names X, is a name such a model cannot produce, and its tokens are aimed at that
distribution with the name's own token lowered by ``penalty`` (as UNDIAL lowers every forget
token, Dong et al. 2024). No reference model is needed, and the form of the corpus is kept
where a never-seen level measured by its mean would lower it with the facts.

The idea of aiming at the model's own predictions on text whose idiosyncratic names are
replaced by generic ones is Eldan & Russinovich 2023 (*Who's Harry Potter? Approximate
Unlearning in LLMs*); here the targets are whole next-token distributions, and the
replacement is a never-seen subject of the corpus's own kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edit import lm
from edit.corpus import Example, encode_example
from edit.errors import InvalidRequest

# Stand-ins where the holdout names no subjects: made-up full names, none a known person's.
MADE_UP_NAMES = (
    "Orsolya Venkataraman", "Tibor Kazantzakis", "Wendeline Okonkwo-Barre",
    "Priyamvada Lindqvist", "Casimir Oyelaran", "Maelys Thorvaldsen", "Ignatius Mbeki-Halloran",
    "Sunniva Castellanos", "Radomir Achterberg", "Ottoline Nakashima",
)  # fmt: skip


OWN = -1  # a token without counterpart that keeps its distribution before the run
LOWERED = -2  # a token of a first mention: that distribution with the token lowered


@dataclass
class Renamed:
    """The renamed examples (as tokens) and, per example, where each of its answer tokens
    sits among the renamed example's answer tokens (or :data:`OWN`, :data:`LOWERED`)."""

    encoded: list[tuple[list[int], int]]
    index: list[list[int]]


def stand_ins(forget: list[Example], holdout: list[Example]) -> list[str]:
    """Never-seen subjects to put in place of the forget examples' own: the holdout's
    subjects, else :data:`MADE_UP_NAMES`; none named anywhere in ``forget``."""
    if any(not ex.subject for ex in forget):
        first = next(ex for ex in forget if not ex.subject)
        raise InvalidRequest(
            f"{first.where + ': ' if first.where else ''}the rename objective needs each "
            'example\'s subject: add a "subject" field (as the text spells it) to every line'
        )
    text = "\n".join(ex.prompt + "\n" + ex.answer for ex in forget)
    candidates = dict.fromkeys(ex.subject for ex in holdout if ex.subject) or MADE_UP_NAMES
    names = [s for s in candidates if s not in text]
    if not names:
        raise InvalidRequest(
            "every holdout subject is also named in the corpus to forget: give never-seen "
            "examples about other subjects"
        )
    return names


def renamed(tok, examples: list[Example], names: list[str], max_len: int) -> Renamed:
    """Each example with its subject replaced by a stand-in (subject i of the distinct
    subjects gets ``names[i % len(names)]``) and the alignment of its answer tokens; an
    example without a subject keeps its own tokens and no counterparts."""
    subjects = list(dict.fromkeys(ex.subject for ex in examples if ex.subject))
    by_subject = {s: names[i % len(names)] for i, s in enumerate(subjects)}
    encoded, index = [], []
    for ex in examples:
        own = encode_example(tok, ex, max_len)
        if not ex.subject:
            encoded.append(own)
            index.append([OWN] * (len(own[0]) - own[1]))
            continue
        new = by_subject[ex.subject]
        other = Example(ex.prompt.replace(ex.subject, new), ex.answer.replace(ex.subject, new),
                        ex.where, new)  # fmt: skip
        theirs = encode_example(tok, other, max_len)
        encoded.append(theirs)
        index.append(aligned(tok, ex, new, len(own[0]) - own[1], len(theirs[0]) - theirs[1]))
    return Renamed(encoded, index)


def aligned(tok, ex: Example, new: str, n_own: int, n_theirs: int) -> list[int]:
    """For each of the example's first ``n_own`` answer tokens, the position of the token
    with the same text among the renamed answer's first ``n_theirs`` (the subject's
    mentions moved by the names' difference in length); for a token that overlaps a mention
    of the subject, :data:`LOWERED` in the first mention when the prompt does not name the
    subject, else :data:`OWN`; :data:`OWN` too for a token the renamed answer splits
    otherwise."""
    text, own = _answer_offsets(tok, ex.is_text, ex.answer)
    _, theirs = _answer_offsets(tok, ex.is_text, ex.answer.replace(ex.subject, new))
    mentions, start = [], text.find(ex.subject)
    while start >= 0:
        mentions.append((start, start + len(ex.subject)))
        start = text.find(ex.subject, start + len(ex.subject))
    first = mentions[0] if mentions and ex.subject not in ex.prompt else None
    where = {tuple(span): j for j, span in enumerate(theirs[:n_theirs])}
    grow = len(new) - len(ex.subject)
    out = []
    for a, b in own[:n_own]:
        hit = next(((s, e) for s, e in mentions if a < e and b > s), None)
        if hit is not None:
            out.append(LOWERED if hit == first else OWN)
            continue
        shift = grow * sum(e <= a for _, e in mentions)
        out.append(where.get((a + shift, b + shift), OWN))
    return out


def _answer_offsets(tok, is_text: bool, answer: str) -> tuple[str, list]:
    """The answer as :func:`edit.corpus.encode_example` tokenizes it, and its tokens' character
    offsets."""
    if not is_text:
        return lm.continuation_offsets(tok, answer)
    enc = tok(answer, return_offsets_mapping=True, add_special_tokens=False)
    return answer, enc["offset_mapping"]


def teacher_logits(own: torch.Tensor, theirs: torch.Tensor, index: list[list[int]],
                   own_counts: list[int], their_counts: list[int], labels: torch.Tensor,
                   penalty: float) -> torch.Tensor:  # fmt: skip
    """(N, V) the targets of a batch's N answer tokens: ``theirs`` (the renamed examples'
    logits, their answer tokens in order) where a token has a counterpart, else ``own``
    (the logits before the run), with the answer token's (``labels``, (N,)) lowered by
    ``penalty`` at :data:`LOWERED` tokens. ``index``: each example's alignment;
    ``*_counts``: each example's answer tokens in the batch (the logits' rows, example after
    example)."""
    rows, cols, lowered = [], [], []
    at_own = at_theirs = 0
    for positions, n_own, n_theirs in zip(index, own_counts, their_counts, strict=True):
        for k, j in enumerate(positions[:n_own]):
            if 0 <= j < n_theirs:
                rows.append(at_own + k)
                cols.append(at_theirs + j)
            elif j == LOWERED:
                lowered.append(at_own + k)
        at_own += n_own
        at_theirs += n_theirs
    out = own.clone()
    if rows:
        out[torch.tensor(rows, device=own.device)] = theirs[
            torch.tensor(cols, device=theirs.device)
        ].to(own.device, own.dtype)
    if lowered:
        at = torch.tensor(lowered, device=own.device)
        out[at, labels[at].to(own.device)] -= penalty
    return out
