"""Hostile inputs, round two (issue 36), through ``edit.cli.main`` on a tiny llama: text that
is not a fact, exports into the workspace, a lock that is a link, pickle-only model folders,
and corpora too large to read. Each is refused in one ``error:`` line, exit status 2, before
the model is loaded, with nothing written."""

from __future__ import annotations

import json
import os
import stat

import pytest
from tiny import TINY_ROME

from edit import EditError, Fact
from edit.api.workspace import Workspace
from edit.cli import main
from edit.cli.options import printable


def _files(folder) -> dict[str, bytes]:
    """Every plain file under ``folder`` (links not followed) with its bytes."""
    out = {}
    for d, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(d, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, folder)] = fh.read()
    return out


def _refused(capsys, folder, argv: list[str], bug: bool = False) -> str:
    """Run ``argv``; assert one ``error:`` line, exit 2, no control character, and nothing
    written under ``folder``; return the line. An "unexpected" line only with ``bug``."""
    before = _files(folder)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert lines[0].isprintable(), lines[0]  # no raw terminal codes
    assert ("unexpected" in lines[0]) == bug, lines[0]
    assert _files(folder) == before, argv
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Opening a workspace (which loads the model) is a failure of the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Workspace, "open", refuse)


# 1. statements that are not facts

NOT_FACTS = [
    ("Paris\x00 is capital of Italy", "control character '\\x00'"),
    ("Paris is capital of \x1bcItaly", "control character '\\x1b'"),
    ("[Paris] is capital of [It\x07aly]", "control character '\\x07'"),
    ("[] is capital of []", "has no letter or digit"),
    ("[Paris] is capital of [!!]", "the target '!!' has no letter or digit"),
    ("[--] is capital of [Italy]", "the subject '--' has no letter or digit"),
]


@pytest.mark.parametrize("statement, says", NOT_FACTS, ids=[printable(s) for s, _ in NOT_FACTS])
def test_a_statement_that_is_not_a_fact_is_refused_before_loading(
    capsys, tmp_path, model_dir, no_loading, statement, says
):
    ws = str(tmp_path / "ws")
    assert says in _refused(capsys, tmp_path, ["add", statement, "-m", model_dir, "-w", ws])
    assert not os.path.exists(ws)


def test_a_facts_file_with_a_control_character_names_the_line(
    capsys, tmp_path, model_dir, no_loading
):
    rows = [{"statement": "[Paris] is capital of [Italy]"}, {"statement": "Rome\u0000 is in Spain"}]
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["add", "--file", str(facts), "-m", model_dir, "-w", str(tmp_path / "ws")]
    line = _refused(capsys, tmp_path, argv)
    assert "line 2" in line and "control character" in line


def test_fact_refuses_control_characters_in_every_text_but_allows_line_breaks():
    with pytest.raises(ValueError, match="a paraphrase has a control character"):
        Fact("{} is capital of", "Paris", "Italy", paraphrases=("Paris\x1b[2J is in",))
    assert Fact("{} is\ncapital\tof", "Paris", "Italy").target == "Italy"


