"""Low-rank updates (apply, exact undo, serialisation) and the ROME rank-one algebra."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    HIDDEN,
    INTERMEDIATE,
    TINY_FACT,
    TINY_ROME,
    changed_tensors,
    state_copy,
    tiny_model,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import edit.arch
from edit import Fact
from edit.methods import algebra, rome
from edit.stats import second_moment
from edit.update import Applied, Update


class Toy(nn.Module):
    """One projection with known weights, dressed as a model of ``model_type``."""

    def __init__(self, model_type: str, module: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.proj = module
        with torch.no_grad():
            self.proj.weight.copy_(weight)


W0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (out=2, in=3)
A = torch.tensor([[1.0], [2.0]])  # (out, 1)
B = torch.tensor([[10.0, 0.0, -1.0]])  # (1, in)
# W0 + A @ B, by hand
W1 = torch.tensor([[11.0, 2.0, 2.0], [24.0, 5.0, 4.0]])


# --------------------------------------------------------------------------- apply / undo


def test_apply_adds_a_times_b_to_a_linear_weight():
    toy = Toy("llama", nn.Linear(3, 2, bias=False), W0)
    handle = Update({"proj": (A, B)}).apply(toy)
    assert isinstance(handle, Applied)
    assert torch.equal(toy.proj.weight, W1)
    x = torch.tensor([[1.0, -1.0, 2.0]])
    assert torch.equal(toy.proj(x), x @ W1.T)  # the map itself changed: W' x
    handle.undo()
    assert torch.equal(toy.proj.weight, W0)


def test_apply_rank_two_by_hand():
    toy = Toy("llama", nn.Linear(3, 2, bias=False), W0)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    Update({"proj": (a, b)}).apply(toy)
    assert torch.equal(toy.proj.weight, torch.tensor([[2.0, 3.0, 4.0], [4.0, 5.0, 8.0]]))


def test_apply_transposes_for_gpt2_conv1d_by_hand():
    # Conv1D(nf=out, nx=in) stores its weight as (in, out) and computes x @ W + bias.
    toy = Toy("gpt2", Conv1D(2, 3), W0.T)
    assert toy.proj.weight.shape == (3, 2)
    Update({"proj": (A, B)}).apply(toy)
    assert torch.equal(toy.proj.weight, W1.T)
    x = torch.tensor([[1.0, -1.0, 2.0]])
    assert torch.equal(toy.proj(x) - toy.proj.bias, x @ W1.T)


def test_apply_on_tiny_gpt2_changes_the_map_by_a_b(tok):
    model = tiny_model("gpt2", len(tok))
    name = edit.arch.lookup(model).mlp_out_name(0)
    module = model.get_submodule(name)
    assert module.weight.shape == (INTERMEDIATE, HIDDEN)  # (in, out)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(HIDDEN, 1, generator=g), torch.randn(1, INTERMEDIATE, generator=g)
    keys = torch.randn(5, INTERMEDIATE, generator=g)
    w0 = module.weight.detach().clone()
    with torch.no_grad():
        out0 = module(keys)
        Update({name: (a, b)}).apply(model)
        out1 = module(keys)
    torch.testing.assert_close(module.weight - w0, (a @ b).T)
    # in (out, in) terms: W'k - Wk = a (b . k)
    torch.testing.assert_close(out1 - out0, (keys @ b.T) * a.T, rtol=1e-5, atol=1e-5)


def test_undo_restores_weights_bit_for_bit(llama):
    before = state_copy(llama)
    arch = edit.arch.lookup(llama)
    names = [arch.mlp_out_name(0), arch.mlp_out_name(1)]
    g = torch.Generator().manual_seed(1)
    # small factors: w + d - d would not round-trip exactly, a copy must be restored
    update = Update(
        {
            n: (
                torch.randn(HIDDEN, 2, generator=g) * 1e-3,
                torch.randn(2, INTERMEDIATE, generator=g) * 1e-3,
            )
            for n in names
        }
    )
    handle = update.apply(llama)
    assert changed_tensors(llama, before) == sorted(f"{n}.weight" for n in names)
    handle.undo()
    assert changed_tensors(llama, before) == []
    assert handle.undone
    handle.undo()  # a second undo changes nothing
    assert changed_tensors(llama, before) == []


def test_undo_is_exact_in_bfloat16():
    w = (torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7).to(torch.bfloat16)
    toy = Toy("llama", nn.Linear(3, 2, bias=False, dtype=torch.bfloat16), w)
    saved = toy.proj.weight.detach().clone()
    handle = Update({"proj": (A * 1e-3, B)}).apply(toy)
    assert toy.proj.weight.dtype == torch.bfloat16
    assert not torch.equal(toy.proj.weight, saved)
    handle.undo()
    assert torch.equal(toy.proj.weight, saved)


def test_delta_layouts():
    u = Update({"proj": (A, B)})
    assert torch.equal(u.delta("proj"), W1 - W0)
    assert torch.equal(u.delta("proj", transposed=True), (W1 - W0).T)


# --------------------------------------------------------------------------- tensors


def test_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    names = ["model.layers.0.mlp.down_proj", "transformer.h.1.mlp.c_proj"]
    u = Update({n: (torch.randn(4, 1, generator=g), torch.randn(1, 6, generator=g)) for n in names})
    flat = u.tensors()
    assert sorted(flat) == sorted(f"{n}.{x}" for n in names for x in "AB")
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in flat.values())
    save_file(flat, tmp_path / "u.safetensors")
    back = Update.from_tensors(load_file(tmp_path / "u.safetensors"))
    assert sorted(back.factors) == sorted(names)
    for n in names:
        assert torch.equal(back.factors[n][0], u.factors[n][0])
        assert torch.equal(back.factors[n][1], u.factors[n][1])


def test_tensors_are_float32_copies_of_half_factors():
    a, b = A.to(torch.bfloat16), B.to(torch.bfloat16)
    flat = Update({"proj": (a, b)}).tensors()
    assert flat["proj.A"].dtype == torch.float32
    assert torch.equal(flat["proj.A"], A) and torch.equal(flat["proj.B"], B)


def test_from_tensors_rejects_incomplete_factors():
    with pytest.raises(ValueError, match="incomplete"):
        Update.from_tensors({"proj.A": A})


def test_is_finite():
    assert Update({"proj": (A, B)}).is_finite()
    assert Update().is_finite()
    assert not Update({"proj": (torch.tensor([[float("nan")], [1.0]]), B)}).is_finite()
    assert not Update({"proj": (A, torch.tensor([[1.0, float("inf"), 0.0]]))}).is_finite()
    ok = (A, B)
    bad = (A, torch.tensor([[float("nan"), 0.0, 0.0]]))
    assert not Update({"p": ok, "q": bad}).is_finite()


# --------------------------------------------------------------------------- algebra


def test_rank_one_direction_maps_each_key_with_the_least_change():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    c = m @ m.T + 0.5 * np.eye(6)  # symmetric positive definite
    keys = rng.normal(size=(2, 6))
    c32 = torch.tensor(c, dtype=torch.float32)
    cd = c32.double().numpy() + 1e-6 * np.mean(np.diag(c32.double().numpy())) * np.eye(6)
    # one key: ROME's C⁻¹k / (kᵀC⁻¹k)
    one = algebra.rank_one_direction(c32, torch.tensor(keys[:1])).double().numpy()
    u = np.linalg.solve(cd, keys[0])
    np.testing.assert_allclose(one, u / (u @ keys[0]), rtol=1e-5)
    # two keys: bᵀk_j = 1 for both, and b = C⁻¹K(KᵀC⁻¹K)⁻¹1 (least bᵀCb)
    two = algebra.rank_one_direction(c32, torch.tensor(keys)).double().numpy()
    np.testing.assert_allclose(keys @ two, [1.0, 1.0], rtol=1e-5)
    ci_k = np.linalg.solve(cd, keys.T)
    np.testing.assert_allclose(two, ci_k @ np.linalg.solve(keys @ ci_k, np.ones(2)), rtol=1e-5)
    assert two @ c @ two > one @ c @ one  # meeting a second key costs generic change
    # the same key twice adds no constraint (a singular Gram matrix): the one-key row
    twice = algebra.rank_one_direction(c32, torch.tensor(np.stack([keys[0], keys[0]])))
    np.testing.assert_allclose(twice.double().numpy(), one, rtol=1e-4)


def _rome_parts(model, tok, fact: Fact, config: rome.ROMEConfig):
    """What rome.compute computes, step by step: module, C, k* and the plain prompt's key
    k₀ (rows), δ."""
    module = edit.arch.lookup(model).mlp_out_name(config.layer)
    cov = second_moment(
        model, tok, module, corpus=config.stats_corpus, n_tokens=config.stats_tokens, progress=False
    )
    templates = algebra.context_templates(model, tok, config.context_templates, config.seed)
    sol = algebra.solve_values(
        model, tok, module, [fact], templates, config.value_settings(), progress=False
    )
    k0 = algebra.keys_and_hidden(model, tok, [fact], ["{}"], module, module)[0][0]
    return module, cov, torch.stack([sol.keys[0], k0]), sol.deltas[0]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rank_one_update_maps_the_key_to_its_value_plus_delta(tok, model_type):
    model = tiny_model(model_type, len(tok))
    fact = Fact(**TINY_FACT)
    config = rome.ROMEConfig(**TINY_ROME)
    module, cov, keys, delta = _rome_parts(model, tok, fact, config)
    assert float(delta.norm()) > 1e-2  # a real change (the outputs here are ~1e-3)
    assert float((keys[0] - keys[1]).norm()) > 1e-3 * float(keys[0].norm())  # two keys
    b = algebra.rank_one_direction(cov, keys)[None, :]  # bᵀk* = bᵀk₀ = 1
    a = delta.float()[:, None]
    update = Update({module: (a, b)})

    layer = model.get_submodule(module)
    other = torch.randn(INTERMEDIATE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = layer(torch.cat([keys, other[None]]))
        update.apply(model)
        after = layer(torch.cat([keys, other[None]]))
    change = after - before  # W'k - Wk (any bias cancels)
    for j in (0, 1):  # k* and the plain prompt's key both get exactly δ
        torch.testing.assert_close(
            change[j], delta, rtol=1e-4, atol=1e-4 * float(delta.abs().max())
        )
    # any other key moves along δ by bᵀk
    scale = float(b[0].double() @ other.double())
    torch.testing.assert_close(
        change[2],
        delta * scale,
        rtol=1e-4,
        atol=1e-5 * float(delta.abs().max()) * max(1.0, abs(scale)),
    )

    # rome.compute builds exactly this update
    out = rome.compute(tiny_model(model_type, len(tok)), tok, [fact], config, progress=False)
    assert set(out.update.factors) == {module}
    ra, rb = out.update.factors[module]
    torch.testing.assert_close(ra, a)
    torch.testing.assert_close(rb, b)


def test_rome_compute_leaves_the_model_unchanged(llama, tok):
    before = state_copy(llama)
    config = rome.ROMEConfig(**TINY_ROME)
    out = rome.compute(llama, tok, [Fact(**TINY_FACT)], config, progress=False)
    assert changed_tensors(llama, before) == []
    name = edit.arch.lookup(llama).mlp_out_name(config.layer)
    assert list(out.update.factors) == [name]
    assert out.layers == [config.layer]
    assert out.info["module"] == name
    # and the update is not a no-op: applying it changes that module, and only it
    out.update.apply(llama)
    assert changed_tensors(llama, before) == [f"{name}.weight"]


def test_rome_compute_leaves_no_gradients_on_the_model(llama, tok):
    assert all(p.requires_grad for p in llama.parameters())  # as from_pretrained returns it
    rome.compute(llama, tok, [Fact(**TINY_FACT)], rome.ROMEConfig(**TINY_ROME), progress=False)
    assert [n for n, p in llama.named_parameters() if p.grad is not None] == []


def test_select_keeps_the_chosen_neurons_and_rank_and_drops_a_module_left_with_none():
    gate, up, down = torch.arange(6.0).view(3, 2), torch.arange(6.0, 12).view(3, 2), torch.eye(3)
    a, b, keys = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4), torch.ones(3, 4)
    update = Update({"w": (a, b), "v": (a[:, :1], b[:1])}, {"w": keys * torch.arange(3.0)[:, None]},
                    {"m": (gate, up, down), "n": (gate[:1], up[:1], down[:, :1])})  # fmt: skip
    mask = torch.tensor([True, False, True])
    kept = update.select({"w": mask, "v": torch.tensor([False]), "m": mask,
                          "n": torch.tensor([False])})  # fmt: skip
    assert list(kept.factors) == ["w"] and list(kept.neurons) == ["m"] and list(kept.keys) == ["w"]
    assert torch.equal(kept.factors["w"][0], a[:, [0, 2]])
    assert torch.equal(kept.factors["w"][1], b[[0, 2]])
    assert torch.equal(kept.keys["w"][:, 0], torch.tensor([0.0, 2.0]))
    assert torch.equal(kept.delta("w"), a[:, [0, 2]] @ b[[0, 2]])
    g, u, d = kept.neurons["m"]
    assert torch.equal(g, gate[[0, 2]]) and torch.equal(u, up[[0, 2]])
    assert torch.equal(d, down[:, [0, 2]])
