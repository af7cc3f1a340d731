"""Scoring answers: log π(y|x) and |y| of each example, batched, and the NLL summaries a run
reports (``<set>_nll``, ``_prob``, ``_token_prob``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edit import lm
from edit.corpus import Example, collate, encode_example, labelled_logits


def forward_scores(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(y|x) (B,), |y| (B,), next-token logits at the label positions (N, V)).

    The unembedding runs only at the N label positions (:func:`edit.lm.unembed`).
    """
    rows, logits, targets = labelled_logits(model, ids, mask, labels)
    tok_logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0].to(ids.device)
    batch = ids.shape[0]
    logp = torch.zeros(batch, device=ids.device, dtype=tok_logp.dtype).index_add(0, rows, tok_logp)
    n_tokens = torch.bincount(rows, minlength=batch)
    return logp, n_tokens, logits


class Forward(nn.Module):
    """Every forward pass of a training run as one module, so that accelerate can wrap it
    (DDP, FSDP, DeepSpeed) and each pass goes through the wrapper: a call scores a list of
    (ids, mask, labels) batches with :func:`forward_scores`. A step is one call, so that DDP
    sees one forward pass per backward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model  # the model with the adapter injected (peft works in place)

    def forward(self, *batches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        return [forward_scores(self.lm, *batch) for batch in batches]


@torch.no_grad()
def batched_scores(
    model: nn.Module,
    encoded: list[tuple[list[int], int]],
    pad: int,
    batch_size: int,
    forward: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x) (n,), |y| (n,)) on the CPU, in batches; ``forward(ids, mask, labels)``
    gives (log π(y|x), |y|, logits) of a batch (default: :func:`forward_scores`)."""
    device = lm.device_of(model)
    forward = forward or (lambda *batch: forward_scores(model, *batch))
    logps, counts = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad)
        logp, n, _ = forward(*(t.to(device) for t in batch))
        logps.append(logp.cpu())
        counts.append(n.cpu())
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(counts)


def answer_scores(
    model: nn.Module, tok, examples: list[Example], *, batch_size: int = 16, max_len: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x) (n,), |y| (n,)) of each example's answer (or text), batched, no grad."""
    encoded = [encode_example(tok, ex, max_len) for ex in examples]
    return batched_scores(model, encoded, lm.pad_id(tok), batch_size)


def answer_nll(
    model: nn.Module, tok, examples: list[Example], *, batch_size: int = 16, max_len: int = 256
) -> float:
    """Mean over examples of each answer's mean token NLL (the loss the trainer sees)."""
    logp, n = answer_scores(model, tok, examples, batch_size=batch_size, max_len=max_len)
    return float((-logp / n.clamp(min=1)).mean())


def score_summary(prefix: str, logp: torch.Tensor, n: torch.Tensor) -> dict[str, float | None]:
    if len(logp) == 0:
        return {f"{prefix}_nll": None}
    nll = -logp / n.clamp(min=1)
    out: dict[str, float | None] = {f"{prefix}_nll": float(nll.mean())}
    if prefix != "retain":
        out[f"{prefix}_prob"] = float(logp.exp().mean())  # P(y|x), whole answer
        out[f"{prefix}_token_prob"] = float((-nll).exp().mean())  # P(y|x)^(1/|y|), as TOFU
    return out
