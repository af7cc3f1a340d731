"""TOFU's evaluation (Maini et al. 2024): forget quality and model utility of a model.

    forget = read_qa("tofu/forget01.json")                  # edit.readers.tofu: list[QA]
    scores = score_set(model, tok, forget, "forget")        # NLLs, generations, ROUGE-L
    forget_quality(scores, reference_scores)                # KS p-value of the truth ratios
    model_utility({"retain": ..., "real_authors": ..., "world_facts": ...})

A question is scored the way training reads it (:mod:`edit.corpus`): the question is the
prompt and every answer is a continuation of it, so the NLLs below are those the LoRA
trainer minimizes. Per question: the mean token NLL of the answer, of its paraphrase (sets
without one, the real-author and world-fact sets, use the answer itself, as TOFU does) and
of each perturbed answer, and the ROUGE-L recall of the greedy answer. The metric
definitions are in :mod:`edit.evals.metrics`.

Model utility is TOFU's harmonic mean of nine numbers, three per set: probability (sets with
a paraphrase: mean exp(−nll(answer)); multiple-choice sets: mean of p(answer) over p(answer)
+ Σ p(perturbed), p = exp(−nll)), ROUGE-L recall, and the truth-ratio score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edit import lm
from edit.errors import EditError
from edit.evals import metrics
from edit.readers.tofu import QA

UTILITY_SETS = ("retain", "real_authors", "world_facts")


@dataclass
class SetScores:
    """Scores of one model on one QA set (arrays over questions)."""

    name: str
    answer_nll: np.ndarray  # (N,) mean token NLL of the answer
    paraphrased_nll: np.ndarray  # (N,) of the paraphrase (the answer where there is none)
    perturbed_nll: np.ndarray  # (N, K) of each perturbed answer
    multiple_choice: bool  # no paraphrases: probability is normalized over the options
    generations: list[str] = field(default_factory=list)
    rouge: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) ROUGE-L recall

    def truth_ratios(self) -> np.ndarray:
        return metrics.truth_ratio(self.paraphrased_nll, self.perturbed_nll)

    def probability(self) -> float:
        p_true = np.exp(-self.answer_nll)
        if not self.multiple_choice:
            return float(p_true.mean())
        p_all = p_true + np.exp(-self.perturbed_nll).sum(-1)
        return float((p_true / p_all).mean())

    def summary(self) -> dict[str, float]:
        return {
            "probability": self.probability(),
            "rouge_l": float(self.rouge.mean()) if self.rouge.size else float("nan"),
            "truth_ratio_score": metrics.truth_ratio_score(self.truth_ratios()),
            "truth_ratio_median": float(np.median(self.truth_ratios())),
        }


def score_set(
    model, tok, items: list[QA], name: str, *, max_new_tokens: int = 48, batch_size: int = 32
) -> SetScores:
    """Teacher-forced NLLs of every answer variant, and greedy answers with their ROUGE-L
    recall against the answer (``max_new_tokens`` 0: no generation)."""
    k = min(len(it.perturbed) for it in items)
    prompts, conts = [], []
    for it in items:
        for c in (it.answer, it.paraphrased or it.answer, *it.perturbed[:k]):
            prompts.append(it.question)
            conts.append(c)
    scores = lm.continuation_scores(model, tok, prompts, conts, batch_size=batch_size)
    nll = np.array([s.mean_nll for s in scores]).reshape(len(items), 2 + k)
    out = SetScores(
        name,
        answer_nll=nll[:, 0],
        paraphrased_nll=nll[:, 1],
        perturbed_nll=nll[:, 2:],
        multiple_choice=all(it.paraphrased is None for it in items),
    )
    if max_new_tokens > 0:
        out.generations = lm.greedy(
            model, tok, [it.question for it in items], max_new_tokens, batch_size=batch_size
        )
        pairs = zip(out.generations, items, strict=True)
        out.rouge = np.array([metrics.rouge_l_recall(g, it.answer) for g, it in pairs])
    return out


def forget_quality(unlearned: SetScores, reference: SetScores) -> float:
    """p-value of the KS test between the forget-set truth ratios of the unlearned model and
    of the reference trained without the forget set (high: they cannot be told apart)."""
    return metrics.ks_pvalue(unlearned.truth_ratios(), reference.truth_ratios())


def model_utility(sets: dict[str, SetScores]) -> tuple[float, dict[str, float]]:
    """(harmonic mean, its nine parts named ``<set>_<metric>``) over :data:`UTILITY_SETS`."""
    missing = [s for s in UTILITY_SETS if s not in sets]
    if missing:
        raise EditError(f"model utility needs the sets {', '.join(missing)}")
    parts = {}
    for name in UTILITY_SETS:
        s = sets[name].summary()
        for key in ("probability", "rouge_l", "truth_ratio_score"):
            parts[f"{name}_{key}"] = s[key]
    return metrics.harmonic_mean(list(parts.values())), parts
