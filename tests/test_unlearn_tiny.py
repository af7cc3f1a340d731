"""LoRA unlearning on tiny models: the losses against their formulas written out by hand, the
corpus reader and its errors, and the trainer's promises (the forget NLL rises, the base model
is bit-for-bit unchanged, the returned adapter reproduces the trained model exactly)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny import TINY_TYPES, changed_tensors, state_copy, tiny_model

from edit import lm
from edit.corpus import (
    IGNORE_INDEX,
    Example,
    encode_example,
    tokenize_examples,
    wikitext_retain,
)
from edit.errors import EditError, EditFailed, InvalidRequest
from edit.methods.unlearn import (
    LOSSES,
    USES_RETAIN,
    LossInputs,
    UnlearnConfig,
    adapter_attached,
    answer_nll,
    lora_delta,
    lora_update,
    quantile_targets,
    sampled_answers,
    sequence_logprob,
    sequence_nll,
    target_module_names,
    token_kl,
    train_lora,
)
from edit.methods.unlearn.config import TEACH_RETAIN
from edit.methods.unlearn.lora import rounded
from edit.methods.unlearn.losses import token_entropy
from edit.quantize import quantize_rtn
from edit.readers.corpus import read_corpus

FORGET = [
    Example("The capital of France is", "Paris."),
    Example("Where is the Colosseum? It is in", "Rome."),
    Example("", "Marie Curie was born in Poland."),
]
RETAIN = [
    Example("", "Berlin is the capital city of Germany."),
    Example("", "People in Spain speak Spanish."),
    Example("The official language of Japan is", "Japanese."),
    Example("", "Toyota is a company based in Japan."),
]
# Strong enough to move a random tiny model in a few steps.
FAST = dict(lr=1e-2, epochs=4, batch_size=2, lora_rank=4, max_len=64)

# --------------------------------------------------------------------------------------------
# Losses, against the formulas written out independently
# --------------------------------------------------------------------------------------------

LOGP = [-3.0, -5.0]  # log π_θ(y|x) of two forget sequences
N_TOKENS = [2, 4]
REF_LOGP = [-2.5, -6.0]
RETAIN_NLL = 1.7
# next-token logits of the trained model and of a never-seen teacher at 2 answer positions
LOGITS = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
TEACHER_LOGITS = [[0.0, 2.0, 0.0], [0.5, 0.5, 2.0]]
TARGETS = [2.0, 1.0]  # each forget sequence's never-seen mean token NLL
# the logits there before the run, and the answer token at each position (undial)
BEFORE_LOGITS = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
LABELS = [0, 1]


def _inputs(**kw) -> LossInputs:
    return LossInputs(
        torch.tensor(LOGP, dtype=torch.float64),
        torch.tensor(N_TOKENS),
        torch.tensor(REF_LOGP, dtype=torch.float64),
        torch.tensor(RETAIN_NLL, dtype=torch.float64),
        torch.tensor(LOGITS, dtype=torch.float64),
        torch.tensor(TEACHER_LOGITS, dtype=torch.float64),
        torch.tensor(TARGETS, dtype=torch.float64),
        torch.tensor(BEFORE_LOGITS, dtype=torch.float64),
        torch.tensor(LABELS),
        **kw,
    )


def _kl(t: list[float], q: list[float]) -> float:
    """KL(softmax(t) ‖ softmax(q)), written out."""
    zt, zq = math.log(sum(map(math.exp, t))), math.log(sum(map(math.exp, q)))
    return sum(math.exp(t[v] - zt) * ((t[v] - zt) - (q[v] - zq)) for v in range(len(t)))


def _log_sigmoid(z: float) -> float:
    return -math.log(1 + math.exp(-z))


def test_loss_table_matches_the_formulas():
    beta, alpha, gamma = 0.5, 2.0, 0.3
    c = UnlearnConfig(beta=beta, alpha=alpha, gamma=gamma, penalty=2.0)
    x = _inputs()
    nll_forget = -(LOGP[0] + LOGP[1]) / (N_TOKENS[0] + N_TOKENS[1])  # mean token NLL
    expected = {
        "gradascent": -nll_forget,
        "graddiff": -nll_forget + alpha * RETAIN_NLL,
        "npo": -(2 / beta)
        * sum(_log_sigmoid(-beta * (lp - rp)) for lp, rp in zip(LOGP, REF_LOGP, strict=True))
        / 2
        + alpha * RETAIN_NLL,
        "simnpo": -(2 / beta)
        * sum(_log_sigmoid(-(beta / n) * lp - gamma) for lp, n in zip(LOGP, N_TOKENS, strict=True))
        / 2
        + alpha * RETAIN_NLL,
        # KL(π_T ‖ π_θ) per position, averaged: the second position already agrees (KL 0)
        "distill": sum(_kl(t, q) for q, t in zip(LOGITS, TEACHER_LOGITS, strict=True)) / 2,
        # the same toward the renamed examples' logits (here the teacher's), which
        # unlearn.rename composes (tests/test_rename.py)
        "rename": sum(_kl(t, q) for q, t in zip(LOGITS, TEACHER_LOGITS, strict=True)) / 2,
        # the logits before with the answer token's lowered by the penalty (2), as the target
        "undial": (_kl([0.0, 0.0, 1.0], LOGITS[0]) + _kl([0.0, 1.0, 0.0], LOGITS[1])) / 2,
        # per-sequence mean token NLLs 1.5 and 1.25 against targets 2 and 1
        "match": ((1.5 - 2.0) ** 2 + (1.25 - 1.0) ** 2) / 2,
    }
    assert set(LOSSES) == set(expected)
    for name, value in expected.items():
        kl = name in ("distill", "rename", "undial")
        rel = 1e-6 if kl else 1e-12  # the KL is taken in float32
        assert float(LOSSES[name](x, c)) == pytest.approx(value, rel=rel), name
    # NPO's other form: (2/β)·E[log(1 + (π_θ/π_ref)^β)]
    ratio_form = (2 / beta) * sum(
        math.log(1 + math.exp(lp - rp) ** beta) for lp, rp in zip(LOGP, REF_LOGP, strict=True)
    ) / 2 + alpha * RETAIN_NLL
    assert float(LOSSES["npo"](x, c)) == pytest.approx(ratio_form, rel=1e-12)


def test_retain_term_is_off_with_alpha_zero_or_no_retain_batch():
    x = _inputs()
    for name in ("graddiff", "npo", "simnpo"):
        with_retain = float(LOSSES[name](x, UnlearnConfig(alpha=1.0)))
        without = float(LOSSES[name](x, UnlearnConfig(alpha=0.0)))
        assert with_retain - without == pytest.approx(RETAIN_NLL)
        x_none = _inputs()
        x_none.retain_nll = None
        assert float(LOSSES[name](x_none, UnlearnConfig(alpha=1.0))) == pytest.approx(without)
    for name in ("gradascent", "distill", "match"):  # no retain term at all
        assert name not in USES_RETAIN
        assert float(LOSSES[name](x, UnlearnConfig(alpha=1.0))) == float(
            LOSSES[name](x, UnlearnConfig(alpha=0.0))
        )


def test_graddiff_descends_into_lower_forget_and_retain_likelihood_signs():
    """Minimizing graddiff lowers log π on the forget set and lowers NLL on the retain set."""
    logp = torch.tensor(LOGP, requires_grad=True)
    retain_nll = torch.tensor(RETAIN_NLL, requires_grad=True)
    x = LossInputs(logp, torch.tensor(N_TOKENS), retain_nll=retain_nll)
    LOSSES["graddiff"](x, UnlearnConfig(alpha=0.5)).backward()
    assert torch.allclose(logp.grad, torch.full((2,), 1 / sum(N_TOKENS)))  # descent: logp down
    assert float(retain_nll.grad) == pytest.approx(0.5)  # descent: retain NLL down


def test_npo_gradient_tends_to_gradient_ascent_as_beta_goes_to_zero():
    """d/dΔ of −(2/β) log σ(−βΔ) is 2σ(βΔ) → 1: NPO's gradient becomes that of the mean
    sequence log-likelihood E[log π_θ(y|x)], gradient ascent's (NPO paper, §4)."""
    n = torch.tensor(N_TOKENS)
    for beta, tol in ((1e-4, 1e-4), (0.1, 0.3)):
        logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
        ref = torch.tensor(REF_LOGP, dtype=torch.float64)
        LOSSES["npo"](LossInputs(logp, n, ref), UnlearnConfig(beta=beta, alpha=0)).backward()
        ascent = torch.full((2,), 1 / 2, dtype=torch.float64)  # ∇ mean_i log π(y_i|x_i)
        assert torch.allclose(logp.grad, ascent, rtol=tol), (beta, logp.grad)
        weights = 2 * torch.sigmoid(beta * (logp.detach() - ref)) / 2  # the paper's weights
        assert torch.allclose(logp.grad, weights)


