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
from edit.api.edits import apply, check_batch
from edit.config import resolve
from edit.errors import EditError, EditFailed, InvalidRequest
from edit.evals import metrics as M
from edit.evals.fluency import fluency
from edit.evals.forms import asked_scores, chat_replies
from edit.evals.metrics import DEFINITIONS
from edit.evals.report import write
from edit.readers.records import Record
from edit.stats import second_moment
from edit.update import with_keys

log = logging.getLogger(__name__)

MODES = ("single", "sequential", "batch")
_FLUENCY_FIELDS = ("fluency_records", "gen_prompts", "gen_tokens", "ppl_text", "ppl_tokens", "seed")


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
    nll = np.array([s.mean_nll for s in scores])
    nxt = [s.next_logprobs for s in scores[len(scores) - next_of :]] if next_of else []
    return nll, nxt


def measure(
    model: nn.Module, tok, rec: Record, ref: dict | None = None, unrelated: str | None = None
) -> dict:
    """Rewrite and locality metrics for one record on the model as it is now.

    ``ref`` holds what was kept from the unedited model (next-token log-probs after the
    neighbourhood prompts, zsRE locality predictions, the chat reply to ``unrelated``,
    another record's question); without it the KL, RU and zsRE locality entries are that
    reference itself.
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
        out.update(_replies(model, tok, rec, unrelated, ref, keep))
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


def _replies(model, tok, rec: Record, unrelated: str | None, ref, keep: dict) -> dict:
    """RS, RN, RO, RL, RE of the greedy chat reply to the record's first question, and RU of
    the reply to ``unrelated`` against the unedited one (kept in ``keep`` when ``ref`` is
    None)."""
    f = rec.fact
    replies = chat_replies(model, tok, [rec.questions[0], *([unrelated] if unrelated else [])])
    if not replies:  # no chat template
        return {}
    new, old = [f.target, *rec.aliases], [f.target_true, *rec.old_aliases]
    out = {**M.reply_figures(replies[0], f.subject, new, old), "_reply": replies[0]}
    if unrelated:
        if ref is None:
            keep["unrelated_reply"] = replies[1]
            out["RU"] = 1.0
        else:
            out["RU"] = float(replies[1] == ref["unrelated_reply"])
    return out


def unrelated_question(records: list[Record], i: int) -> str | None:
    """The question whose chat reply record ``i``'s edit should leave alone: the next
    record's (in a cycle) that has one, if it is not about the same subject."""
    for j in [*range(i + 1, len(records)), *range(i)]:
        other = records[j]
        if other.questions and other.fact.subject != records[i].fact.subject:
            return other.questions[0]
    return None


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
    spec, config, out, ppl_text = _check(model, method, mode, out_dir, settings)
    stats_seconds = _collect_statistics(model, tok, config, progress)
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
    # one edit call per group: a record (single; sequential with a one-fact method), a batch
    # of ``batch_size`` records (sequential with a batch method) or all records (batch)
    if mode == "batch":
        size = len(records)
    elif mode == "sequential" and spec.batch:
        size = settings.batch_size
    else:
        size = 1
    run = _Run(model, tok, records, spec.name, settings, unedited, ppl_text, progress)
    run.edit_all(mode, size, n_flu)
    rows = run.rows(unedited)
    summary = {
        "data": data_name,
        "records": len(records),
        "format": records[0].format if records else None,
        "method": spec.name,
        "mode": mode,
        "config": config.__dict__ if hasattr(config, "__dict__") else str(config),
        "protocol": _protocol(mode, size, n_flu, settings),
        "unedited": _average(unedited.before),
        "edited": _average(run.after),
        "refused": int(sum(run.refused)),
        "retried": {
            "rounds": len(run.retried),
            "facts": sum(r["facts"] for r in run.retried),
            "took": sum(r["took"] for r in run.retried if r["kept"]),
        },
        "layer_round": _layer_rounds(run.relayered),
        "cost": {
            "seconds_per_edit": M.percentile_summary(run.seconds),
            "statistics_seconds": round(stats_seconds, 2),
            "peak_memory_mb": _peak_memory_mb(),
        },
    }
    if mode == "single":
        summary["unedited"].update(_average([_public(f) for f in unedited.flu_before]))
        summary["edited"].update(_average([_public(f) for f in run.flu_after]))
    else:
        summary["unedited"].update(_public(unedited.global_flu_before))
        summary["edited"].update(_public(run.global_flu_after))
    if out is not None:
        write(out, summary, rows)
    return EvalReport(summary, rows, out, unedited)


def _layer_rounds(records: list[dict]) -> dict | None:
    """The layer rounds of a run summed (None where none ran): facts, those made again at
    the retry block and those kept there, replies asked and those that stated the edit
    before the round and with its kept remakes."""
    records = [r for r in records if r["replies"]]
    if not records:
        return None
    out = {k: sum(r[k] for r in records) for k in ("facts", "remade", "kept", "replies", "stating")}
    out["stating_kept"] = sum(r.get("stating_kept", r["stating"]) for r in records)
    return out


def _check(model, method: str, mode: str, out_dir, settings: EvalSettings):
    """The method, its resolved config, the output folder and the perplexity text, or a
    one-line error naming what is wrong."""
    if mode not in MODES:
        raise EditError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    spec = method_registry.get(method)
    if settings.batch_size < 1:
        raise EditError(f"--batch-size must be at least 1, got {settings.batch_size}")
    config = resolve(spec.name, spec.config_class, model, **settings.method_settings)
    if mode == "batch":
        try:
            check_batch(spec, config, 2)
        except InvalidRequest as e:
            raise EditError(f"{e}; or use --mode single or sequential") from None
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise EditError(f"{out} already exists and is not empty: choose a new --out folder")
    ppl_text = None
    if settings.ppl_text:
        try:
            ppl_text = Path(settings.ppl_text).read_text(encoding="utf-8")
        except OSError as e:
            raise EditError(f"cannot read the perplexity text {settings.ppl_text}: {e}") from None
    return spec, config, out, ppl_text


