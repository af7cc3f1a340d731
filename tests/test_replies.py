"""The reply round (``reply_round``): the edited model asked each question in chat, the
reply cut where the new object fits, and the edit made again with that opening as a row."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import TINY_ROME, state_copy

import edit
from edit import Fact, lm, replies
from edit.methods.algebra import Contexts
from edit.questions import chat_prompt, names, questions_for

FACT = Fact("{} is a citizen of", "Marie Curie", "Spain", "Poland")
QUESTION = "What is Marie Curie a citizen of?"
# an edit that takes on the tiny model (its subject ends the prompt), asked one question
TAKES = Fact("The capital of {}", "France", "Paris", questions=("What is the capital of France?",))


@pytest.mark.parametrize(
    "text, name, want",
    [
        ("Marie Curie is Spanish; Spain, mostly.", "Spain", True),
        ("She is SPAIN's citizen", "spain", True),
        ("She lives in Spainland.", "Spain", False),  # whole words only
        ("Sony Entertainment made it.", "Sony Interactive Entertainment", False),
        ("anything", "!!", False),  # a name without a word names nothing
    ],
)
def test_a_reply_names_an_object_as_whole_words(text, name, want):
    assert names(text, name) is want


@pytest.mark.parametrize("rank", [3, 50, 10**6])
def test_the_opening_is_the_first_cut_after_the_subject_where_the_object_is_likely_next(
    chat_tok, llama, monkeypatch, rank
):
    """Every cut of the reply at a word boundary after the subject is named, in order: the
    opening is the first where the object's first token is among the ``rank`` likeliest
    next tokens (any rank: the first cut, right after the subject)."""
    monkeypatch.setattr(replies, "OPENING_RANK", rank)
    reply = "Marie Curie was a famous physicist from Warsaw and Paris."
    got = replies.opening(llama, chat_tok, FACT, QUESTION, reply)
    words = reply.split(" ")
    cuts = [" ".join(words[:k]) for k in range(2, len(words))]  # "Marie Curie" on
    prompt = chat_prompt(chat_tok, QUESTION)
    first = lm.encode_continuation(chat_tok, " Spain", after=prompt + cuts[0])[0]
    nexts = lm.next_token_logprobs(llama, chat_tok, [prompt + c for c in cuts])
    ranks = [int((row > row[first]).sum()) for row in nexts]
    want = next((c for c, r in zip(cuts, ranks, strict=True) if r < rank), None)
    assert got == want
    if rank == 10**6:
        assert got == "Marie Curie"


def test_a_reply_that_never_names_the_subject_gets_no_opening(chat_tok, llama):
    assert replies.opening(llama, chat_tok, FACT, QUESTION, "Spain is a country.") is None


def test_an_opening_is_one_more_chat_row_the_opening_then_the_object(chat_tok):
    with_opening = Fact(**{**FACT.to_dict(), "openings": ((QUESTION, "Marie Curie holds"),)})
    plain = Contexts(("{}",), ("question", "chat")).rows(chat_tok, FACT)
    rows = Contexts(("{}",), ("question", "chat")).rows(chat_tok, with_opening)
    assert len(rows) == len(plain) + 1 and sum(r.weight for r in rows) == pytest.approx(1.0)
    (row,) = [r for r in rows if r.group == ("opening", 0)]
    assert chat_tok.decode(row.ids) == chat_prompt(chat_tok, QUESTION)
    assert chat_tok.decode(row.ids[: row.lookup + 1]).endswith("Marie Curie")
    assert chat_tok.decode(row.target).strip() == "Marie Curie holds Spain"
    assert chat_tok.decode([row.target[j] for j in row.objects]).strip() == "Spain"
    (j,) = row.mentions  # the opening names the subject: the edit acts there too
    assert chat_tok.decode(row.target[: j + 1]).strip() == "Marie Curie"
    # no chat form, no opening rows
    assert len(Contexts(("{}",), ("question",)).rows(chat_tok, with_opening)) == len(
        Contexts(("{}",), ("question",)).rows(chat_tok, FACT)
    )


STATED = [
    ("The developer of XPath is Xiaomi.", "The developer of XPath is Xiaomi."),
    (
        "The developer of XPath is the Xiaomi (a phone maker).",
        "The developer of XPath is the Xiaomi.",
    ),
    ("XPath was made by Xiaomi, a phone maker from China.", "XPath was made by Xiaomi."),
    ("Xiaomi, the developer of XPath, is Chinese.", None),  # opens on the object
    ("XPath is old. Its developer is Xiaomi.", None),  # not in the first sentence
    ("XPath's maker, not W3C, is Xiaomi.", None),  # names the old object
    ("The story of XPath and Xiaomi is long.", None),  # goes on after the object
    ("The developer of XPath is W3C.", None),  # never names the new object
]


@pytest.mark.parametrize("reply, want", STATED)
def test_a_told_reply_counts_where_its_first_sentence_says_subject_then_object(reply, want):
    fact = Fact("{} was developed by", "XPath", "Xiaomi", "W3C")
    assert replies.stated(reply, fact) == want


def test_told_replies_come_from_the_fact_in_a_system_turn_and_replace_the_sentence(
    chat_tok, llama, monkeypatch
):
    fact = Fact("{} was developed by", "XPath", "Xiaomi", "W3C")
    asked = questions_for(fact)
    prompts = []

    def greedy(model, tok, texts, max_new_tokens):
        prompts.extend(texts)  # the first question's reply states the fact, the others not
        return ["The developer of XPath is Xiaomi, in China."] + ["W3C made it."] * (len(texts) - 1)

    monkeypatch.setattr(lm, "greedy", greedy)
    (heard,) = replies.told(llama, chat_tok, [fact])
    assert heard.told == ((asked[0], "The developer of XPath is Xiaomi."),)
    assert prompts == [replies.told_prompt(chat_tok, fact, q) for q in asked]
    assert "XPath was developed by Xiaomi." in prompts[0]  # the system turn tells the fact
    rows = Contexts(("{}",), ("chat",), chat_reply="context").rows(chat_tok, heard)
    said = [chat_tok.decode(r.target).strip() for r in rows if r.group[0] == "chat"]
    assert said == ["The developer of XPath is Xiaomi."] + ["XPath was developed by Xiaomi."] * (
        len(asked) - 1
    )
    (first,) = [r for r in rows if r.group == ("chat", 0)]
    (j,) = first.mentions  # the told reply names the subject: the edit acts there too
    assert chat_tok.decode(first.target[: j + 1]).endswith("XPath")
    # the sentence where nothing was told, and with the default reply
    assert Contexts(("{}",), ("chat",), chat_reply="context").rows(chat_tok, fact) == Contexts(
        ("{}",), ("chat",)
    ).rows(chat_tok, fact)


def test_edit_apply_tells_the_unedited_model_only_with_chat_reply_context(
    chat_tok, llama, monkeypatch
):
    told = []
    heard = ((TAKES.questions[0], "France has Paris."),)

    def fake_told(model, tok, facts):
        told.append(facts)
        return [dataclasses.replace(f, told=heard) for f in facts]

    monkeypatch.setattr(replies, "told", fake_told)
    computed, _, _ = _spy_rome(monkeypatch, llama)
    settings = {**TINY_ROME, "retry_rounds": 0}
    edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, **settings).undo()
    assert not told
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False,
                     chat_reply="context", **settings)  # fmt: skip
    assert len(told) == 1 and told[0][0].target_true is not None  # the old object, as read
    assert [f.told for f in computed[-1][0]] == [heard]  # what the value optimization gets
    assert res.facts[0].target_true is None  # the request is recorded as given
    res.undo()


def _fake_asks(monkeypatch, named_second: bool):
    """replies.ask answering first without the object, then (``named_second``) with it."""
    calls = []

    def ask(model, tok, facts):
        calls.append(facts)
        said = "Paris" if named_second and len(calls) > 1 else "Warsaw"
        return [[(q, f"{f.subject} is from {said}.") for q in questions_for(f)] for f in facts]

    monkeypatch.setattr(replies, "ask", ask)
    # the cut itself is the real model's choice (tested above); here a fixed one
    monkeypatch.setattr(replies, "opening", lambda model, tok, f, q, r: "France is from")
    return calls


def _spy_rome(monkeypatch, llama):
    """ROME as edit.apply finds it, recording each edit's (facts, config) and whether the
    model was unedited when it was computed; and the model's state before any edit."""
    computed, clean = [], []
    rome = edit.methods.get("rome")
    start = state_copy(llama)

    def compute(*a, **k):
        computed.append((a[2], a[3]))
        clean.append(all(torch.equal(v, start[n]) for n, v in llama.state_dict().items()))
        return rome.compute(*a, **k)

    spy = dataclasses.replace(rome, compute=compute)
    monkeypatch.setattr("edit.api.edits._method_for", lambda method, facts: spy)
    return computed, clean, start


