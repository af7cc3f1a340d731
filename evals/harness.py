"""``edit eval``: edit records from a data set and measure what the edits did.

    report = evaluate(model, tok, load_records("counterfact_dev200.json"), method="rome",
                      mode="single", out_dir="eval-out")

Modes (written into every result file, because published numbers differ by protocol):

* ``single``: each record is edited on the unedited model, measured, and undone (ROME).
* ``sequential``: records are edited one after another and all are measured after the last
  edit (AlphaEdit's protocol); the model is restored at the end. A batch method takes them
  ``batch_size`` at a time, each call seeing the keys written by the earlier ones.
* ``batch``: all records in one edit call (MEMIT's protocol); needs a batch method.

Seconds per edit are amortized over the records of an edit call.

The unedited model is measured on every record first, so each summary shows unedited and
edited side by side. Fluency (generation entropy, perplexity of held-out text) is costly on
a CPU: in single mode it is measured on the first ``fluency_records`` records, in the other
modes once after all edits.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edit import arch, lm
from edit import methods as method_registry
from edit.api import apply
from edit.atomic import new_folder
from edit.config import resolve
from edit.errors import EditError, EditFailed
from edit.evals import metrics as M
from edit.evals.forms import asked_scores
from edit.readers.records import Record
from edit.stats import second_moment
from edit.update import with_keys

log = logging.getLogger(__name__)

MODES = ("single", "sequential", "batch")
_FLUENCY_FIELDS = ("fluency_records", "gen_prompts", "gen_tokens", "ppl_text", "ppl_tokens", "seed")
DEFINITIONS = {
    "ES": "share of records with mean-token NLL(new) < NLL(true) on the edit prompt",
    "EM": "mean of p(new) - p(true), p = exp(-mean token NLL), edit prompt",
    "PS": "as ES on the paraphrase prompts (mean within a record, then over records)",
    "PM": "as EM on the paraphrase prompts",
    "NS": "share of neighbourhood prompts where NLL(true answer) < NLL(new target)",
    "NM": "mean of p(true answer) - p(new target) on neighbourhood prompts",
    "KL": "mean KL(p_unedited || p_edited) of the next token after neighbourhood prompts (nats)",
    "GE": "generation entropy: mean over texts of mean(2/3 H2, 4/3 H3) of word n-grams (bits)",
    "PPL": "perplexity of held-out text (WikiText-2 test) under the model",
    "QS": "share of the record's questions (not given to the edit) with NLL(new) < NLL(true) "
    "after 'Question: ...\\nAnswer:', teacher-forced",
    "CS": "as QS with the question a user turn of the model's chat template, the answer opening "
    "the assistant's turn",
    "CG": "share of those chat questions whose greedy answer (16 tokens) names the new object "
    "or an alias",
    "MHS": "as CS on multi-hop questions through the edited fact (new answer against old)",
    "zsRE_acc": "teacher-forced top-1 token accuracy of the new target after the question",
    "zsRE_gen": "the same after the rephrased question",
    "zsRE_loc": "share of the locality answer's tokens whose top-1 prediction is unchanged",
}


@dataclass
class EvalSettings:
    fluency_records: int = 20
    batch_size: int = 100  # sequential mode with a batch method: records per edit call
    gen_prompts: int = 2
    gen_tokens: int = 50
    ppl_text: str | None = None
    ppl_tokens: int = 2048
    seed: int = 0
    method_settings: dict = field(default_factory=dict)


def default_ppl_text() -> str | None:
    """WikiText-2 test from the repository's shared data, when it is there."""
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "shared" / "data", here / "shared" / "data"):
        p = root / "text" / "wikitext2_raw_test.txt"
        if p.is_file():
            return str(p)
    return None


# --------------------------------------------------------------------------- measuring


def _nlls(model, tok, prompts: list[str], targets: list[str], next_of: int = 0):
    """Mean token NLL of each target after its prompt, and the next-token log-probabilities
    after the last ``next_of`` prompts (from the same forward passes)."""
    scores = lm.continuation_scores(model, tok, prompts, targets, 64, next_distribution=True)
    nll = np.array([-float(s.logprobs.mean()) for s in scores])
    nxt = [s.next_logprobs for s in scores[len(scores) - next_of :]] if next_of else []
    return nll, nxt


