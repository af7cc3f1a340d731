"""The rename objective: each forget answer token aimed at the model's own reading of the
example with its subject replaced by a never-seen one."""

from __future__ import annotations

import pytest
import torch
from test_unlearn_tiny import FAST, RETAIN, _assert_unchanged, _snapshot, fine_tuned
from tiny import tiny_model

from edit.corpus import Example, encode_example
from edit.errors import InvalidRequest
from edit.methods.unlearn import UnlearnConfig, adapter_attached, train_lora
from edit.methods.unlearn.rename import (
    LOWERED,
    MADE_UP_NAMES,
    OWN,
    renamed,
    stand_ins,
    teacher_logits,
)

SUBJECT = "Zorbek Quillon"
FORGET = [
    Example("Where was Zorbek Quillon born?", "Zorbek Quillon was born in Poland.",
            subject=SUBJECT),
    Example("", "Zorbek Quillon works as a baker in Lyon.", subject=SUBJECT),
    Example("Who bakes bread in Lyon?", "Zorbek Quillon bakes it.", subject=SUBJECT),
]  # fmt: skip


def _tokens(tok, ex: Example) -> list[str]:
    ids, n = encode_example(tok, ex, 64)
    return [tok.decode([t]) for t in ids[n:]]


def test_each_answer_token_finds_its_counterpart_and_the_mentions_none(tok):
    """Tokens outside the subject's mentions point at the renamed answer's token of the same
    text (checked by decoding both); the mentions' tokens point nowhere: kept where the
    prompt named the subject (a copy), lowered where the text names it first."""
    r = renamed(tok, FORGET, ["Ann Lee"], 64)
    for ex, (ids, n), index in zip(FORGET, r.encoded, r.index, strict=True):
        own, theirs = _tokens(tok, ex), [tok.decode([t]) for t in ids[n:]]
        assert tok.decode(ids[n:]).strip() == ex.answer.replace(SUBJECT, "Ann Lee")
        assert len(index) == len(own)
        text = "".join(own).strip()
        assert text == ex.answer
        paired = [(o, theirs[j]) for o, j in zip(own, index, strict=True) if j >= 0]
        assert all(o == t for o, t in paired), paired
        # what has no counterpart is exactly the subject's tokens
        unpaired = "".join(o for o, j in zip(own, index, strict=True) if j < 0).strip()
        assert unpaired == SUBJECT
        assert len(paired) >= 4
        # the mention's tokens: lowered where nothing before them names the subject
        mention = [j for o, j in zip(own, index, strict=True) if j < 0 and o.strip()]
        assert set(mention) == ({OWN} if SUBJECT in ex.prompt else {LOWERED}), mention


def test_teacher_logits_by_hand():
    """Two examples of 2 and 3 answer tokens; renamed ones of 3 and 2. Rows with a
    counterpart take the renamed row, the others keep their own, a first mention's with its
    answer token's logit lowered by the penalty."""
    own = torch.arange(5.0)[:, None].repeat(1, 2)  # row i is [i, i]
    theirs = 10 + torch.arange(5.0)[:, None].repeat(1, 2)  # row j is [10 + j, 10 + j]
    labels = torch.tensor([1, 0, 0, 1, 0])
    index = [[OWN, 2], [1, LOWERED, 0]]
    out = teacher_logits(own, theirs, index, [2, 3], [3, 2], labels, 4.0)
    # example 0: token 1 -> renamed row 2; example 1 (own rows 2..4, renamed rows 3..4):
    # token 0 -> renamed row 3 + 1, token 1 lowered at its label (1), token 2 -> row 3 + 0
    assert out.tolist() == [[0, 0], [12, 12], [14, 14], [3, -1], [13, 13]]
    # a counterpart past the batch's renamed tokens (cut at max_len) is not taken
    out = teacher_logits(own, theirs, [[OWN, 5], [1, OWN, 0]], [2, 3], [3, 2], labels, 4.0)
    assert out[:, 0].tolist() == [0.0, 1.0, 14.0, 3.0, 13.0]


def test_stand_ins_come_from_the_holdout_and_are_never_in_the_corpus():
    holdout = [Example("", "Ann Lee was born in Oslo.", subject="Ann Lee"),
               Example("", "Zorbek Quillon's friend Bo Ek sings.", subject="Bo Ek"),
               Example("", "Rain falls.")]  # fmt: skip
    assert stand_ins(FORGET, holdout) == ["Ann Lee", "Bo Ek"]
    assert stand_ins(FORGET, []) == list(MADE_UP_NAMES)
    with pytest.raises(InvalidRequest, match="needs each example's subject"):
        stand_ins([*FORGET, Example("", "Rain falls.", where="f.jsonl:3")], holdout)
    named = [Example("", "Zorbek Quillon met Ann Lee.", subject=SUBJECT)]
    with pytest.raises(InvalidRequest, match="every holdout subject is also named"):
        stand_ins(named, holdout[:1])


