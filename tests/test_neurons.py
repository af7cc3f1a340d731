"""Neurons added beside a gated MLP (``edit.neurons``) and ROME's ``write: neuron``: the
gated neuron's algebra by hand, exact undo, the ledger and the export to plain transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_FACT, TINY_FACT_2, TINY_ROME, changed_tensors, state_copy, tiny_model

import edit
from edit import InvalidRequest, lm, neurons
from edit.api.workspace import Workspace
from edit.methods.algebra import gated_neurons
from edit.methods.rome import ROMEConfig
from edit.update import Update

MLP = "model.layers.1.mlp"  # the MLP of the block TINY_ROME edits
NEURON_ROME = {**TINY_ROME, "write": "neuron"}


def _logits(model, tok, text: str = "The capital of France is") -> torch.Tensor:
    ids = torch.tensor([lm.encode(tok, text)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_gated_neuron_gives_delta_at_the_subject_and_a_square_elsewhere():
    d, s = 4, 3.0
    delta = torch.tensor([1.0, -2.0, 0.5, 4.0])
    gate, up, down = gated_neurons(torch.eye(d), torch.eye(d)[:1], torch.ones(1, 1), delta[None],
                                   F.silu, s)  # fmt: skip
    assert torch.allclose(gate, s * torch.eye(d)[:1]) and torch.allclose(up, torch.eye(d)[:1])

    def out(x):
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T

    assert torch.allclose(out(torch.tensor([[1.0, 0, 0, 0]])), delta[None], atol=1e-6)
    assert torch.allclose(out(torch.tensor([[0.0, 2.0, -1.0, 3.0]])), torch.zeros(1, d))
    # a token with r·x = 0.05 gets silu(0.15)·0.05/silu(3) of δ, under a tenth of 0.05
    small = out(torch.tensor([[0.05, 1.0, 0, 0]]))
    expected = float(F.silu(torch.tensor(0.15)) * 0.05 / F.silu(torch.tensor(3.0)))
    assert torch.allclose(small, expected * delta[None], atol=1e-6)
    assert expected < 0.05 / 10


def test_gated_neuron_meets_two_keys_with_the_least_generic_response():
    cov = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    keys = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    gate, up, down = gated_neurons(cov, keys, torch.ones(2, 1), torch.ones(1, 3), F.silu, 2.0)
    r = up[0]
    assert torch.allclose(keys @ r, torch.ones(2), atol=1e-5)
    assert torch.allclose(gate[0], 2.0 * r) and torch.allclose(down[:, 0], torch.ones(3) / F.silu(
        torch.tensor(2.0)))  # fmt: skip
    # every row that reads 1 at both keys is r + t·n (n ⊥ both keys): none has a smaller rᵀΣr
    n = torch.linalg.cross(keys[0], keys[1])
    for t in (-0.5, -0.1, 0.1, 0.5):
        other = r + t * n
        assert torch.allclose(keys @ other, torch.ones(2), atol=1e-5)
        assert other @ cov @ other > r @ cov @ r


def test_isolated_neurons_of_a_batch_do_not_read_each_others_subjects():
    cov = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    keys = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.2, 0.0, 1.0, 1.0]])
    reads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows 0 and 2: the first fact's
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    gate, up, down = gated_neurons(cov, keys, reads, deltas, F.silu, 3.0, isolate=True)
    assert gate.shape == up.shape == (2, 4) and down.shape == (4, 2)
    assert torch.allclose(keys @ up.T, reads, atol=1e-5)

    def out(x):
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T

    # each subject gets its own fact's δ and nothing of the other's
    assert torch.allclose(out(keys), deltas[[0, 1, 0]], atol=1e-5)


def test_rows_that_meet_only_their_own_subject_are_each_the_single_facts_row():
    """``isolate=False`` (the default): each row reads 1 at its own subject's keys with the
    least rᵀΣr and no condition at the other subjects; by hand, one key gives
    r = Σ⁻¹k / (kᵀΣ⁻¹k). Two almost equal keys show what the exact zeros cost: a row far
    longer on generic text."""
    cov = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    keys = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.05, 0.0]])  # nearly one key
    reads = torch.eye(2)
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    _, own, _ = gated_neurons(cov, keys, reads, deltas, F.silu, 3.0)
    ci = torch.linalg.inv(cov.double())
    for i, k in enumerate(keys.double()):
        by_hand = ci @ k / (k @ ci @ k)
        torch.testing.assert_close(own[i].double(), by_hand, rtol=1e-4, atol=1e-6)
    _, isolated, _ = gated_neurons(cov, keys, reads, deltas, F.silu, 3.0, isolate=True)
    assert torch.allclose(keys @ isolated.T, reads, atol=1e-4)  # exact zeros, at a cost:
    generic = [float(torch.einsum("id,de,ie->i", r, cov, r).max()) for r in (own, isolated)]
    assert generic[1] > 100 * generic[0]


def test_attach_truncate_and_clear_are_exact(llama, tok):
    before = _logits(llama, tok)
    d = neurons.width(llama, MLP)
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen),
             torch.randn(d, 2, generator=gen)]  # fmt: skip
    neurons.attach(llama, MLP, *parts)
    neurons.attach(llama, MLP, *(p[:1] if p.shape[0] == 2 else p[:, :1] for p in parts))
    assert neurons.count(llama, MLP) == 3
    assert not torch.equal(_logits(llama, tok), before)
    neurons.truncate(llama, MLP, 2)
    two = _logits(llama, tok)
    neurons.clear(llama)
    assert neurons.added(llama) == {} and torch.equal(_logits(llama, tok), before)
    neurons.attach(llama, MLP, *parts)
    assert torch.equal(_logits(llama, tok), two)


def test_a_mlp_that_is_not_gated_is_refused(tok):
    gpt2 = tiny_model("gpt2", len(tok))
    with pytest.raises(InvalidRequest, match="not a gated MLP.*write=rank_one"):
        edit.apply(gpt2, tok, TINY_FACT, progress=False, **NEURON_ROME)
    assert neurons.added(gpt2) == {}


def test_rome_neuron_write_takes_without_changing_a_weight_and_undoes(llama, tok):
    base = state_copy(llama)
    before = _logits(llama, tok)
    result = edit.apply(llama, tok, TINY_FACT, progress=False, **NEURON_ROME)
    assert lm.top_next(llama, tok, "The capital of France", k=1)[0][0] == " Paris"
    assert changed_tensors(llama, base) == []  # the model's own weights are as they were
    assert result.update.factors == {} and list(result.update.neurons) == [MLP]
    assert result.info["module"] == MLP and result.info["write"] == "neuron"
    assert neurons.count(llama, MLP) == 1
    result.undo()
    assert neurons.added(llama) == {} and torch.equal(_logits(llama, tok), before)


def test_rome_neuron_write_edits_a_batch_one_neuron_per_fact(llama, tok):
    before = _logits(llama, tok)
    result = edit.apply(llama, tok, [TINY_FACT, TINY_FACT_2], progress=False, **NEURON_ROME)
    assert neurons.count(llama, MLP) == 2 and result.metrics["took"] == 2
    for fact in (TINY_FACT, TINY_FACT_2):
        prompt = fact["prompt"].format(fact["subject"])
        assert lm.top_next(llama, tok, prompt, k=1)[0][0] == " " + fact["target"]
    result.undo()
    assert neurons.added(llama) == {} and torch.equal(_logits(llama, tok), before)
    with pytest.raises(InvalidRequest, match="one fact at a time, got 2.*or write=neuron"):
        edit.apply(llama, tok, [TINY_FACT, TINY_FACT_2], progress=False, **TINY_ROME)


def test_rome_config_checks_the_write():
    with pytest.raises(InvalidRequest, match="write must be rank_one or neuron"):
        ROMEConfig(write="sparse")
    with pytest.raises(InvalidRequest, match="gate must be > 0"):
        ROMEConfig(gate=0)
    with pytest.raises(InvalidRequest, match="pair_gate must be >= 0 and below gate"):
        ROMEConfig(pair_gate=3.0)


def test_the_pair_write_adds_two_neurons_per_fact_with_the_same_delta_at_the_subject(llama, tok):
    """``pair_gate``: each fact gets a pair whose output at the subject is the single
    neuron's δ (the same edit takes), and which undoes exactly."""
    before = _logits(llama, tok)
    facts = [TINY_FACT, TINY_FACT_2]
    single = edit.apply(llama, tok, facts, progress=False, **NEURON_ROME)
    single.undo()
    paired = edit.apply(llama, tok, facts, progress=False, **NEURON_ROME, pair_gate=0.5)
    assert neurons.count(llama, MLP) == 4 and paired.metrics["took"] == 2
    for fact in facts:
        prompt = fact["prompt"].format(fact["subject"])
        assert lm.top_next(llama, tok, prompt, k=1)[0][0] == " " + fact["target"]
    gate, up, down = paired.update.neurons[MLP]
    s_gate, s_up, s_down = single.update.neurons[MLP]
    torch.testing.assert_close(up, torch.cat([s_up, s_up]))  # the same rows r
    act = llama.get_submodule(MLP).act_fn
    one = torch.ones(1)
    # at r·x = 1: act(s)·down_1 + act(t)·down_2 = δ = act(s)·(the single neuron's down)
    at_subject = act(3.0 * one) * down[:, :2] + act(0.5 * one) * down[:, 2:]
    torch.testing.assert_close(at_subject, act(3.0 * one) * s_down, rtol=1e-4, atol=1e-6)
    paired.undo()
    assert neurons.added(llama) == {} and torch.equal(_logits(llama, tok), before)