def measure(model: nn.Module, tok, rec: Record, ref: dict | None = None) -> dict:
    """Rewrite and locality metrics for one record on the model as it is now.

    ``ref`` holds what was kept from the unedited model (next-token log-probs after the
    neighbourhood prompts, zsRE locality predictions); without it the KL and zsRE locality
    entries are that reference itself.
    """
    f = rec.fact
    out: dict = {}
    keep: dict = {}
    # every teacher-forced (prompt, target) pair of the record in one batched call
    pairs: list[tuple[str, str]] = []
    if f.target_true:
        prompts = [f.text, *rec.paraphrases]
        pairs += [(p, f.target) for p in prompts] + [(p, f.target_true) for p in prompts]
    answered = [(p, a) for p, a in rec.neighbours if a]
    pairs += answered + [(p, f.target) for p, _ in answered]
    # with every neighbour answered, its next-token distribution comes from the same pass
    from_pairs = bool(answered) and len(answered) == len(rec.neighbours)
    n_next = len(answered) if from_pairs else 0
    nll, nxt = (
        _nlls(model, tok, [p for p, _ in pairs], [t for _, t in pairs], n_next)
        if pairs
        else (None, [])
    )
    if f.target_true:
        n = len(prompts)
        n_new, n_true, nll = nll[:n], nll[n : 2 * n], nll[2 * n :]
        out["ES"], out["EM"] = M.success(n_new[:1], n_true[:1]), M.magnitude(n_new[:1], n_true[:1])
        if rec.paraphrases:
            out["PS"] = M.success(n_new[1:], n_true[1:])
            out["PM"] = M.magnitude(n_new[1:], n_true[1:])
    if answered:
        n_ans, n_new = nll[: len(answered)], nll[len(answered) :]
        out["NS"], out["NM"] = M.success(n_ans, n_new), M.magnitude(n_ans, n_new)
    if rec.neighbours:
        if from_pairs:
            logp = torch.stack(nxt)
        else:
            logp = lm.next_token_logprobs(model, tok, [p for p, _ in rec.neighbours])
        if ref is None:
            keep["neighbour_logp"] = logp.half()
            out["KL"] = 0.0
        else:
            out["KL"] = M.kl_divergence(ref["neighbour_logp"].float().numpy(), logp.numpy())
    if rec.questions and f.target_true:
        asked = asked_scores(model, tok, rec.questions, f.target, f.target_true, rec.aliases)
        out["_chat_answers"] = asked.pop("chat_answers", [])
        out.update(asked)
    if rec.multihop:
        questions, new, old = rec.multihop
        out["MHS"] = asked_scores(model, tok, questions, new, old, forms=("CS",))["CS"]
    if rec.format == "zsre":
        scores = lm.continuation_scores(model, tok, [f.text, rec.paraphrases[0]], [f.target] * 2)
        out["zsRE_acc"] = M.token_accuracy((scores[0].top1 == scores[0].targets).tolist())
        out["zsRE_gen"] = M.token_accuracy((scores[1].top1 == scores[1].targets).tolist())
        loc_p, loc_a = rec.neighbours[0]
        loc = lm.continuation_scores(model, tok, [loc_p], [loc_a])[0]
        if ref is None:
            keep["loc_top1"] = loc.top1
            out["zsRE_loc"] = 1.0
        else:
            out["zsRE_loc"] = M.token_accuracy((loc.top1 == ref["loc_top1"]).tolist())
    if ref is None:
        out["_keep"] = keep
    return out


def fluency(model, tok, prompts: list[str], settings: EvalSettings, ppl_text: str | None) -> dict:
    """Generation entropy of sampled continuations of ``prompts``; perplexity of ``ppl_text``."""
    out: dict = {}
    if prompts:
        texts = lm.sample(model, tok, prompts, settings.gen_tokens, seed=settings.seed)
        out["GE"] = M.generation_entropy(texts)
        out["_generations"] = texts
    if ppl_text:
        out["PPL"] = M.perplexity(
            lm.text_token_nlls(model, tok, ppl_text, settings.ppl_tokens).tolist()
        )
    return out


