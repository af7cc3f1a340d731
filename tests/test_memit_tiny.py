"""MEMIT and AlphaEdit: the closed-form solves on hand-made matrices, batch edits on tiny
random models, the ledger's key history, and ``edit add --file``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import (
    HIDDEN,
    INTERMEDIATE,
    TINY_FACT,
    TINY_FACT_2,
    TINY_ROME,
    TINY_TYPES,
    changed_tensors,
    state_copy,
    tiny_model,
)

import edit
import edit.arch
import edit.config
import edit.hooks
import edit.neurons
from edit import EditError, Fact, InvalidRequest, lm
from edit import methods as registry
from edit.api.workspace import Workspace
from edit.cli import main
from edit.ledger import read_entry
from edit.methods import algebra
from edit.methods.algebra.keys import _shared_length
from edit.methods.alphaedit import AlphaEditConfig
from edit.methods.memit import MEMITConfig
from edit.update import Update

# The tiny models have two blocks: edit both, the last one carries the target. No pull-back
# terms and a small λ: the tiny keys' second moment is ~1e-2 (see tiny.TINY_ROME).
TINY_MEMIT = {k: v for k, v in TINY_ROME.items() if k not in ("layer",)} | {
    "layers": (0, 1),
    "cov_weight": 1.0,
}
TINY_ALPHA = TINY_MEMIT | {"nullspace_threshold": 1.0, "l2": 1e-4}
FACTS = [Fact(**TINY_FACT), Fact(**TINY_FACT_2)]


def _target_logprob(model, tok, fact: Fact) -> float:
    return float(lm.continuation_logprobs(model, tok, [fact.text], [fact.target])[0].sum())


# --------------------------------------------------------------------------- the algebra


def _random_problem(seed=0, d_in=12, d_out=6, n=3):
    g = np.random.default_rng(seed)
    x = g.normal(size=(200, d_in))
    c = x.T @ x / 200
    return c, g.normal(size=(n, d_in)), g.normal(size=(n, d_out))


def test_memit_factors_match_the_closed_form():
    c, k, r = _random_problem()
    lam = 3.0
    a, b = algebra.memit_factors(torch.tensor(c), torch.tensor(k), torch.tensor(r), lam)
    # ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ with keys as columns (the paper's layout), by explicit inverse
    want = r.T @ k @ np.linalg.inv(lam * c + k.T @ k)
    np.testing.assert_allclose((a @ b).double().numpy(), want, rtol=1e-4, atol=1e-5)
    # with λ → 0 and fewer keys than dimensions, every key maps exactly onto its residual
    a, b = algebra.memit_factors(torch.tensor(c), torch.tensor(k), torch.tensor(r), 1e-9)
    np.testing.assert_allclose(((a @ b).double() @ torch.tensor(k).T).T.numpy(), r, atol=1e-3)


def test_alphaedit_leaves_preserved_keys_alone_and_respects_earlier_edits():
    d_in, d_out = 12, 6
    g = np.random.default_rng(1)
    u, _ = np.linalg.qr(g.normal(size=(d_in, d_in)))
    eig = np.array([5.0] * 4 + [1e-6] * 8)  # generic text uses a 4-dim subspace
    c = torch.tensor(u @ np.diag(eig) @ u.T)
    p = algebra.null_space_projector(c, threshold=1e-3)
    np.testing.assert_allclose(float(p.trace()), 8, atol=1e-4)
    keys = torch.tensor(g.normal(size=(3, d_in)))
    resid = torch.tensor(g.normal(size=(3, d_out)))
    a, b = algebra.alphaedit_factors(p, keys, resid, None, l2=1e-6)
    dw = (a @ b).double()
    for i in range(4):  # ΔW k0 = 0 for the preserved directions
        k0 = torch.tensor(u[:, i])
        assert float((dw @ k0).norm()) < 1e-4
    # the edit still takes for the part of each key in the null space
    k_null = (p.double() @ keys.T).T
    np.testing.assert_allclose((dw @ k_null.T).T.numpy(), resid.numpy(), atol=1e-3)
    # the keys of an earlier edit move far less when they are in the history
    earlier = torch.tensor(g.normal(size=(2, d_in)))
    earlier = (p.double() @ earlier.T).T
    a1, b1 = algebra.alphaedit_factors(p, keys, resid, earlier, l2=1e-6)
    without = float(((a @ b).double() @ earlier.T).norm())
    with_history = float(((a1 @ b1).double() @ earlier.T).norm())
    assert with_history < 0.05 * without


def test_alphaedit_cov_weight_damps_generic_keys_the_projector_lets_through():
    # no exact null space: the smallest directions of C still carry generic energy
    d_in, d_out = 12, 6
    g = np.random.default_rng(2)
    u, _ = np.linalg.qr(g.normal(size=(d_in, d_in)))
    eig = np.array([5.0] * 4 + [0.5] * 8)
    c = torch.tensor(u @ np.diag(eig) @ u.T)
    p = algebra.null_space_projector(c, threshold=1.0)  # below the mean: the 8 small ones
    keys = torch.tensor(g.normal(size=(3, d_in)))
    resid = torch.tensor(g.normal(size=(3, d_out)))
    plain = algebra.alphaedit_factors(p, keys, resid, None, l2=1e-3)
    zero = algebra.alphaedit_factors(p, keys, resid, None, l2=1e-3, second_moment=c)
    torch.testing.assert_close(zero[1], plain[1])  # λ = 0 is the paper's update
    damped = algebra.alphaedit_factors(p, keys, resid, None, 1e-3, c, cov_weight=20.0)
    # the explicit form: ΔWᵀ = (P(KKᵀ + λC) + αI)⁻¹ P K Rᵀ
    pd, cd, kd = p.double().numpy(), c.numpy(), keys.numpy()
    x = np.linalg.solve(pd @ (kd.T @ kd + 20.0 * cd) + 1e-3 * np.eye(d_in), pd @ kd.T)
    np.testing.assert_allclose((damped[0] @ damped[1]).double().numpy(), resid.numpy().T @ x.T,
                               rtol=1e-4, atol=1e-5)  # fmt: skip

    def generic_energy(factors):  # E‖ΔW k0‖² over keys with second moment C
        dw = (factors[0] @ factors[1]).double()
        return float(torch.trace(dw @ c @ dw.T))

    assert generic_energy(damped) < 0.5 * generic_energy(plain)
    with pytest.raises(ValueError, match="second moment"):
        algebra.alphaedit_factors(p, keys, resid, None, 1e-3, cov_weight=2.0)


def test_chunked_value_solving_equals_one_batch(llama, tok):
    module = edit.arch.lookup(llama).mlp_out_name(1)
    cfg = MEMITConfig(**TINY_MEMIT | {"nll_stop": 1e-9, "steps": 5})  # every fact runs 5 steps
    templates = algebra.context_templates(llama, tok, cfg.context_templates)
    args = (llama, tok, module, FACTS, templates, cfg.value_settings())
    whole = algebra.solve_values(*args, progress=False)
    chunked = algebra.solve_values(*args, progress=False, max_rows=len(templates) + 1)
    torch.testing.assert_close(chunked.deltas, whole.deltas, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked.keys, whole.keys)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_keys_and_hidden_match_whole_prompts_run_one_by_one(tok, model_type):
    """The key pass stops at the lookup token and at the block; it must read what a plain
    forward pass of every templated prompt reads there (mean over the prompts of a fact)."""
    model = tiny_model(model_type, len(tok))
    arch = edit.arch.lookup(model)
    module, block = arch.mlp_out_name(0), arch.block(1)
    templates = ["{}", "A short prefix. {}", "x. {}"]
    facts = FACTS + [Fact("{} is made of", "The big red chair", "wood")]
    embedded = []  # tokens the key pass runs through the model
    count = model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: embedded.append(int(i[0].ne(lm.pad_id(tok)).sum()))
    )
    try:
        keys, hidden = algebra.keys_and_hidden(model, tok, facts, templates, module, block,
                                               max_rows=2)  # fmt: skip
    finally:
        count.remove()
    want_k, want_h, row_tokens = [], [], 0
    for fact in facts:
        ks, hs = [], []
        for template in templates:
            text, idx = lm.subject_last_index(tok, template.format(fact.prompt), fact.subject)
            ids = torch.tensor([lm.encode(tok, text)])
            row_tokens += idx + 1
            with torch.no_grad(), edit.hooks.Trace(model, module, retain_input=True) as k, \
                    edit.hooks.Trace(model, block, retain_output=True) as h:  # fmt: skip
                model(input_ids=ids)
            width = ids.shape[1]
            ks.append(k.input.reshape(width, -1)[idx])
            out = h.output[0] if isinstance(h.output, tuple) else h.output
            hs.append(out.reshape(width, -1)[idx])
        want_k.append(torch.stack(ks).mean(0))
        want_h.append(torch.stack(hs).mean(0))
    torch.testing.assert_close(keys, torch.stack(want_k), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden, torch.stack(want_h), rtol=1e-4, atol=1e-5)
    # the tokens the facts share under a template (start token, prefix text) ran once per
    # template, not once per fact: fewer tokens than the rows hold
    assert sum(embedded) < row_tokens - 2 * len(tok("A short prefix.").input_ids)


def test_shared_length_leaves_every_row_a_token():
    assert _shared_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert _shared_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert _shared_length([[7], [7, 8]]) == 0
    assert _shared_length([[1, 2], [3, 2]]) == 0


def test_value_optimization_runs_plain_attention_on_cpu_and_restores_it(tok):
    """With PyTorch's fused attention the model runs the plain one while δ is optimized (the
    fused backward is slow on CPU), computes the same δ, and gets its own back after."""
    facts = FACTS
    cfg = MEMITConfig(**TINY_MEMIT | {"nll_stop": 1e-9, "steps": 4, "value_dtype": "float32"})
    eager = tiny_model("llama", len(tok))  # the tiny models are built with plain attention
    module = edit.arch.lookup(eager).mlp_out_name(1)
    templates = algebra.context_templates(eager, tok, cfg.context_templates)
    want = algebra.solve_values(eager, tok, module, facts, templates, cfg.value_settings(),
                                progress=False)  # fmt: skip
    fused = tiny_model("llama", len(tok))
    fused.set_attn_implementation("sdpa")
    seen = []
    hook = fused.get_submodule(module).register_forward_hook(
        lambda m, i, o: seen.append(fused.config._attn_implementation)
    )
    try:
        got = algebra.solve_values(fused, tok, module, facts, templates, cfg.value_settings(),
                                   progress=False)  # fmt: skip
    finally:
        hook.remove()
    assert set(seen) == {"eager"}
    assert fused.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got.deltas, want.deltas, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"), lm.eager_attention_on_cpu(fused):
        assert fused.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert fused.config._attn_implementation == "sdpa"  # restored after an error too
    with lm.eager_attention_on_cpu(eager):  # a model already on plain attention: untouched
        assert eager.config._attn_implementation == "eager"


# --------------------------------------------------------------------------- batch edits


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt", "qwen3"])
def test_batch_methods_edit_two_facts_at_once(tok, model_type, method):
    model = tiny_model(model_type, len(tok))
    settings = TINY_ALPHA if method == "alphaedit" else TINY_MEMIT
    config = registry.get(method).config_class(**settings)
    names = [edit.arch.lookup(model).mlp_out_name(i) for i in (0, 1)]
    base = state_copy(model)
    before = [_target_logprob(model, tok, f) for f in FACTS]

    out = registry.get(method).compute(model, tok, FACTS, config, progress=False)
    assert changed_tensors(model, base) == []  # computing does not edit
    assert out.layers == [0, 1] and sorted(out.update.factors) == sorted(names)
    for name in names:
        a, b = out.update.factors[name]
        assert a.shape == (HIDDEN, 2) and b.shape == (2, INTERMEDIATE)
        assert out.update.keys[name].shape == (2, INTERMEDIATE)
    # the second layer is solved for what the first left missing: less than at the start
    first, second = out.info["layer_steps"]
    assert second["missing_norm"] < first["missing_norm"]

    handle = out.update.apply(model)
    after = [_target_logprob(model, tok, f) for f in FACTS]
    for b0, a0 in zip(before, after, strict=True):
        assert a0 > b0 + 0.1, (before, after)
    handle.undo()
    assert changed_tensors(model, base) == []


def test_apply_takes_a_list_and_refuses_it_for_rome(llama, tok):
    base = state_copy(llama)
    result = edit.apply(llama, tok, [TINY_FACT, TINY_FACT_2], method="memit", progress=False,
                        **TINY_MEMIT)  # fmt: skip
    m = result.metrics
    assert result.facts == FACTS and m["facts"] == 2 and m["took"] == 2 and m["not_taken"] == []
    assert all(f["p_new_after"] > f["p_new_before"] for f in m["per_fact"])
    result.undo()
    assert changed_tensors(llama, base) == []
    with pytest.raises(InvalidRequest, match="one fact at a time, got 2"):
        edit.apply(llama, tok, FACTS, method="rome", progress=False, **TINY_ROME)
    with pytest.raises(InvalidRequest, match="list is empty"):
        edit.apply(llama, tok, [], method="memit", progress=False)
    with pytest.raises(InvalidRequest, match="layers must be in 0..1"):
        edit.apply(llama, tok, FACTS, method="memit", progress=False, layers=(1, 2))
    assert changed_tensors(llama, base) == []


def _weak_first_calls(monkeypatch, weak: int, spared: int = 0) -> list:
    """MEMIT whose first ``weak`` updates write nothing for the facts after the first
    ``spared`` (their columns of A are 0): those facts do not take in such a round. Returns
    the calls made: (facts, history)."""
    real = registry.get("memit")
    calls = []

    def compute(model, tok, facts, config, **kw):
        out = real.compute(model, tok, facts, config, **kw)
        calls.append((len(facts), kw.get("history")))
        if len(calls) <= weak:
            out.update.factors = {
                m: (torch.cat([a[:, :spared], 0 * a[:, spared:]], 1), b)
                for m, (a, b) in out.update.factors.items()
            }
        return out

    monkeypatch.setitem(registry._REGISTRY, "memit", dataclasses.replace(real, compute=compute))
    return calls


def test_facts_that_did_not_take_are_edited_again_on_top(llama, tok, monkeypatch):
    calls = _weak_first_calls(monkeypatch, weak=1, spared=1)
    base = state_copy(llama)
    result = edit.apply(llama, tok, FACTS, method="memit", progress=False, **TINY_MEMIT)
    m = result.metrics
    assert m["took"] == 2 and m["retried"] == [{"facts": 1, "took": 1, "kept": True}]
    # the second round edited the second fact with the first one's keys as history, and
    # the update holds both rounds
    assert [n for n, _ in calls] == [2, 1]
    first_round_keys = {n: k[:1] for n, k in result.update.keys.items()}
    assert calls[1][1].keys() == first_round_keys.keys()
    for n, k in calls[1][1].items():
        torch.testing.assert_close(k, first_round_keys[n])
    for a, b in result.update.factors.values():
        assert a.shape == (HIDDEN, 3) and b.shape == (3, INTERMEDIATE)
    result.undo()
    assert changed_tensors(llama, base) == []


@pytest.mark.parametrize("rounds", [0, 2])
def test_a_batch_that_never_takes_leaves_the_model_unchanged(llama, tok, monkeypatch, rounds):
    calls = _weak_first_calls(monkeypatch, weak=10)
    base = state_copy(llama)
    with pytest.raises(EditError, match="none of the 2 edits took"):
        edit.apply(llama, tok, FACTS, method="memit", progress=False,
                   **TINY_MEMIT | {"retry_rounds": rounds})  # fmt: skip
    # a round that takes no more facts ends the retries
    assert len(calls) == 1 + min(rounds, 1)
    assert changed_tensors(llama, base) == []


def test_a_batch_defaults_to_neurons_where_romes_tuned_config_writes_them(tok):
    from conftest import real_environment

    from edit.api.workspace import default_method

    model = tiny_model("llama", len(tok))
    assert default_method(True, True, model) == "alphaedit"  # tests ignore tuned configs
    with real_environment():
        _neuron_batches_by_config(model)


def _neuron_batches_by_config(model) -> None:
    from edit.api.workspace import default_method

    # the default model's ROME config writes neurons: its batches are ROME's, before loading
    # (by the source's name) and after (by the loaded model's)
    assert default_method(True, False, "SmolLM2-135M-Instruct") == "rome"
    assert default_method(True, True, "some-org/SmolLM2-135M-Instruct") == "rome"
    assert default_method(True, True, model) == "alphaedit"  # no tuned ROME config
    model.edit_source = "SmolLM2-135M-Instruct"
    assert default_method(True, True, model) == "rome"
    # a model without a tuned config keeps MEMIT, then AlphaEdit; one fact is ROME's
    assert default_method(True, False, "no-such-org/no-such-model") == "memit"
    assert default_method(True, True, "no-such-org/no-such-model") == "alphaedit"
    assert default_method(False, True, "no-such-org/no-such-model") == "rome"


def test_workspace_batches_carry_their_keys_and_revert_exactly(tmp_path, tok):
    model = tiny_model("llama", len(tok))
    base = state_copy(model)
    ws = Workspace.open(tmp_path / "ws", model=model, tok=tok)
    assert ws.default_method(batch=True) == "memit" and ws.default_method(batch=False) == "rome"
    change = ws.add([TINY_FACT], progress=False, **TINY_MEMIT)
    first, res = change.entry, change.result
    assert first.method == "memit" and first.facts == [FACTS[0]]
    # a workspace with edits protects them: the next batch is AlphaEdit and sees their keys
    assert ws.default_method(batch=True) == "alphaedit"
    history = ws.history()
    assert {m: k.shape for m, k in history.items()} == {
        n: (1, INTERMEDIATE) for n in res.update.factors
    }
    change = ws.add([TINY_FACT_2], progress=False, **TINY_ALPHA)
    second, res2 = change.entry, change.result
    assert second.method == "alphaedit"
    assert res2.info["previous_keys"] == {n: 1 for n in res.update.factors}
    assert all(v.shape[0] == 2 for v in ws.history().values())
    reread = read_entry(second.path)
    for name, k in res2.update.keys.items():
        assert torch.equal(reread.update.keys[name], k)
    ws.revert(second.id)
    ws.revert(first.id)
    assert changed_tensors(ws.model, base) == []


# --------------------------------------------------------------------------- edit add --file


def _tuned(monkeypatch):
    yaml_like = {k: [list(s) for s in v] if k == "context_templates" else v
                 for k, v in TINY_MEMIT.items() if k != "stats_tokens"}  # fmt: skip
    yaml_like["layers"] = list(yaml_like["layers"])
    monkeypatch.setattr(
        edit.config, "config_file", lambda method, model: (f"{method}/tiny.yaml", yaml_like)
    )


def test_add_file_records_one_batch(tmp_path, model_dir, capsys, monkeypatch):
    _tuned(monkeypatch)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"statement": "The capital of [France] [Paris]"}) + "\n\n"
                     + json.dumps(TINY_FACT_2) + "\n")  # fmt: skip
    ws = str(tmp_path / "ws")
    assert main(["add", "--file", str(facts), "-w", ws, "-m", model_dir]) == 0
    out = capsys.readouterr().out
    assert "read 2 facts" in out and "edited 2 facts in one MEMIT update" in out
    assert "2/2 took" in out and "facts per minute" in out
    [entry] = Workspace.inspect(ws).entries()
    assert entry.method == "memit" and len(entry.facts) == 2 and entry.layers == [0, 1]


def test_add_file_takes_config_settings_from_set(tmp_path, model_dir, capsys, monkeypatch):
    _tuned(monkeypatch)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in (TINY_FACT, TINY_FACT_2)))
    ws = str(tmp_path / "ws")
    argv = ["add", "--file", str(facts), "-w", ws, "-m", model_dir, "--method", "alphaedit"]
    extra = ["--set", "stop_most_probable=true", "--set", "null_cov_weight=2.5", "--steps", "7"]
    assert main(argv + extra) == 0
    [entry] = Workspace.inspect(ws).entries()
    assert entry.method == "alphaedit"
    assert entry.config["stop_most_probable"] is True and entry.config["null_cov_weight"] == 2.5
    assert entry.config["steps"] == 7


def test_add_file_on_a_workspace_with_edits_checks_alphaedit_settings(
    tmp_path, model_dir, capsys, monkeypatch
):
    """A batch on a workspace with history is AlphaEdit's, decided before loading: its own
    settings are checked then (a bad one refused without loading the model) and taken
    without ``--method``, and the entry is AlphaEdit's."""
    _tuned(monkeypatch)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in (TINY_FACT, TINY_FACT_2)))
    ws = str(tmp_path / "ws")
    assert main(["add", "--file", str(facts), "-w", ws, "-m", model_dir]) == 0
    argv = ["add", "--file", str(facts), "-w", ws, "--set"]
    loads = []
    real_open = Workspace.open
    monkeypatch.setattr(Workspace, "open", lambda *a, **k: loads.append(1) or real_open(*a, **k))
    assert main([*argv, "null_cov_weight=-1"]) == 2
    assert "null_cov_weight must be >= 0" in capsys.readouterr().err and loads == []
    assert main([*argv, "null_cov_weight=2.5"]) == 0
    first, second = Workspace.inspect(ws).entries()
    assert (first.method, second.method) == ("memit", "alphaedit")
    assert second.config["null_cov_weight"] == 2.5


