"""Asked forms: questions made from a fact, the rows the edit methods train on (plain
question, chat template), their weights and keys, and the scores that measure them."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import CHAT_TEMPLATE, EOS_TOKEN, tiny_model

import edit
from edit import Fact, InvalidRequest, lm, replies
from edit.evals import metrics as M
from edit.hooks import Trace
from edit.methods import algebra
from edit.methods.algebra import Contexts
from edit.methods.algebra.batch import build_batch
from edit.methods.algebra.packing import pack
from edit.methods.rome import ROMEConfig
from edit.questions import chat_prompt, end_of_turn, question_prompt, questions_for

FACT = Fact("{} is a citizen of", "Marie Curie", "Spain", "Poland")


@pytest.mark.parametrize(
    "prompt, subject, want",
    [
        ("{} is a citizen of", "Ellie Kemper",
         ["Ellie Kemper is a citizen of what?", "What is Ellie Kemper a citizen of?"]),
        ("The official language of {} is", "Australia",
         ["The official language of Australia is what?",
          "What is the official language of Australia?"]),
        ("{} plays the position of", "Bo",
         ["Bo plays the position of what?", "What position does Bo play?"]),
        ("{} has the position of", "Bo", ["Bo has the position of what?",
                                          "What position does Bo have?"]),
        ("{} works in the field of", "Bo",
         ["Bo works in the field of what?", "What field does Bo work in?"]),
        ("{} is located in the continent of", "India",
         ["India is located in the continent of what?", "Which continent is India located in?"]),
        ("{} was born in the city of", "Lenin",
         ["Lenin was born in the city of what?", "Which city was Lenin born in?"]),
        ("The director of {} is", "Jaws",
         ["The director of Jaws is what?", "Who is the director of Jaws?"]),
        ("The head coach of {} is", "Ajax",
         ["The head coach of Ajax is what?", "Who is the head coach of Ajax?"]),
        ("{}'s child is", "Ann", ["Ann's child is what?", "Who is Ann's child?"]),
        ("{}'s occupation is", "Ann", ["Ann's occupation is what?", "What is Ann's occupation?"]),
        ("{} is married to", "Ann", ["Ann is married to what?", "Who is Ann married to?"]),
        ("{} is famous for", "Ann", ["Ann is famous for what?", "What is Ann famous for?"]),
        ("The type of music that {} plays is", "Bo",
         ["The type of music that Bo plays is what?", "What type of music does Bo play?"]),
        ("The company that produced {} is", "Golf",
         ["The company that produced Golf is what?", "Which company produced Golf?"]),
        ("{} was developed by", "Aqua",
         ["Aqua was developed by what?", "Who was Aqua developed by?", "Who developed Aqua?"]),
        ("{} was written by", "Bo", ["Bo was written by what?", "Who was Bo written by?"]),
        ("Everyone knows {}", "Bo", []),
    ],
)  # fmt: skip
def test_questions_made_from_the_cloze_template(prompt, subject, want):
    assert questions_for(Fact(prompt, subject, "X")) == want


def test_questions_given_in_the_request_win():
    request = {"prompt": "{} was performed by", "subject": "Hey Jude", "target": "Madonna",
               "questions": ["Who performed Hey Jude?"]}  # fmt: skip
    fact = Fact.from_dict(request)
    assert questions_for(fact) == ["Who performed Hey Jude?"]
    assert Fact.from_dict(fact.to_dict()) == fact


def test_a_question_must_name_the_subject():
    with pytest.raises(InvalidRequest, match="does not name the subject"):
        Fact("{} was performed by", "Hey Jude", "Madonna", questions=("Who sang it?",))


def test_rendered_chat_text_is_read_as_written(chat_tok):
    text = chat_prompt(chat_tok, "Who is Marie Curie?")
    assert text.startswith(EOS_TOKEN) and text.endswith("assistant\n")
    assert lm.opens_with_special(chat_tok, text)
    assert lm.encode(chat_tok, text) == chat_tok(text, add_special_tokens=False).input_ids
    # a plain prompt still gets the start token in front
    assert lm.encode(chat_tok, "Marie Curie")[0] == chat_tok.convert_tokens_to_ids(EOS_TOKEN)
    # an answer opening a turn has no leading space; one after a prompt does
    assert lm.encode_continuation(chat_tok, "Spain", after=text) == chat_tok("Spain").input_ids
    assert lm.encode_continuation(chat_tok, "Spain") == chat_tok(" Spain").input_ids


def test_rows_of_every_form_with_weights_that_sum_to_one(chat_tok):
    contexts = Contexts(("{}", "Hello there. {}"), ("question", "chat"), form_weight=0.4)
    rows = contexts.rows(chat_tok, FACT)
    kinds = [r.group[0] for r in rows]
    # 2 cloze rows, then a plain question and a chat row per made question (2 questions)
    assert kinds == ["cloze", "cloze", "question", "chat", "question", "chat"]
    assert sum(r.weight for r in rows) == pytest.approx(1.0)
    assert [r.weight for r in rows[:2]] == pytest.approx([0.3, 0.3])
    assert [r.weight for r in rows[2:]] == pytest.approx([0.1] * 4)
    for r in rows:  # the lookup is the subject's last token, the target follows the prompt
        assert chat_tok.decode(r.ids[: r.lookup + 1]).endswith("Marie Curie")
    chat = rows[3]
    assert chat.ids == lm.encode(chat_tok, chat_prompt(chat_tok, questions_for(FACT)[0]))
    # the chat row's reply restates the fact (chat_reply "sentence", the default)
    assert chat.target == chat_tok("Marie Curie is a citizen of Spain.").input_ids
    assert rows[2].target == chat_tok(" Spain").input_ids
    assert rows[2].ids == lm.encode(chat_tok, question_prompt(questions_for(FACT)[0]))


def test_a_sentence_reply_restates_the_fact_in_the_assistants_turn(chat_tok):
    object_rows = Contexts(("{}",), ("chat",), chat_reply="object").rows(chat_tok, FACT)
    assert object_rows[1].target == chat_tok("Spain").input_ids  # the object opens the turn
    rows = Contexts(("{}",), ("chat",), chat_reply="sentence").rows(chat_tok, FACT)
    assert [r.ids for r in rows] == [r.ids for r in object_rows]  # the same prompts and keys
    assert [r.lookup for r in rows] == [r.lookup for r in object_rows]
    chat = rows[1]
    assert chat.target == chat_tok("Marie Curie is a citizen of Spain.").input_ids
    assert rows[0].target == chat_tok(" Spain").input_ids  # the cloze row keeps the object
    closing = copy.deepcopy(chat_tok)  # a template that closes each turn with a token
    closing.chat_template = CHAT_TEMPLATE.replace(
        "{{ m['content'] }}\n", "{{ m['content'] }}" + EOS_TOKEN
    )
    assert end_of_turn(closing) == EOS_TOKEN and end_of_turn(chat_tok) == ""
    turn = Contexts(("{}",), ("chat",), chat_reply="turn").rows(closing, FACT)[1]
    assert turn.target == chat.target + [chat_tok.convert_tokens_to_ids(EOS_TOKEN)]
    # "prefixed": the reply opens with the fact's prompt, read at the subject named there
    opened = Contexts(("{}",), ("chat",), chat_reply="prefixed").rows(chat_tok, FACT)[1]
    text = chat_prompt(chat_tok, questions_for(FACT)[0])
    assert opened.ids == lm.encode(chat_tok, text + "Marie Curie is a citizen of")
    assert opened.target == chat_tok(" Spain").input_ids
    assert opened.lookup > len(lm.encode(chat_tok, text)) - 1
    assert chat_tok.decode(opened.ids[: opened.lookup + 1]).endswith("\nMarie Curie")


def test_the_chat_essence_row_keeps_each_token_of_the_unedited_reply(chat_tok, llama):
    from edit.methods.algebra.batch import ESSENCE_QUESTION

    other = Fact("{} was born in", "Albert Einstein", "Ulm")
    replies = ["Marie Curie was a physicist.", None]  # no reply: the plain essence row only
    b = build_batch(chat_tok, [FACT, other], Contexts(("{}",)), "cpu", replies)
    assert b.kl_fact.tolist().count(1) == 1  # "{} is a" alone for the fact without a reply
    answer = lm.encode_continuation(chat_tok, replies[0], after="\n")
    mine = (b.kl_fact == 0).nonzero()[:, 0]
    assert len(mine) == 1 + len(answer)
    chat_pos = mine[1:]  # the chat row's positions: after the prompt, then each reply token
    assert float(b.kl_weight[chat_pos].sum()) == pytest.approx(1.0)
    (row,) = set(b.kl_row[chat_pos].tolist())
    prefix = b.prefix_ids[row][b.prefix_mask[row].bool()].tolist()
    whole = prefix + b.ids[row][b.mask[row, len(b.prefix_ids[row]) :].bool()].tolist()
    prompt = lm.encode(chat_tok, chat_prompt(chat_tok, ESSENCE_QUESTION.format("Marie Curie")))
    assert whole == prompt + answer[:-1]
    # each kept position is where the next reply token is predicted
    kept = [len(prefix) + c for c in b.kl_col[chat_pos].tolist()]
    assert kept == list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))
    # δ goes in at the subject's last token, the first of the row's own tokens
    assert chat_tok.decode(whole[: len(prefix) + 1]).endswith("Marie Curie")
    # cutting a fact out keeps the other's essence positions and weights
    kept_batch = b.keep(torch.tensor([False, True]))
    assert kept_batch.kl_fact.tolist() == [0] and kept_batch.kl_weight.tolist() == [1.0]


def test_a_reply_that_names_the_subject_again_marks_where_the_edit_acts(chat_tok):
    rows = Contexts(("{}",), ("chat",), chat_reply="sentence").rows(chat_tok, FACT)
    cloze, *chats = rows
    assert cloze.mentions == () and len(chats) == 2  # " Spain" does not name the subject
    for chat in chats:
        (j,) = chat.mentions  # "Marie Curie is a citizen of Spain.": its last subject token
        assert chat_tok.decode(chat.target[: j + 1]).strip() == "Marie Curie"
    other = Fact("{} was born in", "Albert Einstein", "Ulm")
    replies = ["Marie Curie was a physicist. Marie Curie won.", None]
    b = build_batch(chat_tok, [FACT, other], Contexts(("{}",), ("chat",)), "cpu", replies)

    def read_to_mentions(b) -> list[tuple[int, str]]:  # (fact, the row up to the mention)
        out = []
        for r, c in zip(b.mention_row.tolist(), b.mention_col.tolist(), strict=True):
            prefix = b.prefix_ids[r][b.prefix_mask[r].bool()].tolist()
            out.append((int(b.fact[r]), chat_tok.decode(prefix + b.ids[r, : c + 1].tolist())))
        return out

    seen = read_to_mentions(b)
    # each chat row's sentence names its subject once, the essence reply twice; "{} is a"
    # never
    assert [t.count("Marie Curie") for f, t in seen if f == 0] == [2, 2, 2, 3]
    assert [t.count("Albert Einstein") for f, t in seen if f == 1] == [2, 2]
    assert all(t.endswith(("Marie Curie", "Albert Einstein")[f]) for f, t in seen)
    kept = b.keep(torch.tensor([False, True]))  # cut out with their fact's rows
    assert [t for _, t in read_to_mentions(kept)] == [t for f, t in seen if f == 1]


def test_rows_mark_the_objects_tokens_for_the_stop(chat_tok):
    """A cloze row's target is the object alone; a chat row's sentence marks the tokens of the
    object it ends on, and the batch flags them (every token of a row that marks none)."""
    rows = Contexts(("{}",), ("chat",)).rows(chat_tok, FACT)
    cloze, chats = rows[0], rows[1:]
    assert cloze.objects == tuple(range(len(cloze.target)))
    for row in chats:
        assert 0 < len(row.objects) < len(row.target)
        assert chat_tok.decode([row.target[j] for j in row.objects]).strip() == "Spain"
    b = build_batch(chat_tok, [FACT], Contexts(("{}",), ("chat",)), "cpu")
    marked = [chat_tok.decode(b.tgt_tok[(b.tgt_row == r) & b.tgt_object].tolist()).strip()
              for r in range(len(rows))]  # fmt: skip
    assert marked == ["Spain"] * len(rows)
    after = [chat_tok.decode(b.tgt_tok[(b.tgt_row == r) & b.tgt_after_object].tolist())
             for r in range(len(rows))]  # fmt: skip
    assert after == [""] + ["."] * len(chats)  # a sentence's end: what stop_at_object_end skips


def test_ranked_pairs_put_each_object_where_each_questions_answer_opens(chat_tok):
    """With ``rank_weight`` and the old object known, each question gets a pair plainly and
    in the chat template: the new object's row, then the old one's, after the same prompt.
    They have no share of the rows' loss or key and take no part in the stop; the batch
    pairs them and splits ``rank_weight`` between a fact's pairs."""
    contexts = Contexts(("{}",), ("question", "chat"), rank_weight=0.3)
    rows = contexts.rows(chat_tok, FACT)
    ranked = [r for r in rows if r.rank]
    chat_only = Contexts(("{}",), ("chat",), rank_weight=0.3).rows(chat_tok, FACT)
    assert [r.ids for r in chat_only if r.rank] == [r.ids for r in ranked]  # whatever forms
    questions = questions_for(FACT)
    assert len(ranked) == 2 * 2 * len(questions)  # (plain, chat) x (new, old) per question
    assert sum(r.weight for r in rows) == pytest.approx(1.0)  # the loss rows' shares, as before
    assert all(r.weight == 0 for r in ranked)
    for new, old in zip(ranked[::2], ranked[1::2], strict=True):
        assert (new.rank, old.rank) == (1, -1) and new.ids == old.ids
        assert chat_tok.decode(new.target).strip() == "Spain"
        assert chat_tok.decode(old.target).strip() == "Poland"
    prompts = {chat_tok.decode(r.ids) for r in ranked}
    want = {chat_tok.decode(lm.encode(chat_tok, f(q))) for q in questions
            for f in (question_prompt, lambda q: chat_prompt(chat_tok, q))}  # fmt: skip
    assert prompts == want

    other = Fact("{} was born in", "Ada", "Rome", "London")
    b = build_batch(chat_tok, [FACT, other], contexts, "cpu")
    assert len(b.pair_new) == len(ranked) // 2 + 4  # "Ada was born in": 2 questions, 2 forms
    assert not b.rewrite[b.pair_new].any() and not b.rewrite[b.pair_old].any()
    assert (b.weight[b.pair_new] == 0).all()
    per_fact = torch.zeros(2).index_add(0, b.pair_fact, b.pair_weight)
    torch.testing.assert_close(per_fact, torch.tensor([0.3, 0.3]))
    kept = b.keep(torch.tensor([False, True]))
    assert len(kept.pair_new) == 4 and (kept.pair_fact == 0).all()
    old_tokens = [kept.tgt_tok[kept.tgt_row == r].tolist() for r in kept.pair_old.tolist()]
    assert {chat_tok.decode(t).strip() for t in old_tokens} == {"London"}