# --------------------------------------------------------------------------- running


@dataclass
class Unedited:
    """What ``evaluate`` measured on the unedited model. Another ``evaluate`` call on the same
    records, the same unedited model and a mode of the same kind (single, or not) can take it
    instead of measuring again (the sequential benchmark compares two methods this way)."""

    key: tuple  # record ids, fluency records, fluency once for the whole run, fluency settings
    before: list[dict]
    refs: list[dict]
    flu_before: list[dict]
    global_flu_before: dict | None


@dataclass
class EvalReport:
    summary: dict
    rows: list[dict]
    out_dir: Path | None
    unedited: Unedited | None = None


def evaluate(
    model: nn.Module,
    tok,
    records: list[Record],
    *,
    method: str = "rome",
    mode: str = "single",
    out_dir: str | os.PathLike | None = None,
    data_name: str = "",
    settings: EvalSettings | None = None,
    progress: bool = True,
    unedited: Unedited | None = None,
) -> EvalReport:
    settings = settings or EvalSettings()
    if mode not in MODES:
        raise EditError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    spec = method_registry.get(method)
    if mode == "batch" and not spec.batch:
        raise EditError(f"{spec.name} edits one fact at a time: use --mode single or sequential")
    if settings.batch_size < 1:
        raise EditError(f"--batch-size must be at least 1, got {settings.batch_size}")
    config = resolve(spec.name, spec.config_class, model, **settings.method_settings)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise EditError(f"{out} already exists and is not empty: choose a new --out folder")
    ppl_text = None
    if settings.ppl_text:
        try:
            ppl_text = Path(settings.ppl_text).read_text(encoding="utf-8")
        except OSError as e:
            raise EditError(f"cannot read the perplexity text {settings.ppl_text}: {e}") from None

    # one-time cost: the key statistics the method needs (reported, cached after)
    t0 = time.perf_counter()
    layers = getattr(config, "layers", None) or [getattr(config, "layer", None)]
    if None not in layers:  # without a configured layer the method picks one (cost in edit 1)
        second_moment(
            model,
            tok,
            [arch.lookup(model).mlp_out_name(i) for i in layers],
            corpus=config.stats_corpus,
            n_tokens=config.stats_tokens,
            progress=progress,
        )
    stats_seconds = time.perf_counter() - t0

    n_flu = settings.fluency_records if mode == "single" else 0
    key = (
        tuple(rec.id for rec in records),
        n_flu,
        mode != "single",
        *(getattr(settings, f) for f in _FLUENCY_FIELDS),
    )
    if unedited is not None and unedited.key != key:
        raise EditError(
            "the unedited measurements given are of other records, mode or fluency settings"
        )
    if unedited is None:
        unedited = _measure_unedited(model, tok, records, key, settings, ppl_text, progress)
    before, refs = unedited.before, unedited.refs
    flu_before, global_flu_before = unedited.flu_before, unedited.global_flu_before

    after: list[dict | None] = [None] * len(records)
    flu_after: list[dict] = []
    seconds: list[float] = []
    refused: list[bool] = [False] * len(records)
    handles = []
    history: dict[str, torch.Tensor] = {}  # keys written so far (sequential batches)
    retried: list[dict] = []  # batch methods: the rounds that edited again what did not take
    # one edit call per group: a record (single; sequential with a one-fact method), a batch
    # of ``batch_size`` records (sequential with a batch method) or all records (batch)
    if mode == "batch":
        size = len(records)
    elif mode == "sequential" and spec.batch:
        size = settings.batch_size
    else:
        size = 1
    bar = tqdm(total=len(records), desc=f"editing ({mode})", disable=not progress)
    for start in range(0, len(records), size):
        group = list(range(start, min(start + size, len(records))))
        request = [records[i].fact for i in group] if size > 1 else records[start].fact
        t = time.perf_counter()
        try:
            res = apply(
                model,
                tok,
                request,
                method=spec.name,
                describe=False,
                progress=progress and size > 1,
                history=history,
                **settings.method_settings,
            )
            seconds.extend([(time.perf_counter() - t) / len(group)] * len(group))
            handles.append(res)
            history = with_keys(history, res.update)
            retried.extend(res.metrics.get("retried", []))
        except EditFailed as e:
            for i in group:
                refused[i] = True
            log.info("records %s: edit refused (%s)", [records[i].id for i in group], e)
        if mode == "single":
            after[start] = measure(model, tok, records[start], refs[start])
            if start < n_flu:
                gen = records[start].generation_prompts[: settings.gen_prompts]
                flu_after.append(fluency(model, tok, gen, settings, ppl_text))
            if handles:
                handles.pop().undo()
                history.clear()
        bar.update(len(group))
    bar.close()
    global_flu_after = None
    if mode != "single":
        for i, rec in enumerate(tqdm(records, desc="edited model", disable=not progress)):
            after[i] = measure(model, tok, rec, refs[i])
        global_flu_after = fluency(model, tok, _gen_prompts(records, settings), settings, ppl_text)
        for res in reversed(handles):
            res.undo()

    rows = []
    for i, rec in enumerate(records):
        row = {
            "id": rec.id,
            "fact": rec.fact.to_dict(),
            "refused": refused[i],
            "before": before[i],
            "after": after[i],
        }
        if i < len(flu_after):
            row["fluency_before"] = _public(flu_before[i])
            row["fluency_after"] = _public(flu_after[i])
            row["generations_after"] = flu_after[i].get("_generations")
        rows.append(row)

    summary = {
        "data": data_name,
        "records": len(records),
        "format": records[0].format if records else None,
        "method": spec.name,
        "mode": mode,
        "config": config.__dict__ if hasattr(config, "__dict__") else str(config),
        "protocol": {
            "mode": mode,
            "records_per_edit_call": size,
            "metrics": DEFINITIONS,
            "fluency": (
                f"first {n_flu} records, each measured right after its own edit"
                if mode == "single"
                else "once, after all edits"
            )
            + f"; {settings.gen_prompts} generation prompts x {settings.gen_tokens} "
            f"tokens, top-5 sampling, seed {settings.seed}; perplexity on the first "
            f"{settings.ppl_tokens} tokens of {settings.ppl_text or 'no text'}",
        },
        "unedited": _average(before),
        "edited": _average(after),
        "refused": int(sum(refused)),
        "retried": {
            "rounds": len(retried),
            "facts": sum(r["facts"] for r in retried),
            "took": sum(r["took"] for r in retried if r["kept"]),
        },
        "cost": {
            "seconds_per_edit": M.percentile_summary(seconds),
            "statistics_seconds": round(stats_seconds, 2),
            "peak_memory_mb": _peak_memory_mb(),
        },
    }
    if mode == "single":
        summary["unedited"].update(_average([_public(f) for f in flu_before]))
        summary["edited"].update(_average([_public(f) for f in flu_after]))
    else:
        summary["unedited"].update(_public(global_flu_before))
        summary["edited"].update(_public(global_flu_after))

    if out is not None:
        _write(out, summary, rows)
    return EvalReport(summary, rows, out, unedited)


