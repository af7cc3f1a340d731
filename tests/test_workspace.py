"""The edit ledger on a tiny llama: record, replay, revert, export, and refuse damage."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from tiny import (
    HIDDEN,
    INTERMEDIATE,
    TINY_FACT,
    TINY_FACT_2,
    TINY_ROME,
    changed_tensors,
    state_copy,
    tiny_model,
)

from edit import EditError, EditFailed, Fact, lm
from edit import methods as registry
from edit.api.workspace import Workspace
from edit.methods import MethodOutput
from edit.models import weights_hash
from edit.update import Update

MODULE = "model.layers.1.mlp.down_proj"  # what TINY_ROME edits in a llama


def _base(tok, seed: int = 0):
    return tiny_model("llama", len(tok), seed=seed)


def _files(folder) -> list[str]:
    """Every file under ``folder``, relative, sorted (hidden temporaries included)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


@pytest.fixture
def edited(tmp_path, tok):
    """A workspace with one recorded edit, its model, and the base weights."""
    model = _base(tok)
    base = state_copy(model)
    ws = Workspace.open(tmp_path / "ws", model=model, tok=tok)
    change = ws.add(TINY_FACT, progress=False, **TINY_ROME)
    entry, result = change.entry, change.result
    return ws, entry, result, base


# --------------------------------------------------------------------------- recording


def test_open_writes_nothing_until_an_edit(tmp_path, llama, tok):
    before = state_copy(llama)
    ws = Workspace.open(tmp_path / "ws", model=llama, tok=tok)
    assert not (tmp_path / "ws").exists()
    assert ws.entries() == []
    assert ws.base["hash"] == weights_hash(llama)
    assert changed_tensors(llama, before) == []