def test_no_ranked_pairs_without_the_old_object_or_a_weight(chat_tok):
    unknown = Fact("{} is a citizen of", "Marie Curie", "Spain")
    ranked = Contexts(("{}",), ("chat",), rank_weight=0.3)
    assert not any(r.rank for r in ranked.rows(chat_tok, unknown))
    assert not any(r.rank for r in Contexts(("{}",), ("chat",)).rows(chat_tok, FACT))


def test_the_ranking_hinge_is_added_per_pair_and_the_fact_stops_once_each_is_ahead(chat_tok):
    """The insert objective adds max(0, NLL(new) − NLL(old) + margin) per pair, weighted, to
    the rows' NLL (``rank_margin``, 1 nat unless set); with the most-probable stop a fact is
    done only once every pair has the new object ahead, whatever the margin."""
    import math

    from edit.methods.algebra.objectives import OBJECTIVES, ObjectiveInputs

    b = build_batch(chat_tok, [FACT], Contexts(("{}",), ("chat",), rank_weight=0.5), "cpu")
    v = len(chat_tok)

    def nll(a: float) -> float:  # a target token with logit a, every other token 0
        return -(a - math.log(math.exp(a) + v - 1))

    def run(a_new: float, a_old: float, margin: float):
        settings = ROMEConfig(stop_most_probable=True, rank_margin=margin).value_settings()
        a = torch.full((len(b.tgt_tok),), 12.0)  # the loss rows: every target token on top
        a[torch.isin(b.tgt_row, b.pair_new)] = a_new
        a[torch.isin(b.tgt_row, b.pair_old)] = a_old
        logits = torch.zeros(len(b.tgt_tok), v).scatter(1, b.tgt_tok[:, None], a[:, None])
        x = ObjectiveInputs(torch.log_softmax(logits, -1), b, torch.tensor([0]))
        return OBJECTIVES["insert"].loss(x, {}, settings)

    for margin in (1.0, 0.1):
        for a_new, a_old in ((6.0, 2.0), (6.0, 5.5), (2.0, 6.0)):  # ahead, barely, behind
            got = run(a_new, a_old, margin)
            want = nll(12.0) + 0.5 * max(0.0, nll(a_new) - nll(a_old) + margin)
            assert float(got.loss[0]) == pytest.approx(want, rel=1e-4, abs=1e-5)  # float32
            assert bool(got.done[0]) == (a_new > a_old)
    assert float(run(6.0, 5.5, 0.1).loss[0]) < float(run(6.0, 5.5, 1.0).loss[0])
    assert ROMEConfig().rank_margin == 1.0
    with pytest.raises(InvalidRequest, match="rank_margin must be >= 0"):
        ROMEConfig(rank_margin=-0.5)