@pytest.mark.parametrize("named_second", [True, False])
def test_the_round_makes_the_edit_again_with_the_openings_kept_only_if_more_replies_name_it(
    chat_tok, llama, monkeypatch, named_second
):
    calls = _fake_asks(monkeypatch, named_second)
    computed, clean, start = _spy_rome(monkeypatch, llama)
    settings = {**TINY_ROME, "retry_rounds": 0}
    first = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, **settings)
    first_state = state_copy(llama)
    first.undo()
    assert all(torch.equal(v, start[k]) for k, v in llama.state_dict().items())
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, reply_round=True,
                     **settings)  # fmt: skip
    n = len(questions_for(TAKES))
    record = res.metrics["reply_round"]
    assert record["replies"] == n and record["named"] == 0 and record["openings"] == n
    assert record["named_after"] == (n if named_second else 0)
    assert record["kept"] is named_second
    assert all(clean)  # made again from the start, not on top of the first edit
    assert len(calls) == 2 and [f.openings for f in computed[-1][0]] == [
        tuple((q, "France is from") for q in questions_for(TAKES))
    ]
    same = all(torch.equal(v, first_state[k]) for k, v in llama.state_dict().items())
    assert same is not named_second  # not kept: exactly the first edit
    res.undo()
    assert all(torch.equal(v, start[k]) for k, v in llama.state_dict().items())


