"""The lifelong benchmark's measuring helpers (benchmarks/lifelong.py): which records it
probes, and how far each edited weight moved, against hand computations on a tiny llama."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lifelong import FIRST, probe_indices, weight_changes  # noqa: E402
from edit import neurons  # noqa: E402


def test_probe_is_every_record_up_to_its_size_else_the_first_and_a_fixed_sample():
    assert probe_indices(50, 100) == list(range(50))
    probe = probe_indices(5000, 300)
    assert len(probe) == len(set(probe)) == 300 and probe == sorted(probe)
    assert probe[:FIRST] == list(range(FIRST)) and max(probe) < 5000
    assert probe_indices(5000, 300) == probe  # the same sample when the run resumes


def test_weight_changes_are_relative_norms_of_changed_weights_and_added_neurons(llama):
    base = copy.deepcopy(llama)
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(llama.named_parameters())[name]
    delta = torch.randn_like(w) * 0.01
    with torch.no_grad():
        w.add_(delta)
    d = llama.config.hidden_size
    down = torch.randn(d, 2)
    neurons.attach(llama, "model.layers.0.mlp", torch.randn(2, d), torch.randn(2, d), down)
    got = weight_changes(llama, base)
    base_w = dict(base.named_parameters())[name]
    assert got.keys() == {name, "model.layers.0.mlp (added neurons)"}
    assert got[name] == pytest.approx(float(delta.norm() / base_w.detach().norm()), rel=1e-4)
    w0 = base.model.layers[0].mlp.down_proj.weight
    assert got["model.layers.0.mlp (added neurons)"] == pytest.approx(
        float(down.norm() / w0.detach().norm()), rel=1e-5
    )


def test_a_middle_revert_takes_consecutive_entries_from_the_middle():
    from benchmarks.middle_revert import split

    entries = list(range(1000))
    gone, after, before = split(entries, 10, 200)
    assert gone == list(range(495, 505))
    assert after == list(range(505, 705)) and before == list(range(200))
    gone, after, before = split(list(range(5)), 2, 200)
    assert gone == [1, 2] and after == [3, 4] and before == [0]
    with pytest.raises(SystemExit, match="the ledger holds 5 entries"):
        split(list(range(5)), 5, 10)


def test_the_pair_write_gives_delta_at_the_subject_and_cancels_the_square_near_zero():
    import torch.nn.functional as F

    from benchmarks.neuron_leak import pair_of

    d, s = 6, 3.0
    r = torch.randn(2, d, dtype=torch.float64)
    delta = torch.randn(d, 2, dtype=torch.float64)
    gate, up, down = s * r, r, delta / F.silu(torch.tensor(s, dtype=torch.float64))

    def out(parts, x):
        g, u, w = parts
        return (F.silu(x @ g.T) * (x @ u.T)) @ w.T

    pair = pair_of(gate, up, down, F.silu, 1.0)
    assert pair[0].shape == (4, d) and pair[2].shape == (d, 4)
    at = torch.linalg.pinv(r)[:, 0]  # r·x = (1, 0): the first neuron's subject
    torch.testing.assert_close(out(pair, at), delta[:, 0])
    torch.testing.assert_close(out((gate, up, down), at), delta[:, 0])
    # near r·x = 0 the single write leaks a square (same sign either side), the pair a cube
    small = torch.linalg.pinv(r) @ torch.tensor([0.01, 0.0], dtype=torch.float64)
    single_leak = out((gate, up, down), small).norm() / delta[:, 0].norm()
    pair_leak = out(pair, small).norm() / delta[:, 0].norm()
    assert pair_leak < single_leak / 20
    torch.testing.assert_close(out(pair, -small), -out(pair, small), rtol=0.05, atol=1e-12)