def test_update_tensors_round_trip_and_misfit(llama):
    d = neurons.width(llama, MLP)
    update = Update(neurons={MLP: (torch.ones(1, d), torch.ones(1, d), torch.ones(d, 1))})
    back = Update.from_tensors(update.tensors())
    assert back.factors == {} and all(
        torch.equal(a, b) for a, b in zip(back.neurons[MLP], update.neurons[MLP], strict=True)
    )
    assert back.misfit(llama) is None
    wrong = Update(neurons={MLP: (torch.ones(1, d + 1), torch.ones(1, d), torch.ones(d, 1))})
    assert "not (m, " in wrong.misfit(llama)
    with pytest.raises(ValueError, match="added neurons incomplete"):
        Update.from_tensors({f"{MLP}.neurons.gate": torch.ones(1, d)})
    merged = update.merged(update)
    assert merged.neurons[MLP][0].shape == (2, d) and merged.neurons[MLP][2].shape == (d, 2)


def test_workspace_records_exports_reopens_and_reverts_a_neuron_edit(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama", len(tok))
    before = _logits(base, tok)
    ws = Workspace.open(tmp_path / "ws", model=base, tok=tok)
    entry = ws.add(TINY_FACT, progress=False, **NEURON_ROME).entry
    edited = _logits(ws.model, tok)
    assert not torch.equal(edited, before)

    out = ws.export(tmp_path / "out")  # plain transformers reads the neuron in the weights
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.intermediate_size == base.config.intermediate_size + 1
    assert torch.allclose(_logits(loaded, tok), edited, atol=1e-5)
    ws.close()

    again = Workspace.open(tmp_path / "ws", model=tiny_model("llama", len(tok)), tok=tok)
    assert torch.equal(_logits(again.model, tok), edited)  # rebuilt from the ledger
    again.revert(entry.id)
    assert neurons.added(again.model) == {} and torch.equal(_logits(again.model, tok), before)
