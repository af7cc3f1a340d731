"""Membership-inference scores, AUC and the quantization attack, against hand computations
and independent formulas on tiny models."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from tiny import changed_tensors, state_copy

from edit.corpus import Example
from edit.evals import attacks, mia


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
    q = attacks.quantize_rtn(w, bits=2, group_size=4)
    # group 1 is already on its 4-level grid; group 2's grid is 10, 10.533, 11.067, 11.6
    assert q[0, :4].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert q[0, 4:].tolist() == pytest.approx([10.0, 10.5333, 11.0667, 11.6], abs=1e-4)
    big = torch.randn(64, 256)
    for bits in (4, 8):
        qb = attacks.quantize_rtn(big, bits, 128).reshape(64, 2, 128)
        g = big.reshape(64, 2, 128)
        step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
        assert ((qb - g).abs().amax(-1) <= step / 2 + 1e-6).all()
        assert max(len(torch.unique(row)) for row in qb.reshape(-1, 128)) <= 2**bits
    with pytest.raises(Exception, match="bits"):
        attacks.quantize_rtn(big, 1)


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


def _report(before_prob: float, changed_prob: float, attacked_prob: float):
    from edit.evals.audit import Report, _verdicts

    report = Report({"summary": "hand-made"})
    report.models = {
        "before": {"forget_prob": before_prob},
        "changed": {"forget_prob": changed_prob},
    }
    report.attacks = {"quantize4": {"forget_prob": attacked_prob,
                                    "recovered_percent": attacks.recovered(
                                        before_prob, changed_prob, attacked_prob)}}  # fmt: skip
    _verdicts(report)
    return report


def test_attack_verdicts_by_hand():
    # a real removal (0.8 -> 0.1), the attack brings back 10 % / 50 % of it
    assert _report(0.8, 0.1, 0.17).passed == {"change": True, "quantize4": True}
    assert _report(0.8, 0.1, 0.45).passed == {"change": True, "quantize4": False}
    # nothing was removed (0.8 -> 0.7): an attack that lowers P further does not "pass"
    report = _report(0.8, 0.7, 0.3)
    assert report.passed == {"change": False, "quantize4": False}
    assert "nothing to defend" in report.verdicts[-1]
