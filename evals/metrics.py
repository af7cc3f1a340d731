"""The metrics of the editing literature, each defined once, on plain numbers.

Probabilities of a target string are teacher-forced: the target's tokens are scored after
the prompt and ``nll`` is their *mean* negative log-likelihood, as in ROME's and MEMIT's
evaluation code. ``p = exp(-nll)``.

* Efficacy (Meng et al. 2022): ES = share of cases with nll(new) < nll(true) on the edit
  prompt; EM = mean of p(new) − p(true).
* Generalization: PS / PM, the same on paraphrase prompts (averaged within a record first).
* Locality: NS = share of neighbourhood prompts where the true object still beats the new
  one, nll(true) < nll(new); NM = mean of p(true) − p(new); and the KL divergence
  KL(p_unedited ‖ p_edited) of the next-token distribution at the end of each neighbourhood
  prompt.
* Fluency: generation entropy (ROME's "GE"): for each generated text, the entropies H₂, H₃ of
  its word bigram and trigram frequency distributions (bits), combined as the arithmetic mean
  of (2/3)·H₂ and (4/3)·H₃, then averaged over texts. Perplexity = exp(mean token NLL) of
  held-out text.
* zsRE (Mitchell et al. 2022 and later work): teacher-forced top-1 token accuracy of the
  target after the question (efficacy) and its rephrasing (generalization); specificity =
  share of the locality answer's tokens whose top-1 prediction the edit left unchanged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np


def success(nll_wanted: Sequence[float], nll_other: Sequence[float]) -> float:
    """Share of pairs where the wanted target is more likely (lower mean NLL) than the other."""
    a, b = np.asarray(nll_wanted, float), np.asarray(nll_other, float)
    return float((a < b).mean()) if a.size else float("nan")


def magnitude(nll_wanted: Sequence[float], nll_other: Sequence[float]) -> float:
    """Mean of p(wanted) − p(other) with p = exp(−mean token NLL)."""
    a, b = np.asarray(nll_wanted, float), np.asarray(nll_other, float)
    return float((np.exp(-a) - np.exp(-b)).mean()) if a.size else float("nan")


def kl_divergence(logp_ref: np.ndarray, logp_new: np.ndarray) -> float:
    """Mean over rows of KL(p_ref ‖ p_new) for log-probability rows (N, V), in nats."""
    p = np.exp(logp_ref)
    return float((p * (logp_ref - logp_new)).sum(-1).mean())


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of word n-grams in ``text``."""
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if not total:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in grams.values())


def generation_entropy(texts: Sequence[str]) -> float:
    """ROME's generation entropy: mean over texts of mean((2/3)·H₂, (4/3)·H₃)."""
    if not texts:
        return float("nan")
    per_text = [np.mean([2 / 3 * ngram_entropy(t, 2), 4 / 3 * ngram_entropy(t, 3)]) for t in texts]
    return float(np.mean(per_text))


def perplexity(token_nlls: Sequence[float]) -> float:
    """exp of the mean token negative log-likelihood."""
    return float(math.exp(float(np.mean(token_nlls))))


def token_accuracy(hits: Sequence[bool]) -> float:
    """Share of target tokens predicted top-1 under teacher forcing."""
    h = np.asarray(hits, bool)
    return float(h.mean()) if h.size else float("nan")


def percentile_summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, float)
    if not v.size:
        return {"median": None, "p90": None, "mean": None}
    return {
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "mean": float(v.mean()),
    }