def _collect_statistics(model, tok, config, progress: bool) -> float:
    """The one-time cost: the key statistics the method needs (reported, cached after)."""
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
    return time.perf_counter() - t0


def _protocol(mode: str, size: int, n_flu: int, settings: EvalSettings) -> dict:
    fluency = (
        f"first {n_flu} records, each measured right after its own edit"
        if mode == "single"
        else "once, after all edits"
    )
    return {
        "mode": mode,
        "records_per_edit_call": size,
        "metrics": DEFINITIONS,
        "fluency": fluency + f"; {settings.gen_prompts} generation prompts x "
        f"{settings.gen_tokens} tokens, top-5 sampling, seed {settings.seed}; perplexity on the "
        f"first {settings.ppl_tokens} tokens of {settings.ppl_text or 'no text'}",
    }


class _Run:
    """The edits of one evaluation and what was measured after them."""

    def __init__(self, model, tok, records, method, settings, unedited, ppl_text, progress):
        self.model, self.tok, self.records, self.method = model, tok, records, method
        self.settings, self.refs, self.ppl_text = settings, unedited.refs, ppl_text
        self.progress = progress
        self.after: list[dict | None] = [None] * len(records)
        self.flu_after: list[dict] = []
        self.global_flu_after: dict | None = None
        self.seconds: list[float] = []
        self.refused: list[bool] = [False] * len(records)
        self.retried: list[dict] = []  # batch methods: rounds that edited again what missed
        self.relayered: list[dict] = []  # each edit call's layer round (``layer_round``)
        self.handles: list = []
        self.history: dict[str, torch.Tensor] = {}  # keys written so far (sequential batches)

    def edit_all(self, mode: str, size: int, n_flu: int) -> None:
        records = self.records
        bar = tqdm(total=len(records), desc=f"editing ({mode})", disable=not self.progress)
        for start in range(0, len(records), size):
            group = list(range(start, min(start + size, len(records))))
            self._edit(group, size)
            if mode == "single":
                self._measure_single(start, n_flu)
            bar.update(len(group))
        bar.close()
        if mode != "single":
            # no RU: every other record's question was edited too
            for i, rec in enumerate(tqdm(records, desc="edited model", disable=not self.progress)):
                self.after[i] = measure(self.model, self.tok, rec, self.refs[i])
            prompts = _gen_prompts(records, self.settings)
            self.global_flu_after = fluency(
                self.model, self.tok, prompts, self.settings, self.ppl_text
            )
            for res in reversed(self.handles):
                res.undo()

    def _edit(self, group: list[int], size: int) -> None:
        records = self.records
        request = [records[i].fact for i in group] if size > 1 else records[group[0]].fact
        t = time.perf_counter()
        try:
            res = apply(
                self.model,
                self.tok,
                request,
                method=self.method,
                describe=False,
                progress=self.progress and size > 1,
                history=self.history,
                **self.settings.method_settings,
            )
        except EditFailed as e:
            for i in group:
                self.refused[i] = True
            log.info("records %s: edit refused (%s)", [records[i].id for i in group], e)
            return
        self.seconds.extend([(time.perf_counter() - t) / len(group)] * len(group))
        self.handles.append(res)
        self.history = with_keys(self.history, res.update)
        self.retried.extend(res.metrics.get("retried", []))
        if res.metrics.get("layer_round"):
            self.relayered.append(res.metrics["layer_round"])

    def _measure_single(self, i: int, n_flu: int) -> None:
        """Measure record ``i`` right after its own edit, then undo the edit."""
        rec = self.records[i]
        self.after[i] = measure(self.model, self.tok, rec, self.refs[i],
                                unrelated_question(self.records, i))  # fmt: skip
        if i < n_flu:
            gen = rec.generation_prompts[: self.settings.gen_prompts]
            self.flu_after.append(fluency(self.model, self.tok, gen, self.settings, self.ppl_text))
        if self.handles:
            self.handles.pop().undo()
            self.history.clear()

    def rows(self, unedited: Unedited) -> list[dict]:
        rows = []
        for i, rec in enumerate(self.records):
            row = {
                "id": rec.id,
                "fact": rec.fact.to_dict(),
                "refused": self.refused[i],
                "before": unedited.before[i],
                "after": self.after[i],
            }
            if i < len(self.flu_after):
                row["fluency_before"] = _public(unedited.flu_before[i])
                row["fluency_after"] = _public(self.flu_after[i])
                row["generations_after"] = self.flu_after[i].get("_generations")
            rows.append(row)
        return rows


def _measure_unedited(model, tok, records, key, settings, ppl_text, progress) -> Unedited:
    """Every record's metrics on the unedited model, and its fluency."""
    n_flu, whole_run = key[1], key[2]
    before, refs, flu_before = [], [], []
    for i, rec in enumerate(tqdm(records, desc="unedited model", disable=not progress)):
        # RU only where one record is edited at a time (the others' questions stay unedited)
        unrelated = None if whole_run else unrelated_question(records, i)
        m = measure(model, tok, rec, unrelated=unrelated)
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