def test_a_ranked_pair_pushed_on_the_old_side_moves_the_old_object_alone(chat_tok):
    """``rank_push: old``: the same hinge value, but its gradient reaches the old object's
    log-probabilities alone; ``both``: the new object's as well."""
    from edit.methods.algebra.objectives import OBJECTIVES, ObjectiveInputs

    b = build_batch(chat_tok, [FACT], Contexts(("{}",), ("chat",), rank_weight=0.5), "cpu")
    v = len(chat_tok)
    new = torch.isin(b.tgt_row, b.pair_new)
    old = torch.isin(b.tgt_row, b.pair_old)

    def run(push: str):
        a = torch.full((len(b.tgt_tok),), 12.0)
        a[new], a[old] = 2.0, 6.0  # the old object ahead: the hinge is active
        logits = torch.zeros(len(b.tgt_tok), v).scatter(1, b.tgt_tok[:, None], a[:, None])
        logits.requires_grad_(True)
        settings = ROMEConfig(rank_push=push).value_settings()
        x = ObjectiveInputs(torch.log_softmax(logits, -1), b, torch.tensor([0]))
        got = OBJECTIVES["insert"].loss(x, {}, settings)
        (grad,) = torch.autograd.grad(got.loss.sum(), [logits])
        rows_grad = grad.gather(1, b.tgt_tok[:, None])[:, 0]  # d loss / d target logit
        return float(got.loss[0]), rows_grad

    loss_both, g_both = run("both")
    loss_old, g_old = run("old")
    assert loss_old == pytest.approx(loss_both)
    assert bool((g_both[new] < 0).all()) and bool((g_old[new] == 0).all())
    assert bool((g_old[old] > 0).all()) and torch.allclose(g_old[old], g_both[old])
    with pytest.raises(InvalidRequest, match="rank_push must be one of both, old"):
        ROMEConfig(rank_push="new")


