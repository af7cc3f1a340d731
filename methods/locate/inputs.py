"""What a trace runs on: the kinds of state restored, the subject's tokens, the noise level
and the restored window, each checked before any forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edit import arch as arch_table
from edit import lm
from edit.errors import EditError

KINDS = ("resid", "mlp", "attn")
NOISE_MULTIPLIER = 3.0  # ν = 3 σ (ROME, §2)
WINDOW = 10  # layers restored together for "mlp" and "attn" (ROME)
_NOISE_REFERENCE_TOKENS = 20_000


def parse_kinds(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one kind, or a comma-separated list, as a tuple of kinds in KINDS order."""
    parts = kind.split(",") if isinstance(kind, str) else list(kind)
    parts = [p.strip().lower() for p in parts if p.strip()]
    if parts == ["all"]:
        return KINDS
    unknown = [p for p in parts if p not in KINDS]
    if unknown or not parts:
        raise EditError(f"unknown --kind {kind!r}: use all, mlp, attn or resid")
    return tuple(k for k in KINDS if k in parts)


def check_settings(samples: int, window: int, noise: float) -> None:
    """One-line errors for settings no trace can run with."""
    if samples < 1:
        raise EditError(f"samples must be >= 1, got {samples}")
    if window < 1:
        raise EditError(f"window must be >= 1, got {window}")
    if not noise >= 0:
        raise EditError(f"noise must be >= 0, got {noise}")


def noise_level(
    model: nn.Module,
    tok,
    subjects: Sequence[str] | None = None,
    multiplier: float = NOISE_MULTIPLIER,
) -> tuple[float, str]:
    """(ν, what σ was measured on): ``multiplier`` × the standard deviation of the embedding
    module's outputs over the tokens of ``subjects``, or over WikiText-2 tokens without."""
    if subjects:
        ids = [i for s in subjects for i in tok(s, add_special_tokens=False).input_ids]
        reference = f"the {len(ids)} subject tokens of {len(subjects)} facts"
    else:
        from edit.stats import corpus_text

        ids = tok(corpus_text()[:400_000], add_special_tokens=False).input_ids
        ids = ids[:_NOISE_REFERENCE_TOKENS]
        reference = f"{len(ids)} tokens of WikiText-2"
    embed = model.get_submodule(arch_table.lookup(model).embed)
    with torch.no_grad():
        e = embed(torch.tensor([ids], device=lm.device_of(model))).float()  # (1, n, d)
    return multiplier * float(e.std()), reference


def subject_range(tok, prompt: str, subject: str) -> tuple[str, int, int]:
    """(filled prompt, first, last + 1): the subject's token positions in ``lm.encode``."""
    text = prompt.format(subject)
    start = prompt.index("{}")
    end = start + len(subject)
    enc = tok(text, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hits:
        raise EditError(f"no token of {text!r} covers the subject {subject!r}")
    shift = len(lm.start_ids(tok))
    return text, hits[0] + shift, hits[-1] + 1 + shift


def window_layers(kind: str, layer: int, n_layers: int, window: int) -> list[int]:
    """The layers restored for (kind, layer): ROME's window l − w//2 … l + ⌈w/2⌉ − 1."""
    if kind == "resid":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))
