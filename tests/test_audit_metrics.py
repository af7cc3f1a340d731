"""Membership-inference scores, AUC and the quantization attack, against hand computations
and independent formulas on tiny models."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from tiny import changed_tensors, state_copy

from edit.corpus import Example
from edit.evals import attacks, audit, mia
from edit.quantize import quantize_rtn


def test_auc_by_hand_and_against_rank_sum():
    # pairs: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4
    assert mia.auc([3, 2], [1, 2]) == pytest.approx(0.875)
    assert mia.auc([0, 0], [1, 1]) == 0.0
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 20, 60), rng.integers(3, 25, 45)  # many ties
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2  # Mann-Whitney U
    assert mia.auc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def test_auc_is_one_half_for_samples_of_one_distribution():
    rng = np.random.default_rng(1)
    assert mia.auc(rng.normal(size=3000), rng.normal(size=3000)) == pytest.approx(0.5, abs=0.02)
    assert mia.auc(rng.normal(1, size=500), rng.normal(size=500)) > 0.7


def test_scores_by_hand():
    s = mia.TokenStats(
        "abc abc abc",
        logp=np.array([-1.0, -2.0, -3.0, -4.0, -5.0]),
        mu=np.array([-2.0, -2.0, -2.0, -2.0, -1.0]),
        sigma=np.array([1.0, 1.0, 2.0, 2.0, 0.5]),
    )
    assert mia.loss_score(s) == pytest.approx(-3.0)
    assert mia.min_k_score(s) == pytest.approx(-5.0)  # 20 % of 5 tokens: the lowest one
    assert mia.min_k_score(s, k=0.4) == pytest.approx(-4.5)
    # standardized: 1, 0, -0.5, -1, -8 -> lowest 40 %: -8 and -1
    assert mia.min_k_pp_score(s, k=0.4) == pytest.approx(-4.5)
    assert mia.zlib_score(s) == pytest.approx(-15.0 / len(zlib.compress(b"abc abc abc")))
    assert mia.privacy_leakage(0.6, 0.5) == pytest.approx(20.0)


def test_token_stats_agree_with_full_logits(llama, tok):
    examples = [Example("The capital of France is", " Paris, a city."), Example("", "One two")]
    stats = mia.token_stats(llama, tok, examples)
    from edit.corpus import encode_example

    for ex, st in zip(examples, stats, strict=True):
        ids, n_prompt = encode_example(tok, ex, 256)
        with torch.no_grad():
            logits = llama(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)[n_prompt - 1 : len(ids) - 1]
        want = logp.gather(1, torch.tensor(ids[n_prompt:])[:, None])[:, 0]
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = (p * (logp - mu[:, None]) ** 2).sum(-1).sqrt()
        assert st.logp == pytest.approx(want.numpy(), abs=1e-4)
        assert st.mu == pytest.approx(mu.numpy(), abs=1e-4)
        assert st.sigma == pytest.approx(sigma.numpy(), rel=1e-3)
        assert st.text == ex.answer


def test_rtn_grid_by_hand():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 10.5, 11.0, 11.6]])
    q = quantize_rtn(w, bits=2, group_size=4)
    # group 1 is already on its 4-level grid; group 2's grid is 10, 10.533, 11.067, 11.6
    assert q[0, :4].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert q[0, 4:].tolist() == pytest.approx([10.0, 10.5333, 11.0667, 11.6], abs=1e-4)
    big = torch.randn(64, 256)
    for bits in (4, 8):
        qb = quantize_rtn(big, bits, 128).reshape(64, 2, 128)
        g = big.reshape(64, 2, 128)
        step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
        assert ((qb - g).abs().amax(-1) <= step / 2 + 1e-6).all()
        assert max(len(torch.unique(row)) for row in qb.reshape(-1, 128)) <= 2**bits
    with pytest.raises(Exception, match="bits"):
        quantize_rtn(big, 1)


def test_quantized_model_is_restored_exactly(llama, tok):
    before = state_copy(llama)
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        ref = llama(input_ids=ids).logits
        with attacks.quantized(llama, bits=4):
            assert changed_tensors(llama, before)  # the block projections moved
            q4 = llama(input_ids=ids).logits
        assert not changed_tensors(llama, before)
        with attacks.quantized(llama, bits=16):
            q16 = llama(input_ids=ids).logits
    assert (q4 - ref).abs().max() > (q16 - ref).abs().max()


def test_recovered_by_hand():
    assert attacks.recovered(before=0.9, changed=0.1, attacked=0.5) == pytest.approx(50.0)
    assert attacks.recovered(0.9, 0.1, 0.1) == 0.0
    assert np.isnan(attacks.recovered(0.5, 0.5, 0.7))
    # the control (a model that never saw the data) gains 0.2 under the same attack:
    # only the excess, 0.4 - 0.2, counts against the 0.8 drop
    assert attacks.recovered(0.9, 0.1, 0.5, control_gain=0.2) == pytest.approx(25.0)
    # 4-bit rounding lowers both; the changed model lost less than the control: +6.25 %
    assert attacks.recovered(0.9, 0.1, 0.05, control_gain=-0.1) == pytest.approx(6.25)


def test_bootstrap_interval_by_hand():
    # default_rng(0).integers(0, 3, 3), four times: [2,1,1] [0,0,0] [0,0,0] [2,1,2]
    x = np.array([1.0, 2.0, 6.0])
    lo, hi = audit.bootstrap(lambda i: x[i].mean(), (3,), samples=4, seed=0, level=0.5)
    # resample means 10/3, 1, 1, 14/3; sorted 1, 1, 10/3, 14/3; the 25 % and 75 % quantiles
    # sit at positions 0.75 and 2.25 (linear interpolation)
    assert lo == pytest.approx(1.0)
    assert hi == pytest.approx(10 / 3 + 0.25 * (14 / 3 - 10 / 3))
    # two groups, drawn group after group within a resample: forget [1,1] holdout [1,0,0],
    # then forget [0,0] holdout [0,0,2]
    f, h = np.array([0.9, 0.1]), np.array([0.5, 0.2, 0.7])
    pair = audit.bootstrap(lambda i, j: mia.auc(f[i], h[j]), (2, 3), samples=2, seed=0,
                           level=0.5)  # fmt: skip
    assert pair == pytest.approx([0.25, 0.75])  # AUCs 0.0 and 1.0
    # the defaults: 1000 resamples, seed 0, 95 %: the same numbers on every call
    y = np.random.default_rng(5).normal(size=40)
    first = audit.bootstrap(lambda i: y[i].mean(), (40,))
    assert first == audit.bootstrap(lambda i: y[i].mean(), (40,))
    assert first[0] < y.mean() < first[1]
    assert first[1] - first[0] == pytest.approx(2 * 1.96 * y.std() / np.sqrt(40), rel=0.15)


def test_judge_band_both_ways():
    sizes = (40, 40)
    assert audit.judge_band(0.01, [-0.03, 0.04], 0.05, sizes)[0] == "passed"
    # the Streisand effect: far below the reference fails like far above
    assert audit.judge_band(-0.2, [-0.3, -0.1], 0.05, sizes)[0] == "failed"
    assert audit.judge_band(0.2, [0.1, 0.3], 0.05, sizes)[0] == "failed"
    # point inside, interval ±0.1: not run; (0.1 / 0.05)² · 40 = 160 examples each
    verdict, why = audit.judge_band(0.0, [-0.1, 0.1], 0.05, sizes)
    assert verdict == "not run" and "about 160 and 160" in why
    assert audit.judge_band(float("nan"), [0.0, 0.0], 0.05, sizes)[0] == "not run"


def _models(c_forget, c_holdout, c_nll, ref=None):
    """Hand-made measurements: one MIA score (loss), per-example NLLs."""

    def model(forget, holdout, nll, prob):
        return {"forget_prob": prob, "forget_nll": float(np.mean(nll)),
                "forget_nll_interval": [0.0, 0.0], "forget_example_nll": list(nll),
                "mia_scores": {"forget": {"loss": forget}, "holdout": {"loss": holdout}},
                "mia_auc": {"loss": mia.auc(forget, holdout)},
                "mia_auc_interval": {"loss": [0.0, 1.0]}}  # fmt: skip

    models = {"before": model(c_forget, c_holdout, [1.0] * len(c_nll), 0.8),
              "changed": model(c_forget, c_holdout, c_nll, 0.1)}  # fmt: skip
    if ref is not None:
        models["reference"] = model(*ref, 0.1)
    return models


def _verdicts_of(models, hits=None):
    report = audit.Report({"summary": "hand-made"}, models, hits or {})
    for hit in report.attacks.values():
        audit._score_recovery(report.models, hit)
    audit._verdicts(report)
    return report


def test_two_sided_checks_by_hand():
    rng = np.random.default_rng(0)
    f, h, nll = rng.normal(size=60).tolist(), rng.normal(size=60).tolist(), [3.0] * 60
    # identical to the reference: every paired resample differs by 0 -> interval [0, 0]
    same = _verdicts_of(_models(f, h, nll, ref=(f, h, nll)))
    assert same.passed["membership"] is True and same.passed["forget_nll"] is True
    assert same.checks["membership"].interval == [0.0, 0.0]
    # pushed past the never-seen level: every forget score below every holdout one (AUC 0)
    # and the NLL doubled; the reference sits at AUC 0.5-ish and NLL 3
    low = [x - 10 for x in f]
    past = _verdicts_of(_models(low, h, [6.0] * 60, ref=(f, h, nll)))
    assert past.checks["membership"].figure == 0.0
    assert past.passed["membership"] is False and past.passed["forget_nll"] is False
    assert past.checks["membership"].reference == pytest.approx(mia.auc(f, h))
    assert "FAILED" in past.verdicts[1] and "both ways" in past.verdicts[1]
    # no reference: not run, with the reason, never passed
    alone = _verdicts_of(_models(f, h, nll))
    for key in ("membership", "forget_nll", "forget_quality"):
        assert alone.passed[key] is None and alone.checks[key].verdict == "not run"
        assert "no reference" in alone.checks[key].text
    assert audit.certificate_verdict(alone) == "incomplete"


def test_attack_recovery_is_controlled_by_the_reference():
    rng = np.random.default_rng(1)
    f, h, nll = rng.normal(size=8).tolist(), rng.normal(size=8).tolist(), [3.0] * 8
    models = _models(f, h, nll, ref=(f, h, nll))  # before 0.8, changed 0.1, reference 0.1
    # relearning lifts the changed model to 0.4 (37.5 % of the drop) and the reference,
    # which never saw the data, to 0.35: only 0.05 / 0.7 = 7.1 % is recovery
    hit = {"forget_prob": 0.4, "reference": {"forget_prob": 0.35}}
    report = _verdicts_of(models, {"relearn": hit})
    assert hit["recovered_percent"] == pytest.approx(100 * 0.05 / 0.7)
    assert hit["reference_gain"] == {"forget_prob": pytest.approx(0.25)}
    assert report.passed["relearn"] is True and "reference's own gain" in report.verdicts[-1]
    # without the control the same numbers fail
    uncontrolled = {"forget_prob": 0.4}
    report = _verdicts_of(_models(f, h, nll), {"relearn": uncontrolled})
    assert uncontrolled["recovered_percent"] == pytest.approx(100 * 0.3 / 0.7)
    assert report.passed["relearn"] is False and "not controlled" in report.verdicts[-1]


def test_attack_verdicts_by_hand():
    def passed(before_prob, changed_prob, attacked_prob):
        models = {"before": {"forget_prob": before_prob, "forget_nll": 1.0,
                             "forget_nll_interval": [1.0, 1.0]},
                  "changed": {"forget_prob": changed_prob, "forget_nll": 2.0,
                              "forget_nll_interval": [2.0, 2.0]}}  # fmt: skip
        report = _verdicts_of(models, {"quantize4": {"forget_prob": attacked_prob}})
        return {k: v for k, v in report.passed.items() if k in ("change", "quantize4")}, report

    # a real removal (0.8 -> 0.1), the attack brings back 10 % / 50 % of it
    assert passed(0.8, 0.1, 0.17)[0] == {"change": True, "quantize4": True}
    assert passed(0.8, 0.1, 0.45)[0] == {"change": True, "quantize4": False}
    # nothing was removed (0.8 -> 0.7): an attack that lowers P further does not "pass"
    result, report = passed(0.8, 0.7, 0.3)
    assert result == {"change": False, "quantize4": False}
    assert "nothing to defend" in report.verdicts[-1]
