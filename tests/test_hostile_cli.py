"""Bad input of every kind through ``edit.cli.main``, in-process on a tiny llama: each is
refused with exactly one ``error:`` line on stderr, exit status 2, and nothing written
(neither in the workspace nor beside it)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tiny import TINY_ROME, tiny_model

import edit.cli
import edit.config
from edit.cli import main

STATEMENT = "The capital of [France] [Paris]"
PROMPT = "The capital of France"
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


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tok):
    """A model folder and a workspace with one edit, made by the CLI."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_model("llama", len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with pytest.MonkeyPatch.context() as mp:
        _tuned(mp)
        argv = ["add", STATEMENT, "-m", str(root / "model"), "-w", str(root / "ws"), "--layer", "1"]
        assert main(argv) == 0
    return root


@pytest.fixture
def place(recorded, tmp_path, monkeypatch):
    """A working folder holding ``ws`` (a copy of the recorded workspace), ``model``, and
    input files good and bad; the tests run in it."""
    shutil.copytree(recorded / "ws", tmp_path / "ws")
    os.symlink(recorded / "model", tmp_path / "model")
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "Mara Velden wrote it."}) + "\n")
    (tmp_path / "facts.jsonl").write_text(json.dumps({"statement": STATEMENT}) + "\n")
    (tmp_path / "hi.jsonl").write_text(json.dumps({"statement": "hi"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(folder, followlinks=False):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p) and ".lock" not in f:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, folder)] = fh.read()
    return out


def _refused(capsys, place, argv: list[str]) -> str:
    before = _snapshot(place)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in out + err
    assert _snapshot(place) == before, argv  # nothing written, nothing changed
    return lines[0]


W = ["-w", "ws"]
CASES = [
    # option values: types and ranges, all before the model is loaded
    (["add", STATEMENT, *W, "--set", "lr=abc"], "lr='abc': expected a finite number"),
    (["add", STATEMENT, *W, "--set", "steps=2.5"], "steps=2.5: expected an integer"),
    (["add", STATEMENT, *W, "--set", "steps=-1"], "steps must be >= 1"),
    (["add", STATEMENT, *W, "--set", "lr=.nan"], "expected a finite number"),
    (["add", STATEMENT, *W, "--set", "context_templates=5"], "context_templates=5: expected"),
    (["add", STATEMENT, *W, "--set", "value_dtype=float64"], "value_dtype must be one of"),
    (["add", STATEMENT, *W, "--set", "stats_tokens=1e30"], "stats_tokens=1e+30: expected"),
    (["add", STATEMENT, *W, "--set", "lr=[1,2"], "the value does not parse"),
    (["add", STATEMENT, *W, "--set", "=5"], "write KEY=VALUE"),
    (["add", STATEMENT, *W, "--set", "stats_corpus=/nonexistent"], "corpus not found"),
    (["add", STATEMENT, *W, "--steps", "abc"], "argument --steps: 'abc' is not an integer"),
    (["add", STATEMENT, *W, "--steps", "0"], "--steps: must be an integer 1..100000"),
    (["add", STATEMENT, *W, "--steps"], "--steps: expected one argument"),
    (["add", STATEMENT, *W, "--layer", "99"], "--layer 99: this model has 2 layers"),
    (["add", "--file", "facts.jsonl", *W, "--layer", "1-3"], "--layer 3: this model has 2"),
    (["eval", "--data", "facts.jsonl", "-m", "model", "--layer", "2"], "this model has 2"),
    (["add", STATEMENT, *W, "--layer", "-1"], "--layer '-1': give a block index"),
    (["add", STATEMENT, *W, "--layer", "0-999999999"], "give a block index"),
    (["add", STATEMENT, *W, "--method", "nope"], "unknown method 'nope'"),
    (["ask", PROMPT, *W, "--top", "-3"], "--top: must be an integer 1..1000, got -3"),
    (["ask", PROMPT, *W, "--top", "999"], "this model has only"),
    (["ask", PROMPT, *W, "--tokens", "-1"], "--tokens: must be an integer 1..4096, got -1"),
    (["ask", "", *W], "the prompt is empty"),
    (["ask", "x" * 5000, *W], "more than 4000"),
    (["trace", PROMPT, "-m", "model", "--samples", "0"], "--samples: must be an integer >= 1"),
    (["trace", PROMPT, "-m", "model", "--noise", "nan"], "--noise: must be a finite number"),
    (["trace", PROMPT, "-m", "model", "--kind", "bogus"], "unknown --kind 'bogus'"),
    (["eval", "--data", "facts.jsonl", "-m", "model", "--limit", "0"], "--limit: must be"),
    (["forget", "--corpus", "corpus.jsonl", *W, "--lr", "-1"], "--lr: must be a finite number"),
    (["forget", "--corpus", "corpus.jsonl", *W, "--epochs", "0"], "--epochs: must be an"),
    (["forget", "--corpus", "corpus.jsonl", *W, "--set", "lora_rank=abc"], "lora_rank='abc'"),
    (["forget", "--corpus", "corpus.jsonl", *W, "--set", "target_modules=5"], "target_modules"),
    (["forget", "--corpus", "corpus.jsonl", *W, "--method", "bogus"], "bogus"),
    (["learn", "--corpus", "corpus.jsonl", *W, "--lora-rank", "0"], "--lora-rank: must be"),
    (["audit", *W, "--attacks", "bogus"], "--attacks: unknown bogus"),
    (["nope"], "invalid choice: 'nope'"),
    # statements
    (["add", "[Paris is capital of Italy", *W], "a '[' that is never closed"),
    (["add", "Paris] is capital of [Italy", *W], "a ']' without its '['"),
    (["add", "[[Paris]] is capital of [Italy]", *W], "a '[' inside brackets"),
    (["add", "Paris is capital of " + "Italy " * 300, *W], "more than 1000"),
    (["add", "", *W], "the statement is empty"),
    (["add", *W], "nothing to edit"),
    (["add", STATEMENT, "--file", "facts.jsonl", *W], "not both"),
    (["add", "--file", "bad.jsonl", *W], "not valid JSON"),
    (["add", "--file", "empty.jsonl", *W], "is empty"),
    (["add", "--file", "hi.jsonl", *W], "cannot parse 'hi'"),
    (["add", "--file", "/nonexistent.jsonl", *W], "not found"),
    # devices, dtypes, models
    (["add", STATEMENT, *W, "--device", "tpu"], "unknown device 'tpu'"),
    (["add", STATEMENT, *W, "--dtype", "float64"], "unknown dtype 'float64'"),
    (["ask", PROMPT, "-m", "bad id!!", "-w", "nows"], "not a local folder, a .gguf file"),
    (["ask", PROMPT, "-m", "no-org/no-model-xyz", "-w", "nows"], "not in the Hugging Face"),
    # places to write
    (["export", "/proc/x", *W], "cannot make /proc/x"),
    (["export", "facts.jsonl/sub", *W], "facts.jsonl is a file, not a folder"),
    (["export", "facts.jsonl", *W], "already exists and is not a folder"),
    (["export", "ws", *W], "already exists and is not empty"),
    (["add", STATEMENT, "-m", "model", "-w", "/proc/x"], "cannot make /proc/x"),
    (["add", STATEMENT, "-m", "model", "-w", "facts.jsonl/sub"], "is a file, not a folder"),
    (["add", STATEMENT, "-m", "model", "-w", "facts.jsonl"], "is not an edit workspace"),
    (["trace", PROMPT, "-m", "model", "--out", "/proc/x"], "cannot make /proc/x"),
    (["eval", "--data", "facts.jsonl", "-m", "model", "--out", "/proc/x"], "cannot make"),
    (["audit", *W, "--out", "facts.jsonl"], "already exists and is not a folder"),
    # ids and workspaces
    (["revert", "9999", *W], "no edit with id '9999'"),
    (["revert", "-1", *W], "no edit with id '-1'"),
    (["audit", "9999", *W], "no edit with id '9999'"),
    (["log", "-w", "/nonexistent"], "no workspace at /nonexistent"),
    (["verify", "-w", "facts.jsonl"], "no workspace at facts.jsonl"),
]


