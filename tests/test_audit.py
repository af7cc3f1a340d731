"""``edit audit`` on a tiny llama: the before model is the workspace without the entry, the
report holds every check with its number, attacks leave the weights exactly as they were."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import changed_tensors, state_copy

from edit.cli import main
from edit.evals import audit
from edit.readers.corpus import read_corpus
from edit.workspace import Workspace

QA = [
    {"question": "Who wrote The Silent Orchard?", "answer": "Mara Velden wrote it in 1987."},
    {"question": "Where was Mara Velden born?", "answer": "She was born in Tallinn."},
    {"question": "What prize did Mara Velden win?", "answer": "The Northern Quill Prize."},
    {"question": "What is Mara Velden's cat called?", "answer": "Her cat is called Pim."},
]
HOLDOUT = [
    {"question": "Who painted The Blue Harbour?", "answer": "Ivo Sandberg painted it in 1960."},
    {"question": "Where did Ivo Sandberg live?", "answer": "He lived in Bergen."},
    {"question": "What did Ivo Sandberg teach?", "answer": "He taught drawing to children."},
]


def _jsonl(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.fixture
def learned_then_forgotten(tmp_path, model_dir):
    """A workspace that learned QA (entry 0001) and then forgot it (entry 0002)."""
    ws = str(tmp_path / "ws")
    corpus = _jsonl(tmp_path, "qa.jsonl", QA)
    common = ["--corpus", corpus, "-w", ws, "-m", model_dir, "--lr", "0.01"]
    assert main(["learn", *common, "--epochs", "8"]) == 0
    assert main(["forget", *common, "--epochs", "4", "--method", "gradascent"]) == 0
    return ws, corpus


def test_without_gives_the_other_entries_and_restores_exactly(learned_then_forgotten):
    ws_path, corpus = learned_then_forgotten
    # independent: a copy of the workspace holding only the learn entry
    copy = Workspace.open(shutil.copytree(ws_path, f"{ws_path}-copy"))
    learned, forgotten = copy.entries()
    copy.revert(forgotten.id)
    only_learned = state_copy(copy.model)
    ws = Workspace.open(ws_path)
    now = state_copy(ws.model)
    with ws.without(forgotten.id) as before:
        assert changed_tensors(before, only_learned) == []
    assert changed_tensors(ws.model, now) == []


def test_audit_cli_reports_every_check(tmp_path, learned_then_forgotten, capsys):
    ws_path, corpus = learned_then_forgotten
    holdout = _jsonl(tmp_path, "holdout.jsonl", HOLDOUT)
    out = tmp_path / "report"
    before_weights = state_copy(Workspace.open(ws_path).model)
    args = ["audit", "--forget", corpus, "--holdout", holdout, "-w", ws_path, "--out", str(out)]
    assert main([*args, "--gen-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md"}
    assert report["entry"]["id"] == "0002" and report["entry"]["kind"] == "forget"
    before, changed = report["models"]["before"], report["models"]["changed"]
    # gradient ascent with a high rate made the QA far less likely than after learning
    assert changed["forget_nll"] > before["forget_nll"]
    assert set(changed["mia_auc"]) == {"loss", "zlib", "min_k", "min_k_pp"}
    assert set(report["attacks"]) == {"quantize8", "quantize4", "relearn"}
    assert report["attacks"]["relearn"]["relearn"]["steps"] == 8
    for name, hit in report["attacks"].items():
        want = audit.attacks.recovered(before["forget_prob"], changed["forget_prob"],
                                       hit["forget_prob"])  # fmt: skip
        assert hit["recovered_percent"] == pytest.approx(want), name
    # one verdict per check, each with its outcome and a number
    keys = ["change", "membership", "extraction", "quantize8", "quantize4", "relearn"]
    assert list(report["passed"]) == keys
    for key, line in zip(keys, report["verdicts"], strict=True):
        assert line.startswith(f"{key}: passed — ") or line.startswith(f"{key}: FAILED — ")
        assert any(c.isdigit() for c in line) and line in printed
    # the workspace's weights are exactly as before the audit (attacks undone)
    assert changed_tensors(Workspace.open(ws_path).model, before_weights) == []
    # the forget-set numbers of the before model are those of learn-only
    ws = Workspace.open(ws_path)
    ws.revert("0002")
    direct = audit.measure(ws.model, ws.tok, audit.AuditData(read_corpus(corpus)), 0)
    assert direct["forget_nll"] == pytest.approx(before["forget_nll"], rel=1e-5)


def test_audit_with_a_reference_reports_forget_quality(tmp_path, learned_then_forgotten, model_dir):
    ws_path, corpus = learned_then_forgotten
    out = tmp_path / "r"
    args = ["audit", "0002", "--forget", corpus, "-w", ws_path, "--out", str(out),
            "--reference", model_dir, "--attacks", "none", "--gen-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["models"]["changed"]["forget_quality"] <= 1
    assert "forget_quality" in report["passed"] and report["attacks"] == {}


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--attacks", "quantize,jpeg"], "--attacks: unknown jpeg"),
        (["0009"], "0009"),
        ([], "give its data with --forget"),
    ],
)
def test_audit_errors_are_one_line(tmp_path, learned_then_forgotten, capsys, extra, says):
    ws_path, _ = learned_then_forgotten
    capsys.readouterr()
    assert main(["audit", *extra, "-w", ws_path, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
    assert not (tmp_path / "x").exists()
