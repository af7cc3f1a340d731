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