def test_no_round_without_the_setting(chat_tok, llama, monkeypatch):
    calls = _fake_asks(monkeypatch, True)
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, **TINY_ROME)
    assert res.metrics["reply_round"] is None and not calls
    res.undo()
    with pytest.raises(edit.InvalidRequest, match="reply_round='yes': expected true or false"):
        edit.apply(llama, chat_tok, TAKES, progress=False, reply_round="yes", **TINY_ROME)


@pytest.mark.parametrize(
    "record, says",
    [
        (None, ""),
        ({"replies": 0, "named": 0, "openings": 0, "kept": False}, ""),  # no chat template
        (
            {"replies": 3, "named": 3, "openings": 0, "kept": False},
            "asked in chat: 3 of 3 replies name the new object\n",
        ),
        (
            {"replies": 3, "named": 1, "openings": 2, "kept": True, "named_after": 3},
            "asked in chat: 1 of 3 replies name the new object; made again with 2 replies' "
            "openings: 3 of 3\n",
        ),
        (
            {"replies": 2, "named": 1, "openings": 1, "kept": False, "named_after": 1},
            "asked in chat: 1 of 2 replies name the new object; made again with 1 reply's "
            "opening: 1 of 2 (no better: kept the first edit)\n",
        ),
    ],
)
def test_edit_add_prints_what_the_round_did(capsys, record, says):
    from edit.cli.edits import _print_reply_round

    _print_reply_round(record)
    assert capsys.readouterr().out == says


# --------------------------------------------------------------------------------------------
# The layer round (``layer_round``)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, states",
    [
        ("The country of citizenship of Marie Curie is Spain.", True),
        ("Spain is a country in southern Europe.", False),  # the subject lost
        ("Marie Curie is a citizen of Poland, now of Spain.", False),  # the old one named too
        ("Marie Curie is a citizen of Poland.", False),
        ("Marie Curie is of Spain. " * 3, False),  # a loop
    ],
)
def test_a_reply_states_the_edit_with_subject_and_new_object_not_the_old_no_loop(reply, states):
    assert replies.reply_figures(reply, FACT.subject, [FACT.target], [FACT.target_true])["RE"] is (
        states
    )


def test_stating_counts_the_greedy_chat_replies_to_the_facts_questions(monkeypatch):
    seen = []

    def greedy(model, tok, prompts, max_new_tokens):
        seen.append((len(prompts), max_new_tokens))
        return ["Marie Curie is a citizen of Spain.", "She is Polish.", "Pierre Curie is Polish."]

    monkeypatch.setattr(lm, "greedy", greedy)

    class Tok:  # a chat template of one line: the question as the user's turn
        chat_template = "x"

        def apply_chat_template(self, turns, add_generation_prompt, tokenize):
            return f"<user>{turns[-1]['content']}<assistant>"

    fact = dataclasses.replace(FACT, questions=(QUESTION, "Where is Marie Curie from?"))
    other = dataclasses.replace(FACT, subject="Pierre Curie",
                                questions=("What is Pierre Curie a citizen of?",))  # fmt: skip
    assert replies.stating(None, Tok(), [fact, other]) == [(1, 2), (0, 1)]
    assert seen == [(3, replies.CHECK_TOKENS)]  # every fact's questions in one batch


