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
    monkeypatch.setattr(cache, "_MEMORY", {})
    identity = ("sha256:" + "cd" * 32, "m.down_proj", "wiki-0123-s256", 1000)
    p = alphaedit.projector(_cov(), 1.0, "m.down_proj", identity)
    torch.testing.assert_close(p, algebra.null_space_projector(_cov(), 1.0), rtol=0, atol=0)
    name = "m.down_proj.wiki-0123-s256.1000.1.projector.safetensors"
    path = tmp_path / "stats" / ("cd" * 8) / name
    assert path.is_file()
    # the same statistic again: from memory, whatever tensor comes with it
    assert alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", identity) is p
    monkeypatch.setattr(cache, "_MEMORY", {})  # a new process: from the disk cache
    torch.testing.assert_close(alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", identity), p)
    # no identity (a model not loaded by edit.load): computed, never cached
    alone = alphaedit.projector(_cov(seed=1), 1.0, "m.down_proj", None)
    torch.testing.assert_close(alone, algebra.null_space_projector(_cov(seed=1), 1.0))
    assert list(cache._MEMORY) == [path]
