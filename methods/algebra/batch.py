"""The rows the value optimization runs, for all facts of a chunk at once, and the per-fact
means over them.

Every rewriting row of every fact (:class:`~edit.methods.algebra.contexts.Contexts`), then one
essence (KL) row per fact, split at each row's subject's last token; :meth:`Batch.keep` cuts
out the rows of facts that finished. The reductions turn per-row or per-token quantities into
one per fact.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass

import torch

from edit.facts import Fact
from edit.lm import (
    encode,
    encode_continuation,
    last_token_of_span,
    mentions_in_continuation,
    pad_id,
    right_pad,
    subject_last_index,
)
from edit.methods.algebra.contexts import Contexts
from edit.questions import chat_prompt

ESSENCE_PROMPT = "{} is a"  # ROME's KL prompt: what the subject is, kept while editing
# asked in the chat template, the unedited reply to this is kept token by token while editing
# (``chat_essence``): the subject stays itself where the model is used
ESSENCE_QUESTION = "What do you know about {}?"


@dataclass
class Batch:
    """Every row the value optimization runs, for all facts at once, split at each row's
    subject's last token (its lookup position, where δ is added).

    The tokens before the lookup never change with δ (the model is causal), so they run once,
    without gradients, into a key/value cache (``prefix_*``, left-padded so that every row's
    lookup is the first token of ``ids``); each optimization step runs only ``ids``, the
    tokens from the lookup on, and backpropagates through them alone.
    """

    ids: torch.Tensor  # (R, S) each row from its lookup token on, right-padded
    mask: torch.Tensor  # (R, P + S) attention mask over prefix and suffix
    pos: torch.Tensor  # (R, S) position ids of ``ids``
    prefix_ids: torch.Tensor | None  # (R, P) the tokens before the lookup, left-padded
    prefix_mask: torch.Tensor | None  # (R, P)
    prefix_pos: torch.Tensor | None  # (R, P)
    fact: torch.Tensor  # (R,) which fact a row belongs to
    rewrite: torch.Tensor  # (R,) bool: a rewriting row (else an essence/KL row)
    weight: torch.Tensor  # (R,) share of its fact's loss and key (0 for essence rows)
    tgt_row: torch.Tensor  # (T,) row of each supervised target position
    tgt_col: torch.Tensor  # (T,) column of ``ids`` whose next-token logits predict it
    tgt_tok: torch.Tensor  # (T,) the target token
    tgt_first: torch.Tensor  # (T,) bool: the first token of the target
    tgt_object: torch.Tensor  # (T,) bool: a token of the object (all where none is marked)
    tgt_after_object: torch.Tensor  # (T,) bool: after the object's last token (a sentence's end)
    kl_row: torch.Tensor  # (K,) row of each essence (KL) position
    kl_col: torch.Tensor  # (K,) column of ``ids`` whose next-token distribution is kept
    kl_fact: torch.Tensor  # (K,) the fact it belongs to
    kl_weight: torch.Tensor  # (K,) its share of the fact's KL (each essence row sums to 1)
    # (M,) row and column of ``ids`` of each later mention of the subject in a row's reply
    # (its last token): with ``remention`` δ is added there too, as the written edit acts
    mention_row: torch.Tensor
    mention_col: torch.Tensor
    # (Q,) the ranked pairs (``Contexts.rank_weight``): the rows of the new and of the old
    # object after one asked form, the pair's share of its fact's loss, and that fact
    pair_new: torch.Tensor
    pair_old: torch.Tensor
    pair_weight: torch.Tensor
    pair_fact: torch.Tensor

    def keep(self, facts: torch.Tensor) -> Batch:
        """The rows of the facts flagged in ``facts`` (bool, one per fact of this batch),
        renumbered in order."""
        rows = facts[self.fact]  # (R,) bool
        new_row = torch.cumsum(rows, 0) - 1  # row index in the kept batch
        new_fact = torch.cumsum(facts, 0) - 1
        tgt = rows[self.tgt_row]
        kl = facts[self.kl_fact]
        mention = rows[self.mention_row]
        pair = rows[self.pair_new]
        kept_rows = rows.nonzero()[:, 0]

        def sub(x):
            return None if x is None else x[kept_rows]

        return dataclasses.replace(
            self,
            ids=self.ids[kept_rows],
            mask=self.mask[kept_rows],
            pos=self.pos[kept_rows],
            prefix_ids=sub(self.prefix_ids),
            prefix_mask=sub(self.prefix_mask),
            prefix_pos=sub(self.prefix_pos),
            fact=new_fact[self.fact[kept_rows]],
            rewrite=self.rewrite[kept_rows],
            weight=self.weight[kept_rows],
            tgt_row=new_row[self.tgt_row[tgt]],
            tgt_col=self.tgt_col[tgt],
            tgt_tok=self.tgt_tok[tgt],
            tgt_first=self.tgt_first[tgt],
            tgt_object=self.tgt_object[tgt],
            tgt_after_object=self.tgt_after_object[tgt],
            kl_row=new_row[self.kl_row[kl]],
            kl_col=self.kl_col[kl],
            kl_fact=new_fact[self.kl_fact[kl]],
            kl_weight=self.kl_weight[kl],
            mention_row=new_row[self.mention_row[mention]],
            mention_col=self.mention_col[mention],
            pair_new=new_row[self.pair_new[pair]],
            pair_old=new_row[self.pair_old[pair]],
            pair_weight=self.pair_weight[pair],
            pair_fact=new_fact[self.pair_fact[pair]],
        )


def build_batch(tok, facts: list[Fact], templates, device, replies=None) -> Batch:
    """The rows of ``templates`` (a :class:`Contexts`, or cloze templates alone) for every
    fact, then its essence (KL) rows: ROME's ``"{} is a"`` (one position), and with
    ``replies`` (per fact, the unedited chat reply to :data:`ESSENCE_QUESTION`, or None) that
    question in the chat template followed by the reply (a position per reply token)."""
    contexts = Contexts.of(templates)
    seqs, fact_of, lookup, rewrite, weight = [], [], [], [], []
    t_row, t_col, t_tok, t_first, t_object, t_after = [], [], [], [], [], []
    m_row, m_col = [], []
    pairs: list[tuple[int, int, int]] = []  # (new object's row, old object's row, fact)
    for f, fact in enumerate(facts):
        for row in contexts.rows(tok, fact):
            r = len(seqs)
            if row.rank < 0:  # the old object's row follows its pair's new one
                pairs.append((r - 1, r, f))
            seqs.append(row.ids + row.target[:-1])
            cols = _mention_cols(row.mentions, len(row.ids), len(row.target), row.lookup)
            m_row += [r] * len(cols)
            m_col += cols
            fact_of.append(f)
            lookup.append(row.lookup)
            rewrite.append(not row.rank)
            weight.append(row.weight)
            for j, t in enumerate(row.target):
                t_row.append(r)
                t_col.append(len(row.ids) - 1 + j - row.lookup)
                t_tok.append(t)
                t_first.append(j == 0)
                t_object.append(not row.objects or j in row.objects)
                t_after.append(bool(row.objects) and j > max(row.objects))
    kl_row, kl_col, kl_fact, kl_weight = [], [], [], []
    for f, fact in enumerate(facts):
        essence = [_essence_row(tok, ESSENCE_PROMPT, fact.subject, None)]
        if replies is not None and replies[f]:
            essence.append(_essence_row(tok, ESSENCE_QUESTION, fact.subject, replies[f]))
        for e in essence:
            if e is None:
                continue
            ids, idx, n_kept, mentions = e
            first = len(ids) - n_kept  # the kept positions are the row's last n_kept
            cols = _mention_cols(mentions, first + 1, n_kept, idx)  # the reply is the target
            m_row += [len(seqs)] * len(cols)
            m_col += cols
            for col in range(first, len(ids)):
                kl_row.append(len(seqs))
                kl_col.append(col - idx)
                kl_fact.append(f)
                kl_weight.append(1.0 / n_kept)
            seqs.append(ids)
            fact_of.append(f)
            lookup.append(idx)
            rewrite.append(False)
            weight.append(0.0)

    per_fact = collections.Counter(p[2] for p in pairs)  # a fact's pairs share rank_weight
    pad, width = pad_id(tok), max(lookup)
    prefix = [[pad] * (width - i) + seq[:i] for seq, i in zip(seqs, lookup, strict=True)]
    p_mask = [[0] * (width - i) + [1] * i for i in lookup]
    p_pos = [[0] * (width - i) + list(range(i)) for i in lookup]
    ids, s_mask = right_pad([seq[i:] for seq, i in zip(seqs, lookup, strict=True)], pad, device)
    steps = torch.arange(ids.shape[1], device=device)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    with_prefix = width > 0
    return Batch(
        ids=ids,
        mask=torch.cat([t(p_mask), s_mask], 1) if with_prefix else s_mask,
        pos=t(lookup)[:, None] + steps,
        prefix_ids=t(prefix) if with_prefix else None,
        prefix_mask=t(p_mask) if with_prefix else None,
        prefix_pos=t(p_pos) if with_prefix else None,
        fact=t(fact_of),
        rewrite=t(rewrite, torch.bool),
        weight=t(weight, torch.float32),
        tgt_row=t(t_row),
        tgt_col=t(t_col),
        tgt_tok=t(t_tok),
        tgt_first=t(t_first, torch.bool),
        tgt_object=t(t_object, torch.bool),
        tgt_after_object=t(t_after, torch.bool),
        kl_row=t(kl_row),
        kl_col=t(kl_col),
        kl_fact=t(kl_fact),
        kl_weight=t(kl_weight, torch.float32),
        mention_row=t(m_row),
        mention_col=t(m_col),
        pair_new=t([p[0] for p in pairs]),
        pair_old=t([p[1] for p in pairs]),
        pair_weight=t([contexts.rank_weight / per_fact[p[2]] for p in pairs], torch.float32),
        pair_fact=t([p[2] for p in pairs]),
    )


def _mention_cols(mentions, n_prompt: int, n_target: int, lookup: int) -> list[int]:
    """Columns of a row's ``ids`` (which start at its lookup) of the subject's later
    mentions, given as indices in its target (``n_target`` tokens after ``n_prompt``); a
    mention at the target's last token is never an input, so it has none."""
    return [n_prompt + j - lookup for j in mentions if j < n_target - 1]


