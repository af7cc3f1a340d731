"""The README's headline results table quotes its results files exactly.

Each row of the table under "## Results" links one file ``benchmarks/results/<name>.md``; its
figures cell is a list of ``label value`` items. The file's ``<name>.json`` must exist, and
every value must equal the file's summary figure rounded as printed (``99.0`` to one decimal,
``1.56x`` to two, ``76%`` to none); ``FIGURES`` says where in the summary each label lives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

# ROME's CounterFact figures, with the layer round and without
ROME_COUNTERFACT = {
    "ES": "edited.ES",
    "PS": "edited.PS",
    "NS": "edited.NS",
    "unedited NS": "unedited.NS",
    "PPL": "edited.PPL",
    "unedited PPL": "unedited.PPL",
    "s/edit": "seconds_per_edit_median",
}
# label -> path, for benchmarks/learn_bios.py at any corpus size
LEARN_BIOS = {
    "question recall": "after.question.all",
    "chat recall": "after.chat.all",
    "continuation recall": "after.continuation.all",
    "never-seen / learned NLL drop": "unseen_drop_over_learned_drop",
    "PPL": "after.wikitext_ppl",
    "unedited PPL": "before.wikitext_ppl",
    "known facts top-1": "after.known_top1",
    "unedited known facts top-1": "before.known_top1",
    "guard PPL": "guard.after.perplexity",
    "unedited guard PPL": "guard.before.perplexity",
}
FORGET_BIOS = {
    "forget NLL": "models.forgotten.nll_forget",
    "base forget NLL": "models.base (reference).nll_forget",
    "loss AUC": "models.forgotten.auc.loss",
    "base loss AUC": "models.base (reference).auc.loss",
    "Min-K++ AUC": "models.forgotten.auc.min_k_pp",
    "base Min-K++ AUC": "models.base (reference).auc.min_k_pp",
    "city extracted": "models.forgotten.extracted.city",
    "learned city extracted": "models.learned.extracted.city",
    "AUC after relearn": "attacks.forgotten.relearn.auc.loss",
    "base AUC after relearn": "attacks.base.relearn.auc.loss",
    "AUC after 4-bit": "attacks.forgotten.quantize4.auc.loss",
    "base AUC after 4-bit": "attacks.base.quantize4.auc.loss",
    "s": "forget_seconds",
}

# label in the README -> dotted path in the results file's "summary"
# the figures of a lifelong run's summary (benchmarks/lifelong.py), for every such row
LIFELONG = {
    **{k: k for k in ("edits", "ES", "PS", "NS")},
    "unedited NS": "unedited_NS",
    "first-100 ES": "first_ES",
    "first-100 PS": "first_PS",
    "PPL": "ppl",
    "unedited PPL": "unedited_ppl",
    "s/fact": "s_per_fact",
}
FIGURES: dict[str, dict[str, str]] = {
    "rome_counterfact": ROME_COUNTERFACT,
    "memit_counterfact_batch": {
        "ES": "methods.memit.edited.ES",
        "PS": "methods.memit.edited.PS",
        "NS": "methods.memit.edited.NS",
        "unedited NS": "unedited.NS",
        "PPL": "methods.memit.edited.PPL",
        "unedited PPL": "unedited.PPL",
        "s/fact": "methods.memit.seconds_per_fact_median",
    },
    "edit_speed": {
        "s/edit": "variants.default.median_seconds",
        "before s/edit": "variants.before.median_seconds",
        "first edit add on an empty cache s": "fresh_machine_seconds.edit add",
    },
    "edit_speed_replies": {
        "s/edit": "variants.default.median_seconds",
        "float32 replies s/edit": "variants.f32replies.median_seconds",
    },
    "edit_speed_memit": {
        "s/fact": "variants.default.median_seconds",
        "before s/fact": "variants.before.median_seconds",
    },
    "mquake_forms": {
        **{k: f"edited.{k}" for k in ("ES", "QS", "CS", "CG", "RS", "RE", "RU")},
        **{f"unedited {k}": f"unedited.{k}" for k in ("RS", "RE")},
        **{f"remention off {k}": f"against.{k}" for k in ("RS", "RE", "RU")},
        "s/edit": "seconds_per_edit_median.edited",
        "cost": "cost_ratio",
        "MHS": "MHS_edited",
    },
    "rome_counterfact_relayer": ROME_COUNTERFACT,
    "mquake_forms_relayer_held": {
        **{k: f"edited.{k}" for k in ("ES", "QS", "CS", "RS", "RE", "RU")},
        "unedited RS": "unedited.RS",
        **{f"round off {k}": f"against.{k}" for k in ("QS", "RE", "RU")},
        "s/edit": "seconds_per_edit_median.edited",
        "round off s/edit": "seconds_per_edit_median.against",
        "cost": "cost_ratio",
    },
    "mquake_forms_held_f32round": {
        **{k: f"against.{k}" for k in ("ES", "QS", "CS", "RS", "RE", "RU")},
        "float32 round RE": "edited.RE",
        "MH2": "against.MH2",
        "unedited MH2": "unedited.MH2",
        "known MH2": "against.MH2k",
        "unedited known MH2": "unedited.MH2k",
    },
    "lifelong_1000": LIFELONG,
    "lifelong_1000_pair": LIFELONG,
    "lifelong_b100_rome": LIFELONG,
    "lifelong_b100_alphaedit": LIFELONG,
    "middle_revert_1000": {
        "reverted ES before": "before_reverted_ES",
        "reverted ES after": "after_reverted_ES",
        "reverted PS after": "after_reverted_PS",
        "made-after ES before": "before_made after_ES",
        "made-after ES after": "after_made after_ES",
        "made-after PS after": "after_made after_PS",
        "PPL before": "before_ppl",
        "PPL after": "after_ppl",
        "s/revert": "revert_s",
    },
    "neuron_leak_1000": {
        "single ES": "single_ES",
        "single PS": "single_PS",
        "single PPL": "single_ppl",
        "pair ES": "pair_t0p5_ES",
        "pair PS": "pair_t0p5_PS",
        "pair PPL": "pair_t0p5_ppl",
        "unedited PPL": "none_ppl",
    },
    "rome_sequential_50": {
        **{f"neuron {k}": f"neuron.edited.{k}" for k in ("ES", "PS", "NS", "PPL")},
        **{f"rank-one {k}": f"rank_one.edited.{k}" for k in ("PS", "NS", "PPL")},
        "unedited NS": "neuron.unedited.NS",
        "unedited PPL": "neuron.unedited.PPL",
    },
    "mquake_batch_50_round": {
        **{k: f"round.edited.{k}" for k in ("ES", "CS", "RS", "RN", "RE", "PPL")},
        **{f"round off {k}": f"no_round.edited.{k}" for k in ("RN", "RE", "PPL")},
        "unedited RS": "round.unedited.RS",
        "s/fact": "round.cost.seconds_per_edit.median",
        "round off s/fact": "no_round.cost.seconds_per_edit.median",
    },
    "mquake_batch_50": {
        **{f"neuron {k}": f"rome_neuron.edited.{k}" for k in ("ES", "CS", "RS", "RN", "RE", "PPL")},
        **{f"MEMIT {k}": f"memit.edited.{k}" for k in ("ES", "CS", "RS", "RN", "RE", "PPL")},
        "unedited RS": "rome_neuron.unedited.RS",
        "unedited PPL": "rome_neuron.unedited.PPL",
        "neuron s/fact": "rome_neuron.cost.seconds_per_edit.median",
        "MEMIT s/fact": "memit.cost.seconds_per_edit.median",
    },
    "counterfact_batch_50": {
        **{f"neuron {k}": f"rome_neuron.edited.{k}" for k in ("ES", "PS", "NS", "KL", "PPL")},
        **{f"MEMIT {k}": f"memit.edited.{k}" for k in ("ES", "PS", "NS", "KL", "PPL")},
        "unedited NS": "rome_neuron.unedited.NS",
        "unedited PPL": "rome_neuron.unedited.PPL",
        "neuron s/fact": "rome_neuron.cost.seconds_per_edit.median",
        "MEMIT s/fact": "memit.cost.seconds_per_edit.median",
    },
    "trace_known": {
        "peak layer": "peak_layer",
        "range": "layer_range",
        "peak share": "peak_layer_share_percent",
        "facts": "facts",
    },
    "tofu_unlearn": {
        "forget quality": "models.npo.forget_quality",
        "utility vs reference": "models.npo.utility_vs_reference_percent",
        "match forget quality": "models.match.forget_quality",
        "target forget quality": "models.target.forget_quality",
        "forget s": "models.npo.train_seconds",
    },
    "tofu_unlearn_distill_default": {
        "forget quality": "models.distill.forget_quality",
        "utility vs reference": "models.distill.utility_vs_reference_percent",
        "truth ratio median": "models.distill.forget_truth_ratio_median",
        "reference truth ratio median": "models.reference.forget_truth_ratio_median",
        "forget s": "models.distill.train_seconds",
        "cheaper than reference": "models.distill.cheaper_than_reference",
    },
    "tofu_unlearn_distill_form": {
        "forget quality": "models.distill.forget_quality",
        "utility vs reference": "models.distill.utility_vs_reference_percent",
        "forget ROUGE-L": "models.distill.forget_rouge_l",
        "reference forget ROUGE-L": "models.reference.forget_rouge_l",
        "truth ratio median": "models.distill.forget_truth_ratio_median",
        "forget s": "models.distill.train_seconds",
        "cheaper than reference": "models.distill.cheaper_than_reference",
    },
    "tofu_unlearn_forget05_distill_form": {
        "forget quality": "models.distill.forget_quality",
        "utility vs reference": "models.distill.utility_vs_reference_percent",
        "forget ROUGE-L": "models.distill.forget_rouge_l",
        "reference forget ROUGE-L": "models.reference.forget_rouge_l",
        "truth ratio median": "models.distill.forget_truth_ratio_median",
        "reference truth ratio median": "models.reference.forget_truth_ratio_median",
    },
    "tofu_unlearn_npo_samples": {
        "forget quality": "models.npo.forget_quality",
        "utility vs reference": "models.npo.utility_vs_reference_percent",
        "target forget quality": "models.target.forget_quality",
    },
    "tofu_audit": {
        "zlib AUC": "runs.npo.models.changed.mia_auc.zlib",
        "reference zlib AUC": "runs.npo.models.reference.mia_auc.zlib",
        "Min-K++ AUC": "runs.npo.models.changed.mia_auc.min_k_pp",
        "reference Min-K++ AUC": "runs.npo.models.reference.mia_auc.min_k_pp",
        "relearn recovered": "runs.npo.attacks.relearn.recovered_percent",
        "forget quality": "runs.npo.models.changed.forget_quality",
    },
    "tofu_audit_distill_form": {
        "forget quality": "runs.distill.models.changed.forget_quality",
        "loss AUC": "runs.distill.models.changed.mia_auc.loss",
        "reference loss AUC": "runs.distill.models.reference.mia_auc.loss",
        "Min-K AUC": "runs.distill.models.changed.mia_auc.min_k",
        "reference Min-K AUC": "runs.distill.models.reference.mia_auc.min_k",
        "Min-K++ AUC": "runs.distill.models.changed.mia_auc.min_k_pp",
        "reference Min-K++ AUC": "runs.distill.models.reference.mia_auc.min_k_pp",
        "forget NLL": "runs.distill.models.changed.forget_nll",
        "reference forget NLL": "runs.distill.models.reference.forget_nll",
        "4-bit extraction recovered": "runs.distill.attacks.quantize4.extraction_recovered_percent",
    },
    "forget_bios_40_learned_e6": {
        **FORGET_BIOS,
        "perplexity": "models.forgotten.wikitext_ppl",
        "learned perplexity": "models.learned.wikitext_ppl",
        "known top-1": "models.forgotten.known_top1",
        "learned known top-1": "models.learned.known_top1",
    },
    "learn_bios": LEARN_BIOS,
    "learn_bios_kl2e6": LEARN_BIOS,
    "learn_bios_40_text512": LEARN_BIOS,
}

VALUE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:x|%)?$")
RANGE = re.compile(r"^(\d+)–(\d+)$")


def headline_rows() -> list[dict]:
    """The rows of the README's results table: name, figures (label -> printed value)."""
    text = README.read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not (m := re.search(r"\(benchmarks/results/(\w+)\.md\)", cells[2])):
            continue
        figures = {}
        for item in cells[1].split(", "):
            label, _, value = item.rpartition(" ")
            figures[label] = value
        rows.append({"name": m.group(1), "figures": figures})
    return rows