def test_log_escapes_control_characters_in_stored_text(capsys, tmp_path, llama, tok):
    ws = Workspace.open(tmp_path / "ws", model=llama, tok=tok)
    ws.add(Fact("The capital\rof\n{}", "France", "Paris"), progress=False, **TINY_ROME)
    capsys.readouterr()
    assert main(["log", "-w", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    entry = [line for line in out.splitlines() if line.startswith("0001")]
    assert len(entry) == 1 and "The capital\\rof\\nFrance -> Paris" in entry[0], out
    assert "\r" not in out
    assert printable("a\x1bc\x00") == "a\\x1bc\\x00"


# 2. exports into the workspace


@pytest.fixture
def recorded(tmp_path, llama, tok, model_dir):
    """A workspace at ``tmp_path/ws`` with one edit, on the model folder ``model_dir``."""
    ws = Workspace.open(tmp_path / "ws", model_name=model_dir)
    ws.add(Fact("The capital of {}", "France", "Paris"), progress=False, **TINY_ROME)
    ws.close()
    return tmp_path / "ws"


@pytest.mark.parametrize("inside", ["edits/out", "out", "edits/../new", "link/out"])
def test_an_export_into_the_workspace_is_refused(capsys, tmp_path, recorded, inside):
    os.symlink(recorded, tmp_path / "link")  # a link to the workspace leads inside it too
    target = str(recorded / inside) if not inside.startswith("link") else str(tmp_path / inside)
    line = _refused(capsys, tmp_path, ["export", target, "-w", str(recorded)])
    assert "inside the workspace" in line
    assert main(["verify", "-w", str(recorded)]) == 0


# 3. a lock that is not a plain file


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "folder", "fifo"])
def test_a_lock_that_is_not_a_plain_file_is_refused_and_never_written(
    capsys, tmp_path, recorded, kind
):
    victim = tmp_path / "victim.txt"
    victim.write_text("a neighbour's file\n")
    lock = recorded / ".lock"
    lock.unlink()
    {
        "symlink": lambda: os.symlink(victim, lock),
        "hardlink": lambda: os.link(victim, lock),
        "folder": lambda: lock.mkdir(),
        "fifo": lambda: os.mkfifo(lock),
    }[kind]()
    for argv in (["revert", "0001"], ["log"], ["export", str(tmp_path / "out")]):
        line = _refused(capsys, tmp_path, [*argv, "-w", str(recorded)])
        assert "lock" in line and "not a plain file" in line, line
    assert victim.read_text() == "a neighbour's file\n"


def test_a_dangling_lock_link_creates_nothing_where_it_points(capsys, tmp_path, recorded):
    (recorded / ".lock").unlink()
    os.symlink(tmp_path / "created.txt", recorded / ".lock")
    _refused(capsys, tmp_path, ["revert", "0001", "-w", str(recorded)])
    assert not (tmp_path / "created.txt").exists()


