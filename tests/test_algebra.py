"""The algebra package's tables and caches: value objectives by name, the sampled prefixes
and the AlphaEdit projector keyed through edit.cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY_FACT, TINY_ROME

import edit.arch
from edit import Fact, cache
from edit.methods import algebra, alphaedit
from edit.methods.memit import MEMITConfig


def test_the_objective_table_names_insert_and_erase(llama, tok):
    assert set(algebra.OBJECTIVES) == {"insert", "erase"}
    assert algebra.OBJECTIVES["erase"].reference is not None
    assert algebra.OBJECTIVES["insert"].reference is None
    module = edit.arch.lookup(llama).mlp_out_name(1)
    cfg = MEMITConfig(**{k: v for k, v in TINY_ROME.items() if k != "layer"})
    with pytest.raises(ValueError, match="objective must be 'insert' or 'erase', not 'x'"):
        algebra.solve_values(llama, tok, module, [Fact(**TINY_FACT)], ["{}"],
                             cfg.value_settings(), objective="x")  # fmt: skip


def test_prefixes_are_cached_per_model_and_spec(llama, tok, monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT_CACHE", str(tmp_path))
    llama.edit_hash = "sha256:" + "ab" * 32
    first = algebra.context_templates(llama, tok, ((3, 2),), seed=1)
    path = cache.path("prefixes", llama.edit_hash, cache.digest([[[3, 2]], 1]), ext="json")
    assert path.is_file() and len(first) == 3 and first[0] == "{}"
    path.write_text('["{}", "cached. {}"]')
    assert algebra.context_templates(llama, tok, ((3, 2),), seed=1) == ["{}", "cached. {}"]


def _cov(seed: int = 0, d: int = 8) -> torch.Tensor:
    x = np.random.default_rng(seed).normal(size=(100, d))
    return torch.tensor(x.T @ x / 100, dtype=torch.float32)


def test_projectors_are_keyed_by_the_statistic_not_its_bytes(monkeypatch, tmp_path):
    monkeypatch.setenv("EDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("EDIT_STATS_CACHE", raising=False)
    monkeypatch.setattr(alphaedit, "_PROJECTORS", {})
    identity = ("sha256:" + "cd" * 32, "m.down_proj", "wiki-0123-s256", 1000)
    p = alphaedit.projector(_cov(), 1.0, "m.down_proj", identity)
    torch.testing.assert_close(p, algebra.null_space_projector(_cov(), 1.0), rtol=0, atol=0)
    name = "m.down_proj.wiki-0123-s256.1000.1.projector.safetensors"
    path = tmp_path / "stats" / ("cd" * 8) / name
    assert path.is_file()
    # the same statistic again: from memory, whatever tensor comes with it
    assert alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", identity) is p
    monkeypatch.setattr(alphaedit, "_PROJECTORS", {})  # a new process: from the disk cache
    torch.testing.assert_close(alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", identity), p)
    # no identity (a model not loaded by edit.load): computed, never cached
    alone = alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", None)
    torch.testing.assert_close(alone, algebra.null_space_projector(_cov(seed=1), 1.0))
    assert alphaedit._PROJECTORS == {(identity, 1.0): alphaedit._PROJECTORS[(identity, 1.0)]}


LONG_AND_SHORT = [
    Fact("{} is in", "Tomo", "Rome"),
    Fact("{} was born long ago in the small old town of", "Maru", "Paris of the north"),
]


def test_rows_of_very_different_lengths_run_in_two_passes(llama, tok):
    from edit.methods.algebra.batch import build_batch, length_parts
    from edit.methods.algebra.values import _ChunkRun

    batch = build_batch(tok, LONG_AND_SHORT, ["{}", "a b c. {}"], torch.device("cpu"))
    split = length_parts(batch, batch.prefix_cache(llama))
    assert split is not None
    parts, _ = split
    padded = sum(p.ids.numel() for p in parts)
    assert padded < 0.75 * batch.ids.numel()  # the point of the split
    assert sorted(torch.cat([p.rows for p in parts]).tolist()) == list(range(len(batch.ids)))
    module = edit.arch.lookup(llama).mlp_out_name(1)
    cfg = MEMITConfig(**{k: v for k, v in TINY_ROME.items() if k != "layer"})
    run = _ChunkRun(llama, module, batch, cfg.value_settings(), "insert")
    whole, _ = run.forward(first=True)  # one rectangular pass
    with torch.no_grad():
        run.delta.normal_(0, 0.1)  # a δ that changes what both passes see
    whole, _ = run.forward(first=True)
    assert run.parts is None
    in_parts, _ = run.forward(first=False)
    assert run.parts  # the split was used
    torch.testing.assert_close(in_parts, whole, atol=1e-5, rtol=1e-5)


def test_the_split_changes_no_solved_value(llama, tok, monkeypatch):
    from edit.methods.algebra import values

    module = edit.arch.lookup(llama).mlp_out_name(1)
    cfg = MEMITConfig(**{k: v for k, v in TINY_ROME.items() if k != "layer"}, value_dtype="float32")
    args = (llama, tok, module, LONG_AND_SHORT, ["{}", "a b c. {}"], cfg.value_settings())
    split = algebra.solve_values(*args, progress=False)
    monkeypatch.setattr(values, "length_parts", lambda batch, cache: None)
    whole = algebra.solve_values(*args, progress=False)
    torch.testing.assert_close(split.deltas, whole.deltas, atol=1e-4, rtol=1e-4)
    assert split.steps == whole.steps