def test_add_records_the_edit(edited, tok):
    ws, entry, result, base = edited
    path = ws.path / "edits" / "0001.safetensors"
    assert entry.id == "0001" and entry.path == path and path.is_file()
    meta = json.loads((ws.path / "workspace.json").read_text())
    assert meta["base"]["hash"] == weights_hash(_base(tok)) == ws.base["hash"]

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        assert sorted(f.keys()) == [f"{MODULE}.A", f"{MODULE}.B", f"{MODULE}.keys"]
        assert f.get_tensor(f"{MODULE}.keys").shape == (1, INTERMEDIATE)
        assert f.get_tensor(f"{MODULE}.A").shape == (HIDDEN, 1)
        assert f.get_tensor(f"{MODULE}.B").shape == (1, INTERMEDIATE)
    assert header["id"] == "0001" and header["kind"] == "insert" and header["method"] == "rome"
    assert json.loads(header["facts"]) == [Fact(**TINY_FACT).to_dict()]
    assert json.loads(header["layers"]) == [1]
    config = json.loads(header["config"])
    assert config["layer"] == 1 and config["steps"] == TINY_ROME["steps"]
    metrics = json.loads(header["metrics"])
    assert metrics["p_new_after"] > metrics["p_new_before"]
    assert header["base_hash"] == ws.base["hash"]
    # the manifest names the entry by the hash of its bytes, chained to the base model
    [line] = [json.loads(x) for x in (ws.path / "manifest.jsonl").read_text().splitlines()]
    assert line["op"] == "add" and line["id"] == "0001" and line["seq"] == 1
    assert line["hash"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert line["prev"] == ws.base["hash"] and entry.hash == line["hash"]

    [listed] = ws.entries()
    assert listed.id == "0001" and listed.kind == "insert" and listed.method == "rome"
    assert listed.facts == [Fact(**TINY_FACT)] and listed.layers == [1]
    assert "The capital of France -> Paris" in listed.summary()
    for got, want in zip(listed.update.factors[MODULE], result.update.factors[MODULE], strict=True):
        assert torch.equal(got, want)
    assert ws.entry("1").id == "0001"  # ids are zero-padded on lookup

    # the model is the base plus exactly that update, and says the new target
    assert changed_tensors(ws.model, base) == [f"{MODULE}.weight"]
    expected = _base(tok)
    listed.update.apply(expected)
    assert changed_tensors(ws.model, state_copy(expected)) == []
    assert lm.top_next(ws.model, tok, Fact(**TINY_FACT).text, k=1)[0][0] == " Paris"


def test_reopening_replays_the_edits_exactly(edited, tok):
    ws, *_ = edited
    fresh = _base(tok)
    reopened = Workspace.open(ws.path, model=fresh, tok=tok)
    assert reopened.model is fresh
    assert [e.id for e in reopened.entries()] == ["0001"]
    assert changed_tensors(fresh, state_copy(ws.model)) == []


def test_revert_restores_the_base_bit_for_bit(edited, tok):
    ws, entry, _, base = edited
    reverted = ws.revert("0001")
    assert reverted.id == "0001"
    assert changed_tensors(ws.model, base) == []
    assert not (ws.path / "edits" / "0001.safetensors").exists()
    assert (ws.path / "reverted" / "0001.safetensors").is_file()
    assert ws.entries() == []
    assert [e.id for e in ws.entries("reverted")] == ["0001"]
    # a reopened workspace is the base too
    fresh = _base(tok)
    Workspace.open(ws.path, model=fresh, tok=tok)
    assert changed_tensors(fresh, base) == []


def test_revert_keeps_the_other_edits_and_ids_are_not_reused(edited, tok):
    ws, _, _, base = edited
    second = ws.add(TINY_FACT_2, progress=False, **TINY_ROME).entry
    assert second.id == "0002"
    ws.revert("1")
    # exactly base + the second edit
    expected = _base(tok)
    second.update.apply(expected)
    assert changed_tensors(ws.model, state_copy(expected)) == []
    ws.revert("0002")
    assert changed_tensors(ws.model, base) == []
    third = ws.add(TINY_FACT, progress=False, **TINY_ROME).entry
    assert third.id == "0003"  # 0001 and 0002 are in reverted/, never overwritten
    assert [e.id for e in ws.entries("reverted")] == ["0001", "0002"]


def test_revert_unknown_id(edited):
    ws, _, _, base = edited
    edited_state = state_copy(ws.model)
    files = _files(ws.path)
    with pytest.raises(EditError) as info:
        ws.revert("0042")
    message = str(info.value)
    assert "no edit with id '0042'" in message and "0001" in message and "\n" not in message
    assert _files(ws.path) == files
    assert changed_tensors(ws.model, edited_state) == []


# --------------------------------------------------------------------------- damage


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    at = 8 + header_len + 5  # inside the tensor data, past the JSON header
    assert at < len(data)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_tensor_byte])
def test_a_damaged_edit_file_is_refused_before_anything_is_applied(edited, tok, damage):
    ws, *_ = edited
    path = ws.path / "edits" / "0001.safetensors"
    damage(path)
    fresh = _base(tok)
    base = state_copy(fresh)
    with pytest.raises(EditError) as info:
        Workspace.open(ws.path, model=fresh, tok=tok)
    message = str(info.value)
    assert str(path) in message and "corrupt or truncated" in message and "\n" not in message
    assert changed_tensors(fresh, base) == []


def test_a_later_damaged_file_stops_earlier_edits_too(edited, tok):
    ws, *_ = edited
    ws.add(TINY_FACT_2, progress=False, **TINY_ROME)
    _flip_a_tensor_byte(ws.path / "edits" / "0002.safetensors")
    fresh = _base(tok)
    base = state_copy(fresh)
    with pytest.raises(EditError, match="0002.safetensors"):
        Workspace.open(ws.path, model=fresh, tok=tok)
    assert changed_tensors(fresh, base) == []  # 0001 was not applied either


def test_another_base_model_is_refused(edited, tok):
    ws, *_ = edited
    other = _base(tok, seed=1)
    before = state_copy(other)
    with pytest.raises(EditError) as info:
        Workspace.open(ws.path, model=other, tok=tok)
    message = str(info.value)
    assert f"workspace {ws.path} was made for base model" in message
    assert ws.base["hash"][:19] in message and weights_hash(other)[:19] in message
    assert changed_tensors(other, before) == []


