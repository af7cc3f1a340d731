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
* Asked forms (for an instruct model, how the fact is used): QS = share of questions where
  nll(new) < nll(old) after ``Question: …\nAnswer:``; CS = the same with the question as a
  user turn of the chat template and the answer opening the assistant's turn; CG = share of
  chat-template questions whose greedy answer names the new object or an alias
  (:func:`answer_contains`); MHS = CS on multi-hop questions whose answer the edits change
  (MQuAKE, Zhong et al. 2023), new answer against old.
* Chat replies (what a user reads; QAEdit in "The Mirage of Model Editing", ACL 2025, also
  evaluates edits on generated answers): the greedy chat reply to the fact's own question
  (48 tokens). RS = share of replies that name the subject; RN = that name the new object or
  an alias; RO = that name the old object or an alias (outside the subject's own name: "Ford"
  in "Ford Thunderbird" does not name Ford); RL = that loop (a word trigram three or more
  times, :func:`loops`); RE = that state the edit (subject and new object named, old not, no
  loop; :func:`reply_figures`); RU = share of replies to another record's question that the
  edit left unchanged, token for token.
* zsRE (Mitchell et al. 2022 and later work): teacher-forced top-1 token accuracy of the
  target after the question (efficacy) and its rephrasing (generalization); specificity =
  share of the locality answer's tokens whose top-1 prediction the edit left unchanged.
* TOFU (Maini et al. 2024), from the mean token NLLs of an answer, its paraphrase and its
  perturbed (wrong) versions after the question: the truth ratio
  R = exp(mean_k nll(perturbed_k) − nll(paraphrased)), i.e. the length-normalized probability
  of the paraphrased answer over the geometric mean of the perturbed ones' (what TOFU's
  evaluation code computes; its paper writes the inverse ratio, which orders cases the same
  way). Forget quality = p-value of the two-sample Kolmogorov–Smirnov test between the truth
  ratios of the unlearned and the retrained model on the forget set. Model utility = the
  harmonic mean of probability, ROUGE-L recall and truth-ratio score on the sets the model
  must keep. ROUGE-L recall = LCS(prediction, reference) / |reference| over lower-cased
  alphanumeric words (TOFU also stems words; this does not).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from edit import replies


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


def truth_ratio(nll_paraphrased: Sequence[float], nll_perturbed: np.ndarray) -> np.ndarray:
    """TOFU's truth ratio per question: exp(mean over k of nll_perturbed[:, k] − nll_para).
    Above 1: the model prefers the (paraphrased) true answer to the wrong ones."""
    para = np.asarray(nll_paraphrased, float)
    pert = np.asarray(nll_perturbed, float).reshape(len(para), -1)
    return np.exp(pert.mean(-1) - para)


def truth_ratio_score(ratios: Sequence[float]) -> float:
    """TOFU's utility score of truth ratios on sets the model should know:
    mean of max(0, 1 − 1/R) (0 when the wrong answers are at least as likely)."""
    r = np.asarray(ratios, float)
    return float(np.maximum(0.0, 1.0 - 1.0 / r).mean()) if r.size else float("nan")