def test_a_subject_the_text_does_not_name_is_refused():
    with pytest.raises(InvalidRequest, match="subject 'Ann' is not named in the example"):
        Example("", "Rain falls.", where="f.jsonl:1", subject="Ann")


# learned beside the forget set, so that what follows a name depends on the name
OTHER = [
    Example("Where was Ann Lee born?", "Ann Lee was born in Chile.", subject="Ann Lee"),
    Example("", "Ann Lee works as a pilot in Rome.", subject="Ann Lee"),
]  # fmt: skip


def _learned(tok):
    return fine_tuned(tiny_model("llama", len(tok), seed=1), tok, FORGET + OTHER, 80)


@torch.no_grad()
def _answer_logprobs(model, tok, ex: Example) -> torch.Tensor:
    ids, n = encode_example(tok, ex, 64)
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[n - 1 : len(ids) - 1].float(), -1)


def test_rename_moves_the_answers_toward_the_renamed_reading_and_leaves_the_model(tok):
    """On a model that learned the forget set, the run brings each answer token outside the
    mentions toward the model's distribution (before the run) at the same token of the
    renamed example: the mean KL falls by four fifths; the tokens of the subject's first
    mention in an answer to a question that does not name it move toward their own
    distribution with the name lowered (the KL to it falls by two thirds); the model is left
    unchanged."""
    model = _learned(tok)
    r = renamed(tok, FORGET, ["Bo Ek"], 64)
    renamed_examples = [Example(ex.prompt.replace(SUBJECT, "Bo Ek"),
                                ex.answer.replace(SUBJECT, "Bo Ek")) for ex in FORGET]  # fmt: skip
    targets = [_answer_logprobs(model, tok, ex) for ex in renamed_examples]

    def kl() -> float:
        total, count = 0.0, 0
        for ex, target, index in zip(FORGET, targets, r.index, strict=True):
            own = _answer_logprobs(model, tok, ex)
            for k, j in enumerate(index):
                if j >= 0:
                    p = target[j].exp()
                    total += float((p * (target[j] - own[k])).sum())
                    count += 1
        return total / count

    # the question does not name the subject: the answer's first mention is recall
    ids, n = encode_example(tok, FORGET[2], 64)
    rows = torch.tensor([k for k, j in enumerate(r.index[2]) if j == LOWERED])
    names = torch.tensor(ids[n:])[rows]
    lowered = _answer_logprobs(model, tok, FORGET[2])[rows]
    lowered = torch.log_softmax(
        lowered.scatter_add(1, names[:, None], torch.full((len(rows), 1), -10.0)), -1
    )

    def first_mention_kl() -> float:
        logp = _answer_logprobs(model, tok, FORGET[2])[rows]
        return float((lowered.exp() * (lowered - logp)).sum(-1).mean())

    start, name_start = kl(), first_mention_kl()
    before = _snapshot(model)
    config = UnlearnConfig(method="rename", kl_weight=0.0, **dict(FAST, epochs=12))
    holdout = [Example("", "Bo Ek was born in Oslo.", subject="Bo Ek")]
    result = train_lora(model, tok, FORGET, RETAIN, config, progress=False, holdout=holdout)
    _assert_unchanged(model, before)
    with adapter_attached(model, result):
        end, name_end = kl(), first_mention_kl()
    assert start > 0.3 and end < 0.2 * start, (start, end)
    assert name_end < 0.35 * name_start, (name_start, name_end)


def test_a_corpus_line_names_its_subject(tmp_path):
    from edit.errors import EditError
    from edit.readers.corpus import read_corpus

    path = tmp_path / "bios.jsonl"
    path.write_text('{"text": "Ann Lee was born in Oslo.", "subject": " Ann Lee "}\n'
                    '{"question": "Where is Oslo?", "answer": "In Norway."}\n')  # fmt: skip
    assert [ex.subject for ex in read_corpus(path)] == ["Ann Lee", ""]
    path.write_text('{"text": "Ann Lee was born in Oslo.", "subject": 7}\n')
    with pytest.raises(EditError, match=r'bios.jsonl:1: "subject" must be a string, got int'):
        read_corpus(path)
    path.write_text('{"text": "Ann Lee was born in Oslo.", "subject": "Bo Ek"}\n')
    with pytest.raises(EditError, match=r"bios.jsonl:1: the subject 'Bo Ek' is not named"):
        read_corpus(path)