def test_a_folder_that_is_not_a_workspace_is_refused(tmp_path, llama, tok):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EditError, match="is not an edit workspace"):
        Workspace.open(tmp_path, model=llama, tok=tok)
    with pytest.raises(EditError, match="no workspace at"):
        Workspace.open(tmp_path / "nothing", model=llama, tok=tok, create=False)


def test_a_corrupt_workspace_json_is_refused(edited, tok):
    ws, *_ = edited
    (ws.path / "workspace.json").write_text("{not json")
    with pytest.raises(EditError, match="workspace.json is corrupt"):
        Workspace.open(ws.path, model=_base(tok), tok=tok)


# --------------------------------------------------------------------------- export


def test_export_writes_a_loadable_model_folder(edited, tmp_path):
    from transformers import AutoModelForCausalLM

    ws, *_ = edited
    out = ws.export(tmp_path / "merged")
    assert out == tmp_path / "merged"
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "edit_ledger.json"} <= names
    assert "tokenizer.json" in names
    ledger = json.loads((out / "edit_ledger.json").read_text())
    assert ledger["base"] == ws.base and [e["id"] for e in ledger["edits"]] == ["0001"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert changed_tensors(loaded, state_copy(ws.model)) == []
    # nothing but the result is left beside it
    assert sorted(os.listdir(tmp_path)) == ["merged", "ws"]


def test_export_into_an_empty_folder(edited, tmp_path):
    ws, *_ = edited
    (tmp_path / "empty").mkdir()
    ws.export(tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_export_refuses_a_non_empty_folder(edited, tmp_path):
    ws, *_ = edited
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EditError, match="already exists and is not empty"):
        ws.export(out)
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["taken", "ws"]  # no temporary folder left


# --------------------------------------------------------------------------- failed edits


def _fake_rome(monkeypatch, update_for):
    real = registry.get("rome")

    def compute(model, tok, facts, config, *, objective="insert", progress=True, history=None):
        return MethodOutput(update_for(model), [config.layer], {"module": MODULE})

    monkeypatch.setitem(
        registry._REGISTRY, "rome", registry.Method("rome", real.config_class, compute)
    )


def _nan_update(model):
    return Update({MODULE: (torch.full((HIDDEN, 1), float("nan")), torch.ones(1, INTERMEDIATE))})


def _random_update(model):
    g = torch.Generator().manual_seed(0)
    return Update(
        {MODULE: (torch.randn(HIDDEN, 1, generator=g), torch.randn(1, INTERMEDIATE, generator=g))}
    )


@pytest.mark.parametrize("how", ["nan", "did_not_take"])
def test_a_failed_edit_records_nothing(edited, monkeypatch, how):
    ws, *_ = edited
    files = _files(ws.path)
    state = state_copy(ws.model)
    if how == "nan":
        _fake_rome(monkeypatch, _nan_update)
    else:
        _fake_rome(monkeypatch, _random_update)
        monkeypatch.setattr("edit.api.edits._did_not_take", lambda kind, metrics: "forced")
    with pytest.raises(EditFailed):
        ws.add(TINY_FACT_2, progress=False, **TINY_ROME)
    assert _files(ws.path) == files  # no edit file, no temporary
    assert changed_tensors(ws.model, state) == []
    assert [e.id for e in ws.entries()] == ["0001"]


def test_a_failed_first_edit_creates_no_workspace(tmp_path, llama, tok, monkeypatch):
    _fake_rome(monkeypatch, _nan_update)
    base = state_copy(llama)
    ws = Workspace.open(tmp_path / "ws", model=llama, tok=tok)
    with pytest.raises(EditFailed, match="non-finite"):
        ws.add(TINY_FACT, progress=False, **TINY_ROME)
    assert not (tmp_path / "ws").exists()
    assert changed_tensors(llama, base) == []


def test_a_failed_write_undoes_the_edit(edited, monkeypatch):
    ws, *_ = edited
    files = _files(ws.path)
    state = state_copy(ws.model)

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr("edit.ledger.write.write_bytes", disk_full)
    with pytest.raises(OSError, match="no space left"):
        ws.add(TINY_FACT_2, progress=False, **TINY_ROME)
    assert _files(ws.path) == files
    assert changed_tensors(ws.model, state) == []
