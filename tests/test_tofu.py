"""TOFU evaluation: the metrics against hand computations and independent formulas, the
reader's errors, and scoring a tiny model (shapes, ranges, the identities that must hold)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edit import lm
from edit.errors import EditError
from edit.evals import metrics
from edit.evals.tofu import forget_quality, model_utility, score_set
from edit.readers.tofu import QA, read_qa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


# ------------------------------------------------------------------ metrics on plain numbers


def test_truth_ratio_by_hand():
    # para nll 1.0; perturbed nlls 2.0 and 4.0 -> exp(3 - 1) = e^2
    r = metrics.truth_ratio([1.0, 2.0], np.array([[2.0, 4.0], [1.0, 1.0]]))
    assert r == pytest.approx([math.exp(2.0), math.exp(-1.0)])
    # score: max(0, 1 - 1/R): 1 - e^-2 and 0 (the wrong answers are likelier)
    assert metrics.truth_ratio_score(r) == pytest.approx((1 - math.exp(-2.0) + 0.0) / 2)


def test_harmonic_mean():
    assert metrics.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.harmonic_mean([0.3, 0.0, 0.9]) == 0.0


def test_rouge_l_recall_by_hand():
    # reference words: the cat sat on the mat (6); LCS with prediction: "the cat on the mat" (5)
    assert metrics.rouge_l_recall("The cat, it sat? no: on the mat", "the cat sat on the mat") == 1
    assert metrics.rouge_l_recall("the dog on the mat", "The cat sat on the mat.") == 4 / 6
    assert metrics.rouge_l_recall("", "a b") == 0.0
    assert metrics.rouge_l_recall("mat the on", "the mat on") == pytest.approx(2 / 3)


def test_ks_separated_samples_by_hand():
    # every a below every b: D = 1, and 2 of the C(6, 3) = 20 interleavings reach it
    assert metrics.ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert metrics.ks_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert metrics.ks_pvalue([1, 2, 3], [1, 2, 3]) == 1.0


def _equal_n_pvalue(n: int, d: float) -> float:
    """Gnedenko–Korolyuk: P(D >= k/n) = 2 Σ_j (-1)^(j+1) C(2n, n - jk) / C(2n, n)."""
    k = round(d * n)
    total = sum((-1) ** (j + 1) * math.comb(2 * n, n - j * k) for j in range(1, n // k + 1))
    return 2 * total / math.comb(2 * n, n)


@pytest.mark.parametrize("n", [5, 17, 40])
def test_ks_pvalue_matches_closed_form_for_equal_sizes(n):
    rng = np.random.default_rng(n)
    for shift in (0.0, 0.5, 1.5):
        a, b = rng.normal(size=n), rng.normal(shift, size=n)
        d = metrics.ks_statistic(a, b)
        assert metrics.ks_pvalue(a, b) == pytest.approx(_equal_n_pvalue(n, d), rel=1e-9)


def test_ks_pvalue_matches_enumeration_for_unequal_sizes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=4), rng.normal(0.8, size=6)
    d = metrics.ks_statistic(a, b)
    pooled = np.concatenate([a, b])
    hits = 0
    combos = list(itertools.combinations(range(10), 4))
    for idx in combos:  # every way to label 4 of the 10 pooled values as "a"
        mask = np.zeros(10, bool)
        mask[list(idx)] = True
        hits += metrics.ks_statistic(pooled[mask], pooled[~mask]) >= d - 1e-12
    assert metrics.ks_pvalue(a, b) == pytest.approx(hits / len(combos))


def test_ks_pvalue_is_not_small_for_one_distribution():
    rng = np.random.default_rng(1)
    p = [metrics.ks_pvalue(rng.normal(size=40), rng.normal(size=40)) for _ in range(200)]
    # under the null the p-value is (conservatively) uniform: about 5 % fall below 0.05
    assert 0.0 <= np.mean(np.array(p) < 0.05) <= 0.10
    assert metrics.ks_pvalue(rng.normal(size=40), rng.normal(2.0, size=40)) < 1e-6


# ------------------------------------------------------------------ the reader


def _write(tmp_path, rows) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    return path


def test_read_qa_checks_records(tmp_path):
    good = {"question": "Q?", "answer": "A.", "perturbed_answer": ["B.", "C."]}
    items = read_qa(_write(tmp_path, [good]))
    assert items == [QA("Q?", "A.", None, ("B.", "C."))]
    assert items[0].example().prompt == "Q?" and items[0].example().answer == "A."
    with pytest.raises(EditError, match="not found"):
        read_qa(tmp_path / "missing.json")
    with pytest.raises(EditError, match='record 1: "answer"'):
        read_qa(_write(tmp_path, [good, {"question": "Q?"}]))
    with pytest.raises(EditError, match="perturbed_answer"):
        read_qa(_write(tmp_path, [{**good, "perturbed_answer": [3]}]))
    with pytest.raises(EditError, match='no "perturbed_answer"'):
        read_qa(_write(tmp_path, [{"question": "Q?", "answer": "A."}]))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(EditError, match="not valid JSON"):
        read_qa(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(EditError, match="holds no records"):
        read_qa(tmp_path / "empty.json")


@pytest.mark.skipif(not DATA.is_dir(), reason=f"TOFU data not found at {DATA}")
def test_shipped_forget_sets_nest():
    forget10, forget01 = read_qa(DATA / "forget10.json"), read_qa(DATA / "forget01.json")
    assert len(forget10) == 400 and len(forget01) == 40
    assert forget10[-40:] == forget01  # forget01 is the suffix of forget10
    assert all(it.paraphrased and len(it.perturbed) == 5 for it in forget01)


# ------------------------------------------------------------------ scoring a tiny model


ITEMS = [
    QA("Who wrote the tiny book?", "Ada wrote it.", "Ada wrote that.", ("Bob wrote it.",) * 2),
    QA("Where is the small town?", "It is in Peru.", "Peru has it.", ("It is in Chad.", "Mali.")),
    QA("What is red?", "A rose.", None, ("A leaf.", "The sky.")),
]


def test_greedy_batched_equals_one_by_one(llama, tok):
    prompts = [it.question for it in ITEMS] + ["The", "Paris is the capital of the country of"]
    one = [lm.greedy(llama, tok, [p], 6)[0] for p in prompts]
    assert lm.greedy(llama, tok, prompts, 6, batch_size=8) == one


def test_score_set_on_tiny_model(llama, tok):
    s = score_set(llama, tok, ITEMS, "forget", max_new_tokens=5)
    assert s.answer_nll.shape == (3,) and s.perturbed_nll.shape == (3, 2)
    assert not s.multiple_choice  # two of the three have a paraphrase
    # the third has none: its answer stands in for it
    assert s.paraphrased_nll[2] == pytest.approx(s.answer_nll[2])
    # the NLLs are those of the lm scorer, question as prompt, answer as continuation
    lp = lm.continuation_logprobs(llama, tok, [ITEMS[1].question], [ITEMS[1].perturbed[1]])[0]
    assert s.perturbed_nll[1, 1] == pytest.approx(-float(lp.mean()), rel=1e-5)
    assert len(s.generations) == 3 and ((s.rouge >= 0) & (s.rouge <= 1)).all()
    summary = s.summary()
    assert 0 < summary["probability"] < 1
    # a model compared with itself cannot be told apart
    assert forget_quality(s, s) == 1.0


def test_model_utility_multiple_choice_and_missing_sets(llama, tok):
    mc = score_set(llama, tok, [ITEMS[2]], "real_authors", max_new_tokens=0)
    assert mc.multiple_choice
    p = np.exp(-np.concatenate([mc.answer_nll, mc.perturbed_nll[0]]))
    assert mc.probability() == pytest.approx(p[0] / p.sum())
    sets = {"retain": score_set(llama, tok, ITEMS[:2], "retain", max_new_tokens=4),
            "real_authors": mc, "world_facts": mc}  # fmt: skip
    mc.rouge = np.array([0.5])
    value, parts = model_utility(sets)
    assert len(parts) == 9
    assert value == pytest.approx(metrics.harmonic_mean(list(parts.values())))
    with pytest.raises(EditError, match="world_facts"):
        model_utility({"retain": sets["retain"], "real_authors": mc})