def _measure_unedited(model, tok, records, key, settings, ppl_text, progress) -> Unedited:
    """Every record's metrics on the unedited model, and its fluency."""
    n_flu, whole_run = key[1], key[2]
    before, refs, flu_before = [], [], []
    for rec in tqdm(records, desc="unedited model", disable=not progress):
        m = measure(model, tok, rec)
        refs.append(m.pop("_keep"))
        before.append(m)
    # one unedited model: the generations of every fluency record in one batched call
    # (decoding is bound by reading the weights, so 40 prompts cost about what 2 do)
    gens = [rec.generation_prompts[: settings.gen_prompts] for rec in records[:n_flu]]
    prompts = [p for g in gens for p in g]
    texts = (
        lm.sample(model, tok, prompts, settings.gen_tokens, seed=settings.seed) if prompts else []
    )
    for g in gens:
        mine, texts = texts[: len(g)], texts[len(g) :]
        flu_before.append({"GE": M.generation_entropy(mine), "_generations": mine} if g else {})
    global_flu_before = None
    if flu_before and ppl_text:  # one unedited model, one perplexity
        ppl = fluency(model, tok, [], settings, ppl_text)["PPL"]
        for f in flu_before:
            f["PPL"] = ppl
    if whole_run:
        global_flu_before = fluency(model, tok, _gen_prompts(records, settings), settings, ppl_text)
    return Unedited(key, before, refs, flu_before, global_flu_before)