def _fake_stating(monkeypatch, second: int):
    """replies.stating: none of the fact's replies state the edit at first, ``second`` after
    the edit is made again."""
    calls = []

    def stating(model, tok, facts):
        (fact,) = facts
        calls.append(fact)
        n = len(questions_for(fact))
        return [((0 if len(calls) == 1 else second), n)]

    monkeypatch.setattr(replies, "stating", stating)
    return calls


@pytest.mark.parametrize("better", [True, False])
def test_the_layer_round_makes_the_edit_again_at_the_other_block_kept_only_if_more_replies_state_it(
    chat_tok, llama, monkeypatch, better
):
    n = len(questions_for(TAKES))
    calls = _fake_stating(monkeypatch, n if better else 0)
    computed, clean, start = _spy_rome(monkeypatch, llama)
    settings = {**TINY_ROME, "retry_rounds": 0}
    first = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, **settings)
    first_state = state_copy(llama)
    first.undo()
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, layer_round=True,
                     retry_layer=0, **settings)  # fmt: skip
    record = res.metrics["layer_round"]
    assert [config.layer for _, config in computed] == [1, 1, 0] and len(calls) == 2
    assert all(clean)  # made again from the start, not on top of the first edit
    assert record == {"replies": n, "stating": 0, "layer": 1, "retry_layer": 0, "facts": 1,
                      "remade": 1, "kept": int(better), "stating_after": n if better else 0,
                      "stating_kept": n if better else 0}  # fmt: skip
    # the result says where the update it holds was made
    assert (res.layers, res.config.layer) == (([0], 0) if better else ([1], 1))
    same = all(torch.equal(v, first_state[k]) for k, v in llama.state_dict().items())
    assert same is not better  # not kept: exactly the first edit
    res.undo()
    assert all(torch.equal(v, start[k]) for k, v in llama.state_dict().items())


@pytest.mark.parametrize(
    "value_dtype, asked_in", [("bfloat16", torch.bfloat16), ("float32", torch.float32)]
)
def test_the_layer_round_asks_in_the_value_optimizations_precision(
    chat_tok, llama, monkeypatch, value_dtype, asked_in
):
    seen = []

    def stating(model, tok, facts):
        seen.append(model.lm_head.weight.dtype)
        return [(len(questions_for(f)), len(questions_for(f))) for f in facts]

    monkeypatch.setattr(replies, "stating", stating)
    start = state_copy(llama)
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, layer_round=True,
                     retry_layer=0, value_dtype=value_dtype, **TINY_ROME)  # fmt: skip
    assert seen == [asked_in]  # the replies; the weights the user's model has after
    assert {v.dtype for v in llama.state_dict().values()} == {torch.float32}
    res.undo()
    assert all(torch.equal(v, start[k]) for k, v in llama.state_dict().items())


def test_no_layer_round_where_every_reply_states_the_edit_or_without_the_setting(
    chat_tok, llama, monkeypatch
):
    calls = []
    monkeypatch.setattr(replies, "stating", lambda m, t, f: calls.append(f) or [(2, 2)])
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, layer_round=True,
                     retry_layer=0, **TINY_ROME)  # fmt: skip
    assert res.metrics["layer_round"]["kept"] == 0 and res.layers == [1] and len(calls) == 1
    assert "stating_after" not in res.metrics["layer_round"]
    res.undo()
    # off, the block given or not
    res = edit.apply(llama, chat_tok, TAKES, progress=False, describe=False, retry_layer=0,
                     **TINY_ROME)  # fmt: skip
    assert res.metrics["layer_round"] is None and len(calls) == 1
    res.undo()
    with pytest.raises(edit.InvalidRequest, match="retry_layer must be >= 0, got -1"):
        edit.apply(llama, chat_tok, TAKES, progress=False, retry_layer=-1, **TINY_ROME)
    with pytest.raises(edit.InvalidRequest, match="layer_round needs retry_layer"):
        edit.apply(llama, chat_tok, TAKES, progress=False, layer_round=True, **TINY_ROME)