def test_no_forms_is_the_cloze_rows_alone(tok):
    rows = Contexts(("{}", "Hello there. {}"), ()).rows(tok, FACT)
    assert [r.group for r in rows] == [("cloze", 0), ("cloze", 1)]
    assert [r.weight for r in rows] == [0.5, 0.5]


def test_a_tokenizer_without_chat_template_gets_plain_questions_only(tok):
    rows = Contexts(("{}",), ("question", "chat")).rows(tok, FACT)
    assert [r.group[0] for r in rows] == ["cloze", "question", "question"]
    assert sum(r.weight for r in rows) == pytest.approx(1.0)


def test_keys_are_the_weighted_mean_of_each_row_run_alone(chat_tok, llama):
    contexts = Contexts(("{}", "Hello there. {}"), ("question", "chat"), form_weight=0.4)
    module = edit.arch.lookup(llama).mlp_out_name(1)
    keys, _ = algebra.keys_and_hidden(llama, chat_tok, [FACT], contexts, module, module)
    want = torch.zeros_like(keys[0])
    for row in contexts.rows(chat_tok, FACT):
        ids = torch.tensor([row.ids])
        with Trace(llama, module, retain_input=True) as tr, torch.no_grad():
            llama(input_ids=ids, attention_mask=torch.ones_like(ids))
        want += row.weight * tr.input[0, row.lookup].float()
    torch.testing.assert_close(keys[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remention", [False, True])
def test_remention_adds_delta_where_the_reply_names_the_subject_again(chat_tok, llama, remention):
    """The pass of the value optimization adds δ at each row's subject in the prompt, and with
    ``remention`` also where its reply names the subject again: the layer's output changes
    there by δ exactly and nowhere else."""
    from edit.methods.algebra.values import _ChunkRun

    module = edit.arch.lookup(llama).mlp_out_name(1)
    settings = ROMEConfig(forms=("chat",), remention=remention).value_settings()
    b = build_batch(chat_tok, [FACT], Contexts(("{}",), ("chat",)), "cpu")
    run = _ChunkRun(llama, module, b, settings, "insert")
    with torch.no_grad():
        _, before = run.forward(first=True)  # δ = 0
        run.delta.normal_()
        _, after = run.forward(first=True)
    change = (after.output - before.output).norm(dim=-1).flatten()  # the packed tokens
    want = torch.zeros_like(change, dtype=torch.bool)
    want[run.packed.slot[:, 0]] = True  # the lookup: column 0 of every row
    if remention:
        assert b.mention_row.numel() == 2  # the two chat rows' sentences
        want[run.packed.flat(b.mention_row, b.mention_col)] = True
    assert (change > 1e-3).equal(want)
    torch.testing.assert_close(change[want], run.delta[0].norm().expand(int(want.sum())))


def test_bad_forms_are_refused():
    with pytest.raises(InvalidRequest, match="forms must be among question, chat"):
        ROMEConfig(forms=("poem",))
    with pytest.raises(InvalidRequest, match="form_weight must be in"):
        ROMEConfig(form_weight=1.0)
    with pytest.raises(
        InvalidRequest, match="chat_reply must be sentence or turn or object or prefixed or context"
    ):
        ROMEConfig(chat_reply="poem")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_asked_rows_after_a_cached_prefix_match_the_whole_rows(chat_tok, model_type):
    """The value optimization's batch holds the plain-question and chat rows like the cloze
    ones: logits at each supervised position equal those of the whole row run alone, and
    each supervised token is the target's."""
    model = tiny_model(model_type, len(chat_tok))
    facts = [FACT, Fact("{} was born in", "Albert Einstein", "Ulm",
                        questions=("Where was Albert Einstein born?",))]  # fmt: skip
    contexts = Contexts(("{}", "A short text. {}"), ("question", "chat"))
    b = build_batch(chat_tok, facts, contexts, "cpu")
    assert len(b.ids) == 6 + 4 + 2  # 2 cloze + 2 per question, per fact; one essence row each
    pk = pack(b, model)  # as the value optimization runs them: packed where the model can
    seq, col = pk.split(pk.flat(b.tgt_row, b.tgt_col))
    with torch.no_grad():
        cached = lm.logits_at(model, pk.ids, pk.mask, seq, col, position_ids=pk.pos,
                              cache=pk.prefix_cache(model))  # fmt: skip
        for i, (r, c) in enumerate(zip(b.tgt_row.tolist(), b.tgt_col.tolist(), strict=True)):
            prefix = b.prefix_ids[r][b.prefix_mask[r].bool()]
            seq = torch.cat([prefix, b.ids[r, : c + 1]])[None]
            whole = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            torch.testing.assert_close(cached[i], whole.float(), atol=2e-5, rtol=1e-4)
    firsts = b.tgt_tok[b.tgt_first].tolist()
    spain, ulm = chat_tok(" Spain").input_ids[0], chat_tok(" Ulm").input_ids[0]
    # a chat row's reply restates the fact: it opens with the fact's first word
    marie, albert = chat_tok("Marie").input_ids[0], chat_tok("Albert").input_ids[0]
    assert firsts == [spain] * 3 + [marie, spain, marie] + [ulm] * 3 + [albert]
    weights = b.weight[b.rewrite]
    for f in range(2):
        assert float(weights[b.fact[b.rewrite] == f].sum()) == pytest.approx(1.0)


def test_answer_contains_names_as_whole_words():
    assert M.answer_contains("The capital is Zagreb, Croatia.", ["Croatia"])
    assert M.answer_contains("She is from the U.K.", ["United Kingdom", "U.K."])
    assert not M.answer_contains("Croatian food", ["Croatia"])
    assert not M.answer_contains("anything", [""])


@pytest.mark.parametrize(
    ("text", "looping"),
    [
        (
            "The English language is based on the English language, and the English language is "
            "based on the English language.",
            True,
        ),  # "the english language" four times
        ("Paris is a city in France. Paris is a city of art. Paris is a city of light.", True),
        ("Ellie Kemper is a citizen of Croatia. She lives in Zagreb with her family.", False),
        ("the the", False),
        ("", False),
    ],
)
def test_a_reply_loops_when_a_word_trigram_comes_three_times(text, looping):
    assert replies.loops(text) is looping


def test_reply_figures_name_the_subject_the_new_object_and_not_the_old():
    new, old = ["Croatia", "Republic of Croatia"], ["United States of America", "USA"]
    states = M.reply_figures("Ellie Kemper is a citizen of Croatia.", "Ellie Kemper", new, old)
    assert states == {"RS": 1.0, "RN": 1.0, "RO": 0.0, "RL": 0.0, "RE": 1.0}
    # the subject replaced by the object: the new object named, the edit not stated
    lost = M.reply_figures("Croatia is a country in Europe.", "Ellie Kemper", new, old)
    assert lost["RN"] == 1.0 and lost["RS"] == 0.0 and lost["RE"] == 0.0
    both = M.reply_figures("Ellie Kemper, of the USA, now of Croatia", "Ellie Kemper", new, old)
    assert both["RO"] == 1.0 and both["RE"] == 0.0
    ford = M.reply_figures("Ford Thunderbird is made by SpaceX.", "Ford Thunderbird", ["SpaceX"],
                           ["Ford Motor Company", "Ford"])  # fmt: skip
    assert ford["RO"] == 0.0 and ford["RE"] == 1.0  # "Ford" there is the subject's name
    loop = "Ellie Kemper is of Croatia. " * 3
    assert M.reply_figures(loop, "Ellie Kemper", new, old)["RE"] == 0.0


def test_the_unrelated_question_is_the_next_records_about_another_subject():
    from edit.evals.harness import unrelated_question
    from edit.readers.records import Record

    def rec(subject, question=None):
        fact = Fact("{} is a citizen of", subject, "Spain", "Poland")
        return Record(id=subject, fact=fact, questions=[question] if question else [])

    records = [rec("A", "Where is A from?"), rec("A", "Is A Polish?"), rec("B"),
               rec("C", "Where is C from?")]  # fmt: skip
    assert unrelated_question(records, 0) == "Where is C from?"  # not A's, B has none
    assert unrelated_question(records, 3) == "Where is A from?"  # in a cycle
    assert unrelated_question(records[:2], 0) is None  # every other record is about A


def test_ask_in_chat_runs_the_template_the_tokenizer_renders(chat_tok, llama):
    q = "Where does Marie Curie live?"
    ids = chat_tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]  # fmt: skip
    gen = llama.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                         pad_token_id=lm.pad_id(chat_tok))  # fmt: skip
    want = chat_tok.decode(gen[0, len(ids) :], skip_special_tokens=True)
    assert edit.ask(llama, chat_tok, q, chat=True, max_new_tokens=5) == want
    assert edit.ask(llama, chat_tok, q, max_new_tokens=5) != want  # raw continuation