def lookup(summary: dict, path: str):
    value = summary
    for part in path.split("."):
        value = value[part]
    return value


def printed(value, as_printed: str) -> str:
    """``value`` written the way the README writes ``as_printed``."""
    if RANGE.match(as_printed):
        return "–".join(str(v) for v in value)
    m = VALUE.match(as_printed)
    assert m, f"not a figure: {as_printed!r}"
    decimals = len(m.group(1).split(".")[1]) if "." in m.group(1) else 0
    return f"{value:.{decimals}f}" + as_printed[len(m.group(1)) :]


def test_the_table_has_rows_and_known_labels():
    rows = headline_rows()
    assert len(rows) >= 5, "the README has no results table under '## Results'"
    for row in rows:
        assert row["name"] in FIGURES, f"{row['name']}: no entry in FIGURES"
        unknown = set(row["figures"]) - set(FIGURES[row["name"]])
        assert not unknown, f"{row['name']}: labels {sorted(unknown)} not in FIGURES"


def test_headline_figures_match_results_files():
    for row in headline_rows():
        path = RESULTS / f"{row['name']}.json"
        assert path.is_file(), f"{row['name']}: the README links {path.name}, which does not exist"
        summary = json.loads(path.read_text())["summary"]
        for label, shown in row["figures"].items():
            want = printed(lookup(summary, FIGURES[row["name"]][label]), shown)
            assert shown == want, f"{row['name']}: README says {label} {shown}, file {want}"


def test_every_row_links_a_results_file_that_exists():
    missing = [r["name"] for r in headline_rows() if not (RESULTS / f"{r['name']}.md").is_file()]
    assert not missing, f"README rows without a results file: {', '.join(missing)}"
