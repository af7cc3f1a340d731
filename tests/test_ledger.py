"""The ledger is trusted like a git repository: each entry is named by the hash of its bytes
in a hash-chained manifest, so tampering, truncation, copies and deletions are named on load
and by ``edit verify``; one writer at a time; a crash at any write step leaves a workspace
that verifies and opens; the base model's identity does not depend on its dtype."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_FACT, TINY_FACT_2, TINY_ROME, changed_tensors, state_copy, tiny_model

from edit import EditError, lm
from edit.api.workspace import Workspace
from edit.cli import main
from edit.ledger import MANIFEST
from edit.lock import WorkspaceLock
from edit.models import checkpoint_hash, load, pick_device_and_dtype

MODULE = "model.layers.1.mlp.down_proj"  # what TINY_ROME edits in a llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, model_dir):
    """A workspace with two active edits (0001, 0002), made from the model folder."""
    path = tmp_path_factory.mktemp("recorded") / "ws"
    ws = Workspace.open(path, model_name=model_dir)
    ws.add(TINY_FACT, progress=False, **TINY_ROME)
    ws.add(TINY_FACT_2, progress=False, **TINY_ROME)
    return path


@pytest.fixture
def ws(recorded, tmp_path):
    """A private copy of the recorded workspace, to damage."""
    return shutil.copytree(recorded, tmp_path / "ws")


@pytest.fixture
def base(model_dir):
    model, _ = load(model_dir)
    return state_copy(model)


def _files(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def _one_error(capsys, *argv) -> str:
    capsys.readouterr()  # what the test printed before (loading bars) is not the command's
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _rewrite(path, tensors=None, **meta) -> None:
    """Rewrite an entry file with other tensors or header fields."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = {**f.metadata(), **meta}
    save_file(tensors if tensors is not None else load_file(path), path, metadata=header)


def _forge_manifest(ws) -> None:
    """Recompute the whole manifest for the files as they are now: a forger who knows the
    format. What is left to catch the change is the content itself."""
    base = json.loads((ws / "workspace.json").read_text())["base"]["hash"]
    prev, text = base, ""
    for n, p in enumerate(sorted((ws / "edits").glob("*.safetensors")), 1):
        h = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        line = json.dumps({"seq": n, "op": "add", "id": p.stem, "hash": h, "prev": prev},
                          sort_keys=True)  # fmt: skip
        prev, text = "sha256:" + hashlib.sha256(line.encode()).hexdigest(), text + line + "\n"
    (ws / MANIFEST).write_text(text)


def _refused(capsys, ws, says: str) -> None:
    """The damage is named in one line by verify, log, ask and add, and nothing changes."""
    files = _files(ws)
    for argv in (["verify"], ["log"], ["ask", "The capital of France"],
                 ["add", "The capital of [Spain] [Madrid]"]):  # fmt: skip
        line = _one_error(capsys, *argv, "-w", ws)
        assert says in line, (argv, line)
    assert _files(ws) == files


# --------------------------------------------------------------------------- a sound ledger


