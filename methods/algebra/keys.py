"""Key passes: per fact, the weighted mean over its rewriting rows of a module's input (the
key k*) and of a block's output, at the subject's last token, without gradients.

Rows that share opening tokens (a context template's prefix, a chat template's opening) run
those tokens once into a key/value cache; every row stops at the hooked block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edit.facts import Fact
from edit.hooks import StopForward
from edit.lm import cache_kwarg, device_of, empty_cache, pad_id, right_pad
from edit.methods.algebra.contexts import Contexts

MAX_ROWS = 256  # prompt rows per forward/backward pass: bounds memory for large batches


def _shared_length(rows: list[list[int]]) -> int:
    """Length of the longest token prefix common to all rows, leaving each row ≥ 1 token."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


@torch.no_grad()
def keys_and_hidden(
    model: nn.Module,
    tok,
    facts: list[Fact],
    templates,
    module: str,
    block: str,
    max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact, the weighted mean over its rewriting rows (``templates``: a
    :class:`Contexts`, or cloze templates alone) of (the input of ``module``, the output of
    the transformer block ``block``) at the subject's last token: (F, d_in), (F, d).

    The rows are run group by group (one context template, or one asked form): the tokens
    that all rows of a group share (the start token and the sampled prefix text, or the chat
    template's opening) run once into a key/value cache, and each row continues it only up to
    its lookup token and only up to ``block`` (``module`` must hold it or run before it;
    ``block == module`` gives the keys and the module's own output): nothing later can
    change either. No gradients."""
    device = device_of(model)
    pad = pad_id(tok)
    contexts = Contexts.of(templates)
    groups: dict[tuple, list] = {}  # group -> [(fact, row up to its lookup, weight)]
    for f, fact in enumerate(facts):
        for row in contexts.rows(tok, fact):
            if not row.rank:  # a ranked row has no share of the key
                groups.setdefault(row.group, []).append((f, row.ids[: row.lookup + 1], row.weight))
    keys = hidden = None
    captured: dict[str, torch.Tensor] = {}

    def key(_m, inputs):
        captured["k"] = inputs[0]

    def grab(_m, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise StopForward  # the rest of the model cannot change k or h

    # the key is read as ``module`` starts: it may hold ``block`` (an MLP and its output
    # projection), whose hook ends the pass before ``module`` returns
    key_handle = model.get_submodule(module).register_forward_pre_hook(key)
    handle = model.get_submodule(block).register_forward_hook(grab)
    try:
        for members in groups.values():
            rows = [m[1] for m in members]
            fact_of = torch.tensor([m[0] for m in members], device=device)
            weight = torch.tensor([m[2] for m in members], device=device)
            shared = _shared_length(rows)
            head = None
            if shared:  # the shared tokens, run once up to ``block`` into a cache
                head = empty_cache(model)
                _run_to_lookup(model, [rows[0][:shared]], 0, head, pad, device)
            for start in range(0, len(rows), max_rows):
                chunk = rows[start : start + max_rows]
                cache = None
                if head is not None:  # one copy of the shared tokens' cache per row
                    cache = copy.deepcopy(head)
                    cache.batch_repeat_interleave(len(chunk))
                captured.clear()
                at = _run_to_lookup(model, chunk, shared, cache, pad, device)
                if "h" not in captured:
                    raise RuntimeError(f"{block} did not run in the forward pass")
                x, y = captured["k"], captured["h"]  # on the devices their layers live on
                k = x.reshape(-1, x.shape[-1])[at.to(x.device)].float().to(device)
                h = y.reshape(-1, y.shape[-1])[at.to(y.device)].float().to(device)
                if keys is None:
                    keys = torch.zeros((len(facts), k.shape[1]), device=device)
                    hidden = torch.zeros((len(facts), h.shape[1]), device=device)
                w = weight[start : start + len(chunk), None]
                keys.index_add_(0, fact_of[start : start + len(chunk)], k * w)
                hidden.index_add_(0, fact_of[start : start + len(chunk)], h * w)
    finally:
        handle.remove()
        key_handle.remove()
    return keys, hidden


def _run_to_lookup(model, rows, shared, cache, pad, device) -> torch.Tensor:
    """Run rows on from their first ``shared`` tokens, which ``cache`` holds (one row each),
    right-padded (the real tokens stay next to the cache, as sliding-window attention needs),
    until the stop hook; the rows' own tokens are added to ``cache`` (None: no cache).
    Returns the flat index of each row's last token, its lookup."""
    ids, own = right_pad([r[shared:] for r in rows], pad, device)
    pos = shared + torch.arange(ids.shape[1], device=device).expand_as(ids)
    mask = torch.cat([torch.ones((len(rows), shared), dtype=own.dtype, device=device), own], 1)
    extra = {"use_cache": False} if cache is None else {cache_kwarg(model): cache,
                                                         "use_cache": True}  # fmt: skip
    try:
        model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
    except StopForward:
        pass
    return torch.arange(len(rows), device=device) * ids.shape[1] + own.sum(1) - 1