def test_add_file_says_what_the_retry_round_did(tmp_path, model_dir, capsys, monkeypatch):
    _tuned(monkeypatch)
    _weak_first_calls(monkeypatch, weak=1, spared=1)
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in (TINY_FACT, TINY_FACT_2)))
    ws = str(tmp_path / "ws")
    assert main(["add", "--file", str(facts), "-w", ws, "-m", model_dir]) == 0
    out = capsys.readouterr().out
    assert "2/2 took" in out and "edited again the 1 that did not take: 1 took" in out
    [entry] = Workspace.inspect(ws).entries()
    assert entry.metrics["retried"] == [{"facts": 1, "took": 1, "kept": True}]
    assert {k.shape[0] for k in entry.update.keys.values()} == {3}  # both rounds' keys


@pytest.mark.parametrize(
    "lines, says",
    [
        (['{"statement": "The capital of [France] [Paris]"}', '{"statement": '],
         "line 2: not valid JSON"),
        (['{"statement": "The capital of [France] [Paris]"}', "", '{"prompt": "x {}"}'],
         "line 3: request is missing subject, target"),
        (['{"statement": "hello"}'], "line 1: cannot parse"),
    ],
)  # fmt: skip
def test_add_file_with_a_bad_line_applies_nothing(tmp_path, model_dir, capsys, lines, says):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(lines) + "\n")
    ws = tmp_path / "ws"
    assert main(["add", "--file", str(facts), "-w", str(ws), "-m", model_dir]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not ws.exists()


def test_add_needs_a_statement_or_a_file_and_a_valid_layer(tmp_path, model_dir, capsys):
    ws = str(tmp_path / "ws")
    assert main(["add", "-w", ws, "-m", model_dir]) == 2
    assert "nothing to edit" in capsys.readouterr().err
    assert main(["add", "The capital of [France] [Paris]", "--layer", "0-x", "-w", ws]) == 2
    assert "--layer '0-x'" in capsys.readouterr().err
    assert main(["add", "The capital of [France] [Paris]", "--layer", "0,1", "-w", ws]) == 2
    assert "edits one layer" in capsys.readouterr().err


def test_config_errors_name_the_setting():
    with pytest.raises(InvalidRequest, match="layers must be increasing"):
        MEMITConfig(layers=(3, 2))
    with pytest.raises(InvalidRequest, match="cov_weight must be > 0"):
        MEMITConfig(cov_weight=0)
    with pytest.raises(InvalidRequest, match="nullspace_threshold must be > 0"):
        AlphaEditConfig(nullspace_threshold=-1)
    with pytest.raises(InvalidRequest, match="null_cov_weight must be >= 0"):
        AlphaEditConfig(null_cov_weight=-1)
    with pytest.raises(InvalidRequest, match="retry_rounds must be >= 0"):
        MEMITConfig(retry_rounds=-1)
    with pytest.raises(InvalidRequest, match="write must be rank_one or neuron"):
        MEMITConfig(write="neurons")
    with pytest.raises(InvalidRequest, match="AlphaEdit projects a weight update"):
        AlphaEditConfig(write="neuron")
    with pytest.raises(EditError, match="unknown method"):
        registry.get("memit2")


def test_memit_writes_each_layers_share_as_neurons_read_on_the_model_as_it_stands(llama, tok):
    """``write: neuron``: every layer gets one neuron pair per fact, whose row reads 1 at the
    fact's mean key and bare-prompt key at that layer, as the earlier layers' neurons left
    the model; the pair adds its fact's share there; applied, the facts take."""
    from edit.methods.algebra import Contexts, keys_and_hidden

    s, t = 3.0, 0.5
    config = MEMITConfig(**TINY_MEMIT, write="neuron", pair_gate=t)
    base = state_copy(llama)
    before = [_target_logprob(llama, tok, f) for f in FACTS]
    out = registry.get("memit").compute(llama, tok, FACTS, config, progress=False)
    assert changed_tensors(llama, base) == [] and not edit.neurons.added(llama)
    mlps = [edit.arch.lookup(llama).mlp_name(i) for i in (0, 1)]
    assert out.update.factors == {} and sorted(out.update.neurons) == mlps
    contexts = Contexts.of(out.info["context_templates"], config)
    earlier = []
    for mlp in mlps:
        gate, up, down = out.update.neurons[mlp]
        assert gate.shape == up.shape == (4, HIDDEN) and down.shape == (HIDDEN, 4)
        for keys in (keys_and_hidden(llama, tok, FACTS, contexts, mlp, mlp)[0],
                     keys_and_hidden(llama, tok, FACTS, ["{}"], mlp, mlp)[0]):  # fmt: skip
            reads = up[:2] @ keys.T  # fact i's first neuron at fact j's key
            assert torch.allclose(reads.diagonal(), torch.ones(2), atol=1e-3)
            assert torch.allclose(gate[2:] @ keys.T, t * reads, atol=1e-4)
        assert torch.allclose(gate[:2], s * up[:2]) and torch.allclose(up[2:], up[:2])
        assert torch.allclose(down[:, 2:], -(s / t) * down[:, :2])  # the pair cancels its squares
        # the next layer's keys are read with this layer's neurons in place
        earlier.append(Update(neurons={mlp: (gate, up, down)}).apply(llama))
    for handle in reversed(earlier):
        handle.undo()
    assert changed_tensors(llama, base) == [] and not edit.neurons.added(llama)

    handle = out.update.apply(llama)
    after = [_target_logprob(llama, tok, f) for f in FACTS]
    assert all(a > b + 0.1 for a, b in zip(after, before, strict=True)), (before, after)
    handle.undo()
    assert changed_tensors(llama, base) == [] and not edit.neurons.added(llama)


def test_memit_erases_a_batch(llama, tok):
    before = [_target_logprob(llama, tok, f) for f in FACTS]
    out = registry.get("memit").compute(
        llama, tok, FACTS, MEMITConfig(**TINY_MEMIT), objective="erase", progress=False
    )
    handle = out.update.apply(llama)
    after = [_target_logprob(llama, tok, f) for f in FACTS]
    handle.undo()
    for b0, a0 in zip(before, after, strict=True):
        assert a0 < b0 - 0.1, (before, after)