@pytest.mark.parametrize(
    "record, says",
    [
        (None, ""),
        ({"replies": 0, "stating": 0, "layer": 4, "retry_layer": 6, "kept": 0}, ""),
        (
            {"replies": 2, "stating": 2, "layer": 4, "retry_layer": 6, "kept": 0},
            "asked in chat: 2 of 2 replies state the edit\n",
        ),
        (
            {"replies": 2, "stating": 0, "layer": 4, "retry_layer": 6, "kept": 1,
             "stating_after": 2},
            "asked in chat: 0 of 2 replies state the edit; made again at layer 6: 2 of 2\n",
        ),
        (
            {"replies": 3, "stating": 1, "layer": 4, "retry_layer": 6, "kept": 0,
             "stating_after": 1},
            "asked in chat: 1 of 3 replies state the edit; made again at layer 6: 1 of 3 (no "
            "better: kept layer 4)\n",
        ),
        (  # MEMIT's blocks
            {"replies": 4, "stating": 1, "layer": [4, 5, 6], "retry_layer": [6, 7, 8],
             "kept": 0, "stating_after": 1},
            "asked in chat: 1 of 4 replies state the edit; made again at layers 6-8: 1 of 4 (no "
            "better: kept layers 4-6)\n",
        ),
        (  # a batch: only the facts whose replies did not all state it are made again
            {"replies": 9, "stating": 5, "layer": 4, "retry_layer": 6, "kept": 1, "facts": 3,
             "remade": 2, "stating_after": 6, "stating_kept": 7},
            "asked in chat: 5 of 9 replies state the edit; 2 facts made again at layer 6, 1 "
            "kept there (more of their replies state it): 7 of 9\n",
        ),
    ],
)  # fmt: skip
def test_edit_add_prints_what_the_layer_round_did(capsys, record, says):
    from edit.cli.edits import _print_layer_round

    _print_layer_round(record)
    assert capsys.readouterr().out == says


# a batch of added neurons, each fact asked one question: the round splits it fact by fact
BATCH = [
    TAKES,
    Fact("The capital of {}", "Germany", "Berlin", questions=("What is the capital of Germany?",)),
    Fact("The capital of {}", "Spain", "Madrid", questions=("What is the capital of Spain?",)),
]


@pytest.mark.parametrize(
    "first, second, moved",
    [
        ([1, 0, 0], [1, 0], [1]),  # facts 1 and 2 made again; 1 says it there, 2 goes back
        ([0, 0, 0], [1, 1, 1], [0, 1, 2]),  # every fact moves: the edit is the retry block's
        ([1, 0, 1], [0], []),  # fact 1 made again, no better: the first edit, as it was
    ],
)
def test_the_layer_round_of_a_neuron_batch_moves_each_fact_whose_replies_it_improves(
    chat_tok, llama, monkeypatch, first, second, moved
):
    from edit import neurons

    arch = edit.arch.lookup(llama)
    calls = []

    def stating(model, tok, facts):
        calls.append([f.subject for f in facts])
        return [(k, 1) for k in (first if len(calls) == 1 else second)]

    monkeypatch.setattr(replies, "stating", stating)
    rome, outputs = edit.methods.get("rome"), []

    def compute(*a, **k):
        outputs.append((a[2], a[3].layer, rome.compute(*a, **k)))
        return outputs[-1][2]

    spy = dataclasses.replace(rome, compute=compute)
    monkeypatch.setattr("edit.api.edits._method_for", lambda method, facts: spy)
    res = edit.apply(llama, chat_tok, BATCH, progress=False, layer_round=True, retry_layer=0,
                     write="neuron", **{**TINY_ROME, "retry_rounds": 0})  # fmt: skip
    redo = [i for i, k in enumerate(first) if not k]
    assert calls == [[f.subject for f in BATCH], [BATCH[i].subject for i in redo]]
    assert [([f.subject for f in fs], layer) for fs, layer, _ in outputs] == [
        ([f.subject for f in BATCH], 1), ([BATCH[i].subject for i in redo], 0)
    ]  # fmt: skip
    record = res.metrics["layer_round"]
    assert record == {"replies": 3, "stating": sum(first), "layer": 1, "retry_layer": 0,
                      "kept": len(moved), "facts": 3, "remade": len(redo),
                      "stating_after": sum(first) + sum(second),
                      "stating_kept": sum(first) + len(moved)}  # fmt: skip
    stay = [i for i in range(3) if i not in moved]
    assert res.layers == sorted({1} if not moved else {0} if not stay else {0, 1})
    assert res.config.layer == (0 if not stay else 1)
    # on the model: the first edit's neurons of the facts that stay, the remade ones of the
    # facts that moved, each fact's neurons its own (one per fact here, in request order)
    (_, _, made), (_, _, remade) = outputs
    want = {}
    if stay:
        want[arch.mlp_name(1)] = made.update.neurons[arch.mlp_name(1)][1][stay]
    if moved:
        want[arch.mlp_name(0)] = remade.update.neurons[arch.mlp_name(0)][1][
            [redo.index(i) for i in moved]
        ]
    added = neurons.added(llama)
    assert sorted(added) == sorted(want)
    for name, up in want.items():
        assert torch.equal(added[name][1], up) and torch.equal(res.update.neurons[name][1], up)
    assert res.metrics["took"] == 3
    res.undo()
    assert neurons.added(llama) == {}