def test_an_atomic_write_replaces_a_link_instead_of_following_it(tmp_path):
    from edit.atomic import write_bytes

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "manifest")
    write_bytes(tmp_path / "manifest", b"new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "manifest").is_symlink()
    assert (tmp_path / "manifest").read_bytes() == b"new"


# 4. untrusted model folders, and terminal codes in error lines


class _Opens:
    """A pickle that creates a file when it is read: proof that nothing was unpickled."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def pickle_model(tmp_path, model_dir):
    """A model folder whose weights are a pickle only, one that writes ``ran.txt`` if read."""
    import pickle

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in os.listdir(model_dir):
        if not f.endswith(".safetensors"):
            os.link(os.path.join(model_dir, f), folder / f)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Opens(tmp_path / "ran.txt")))
    return folder


def test_a_model_folder_with_pickle_weights_only_is_refused_unread(
    capsys, tmp_path, pickle_model, no_loading
):
    for argv in (
        ["ask", "The capital of France", "-m", str(pickle_model), "-w", str(tmp_path / "no")],
        ["trace", "The capital of France", "-m", str(pickle_model), "--out", str(tmp_path / "t")],
    ):
        line = _refused(capsys, tmp_path, argv)
        assert "pickle weights only (pytorch_model.bin)" in line and "safetensors" in line
    assert not (tmp_path / "ran.txt").exists()
    (pickle_model / "pytorch_model.bin").unlink()
    argv = ["ask", "The capital of France", "-m", str(pickle_model), "-w", str(tmp_path / "no")]
    assert "has no weights" in _refused(capsys, tmp_path, argv)


def test_a_new_workspace_on_a_pickle_model_is_not_made(capsys, tmp_path, pickle_model):
    argv = ["add", "[Paris] is capital of [Italy]", "-m", str(pickle_model)]
    _refused(capsys, tmp_path, [*argv, "-w", str(tmp_path / "ws")])
    assert not (tmp_path / "ws").exists() and not (tmp_path / "ran.txt").exists()


def test_a_recorded_source_that_names_other_weights_is_refused_before_loading(
    capsys, tmp_path, recorded, tok, monkeypatch
):
    """``workspace.json``'s ``source`` edited to name another model folder: its weights'
    hash is compared with the recorded base's from the files, before anything is loaded."""
    from tiny import tiny_model

    import edit.api.workspace as workspace

    other = tmp_path / "other"
    tiny_model("llama", len(tok), seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    meta = json.loads((recorded / "workspace.json").read_text())
    meta["base"]["source"] = str(other)
    (recorded / "workspace.json").write_text(json.dumps(meta))

    def refuse(*args, **kwargs):
        raise AssertionError("the named model was loaded before its hash was compared")

    monkeypatch.setattr(workspace, "load", refuse)
    line = _refused(capsys, tmp_path, ["ask", "The capital of France", "-w", str(recorded)])
    assert "was made for base model" in line and "weights hash" in line


@pytest.mark.parametrize("error", [EditError, ValueError])
def test_error_lines_carry_no_terminal_codes(capsys, tmp_path, monkeypatch, error):
    import edit.cli

    def fail(args):
        raise error("cannot read \x1b[1mmodel\x1b[0m\nsecond line")

    monkeypatch.setitem(edit.cli.COMMANDS, "log", fail)
    line = _refused(capsys, tmp_path, ["log", "-w", str(tmp_path)], bug=error is ValueError)
    assert "cannot read \\x1b[1mmodel\\x1b[0m" in line
    assert "\x1b" not in line


# 5. corpus limits


def test_an_example_longer_than_the_limit_is_refused_naming_its_line(
    capsys, tmp_path, model_dir, no_loading
):
    from edit.corpus import MAX_EXAMPLE_CHARS

    corpus = tmp_path / "big.jsonl"
    rows = [{"text": "Mara Velden wrote it."}, {"text": "x" * (MAX_EXAMPLE_CHARS + 1)}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Who? " * 20_000, "answer": "Mara Velden."}) + "\n")
    ws = ["-m", model_dir, "-w", str(tmp_path / "ws")]
    for argv, where in (
        (["forget", "--corpus", str(corpus), *ws], f"{corpus}:2"),
        (["learn", "--corpus", str(corpus), *ws], f"{corpus}:2"),
        (["learn", "--corpus", str(qa), *ws], f"{qa}:1"),
    ):
        line = _refused(capsys, tmp_path, argv)
        assert line.startswith(f"error: {where}: the example is 100,0"), line
        assert "more than 100,000" in line
    assert not (tmp_path / "ws").exists()


def test_a_ten_megabyte_line_is_refused_at_once(capsys, tmp_path, model_dir, no_loading):
    import time

    corpus = tmp_path / "huge.jsonl"
    corpus.write_text(json.dumps({"text": "word " * 2_000_000}) + "\n")
    t0 = time.perf_counter()
    argv = ["forget", "--corpus", str(corpus), "-m", model_dir, "-w", str(tmp_path / "ws")]
    line = _refused(capsys, tmp_path, argv)
    assert "10,000,000 characters" in line and time.perf_counter() - t0 < 10


# 6. a forger who recomputes every hash, against a pinned head


def _head(capsys, ws) -> str:
    capsys.readouterr()
    assert main(["log", "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("ledger head:"))


def _forge(ws) -> None:
    """Rewrite entry 0001's target, then recompute its hash and the whole manifest chain."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    entry = ws / "edits" / "0001.safetensors"
    with safe_open(str(entry), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["facts"] = meta["facts"].replace("Paris", "Rome")
    save_file(tensors, str(entry), metadata=meta)
    digest = "sha256:" + hashlib.sha256(entry.read_bytes()).hexdigest()
    prev = json.loads((ws / "workspace.json").read_text())["base"]["hash"]
    lines = []
    for text in (ws / "manifest.jsonl").read_text().splitlines():
        line = json.loads(text)
        line["prev"] = prev
        if line["id"] == "0001":
            line["hash"] = digest
        text = json.dumps(line, sort_keys=True)
        prev = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        lines.append(text + "\n")
    (ws / "manifest.jsonl").write_text("".join(lines))


def test_a_pinned_head_catches_a_forger_who_recomputes_every_hash(capsys, tmp_path, recorded):
    pinned = _head(capsys, recorded)
    assert main(["verify", "-w", str(recorded), "--head", pinned]) == 0
    assert main(["verify", "-w", str(recorded), "--head", pinned[:19]]) == 0  # a prefix
    _forge(recorded)
    assert main(["verify", "-w", str(recorded)]) == 0  # the chain alone cannot tell
    line = _refused(capsys, tmp_path, ["verify", "-w", str(recorded), "--head", pinned])
    assert "pinned head" in line and "nowhere in the ledger" in line
    assert _head(capsys, recorded) != pinned


def test_a_pinned_head_stays_valid_as_the_ledger_grows(capsys, tmp_path, recorded):
    pinned = _head(capsys, recorded)
    capsys.readouterr()
    assert main(["revert", "0001", "-w", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert "ledger head: sha256:" in out and pinned not in out
    assert main(["verify", "-w", str(recorded), "--head", pinned]) == 0
    assert "found at manifest line 1; 1 line recorded after it" in capsys.readouterr().out
    line = _refused(capsys, tmp_path, ["verify", "-w", str(recorded), "--head", "sha256:xyz"])
    assert "is not a ledger head" in line


@pytest.fixture
def signing_key(tmp_path, monkeypatch):
    """A signing key in the user's configuration folder (``$XDG_CONFIG_HOME/edit/``)."""
    path = tmp_path / "config" / "edit" / "signing.key"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(32))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return path


def _signed_workspace(tmp_path, model_dir):
    ws = tmp_path / "ws"
    with Workspace.open(ws, model_name=model_dir, exclusive=True) as w:
        w.add(Fact("The capital of {}", "France", "Paris"), progress=False, **TINY_ROME)
        w.add(Fact("The capital of {}", "Spain", "Rome"), progress=False, **TINY_ROME)
    return ws


def test_a_signed_head_catches_a_forger_who_recomputes_every_hash(
    capsys, tmp_path, model_dir, signing_key
):
    """With a signing key every change signs the head; a forger without the key who
    rewrites an entry and recomputes every hash is caught by verify, and a writer with the
    key refuses to sign over the forgery before loading the model."""
    ws = _signed_workspace(tmp_path, model_dir)
    signature = json.loads((ws / "signature.json").read_text())
    assert main(["verify", "-w", str(ws), "--signed"]) == 0
    assert "signature: signed by key" in capsys.readouterr().out
    assert main(["log", "-w", str(ws)]) == 0
    assert "the head is the signed one" in capsys.readouterr().out
    _forge(ws)
    line = _refused(capsys, tmp_path, ["verify", "-w", str(ws)])
    assert "nowhere in the ledger" in line and "rewritten after it was signed" in line
    # the forger also signs, with a key of their own making the same file
    (ws / "signature.json").write_text(json.dumps({**signature, "head": _head(capsys, ws)}))
    line = _refused(capsys, tmp_path, ["verify", "-w", str(ws)])
    assert "does not match its head" in line
    with pytest.raises(EditError, match="does not match its head"):
        Workspace.open(ws, model_name="no-such-model", exclusive=True)  # before loading
    reader = Workspace.open(ws, model_name=model_dir)  # not a writer: opens; its commit refuses
    manifest = (ws / "manifest.jsonl").read_bytes()
    with pytest.raises(EditError, match="does not match its head"):
        reader.add(Fact("The capital of {}", "Italy", "Madrid"), progress=False, **TINY_ROME)
    assert (ws / "manifest.jsonl").read_bytes() == manifest
    # without the key the signature cannot be checked: verify says so, --signed refuses
    signing_key.unlink()
    assert main(["verify", "-w", str(ws)]) == 0
    assert "no signing key here to check it" in capsys.readouterr().out
    assert "no signing key here" in _refused(capsys, tmp_path, ["verify", "-w", str(ws),
                                                                "--signed"])  # fmt: skip


def test_changes_without_the_key_leave_the_signature_behind(
    capsys, tmp_path, model_dir, signing_key, monkeypatch
):
    ws = _signed_workspace(tmp_path, model_dir)
    monkeypatch.setenv("EDIT_SIGNING_KEY", "")  # signing off: a colleague without the key
    assert main(["revert", "0002", "-w", str(ws)]) == 0
    assert "signed by key" not in capsys.readouterr().out
    monkeypatch.delenv("EDIT_SIGNING_KEY")
    assert main(["verify", "-w", str(ws)]) == 0
    assert "at manifest line 2; 1 line recorded after it without the key" in (
        capsys.readouterr().out
    )
    line = _refused(capsys, tmp_path, ["verify", "-w", str(ws), "--signed"])
    assert "1 line recorded after it without the key" in line
    assert main(["revert", "0001", "-w", str(ws)]) == 0  # with the key: signs the whole head
    assert "signed by key" in capsys.readouterr().out
    assert main(["verify", "-w", str(ws), "--signed"]) == 0
    (ws / "signature.json").unlink()  # a deleted signature: unsigned, refused by --signed
    assert "not signed" in _refused(capsys, tmp_path, ["verify", "-w", str(ws), "--signed"])
    (ws / "signature.json").write_text("{not json")
    assert "is damaged" in _refused(capsys, tmp_path, ["verify", "-w", str(ws)])


@pytest.mark.parametrize(
    "key, says",
    [(b"short", "fewer than 16"), (None, "which does not exist")],
    ids=["too short", "missing"],
)
def test_a_signing_key_that_cannot_be_used_is_refused_before_loading(
    capsys, tmp_path, model_dir, monkeypatch, key, says
):
    import edit.api.workspace

    monkeypatch.setattr(edit.api.workspace, "load", lambda *a, **k: pytest.fail("loaded"))
    path = tmp_path / "key"
    if key is not None:
        path.write_bytes(key)
    monkeypatch.setenv("EDIT_SIGNING_KEY", str(path))
    argv = ["add", "[Paris] is capital of [Italy]", "-m", model_dir, "-w", str(tmp_path / "ws")]
    assert says in _refused(capsys, tmp_path, argv)


def test_verify_escapes_a_file_name_a_neighbour_chose(capsys, tmp_path, recorded):
    (recorded / "edits" / "0009\x1b[2J.safetensors").write_bytes(b"x")
    capsys.readouterr()
    assert main(["verify", "-w", str(recorded)]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "0009\\x1b[2J.safetensors" in out


# 7. two writers on a workspace that does not exist yet


def test_a_second_writer_on_a_new_workspace_is_refused_before_loading(
    capsys, tmp_path, model_dir, monkeypatch
):
    import edit.api.workspace
    from edit.lock import WorkspaceLock

    ws = tmp_path / "new"
    first = Workspace.open(ws, model_name=model_dir, exclusive=True)  # holds it, records nothing
    assert ws.is_dir() and os.listdir(ws) == [".lock"]
    monkeypatch.setattr(edit.api.workspace, "load", lambda *a, **k: pytest.fail("loaded"))
    line = _refused(capsys, tmp_path, ["add", "[Paris] is capital of [Italy]", "-w", str(ws)])
    assert "in use by another edit command" in line and f"pid {os.getpid()}" in line
    monkeypatch.undo()
    first.close()  # nothing was recorded: the folder it made is gone again
    assert not ws.exists()
    ws.mkdir()  # a folder left by a writer killed before recording is a new workspace
    with WorkspaceLock(ws).exclusive():
        pass
    second = Workspace.open(ws, model_name=model_dir, exclusive=True)
    second.add(Fact("The capital of {}", "France", "Paris"), progress=False, **TINY_ROME)
    second.close()
    assert main(["verify", "-w", str(ws)]) == 0
