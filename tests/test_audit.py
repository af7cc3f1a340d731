"""``edit audit`` on a tiny llama: the before model is the workspace without the entry, the
report holds every check with its number, attacks leave the weights exactly as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import changed_tensors, state_copy

from edit.api.workspace import Workspace
from edit.cli import main
from edit.errors import InvalidRequest
from edit.evals import audit
from edit.readers.corpus import read_corpus

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
    {"question": "Which ship did Ivo Sandberg paint?", "answer": "The ferry Solveig, twice."},
    {"question": "When did Ivo Sandberg die?", "answer": "He died in the winter of 1994."},
]
# related data of the same kind for the relearning attack: two of the holdout examples (the
# after-attack AUC must leave them out) and one more
RELATED = [*HOLDOUT[:2], {"question": "Who taught Ivo Sandberg?", "answer": "His aunt Liv."}]


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
    # one verdict per check, each with its outcome and a number or the reason it did not run
    keys = ["change", "membership", "forget_nll", "forget_quality", "extraction", "quantize8",
            "quantize4", "relearn"]  # fmt: skip
    assert list(report["passed"]) == keys
    for key, line in zip(keys, report["verdicts"], strict=True):
        assert line.split(" — ")[0] in (f"{key}: passed", f"{key}: FAILED", f"{key}: not run")
        assert line in printed
    # without a reference the two-sided checks are not run, never passed
    for key in ("membership", "forget_nll", "forget_quality"):
        assert report["passed"][key] is None and "no reference" in report["checks"][key]["text"]
    assert json.loads((out / "audit.json").read_text())["verdict"] in ("failed", "incomplete")
    # the workspace's weights are exactly as before the audit (attacks undone)
    assert changed_tensors(Workspace.open(ws_path).model, before_weights) == []
    # the forget-set numbers of the before model are those of learn-only
    ws = Workspace.open(ws_path)
    ws.revert("0002")
    direct = audit.measure(ws.model, ws.tok, audit.AuditData(read_corpus(corpus)), 0)
    assert direct["forget_nll"] == pytest.approx(before["forget_nll"], rel=1e-5)


def test_audit_with_a_reference_writes_the_certificate(tmp_path, learned_then_forgotten, model_dir):
    ws_path, corpus = learned_then_forgotten
    holdout = _jsonl(tmp_path, "holdout.jsonl", HOLDOUT)
    out = tmp_path / "r"
    args = ["audit", "0002", "--forget", corpus, "--holdout", holdout, "-w", ws_path,
            "--out", str(out), "--reference", model_dir, "--attacks", "quantize",
            "--gen-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    cert = json.loads((out / "audit.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"audit.json", "report.json", "report.md"}
    # the inputs as read, by content hash; the audited model and the reference by weights
    for role, path in (("forget", corpus), ("holdout", holdout)):
        want = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert cert["inputs"][role] == {"path": path, "sha256": want}
    assert cert["inputs"]["reference"]["path"] == model_dir  # a folder: no file hash
    assert cert["inputs"]["reference"]["sha256"] is None
    assert cert["inputs"]["reference"]["weights"] != cert["inputs"]["audited_model"]["weights"]
    assert f"**Verdict: {cert['verdict']}**" in (out / "report.md").read_text()
    assert cert["inputs"]["audited_model"]["entries"] == ["0001", "0002"]
    assert cert["software"]["commit"] and cert["verdict"] in ("passed", "failed", "incomplete")
    # every check: verdict, figure, the reference's figure, interval and threshold
    assert set(cert["checks"]) == {"change", "membership", "forget_nll", "forget_quality",
                                   "extraction", "quantize8", "quantize4"}  # fmt: skip
    for key in ("membership", "forget_nll"):
        check = cert["checks"][key]
        assert check["verdict"] in ("passed", "failed", "not run") and check["threshold"]
        assert check["reference"] is not None and len(check["interval"]) == 2
    ref, changed = cert["figures"]["reference"], cert["figures"]["changed"]
    assert cert["checks"]["membership"]["reference"] in ref["mia_auc"].values()
    assert cert["checks"]["forget_nll"]["reference"] == ref["forget_nll"]
    lo, hi = changed["forget_nll_interval"]
    assert lo <= changed["forget_nll"] <= hi and "forget_example_nll" not in changed
    assert all(lo <= changed["mia_auc"][k] <= hi
               for k, (lo, hi) in changed["mia_auc_interval"].items())  # fmt: skip
    # each attack ran on the reference too; recovery is the excess over the reference's gain
    before, changed, ref = (report["models"][k] for k in ("before", "changed", "reference"))
    for name in ("quantize8", "quantize4"):
        hit = report["attacks"][name]
        gain = hit["reference"]["forget_prob"] - ref["forget_prob"]
        want = audit.attacks.recovered(before["forget_prob"], changed["forget_prob"],
                                       hit["forget_prob"], gain)  # fmt: skip
        assert hit["recovered_percent"] == pytest.approx(want) and gain != 0
        assert cert["attacks"][name]["reference"]["forget_prob"] == hit["reference"]["forget_prob"]


def test_relearning_runs_on_the_reference_and_spares_its_holdout(
    tmp_path, learned_then_forgotten, model_dir
):
    from edit import load

    ws_path, corpus = learned_then_forgotten
    ws = Workspace.open(ws_path)
    reference, _ = load(model_dir)
    ref_weights, ws_weights = state_copy(reference), state_copy(ws.model)
    data = audit.AuditData(read_corpus(corpus), read_corpus(_jsonl(tmp_path, "h.jsonl", HOLDOUT)),
                           relearn=read_corpus(_jsonl(tmp_path, "rel.jsonl", RELATED)))  # fmt: skip
    report = audit.audit(ws, "0002", data, reference=reference, attack_names=("relearn",),
                         gen_tokens=0, progress=False)  # fmt: skip
    hit = report.attacks["relearn"]
    assert hit["relearn"]["holdout_used_by_attack"] == 2 and hit["relearn"]["holdout_scored"] == 3
    # the after-attack AUC of both models is on the three holdout examples it did not train on
    for m in (hit, hit["reference"]):
        assert len(m["mia_scores"]["holdout"]["loss"]) == 3
    # the same relearning moved the reference, and the recovery is net of that
    ref = report.models["reference"]
    gain = hit["reference"]["forget_prob"] - ref["forget_prob"]
    assert gain != 0 and hit["reference_gain"]["forget_prob"] == pytest.approx(gain)
    b, c = report.models["before"], report.models["changed"]
    assert hit["recovered_percent"] == pytest.approx(
        audit.attacks.recovered(b["forget_prob"], c["forget_prob"], hit["forget_prob"], gain)
    )
    assert "membership AUC" in report.checks["relearn"].text
    # both models exactly as before
    assert changed_tensors(reference, ref_weights) == []
    assert changed_tensors(ws.model, ws_weights) == []
    # the audited model itself as its reference is refused before anything is measured
    with pytest.raises(InvalidRequest, match="the reference is the audited model itself"):
        audit.audit(ws, "0002", data, reference=ws.model, attack_names=())


def test_a_workspace_without_entries_audits_the_model_as_it_is(
    tmp_path, learned_then_forgotten, model_dir, capsys
):
    """No entry: no before model and no change check. The null case, a model that never saw
    the forget set audited against itself, passes every check; a model that learned it
    (exported, so no entry is left to revert) fails membership against the base model, and its
    attacks are judged against the base model's under the same attack."""
    ws_path, corpus = learned_then_forgotten
    nowhere = str(tmp_path / "nowhere")
    assert main(["audit", "-w", nowhere, "-m", model_dir]) == 2  # no data: refused up front
    assert f"no workspace at {nowhere}: give the data with --forget" in capsys.readouterr().err
    holdout = _jsonl(tmp_path, "holdout.jsonl", HOLDOUT)
    args = ["--forget", corpus, "--holdout", holdout, "--reference", model_dir,
            "--gen-tokens", "4", "--attacks", "quantize"]  # fmt: skip
    null = tmp_path / "null"
    assert main(["audit", *args, "-w", str(tmp_path / "base"), "-m", model_dir,
                 "--out", str(null)]) == 0  # fmt: skip
    cert = json.loads((null / "audit.json").read_text())
    assert cert["entry"]["summary"] == "the model as it is" and cert["entry"]["id"] is None
    assert cert["inputs"]["reference"]["same_as_audited"] is True
    assert "change" not in cert["checks"] and "before" not in cert["figures"]
    assert set(cert["checks"]) == {"membership", "forget_nll", "forget_quality", "extraction",
                                   "quantize8", "quantize4"}  # fmt: skip
    assert cert["verdict"] == "passed", cert["checks"]

    ws = Workspace.open(ws_path)
    ws.revert("0002")  # the model that learned the QA, exported: no entry to audit there
    assert main(["export", str(tmp_path / "learned"), "-w", ws_path]) == 0
    out = tmp_path / "learned-audit"
    assert main(["audit", *args, "-w", str(tmp_path / "ws-learned"), "-m",
                 str(tmp_path / "learned"), "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["reference"]["same_as_audited"] is False
    assert report["passed"]["membership"] is False
    for name in ("quantize8", "quantize4"):
        hit = report["attacks"][name]
        assert "recovered_percent" not in hit and "reference" in hit
        assert "the model as it is: membership AUC" in report["checks"][name]["text"]


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


@pytest.mark.parametrize(
    "files, extra, says",
    [
        ({"holdout": [QA[0], *HOLDOUT[:2]]}, [], "the holdout shares 1 example(s) with the forget"),
        ({"holdout": HOLDOUT[:1]}, [], "the holdout has 1 example: membership inference needs"),
        ({"holdout": []}, [], "is empty"),
        ({"holdout": [{"text": "Ivo Sandberg lived in Bergen."}] * 2}, [],
         "the holdout is plain text"),
        ({"relearn": [QA[1], *RELATED]}, [], "the relearning sample shares 1 example(s)"),
        ({}, ["--reference", "WORKSPACE"], "the reference is the audited model itself"),
    ],
)  # fmt: skip
def test_audit_refuses_inputs_that_void_a_check(
    tmp_path, learned_then_forgotten, capsys, files, extra, says
):
    ws_path, corpus = learned_then_forgotten
    out = tmp_path / "x"
    args = ["audit", "--forget", corpus, "-w", ws_path, "--out", str(out), "--attacks", "none",
            "--gen-tokens", "1"]  # fmt: skip
    for role, rows in files.items():
        args += [f"--{role}", _jsonl(tmp_path, f"{role}.jsonl", rows)]
    args += [ws_path if a == "WORKSPACE" else a for a in extra]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
    assert not out.exists() and not (tmp_path / "audit-out").exists()


def test_the_python_example_of_docs_audit_runs(tmp_path, model_dir, monkeypatch):
    """docs/audit.md's example, on the tiny llama instead of the default model."""
    import re

    doc = (Path(__file__).parents[1] / "docs" / "audit.md").read_text()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", doc, re.S).group(1)
    code = code.replace(
        'Workspace.open("ws-audit")', f"Workspace.open('ws-audit', model_name={model_dir!r})"
    )
    code = code.replace("edit.load()", f"edit.load({model_dir!r})")
    assert model_dir in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/audit.md", "exec"), {})
    cert = json.loads((tmp_path / "audit-out" / "bios" / "audit.json").read_text())
    assert set(cert["attacks"]) == {"quantize8", "quantize4", "relearn"}
    assert cert["attacks"]["relearn"]["relearn"]["source"] == "given file"
    assert cert["inputs"]["relearn"]["path"] == "related.jsonl"


def test_a_learned_model_fails_membership_and_the_figures_agree_with_a_direct_measurement(
    tmp_path, learned_then_forgotten, model_dir
):
    """The entry that learned the QA, audited against the base model that never saw it:
    membership fails, and the certificate's NLLs and loss AUC are those of full logits."""
    from edit import load
    from edit.corpus import encode_example

    ws_path, corpus = learned_then_forgotten
    ws = Workspace.open(ws_path)
    ws.revert("0002")  # the model as it was after learning
    reference, _ = load(model_dir)
    forget = read_corpus(corpus)
    holdout = read_corpus(_jsonl(tmp_path, "h.jsonl", HOLDOUT))
    report = audit.audit(ws, "0001", audit.AuditData(forget, holdout), reference=reference,
                         attack_names=(), gen_tokens=0, progress=False)  # fmt: skip
    assert report.passed["membership"] is False and report.passed["change"] is False
    assert audit.certificate(report)["verdict"] == "failed"

    def nlls(model, examples):  # mean NLL of each example's loss tokens, from the full logits
        out = []
        for ex in examples:
            ids, n_prompt = encode_example(ws.tok, ex, 256)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[n_prompt - 1 : len(ids) - 1], -1)
            out.append(-logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).mean().item())
        return np.array(out)

    for name, model in (("changed", ws.model), ("reference", reference)):
        m = report.models[name]
        f, h = nlls(model, forget), nlls(model, holdout)
        assert m["forget_example_nll"] == pytest.approx(f, abs=1e-4)
        assert m["forget_nll"] == pytest.approx(f.mean(), abs=1e-4)
        # loss AUC by counting pairs: a forget example scores above a holdout one when its
        # NLL is lower
        pairs = (f[:, None] < h[None, :]).mean() + 0.5 * (f[:, None] == h[None, :]).mean()
        assert m["mia_auc"]["loss"] == pytest.approx(pairs)
    check = report.checks["forget_nll"]
    assert check.figure == pytest.approx(report.models["changed"]["forget_nll"])
    assert check.reference == pytest.approx(report.models["reference"]["forget_nll"])
