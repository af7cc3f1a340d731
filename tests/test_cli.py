"""The ``edit`` command line, run in-process on a tiny llama saved as a model folder."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from tiny import TINY_ROME, changed_tensors, state_copy, tiny_model

import edit.config
from edit import lm
from edit.cli import main
from edit.ledger import read_entry

MODULE = "model.layers.1.mlp.down_proj"  # what TINY_ROME edits in a llama
STATEMENT = "The capital of [France] [Paris]"  # the subject ends the prompt: see tiny.TINY_FACT
PROMPT = "The capital of France"

# The CLI has flags for --layer and --steps only; the rest comes from the model's tuned
# config, which the tests supply (as YAML would: lists, not tuples). With the library
# defaults the edit barely registers on a random tiny model.
# Statistics keep the default: 100k tokens of the shipped corpus take about a second here.
TINY_YAML = {
    k: [list(s) for s in v] if k == "context_templates" else v
    for k, v in TINY_ROME.items()
    if k != "stats_tokens"
}


def _tuned(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(edit.config, "config_file", lambda method, model: ("rome/tiny.yaml", TINY_YAML))


@pytest.fixture(autouse=True)
def _tiny_tuned_config(monkeypatch):
    _tuned(monkeypatch)


def _save(folder, tok, seed: int) -> str:
    model = tiny_model("llama", len(tok), seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("tiny-llama"), tok, seed=0)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("tiny-llama-other"), tok, seed=1)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, model_dir):
    """A workspace with one edit (0001), made by the CLI; copy it before changing it."""
    ws = tmp_path_factory.mktemp("recorded") / "ws"
    with pytest.MonkeyPatch.context() as mp:
        _tuned(mp)
        rc = main(["add", STATEMENT, "--model", model_dir, "-w", str(ws), "--layer", "1"])
    assert rc == 0 and (ws / "edits" / "0001.safetensors").is_file()
    return ws


@pytest.fixture
def ws(recorded, tmp_path):
    """A private copy of the recorded workspace."""
    return shutil.copytree(recorded, tmp_path / "ws")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The single line an error prints (progress bars aside, there must be nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _files(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def _next_tokens(out: str) -> list[str]:
    """The candidates that 'edit ask' lists under 'next token:', most likely first."""
    lines = out.splitlines()
    start = lines.index("next token:") + 1
    return [eval(line.split(None, 1)[1]) for line in lines[start:] if line.startswith("  ")]


# --------------------------------------------------------------------------- the happy path


def test_add_log_ask_export_revert(capsys, tmp_path, model_dir, tok):
    from transformers import AutoModelForCausalLM

    ws = tmp_path / "ws"
    rc, out, _ = run(capsys, "ask", PROMPT, "--model", model_dir, "-w", ws)
    assert rc == 0 and "base model" in out
    base_top = _next_tokens(out)
    assert len(base_top) == 5 and base_top[0] != " Paris"

    rc, out, _ = run(
        capsys, "add", STATEMENT, "--model", model_dir, "-w", ws, "--layer", 1, "--steps", 40
    )
    assert rc == 0, out
    assert "parsed: subject='France'  prompt='The capital of {}'  target='Paris'" in out
    assert f"edited with ROME at layer 1 ({MODULE})" in out
    assert "recorded:" in out and "(id 0001)" in out
    edit_file = ws / "edits" / "0001.safetensors"
    assert edit_file.is_file()

    rc, out, _ = run(capsys, "log", "-w", ws)
    assert rc == 0
    assert f"base {model_dir}" in out
    [line] = [x for x in out.splitlines() if x.startswith("0001")]
    assert "insert" in line and "rome" in line and "layers [1]" in line
    assert "The capital of France -> Paris" in line

    # ask uses the recorded base model plus the edit: --model is not needed any more
    rc, out, _ = run(capsys, "ask", PROMPT, "-w", ws, "--tokens", 4)
    assert rc == 0
    assert "+ 1 edit from" in out
    assert out.splitlines()[1].startswith(PROMPT + " Paris")  # greedy completion
    assert "next token:" in out
    assert _next_tokens(out)[0] == " Paris"

    rc, out, _ = run(capsys, "export", tmp_path / "merged", "-w", ws)
    assert rc == 0 and "exported" in out and "+ 1 edit" in out
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    exported = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    read_entry(edit_file).update.apply(expected)
    assert changed_tensors(exported, state_copy(expected)) == []
    assert lm.top_next(exported, tok, PROMPT, k=1)[0][0] == " Paris"

    rc, out, _ = run(capsys, "revert", "0001", "-w", ws)
    assert rc == 0 and "reverted 0001" in out and "base plus 0 edits" in out
    assert not edit_file.exists() and (ws / "reverted" / "0001.safetensors").is_file()

    rc, out, _ = run(capsys, "log", "-w", ws)
    assert rc == 0 and "no edits" in out and "(1 reverted: 0001)" in out

    rc, out, _ = run(capsys, "ask", PROMPT, "-w", ws)
    assert rc == 0 and "+ 0 edits from" in out
    assert _next_tokens(out) == base_top


def test_a_second_add_builds_on_the_first(capsys, ws):
    rc, out, _ = run(capsys, "add", "The capital of [Germany] [Berlin]", "-w", ws, "--layer", 1)
    assert rc == 0, out
    assert "(1 earlier edit applied)" in out and "(id 0002)" in out
    rc, out, _ = run(capsys, "log", "-w", ws)
    assert "0001" in out and "0002" in out and "Germany -> Berlin" in out


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "statement, extra, says",
    [
        ("hello", [], "cannot parse 'hello'"),
        ("", [], "the statement is empty"),
        ("[a] b [c] [d]", [], "mark exactly two spans"),
        ("Paris is capital of Italy", ["--subject", "Rome"], "'Rome' does not occur"),
        ("Paris is capital of Italy", ["--target", " "], "the target is empty"),
    ],
)
def test_bad_statement(capsys, tmp_path, statement, extra, says):
    ws = tmp_path / "ws"
    # the statement is checked before the model is loaded: this path would fail otherwise
    rc, out, err = run(capsys, "add", statement, *extra, "--model", "/nonexistent/model", "-w", ws)
    assert rc == 2
    assert says in error_line(err)
    assert out == ""
    assert not ws.exists()


def test_erase_checks_the_statement_too(capsys, tmp_path):
    rc, _, err = run(capsys, "erase", "hello", "-w", tmp_path / "ws")
    assert rc == 2 and "cannot parse" in error_line(err)


def test_unknown_method(capsys, tmp_path, model_dir):
    ws = tmp_path / "ws"
    rc, _, err = run(capsys, "add", STATEMENT, "--method", "nope", "--model", model_dir, "-w", ws)
    assert rc == 2
    line = error_line(err)
    assert "unknown method 'nope'" in line and "rome" in line
    assert not ws.exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        # from the model's config, before its weights load (the method's own check says
        # "layer must be in 0..1 for this model")
        (["--layer", "5"], "--layer 5: this model has 2 layers: give indices in 0..1"),
        (["--steps", "0"], "--steps: must be an integer 1..100000, got 0"),
        (["--set", "stop_most_probable=3"], "stop_most_probable=3: expected true or false"),
        (["--set", "learning_rate=0.1"], "unknown rome setting(s) learning_rate"),
        (["--set", "lr"], "--set 'lr': write KEY=VALUE"),
    ],
)
def test_bad_settings(capsys, tmp_path, model_dir, argv, says):
    ws = tmp_path / "ws"
    rc, _, err = run(capsys, "add", STATEMENT, "--model", model_dir, "-w", ws, *argv)
    assert rc == 2 and says in error_line(err)
    assert not ws.exists()


@pytest.mark.parametrize("model", ["/nonexistent/model", "no-such-org/no-such-model-xyz"])
@pytest.mark.parametrize("command", ["add", "ask"])
def test_a_model_that_cannot_be_found(capsys, tmp_path, model, command):
    ws = tmp_path / "ws"
    first = STATEMENT if command == "add" else PROMPT
    t0 = time.perf_counter()
    rc, _, err = run(capsys, command, first, "--model", model, "-w", ws)
    assert time.perf_counter() - t0 < 30  # offline: fails at once, never waits on a network
    assert rc == 2
    assert f"cannot load model {model!r}" in error_line(err)
    assert not ws.exists()


def test_a_folder_that_is_not_a_model(capsys, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    rc, _, err = run(capsys, "ask", PROMPT, "--model", folder, "-w", tmp_path / "ws")
    assert rc == 2 and "is not a model folder (no config.json)" in error_line(err)


def test_revert_an_unknown_id(capsys, ws):
    files = _files(ws)
    rc, _, err = run(capsys, "revert", "0042", "-w", ws)
    assert rc == 2
    line = error_line(err)
    assert "no edit with id '0042'" in line and "active edits: 0001" in line
    assert _files(ws) == files


@pytest.mark.parametrize(
    "command",
    [
        ["log"],
        ["ask", PROMPT],
        ["revert", "0002"],  # (reverting 0001 itself drops it: see test_ledger)
        ["export", "OUT"],
        ["add", "The capital of [Spain] [Madrid]"],
    ],
)
def test_a_corrupt_edit_file(capsys, ws, tmp_path, command):
    path = ws / "edits" / "0001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    files = _files(ws)
    argv = [tmp_path / "out" if a == "OUT" else a for a in command]
    rc, _, err = run(capsys, *argv, "-w", ws)
    assert rc == 2
    line = error_line(err)
    assert str(path) in line and "corrupt or truncated" in line
    assert _files(ws) == files  # the damaged file stays where it is; nothing new
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["add", "The capital of [Spain] [Madrid]"], ["ask", PROMPT]])
def test_a_workspace_for_another_base(capsys, ws, other_model_dir, command):
    files = _files(ws)
    rc, _, err = run(capsys, *command, "--model", other_model_dir, "-w", ws)
    assert rc == 2
    line = error_line(err)
    assert f"workspace {ws} was made for base model" in line and "another --workspace" in line
    assert _files(ws) == files


@pytest.mark.parametrize("command", [["log"], ["revert", "0001"], ["export", "OUT"]])
def test_a_missing_workspace(capsys, tmp_path, command):
    ws = tmp_path / "nothing-here"
    argv = [tmp_path / "out" if a == "OUT" else a for a in command]
    rc, _, err = run(capsys, *argv, "-w", ws)
    assert rc == 2 and f"no workspace at {ws}" in error_line(err)
    assert not ws.exists() and not (tmp_path / "out").exists()


def test_export_into_a_non_empty_folder(capsys, ws, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "export", out, "-w", ws)
    assert rc == 2 and "already exists and is not empty" in error_line(err)
    assert os.listdir(out) == ["keep.txt"]


# --------------------------------------------------------------------------- regressions


def test_braces_in_a_statement_give_a_one_line_error(capsys, tmp_path, model_dir):
    rc, _, err = run(
        capsys,
        "add",
        "The {x} of Paris is Italy",
        "--subject",
        "Paris",
        "--model",
        model_dir,
        "-w",
        tmp_path / "ws",
    )
    assert rc == 2 and error_line(err)


def test_ask_with_an_empty_workspace_folder_uses_the_base_model(capsys, tmp_path, model_dir):
    (tmp_path / "ws").mkdir()
    rc, out, _ = run(capsys, "ask", PROMPT, "--model", model_dir, "-w", tmp_path / "ws")
    assert rc == 0 and "next token:" in out