def test_ask_in_chat_without_a_template_is_one_line(tok, llama):
    with pytest.raises(InvalidRequest, match="no chat template: ask without --chat"):
        edit.ask(llama, tok, "Who is Marie Curie?", chat=True)


def _mquake_file(tmp_path, n_rewrites: int = 1):
    import json

    rw = {
        "prompt": "{} is a citizen of",
        "subject": "Ellie Kemper",
        "question": "What is the country of citizenship of Ellie Kemper?",
        "target_new": {"str": "Croatia"},
        "target_true": {"str": "United States of America"},
    }
    case = {
        "case_id": 7,
        "requested_rewrite": [rw] * n_rewrites,
        "answer": "Joe Biden",
        "new_answer": "Zoran Milanović",
        "questions": ["Who is the head of state of the country Ellie Kemper is a citizen of?"],
        "new_single_hops": [{"answer": "Croatia", "answer_alias": ["Republic of Croatia"]}],
    }
    path = tmp_path / f"mq{n_rewrites}.json"
    path.write_text(json.dumps([case]))
    return path, rw, case


def test_mquake_records_carry_their_question_and_multihop_probes(tmp_path):
    from edit.readers.records import load_records

    path, rw, case = _mquake_file(tmp_path)
    (one,) = load_records(path)
    (two,) = load_records(_mquake_file(tmp_path, 2)[0])
    assert one.format == "mquake" and one.fact.target == "Croatia"
    assert one.questions == [rw["question"]] and one.aliases == ["Republic of Croatia"]
    assert one.multihop == (case["questions"], "Zoran Milanović", "Joe Biden")
    assert two.multihop is None  # two edits: one alone does not make the new answer


