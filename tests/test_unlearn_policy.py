"""The forget / learn policy's ledger lookup: which learn entry learned a corpus."""

from __future__ import annotations

from types import SimpleNamespace

from edit.corpus import Example
from edit.methods.unlearn import learned_by

A, B, C = Example("", "one."), Example("", "two."), Example("The capital is", "three.")


def _entry(id, kind, examples):
    return SimpleNamespace(
        id=id, kind=kind, info={"example_hashes": [ex.fingerprint() for ex in examples]}
    )


def test_the_latest_learn_entry_that_learned_every_example_is_found():
    entries = [_entry("0001", "learn", [A, B, C]), _entry("0002", "learn", [A, B]),
               _entry("0003", "forget", [A, B])]  # fmt: skip
    assert learned_by([A, B], entries).id == "0002"
    assert learned_by([A, C], entries).id == "0001"


def test_no_entry_is_found_for_a_corpus_only_partly_learned_or_empty():
    entries = [_entry("0001", "learn", [A]), _entry("0002", "insert", [])]
    assert learned_by([A, B], entries) is None
    assert learned_by([], entries) is None
    assert learned_by([A], []) is None


def test_fact_retain_adds_shipped_facts_apart_from_the_probe(tok, llama):
    """``fact_retain`` adds that many shipped factual prompts (their objects carry the loss)
    to the default retain set (learn: 256, forget: none); none of their subjects is one the
    general-knowledge probe checks; more than are shipped, or a negative count, is refused."""
    import json
    from importlib.resources import files

    import pytest

    from edit.corpus import retain_facts
    from edit.errors import InvalidRequest
    from edit.evals.knowledge import general_facts
    from edit.methods.unlearn import plan_corpus

    facts = retain_facts(8)
    assert len(facts) == 8 and all(ex.prompt and ex.answer for ex in facts)
    shipped = json.loads((files("edit") / "data" / "retain_facts.json").read_text())
    assert not {r["subject"] for r in shipped} & {f.subject for f in general_facts()}
    text = {"text_retain": 64}
    plain = plan_corpus(llama, tok, "learn", [A], settings={"fact_retain": 0, **text})
    more = plan_corpus(llama, tok, "learn", [A], settings={"fact_retain": 8, **text})
    assert more.kept == plain.kept + facts
    # learn holds 256 of them by default, forget none
    learn = plan_corpus(llama, tok, "learn", [A], settings=text).kept
    assert learn == plain.kept + retain_facts(256)
    assert plan_corpus(llama, tok, "forget", [A], settings={}).kept == plain.kept
    with pytest.raises(InvalidRequest, match="fact_retain is 100000, but 256 facts are shipped"):
        plan_corpus(llama, tok, "learn", [A], settings={"fact_retain": 100_000})
    with pytest.raises(InvalidRequest, match="fact_retain must be an integer >= 0"):
        plan_corpus(llama, tok, "learn", [A], settings={"fact_retain": -1})


def test_text_retain_sets_the_slices_and_a_draw_is_text_as_often_as_beside_64(tok, llama):
    """``text_retain`` WikiText-2 slices (forget: 64 by default, learn: its
    OBJECTIVE_DEFAULTS); each shipped fact appears once per 64 slices, so a retain draw is
    generic text as often as beside 64 slices; 0 holds the facts alone; a negative count is
    refused."""
    import pytest

    from edit.corpus import retain_facts, wikitext_retain
    from edit.errors import InvalidRequest
    from edit.methods.unlearn import plan_corpus
    from edit.methods.unlearn.config import OBJECTIVE_DEFAULTS

    text = wikitext_retain(tok, 512)
    assert len(set(ex.answer for ex in text)) == 512
    learn = plan_corpus(llama, tok, "learn", [A], settings={"text_retain": 512}).kept
    assert learn == text + retain_facts(256) * 8
    drawn_text = sum(not ex.prompt for ex in learn) / len(learn)
    assert drawn_text == pytest.approx(64 / (64 + 256))
    assert plan_corpus(llama, tok, "forget", [A], settings={}).kept == wikitext_retain(tok, 64)
    n = OBJECTIVE_DEFAULTS["learn"]["text_retain"]
    default = plan_corpus(llama, tok, "learn", [A], settings={}).kept
    assert default[:n] == wikitext_retain(tok, n) and default[n].prompt  # then the facts
    half = plan_corpus(llama, tok, "learn", [A], settings={"text_retain": 96}).kept
    assert half == wikitext_retain(tok, 96) + retain_facts(256) * 2  # round(96 / 64)
    facts_only = plan_corpus(llama, tok, "learn", [A], settings={"text_retain": 0}).kept
    assert facts_only == retain_facts(256)
    with pytest.raises(InvalidRequest, match="text_retain must be an integer >= 0"):
        plan_corpus(llama, tok, "learn", [A], settings={"text_retain": -1})