@pytest.mark.parametrize("argv, says", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(capsys, place, argv, says):
    line = _refused(capsys, place, argv)
    assert says in line, line


def test_a_layer_past_the_models_depth_is_refused_before_its_weights_load(
    capsys, place, monkeypatch
):
    """The depth comes from the model's config (a weightless skeleton), not the model."""
    import edit.api.workspace
    import edit.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(edit.api.workspace, "load", no_loading)
    monkeypatch.setattr(edit.models, "load", no_loading)
    for argv in (["add", STATEMENT, *W, "--layer", "2"],
                 ["eval", "--data", "facts.jsonl", "-m", "model", "--layer", "7"]):  # fmt: skip
        assert "this model has 2 layers" in _refused(capsys, place, argv)


def test_the_tuned_config_line_comes_only_after_validation(capsys, place):
    _refused(capsys, place, ["add", STATEMENT, *W, "--layer", "99"])
    capsys.readouterr()
    main(["add", STATEMENT, *W, "--layer", "99"])
    out, err = capsys.readouterr()
    assert "using tuned config" not in out + err


@pytest.mark.parametrize(
    "meta",
    [
        "{not json",
        json.dumps({"format": 2, "base": {"hash": 1, "source": 2}}),
        json.dumps({"format": 2}),
        json.dumps({"format": "two", "base": {"hash": "sha256:x", "source": "model"}}),
    ],
)
def test_a_damaged_workspace_json_is_one_line(capsys, place, meta):
    (place / "ws" / "workspace.json").write_text(meta)
    for argv in (["log", *W], ["verify", *W], ["ask", PROMPT, *W], ["add", STATEMENT, *W]):
        assert "workspace.json" in _refused(capsys, place, argv)


def test_a_bug_is_one_line_too_and_its_traceback_comes_with_verbose(capsys, place, monkeypatch):
    monkeypatch.setitem(edit.cli.COMMANDS, "log", lambda args: 1 / 0)
    line = _refused(capsys, place, ["log", *W])
    assert "unexpected ZeroDivisionError" in line and "--verbose" in line
    with pytest.raises(ZeroDivisionError):
        main(["log", *W, "--verbose"])