def _ks_path(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """(i, j) = (#a ≤ v, #b ≤ v) at each distinct value v of the pooled samples."""
    values = np.unique(np.concatenate([a, b]))
    i = np.searchsorted(np.sort(a), values, side="right")
    j = np.searchsorted(np.sort(b), values, side="right")
    return list(zip(i.tolist(), j.tolist(), strict=True))


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov–Smirnov statistic D = max |F_a(v) − F_b(v)|."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n, m = len(a), len(b)
    return max(abs(i * m - j * n) for i, j in _ks_path(a, b)) / (n * m)


def ks_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided p-value of the two-sample KS test, P(D ≥ d_observed) when both samples
    come from one continuous distribution (every interleaving of the sorted samples equally
    likely). Counts the monotone lattice paths from (0, 0) to (n, m) that reach
    |i/n − j/m| ≥ d; integer arithmetic for the boundary, O(n·m) time."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n, m = len(a), len(b)
    if not n or not m:
        raise ValueError("the KS test needs two non-empty samples")
    bound = max(abs(i * m - j * n) for i, j in _ks_path(a, b))  # d·n·m, an integer
    if bound == 0:
        return 1.0
    # row[j] = probability that a uniform random path reaches (i, j) without having left the
    # band; what leaves it is added to ``p`` where it crosses, so small p-values are summed
    # rather than found as 1 minus something close to 1.
    p = 0.0
    prev: list[float] = []
    for i in range(n + 1):
        row = [0.0] * (m + 1)
        for j in range(m + 1):
            if i == 0 and j == 0:
                row[0] = 1.0
                continue
            inflow = 0.0
            if i > 0:  # from (i-1, j), whose next step took an a
                inflow += prev[j] * (n - i + 1) / (n - i + 1 + m - j)
            if j > 0:  # from (i, j-1), whose next step took a b
                inflow += row[j - 1] * (m - j + 1) / (n - i + m - j + 1)
            if abs(i * m - j * n) >= bound:
                p += inflow
            else:
                row[j] = inflow
        prev = row
    return min(1.0, p)


_ROUGE_WORD = re.compile(r"[a-z0-9]+")


def rouge_words(text: str) -> list[str]:
    """The words ROUGE compares: lower-cased runs of letters and digits."""
    return _ROUGE_WORD.findall(text.lower())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: length of the longest common word subsequence / reference words."""
    pred, ref = rouge_words(prediction), rouge_words(reference)
    if not ref:
        return float("nan")
    row = [0] * (len(pred) + 1)
    for r in ref:
        diag = 0
        for k, w in enumerate(pred, 1):
            diag, row[k] = row[k], (diag + 1 if w == r else max(row[k], row[k - 1]))
    return row[-1] / len(ref)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (TOFU's model utility aggregates this way)."""
    v = np.asarray(values, float)
    if not v.size:
        return float("nan")
    if (v <= 0).any():
        return 0.0
    return float(len(v) / (1.0 / v).sum())


def answer_contains(answer: str, names: Sequence[str]) -> bool:
    """Whether a generated answer names one of ``names`` (the object or its aliases), as
    whole words, case and punctuation aside (MQuAKE's accuracy on generated answers)."""
    return replies.names_any(answer, names)


def reply_figures(reply: str, subject: str, new: Sequence[str], old: Sequence[str]) -> dict:
    """RS, RN, RO, RL and RE (see the module docstring) of one reply, as 0.0 or 1.0:
    ``new``/``old`` are the new and the old object with their aliases
    (``edit.replies.reply_figures``, which the edit's own reply check reads too)."""
    return {k: float(v) for k, v in replies.reply_figures(reply, subject, new, old).items()}


# what each reported figure means, written into every result file
DEFINITIONS = {
    "ES": "share of records with mean-token NLL(new) < NLL(true) on the edit prompt",
    "EM": "mean of p(new) - p(true), p = exp(-mean token NLL), edit prompt",
    "PS": "as ES on the paraphrase prompts (mean within a record, then over records)",
    "PM": "as EM on the paraphrase prompts",
    "NS": "share of neighbourhood prompts where NLL(true answer) < NLL(new target)",
    "NM": "mean of p(true answer) - p(new target) on neighbourhood prompts",
    "KL": "mean KL(p_unedited || p_edited) of the next token after neighbourhood prompts (nats)",
    "GE": "generation entropy: mean over texts of mean(2/3 H2, 4/3 H3) of word n-grams (bits)",
    "PPL": "perplexity of held-out text (WikiText-2 test) under the model",
    "QS": "share of the record's questions (not given to the edit) with NLL(new) < NLL(true) "
    "after 'Question: ...\\nAnswer:', teacher-forced",
    "CS": "as QS with the question a user turn of the model's chat template, the answer opening "
    "the assistant's turn",
    "CG": "share of those chat questions whose greedy answer (16 tokens) names the new object "
    "or an alias",
    "MHS": "as CS on multi-hop questions through the edited fact (new answer against old)",
    "RS": "share of greedy chat replies (48 tokens) to the fact's own question that name the "
    "subject",
    "RN": "share of those replies that name the new object or an alias",
    "RO": "share of those replies that name the old object or an alias (outside the subject's "
    "own name)",
    "RL": "share of those replies that loop (a word trigram three or more times)",
    "RE": "share of those replies that state the edit: subject and new object named, old not, "
    "no loop",
    "RU": "share of greedy chat replies (48 tokens) to another record's question left unchanged, "
    "token for token",
    "zsRE_acc": "teacher-forced top-1 token accuracy of the new target after the question",
    "zsRE_gen": "the same after the rephrased question",
    "zsRE_loc": "share of the locality answer's tokens whose top-1 prediction is unchanged",
}