def test_npo_gradient_at_the_reference_is_scaled_gradient_ascent(tok, llama):
    """At θ = ref, for any β, ∇L_NPO = ∇ mean_i log π_θ(y_i|x_i) = (Σ|y_i| / B)·∇L_GA, with
    L_GA = −NLL the token-mean gradient-ascent loss; checked on every weight of a tiny llama."""
    ids, mask, labels = tokenize_examples(tok, FORGET, max_len=64)
    n = (labels[:, 1:] != IGNORE_INDEX).sum(-1)

    def grads(name: str, beta: float) -> list[torch.Tensor]:
        llama.zero_grad(set_to_none=True)
        logp = sequence_logprob(llama(input_ids=ids, attention_mask=mask).logits, labels)
        x = LossInputs(logp, n, ref_logp=logp.detach())
        LOSSES[name](x, UnlearnConfig(beta=beta, alpha=0)).backward()
        return [p.grad.clone() for p in llama.parameters() if p.grad is not None]

    scale = float(n.sum()) / len(FORGET)
    ascent = grads("gradascent", 0.1)
    for beta in (0.1, 2.0):
        npo = grads("npo", beta)
        assert len(npo) == len(ascent) > 0
        for g_npo, g_ga in zip(npo, ascent, strict=True):
            torch.testing.assert_close(g_npo, scale * g_ga, rtol=1e-4, atol=1e-7)


def test_quantile_targets_give_each_example_the_never_seen_quantile_at_its_rank():
    nll = torch.tensor([3.0, 1.0, 2.0])
    assert quantile_targets(nll, torch.tensor([30.0, 10.0, 20.0])).tolist() == [30, 10, 20]
    # 5 never-seen values, 3 examples: quantiles 0, 0.5, 1 (the middle one interpolated)
    got = quantile_targets(nll, torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]))
    assert got.tolist() == [16.0, 1.0, 4.0]
    assert quantile_targets(torch.tensor([0.7]), torch.tensor([1.0, 3.0])).tolist() == [2.0]