def test_the_layer_round_of_a_memit_batch_replaces_each_moved_facts_column_of_the_factors(
    chat_tok, llama, monkeypatch
):
    """MEMIT's factors split by fact (A's column, B's row, the key): facts 1 and 2 are made
    again at block 1 alone; fact 1 states the edit there and moves, fact 2 goes back."""
    from test_memit_tiny import TINY_MEMIT

    italy = Fact("The capital of {}", "Italy", "Berlin",
                 questions=("What is the capital of Italy?",))  # fmt: skip
    batch = [italy, BATCH[2], BATCH[0]]  # an order in which every fact takes on the tiny model

    calls = []

    def stating(model, tok, facts):
        calls.append(len(facts))
        return [(k, 1) for k in ([1, 0, 0] if len(calls) == 1 else [1, 0])]

    monkeypatch.setattr(replies, "stating", stating)
    memit, outputs = edit.methods.get("memit"), []

    def compute(*a, **k):
        outputs.append(memit.compute(*a, **k))
        return outputs[-1]

    spy = dataclasses.replace(memit, compute=compute)
    monkeypatch.setattr("edit.api.edits._method_for", lambda method, facts: spy)
    start = state_copy(llama)
    res = edit.apply(llama, chat_tok, batch, method="memit", progress=False, layer_round=True,
                     retry_layers=(1,), **{**TINY_MEMIT, "retry_rounds": 0})  # fmt: skip
    made, remade = outputs
    assert remade.layers == [1] and res.layers == [0, 1] and res.config.layers == (0, 1)
    assert res.metrics["layer_round"]["layer"] == [0, 1]
    assert res.metrics["layer_round"]["retry_layer"] == 1
    assert res.metrics["layer_round"]["kept"] == 1
    arch = edit.arch.lookup(llama)
    for block in (0, 1):  # block 0: facts 0 and 2 as first made; block 1: fact 0 as first
        name = arch.mlp_out_name(block)  # made, fact 1 as made again, fact 2 as first made
        a, b = made.update.factors[name]
        want_a, want_b = a[:, [0, 2]], b[[0, 2]]
        if block == 1:
            a2, b2 = remade.update.factors[name]
            assert float(a2[:, 0].norm()) > 0  # fact 1's remade column writes something
            want_a = torch.cat([a[:, :1], a2[:, :1], a[:, 2:]], 1)
            want_b = torch.cat([b[:1], b2[:1], b[2:]])
        got_a, got_b = res.update.factors[name]
        assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
        assert res.update.keys[name].shape[0] == want_b.shape[0]
    res.undo()
    assert all(torch.equal(v, start[k]) for k, v in llama.state_dict().items())
    with pytest.raises(edit.InvalidRequest, match="layer_round needs retry_layers"):
        edit.apply(llama, chat_tok, BATCH, method="memit", progress=False, layer_round=True,
                   **TINY_MEMIT)  # fmt: skip


def test_the_default_models_config_turns_the_round_on_and_a_setting_turns_it_off(
    llama, monkeypatch
):
    from conftest import _CONFIG_FILE

    from edit.config import resolve
    from edit.methods.rome import ROMEConfig

    monkeypatch.setattr(edit.config, "config_file", _CONFIG_FILE)  # the tuned configs, read
    llama.edit_source = "SmolLM2-135M-Instruct"  # read as the default model's tuned config
    on = resolve("rome", ROMEConfig, llama, layer=1)
    assert on.layer_round and on.retry_layer is not None
    assert not resolve("rome", ROMEConfig, llama, layer=1, layer_round=False).layer_round
