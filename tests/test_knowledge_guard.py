"""``edit.evals.knowledge``: the health check that refuses a trained change which costs the
model its perplexity or the facts it knew, on a tiny llama."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TINY_FACT, TINY_ROME, changed_tensors, corpus, state_copy

from edit import lm
from edit.api.workspace import Workspace
from edit.errors import EditFailed, InvalidRequest
from edit.evals.knowledge import Guard, answer_logp, general_facts, health, top1
from edit.facts import Fact

TEXT = " ".join(corpus()[:60])  # held-out text the tiny tokenizer covers


def known_facts(model, tok) -> list[Fact]:
    """Facts the model 'knows': tiny-corpus prompts, each with its top next token as target
    (where that token is a word that continues a prompt the way a target does)."""
    prompts = [s.rsplit(" ", 1)[0] for s in corpus()[:200]]
    logp = lm.next_token_logprobs(model, tok, prompts)
    out = []
    for prompt, row in zip(prompts, logp, strict=True):
        top = int(row.argmax())
        word = tok.decode([top])
        subject = prompt.split(" ")[0]
        if not word.startswith(" ") or not word.strip() or prompt.count(subject) != 1:
            continue
        if lm.encode_continuation(tok, word)[:1] == [top]:
            out.append(Fact(prompt.replace(subject, "{}", 1), subject, word.strip()))
    return out


@pytest.fixture
def facts(llama, tok):
    found = known_facts(llama, tok)
    assert len(found) >= 5
    return found


def _scramble(model) -> None:
    """Damage the model: noise on every weight, and a sharpened unembedding, so that it is
    confidently wrong (a random tiny model is near uniform: only confidence costs it
    perplexity)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.abs().mean() * torch.randn(p.shape, generator=gen))
        model.get_output_embeddings().weight.mul_(20)


def test_the_shipped_probe_loads_and_the_scores_read_the_answers(llama, tok, facts):
    shipped = general_facts()
    assert len(shipped) == 1000 and len({f.subject for f in shipped}) == 1000
    assert top1(llama, tok, facts, batch_size=3) == 1.0
    wrong = [Fact(f.prompt, f.subject, "Zanzibar") for f in facts]
    assert top1(llama, tok, facts + wrong) == pytest.approx(0.5)
    # the mean log P(first answer token), by hand from the next-token distributions
    logp = lm.next_token_logprobs(llama, tok, [f.text for f in facts + wrong])
    ids = [lm.encode_continuation(tok, f.target)[0] for f in facts + wrong]
    by_hand = torch.stack([row[i] for row, i in zip(logp, ids, strict=True)]).mean()
    assert answer_logp(llama, tok, facts + wrong) == pytest.approx(float(by_hand), rel=1e-5)
    assert answer_logp(llama, tok, wrong) < answer_logp(llama, tok, facts)


def test_an_unchanged_model_passes_and_a_damaged_one_is_refused(llama, tok, facts):
    guard = Guard(llama, tok, facts=facts, text=TEXT)
    assert guard.problems() == []
    guard(llama)  # nothing changed: no refusal
    assert guard.after == guard.before

    _scramble(llama)
    with pytest.raises(EditFailed) as e:
        guard(llama)
    msg = str(e.value)
    assert "perplexity rose" in msg and "bound +5 %" in msg
    assert "general facts' answers became" in msg and "% less likely" in msg
    assert f"over {len(facts)} facts; bound 10 %" in msg
    assert guard.after.answer_logp < guard.before.answer_logp + math.log(0.9)
    assert "kl_weight" in msg and "\n" not in msg
    assert guard.after.perplexity > 1.05 * guard.before.perplexity


def test_bounds_decide_and_refuse_false_only_reports(llama, tok, facts):
    lenient = Guard(llama, tok, facts=facts, text=TEXT, max_ppl_rise=1e6, max_answer_drop=1.0)
    report = Guard(llama, tok, facts=facts, text=TEXT, refuse=False, advice="try again")
    _scramble(llama)
    lenient(llama)  # within its (wide) bounds
    report(llama)
    assert lenient.problems() == [] and len(report.problems()) == 2
    with pytest.raises(InvalidRequest, match="max_answer_drop must be >= 0"):
        Guard(llama, tok, facts=facts, text=TEXT, max_answer_drop=-0.1)


def test_health_measures_perplexity_and_probe(llama, tok, facts):
    h = health(llama, tok, facts, TEXT)
    assert h.answer_logp == answer_logp(llama, tok, facts) and 1 < h.perplexity < 2 * len(tok)


def test_a_refused_learn_run_records_nothing_and_leaves_the_model(tmp_path, llama, tok, facts):
    ws = Workspace.open(tmp_path / "ws", model=llama, tok=tok)
    before = state_copy(llama)
    guard = Guard(llama, tok, facts=facts, text=TEXT, max_ppl_rise=0.0, max_answer_drop=0.0)
    docs = [{"text": s} for s in corpus()[100:104]]
    corpus_path = tmp_path / "docs.jsonl"
    corpus_path.write_text("".join(f'{{"text": "{d["text"]}"}}\n' for d in docs))
    with pytest.raises(EditFailed, match="not recorded: .*bound"):
        ws.learn(str(corpus_path), guard=guard, lr=0.05, epochs=2, progress=False)
    assert ws.entries() == [] and changed_tensors(llama, before) == []
    # the same run within the guard's bounds is recorded
    ok = Guard(llama, tok, facts=facts, text=TEXT, max_ppl_rise=1e6, max_answer_drop=1.0)
    entry = ws.learn(str(corpus_path), guard=ok, lr=0.05, epochs=2, progress=False).entry
    assert [e.id for e in ws.entries()] == [entry.id] and ok.after is not None


def test_a_guarded_edit_is_refused_whole_or_recorded_with_its_health(tmp_path, llama, tok, facts):
    ws = Workspace.open(tmp_path / "ws", model=llama, tok=tok)
    before = state_copy(llama)
    strict = Guard(llama, tok, facts=facts, text=TEXT, max_ppl_rise=0.0, max_answer_drop=0.0)
    with pytest.raises(EditFailed, match="not recorded: .*bound"):
        ws.add(TINY_FACT, guard=strict, progress=False, **TINY_ROME)
    assert ws.entries() == [] and changed_tensors(llama, before) == []
    loose = Guard(llama, tok, facts=facts, text=TEXT, max_ppl_rise=1e6, max_answer_drop=1.0)
    change = ws.add(TINY_FACT, guard=loose, progress=False, **TINY_ROME)
    assert [e.id for e in ws.entries()] == [change.entry.id]
    health = change.health
    assert health["before"]["perplexity"] == strict.before.perplexity
    assert health["after"]["perplexity"] == loose.after.perplexity != health["before"]["perplexity"]
    # read back from the ledger: the figures are recorded with the entry
    assert Workspace.inspect(tmp_path / "ws").entries()[0].info["guard"] == health