def test_retain_kl_matches_its_formula_and_vanishes_at_the_reference():
    torch.manual_seed(0)
    logits, ref = torch.randn(5, 7), torch.randn(5, 7)
    p_ref, p = torch.softmax(ref, -1), torch.softmax(logits, -1)
    by_hand = (p_ref * (p_ref.log() - p.log())).sum(-1).mean()
    assert float(token_kl(logits, ref)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(token_kl(ref, ref)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Tokenization: labels cover exactly the answer (or the text)
# --------------------------------------------------------------------------------------------


def test_labels_mask_prompt_start_and_padding(tok):
    qa, text = Example("The capital of France is", "Paris."), Example("", "Rome is in Italy.")
    ids, mask, labels = tokenize_examples(tok, [qa, text], max_len=64)
    prompt_ids, answer_ids = lm.encode(tok, qa.prompt), lm.encode_continuation(tok, qa.answer)
    n = len(prompt_ids) + len(answer_ids)
    assert ids[0, :n].tolist() == prompt_ids + answer_ids
    assert labels[0, : len(prompt_ids)].eq(IGNORE_INDEX).all()  # prompt: no loss
    assert labels[0, len(prompt_ids) : n].tolist() == answer_ids
    assert labels[0, n:].eq(IGNORE_INDEX).all() and mask[0, n:].eq(0).all()  # padding
    start = list(lm.start_ids(tok))
    assert start, "the tiny tokenizer reads prompts behind <|endoftext|>"
    text_ids = tok(text.answer, add_special_tokens=False).input_ids
    m = len(start) + len(text_ids)
    assert ids[1, :m].tolist() == start + text_ids and mask[1].sum() == m
    assert labels[1].tolist() == [IGNORE_INDEX] * len(start) + text_ids + [IGNORE_INDEX] * (
        ids.shape[1] - m
    )


def test_sequence_scores_are_the_continuation_logprobs_of_edit_lm(tok, llama):
    """The trained quantity is what ``lm.continuation_logprobs`` measures; the batched,
    label-positions-only path of ``answer_nll`` agrees with full logits."""
    qa = [ex for ex in FORGET if not ex.is_text]
    ids, mask, labels = tokenize_examples(tok, qa, max_len=64)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask).logits
    ours = sequence_logprob(logits, labels)
    theirs = lm.continuation_logprobs(llama, tok, [e.prompt for e in qa], [e.answer for e in qa])
    torch.testing.assert_close(ours, torch.stack([t.sum() for t in theirs]), atol=1e-4, rtol=0)
    ids, mask, labels = tokenize_examples(tok, FORGET, max_len=64)
    with torch.no_grad():
        mean_nll = sequence_nll(llama(input_ids=ids, attention_mask=mask).logits, labels)
    assert answer_nll(llama, tok, FORGET) == pytest.approx(float(mean_nll.mean()), abs=1e-5)


def test_examples_longer_than_max_len_are_cut_and_a_prompt_that_fills_it_is_refused(tok):
    ids, _, labels = tokenize_examples(tok, [Example("", "Paris is the capital of France.")], 4)
    assert ids.shape == (1, 4) and (labels != IGNORE_INDEX).sum() == 3
    with pytest.raises(InvalidRequest, match="max_len=3"):
        tokenize_examples(tok, [Example("The capital of France is", "Paris.")], max_len=3)


def test_wikitext_retain_gives_slices_of_about_the_asked_length(tok):
    retain = wikitext_retain(tok, n_examples=8, tokens_per_example=32)
    assert len(retain) == 8 and all(ex.is_text for ex in retain)
    lengths = [len(tok(ex.answer, add_special_tokens=False).input_ids) for ex in retain]
    assert all(28 <= n <= 40 for n in lengths), lengths
    assert len({ex.answer for ex in retain}) == 8


# --------------------------------------------------------------------------------------------
# Reading a corpus
# --------------------------------------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_corpus_reads_every_form(tmp_path):
    rows = [
        {"text": "Paris is in France."},
        {"question": "Where is Rome?", "answer": "Italy", "paraphrased_answer": "ignored"},
        {"prompt": "The capital of Spain is", "completion": "Madrid"},
    ]
    path = _write(tmp_path, "c.jsonl", "\n".join(map(json.dumps, rows[:2])) + "\n\n")
    path.write_text(path.read_text() + json.dumps(rows[2]) + "\n")
    examples = read_corpus(path)
    assert examples == [
        Example("", "Paris is in France."),
        Example("Where is Rome?", "Italy"),
        Example("The capital of Spain is", "Madrid"),
    ]
    assert [ex.where for ex in examples] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    # TOFU ships its forget sets as one JSON array; elements keep their line numbers.
    array = _write(tmp_path, "c.json", json.dumps(rows, indent=1))
    examples = read_corpus(array)
    assert [ex.prompt for ex in examples] == ["", "Where is Rome?", "The capital of Spain is"]
    assert examples[1].where == f"{array}:5"


def test_read_corpus_reads_the_tofu_forget_set():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu" / "forget01.json"
    if not path.is_file():
        pytest.skip(f"no TOFU data at {path}")
    examples = read_corpus(path)
    assert len(examples) == 40 and all(ex.prompt and ex.answer for ex in examples)
    assert examples[0].prompt.startswith("What is the full name of the author born in Kuwait")
    assert examples[0].where == f"{path}:2"


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('{"text": "ok"}\n{"text": "unterminated}\n', 2, "not valid JSON"),
        ('{"text": "ok"}\n\n["a list"]\n', 3, "expected a JSON object, got list"),
        ('{"text": "ok"}\n{"title": "x"}\n', 2, "no example fields (keys: title)"),
        ('{"question": "Where is Rome?"}\n', 1, '"question" without "answer"'),
        ('{"text": "ok"}\n{"text": "  "}\n', 2, '"text" is empty'),
        ('{"prompt": "p", "completion": 3}\n', 1, '"completion" must be a string, got int'),
        ('{"text": "t", "question": "q", "answer": "a"}\n', 1, "ambiguous"),
        ('[\n {"text": "ok"},\n {"text": ""}\n]\n', 3, '"text" is empty'),
        ('[\n {"text": "ok"}\n {"text": "b"}\n]\n', 3, "expected ',' or ']'"),
    ],
)
def test_bad_corpus_lines_are_named_in_one_line(tmp_path, content, line, words):
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(EditError) as info:
        read_corpus(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: ") and words in message, message


def test_missing_and_empty_corpus_files(tmp_path):
    for path, words in (
        (tmp_path / "nope.jsonl", "corpus file not found"),
        (_write(tmp_path, "empty.jsonl", "\n  \n"), "is empty"),
        (_write(tmp_path, "empty.json", "[ ]"), "has no examples"),
    ):
        with pytest.raises(EditError, match=words) as info:
            read_corpus(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# Config and targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("method", "rmu", "unknown unlearning method 'rmu'"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("lr", 0.0, "lr must be > 0"),
        ("beta", -1.0, "beta must be > 0"),
        ("alpha", -0.5, "alpha must be >= 0"),
        ("retain_batch_size", 0, "retain_batch_size must be an integer >= 1 or None"),
        ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
        ("target_modules", ("",), "target_modules must be module names"),
        ("samples", -1, "samples must be an integer >= 0"),
        ("quant_bits", 1, "quant_bits must be 0 (off) or 2 to 8"),
        ("confine", "yes", "confine must be true or false"),
    ],
)
def test_config_validates_itself_in_one_line(field, value, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        UnlearnConfig(**{field: value})
    assert UnlearnConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)


def test_default_targets_are_the_attention_and_mlp_projections(tok, llama):
    names = target_module_names(llama)
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(names) == sorted(
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(2)
        for p in leaves
    )
    gpt2 = target_module_names(tiny_model("gpt2", len(tok)))
    assert gpt2 == [
        f"transformer.h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert target_module_names(llama, ("q_proj", "mlp.down_proj")) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(InvalidRequest, match="'qkv' matches no Linear layer"):
        target_module_names(llama, ("qkv",))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _snapshot(model):
    return (
        state_copy(model),
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: (m.training, set(vars(m))) for n, m in model.named_modules()},
    )


def _assert_unchanged(model, snapshot):
    weights, grads, modules = snapshot
    assert changed_tensors(model, weights) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: (m.training, set(vars(m))) for n, m in model.named_modules()} == modules


@pytest.mark.parametrize("method", ["npo", "graddiff"])
def test_forget_raises_forget_nll_and_leaves_the_model_unchanged(tok, llama, method):
    before = _snapshot(llama)
    config = UnlearnConfig(method=method, kl_weight=0.1, **FAST)
    result = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    _assert_unchanged(llama, before)
    m = result.metrics
    assert m["forget_nll_after"] > m["forget_nll_before"] + 0.1, m
    assert m["forget_prob_after"] < m["forget_prob_before"]
    assert m["retain_nll_before"] is not None and m["retain_nll_after"] is not None
    assert m["forget_nll_before"] == pytest.approx(answer_nll(llama, tok, FORGET), abs=1e-5)
    assert [e["epoch"] for e in result.losses] == [1, 2, 3, 4]
    assert all(e["retain_nll"] is not None for e in result.losses)
    assert result.tokens > 0 and result.tokens_per_second > 0 and result.seconds > 0
    assert result.adapter and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in result.adapter.values()
    )
    assert json.loads(json.dumps(result.lora_config))["r"] == 4
    assert sorted(lora_delta(result)) == sorted(result.target_modules)


def test_retain_batch_size_sets_the_retain_examples_per_step(tok, llama):
    """batch_size 2 over 3 forget examples: 2 steps per epoch, 8 in all. Retain batches of 4
    take the whole retain set every step, batches of 2 (the default) half of it."""
    config = UnlearnConfig(method="graddiff", **FAST)
    half = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    wide = dataclasses.replace(config, retain_batch_size=4)
    full = train_lora(llama, tok, FORGET, RETAIN, wide, progress=False)
    retain_tokens = sum(len(encode_example(tok, ex, FAST["max_len"])[0]) for ex in RETAIN)
    assert full.tokens - half.tokens == 8 * retain_tokens - 4 * retain_tokens


