"""Membership inference: does the model still treat the forget set as training data?

    stats = token_stats(model, tok, forget_examples)        # per example: token log-probs …
    scores = {name: score(stats) for name, score in SCORES.items()}
    auc(scores_forget, scores_holdout)                     # 0.5: cannot be told apart

Each score is larger for text the model is more likely to have trained on ("member"):

* ``loss``    −mean token NLL (Yeom et al. 2018).
* ``zlib``    −(summed token NLL) / (zlib-compressed length of the text in bytes): the
              likelihood relative to a generic compressor (Carlini et al. 2021).
* ``min_k``   Min-K% Prob (Shi et al. 2024): mean log-probability of the k % least likely
              tokens (k = 20).
* ``min_k_pp`` Min-K%++ (Zhang et al. 2024): the same over token scores standardized by the
              model's own next-token distribution, (log p(x_t) − μ_t) / σ_t with μ_t, σ_t the
              mean and standard deviation of log p(·) under p(·) at that position.

The tokens scored are those the trainer puts loss on (:mod:`edit.corpus`): the answer of a
question/answer example, every token of a text. AUC is the ROC area of forget (positives)
against holdout (negatives) scores: the Mann–Whitney probability that a random forget example
scores above a random holdout one, ties counted one half.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edit import lm
from edit.corpus import Example, collate, encode_example, labelled_logits

MIN_K = 0.2  # share of tokens Min-K% and Min-K%++ average over


@dataclass
class TokenStats:
    """One example's scored tokens."""

    text: str  # the scored text (answer or whole text), for zlib
    logp: np.ndarray  # (L,) log p(x_t | x_<t)
    mu: np.ndarray  # (L,) E_{z~p}[log p(z)] at each position
    sigma: np.ndarray  # (L,) its standard deviation


@torch.no_grad()
def token_stats(
    model, tok, examples: list[Example], *, batch_size: int = 16, max_len: int = 256
) -> list[TokenStats]:
    device = lm.device_of(model)
    encoded = [encode_example(tok, ex, max_len) for ex in examples]
    out: list[TokenStats] = []
    for start in range(0, len(encoded), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(encoded[start : start + batch_size],
                                                           lm.pad_id(tok)))  # fmt: skip
        rows, logits, targets = labelled_logits(model, ids, mask, labels)
        logp_all = torch.log_softmax(logits, -1)  # (N, V)
        picked = logp_all.gather(1, targets[:, None])[:, 0]
        rows = rows.to(picked.device)
        p = logp_all.exp()
        mu = (p * logp_all).sum(-1)
        sigma = ((p * logp_all.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
        counts = torch.bincount(rows, minlength=ids.shape[0]).tolist()
        parts = zip(picked.split(counts), mu.split(counts), sigma.split(counts), strict=True)
        for i, (lp, m, s) in enumerate(parts):
            ex = examples[start + i]
            out.append(TokenStats(ex.answer, lp.cpu().numpy(), m.cpu().numpy(), s.cpu().numpy()))
    return out


def _lowest_mean(x: np.ndarray, k: float) -> float:
    n = max(1, int(len(x) * k))
    return float(np.sort(x)[:n].mean())


def loss_score(s: TokenStats) -> float:
    return float(s.logp.mean())


def zlib_score(s: TokenStats) -> float:
    return float(s.logp.sum()) / len(zlib.compress(s.text.encode("utf-8")))


def min_k_score(s: TokenStats, k: float = MIN_K) -> float:
    return _lowest_mean(s.logp, k)


def min_k_pp_score(s: TokenStats, k: float = MIN_K) -> float:
    return _lowest_mean((s.logp - s.mu) / s.sigma, k)


SCORES: dict[str, Callable[[TokenStats], float]] = {
    "loss": loss_score,
    "zlib": zlib_score,
    "min_k": min_k_score,
    "min_k_pp": min_k_pp_score,
}


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC = P(score(positive) > score(negative)) + ½·P(tie)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not pos.size or not neg.size:
        raise ValueError("AUC needs at least one positive and one negative score")
    # for each positive, the negatives below it and those equal to it, by binary search in
    # the sorted negatives: O((n + m) log m), so that a bootstrap of thousands stays cheap
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


def scores(stats: list[TokenStats]) -> dict[str, list[float]]:
    """Every score of :data:`SCORES` for each example, in example order."""
    return {name: [f(s) for s in stats] for name, f in SCORES.items()}


def aucs(forget: list[TokenStats], holdout: list[TokenStats]) -> dict[str, float]:
    """AUC of every score in :data:`SCORES`, forget set as members."""
    f, h = scores(forget), scores(holdout)
    return {name: auc(f[name], h[name]) for name in SCORES}


def privacy_leakage(auc_model: float, auc_reference: float) -> float:
    """MUSE's PrivLeak in percent: (AUC − AUC_reference) / AUC_reference · 100. Near 0: the
    model's membership signal matches a model that never trained on the forget set; large
    positive: it still remembers (under-unlearning); large negative: over-unlearning."""
    return 100.0 * (auc_model - auc_reference) / auc_reference
