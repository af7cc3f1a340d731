"""Counterfactual-rewrite metrics (Meng et al. 2022, §4.2 and Appendix; CounterFact).

All probabilities are teacher-forced: for a prompt and a target string, the target's tokens
are scored after the prompt and the *mean token negative log-likelihood* is the target's
score (ROME's code compares these means). With ``nll(t)`` that mean:

* efficacy (ES): ``nll(new) < nll(true)`` on the edit prompt;
* paraphrase (PS): the same on each paraphrase prompt;
* neighbourhood (NS): ``nll(true) < nll(new)`` on each neighbourhood prompt, i.e. prompts
  about *other* subjects whose answer is the old object still prefer it.

Scores are shares in [0, 1]; the summary averages per record first (ROME's convention for
PS and NS: a record's paraphrases count as one record).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from edit import lm
from edit.errors import EditError
from edit.facts import Fact


def load_counterfact(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Read ROME's CounterFact JSON (``requested_rewrite`` records) as facts."""
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EditError(f"data file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise EditError(f"{path} is not valid JSON ({e})") from None
    facts = []
    for i, r in enumerate(records[:limit]):
        try:
            rw = r["requested_rewrite"]
            facts.append(
                Fact(
                    prompt=rw["prompt"],
                    subject=rw["subject"],
                    target=rw["target_new"]["str"],
                    target_true=rw["target_true"]["str"],
                    paraphrases=tuple(r["paraphrase_prompts"]),
                    neighbours=tuple(r["neighborhood_prompts"]),
                )
            )
        except (KeyError, TypeError) as e:
            raise EditError(
                f"{path}: record {i} is not a CounterFact record (missing {e})"
            ) from None
    return facts


def mean_nll(model: nn.Module, tok, prompts: list[str], targets: list[str]) -> np.ndarray:
    lps = lm.continuation_logprobs(model, tok, prompts, targets)
    return np.array([-float(x.mean()) for x in lps])


def score(model: nn.Module, tok, fact: Fact) -> dict:
    """ES/PS/NS indicators and probability margins for one fact on the model as it is now."""
    prompts = [fact.text, *fact.paraphrases, *fact.neighbours]
    n_para = len(fact.paraphrases)
    nll_new = mean_nll(model, tok, prompts, [fact.target] * len(prompts))
    nll_true = mean_nll(model, tok, prompts, [fact.target_true] * len(prompts))
    better = nll_new < nll_true  # new target preferred
    margin = np.exp(-nll_new) - np.exp(-nll_true)
    out = {
        "efficacy": float(better[0]),
        "efficacy_margin": float(margin[0]),
        "paraphrase": float(better[1 : 1 + n_para].mean()) if n_para else None,
        "neighbourhood": float((~better[1 + n_para :]).mean()) if fact.neighbours else None,
    }
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric over records (percent), skipping records without it."""
    keys = ["efficacy", "paraphrase", "neighbourhood"]
    return {
        k: round(100 * float(np.mean([r[k] for r in rows if r[k] is not None])), 1) for k in keys
    }