def test_learn_lowers_the_nll_of_new_examples(tok, llama):
    before = _snapshot(llama)
    result = train_lora(llama, tok, FORGET, None, UnlearnConfig(**FAST), objective="learn")
    _assert_unchanged(llama, before)
    m = result.metrics
    assert m["learn_nll_after"] < m["learn_nll_before"] - 0.1, m
    assert m["retain_nll_before"] is None


def test_sampled_answers_are_the_models_own_replies_to_the_asked_examples(tok, llama):
    """Each question/answer example asked k times: replies as the model samples them (same
    seed, same replies; as many tokens as the longest answer, cut at a line break), none for
    plain text, none that is the written answer, none repeated."""
    samples = sampled_answers(llama, tok, FORGET, 3, seed=0)
    assert samples == sampled_answers(llama, tok, FORGET, 3, seed=0)
    assert samples and {ex.prompt for ex in samples} <= {ex.prompt for ex in FORGET[:2]}
    assert len(samples) == len(set(samples)) <= 3 * 2
    n = max(len(lm.encode_continuation(tok, ex.answer)) for ex in FORGET[:2])
    drawn = [lm.sample(llama, tok, [ex.prompt for ex in FORGET[:2]], max_new_tokens=n,
                       seed=1000 * draw) for draw in range(3)]  # fmt: skip
    replies = {(ex.prompt, text.lstrip("\n").split("\n")[0].rstrip())
               for texts in drawn for ex, text in zip(FORGET[:2], texts, strict=True)}  # fmt: skip
    assert {(ex.prompt, ex.answer) for ex in samples} <= replies
    for ex in samples:
        assert ex.answer.strip() not in ("Paris.", "Rome.") and ex.where == "(sampled)"


def test_forget_with_samples_trains_on_them_and_stops_on_the_corpus(tok, llama):
    """The sampled replies are trained on (more tokens per epoch), scored against π_ref like
    the corpus, and the run's figures stay those of the corpus."""
    config = UnlearnConfig(method="npo", **dict(FAST, epochs=1, batch_size=8))
    plain = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    more = train_lora(llama, tok, FORGET, RETAIN, dataclasses.replace(config, samples=2),
                      progress=False)  # fmt: skip
    assert more.tokens > plain.tokens
    assert more.metrics["forget_nll_before"] == plain.metrics["forget_nll_before"]
    assert more.metrics["forget_nll_after"] != plain.metrics["forget_nll_after"]


def test_training_is_reproducible_from_its_seed(tok, llama):
    config = UnlearnConfig(method="simnpo", **dict(FAST, epochs=1))
    a = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    b = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    assert a.adapter.keys() == b.adapter.keys()
    assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_lora_delta_reproduces_the_adapter_model(tok, model_type):
    model = tiny_model(model_type, len(tok))
    config = UnlearnConfig(method="gradascent", **dict(FAST, epochs=2))
    result = train_lora(model, tok, FORGET, None, config, progress=False)
    ids, mask, _ = tokenize_examples(tok, FORGET + RETAIN, max_len=64)
    before = _snapshot(model)
    with torch.no_grad():
        with adapter_attached(model, result):
            adapted = model(input_ids=ids, attention_mask=mask).logits
        _assert_unchanged(model, before)
        base = model(input_ids=ids, attention_mask=mask).logits
        assert (adapted - base).abs().max() > 1e-2  # the adapter does change the model

        dense = copy.deepcopy(model)  # ΔW = (alpha/r)·B@A, added in the storage layout
        for name, delta in lora_delta(result).items():
            weight = dense.get_submodule(name).weight
            weight.add_(delta.T if result.transposed else delta)
        dense_logits = dense(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(dense_logits, adapted, atol=1e-5, rtol=0)

        applied = lora_update(result).apply(model)  # the ledger's path: Update.apply / undo
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, adapted, atol=1e-5, rtol=0
        )
        applied.undo()
    _assert_unchanged(model, before)


def test_train_lora_refuses_bad_requests_in_one_line(tok, llama):
    cases = [
        ([], RETAIN, UnlearnConfig(), "forget", "no examples to forget"),
        (FORGET, [], UnlearnConfig(method="graddiff"), "forget", "graddiff needs a retain set"),
        (FORGET, None, UnlearnConfig(kl_weight=1.0), "forget", "kl_weight > 0 needs a retain"),
        (FORGET, None, UnlearnConfig(), "unlearn", "objective must be one of forget, learn"),
        (FORGET, RETAIN + FORGET[:1], UnlearnConfig(), "forget", "1 of the 5 retain examples"),
        (FORGET, None, UnlearnConfig(stop_nll=2.0), "learn", "stop_nll stops a forget run"),
        (FORGET, None, UnlearnConfig(samples=1), "learn", "samples adds the model's own"),
        (FORGET, None, UnlearnConfig(quant_bits=4), "learn", "quant_bits is a forget setting"),
    ]
    before = _snapshot(llama)
    for forget, retain, config, objective, words in cases:
        with pytest.raises(InvalidRequest, match=words) as info:
            train_lora(llama, tok, forget, retain, config, objective=objective, progress=False)
        assert "\n" not in str(info.value)
    _assert_unchanged(llama, before)


def test_a_holdout_in_the_forget_set_is_refused(tok, llama):
    with pytest.raises(InvalidRequest, match="1 of the 2 holdout examples are also in the set"):
        train_lora(llama, tok, FORGET, RETAIN, UnlearnConfig(), progress=False,
                   holdout=[RETAIN[0], FORGET[2]])  # fmt: skip


def test_forget_stops_at_the_never_seen_level_and_reports_the_holdout(tok, llama):
    """With a holdout set, the run stops at the first weights where a batch and then the whole
    forget set reach the holdout's NLL before training; the same run without it goes on."""
    holdout = [Example("", "Lisbon is the capital of Portugal."), Example("Ice is", "cold.")]
    # one step per epoch (the 3 examples in one batch): epochs count steps; a small lr takes
    # a few of them to reach the level
    config = UnlearnConfig(method="gradascent", **dict(FAST, epochs=12, batch_size=3, lr=2e-3))
    free = train_lora(llama, tok, FORGET, None, config, progress=False)
    stopped = train_lora(llama, tok, FORGET, None, config, progress=False, holdout=holdout)
    m = stopped.metrics
    level = m["holdout_nll_before"]
    assert level == pytest.approx(answer_nll(llama, tok, holdout), abs=1e-5)
    assert m["stop_nll"] == level and m["forget_nll_before"] < level <= m["forget_nll_after"]
    taken = m["stopped_after"]
    assert 1 < taken < 12 and len(stopped.losses) == taken
    # the same seed takes the same first steps: one step fewer is still below the level
    fewer = dataclasses.replace(config, epochs=taken - 1)
    assert train_lora(llama, tok, FORGET, None, fewer).metrics["forget_nll_after"] < level
    assert free.metrics["stopped_after"] is None and free.metrics["stop_nll"] is None
    assert free.metrics["forget_nll_after"] > m["forget_nll_after"]
    # a level beyond reach: every step is taken and the run says it never stopped
    far = train_lora(llama, tok, FORGET, None, dataclasses.replace(config, stop_nll=1e6))
    assert far.metrics["stopped_after"] is None and len(far.losses) == 12
    # a corpus already at the level: nothing to forget, refused
    with pytest.raises(InvalidRequest, match="already at the stop level"):
        train_lora(llama, tok, FORGET, None, dataclasses.replace(config, stop_nll=0.5),
                   progress=False)  # fmt: skip