def _gen_prompts(records: list[Record], settings: EvalSettings) -> list[str]:
    prompts = []
    for rec in records[: max(settings.fluency_records, 1)]:
        prompts.extend(rec.generation_prompts[: settings.gen_prompts])
    return prompts


def _public(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if not k.startswith("_")}


def _average(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r if not k.startswith("_")})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not np.isnan(r[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# --------------------------------------------------------------------------- writing

SHARES = ("ES", "PS", "NS", "QS", "CS", "CG", "MHS", "zsRE_acc", "zsRE_gen", "zsRE_loc")
MARGINS = ("EM", "PM", "NM")


def summary_table(summary: dict) -> str:
    """A Markdown table: unedited and edited side by side (shares and margins in percent)."""
    keys = [
        k
        for k in (*SHARES, *MARGINS, "KL", "GE", "PPL")
        if k in summary["unedited"] or k in summary["edited"]
    ]
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    lines = []
    for name in ("unedited", "edited"):
        vals = []
        for k in keys:
            v = summary[name].get(k)
            if v is None:
                vals.append("–")
            elif k in SHARES or k in MARGINS:
                vals.append(f"{100 * v:.1f}")
            elif k == "KL":
                vals.append(f"{v:.4f}")
            else:
                vals.append(f"{v:.2f}")
        label = "unedited" if name == "unedited" else f"{summary['method']} ({summary['mode']})"
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return head + "\n".join(lines) + "\n"


def _write(out: Path, summary: dict, rows: list[dict]) -> None:
    """All files go to a temporary folder that is renamed into place at the end."""
    with new_folder(out) as tmp:
        with open(tmp / "records.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=_json_default) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        cost = summary["cost"]
        spe = cost["seconds_per_edit"]
        md = [
            f"# {summary['method']} on {summary['data']} ({summary['records']} records, "
            f"mode {summary['mode']})",
            "",
            summary_table(summary),
            f"Edits refused: {summary['refused']}. "
            + _retried_line(summary.get("retried"))
            + "Seconds per edit: median "
            f"{_fmt(spe['median'])}, p90 {_fmt(spe['p90'])}. Key statistics: "
            f"{cost['statistics_seconds']} s. Peak memory: {cost['peak_memory_mb']} MB.",
            "",
            "Shares and margins in percent. Definitions:",
            "",
        ]
        md += [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
        md += ["", f"Fluency: {summary['protocol']['fluency']}."]
        (tmp / "summary.md").write_text("\n".join(md) + "\n")
        _plots(tmp, summary, rows)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _plots(folder: Path, summary: dict, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    keys = [k for k in SHARES if k in summary["edited"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.2))
    x = np.arange(len(keys))
    for off, name, color in ((-0.2, "unedited", "#999999"), (0.2, "edited", "#2b6cb0")):
        ax.bar(x + off, [100 * summary[name].get(k, 0) for k in keys], 0.4, label=name, color=color)
    ax.set_xticks(x, keys)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{summary['method']} ({summary['mode']}), {summary['records']} records")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "scores.png", dpi=120)
    plt.close(fig)

    em_b = [r["before"].get("EM") for r in rows if r["after"] and r["before"].get("EM") is not None]
    em_a = [r["after"].get("EM") for r in rows if r["after"] and r["after"].get("EM") is not None]
    if em_a:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = np.linspace(-1, 1, 41)
        ax.hist(em_b, bins=bins, alpha=0.6, label="unedited", color="#999999")
        ax.hist(em_a, bins=bins, alpha=0.6, label="edited", color="#2b6cb0")
        ax.set_xlabel("p(new) - p(true) on the edit prompt")
        ax.set_ylabel("records")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "margins.png", dpi=120)
        plt.close(fig)


def _retried_line(r: dict | None) -> str:
    if not r or not r["rounds"]:
        return ""
    return (
        f"Facts that did not take, edited again: {r['facts']} in {r['rounds']} "
        f"round{'s' if r['rounds'] > 1 else ''}, "
        f"{r['took']} of them took. "
    )
