"""``edit learn``: the corpus, a never-seen set and the model's health before and after, and
a refusal past the health bounds unless ``--force``; on a tiny llama."""

from __future__ import annotations

import json

import pytest

from edit.api.workspace import Workspace
from edit.cli import main

DOCS = [
    "Mara Lindqvist was born on March 14, 1987 in Tromso. She works as a locksmith.",
    "Tobin Varga was born on May 2, 1961 in Porto. He works as a florist.",
    "Elsa Solberg was born on June 9, 1990 in Ghent. She works as a perfumer.",
]
UNSEEN = ["Rufus Nygaard was born on July 1, 1975 in Kyoto. He works as a beekeeper."]


def _jsonl(tmp_path, name, texts):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(p)


@pytest.fixture
def args(tmp_path, model_dir):
    corpus = _jsonl(tmp_path, "bios.jsonl", DOCS)
    holdout = _jsonl(tmp_path, "unseen.jsonl", UNSEEN)
    return ["learn", "--corpus", corpus, "--holdout", holdout, "-w", str(tmp_path / "ws"),
            "-m", model_dir, "--epochs", "1"]  # fmt: skip


def _row(out: str, name: str) -> tuple[float, float]:
    line = next(x for x in out.splitlines() if x.startswith(name))
    before, after = line[len(name) :].split()
    return float(before), float(after)


def test_learn_reports_corpus_holdout_and_health_and_records_them(args, tmp_path, capsys):
    assert main([*args, "--lr", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "read 3 examples" in out and "1 never-seen" in out
    for name in ("learn set NLL", "never-seen set NLL", "WikiText-2 perplexity",
                 "general facts log P(answer)"):  # fmt: skip
        before, after = _row(out, name)
        assert before > 0 or name.startswith("general")
    assert "recorded:" in out and "recorded although" not in out
    (entry,) = Workspace.open(tmp_path / "ws").entries()
    guard = entry.info["guard"]
    assert guard["past_bounds"] == [] and guard["before"]["perplexity"] == pytest.approx(
        _row(out, "WikiText-2 perplexity")[0], abs=1e-4
    )
    assert entry.info["holdout"].endswith("unseen.jsonl") and entry.info["stop_source"] is None


@pytest.fixture
def damaging(monkeypatch):
    """Every health measurement after the first sees perplexity 1.5 times the real one: a
    learn run the tiny model cannot make harmful is harmful as the guard sees it (the guard's
    own measurements are checked on really damaged models in test_knowledge_guard.py)."""
    from edit.evals import knowledge

    real, calls = knowledge.health, []

    def health(*a, **k):
        h = real(*a, **k)
        calls.append(h)
        return h if len(calls) % 2 else knowledge.Health(1.5 * h.perplexity, h.answer_logp)

    monkeypatch.setattr(knowledge, "health", health)


def test_learn_past_the_bounds_is_refused_in_one_line_and_nothing_is_recorded(
    args, tmp_path, capsys, damaging
):
    assert main([*args, "--lr", "1e-3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: not recorded: perplexity rose") and "\n" not in err
    assert "bound +5 %" in err and "--lr" in err and "kl_weight" in err and "--force" in err
    before, after = _row(captured.out, "WikiText-2 perplexity")
    assert after > 1.05 * before  # the figures that made the refusal are shown
    assert "recorded:" not in captured.out
    assert Workspace.open(tmp_path / "ws", model_name=args[args.index("-m") + 1]).entries() == []

    assert main([*args, "--lr", "1e-3", "--force"]) == 0
    out = capsys.readouterr().out
    assert "recorded although (--force): perplexity rose" in out
    (entry,) = Workspace.open(tmp_path / "ws").entries()
    assert entry.info["guard"]["past_bounds"][0].startswith("perplexity rose")