def test_a_diverging_run_leaves_the_model_unchanged(tok, llama, monkeypatch):
    before = _snapshot(llama)
    monkeypatch.setitem(LOSSES, "gradascent", lambda x, c: x.logp.sum() * float("nan"))
    with pytest.raises(EditFailed, match="diverged"):
        train_lora(llama, tok, FORGET, None, UnlearnConfig(method="gradascent"), progress=False)
    _assert_unchanged(llama, before)


# --------------------------------------------------------------------------------------------
# Distilling toward a model that never saw the forget set
# --------------------------------------------------------------------------------------------


def _per_example_nll(model, tok, examples) -> torch.Tensor:
    from edit.methods.unlearn import answer_scores

    logp, n = answer_scores(model, tok, examples)
    return -logp / n


def fine_tuned(model, tok, examples, steps: int):
    """``model`` trained on ``examples``, all of its weights, ``steps`` full-batch Adam steps
    (a fine-tune made outside the product), in eval mode."""
    ids, mask, labels = tokenize_examples(tok, examples, max_len=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _teacher_and_student(tok):
    """A tiny llama (the teacher, which never saw FORGET) and a copy fine-tuned on FORGET."""
    teacher = tiny_model("llama", len(tok), seed=1)
    return teacher, fine_tuned(tiny_model("llama", len(tok), seed=1), tok, FORGET, 15)


def test_distill_brings_each_example_to_the_teachers_level_and_leaves_both_unchanged(tok):
    """The student learned the forget set (its NLL far below the teacher's); distillation
    brings every example's NLL near the teacher's own (not only their mean), from below, and
    changes neither model."""
    teacher, student = _teacher_and_student(tok)
    start, target = (_per_example_nll(m, tok, FORGET) for m in (student, teacher))
    assert (target - start).min() > 0.5, (start, target)  # every example far below
    before, teacher_before = _snapshot(student), _snapshot(teacher)
    config = UnlearnConfig(method="distill", kl_weight=0.0, **dict(FAST, epochs=12))
    result = train_lora(student, tok, FORGET, RETAIN, config, progress=False, teacher=teacher)
    _assert_unchanged(student, before)
    _assert_unchanged(teacher, teacher_before)
    with adapter_attached(student, result):
        end = _per_example_nll(student, tok, FORGET)
    gap_before, gap_after = (target - start).abs(), (target - end).abs()
    assert (gap_after < 0.25 * gap_before).all(), (start, end, target)


def test_distill_is_refused_without_a_teacher_or_with_another_vocabulary(tok, llama):
    other = tiny_model("llama", len(tok) + 8, seed=1)
    cases = [
        (UnlearnConfig(method="distill"), None, "distill distills toward a model that never"),
        (UnlearnConfig(method="distill"), other, r"vocabulary \(\d+ tokens\) is not this"),
        (UnlearnConfig(method="npo"), llama, "npo does not use a teacher model"),
    ]
    before = _snapshot(llama)
    for config, teacher, words in cases:
        with pytest.raises(InvalidRequest, match=words) as info:
            train_lora(llama, tok, FORGET, RETAIN, config, progress=False, teacher=teacher)
        assert "\n" not in str(info.value)
    _assert_unchanged(llama, before)


def test_confine_trains_only_where_the_student_differs_from_the_teacher(tok):
    """The student is the teacher plus a rank-2 change in two weights. With ``confine`` the
    adapter changes those two alone, each only on the rows' space of its difference, and
    distillation still closes the gap on the forget set; without a teacher it is refused."""
    teacher = tiny_model("llama", len(tok), seed=1)
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(3)
    changed = {}
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        weight = student.get_submodule(name).weight
        out_dim, in_dim = weight.shape
        u, v = torch.randn(out_dim, 2, generator=gen), torch.randn(2, in_dim, generator=gen)
        with torch.no_grad():
            weight.add_(0.5 * u @ v / in_dim**0.5)
        changed[name] = torch.linalg.qr(v.T).Q  # (in, 2): the difference's row space
    start, target = (_per_example_nll(m, tok, FORGET) for m in (student, teacher))
    config = UnlearnConfig(method="distill", kl_weight=0.0, confine=True,
                           **dict(FAST, epochs=12))  # fmt: skip
    result = train_lora(student, tok, FORGET, RETAIN, config, progress=False, teacher=teacher)
    deltas = lora_delta(result)
    for name, delta in deltas.items():
        if name not in changed:
            assert delta.abs().max() == 0, name
            continue
        q = changed[name]
        assert delta.norm() > 1e-3, name
        off = delta - delta @ q @ q.T  # what the change reads outside the difference
        assert off.norm() < 1e-4 * delta.norm(), (name, off.norm(), delta.norm())
    with adapter_attached(student, result):
        end = _per_example_nll(student, tok, FORGET)
    assert (target - end).abs().sum() < 0.5 * (target - start).abs().sum(), (start, end, target)

    holdout = [Example("", "Lisbon is the capital of Portugal.")]
    match = UnlearnConfig(method="match", confine=True, **FAST)
    with pytest.raises(InvalidRequest, match="confine fixes the adapter to where the model"):
        train_lora(student, tok, FORGET, RETAIN, match, progress=False, holdout=holdout)


def test_match_aims_each_example_at_its_target_from_the_teacher_or_the_holdout(tok):
    """``match`` takes each example's target once: the teacher's NLL of it, else the
    holdout's NLL at its rank. Training brings every example near its target."""
    teacher, student = _teacher_and_student(tok)
    start, target = (_per_example_nll(m, tok, FORGET) for m in (student, teacher))
    config = UnlearnConfig(method="match", kl_weight=0.0, **dict(FAST, epochs=20, lr=3e-3))
    result = train_lora(student, tok, FORGET, RETAIN, config, progress=False, teacher=teacher)
    with adapter_attached(student, result):
        end = _per_example_nll(student, tok, FORGET)
    assert ((target - end).abs() < 0.25 * (target - start).abs()).all(), (start, end, target)

    holdout = [Example("", "Lisbon is the capital of Portugal."), Example("Ice is", "cold."),
               Example("", "The river flows north to the sea.")]  # fmt: skip
    wanted = quantile_targets(start, _per_example_nll(student, tok, holdout))
    result = train_lora(student, tok, FORGET, RETAIN, config, progress=False, holdout=holdout)
    with adapter_attached(student, result):
        end = _per_example_nll(student, tok, FORGET)
    assert ((wanted - end).abs() < 0.25 * (wanted - start).abs()).all(), (start, end, wanted)
    with pytest.raises(InvalidRequest, match="match aims each example at a never-seen level"):
        train_lora(student, tok, FORGET, RETAIN, config, progress=False)


def _answer_logits(model, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) next-token logits at every answer position of FORGET, and the (N,) answers."""
    ids, mask, labels = tokenize_examples(tok, FORGET, max_len=64)
    answer = labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][answer]
    return logits.float(), labels[:, 1:][answer]


def test_undial_aims_each_token_at_its_own_lowered_distribution(tok):
    """undial trains a model that learned the forget set toward its own logits before the
    run with each answer token's lowered by the penalty: the forget NLL rises, the answer
    positions move toward that target (the mean KL to it falls by a third), and the model is
    left unchanged."""
    _, student = _teacher_and_student(tok)
    before_logits, answers = _answer_logits(student, tok)
    lowered = torch.full((len(answers), 1), -3.0)
    target = torch.log_softmax(before_logits.scatter_add(1, answers[:, None], lowered), -1)
    before = _snapshot(student)
    config = UnlearnConfig(method="undial", penalty=3.0, kl_weight=0.0, **dict(FAST, epochs=10))
    result = train_lora(student, tok, FORGET, RETAIN, config, progress=False)
    _assert_unchanged(student, before)
    with adapter_attached(student, result):
        after_logits, _ = _answer_logits(student, tok)
    m = result.metrics
    assert m["forget_nll_after"] > m["forget_nll_before"] + 0.5, m

    def kl(logits: torch.Tensor) -> float:
        return float((target.exp() * (target - torch.log_softmax(logits, -1))).sum(-1).mean())

    assert kl(after_logits) < 0.67 * kl(before_logits), (kl(before_logits), kl(after_logits))


def test_label_gap_by_hand_and_in_distill():
    """``label_gap``: the mean squared gap between the answer tokens' log-probabilities under
    the model and the teacher. Two positions over 3 tokens: the model puts the answer at
    log(e²/(e²+2)) and log(1/3), the teacher at log(1/3) both times: gaps
    log(3e²/(e²+2)) and 0. Zero where the two agree, whatever the other tokens do; distill
    adds it at ``label_weight`` to its KL, and asks for the answer tokens."""
    from edit.methods.unlearn.losses import LOSSES, LossInputs, label_gap, token_kl

    model = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.zeros(2, 3)
    labels = torch.tensor([0, 1])
    gap = math.log(3 * math.e**2 / (math.e**2 + 2))
    assert float(label_gap(model, teacher, labels)) == pytest.approx(gap**2 / 2, rel=1e-6)
    # the answer token (0) as likely under both, the other tokens swapped: no gap
    swapped = (torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[1.0, 0.0, 3.0]]))
    assert float(label_gap(*swapped, torch.tensor([0]))) == pytest.approx(0.0, abs=1e-7)
    assert float(label_gap(*swapped, torch.tensor([1]))) == pytest.approx(9.0, rel=1e-6)
    x = LossInputs(logp=torch.zeros(1), n_tokens=torch.ones(1), logits=model,
                   teacher_logits=teacher, labels=labels)  # fmt: skip
    kl = float(token_kl(model, teacher))
    assert float(LOSSES["distill"](x, UnlearnConfig(method="distill"))) == pytest.approx(kl)
    weighted = UnlearnConfig(method="distill", label_weight=2.0)
    assert float(LOSSES["distill"](x, weighted)) == pytest.approx(kl + gap**2, rel=1e-6)
    x.labels = None
    with pytest.raises(ValueError, match="answer tokens"):
        LOSSES["distill"](x, weighted)


def test_quantile_match_by_hand():
    """The 1-Wasserstein distance between the positions' entropies and the levels: a uniform
    row over 3 tokens has H = log 3; sorted, the two positions sit at the levels' quantiles
    0.25 and 0.75 (0.35 and 0.65 between levels 0.2 and 0.8). Token NLLs by hand too."""
    from edit.methods.unlearn.losses import quantile_match, token_entropy, token_nlls

    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    h = token_entropy(logits)
    assert float(h[0]) == pytest.approx(math.log(3), rel=1e-6)
    p = torch.softmax(logits[1], -1)
    assert float(h[1]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    want = (abs(float(h[1]) - 0.35) + abs(math.log(3) - 0.65)) / 2
    levels = torch.tensor([0.2, 0.8])
    assert float(quantile_match(h, levels)) == pytest.approx(want, rel=1e-6)
    nll = token_nlls(logits, torch.tensor([2, 0]))
    assert nll.tolist() == pytest.approx([math.log(3), -math.log(float(p[0]))], abs=1e-6)
    # the gradient raises the sharp row's entropy and lowers the flatter one's
    flatter = torch.tensor([[1.0, 0.0, 0.0], [10.0, 0.0, 0.0]], requires_grad=True)
    quantile_match(token_entropy(flatter), levels).backward()
    h = token_entropy(flatter.detach())
    step = token_entropy(flatter.detach() - 0.1 * flatter.grad)
    assert float(step[0]) < float(h[0]) and float(step[1]) > float(h[1])


@pytest.mark.parametrize("setting", ["entropy_weight", "token_nll_weight"])
def test_matching_brings_the_forgotten_answer_tokens_to_the_holdouts_spread(tok, setting):
    """Gradient ascent flattens the distribution at the forgotten tokens and drives their NLL
    up without bound; matched to the holdout's tokens (levels: its entropies or its NLLs
    before the run) the answer tokens end nearer the holdout's spread, and the holdout's
    mean entropy is reported. Without a holdout, or for learn, the setting is refused in
    one line."""
    from edit.methods.unlearn.losses import quantile_match, token_nlls

    measure = {"entropy_weight": lambda logits, answers: token_entropy(logits),
               "token_nll_weight": token_nlls}[setting]  # fmt: skip
    holdout = [Example("", "Lisbon is the capital of Portugal."), Example("Ice is", "cold.")]
    model = tiny_model("llama", len(tok), seed=1)
    ids, mask, labels = tokenize_examples(tok, FORGET + holdout, max_len=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):  # sharp on both sets, so that the holdout's levels bind
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    h_ids, h_mask, h_labels = tokenize_examples(tok, holdout, max_len=64)
    answer = h_labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        h_logits = model(input_ids=h_ids, attention_mask=h_mask).logits[:, :-1][answer]
    levels = measure(h_logits, h_labels[:, 1:][answer]).sort().values
    runs = {}
    for weight in (0.0, 5.0):
        config = UnlearnConfig(method="gradascent", kl_weight=0.0, stop_nll=50.0,
                               **{setting: weight}, **dict(FAST, epochs=6))  # fmt: skip
        result = train_lora(model, tok, FORGET, RETAIN, config, progress=False,
                            holdout=holdout)  # fmt: skip
        with adapter_attached(model, result):
            logits, answers = _answer_logits(model, tok)
        runs[weight] = (float(quantile_match(measure(logits, answers), levels)), result.metrics)
    assert runs[5.0][0] < runs[0.0][0] / 2, runs
    h_mean = float(token_entropy(h_logits).mean())
    assert runs[5.0][1]["entropy_level"] == pytest.approx(h_mean, rel=1e-3)
    assert "entropy_level" not in runs[0.0][1]
    with pytest.raises(InvalidRequest, match=f"{setting} reads never-seen examples") as info:
        train_lora(model, tok, FORGET, RETAIN, UnlearnConfig(**{setting: 1.0}, **FAST),
                   progress=False)  # fmt: skip
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidRequest, match=f"{setting} is a forget setting"):
        train_lora(model, tok, FORGET, RETAIN, UnlearnConfig(**{setting: 1.0}, **FAST),
                   objective="learn", progress=False, holdout=holdout)  # fmt: skip


def test_sharpness_aware_steps_take_a_second_pass_and_change_the_run(tok, llama):
    """sam_rho > 0 takes each step's gradient at a moved adapter: a second pass per step (twice
    the tokens), another adapter; the model is left unchanged and the forget set forgotten."""
    before = _snapshot(llama)
    config = UnlearnConfig(method="graddiff", **dict(FAST, epochs=2))
    plain = train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    sam = train_lora(llama, tok, FORGET, RETAIN, dataclasses.replace(config, sam_rho=0.5))
    _assert_unchanged(llama, before)
    assert sam.tokens == 2 * plain.tokens
    assert max(float((sam.adapter[k] - plain.adapter[k]).abs().max()) for k in plain.adapter) > 1e-3
    assert sam.metrics["forget_nll_after"] > sam.metrics["forget_nll_before"]


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_lr_schedule_sets_the_rate_of_every_update(tok, llama, monkeypatch, schedule):
    """lr_schedule="linear" steps from lr down toward 0 over the planned updates (epochs ×
    steps per epoch), "constant" keeps lr; read from the optimizer at each update."""
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    config = UnlearnConfig(method="graddiff", lr_schedule=schedule, **FAST)
    train_lora(llama, tok, FORGET, RETAIN, config, progress=False)
    updates = FAST["epochs"] * math.ceil(len(FORGET) / FAST["batch_size"])
    factor = (lambda u: 1 - u / updates) if schedule == "linear" else (lambda u: 1.0)
    assert seen == pytest.approx([FAST["lr"] * factor(u) for u in range(updates)])
    with pytest.raises(InvalidRequest, match="lr_schedule must be one of constant, linear"):
        UnlearnConfig(lr_schedule="cosine")


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_rounded_runs_the_adapted_model_with_its_merged_weights_rounded(tok, model_type):
    """Under ``rounded`` the adapted model's logits are those of the model whose adapted
    weights W + ΔW are RTN-rounded, as the audit's quantization attack makes it; with the
    adapter off it is the model before; the gradient reaches the adapter; nothing stays."""
    model = tiny_model(model_type, len(tok))
    config = UnlearnConfig(method="gradascent", **dict(FAST, epochs=2))
    result = train_lora(model, tok, FORGET, None, config, progress=False)
    ids, mask, _ = tokenize_examples(tok, FORGET + RETAIN, max_len=64)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in lora_delta(result).items():  # (out, in)
            weight = dense.get_submodule(name).weight
            out_in = (weight.T if result.transposed else weight) + delta
            q = quantize_rtn(out_in, 3)
            weight.copy_(q.T if result.transposed else q)
        expected = dense(input_ids=ids, attention_mask=mask).logits
        base = model(input_ids=ids, attention_mask=mask).logits
    with adapter_attached(model, result) as peft_model:
        plain = peft_model(input_ids=ids, attention_mask=mask).logits.detach()
        lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        with rounded(peft_model, 3):
            got = peft_model(input_ids=ids, attention_mask=mask).logits
            with torch.no_grad(), peft_model.disable_adapter():
                off = peft_model(input_ids=ids, attention_mask=mask).logits
            got.logsumexp(-1).sum().backward()
        after = peft_model(input_ids=ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(got.detach(), expected, atol=1e-4, rtol=0)
    assert (got.detach() - plain).abs().max() > 1e-3  # the rounding does change the model
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, plain, atol=0, rtol=0)  # hooks gone on exit
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora)


def test_quant_bits_adds_a_rounded_pass_and_changes_the_run(tok, llama):
    """quant_bits takes each step's loss on the rounded model too: a second pass per step
    (twice the tokens), another adapter; the model is left unchanged. (What it buys, the
    forgetting kept in a 4-bit copy, needs a model that learned something: TOFU, in
    docs/unlearning.md.)"""
    before = _snapshot(llama)
    config = UnlearnConfig(method="gradascent", **dict(FAST, epochs=2))
    plain = train_lora(llama, tok, FORGET, None, config, progress=False)
    quant = train_lora(llama, tok, FORGET, None, dataclasses.replace(config, quant_bits=2),
                       progress=False)  # fmt: skip
    _assert_unchanged(llama, before)
    assert quant.tokens == 2 * plain.tokens
    gap = max(float((quant.adapter[k] - plain.adapter[k]).abs().max()) for k in plain.adapter)
    assert gap > 1e-3


def test_holdout_kl_keeps_never_seen_text_where_it_was(tok, llama):
    """holdout_kl holds the holdout's next-token distributions to the model before the run:
    a forget that drifts the holdout's NLL without it moves it less with it; the holdout's
    tokens go through the step's pass (more tokens); learn and a run without a holdout are
    refused in one line."""
    holdout = [Example("", "Lisbon is the capital of Portugal."), Example("Ice is", "cold."),
               Example("", "Rome is a city in Italy.")]  # fmt: skip
    config = UnlearnConfig(method="gradascent", **dict(FAST, epochs=6), stop_nll=1e6)
    plain = train_lora(llama, tok, FORGET, None, config, progress=False, holdout=holdout)
    kept = train_lora(llama, tok, FORGET, None, dataclasses.replace(config, holdout_kl=20.0),
                      progress=False, holdout=holdout)  # fmt: skip

    def drift(result) -> float:
        m = result.metrics
        return abs(m["holdout_nll_after"] - m["holdout_nll_before"])

    assert drift(plain) > 0.05
    assert drift(kept) < 0.5 * drift(plain)
    assert kept.metrics["forget_nll_after"] > kept.metrics["forget_nll_before"]
    assert kept.tokens > plain.tokens
    with pytest.raises(InvalidRequest, match="holdout_kl is a forget setting"):
        train_lora(llama, tok, FORGET, None, UnlearnConfig(holdout_kl=1.0), objective="learn",
                   progress=False, holdout=holdout)  # fmt: skip
    with pytest.raises(InvalidRequest, match="holdout_kl reads never-seen examples"):
        train_lora(llama, tok, FORGET, None, UnlearnConfig(holdout_kl=1.0), progress=False)


def test_the_retain_set_is_held_to_the_reference_only_where_the_model_before_reads_it_worse(
    tok,
):
    """``kl_to`` left unset: a model that reads the retain set as its reference does is held
    to itself; one that reads it far worse (here: the reference learned the retain text, the
    model did not) is held to the reference. A setting given, a method that reads no
    reference, or no KL term: nothing is measured, and the model before holds it."""
    from edit.methods.unlearn.policy import DAMAGED, retain_hold

    reference = fine_tuned(tiny_model("llama", len(tok), seed=1), tok, RETAIN, 15)
    same = copy.deepcopy(reference)
    damaged = tiny_model("llama", len(tok), seed=1)
    gap = answer_nll(damaged, tok, RETAIN) - answer_nll(reference, tok, RETAIN)
    assert gap > math.log(DAMAGED)
    config = UnlearnConfig(method="distill", kl_weight=0.3)
    kept, held = retain_hold(same, tok, config, RETAIN, reference)
    assert kept.kl_to == "before" and held["to"] == "before"
    assert held["perplexity_before"] == pytest.approx(held["perplexity_reference"])
    moved, held = retain_hold(damaged, tok, config, RETAIN, reference)
    assert moved.kl_to == "reference" and held["to"] == "reference"
    assert math.log(held["perplexity_before"] / held["perplexity_reference"]) == pytest.approx(gap)
    for other in (dataclasses.replace(config, kl_to="before"), UnlearnConfig(method="npo"),
                  dataclasses.replace(config, kl_weight=0.0)):  # fmt: skip
        resolved, held = retain_hold(damaged, tok, other, RETAIN, reference)
        assert resolved.kl_to == "before" and held is None
    assert retain_hold(damaged, tok, config, RETAIN, None) == (
        dataclasses.replace(config, kl_to="before"),
        None,
    )


def test_a_forget_held_to_the_reference_also_holds_the_shipped_factual_prompts(tok):
    """A forget of the shipped text whose model before reads it far worse than the reference:
    the retain set is held to the reference and gains the shipped factual prompts, unless
    ``fact_retain`` was given; a model that reads it as the reference does keeps the text
    alone, held to itself."""
    from edit.methods.unlearn.policy import DAMAGED_FACTS, plan_corpus, train_plan

    text = wikitext_retain(tok, 64)
    reference = fine_tuned(tiny_model("llama", len(tok), seed=1), tok, text, 8)
    # both learned the corpus; the first never the text the reference reads well
    broken = fine_tuned(tiny_model("llama", len(tok), seed=1), tok, FORGET, 15)
    healthy = fine_tuned(copy.deepcopy(reference), tok, FORGET + text, 8)
    settings = {"epochs": 1, "lora_rank": 4, "max_len": 64}
    for model, extra, to, facts in ((broken, {}, "reference", DAMAGED_FACTS),
                                    (broken, {"fact_retain": 0}, "reference", 0),
                                    (healthy, {}, "before", 0)):  # fmt: skip
        plan = plan_corpus(model, tok, "forget", FORGET, settings={**settings, **extra},
                           reference=reference)  # fmt: skip
        run = train_plan(model, tok, plan, progress=False)
        held = run.info["retain_held_to"]
        assert (held["to"], held.get("facts", 0)) == (to, facts)
        assert run.config.kl_to == to and run.info["retain_examples"] == 64 + facts
        assert run.result.config.fact_retain == facts


def test_kl_to_reference_holds_the_retain_set_to_the_teacher_not_to_the_model_before(tok):
    """With ``kl_to="reference"`` the retain set's KL term reads the teacher: the retain
    examples move to the teacher's NLL, where with the default they stay at the student's."""
    teacher, student = _teacher_and_student(tok)
    target, start = (_per_example_nll(m, tok, RETAIN) for m in (teacher, student))
    gaps = {}
    for kl_to in ("before", "reference"):
        config = UnlearnConfig(method="distill", kl_weight=5.0, kl_to=kl_to,
                               **dict(FAST, epochs=12))  # fmt: skip
        result = train_lora(student, tok, FORGET, RETAIN, config, progress=False, teacher=teacher)
        with adapter_attached(student, result):
            gaps[kl_to] = float((_per_example_nll(student, tok, RETAIN) - target).abs().mean())
    assert gaps["reference"] < 0.5 * gaps["before"], (gaps, float((start - target).abs().mean()))
    with pytest.raises(InvalidRequest, match="kl_to=reference holds the retain set"):
        train_lora(student, tok, FORGET, RETAIN, UnlearnConfig(kl_to="reference"), progress=False)
    with pytest.raises(InvalidRequest, match="kl_to must be 'before' or 'reference'"):
        UnlearnConfig(kl_to="base")


def test_the_form_teacher_is_a_copy_of_the_reference_that_learned_the_retain_set_given(tok):
    """``teach_form``: the reference itself stays as it was; the teacher is a copy that learned
    up to ``teach_form`` examples spread over the retain set given (else over the holdout), and
    reads them better than the reference does; and a run records what its teacher learned.
    Without a reference, with a method that reads none, or without either set: an error."""
    from edit.methods.unlearn.policy import form_teacher, plan_corpus, train_plan

    reference = tiny_model("llama", len(tok), seed=1)
    before = state_copy(reference)
    model = fine_tuned(tiny_model("llama", len(tok), seed=1), tok, FORGET, 15)
    settings = {"epochs": 1, "lora_rank": 4, "max_len": 64, "teach_form": 2}
    plan = plan_corpus(model, tok, "forget", FORGET, RETAIN, settings=settings,
                       reference=reference)  # fmt: skip
    teacher, taught = form_teacher(reference, tok, plan, plan.config, progress=False)
    assert not changed_tensors(reference, before)
    assert (taught["examples"], taught["from"]) == (2, "retain")
    spread = [RETAIN[0], RETAIN[2]]  # every second of the four
    assert (_per_example_nll(teacher, tok, spread) < _per_example_nll(reference, tok, spread)).all()
    plan = plan_corpus(model, tok, "forget", FORGET, holdout=RETAIN[:3], settings=settings,
                       reference=reference)  # fmt: skip
    assert form_teacher(reference, tok, plan, plan.config, progress=False)[1]["from"] == "holdout"
    for given in ({}, {"reference": None}, {"settings": {**settings, "method": "npo"}}):
        with pytest.raises(InvalidRequest, match="teach_form"):  # nothing would take it
            plan_corpus(model, tok, "forget", FORGET, **{"settings": settings,
                        "reference": reference, **given})  # fmt: skip
    # left unset: TEACH_RETAIN examples of a retain set given to a run that reads the
    # reference, else none (never the holdout: never-seen text the reference should not learn)
    unset = {k: v for k, v in settings.items() if k != "teach_form"}
    for given, taught in (
        ({"retain": RETAIN}, TEACH_RETAIN),
        ({"holdout": RETAIN[:3]}, 0),
        ({"retain": RETAIN, "reference": None}, 0),
        ({"retain": RETAIN, "settings": {**unset, "method": "npo"}}, 0),
    ):
        kw = {"settings": unset, "reference": reference, **given}
        assert plan_corpus(model, tok, "forget", FORGET, **kw).config.teach_form == taught, given
    plan = plan_corpus(model, tok, "forget", FORGET, RETAIN, settings=settings,
                       reference=reference)  # fmt: skip
    run = train_plan(model, tok, plan, progress=False)
    assert (run.info["form_taught"]["examples"], run.info["form_taught"]["from"]) == (2, "retain")
    assert not changed_tensors(reference, before)
