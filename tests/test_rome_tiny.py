"""ROME on a tiny random model of every supported architecture, and its input checks."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    HIDDEN,
    INTERMEDIATE,
    TINY_FACT,
    TINY_ROME,
    TINY_TYPES,
    changed_tensors,
    state_copy,
    tiny_model,
)

import edit
import edit.arch
from edit import EditError, EditFailed, Fact, InvalidRequest, lm
from edit import methods as registry
from edit.methods import MethodOutput
from edit.methods.algebra.objectives import OBJECTIVES
from edit.methods.rome import ROMEConfig
from edit.update import Update

TYPES = TINY_TYPES


def _prompt_logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([lm.encode(tok, text)])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()


@pytest.mark.parametrize("model_type", TYPES)
def test_rome_edits_every_architecture(tok, model_type):
    model = tiny_model(model_type, len(tok))
    fact = Fact(**TINY_FACT)
    rome = registry.get("rome")
    config = ROMEConfig(**TINY_ROME)
    name = edit.arch.lookup(model).mlp_out_name(config.layer)
    base = state_copy(model)
    logits0 = _prompt_logits(model, tok, fact.text)
    lp0 = float(lm.continuation_logprobs(model, tok, [fact.text], [fact.target])[0].sum())

    out = rome.compute(model, tok, [fact], config, progress=False)
    assert isinstance(out, MethodOutput)
    assert changed_tensors(model, base) == []  # computing does not edit
    assert out.layers == [config.layer]
    assert list(out.update.factors) == [name]
    a, b = out.update.factors[name]
    assert a.shape == (HIDDEN, 1) and b.shape == (1, INTERMEDIATE)
    assert out.update.is_finite()
    assert out.info["loss_end"] < out.info["loss_start"]

    handle = out.update.apply(model)
    assert changed_tensors(model, base) == [f"{name}.weight"]
    logits1 = _prompt_logits(model, tok, fact.text)
    lp1 = float(lm.continuation_logprobs(model, tok, [fact.text], [fact.target])[0].sum())
    assert not torch.allclose(logits0, logits1, atol=1e-4)
    # Random 2-layer models cap how far one edit moves the logits; 0.1 nats is ~15x above
    # the noise of a no-op and below the smallest gain seen (gemma3_text, ~0.15).
    assert lp1 > lp0 + 0.1, (lp0, lp1)

    handle.undo()
    assert changed_tensors(model, base) == []
    torch.testing.assert_close(_prompt_logits(model, tok, fact.text), logits0, rtol=0, atol=0)


def test_statistics_fit_the_models_context(tok):
    model = tiny_model("gpt2", len(tok))
    config = ROMEConfig(**{**TINY_ROME, "stats_tokens": 2000})
    registry.get("rome").compute(model, tok, [Fact(**TINY_FACT)], config, progress=False)


# --------------------------------------------------------------------------- edit.apply


def test_apply_is_a_transaction_that_takes_and_undoes(llama, tok):
    base = state_copy(llama)
    result = edit.apply(llama, tok, TINY_FACT, progress=False, **TINY_ROME)
    m = result.metrics
    assert result.kind == "insert" and result.method == "rome"
    assert result.facts == [Fact(**TINY_FACT)]
    assert m["p_new_after"] > m["p_new_before"]
    assert m["p_new_after"] > m["p_old_after"]
    # the edited model now says the target next
    assert lm.top_next(llama, tok, Fact(**TINY_FACT).text, k=1)[0][0] == " Paris"
    assert changed_tensors(llama, base) == [f"{edit.arch.lookup(llama).mlp_out_name(1)}.weight"]
    assert result.config == ROMEConfig(**TINY_ROME)
    result.undo()
    assert changed_tensors(llama, base) == []


def _fake_rome(monkeypatch, update_for):
    """Replace the registered ROME by one that returns ``update_for(model)``."""
    real = registry.get("rome")

    def compute(model, tok, facts, config, *, objective="insert", progress=True, history=None):
        return MethodOutput(update_for(model), [config.layer], {"module": "fake"})

    monkeypatch.setitem(
        registry._REGISTRY, "rome", registry.Method("rome", real.config_class, compute)
    )


def test_apply_refuses_a_non_finite_update(llama, tok, monkeypatch):
    def nan_update(model):
        name = edit.arch.lookup(model).mlp_out_name(1)
        return Update({name: (torch.full((HIDDEN, 1), float("nan")), torch.ones(1, INTERMEDIATE))})

    _fake_rome(monkeypatch, nan_update)
    base = state_copy(llama)
    with pytest.raises(EditFailed, match="non-finite update"):
        edit.apply(llama, tok, TINY_FACT, progress=False, **TINY_ROME)
    assert changed_tensors(llama, base) == []


def test_apply_rolls_back_an_edit_that_did_not_take(llama, tok, monkeypatch):
    # a real (random) change of the weights, then the check says it did not take
    def big_update(model):
        name = edit.arch.lookup(model).mlp_out_name(1)
        g = torch.Generator().manual_seed(0)
        return Update(
            {name: (torch.randn(HIDDEN, 1, generator=g), torch.randn(1, INTERMEDIATE, generator=g))}
        )

    seen = []

    def did_not_take(kind, metrics):
        seen.append(changed_tensors(llama, base))  # the update is in place when checked
        return "forced by the test"

    _fake_rome(monkeypatch, big_update)
    monkeypatch.setattr("edit.api.edits._did_not_take", did_not_take)
    base = state_copy(llama)
    with pytest.raises(EditFailed, match=r"did not take \(forced by the test\)"):
        edit.apply(llama, tok, TINY_FACT, progress=False, **TINY_ROME)
    # checked after the first update and again after the retry round on top of it
    assert seen == [[f"{edit.arch.lookup(llama).mlp_out_name(1)}.weight"]] * 2
    assert changed_tensors(llama, base) == []  # restored bit for bit


def test_an_edit_that_did_not_take_is_edited_again_on_top(llama, tok, monkeypatch):
    name = edit.arch.lookup(llama).mlp_out_name(1)
    g = torch.Generator().manual_seed(0)
    updates = [
        Update({name: (torch.randn(HIDDEN, 1, generator=g), torch.randn(1, INTERMEDIATE,
                                                                         generator=g))})
        for _ in range(2)
    ]  # fmt: skip
    _fake_rome(monkeypatch, lambda model: updates.pop(0))
    verdicts = ["forced by the test", None]  # the first update does not take, both do
    monkeypatch.setattr("edit.api.edits._did_not_take", lambda kind, m: verdicts.pop(0))
    base = state_copy(llama)
    result = edit.apply(llama, tok, TINY_FACT, progress=False, **TINY_ROME)
    assert result.metrics["retried"] == [{"facts": 1, "took": 1, "kept": True}]
    a, b = result.update.factors[name]
    assert a.shape == (HIDDEN, 2) and b.shape == (2, INTERMEDIATE)
    result.undo()
    assert changed_tensors(llama, base) == []
    with pytest.raises(InvalidRequest, match="retry_rounds must be >= 0"):
        edit.apply(llama, tok, TINY_FACT, progress=False, **TINY_ROME | {"retry_rounds": -1})


def test_an_insertion_gives_the_method_the_object_the_model_asserts_now(llama, tok, monkeypatch):
    """Where the request names no old object, the method gets the model's own answer (its
    greedy completion's opening, an article dropped) as ``target_true``, for the ranked
    pairs; a request that names one keeps it, and the recorded fact is the request."""
    seen: list = []
    real = registry.get("rome")

    def compute(model, tok, facts, config, **kw):
        seen.extend(facts)
        return real.compute(model, tok, facts, config, **kw)

    monkeypatch.setitem(registry._REGISTRY, "rome",
                        registry.Method("rome", real.config_class, compute))  # fmt: skip
    monkeypatch.setattr("edit.api.edits.old_object", lambda model, tok, fact: fact.target_true
                        or "The Old Object")  # fmt: skip
    fact = Fact(TINY_FACT["prompt"], TINY_FACT["subject"], TINY_FACT["target"])
    result = edit.apply(llama, tok, fact, progress=False, **TINY_ROME)
    assert seen[-1].target_true == "Old Object"
    assert result.facts[0].target_true is None
    result.undo()
    named = Fact(fact.prompt, fact.subject, fact.target, "Known")
    edit.apply(llama, tok, named, progress=False, **TINY_ROME).undo()
    assert seen[-1].target_true == "Known"
    monkeypatch.setattr("edit.api.edits.old_object", lambda model, tok, fact: "x\x13y")  # no object
    edit.apply(llama, tok, fact, progress=False, **TINY_ROME).undo()
    assert seen[-1].target_true is None


def test_did_not_take_rules():
    from edit.api.edits import _did_not_take

    ok = {"p_new_before": 0.1, "p_new_after": 0.5, "p_old_after": 0.2}
    assert _did_not_take("insert", ok) is None
    assert "not above" in _did_not_take("insert", {**ok, "p_old_after": 0.5})
    assert "did not increase" in _did_not_take(
        "insert", {**ok, "p_new_before": 0.5, "p_old_after": 0.1}
    )
    erase = {"old_is_top_after": False, "p_old_before": 0.5, "p_old_after": 0.01}
    assert _did_not_take("erase", erase) is None
    assert "still the top" in _did_not_take("erase", {**erase, "old_is_top_after": True})
    assert "less than 10x" in _did_not_take("erase", {**erase, "p_old_after": 0.1})


# --------------------------------------------------------------------------- input checks


def test_registry_lists_rome():
    assert "rome" in registry.names()
    assert registry.get("ROME").name == "rome"  # case-insensitive
    assert registry.get("rome").config_class is ROMEConfig


def test_unknown_method_lists_the_known_ones(llama, tok):
    with pytest.raises(EditError) as info:
        registry.get("memit-xl")
    message = str(info.value)
    assert "unknown method 'memit-xl'" in message and "rome" in message
    base = state_copy(llama)
    with pytest.raises(EditError, match="choose one of .*rome"):
        edit.apply(llama, tok, TINY_FACT, method="nope", progress=False)
    assert changed_tensors(llama, base) == []


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"layer": -1}, "layer"),
        ({"steps": 0}, "steps"),
        ({"stats_tokens": 0}, "stats_tokens"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.5}, "lr"),
        ({"clamp_norm": 0.0}, "clamp_norm"),
        ({"nll_stop": -1.0}, "nll_stop"),
        ({"kl_factor": -0.1}, "kl_factor"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"erase_ratio": 1.0}, "erase_ratio"),
        ({"context_templates": ((5,),)}, "context_templates"),
        ({"context_templates": ((5, 10, 1),)}, "context_templates"),
        ({"context_templates": ((0, 10),)}, "context_templates"),
        ({"context_templates": ((5, -1),)}, "context_templates"),
    ],
)
def test_rome_config_validation(settings, field):
    with pytest.raises(InvalidRequest, match=field):
        ROMEConfig(**settings)


def test_rome_config_accepts_edge_values():
    c = ROMEConfig(layer=0, steps=1, context_templates=(), kl_factor=0.0, weight_decay=0.0)
    assert c.layer == 0 and c.context_templates == ()


def test_bad_settings_through_apply(llama, tok):
    base = state_copy(llama)
    with pytest.raises(InvalidRequest, match="steps must be >= 1"):
        edit.apply(llama, tok, TINY_FACT, progress=False, **{**TINY_ROME, "steps": 0})
    with pytest.raises(InvalidRequest, match="unknown rome setting.*learning_rate"):
        edit.apply(llama, tok, TINY_FACT, progress=False, learning_rate=0.1)
    assert changed_tensors(llama, base) == []


@pytest.mark.parametrize("layer", [2, 50])
def test_layer_out_of_range(llama, tok, layer):
    config = ROMEConfig(**{**TINY_ROME, "layer": layer})
    with pytest.raises(InvalidRequest, match=rf"layer must be in 0\.\.1, got {layer}"):
        registry.get("rome").compute(llama, tok, [Fact(**TINY_FACT)], config, progress=False)


def test_no_tuned_layer_falls_back_to_a_sixth_of_the_depth_and_says_so(llama, tok, caplog):
    config = ROMEConfig(**{**TINY_ROME, "layer": None})
    out = registry.get("rome").compute(llama, tok, [Fact(**TINY_FACT)], config, progress=False)
    assert out.layers == [0]  # 2 layers // 6
    assert list(out.update.factors) == ["model.layers.0.mlp.down_proj"]
    assert "no tuned ROME config" in caplog.text


def test_rome_edits_one_fact_at_a_time(llama, tok):
    facts = [Fact(**TINY_FACT), Fact(prompt="The capital of {}", subject="Spain", target="Madrid")]
    with pytest.raises(InvalidRequest, match="one fact at a time"):
        registry.get("rome").compute(llama, tok, facts, ROMEConfig(**TINY_ROME), progress=False)


@pytest.mark.parametrize("model_type", TYPES)
def test_value_rows_after_a_cached_prefix_match_the_whole_rows(tok, model_type):
    """The value optimization runs each row from its subject's last token on, after a
    left-padded key/value cache of the tokens before it: its logits must be those of the
    whole row run alone, on every architecture (positions, masks, cache)."""
    from edit.methods.algebra.batch import build_batch

    model = tiny_model(model_type, len(tok))
    facts = [Fact(**TINY_FACT), Fact("{} was born in", "Marie Curie", "Warsaw, Poland")]
    templates = ["{}", "A short text. {}", "Here is a much longer piece of text first. {}"]
    b = build_batch(tok, facts, templates, "cpu")
    rows, cols = torch.cat([b.tgt_row, b.kl_row]), torch.cat([b.tgt_col, b.kl_col])
    with torch.no_grad():
        cache = lm.prefix_cache(model, b.prefix_ids, b.prefix_mask, b.prefix_pos)
        cached = lm.logits_at(model, b.ids, b.mask, rows, cols, position_ids=b.pos, cache=cache)
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            prefix = b.prefix_ids[r][b.prefix_mask[r].bool()]
            seq = torch.cat([prefix, b.ids[r, : c + 1]])[None]
            whole = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            torch.testing.assert_close(cached[i], whole.float(), atol=2e-5, rtol=1e-4)
    assert len(set(b.pos[:, 0].tolist())) > 1  # the lookups sit at different positions


@pytest.mark.parametrize("model_type", TYPES)
def test_packed_rows_give_each_row_the_logits_it_has_alone(tok, model_type):
    """Rows packed side by side in fewer sequences (their prefixes side by side in the cache,
    a block-diagonal causal mask): every position's logits must be those of its whole row
    run alone, on every architecture and with either attention; and the packing must save
    token slots where it packs at all."""
    from edit.methods.algebra.batch import build_batch
    from edit.methods.algebra.packing import pack, packs

    model = tiny_model(model_type, len(tok))
    facts = [Fact(**TINY_FACT), Fact("{} was born in", "Marie Curie", "Warsaw, Poland, in 1867")]
    templates = ["{}", "A short text. {}", "Here is a much longer piece of text first. {}"]
    b = build_batch(tok, facts, templates, "cpu")
    rows, cols = torch.cat([b.tgt_row, b.kl_row]), torch.cat([b.tgt_col, b.kl_col])
    ran = []
    for attention in ("sdpa", "eager"):  # a boolean 4-D mask, an additive one
        try:
            model.set_attn_implementation(attention)
        except (ValueError, ImportError):  # an architecture without fused attention
            continue
        ran.append(attention)
        with torch.no_grad():
            pk = pack(b, model)
            seq, col = pk.split(pk.flat(rows, cols))
            packed = lm.logits_at(model, pk.ids, pk.mask, seq, col, position_ids=pk.pos,
                                  cache=pk.prefix_cache(model))  # fmt: skip
            for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
                prefix = b.prefix_ids[r][b.prefix_mask[r].bool()]
                seq_r = torch.cat([prefix, b.ids[r, : c + 1]])[None]
                whole = model(input_ids=seq_r, attention_mask=torch.ones_like(seq_r)).logits
                torch.testing.assert_close(packed[i], whole[0, -1].float(), atol=2e-5, rtol=1e-4)
        if packs(model):
            assert pk.ids.numel() < b.ids.numel() and pk.ids.shape[0] < b.ids.shape[0]
    assert "eager" in ran
    if model_type in ("llama", "qwen2", "gpt2"):
        assert packs(model) and ran == ["sdpa", "eager"]  # so both masks ran packed


@pytest.mark.parametrize("model_type", TYPES)
def test_finished_facts_leave_the_batch(tok, model_type):
    """When facts finish, the rows of the others are cut out of the batch and packed again:
    their logits must be those of a batch built for the remaining facts alone."""
    from edit.methods.algebra.batch import build_batch
    from edit.methods.algebra.packing import pack

    model = tiny_model(model_type, len(tok))
    facts = [Fact(**TINY_FACT), Fact("{} was born in", "Marie Curie", "Warsaw, Poland"),
             Fact("{} is made of", "The big red chair", "wood")]  # fmt: skip
    templates = ["{}", "A short text. {}", "Here is a much longer piece of text first. {}"]

    def logits(b):
        pk = pack(b, model)
        seq, col = pk.split(pk.flat(torch.cat([b.tgt_row, b.kl_row]),
                                    torch.cat([b.tgt_col, b.kl_col])))  # fmt: skip
        with torch.no_grad():
            return lm.logits_at(model, pk.ids, pk.mask, seq, col, position_ids=pk.pos,
                                cache=pk.prefix_cache(model))  # fmt: skip

    kept = build_batch(tok, facts, templates, "cpu").keep(torch.tensor([True, False, True]))
    alone = build_batch(tok, [facts[0], facts[2]], templates, "cpu")
    torch.testing.assert_close(logits(kept), logits(alone), atol=2e-5, rtol=1e-4)
    for name in ("fact", "rewrite", "tgt_tok", "tgt_first", "tgt_row"):
        assert torch.equal(getattr(kept, name), getattr(alone, name)), name


def _target_is_top1(model, tok, fact: Fact) -> bool:
    (score,) = lm.continuation_scores(model, tok, [fact.text], [fact.target])
    return bool((score.top1 == score.targets).all())


def test_most_probable_stop_ends_at_the_first_step_where_the_target_is_top1(llama, tok):
    # bare prompt only, so the update maps the prompt's own key to v0 + δ exactly
    fact = Fact(**TINY_FACT)
    rome = registry.get("rome")
    settings = {**TINY_ROME, "context_templates": ((3, 0),), "nll_stop": 1e-6, "lr": 0.02,
                "value_dtype": "float32"}  # the same steps on every CPU  # fmt: skip
    assert not _target_is_top1(llama, tok, fact)

    def edited(**extra):
        out = rome.compute(llama, tok, [fact], ROMEConfig(**settings | extra), progress=False)
        return out, out.update.apply(llama)

    out, handle = edited(stop_most_probable=True)
    assert _target_is_top1(llama, tok, fact)
    mpes_norm = float(out.update.delta(out.info["module"]).norm())
    handle.undo()
    steps = out.info["steps"]  # steps evaluated; the last one found the target on top
    assert 2 < steps < settings["steps"]
    # one update fewer (max steps = steps - 2 leaves the δ of the step before): not on top yet
    _, handle = edited(stop_most_probable=True, steps=steps - 2)
    assert not _target_is_top1(llama, tok, fact)
    handle.undo()
    # without the stop the same edit runs on toward nll_stop and writes a larger update
    plain, handle = edited()
    handle.undo()
    assert plain.info["steps"] > steps
    assert float(plain.update.delta(plain.info["module"]).norm()) > mpes_norm


def test_the_object_only_stop_reads_the_object_tokens_alone(llama, tok):
    """``stop_object_only``: a row's tokens outside the object never hold the stop back; a
    fact whose object is on top stops even while the words around it are not."""
    from types import SimpleNamespace

    from edit.methods.algebra.objectives import _off_top

    batch = SimpleNamespace(
        tgt_tok=torch.tensor([1, 2, 3]), tgt_object=torch.tensor([False, False, True]),
        tgt_row=torch.tensor([0, 0, 0]), ids=torch.zeros(1, 4), rewrite=torch.tensor([True]),
        fact=torch.tensor([0]),
    )  # fmt: skip
    logp = torch.full((3, 5), -5.0)
    logp[0, 4] = logp[1, 4] = logp[2, 3] = 0.0  # only the object's token (3) is on top
    x = SimpleNamespace(batch=batch, logp=logp)
    assert not bool(_off_top(x, 1, object_only=False)[0] == 0)
    assert bool(_off_top(x, 1, object_only=True)[0] == 0)
    logp[2, 3], logp[2, 0] = -5.0, 0.0  # the object's token no longer on top
    assert not bool(_off_top(x, 1, object_only=True)[0] == 0)


def test_the_stop_at_the_objects_end_does_not_wait_for_the_full_stop():
    """``stop_at_object_end``: a sentence "X is in Y." is on top once every token up to Y
    is; the full stop after Y never holds the stop back, the words before Y still do."""
    from types import SimpleNamespace

    from edit.methods.algebra.objectives import _off_top

    batch = SimpleNamespace(
        tgt_tok=torch.tensor([1, 2, 3]), tgt_object=torch.tensor([False, True, False]),
        tgt_after_object=torch.tensor([False, False, True]), tgt_row=torch.tensor([0, 0, 0]),
        ids=torch.zeros(1, 4), rewrite=torch.tensor([True]), fact=torch.tensor([0]),
    )  # fmt: skip
    logp = torch.full((3, 5), -5.0)
    logp[0, 1] = logp[1, 2] = logp[2, 4] = 0.0  # all on top but the full stop (3)
    x = SimpleNamespace(batch=batch, logp=logp)
    assert not bool(_off_top(x, 1, object_only=False)[0] == 0)
    assert bool(_off_top(x, 1, object_only=False, to_object_end=True)[0] == 0)
    logp[0, 1], logp[0, 0] = -5.0, 0.0  # a word before the object no longer on top
    assert not bool(_off_top(x, 1, object_only=False, to_object_end=True)[0] == 0)


def test_bfloat16_values_edit_with_full_precision_keys(llama, tok):
    fact = Fact(**TINY_FACT)
    rome = registry.get("rome")
    module = edit.arch.lookup(llama).mlp_out_name(TINY_ROME["layer"])
    seen = []
    hook = llama.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        full32 = ROMEConfig(**TINY_ROME | {"value_dtype": "float32"})
        full = rome.compute(llama, tok, [fact], full32, progress=False)
        assert set(seen) == {torch.float32}
        seen.clear()
        half = ROMEConfig(**TINY_ROME | {"value_dtype": "bfloat16"})
        out = rome.compute(llama, tok, [fact], half, progress=False)
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # the optimization ran in bfloat16 ...
    assert torch.float32 in seen  # ... and the key pass at the model's own precision
    assert next(llama.parameters()).dtype == torch.float32
    torch.testing.assert_close(out.update.keys[module], full.update.keys[module],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    lp0 = float(lm.continuation_logprobs(llama, tok, [fact.text], [fact.target])[0].sum())
    handle = out.update.apply(llama)
    lp1 = float(lm.continuation_logprobs(llama, tok, [fact.text], [fact.target])[0].sum())
    handle.undo()
    assert lp1 > lp0 + 0.1, (lp0, lp1)


def test_weights_cast_once_give_the_same_edit_bit_for_bit_and_are_put_back(llama, tok,
                                                                         monkeypatch):  # fmt: skip
    """The linear layers' weights are cast to bfloat16 once for the whole optimization
    instead of by autocast at every call: the same δ to the last bit, and afterwards the
    model holds its own float32 parameters again (the output embedding still tied)."""
    from contextlib import nullcontext

    from edit.methods.algebra import precision

    llama.get_output_embeddings().weight = llama.get_input_embeddings().weight  # as SmolLM2's
    params = dict(llama.named_parameters(remove_duplicate=False))
    fact = Fact(**TINY_FACT)
    config = ROMEConfig(**TINY_ROME | {"value_dtype": "bfloat16"})
    rome = registry.get("rome")
    seen = []
    down = llama.get_submodule(edit.arch.lookup(llama).mlp_out_name(1))
    hook = down.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    try:
        once = rome.compute(llama, tok, [fact], config, progress=False)
        assert torch.bfloat16 in seen and torch.float32 in seen  # optimization, then keys
        monkeypatch.setattr(precision, "bf16_linear_weights", lambda model: nullcontext())
        seen.clear()
        each_call = rome.compute(llama, tok, [fact], config, progress=False)
        assert set(seen) == {torch.float32}  # autocast cast them at every call
    finally:
        hook.remove()
    assert once.info["steps"] == each_call.info["steps"]
    assert torch.equal(once.update.delta(once.info["module"]),
                       each_call.update.delta(each_call.info["module"]))  # fmt: skip
    after = dict(llama.named_parameters(remove_duplicate=False))
    assert after.keys() == params.keys()
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in params.items())
    emb, out = llama.get_input_embeddings(), llama.get_output_embeddings()
    assert out.weight is emb.weight


def test_weight_copies_go_back_on_error_and_are_skipped_without_memory(llama, monkeypatch):
    from types import SimpleNamespace

    from edit.methods.algebra import precision

    weights = list(llama.parameters())
    down = llama.get_submodule(edit.arch.lookup(llama).mlp_out_name(0))
    with pytest.raises(RuntimeError, match="stopped"), precision.bf16_linear_weights(llama):
        assert down.weight.dtype == torch.bfloat16
        raise RuntimeError("stopped")
    assert all(a is b for a, b in zip(llama.parameters(), weights, strict=True))
    monkeypatch.setattr(precision.psutil, "virtual_memory", lambda: SimpleNamespace(available=1))
    with precision.bf16_linear_weights(llama):
        assert down.weight.dtype == torch.float32  # autocast casts at each call instead


def test_auto_value_dtype_uses_bfloat16_only_where_the_cpu_has_it(llama, monkeypatch):
    from contextlib import nullcontext

    from edit.methods.algebra import precision

    def in_bf16(ctx) -> bool:
        return not isinstance(ctx, nullcontext)

    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16_cpu", lambda native=native: native)
        assert in_bf16(precision.value_autocast(llama, "auto")) is native
        assert not in_bf16(precision.value_autocast(llama, "float32"))
        assert in_bf16(precision.value_autocast(llama, "bfloat16"))
    with pytest.raises(InvalidRequest, match="value_dtype must be one of auto, float32"):
        ROMEConfig(value_dtype="fp8")


def test_the_patience_stop_ends_a_fact_whose_object_is_on_top_and_the_rest_stalled():
    """``stop_patience``: a fact stops once its object tokens are all on top and its count
    of target tokens off the top has not fallen for that many steps; while the object is
    not on top, a stalled count never stops it."""
    import dataclasses

    from edit.methods.algebra.objectives import FactLoss
    from edit.methods.algebra.values import _ChunkRun

    settings = ROMEConfig(stop_most_probable=True, stop_patience=2).value_settings()
    steps = iter([  # (off the top, object on top) per fact, step by step
        ([5, 5], [False, False]), ([3, 5], [True, False]), ([2, 5], [True, False]),
        ([2, 5], [True, False]), ([2, 5], [True, False]), ([2, 5], [True, False]),
    ])  # fmt: skip

    def loss(x, ref, s):
        off, on = next(steps)
        return FactLoss(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool),
                        torch.tensor(off, dtype=torch.float), torch.tensor(on))  # fmt: skip

    run = object.__new__(_ChunkRun)
    run.settings, run.device, run.n_facts = settings, torch.device("cpu"), 2
    run.objective = dataclasses.replace(OBJECTIVES["insert"], loss=loss)
    run.batch, run.reference, run.act, run.losses = None, None, torch.arange(2), []
    run.final_loss, run.final_measure = torch.zeros(2), torch.zeros(2)
    run.best_off = torch.full((2,), float("inf"))
    run.stalled = torch.zeros(2, dtype=torch.long)
    done = [run.score(torch.zeros(1, 1)).done.tolist() for _ in range(6)]
    # fact 0: the object on top at step 1, the count falls to 2 at step 2, stalls at 3 and 4
    assert [d[0] for d in done] == [False, False, False, False, True, True]
    assert not any(d[1] for d in done)  # its object never on top
    with pytest.raises(InvalidRequest, match="stop_patience must be >= 0"):
        ROMEConfig(stop_patience=-1)


def test_object_weight_counts_the_object_tokens_that_many_times():
    """``object_weight``: a row's mean NLL weighs its object's tokens W times; W = 1 is the
    plain mean; a row without targets stays 0."""
    from types import SimpleNamespace

    from edit.methods.algebra.objectives import _row_nll

    # row 0: "X is in Y ." (object Y, NLLs 1, 2, 4); row 1: all object (a cloze target, 3, 5);
    # row 2: no targets
    b = SimpleNamespace(
        tgt_object=torch.tensor([False, True, False, True, True]),
        tgt_row=torch.tensor([0, 0, 0, 1, 1]), ids=torch.zeros(3, 4),
    )  # fmt: skip
    lp = -torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0])
    assert _row_nll(lp, b, 1.0).tolist() == pytest.approx([7 / 3, 4.0, 0.0])
    assert _row_nll(lp, b, 3.0).tolist() == pytest.approx([(1 + 3 * 2 + 4) / 5, 4.0, 0.0])