def test_eval_on_mquake_reports_the_asked_forms_and_multihop(chat_tok, llama, tmp_path):
    from tiny import TINY_ROME

    from edit.evals.harness import EvalSettings, evaluate
    from edit.readers.records import load_records

    records = load_records(_mquake_file(tmp_path)[0])
    settings = EvalSettings(fluency_records=0, gen_tokens=4, method_settings=TINY_ROME)
    report = evaluate(llama, chat_tok, records, settings=settings, progress=False)
    summary = report.summary
    for key in ("QS", "CS", "CG", "MHS", "RS", "RN", "RO", "RL", "RE"):
        assert key in summary["edited"] and key in summary["unedited"], key
        assert key in summary["protocol"]["metrics"], key
    assert "teacher-forced" in summary["protocol"]["metrics"]["QS"]
    assert "greedy" in summary["protocol"]["metrics"]["CG"]
    # the one record's scores are 0 or 1 shares; the record's edit took on the tiny model
    assert summary["edited"]["ES"] == 1.0 and summary["edited"]["CS"] in (0.0, 1.0)


@pytest.mark.parametrize(
    ("completion", "phrase"),
    [
        (" the city of New York, and she", "the city of New York"),  # not the lone "the"
        (" France. It is the", "France"),
        (" the Roman Empire", "the Roman Empire"),
        ("\n\nParis is a city", "Paris is a city"),
        (" the Democratic Republic of the Congo and", "the Democratic Republic of the"),  # 5 words
        ("", ""),
    ],
)
def test_the_old_object_is_the_completions_opening_phrase(completion, phrase):
    from edit.api.edits import opening_phrase

    assert opening_phrase(completion) == phrase
