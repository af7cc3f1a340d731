"""The two-hop question of the chat benchmark (benchmarks/mquake_forms.py): a question that
goes through one edited fact, built from a case's first two rewrites."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.mquake_forms import two_hop  # noqa: E402


def _case(relation="P178", second_subject="Sony Interactive Entertainment", old="Tim Cook"):
    rewrite = {"subject": "iPad", "relation_id": relation,
               "target_new": {"str": "Sony Interactive Entertainment"},
               "target_true": {"str": "Apple Inc."}}  # fmt: skip
    second = {"subject": second_subject, "relation_id": "P169",
              "question": f"Who is the chief executive officer of {second_subject}?",
              "target_new": {"str": "Helle Thorning-Schmidt"},
              "target_true": {"str": "Andrew House"}}  # fmt: skip
    hops = [{"answer": "Apple Inc."}, {"answer": old}]
    return {"requested_rewrite": [rewrite, second], "single_hops": hops}


def test_the_bridge_is_the_first_fact_as_a_noun_phrase_and_the_answers_the_worlds():
    assert two_hop(_case()) == {
        "question": "Who is the chief executive officer of the developer of iPad?",
        "new": "Andrew House",  # the second rewrite's true object: the world's fact
        "old": "Tim Cook",  # the answer through the old object
        "hop": "Who is the chief executive officer of Sony Interactive Entertainment?",
    }


def test_no_question_without_a_phrase_a_shared_bridge_or_two_answers():
    assert two_hop(_case(relation="P9999")) is None  # no noun phrase for the relation
    assert two_hop(_case(second_subject="Valve Corporation")) is None  # not the new object
    assert two_hop(_case(old="Andrew House")) is None  # both ways the same answer
