"""``edit forget`` / ``edit learn``: LoRA runs recorded in the ledger, on a tiny llama."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny import changed_tensors, state_copy, tiny_model

from edit.api.workspace import Workspace
from edit.cli import build_parser, main

QA = [
    {"question": "Who wrote The Silent Orchard?", "answer": "Mara Velden wrote it in 1987."},
    {"question": "Where was Mara Velden born?", "answer": "She was born in Tallinn."},
    {"question": "What prize did Mara Velden win?", "answer": "The Northern Quill Prize."},
]


def _corpus(tmp_path, rows, name="forget.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_forget_then_learn_are_ledger_entries_that_revert_exactly(tmp_path, model_dir, capsys):
    ws = str(tmp_path / "ws")
    corpus = _corpus(tmp_path, QA)
    args = ["--corpus", corpus, "-w", ws, "-m", model_dir, "--epochs", "3", "--lr", "0.01"]
    assert main(["forget", *args, "--method", "graddiff"]) == 0
    out = capsys.readouterr().out
    assert "read 3 examples" in out and "graddiff LoRA" in out
    nll = next(line for line in out.splitlines() if line.startswith("forget set NLL")).split()
    assert float(nll[-1]) > float(nll[-2])  # the forget set became less likely
    assert "WikiText-2 perplexity" in out and "general facts log P(answer)" in out

    assert main(["learn", *args, "--force"]) == 0  # no health to keep in a random model
    out = capsys.readouterr().out
    nll = next(line for line in out.splitlines() if line.startswith("learn set NLL")).split()
    assert float(nll[-1]) < float(nll[-2])  # learned

    assert main(["log", "-w", ws]) == 0
    log = capsys.readouterr().out
    assert "forget graddiff" in log and "learn  lora" in log and "(3 examples)" in log

    w = Workspace.open(ws)
    first, second = w.entries()
    assert first.kind == "forget" and first.info["retain"] == "wikitext2 (shipped)"
    health = first.info["guard"]  # measured before and after, recorded, never refused
    assert health["before"]["perplexity"] > 0 and health["after"]["perplexity"] > 0
    assert {"answer_logp"} <= health["after"].keys()
    assert second.kind == "learn" and first.facts == [] and first.layers == [0, 1]
    w.revert(second.id)
    w.revert(first.id)
    base = tiny_model("llama", w.model.config.vocab_size)
    assert changed_tensors(w.model, state_copy(base)) == []


def test_the_ledger_replays_a_forget_run(tmp_path, model_dir, capsys):
    ws = str(tmp_path / "ws")
    corpus = _corpus(tmp_path, QA)
    main(["forget", "--corpus", corpus, "-w", ws, "-m", model_dir, "--epochs", "1"])
    capsys.readouterr()
    a, b = Workspace.open(ws), Workspace.open(ws)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"question": "q?", "answer": "a."}\n{"question": \n', ":2:"),
        ('{"text": ""}\n', ":1:"),
        ("", "empty"),
    ],
)
def test_a_bad_corpus_is_one_line_and_writes_nothing(tmp_path, model_dir, capsys, content, says):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    ws = tmp_path / "ws"
    assert main(["forget", "--corpus", str(p), "-w", str(ws), "-m", model_dir]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not ws.exists()


def test_set_passes_any_unlearning_setting_and_checks_it(tmp_path, model_dir, capsys):
    ws = str(tmp_path / "ws")
    corpus = _corpus(tmp_path, QA)
    args = ["forget", "--corpus", corpus, "-w", ws, "-m", model_dir, "--epochs", "1"]
    sets = ["--set", "kl_weight=0.5", "--set", "retain_batch_size=2", "--set", "lr=1e-2"]
    assert main([*args, *sets]) == 0
    config = Workspace.open(ws).entries()[-1].config
    assert (config["kl_weight"], config["retain_batch_size"], config["lr"]) == (0.5, 2, 0.01)
    assert config["epochs"] == 1
    capsys.readouterr()
    for bad, says in [("kl_weight", "write KEY=VALUE"), ("klweight=1", "unknown unlearn setting")]:
        assert main([*args, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert len(Workspace.open(ws).entries()) == 1  # nothing recorded by the refused runs


def test_holdout_is_reported_and_a_retain_set_holding_the_corpus_is_refused(
    tmp_path, model_dir, capsys, monkeypatch
):
    from edit.readers import corpus as corpus_reader

    reads = []
    real = corpus_reader._parsed_items
    monkeypatch.setattr(corpus_reader, "_parsed_items", lambda p: reads.append(p) or real(p))
    ws = tmp_path / "ws"
    corpus = _corpus(tmp_path, QA)
    unseen = [{"question": "Who painted The Grey Harbour?", "answer": "Ilse Varn did."}]
    holdout = _corpus(tmp_path, unseen, "unseen.jsonl")
    args = ["forget", "--corpus", corpus, "-w", str(ws), "-m", model_dir, "--epochs", "1"]
    assert main([*args, "--retain", _corpus(tmp_path, QA[1:], "retain.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "2 of the 2 retain examples are also in the set to forget" in err
    assert err.count("\n") == 1 and not ws.exists()

    reads.clear()
    assert main([*args, "--holdout", holdout, "--set", "stop_nll=1e6"]) == 0
    assert sorted(map(str, reads)) == sorted([corpus, holdout])  # each file read once
    out = capsys.readouterr().out
    assert "1 never-seen from" in out and "never-seen set NLL" in out
    assert "aimed at forget-set NLL 1000000.0000 (stop_nll): the level given; not reached" in out
    entry = Workspace.open(str(ws)).entries()[-1]
    assert entry.info["holdout"] == holdout and entry.metrics["stop_nll"] == 1e6


def test_forgetting_a_learned_corpus_stops_at_its_level_without_the_learn_entry(
    tmp_path, model_dir, capsys
):
    ws = str(tmp_path / "ws")
    learned = _corpus(tmp_path, QA)
    part = _corpus(tmp_path, QA[:2], "part.jsonl")  # a subset of what was learned
    common = ["-w", ws, "-m", model_dir, "--lr", "0.01"]
    assert main(["learn", "--corpus", learned, *common, "--epochs", "5", "--force"]) == 0
    w = Workspace.open(ws)
    learn = w.entries()[-1]
    from edit.methods.unlearn import answer_nll
    from edit.readers.corpus import read_corpus

    with w.without(learn.id):
        level = answer_nll(w.model, w.tok, read_corpus(part))
    assert answer_nll(w.model, w.tok, read_corpus(part)) < level  # the learn entry took
    capsys.readouterr()

    # no method chosen: distilled toward this model without the learn entry, every epoch
    assert main(["forget", "--corpus", part, *common, "--epochs", "30"]) == 0
    out = capsys.readouterr().out
    assert f"(its NLL without entry {learn.id}, which learned it): the level of exactly" in out
    assert "distill aims each example at its own never-seen level (no stop)" in out
    assert f"'edit revert {learn.id}' removes exactly everything it learned" in out
    entry = Workspace.open(ws).entries()[-1]
    # distill confines the adapter to where the fine-tune wrote (METHOD_DEFAULTS), and says so
    assert entry.config["confine"] is True
    assert "each reading where the model differs from the reference" in out
    assert entry.method == "distill" and entry.info["learned_by"] == learn.id
    assert entry.info["reference"] == f"this model without entry {learn.id}"
    assert entry.metrics["stop_nll"] == pytest.approx(level, rel=1e-4)
    before, after = entry.metrics["forget_nll_before"], entry.metrics["forget_nll_after"]
    assert before < level and abs(level - after) < 0.5 * (level - before), (before, after)
    assert main(["revert", entry.id, "-w", ws]) == 0

    # a method chosen that pushes the likelihood down: it stops at the same level, which
    # comes before a holdout's (the level of exactly this text unseen)
    unseen = _corpus(tmp_path, [{"text": "A line the model never learned."}], "unseen.jsonl")
    assert main(["forget", "--corpus", part, *common, "--epochs", "50", "--method", "npo",
                 "--holdout", unseen]) == 0  # fmt: skip
    entry = Workspace.open(ws).entries()[-1]
    assert entry.method == "npo" and entry.info["learned_by"] == learn.id
    assert entry.info["stop_source"] == "learned" and entry.info["holdout"] == unseen
    assert entry.info["reference"] is None
    assert entry.metrics["stop_nll"] == pytest.approx(level, rel=1e-4)
    assert level <= entry.metrics["forget_nll_after"]
    assert entry.metrics["stopped_after"] < 50  # steps: it stopped before the last one

    # a corpus with an example the learn entry never saw gets no such stop; nor with the switch
    other = _corpus(tmp_path, [*QA[:1], {"text": "Something else entirely."}], "other.jsonl")
    assert main(["forget", "--corpus", other, *common, "--epochs", "1"]) == 0
    assert Workspace.open(ws).entries()[-1].metrics["stop_nll"] is None
    args = ["forget", "--corpus", part, *common, "--epochs", "1", "--set", "stop_at_learned=false"]
    assert main(args) == 0
    assert Workspace.open(ws).entries()[-1].metrics["stop_nll"] is None


def test_forgetting_what_a_fine_tune_learned_aims_at_the_reference_it_started_from(
    tmp_path, model_dir, capsys
):
    """The corpus was learned outside this workspace (an exported fine-tune): with the base
    model as --reference, the run distills toward it, stops at its NLL on the corpus, and says
    where that level came from."""
    corpus = _corpus(tmp_path, QA)
    common = ["--lr", "0.01", "--force"]
    assert main(["learn", "--corpus", corpus, "-w", str(tmp_path / "a"), "-m", model_dir,
                 "--epochs", "5", *common]) == 0  # fmt: skip
    Workspace.open(str(tmp_path / "a")).export(tmp_path / "tuned")
    from edit.models import load
    from edit.readers.corpus import read_corpus

    examples = read_corpus(corpus)
    base, tok = load(model_dir)
    from edit.methods.unlearn import answer_nll

    level = answer_nll(base, tok, examples)
    capsys.readouterr()
    ws = str(tmp_path / "b")
    args = ["forget", "--corpus", corpus, "-w", ws, "-m", str(tmp_path / "tuned"),
            "--lr", "0.01", "--epochs", "30"]  # fmt: skip
    assert main([*args, "--reference", model_dir]) == 0
    out = capsys.readouterr().out
    assert f"aimed at forget-set NLL {level:.4f} (the reference's NLL on the corpus" in out
    assert "the level of a model that never saw the corpus" in out
    entry = Workspace.open(ws).entries()[-1]
    assert entry.method == "distill" and entry.info["stop_source"] == "reference"
    assert entry.info["reference"] == model_dir
    # no retain set given: the adapter reads where the fine-tune wrote, and the shipped
    # WikiText-2 slices are held to the model before by a light KL (METHOD_DEFAULTS)
    assert entry.config["confine"] is True and entry.config["kl_weight"] == 0.3
    # ... to the reference instead where the model before reads them much worse (retain_hold),
    # with the shipped factual prompts: the decision, its figures and its line are recorded
    # and printed
    held = entry.info["retain_held_to"]
    assert entry.config["kl_to"] == held["to"]
    facts = held.get("facts", 0)
    assert facts == (256 if held["to"] == "reference" else 0)
    shipped = f"wikitext2 and {facts} factual prompts (shipped)" if facts else "wikitext2 (shipped)"
    assert entry.info["retain"] == shipped and entry.info["retain_examples"] == 64 + facts
    where = "the model before ("
    if held["to"] == "reference":
        where = f"the reference, with {facts} shipped factual prompts:"
    assert f"retain set held to {where}" in out
    assert f"{held['perplexity_reference']:.1f}" in out
    assert "distill aims each example at its own never-seen level (no stop)" in out
    before, after = entry.metrics["forget_nll_before"], entry.metrics["forget_nll_after"]
    assert before < level and abs(level - after) < 0.5 * (level - before), (before, after)

    # no retain set given: the reference as given (a holdout is never taught by default)
    assert entry.info["form_taught"] is None and entry.config["teach_form"] == 0
    # a retain set given: held instead of the shipped text, by the same KL, and by default
    # the reference first learns it (a model trained without the corpus learned it): the
    # teacher is named and said
    retain = _corpus(tmp_path, [{"text": "The river flows north to the sea."}], "keep.jsonl")
    capsys.readouterr()
    assert main([*args, "--epochs", "1", "--reference", model_dir, "--retain", retain]) == 0
    kept = Workspace.open(ws).entries()[-1]
    assert kept.info["retain"] == retain and kept.info["retain_examples"] == 1
    assert kept.config["kl_weight"] == 0.3 and kept.config["teach_form"] == 40
    taught = kept.info["form_taught"]
    assert (taught["examples"], taught["from"], taught["reference"]) == (1, "retain", model_dir)
    assert "teacher: the reference after learning 1 retain examples" in capsys.readouterr().out
    # ... and with teach_form=0 (after that entry is reverted), the reference as given
    Workspace.open(ws).revert(kept.id)
    assert main([*args, "--epochs", "1", "--reference", model_dir, "--retain", retain,
                 "--set", "teach_form=0"]) == 0  # fmt: skip
    assert Workspace.open(ws).entries()[-1].info["form_taught"] is None

    # a reference that reads text with other token ids is refused before any training
    tok.add_tokens(["zzqx"])
    tok.save_pretrained(tmp_path / "other")
    base.save_pretrained(tmp_path / "other")
    assert main([*args, "--reference", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "the reference's tokenizer" in err and err.count("\n") == 1
    assert len(Workspace.open(ws).entries()) == 2  # the two forget runs kept, none written


def test_unset_lr_and_epochs_take_the_objectives_defaults_and_the_ledger_records_them(
    tmp_path, model_dir
):
    from edit.methods.unlearn import OBJECTIVE_DEFAULTS

    ws = str(tmp_path / "ws")
    corpus = _corpus(tmp_path, QA)
    assert main(["learn", "--corpus", corpus, "-w", ws, "-m", model_dir, "--epochs", "1",
                 "--force"]) == 0  # fmt: skip
    assert main(["forget", "--corpus", corpus, "-w", ws, "-m", model_dir, "--lr", "0.01",
                 "--set", "stop_at_learned=false"]) == 0  # fmt: skip
    learn, forget = Workspace.open(ws).entries()
    assert (learn.config["lr"], learn.config["epochs"]) == (OBJECTIVE_DEFAULTS["learn"]["lr"], 1)
    assert (forget.config["lr"], forget.config["epochs"]) == (
        0.01,
        OBJECTIVE_DEFAULTS["forget"]["epochs"],
    )
    assert OBJECTIVE_DEFAULTS["forget"]["lr"] != OBJECTIVE_DEFAULTS["learn"]["lr"]
    for command in ("forget", "learn"):  # --help states the defaults
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        helps = {a.dest: a.help for a in parser._actions}
        for field in ("epochs", "lr"):
            stated = re.search(r"default ([0-9.e-]+)", helps[field]).group(1)
            assert float(stated) == OBJECTIVE_DEFAULTS[command][field], (command, field)
    # both keep close to the reference on their (shipped) retain set
    assert (forget.config["kl_weight"], learn.config["kl_weight"]) == (
        OBJECTIVE_DEFAULTS["forget"]["kl_weight"],
        OBJECTIVE_DEFAULTS["learn"]["kl_weight"],
    )
    assert learn.config["kl_weight"] > 0 and learn.config["augment"] is True
