"""Evaluation metrics, data readers and the ``edit eval`` harness.

Metric functions are checked on hand-made numbers; the harness's probabilities against an
independent computation from the model's full logits; the harness end to end on a tiny llama.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import TINY_FACT, TINY_ROME, state_copy

from edit import EditError, lm, neurons
from edit.cli import main
from edit.evals import metrics as M
from edit.evals.harness import EvalSettings, evaluate, measure
from edit.facts import Fact
from edit.readers.records import Record, load_records

# --------------------------------------------------------------------------- metrics


def test_success_and_magnitude_on_hand_made_nlls():
    new = [0.1, 2.0, 1.0]
    true = [1.0, 0.5, 1.0]  # new wins, loses, ties (a tie is not a success)
    assert M.success(new, true) == pytest.approx(1 / 3)
    want = np.mean([math.exp(-0.1) - math.exp(-1.0), math.exp(-2.0) - math.exp(-0.5), 0.0])
    assert M.magnitude(new, true) == pytest.approx(want)


def test_kl_divergence_matches_the_definition():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    first = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert M.kl_divergence(p, q) == pytest.approx(first / 2)
    assert M.kl_divergence(q, q) == pytest.approx(0.0)


def test_ngram_entropy_and_roman_generation_entropy():
    # "a b a b": bigrams (a,b),(b,a),(a,b) -> p = 2/3, 1/3
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b", 2) == pytest.approx(h2)
    # trigrams (a,b,a),(b,a,b): two equally likely -> 1 bit
    assert M.ngram_entropy("a b a b", 3) == pytest.approx(1.0)
    want = np.mean([2 / 3 * h2, 4 / 3 * 1.0])
    assert M.generation_entropy(["a b a b"]) == pytest.approx(want)
    assert M.generation_entropy(["a b a b", "x x x x"]) == pytest.approx((want + 0.0) / 2)
    assert M.ngram_entropy("one", 2) == 0.0


def test_perplexity_and_token_accuracy():
    assert M.perplexity([math.log(4), math.log(4)]) == pytest.approx(4.0)
    assert M.token_accuracy([True, False, True, True]) == 0.75
    s = M.percentile_summary([1, 2, 3, 4, 100])
    assert s["median"] == 3 and s["p90"] == pytest.approx(61.6)


# --------------------------------------------------------------------------- data

CF = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} is located in",
        "subject": "Paris",
        "target_new": {"str": "Italy"},
        "target_true": {"str": "France"},
    },
    "paraphrase_prompts": ["Paris is in the country of"],
    "neighborhood_prompts": ["Lyon is located in", "Nice is in"],
    "generation_prompts": ["Paris is", "Paris is", "People in Paris"],
}
FLAT = {
    "case_id": 3, "prompt": "Paris is located in", "subject": "Paris", "target_new": "Italy",
    "ground_truth": "France", "rephrase_prompt": "Paris is in the country of",
    "locality_prompt": "Lyon is located in", "locality_ground_truth": "France",
}  # fmt: skip
ZSRE = {
    "subject": "Paris", "src": "Which country is Paris in?", "alt": "Italy",
    "answers": ["France"], "rephrase": "Paris is in which country?",
    "loc": "nq question: where is Berlin", "loc_ans": "Germany",
}  # fmt: skip


def write(tmp_path, name, rows, jsonl=False):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return p


def test_each_format_is_detected_and_read(tmp_path):
    (cf,) = load_records(write(tmp_path, "cf.json", [CF]))
    assert cf.format == "counterfact" and cf.id == "7"
    assert cf.fact == Fact("{} is located in", "Paris", "Italy", "France")
    assert cf.neighbours == [("Lyon is located in", "France"), ("Nice is in", "France")]
    assert cf.generation_prompts == ["Paris is", "People in Paris"]  # duplicates dropped
    (flat,) = load_records(write(tmp_path, "flat.json", [FLAT]))
    assert flat.format == "counterfact_flat" and flat.fact.prompt == "{} is located in"
    assert flat.neighbours == [("Lyon is located in", "France")]
    (z,) = load_records(write(tmp_path, "z.json", [ZSRE]))
    assert z.format == "zsre" and z.fact.prompt == "Which country is {} in?"
    assert z.fact.target == "Italy" and z.fact.target_true == "France"
    rows = [{"statement": "Paris is capital of Italy", "target_true": "France"},
            {"prompt": "{} is in", "subject": "Rome", "target": "Spain"}]  # fmt: skip
    a, b = load_records(write(tmp_path, "f.jsonl", rows, jsonl=True))
    assert a.format == "facts" and a.fact == Fact("{} is capital of", "Paris", "Italy", "France")
    assert b.fact.target_true is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('[{"foo": 1}]', "none of the known formats"),
        ('[{"src": "q", "alt": "a", "loc": "l"}]', "record 0: not a valid zsre record"),
        ('{"statement": "Paris is capital of Italy"}\n{"statement": ', "line 2: not valid JSON"),
        ("[1, 2", "not valid JSON"),
        ('{"statement": "hello"}', "line 1: cannot parse"),
    ],
)
def test_bad_files_get_one_line_errors(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(EditError, match=message) as e:
        load_records(p)
    assert "\n" not in str(e.value)


def test_limit_beyond_the_file_and_missing_file(tmp_path):
    p = write(tmp_path, "cf.json", [CF, CF])
    assert len(load_records(p, limit=1)) == 1
    with pytest.raises(EditError, match="--limit 3 is beyond the 2 records"):
        load_records(p, limit=3)
    with pytest.raises(EditError, match="data file not found"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(EditError, match="unknown format"):
        load_records(p, fmt="csv")


# --------------------------------------------------------------------------- measuring


def independent_mean_nll(model, tok, prompt: str, target: str) -> float:
    """Mean token NLL of ``target`` after ``prompt`` from one plain forward over full logits."""
    p_ids = lm.encode(tok, prompt)
    t_ids = tok(" " + target, add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return -float(np.mean([logp[len(p_ids) - 1 + j, t] for j, t in enumerate(t_ids)]))


def test_measure_agrees_with_an_independent_computation(llama, tok):
    rec = Record(
        id="0",
        fact=Fact("The capital of {}", "France", "Paris", "Berlin"),
        paraphrases=["The capital city of France", "France has the capital"],
        neighbours=[("The capital of Germany", "Berlin"), ("Madrid is in", "Spain")],
        format="counterfact",
    )
    m = measure(llama, tok, rec, ref=None)
    n = {(p, t): independent_mean_nll(llama, tok, p, t)
         for p in [rec.fact.text, *rec.paraphrases, *[q for q, _ in rec.neighbours]]
         for t in ("Paris", "Berlin", "Spain")}  # fmt: skip
    es = float(n[(rec.fact.text, "Paris")] < n[(rec.fact.text, "Berlin")])
    em = math.exp(-n[(rec.fact.text, "Paris")]) - math.exp(-n[(rec.fact.text, "Berlin")])
    ps = np.mean([n[(q, "Paris")] < n[(q, "Berlin")] for q in rec.paraphrases])
    ns = np.mean([n[(q, a)] < n[(q, "Paris")] for q, a in rec.neighbours])
    assert m["ES"] == es and m["PS"] == ps and m["NS"] == ns
    assert m["EM"] == pytest.approx(em, abs=1e-6)
    assert m["KL"] == 0.0 and m["_keep"]["neighbour_logp"].shape == (2, len(tok))


# --------------------------------------------------------------------------- harness


def facts_file(tmp_path):
    rows = [dict(TINY_FACT, target_true="Berlin", paraphrases=["The capital city of France"],
                 neighbours=["The capital of Spain"]),
            {"prompt": "The capital of {}", "subject": "Germany", "target": "Rome",
             "target_true": "Berlin"}]  # fmt: skip
    return write(tmp_path, "facts.jsonl", rows, jsonl=True)


# ROME's neuron write takes a batch: one neuron per fact
@pytest.mark.parametrize("mode, write", [("single", "rank_one"), ("sequential", "rank_one"),
                                         ("batch", "neuron")])  # fmt: skip
def test_harness_writes_every_artifact_and_restores_the_model(llama, tok, tmp_path, mode, write):
    records = load_records(facts_file(tmp_path))
    text = tmp_path / "heldout.txt"
    text.write_text("The capital of France is Paris. The capital of Germany is Berlin. " * 20)
    base = state_copy(llama)
    settings = EvalSettings(fluency_records=1, gen_tokens=8, ppl_text=str(text), ppl_tokens=64,
                            method_settings={**TINY_ROME, "write": write})  # fmt: skip
    report = evaluate(llama, tok, records, mode=mode, out_dir=tmp_path / "out",
                      settings=settings, progress=False)  # fmt: skip
    assert all(torch.equal(v, base[k]) for k, v in llama.state_dict().items())
    assert neurons.added(llama) == {}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "margins.png", "records.jsonl", "scores.png", "summary.json", "summary.md"]  # fmt: skip
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == summary["protocol"]["mode"] == mode
    assert "ES" in summary["protocol"]["metrics"]
    # the edits took on the tiny model: efficacy moves from 0 to 100 %
    assert summary["unedited"]["ES"] == 0.0 and summary["edited"]["ES"] == 1.0
    assert "PPL" in summary["edited"] and summary["edited"]["KL"] > 0
    assert "| unedited |" in (out / "summary.md").read_text()
    assert report.summary["cost"]["seconds_per_edit"]["median"] > 0


def test_the_layer_rounds_of_a_run_are_summed_and_reported():
    from edit.evals.harness import _layer_rounds
    from edit.evals.report import _layer_round_line

    single = {"replies": 2, "stating": 1, "layer": 4, "retry_layer": 6, "facts": 1,
              "remade": 1, "kept": 1, "stating_after": 2, "stating_kept": 2}  # fmt: skip
    stated = {"replies": 3, "stating": 3, "layer": 4, "retry_layer": 6, "facts": 1,
              "remade": 0, "kept": 0}  # fmt: skip
    batch = {"replies": 9, "stating": 5, "layer": 4, "retry_layer": 6, "facts": 3,
             "remade": 2, "kept": 1, "stating_after": 6, "stating_kept": 7}  # fmt: skip
    no_template = {**stated, "replies": 0, "stating": 0}
    total = _layer_rounds([single, stated, batch, no_template])
    assert total == {"facts": 5, "remade": 3, "kept": 2, "replies": 14, "stating": 9,
                     "stating_kept": 12}  # fmt: skip
    assert _layer_rounds([no_template]) is None and _layer_round_line(None) == ""
    assert _layer_round_line(total) == (
        "Layer round: 3 of 5 facts made again at the retry block, 2 kept there; replies to "
        "the facts' own questions that state the edit: 9 of 14, 12 after the round. "
    )


def test_unedited_measurements_are_reused_only_for_the_same_records_and_mode(
    llama, tok, tmp_path, monkeypatch
):
    import edit.evals.harness as harness

    records = load_records(facts_file(tmp_path))
    settings = EvalSettings(fluency_records=1, gen_tokens=8, method_settings=TINY_ROME)
    first = evaluate(llama, tok, records, mode="sequential", settings=settings, progress=False)

    def measured_again(*args, **kwargs):
        raise AssertionError("the unedited model was measured again")

    monkeypatch.setattr(harness, "_measure_unedited", measured_again)
    second = evaluate(llama, tok, records, mode="sequential", settings=settings,
                      progress=False, unedited=first.unedited)  # fmt: skip
    assert second.summary["unedited"] == first.summary["unedited"]
    assert [r["before"] for r in second.rows] == [r["before"] for r in first.rows]
    assert second.summary["edited"]["ES"] == 1.0
    more_fluency = EvalSettings(fluency_records=2, method_settings=TINY_ROME)
    for other in (dict(records=records[:1]), dict(mode="single"), dict(settings=more_fluency)):
        kw = dict(records=records, mode="sequential", settings=settings) | other
        with pytest.raises(EditError, match="unedited measurements given"):
            evaluate(llama, tok, progress=False, unedited=first.unedited, **kw)


def test_harness_refuses_batch_mode_for_rome_and_a_used_folder(llama, tok, tmp_path):
    records = load_records(facts_file(tmp_path))
    with pytest.raises(EditError, match="one fact at a time"):
        evaluate(llama, tok, records, mode="batch", progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(EditError, match="not empty"):
        evaluate(llama, tok, records, out_dir=tmp_path / "used", progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nope.json"], "data file not found"),
        (["--data", "{tmp}/empty.json"], "is empty"),
        (["--data", "{tmp}/facts.jsonl", "--limit", "5"], "beyond the 2 records"),
        (["--data", "{tmp}/facts.jsonl", "--format", "xml"], "unknown format"),
    ],
)
def test_eval_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    facts_file(tmp_path)
    (tmp_path / "empty.json").write_text("")
    argv = ["eval", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "res")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "res").exists()