def _essence_row(tok, template: str, subject: str, reply: str | None):
    """(ids, subject's last token, positions kept, the subject's later mentions) of an
    essence row: ``template`` read plainly (its next token kept), or asked in the chat
    template with ``reply`` after it (the next token kept after the prompt and after each
    reply token but the last; the reply's mentions of the subject as indices in the reply's
    tokens); None when the tokenizer has no chat template or the subject cannot be found in
    it."""
    if reply is None:
        text, idx = subject_last_index(tok, template, subject)
        return encode(tok, text), idx, 1, []
    question = template.format(subject)
    text = chat_prompt(tok, question)
    if text is None or question not in text:
        return None
    end = text.rindex(question) + question.index(subject) + len(subject)
    answer = encode_continuation(tok, reply, after=text)
    if not answer:
        return None
    mentions = mentions_in_continuation(tok, reply, subject, after=text)
    return (
        encode(tok, text) + answer[:-1],
        last_token_of_span(tok, text, end),
        len(answer),
        mentions,
    )


def mean_by_group(x: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of a 1-D ``x`` per group index (groups with no members give 0)."""
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, torch.ones_like(x))
    return total / count.clamp_min(1)


def weighted_by_fact(x: torch.Tensor, w: torch.Tensor, fact: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the rows of ``x`` (R, d) weighted by ``w`` (R,) per fact → (n, d): a weighted
    mean where each fact's weights sum to 1."""
    total = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device)
    return total.index_add(0, fact, x * w.to(x.dtype)[:, None])


def mean_by_fact(x: torch.Tensor, fact: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (R, d) per fact → (n, d)."""
    total = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device).index_add(0, fact, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(
        0, fact, torch.ones(len(fact), dtype=x.dtype, device=x.device)
    )
    return total / count.clamp_min(1)[:, None]
