"""A writer killed at any write step of add, revert or export leaves a workspace that
verifies, opens as the state before or the state after, and takes the next change.

The kill is simulated in-process: every file-system call that writes (create, write,
rename, link, remove, mkdir, model saving) is counted, and at step k the call raises
instead of running; from then on every such call does nothing, as after ``kill -9`` no
cleanup handler touches the disk.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile

import pytest
import transformers
from tiny import TINY_FACT, TINY_FACT_2, TINY_ROME, changed_tensors, state_copy, tiny_model

import edit.api.workspace
from edit.api.edits import apply
from edit.api.workspace import Workspace
from edit.ledger import read_ledger


class Killed(BaseException):
    """The process died here (not an Exception: nothing in edit may catch it)."""


class Crash:
    """Count the writing calls; the ``at``-th raises :class:`Killed`, later ones are no-ops."""

    TARGETS = [
        (os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "remove"),
        (os, "mkdir"), (os, "rmdir"), (shutil, "rmtree"), (tempfile, "mkstemp"),
        (tempfile, "mkdtemp"), (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"),
        (transformers.PreTrainedModel, "save_pretrained"),
        (transformers.PreTrainedTokenizerBase, "save_pretrained"),
    ]  # fmt: skip

    def __init__(self, mp: pytest.MonkeyPatch, at: int | None) -> None:
        self.at, self.steps, self.dead = at, 0, False
        for owner, name in self.TARGETS:
            mp.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            if self.dead:
                return None
            self.steps += 1
            if self.steps == self.at:
                self.dead = True
                raise Killed
            return fn(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def base(tok):
    return state_copy(tiny_model("llama", len(tok)))


@pytest.fixture(scope="module")
def results(tok):
    """The two edits, computed once: the fault runs replay them (the method is not what is
    under test, the writing is)."""
    model = tiny_model("llama", len(tok))
    out = []
    for fact in (TINY_FACT, TINY_FACT_2):
        r = apply(model, tok, fact, progress=False, **TINY_ROME)
        out.append(dataclasses.replace(r, handle=None))  # the next is computed on top
    return out


def _replaying(mp, results):
    queue = list(results)

    def fake_apply(model, tok, request, **kwargs):
        r = queue.pop(0)
        return dataclasses.replace(r, handle=r.update.apply(model))

    mp.setattr(edit.api.workspace, "apply", fake_apply)


def _expected(tok, results) -> list[dict]:
    """The weights of base, base + 0001, base + 0001 + 0002."""
    model = tiny_model("llama", len(tok))
    states = [state_copy(model)]
    for r in results:
        r.update.apply(model)
        states.append(state_copy(model))
    return states


def _state_index(ws_path, tok, states) -> int:
    """Which of ``states`` the workspace opens as (it must verify and open)."""
    if not (ws_path / "workspace.json").exists():
        assert not ws_path.exists() or not any(ws_path.iterdir()), "half a workspace"
        return 0
    assert read_ledger(ws_path).problems == []
    model = tiny_model("llama", len(tok))
    Workspace.open(ws_path, model=model, tok=tok)
    [i] = [i for i, s in enumerate(states) if changed_tensors(model, s) == []]
    return i


def _run_with_faults(tmp_path, tok, op, prepare):
    """Run ``op`` on a fresh copy from ``prepare`` with a crash at each step in turn, until
    it runs through. Returns (steps counted, outcomes)."""
    outcomes = []
    at = 1
    while True:
        folder = tmp_path / f"run{at}"
        folder.mkdir()
        ws_path = prepare(folder)
        with pytest.MonkeyPatch.context() as mp:
            crash = Crash(mp, at)
            try:
                op(ws_path)
                finished = True
            except Killed:
                finished = False
        outcomes.append((folder, ws_path, finished))
        if finished:
            return crash.steps, outcomes
        at += 1


def _with_edits(n: int, tok, results):
    def prepare(folder):
        ws_path = folder / "ws"
        if n:
            with pytest.MonkeyPatch.context() as mp:
                _replaying(mp, results)
                ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
                for _ in range(n):
                    ws.add("unused")
        return ws_path

    return prepare


@pytest.mark.parametrize("before", [0, 1], ids=["first-add", "second-add"])
def test_a_killed_add_leaves_the_state_before_or_after(tmp_path, tok, results, before):
    states = _expected(tok, results)

    def op(ws_path):
        with pytest.MonkeyPatch.context() as mp:
            _replaying(mp, results[before:])
            ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
            ws.add("unused")

    steps, outcomes = _run_with_faults(tmp_path, tok, op, _with_edits(before, tok, results))
    assert steps >= 4  # the entry, the manifest, the rename: each more than one call
    seen = set()
    for _, ws_path, finished in outcomes:
        i = _state_index(ws_path, tok, states)
        assert i in (before, before + 1)
        assert i == before + 1 or not finished
        seen.add(i)
        # the next writer finishes or clears what the crash left, then records
        with pytest.MonkeyPatch.context() as mp:
            _replaying(mp, results[i:])
            ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
            if i < len(results):
                ws.add("unused")
            else:
                ws.revert(ws.entries()[-1].id)
        assert read_ledger(ws_path).problems == []
        assert [p for p in os.listdir(ws_path / "edits") if p.startswith(".")] == []
    assert seen == {before, before + 1}  # a crash late enough keeps the commit


def test_a_killed_revert_leaves_the_state_before_or_after(tmp_path, tok, results):
    states = _expected(tok, results)

    def op(ws_path):
        ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
        ws.revert("0002")

    steps, outcomes = _run_with_faults(tmp_path, tok, op, _with_edits(2, tok, results))
    assert steps >= 3
    seen = set()
    for _, ws_path, _ in outcomes:
        i = _state_index(ws_path, tok, states)
        assert i in (1, 2)
        seen.add(i)
        ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
        ws.revert(ws.entries()[-1].id)  # the next writer goes ahead
        assert read_ledger(ws_path).problems == []
        assert (ws_path / "reverted" / "0002.safetensors").is_file()
    assert seen == {1, 2}


def test_a_killed_export_leaves_the_workspace_and_the_next_export_cleans_up(
    tmp_path, tok, results, monkeypatch
):
    states = _expected(tok, results)

    def op(ws_path):
        ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
        ws.export(ws_path.parent / "merged")

    steps, outcomes = _run_with_faults(tmp_path, tok, op, _with_edits(2, tok, results))
    assert steps >= 4
    # the dead exports' partial folders belong to no running process
    monkeypatch.setattr("edit.atomic._alive", lambda pid: False)
    for folder, ws_path, finished in outcomes:
        assert _state_index(ws_path, tok, states) == 2
        assert finished == (folder == outcomes[-1][0])
        merged = folder / "merged"
        if merged.exists():  # whole or not at all
            assert {"model.safetensors", "edit_ledger.json"} <= set(os.listdir(merged))
        else:
            ws = Workspace.open(ws_path, model=tiny_model("llama", len(tok)), tok=tok)
            ws.export(merged)
        assert sorted(os.listdir(folder)) == ["merged", "ws"]  # no partial folder left
