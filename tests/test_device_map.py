"""Edits on a model split by a device map: a tiny llama whose edited block is offloaded to
disk (accelerate keeps ``meta`` placeholders and loads the weights for each forward pass),
the rest in CPU memory. ROME's hooks, key statistics and the update work there, and give
what they give on the model in one piece; the checkpoint file is never written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tiny import TINY_FACT, TINY_FACT_2, TINY_ROME

from edit import lm
from edit.api.workspace import Workspace
from edit.placement import read_weight

MODULE = "model.layers.1.mlp.down_proj"  # what TINY_ROME edits
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
PROMPT = "The capital of France"
TINY_MEMIT = {k: v for k, v in TINY_ROME.items() if k != "layer"} | {
    "layers": (0, 1),  # one block in memory, one on disk
    "cov_weight": 1.0,
}
BATCH = {"memit": TINY_MEMIT, "alphaedit": TINY_MEMIT | {"nullspace_threshold": 1.0, "l2": 1e-4}}


def _file_hash(folder: str) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def test_rome_edits_a_block_offloaded_to_disk(tmp_path, model_dir):
    checkpoint = _file_hash(model_dir)
    whole = Workspace.open(tmp_path / "whole", model_name=model_dir)
    split = Workspace.open(tmp_path / "split", model_name=model_dir, device_map=SPLIT)
    assert split.model.get_submodule(MODULE).weight.device.type == "meta"  # really offloaded
    assert split.model.hf_device_map["model.layers.1"] == "disk"
    assert split.base["hash"] == whole.base["hash"]  # the hash reads the offloaded weights
    before = lm.next_token_logprobs(split.model, split.tok, [PROMPT])
    torch.testing.assert_close(before, lm.next_token_logprobs(whole.model, whole.tok, [PROMPT]))

    whole_change = whole.add(TINY_FACT, progress=False, **TINY_ROME)
    split_change = split.add(TINY_FACT, progress=False, **TINY_ROME)
    e_whole, r_whole = whole_change.entry, whole_change.result
    e_split, r_split = split_change.entry, split_change.result
    m_split, m_whole = r_split.metrics, r_whole.metrics
    assert m_split["p_new_after"] > 1.5 * m_split["p_new_before"]  # it took
    assert abs(m_split["p_new_after"] - m_whole["p_new_after"]) < 1e-5 * m_whole["p_new_after"]
    t_whole, t_split = e_whole.update.tensors(), e_split.update.tensors()
    for k, v in t_whole.items():
        torch.testing.assert_close(t_split[k], v, rtol=1e-4, atol=1e-6, msg=k)
    # the update lives in the offloaded weight: forward passes see it
    torch.testing.assert_close(read_weight(split.model, MODULE), read_weight(whole.model, MODULE))
    after = lm.next_token_logprobs(split.model, split.tok, [PROMPT])
    torch.testing.assert_close(after, lm.next_token_logprobs(whole.model, whole.tok, [PROMPT]))
    assert not torch.allclose(after, before)

    split.revert(e_split.id)  # exactly the base again
    assert torch.equal(lm.next_token_logprobs(split.model, split.tok, [PROMPT]), before)
    assert _file_hash(model_dir) == checkpoint  # the checkpoint was only read


@pytest.mark.parametrize("method", sorted(BATCH))
def test_batch_edits_span_blocks_in_memory_and_on_disk(tmp_path, model_dir, method):
    whole = Workspace.open(tmp_path / "whole", model_name=model_dir)
    split = Workspace.open(tmp_path / "split", model_name=model_dir, device_map=SPLIT)
    facts = [TINY_FACT, TINY_FACT_2]
    e_whole = whole.add(facts, method=method, progress=False, **BATCH[method]).entry
    e_split = split.add(facts, method=method, progress=False, **BATCH[method]).entry
    t_whole, t_split = e_whole.update.tensors(), e_split.update.tensors()
    assert set(t_split) == set(t_whole) and any(MODULE in k for k in t_split)
    for k, v in t_whole.items():
        torch.testing.assert_close(t_split[k], v, rtol=1e-4, atol=1e-6, msg=k)
    for name in ("model.layers.0.mlp.down_proj", MODULE):
        torch.testing.assert_close(read_weight(split.model, name), read_weight(whole.model, name))


def test_the_cli_takes_a_device_map(tmp_path, model_dir, capsys):
    import json

    from edit.cli import main

    tiny = [f"--set={k}={json.dumps(v)}" for k, v in TINY_ROME.items()]
    args = ["add", "The capital of [France] [Paris]", "-m", model_dir, "-w", str(tmp_path / "w"),
            "--device-map", json.dumps(SPLIT), *tiny]  # fmt: skip
    assert main(args) == 0
    assert "recorded:" in capsys.readouterr().out
    assert main(["ask", "Paris is", "-m", model_dir, "--device-map", "{not json"]) == 2
    err = capsys.readouterr().err  # one usage error line
    assert "argument --device-map: not a JSON object" in err and err.count("\n") == 1
