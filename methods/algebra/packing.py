"""The value optimization's rows packed into fewer, fuller sequences.

A fact's rows differ in length: after its subject, a cloze prompt has a few tokens, a chat
row its question, the template's markers and the reply. Right-padded to the longest, two
thirds of every step's products ran on padding (ROME on SmolLM2: 10 rows of 18 columns for
67 tokens). Packed, several rows share one sequence: their prefixes side by side in the
key/value cache, their suffixes side by side after it, each token at its own position and
seeing only its own row's earlier tokens (a block-diagonal causal mask, passed to the model
as a ready 4-D mask). Sequences are filled first-fit, longest rows first, up to the
longest row's length.

Attention that takes no 4-D mask (flash attention), or layers that keep a sliding window of
the cache (Gemma 2/3), keep the padded rows: :func:`pack` then lays each row out as its own
sequence with the batch's own 2-D mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edit.lm import prefix_cache

# attention implementations that read a ready 4-D mask
_MASKABLE = ("eager", "sdpa")


@dataclass
class Packed:
    """Where each of a batch's rows runs: ``slot[r, c]`` is the flat index, into the
    (B·S) tokens of ``ids``, of column c of row r's suffix (-1 past its end)."""

    ids: torch.Tensor  # (B, S) the rows' suffixes side by side
    pos: torch.Tensor  # (B, S) each token's position in its own row
    mask: torch.Tensor  # (B, 1, S, P + S) 4-D, or (B, P + S) as the batch's own
    prefix_ids: torch.Tensor | None  # (B, P) the rows' prefixes side by side
    prefix_pos: torch.Tensor | None
    prefix_mask: torch.Tensor | None  # (B, 1, P, P), or (B, P)
    slot: torch.Tensor  # (R, S_rows)

    def prefix_cache(self, model: nn.Module):
        """The key/value cache of the prefixes (None when every lookup is at position 0)."""
        if self.prefix_ids is None:
            return None
        return prefix_cache(model, self.prefix_ids, self.prefix_mask, self.prefix_pos)

    def flat(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices into the packed tokens of the batch's (row, column) positions."""
        return self.slot[rows, cols]

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, column) of flat indices."""
        width = self.ids.shape[1]
        return flat // width, flat % width


def packs(model: nn.Module) -> bool:
    """Whether ``model``'s rows are packed: its attention reads a 4-D mask, and no layer
    keeps a sliding window of the cache (the packed prefixes may be longer than it)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in _MASKABLE:
        return False
    kinds = getattr(config.get_text_config(), "layer_types", None) or []
    return not any("sliding" in kind for kind in kinds)


def pack(batch, model: nn.Module) -> Packed:
    """``batch``'s rows (:class:`~edit.methods.algebra.batch.Batch`) packed for ``model``."""
    if not packs(model):
        return _unpacked(batch)
    width = batch.ids.shape[1]
    n_prefix = batch.prefix_ids.shape[1] if batch.prefix_ids is not None else 0
    suffix_len = batch.mask[:, n_prefix:].sum(1).tolist()
    prefix_len = (batch.prefix_mask.sum(1).tolist() if batch.prefix_ids is not None
                  else [0] * len(suffix_len))  # fmt: skip
    bins: list[list[int]] = []
    room: list[int] = []
    for r in sorted(range(len(suffix_len)), key=lambda r: -suffix_len[r]):
        b = next((i for i, left in enumerate(room) if left >= suffix_len[r]), None)
        if b is None:
            bins.append([])
            room.append(width)
            b = len(bins) - 1
        bins[b].append(r)
        room[b] -= suffix_len[r]
    s_width = max(sum(suffix_len[r] for r in rows) for rows in bins)
    p_width = max(sum(prefix_len[r] for r in rows) for rows in bins)
    device = batch.ids.device
    n_b = len(bins)
    ids = torch.zeros((n_b, s_width), dtype=batch.ids.dtype, device=device)
    pos = torch.zeros((n_b, s_width), dtype=torch.long, device=device)
    seg = torch.full((n_b, s_width), -1, dtype=torch.long, device=device)  # row of each token
    p_ids = torch.zeros((n_b, p_width), dtype=batch.ids.dtype, device=device)
    p_pos = torch.zeros((n_b, p_width), dtype=torch.long, device=device)
    p_seg = torch.full((n_b, p_width), -1, dtype=torch.long, device=device)
    slot = torch.full(batch.ids.shape, -1, dtype=torch.long, device=device)
    for b, rows in enumerate(bins):
        s_at = p_at = 0
        for r in rows:
            n, m = suffix_len[r], prefix_len[r]
            ids[b, s_at : s_at + n] = batch.ids[r, :n]
            pos[b, s_at : s_at + n] = batch.pos[r, :n]
            seg[b, s_at : s_at + n] = r
            slot[r, :n] = b * s_width + s_at + torch.arange(n, device=device)
            if m:
                p_ids[b, p_at : p_at + m] = batch.prefix_ids[r, n_prefix - m :]
                p_pos[b, p_at : p_at + m] = batch.prefix_pos[r, n_prefix - m :]
                p_seg[b, p_at : p_at + m] = r
            s_at, p_at = s_at + n, p_at + m
    prefix_sees = (seg[:, :, None] == p_seg[:, None, :]) & (seg[:, :, None] >= 0)
    with_prefix = p_width > 0
    as_mask = _as_4d(model)
    return Packed(
        ids=ids,
        pos=pos,
        mask=as_mask(torch.cat([prefix_sees, _own_row_causal(seg)], 2)),
        prefix_ids=p_ids if with_prefix else None,
        prefix_pos=p_pos if with_prefix else None,
        prefix_mask=as_mask(_own_row_causal(p_seg)) if with_prefix else None,
        slot=slot,
    )


def _own_row_causal(seg: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool from (B, N) rows of tokens (-1: padding): each token sees its own
    row's tokens up to itself; a padding token sees itself alone (a row of the mask with no
    key would give NaN, and NaN times a zero gradient is still NaN)."""
    order = torch.arange(seg.shape[1], device=seg.device)
    causal = order[None, :, None] >= order[None, None, :]  # key not after query
    own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    eye = order[None, :, None] == order[None, None, :]
    return (own & causal) | (eye & (seg < 0)[:, :, None])


def _as_4d(model: nn.Module):
    """How ``model``'s attention reads a ready 4-D mask, as its own masks are made: boolean
    for PyTorch's fused attention (True where a query sees a key), additive float32 for the
    plain one (0 there, else the least float)."""
    if model.config._attn_implementation == "sdpa":
        return lambda sees: sees[:, None]

    def additive(sees: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(sees.shape, dtype=torch.float32, device=sees.device)
        return out.masked_fill_(~sees, torch.finfo(torch.float32).min)[:, None]

    return additive


def _unpacked(batch) -> Packed:
    """Each row its own sequence, right-padded, with the batch's own 2-D masks."""
    n_rows, width = batch.ids.shape
    flat = torch.arange(n_rows * width, device=batch.ids.device).view(n_rows, width)
    return Packed(
        ids=batch.ids,
        pos=batch.pos,
        mask=batch.mask,
        prefix_ids=batch.prefix_ids,
        prefix_pos=batch.prefix_pos,
        prefix_mask=batch.prefix_mask,
        slot=flat,
    )