def test_verify_passes_a_sound_workspace(capsys, ws):
    assert main(["verify", "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "2 active and 0 reverted entries" in out and "not checked" not in out
    lines = [json.loads(x) for x in (ws / MANIFEST).read_text().splitlines()]
    assert [(x["op"], x["id"]) for x in lines] == [("add", "0001"), ("add", "0002")]
    assert (
        lines[1]["prev"]
        == "sha256:"
        + hashlib.sha256((ws / MANIFEST).read_text().splitlines()[0].encode()).hexdigest()
    )


# --------------------------------------------------------------------------- tampering


def test_a_rewritten_header_is_named(capsys, ws):
    """Another fact in the header, tensors untouched: 'edit log' would show another edit."""
    _rewrite(ws / "edits" / "0001.safetensors", facts=json.dumps([{**TINY_FACT, "target": "X"}]))
    _refused(capsys, ws, "0001.safetensors is corrupt or truncated, or was changed")


def test_a_truncated_entry_is_named(capsys, ws):
    path = ws / "edits" / "0002.safetensors"
    path.write_bytes(path.read_bytes()[:-9])
    _refused(capsys, ws, "0002.safetensors is corrupt or truncated")


def test_an_infinite_factor_is_refused_even_with_a_forged_manifest(capsys, ws):
    path = ws / "edits" / "0001.safetensors"
    tensors = load_file(path)
    tensors[f"{MODULE}.A"][0, 0] = float("inf")
    _rewrite(path, tensors)
    _forge_manifest(ws)
    _refused(capsys, ws, "non-finite values")


def test_factors_of_another_shape_are_refused_even_with_a_forged_manifest(capsys, ws, base):
    path = ws / "edits" / "0001.safetensors"
    tensors = load_file(path)
    a, b = tensors[f"{MODULE}.A"], tensors[f"{MODULE}.B"]
    tensors[f"{MODULE}.A"], tensors[f"{MODULE}.B"] = a[:-1], b  # one output row short
    _rewrite(path, tensors)
    _forge_manifest(ws)
    _refused(capsys, ws, "does not")  # "does not fit this model" / "the base model"
    fresh, _ = load(json.loads((ws / "workspace.json").read_text())["base"]["source"])
    with pytest.raises(EditError, match=r"entry 0001 .* does not fit this model: the factors"):
        Workspace.open(ws, model=fresh)
    assert changed_tensors(fresh, base) == []  # 0002 was not applied either


def test_a_copied_entry_with_another_id_is_named(capsys, ws):
    copy = ws / "edits" / "0003.safetensors"
    shutil.copy(ws / "edits" / "0001.safetensors", copy)
    _rewrite(copy, id="0003")
    _refused(capsys, ws, "0003.safetensors is not in the manifest")
    _forge_manifest(ws)  # and when the forger lists it too, it is still a copy
    _refused(capsys, ws, "entry 0003 holds the same update as entry 0001")


def test_a_deleted_entry_is_named(capsys, ws):
    (ws / "edits" / "0001.safetensors").unlink()
    _refused(capsys, ws, "entry 0001 is missing")


def test_an_edits_folder_that_links_to_itself_is_named(capsys, ws):
    shutil.rmtree(ws / "edits")
    os.symlink("edits", ws / "edits")
    _refused(capsys, ws, "edits is a symbolic link")


@pytest.mark.parametrize("how", ["drop", "swap", "edit"])
def test_a_changed_manifest_is_named(capsys, ws, how):
    lines = (ws / MANIFEST).read_text().splitlines(keepends=True)
    if how == "drop":
        lines = lines[1:]
    elif how == "swap":
        lines = lines[::-1]
    else:
        lines[1] = lines[1].replace('"add"', '"revert"')
    (ws / MANIFEST).write_text("".join(lines))
    _refused(capsys, ws, f"{MANIFEST} line 1" if how != "edit" else f"{MANIFEST} line 2")


def test_a_changed_base_hash_or_a_missing_workspace_json_is_named(capsys, ws):
    meta = json.loads((ws / "workspace.json").read_text())
    meta["base"]["hash"] = "sha256:" + "0" * 64
    (ws / "workspace.json").write_text(json.dumps(meta))
    _refused(capsys, ws, "does not start from the base model that workspace.json records")
    (ws / "workspace.json").unlink()
    _refused(capsys, ws, "workspace.json is missing, but")


def test_a_missing_manifest_is_named(capsys, ws):
    (ws / MANIFEST).unlink()
    _refused(capsys, ws, f"{MANIFEST} is missing")


@pytest.mark.parametrize("version, says", [(99, "upgrade edit"), (1, "has format 1")])
def test_the_workspace_format_is_checked(capsys, ws, version, says):
    meta = json.loads((ws / "workspace.json").read_text())
    (ws / "workspace.json").write_text(json.dumps({**meta, "format": version}))
    _refused(capsys, ws, says)


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_while_the_first_holds_the_workspace(capsys, ws):
    with WorkspaceLock(ws).exclusive():
        files = _files(ws)
        for argv in (["add", "The capital of [Spain] [Madrid]"], ["revert", "0001"], ["log"]):
            line = _one_error(capsys, *argv, "-w", ws)
            assert f"workspace {ws} is in use by another edit command (pid {os.getpid()})" in line
        assert _files(ws) == files
    assert main(["revert", "0001", "-w", str(ws)]) == 0  # released: the next one goes ahead


def test_a_lock_left_by_a_killed_process_is_not_in_force(capsys, ws):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
         "print('locked', flush=True); time.sleep(60)",
         str(ws / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_error(capsys, "revert", "0001", "-w", ws)
        assert f"in use by another edit command (pid {holder.pid})" in line
    finally:
        holder.kill()  # kill -9: no cleanup runs; the lock file stays, the lock does not
        holder.wait()
    assert (ws / ".lock").is_file()
    assert main(["revert", "0001", "-w", str(ws)]) == 0


def test_a_change_committed_by_another_process_meanwhile_refuses_this_one(ws, model_dir):
    first = Workspace.open(ws, model_name=model_dir)
    second = Workspace.open(ws, model_name=model_dir)
    first.revert("0002")
    files, weights = _files(ws), state_copy(second.model)
    with pytest.raises(EditError, match="was changed by another process since it was opened"):
        second.add(TINY_FACT_2, progress=False, **TINY_ROME)
    assert _files(ws) == files and changed_tensors(second.model, weights) == []
    assert [e.id for e in Workspace.open(ws, model_name=model_dir).entries()] == ["0001"]


# --------------------------------------------------------------------------- base identity


def test_the_base_identity_does_not_depend_on_the_dtype(ws, model_dir, tok, tmp_path):
    f32, _ = load(model_dir, dtype="float32")
    bf16, _ = load(model_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert f32.edit_hash == bf16.edit_hash == checkpoint_hash(Path(model_dir))
    # a workspace made in float32 opens in bfloat16, with its edits applied
    opened = Workspace.open(ws, dtype="bfloat16")
    assert opened.model.dtype == torch.bfloat16 and len(opened.entries()) == 2
    assert lm.top_next(opened.model, opened.tok, "The capital of Germany", k=1)[0][0] == " Berlin"
    # another model is still refused
    other = tmp_path / "other"
    tiny_model("llama", len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(EditError, match="was made for base model"):
        Workspace.open(ws, model_name=str(other), dtype="bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_request_without_cuda_is_refused():
    with pytest.raises(EditError, match="CUDA is not available"):
        pick_device_and_dtype("cuda")
    with pytest.raises(EditError, match="unknown device 'gpu0'"):
        pick_device_and_dtype("gpu0")


# --------------------------------------------------------------------------- the way out


@pytest.mark.parametrize("damage", ["delete", "truncate", "copy"])
def test_a_broken_entry_can_be_dropped_and_the_rest_stays(capsys, ws, model_dir, damage):
    """What the error says to do works: 'edit revert ID' drops the broken entry."""
    if damage == "delete":
        (ws / "edits" / "0001.safetensors").unlink()
        broken = "0001"
    elif damage == "truncate":
        path = ws / "edits" / "0001.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        broken = "0001"
    else:
        shutil.copy(ws / "edits" / "0001.safetensors", ws / "edits" / "0003.safetensors")
        _rewrite(ws / "edits" / "0003.safetensors", id="0003")
        _forge_manifest(ws)
        broken = "0003"
    line = _one_error(capsys, "log", "-w", ws)
    assert f"or drop entry {broken} with 'edit revert {broken}'" in line
    assert main(["revert", broken, "-w", str(ws)]) == 0
    assert f"dropped entry {broken}" in capsys.readouterr().out
    assert main(["verify", "-w", str(ws)]) == 0
    kept = Workspace.open(ws, model_name=model_dir)
    assert [e.id for e in kept.entries()] == (["0002"] if broken == "0001" else ["0001", "0002"])
    assert lm.top_next(kept.model, kept.tok, "The capital of Germany", k=1)[0][0] == " Berlin"
    assert (ws / "reverted" / f"{broken}.damaged").is_file() == (damage != "delete")
