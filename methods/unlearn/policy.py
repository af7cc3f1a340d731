"""How a workspace forgets or learns a corpus: read the sets (corpus, retain, holdout) and
choose where a forget run stops (:func:`plan_corpus`), train, and describe the run for the
ledger (:func:`train_plan`). A level that only the ledger knows (the corpus without the entry
that learned it) is the caller's to measure: :attr:`Plan.wants_learned_level`.

A forget run aims at the level a model that never saw the corpus gives it, the first of:
``stop_nll`` when given; else, with a reference (a model that never saw the corpus, such as
the base model a fine-tune started from), the reference's NLL on the corpus; else, when an
earlier ``learn`` entry learned every example of the corpus (``stop_at_learned``), the
corpus's NLL without that entry (the level of exactly this text unseen); else, with a
holdout (never-seen examples of the same kind), the holdout's NLL. Objectives that push the
likelihood down stop there; those that hold each example at its own level (``distill``,
``match``) run every epoch and report it. Without any level, every epoch runs.

With a reference and no method chosen, the objective is ``distill``: every token of the
corpus is aimed at the reference's next-token distribution, so each example, not only the
mean, lands where a never-seen model puts it. Where the ledger learned the corpus, the model
without that entry is such a reference (:func:`at_learned`).

The retain set is held to the model before the run, or, with a reference, to the reference
where the model before reads it much worse (:func:`retain_hold`). With ``teach_form`` the
reference first learns examples of the corpus's kind, so that the teacher knows their form
(:func:`form_teacher`): by default, some of a retain set given, as a model trained without the
corpus learned them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from edit import arch as arch_table
from edit.config import resolve
from edit.corpus import Corpus, Example, retain_facts, wikitext_retain
from edit.errors import EditFailed, InvalidRequest
from edit.methods.unlearn.config import (
    OBJECTIVE_DEFAULTS,
    TEACH_RETAIN,
    UnlearnConfig,
    for_objective,
)
from edit.methods.unlearn.lora import LoraResult, lora_update
from edit.methods.unlearn.losses import NEEDS_TARGETS, NEEDS_TEACHER
from edit.methods.unlearn.scoring import answer_nll
from edit.methods.unlearn.trainer import train_lora
from edit.readers.corpus import as_corpus
from edit.update import Update

DISTILL = "distill"  # the objective of a forget run given a reference and no method
# the shipped factual prompts of a retain set appear once per this many text slices (see
# _retain_set); 64: the slices there were when the learn defaults were chosen
SLICES_PER_FACT_COPY = 64
# perplexity on the retain set, the model before over the reference, above which a fine-tune
# is taken to have damaged what the retain set holds: the retain KL then holds it to the
# reference. On the shipped WikiText-2 slices, 40 bios learned by `edit learn` read +0.6 %
# above the base model; the 20 bios of the quick learn that broke generic text, 2.8x
DAMAGED = 1.10
# ... and there the shipped factual prompts are held too (as `edit learn` holds them), unless
# a retain set or fact_retain was given: on the quick learn, known facts 21.0 % with the text
# alone, 29.0 % with 256 prompts (the base's 30.0 %), perplexity 32.5 and 31.8
DAMAGED_FACTS = OBJECTIVE_DEFAULTS["learn"]["fact_retain"]
# where a forget run's level comes from (the entry's ``info["stop_source"]``), in the order
# chosen, and what reaching it shows
STOP_MEANS = {
    "stop_nll": "the level given",
    "reference": "the level of a model that never saw the corpus, measured on the corpus",
    "learned": "the level of exactly this text without the entry that learned it",
    "holdout": "never-seen text of the same kind, on this model, stands in: where this model "
    "learned the form of such text, a model without the corpus puts the corpus higher; give "
    "a reference (the model this one was fine-tuned from) for that level",
}


class Recorded(Protocol):
    """A ledger entry as the policy reads it (an ``edit.ledger.Entry``)."""

    id: str
    kind: str
    info: dict[str, Any]


@dataclass
class Trained:
    """A finished forget / learn run, ready to record as one entry."""

    objective: str  # "forget" or "learn"
    method: str  # the forget objective (``config.method``), or "lora" for learn
    config: UnlearnConfig  # as resolved: tuned file, settings, objective defaults, stop level
    update: Update  # the adapter as weight deltas (finite)
    layers: list[int]  # the blocks whose weights it changes
    info: dict[str, Any]  # what the entry records about the run
    result: LoraResult


@dataclass(frozen=True)
class Plan:
    """A forget / learn run before training: the sets as read, the resolved config and where
    the stop level comes from (:func:`plan_corpus`)."""

    objective: str
    data: Corpus  # the corpus, every line checked
    unseen: Corpus | None  # the holdout
    retain: Corpus | None  # as given (None: the shipped WikiText-2 slices, or nothing)
    kept: list[Example]  # the examples the run holds
    config: UnlearnConfig
    stop_kind: str | None  # a key of STOP_MEANS; None: no level (yet)
    reference: nn.Module | None = None
    learned_by: str | None = None  # the entry whose absence gave the level
    # shipped factual prompts the retain set gains where it is held to the reference
    # (retain_hold): a forget of the shipped text, fact_retain left unset; else 0
    repair_facts: int = 0

    @property
    def wants_learned_level(self) -> bool:
        """A forget run with no level of its own, which may take the level of the corpus
        without the ledger entry that learned it (``stop_at_learned``): the caller, who knows
        the ledger, measures it (:func:`learned_by`, :func:`corpus_level`) and passes it to
        :meth:`at_learned_level`."""
        return (self.objective == "forget" and self.stop_kind in (None, "holdout")
                and self.config.stop_at_learned)  # fmt: skip

    def at_learned_level(self, level: float, entry_id: str) -> Plan:
        config = dataclasses.replace(self.config, stop_nll=level)
        return dataclasses.replace(self, config=config, stop_kind="learned", learned_by=entry_id)


def plan_corpus(
    model: nn.Module,
    tok,
    objective: str,
    corpus,
    retain=None,
    holdout=None,
    *,
    settings: dict[str, Any],
    reference: nn.Module | None = None,
) -> Plan:
    """Read the sets and resolve the run: ``corpus``/``retain``/``holdout``: a JSON Lines
    path, an ``edit.corpus.Corpus`` (read once by the caller) or a list of ``Example``;
    without ``retain``, a forget run retains slices of the shipped WikiText-2 text.
    ``settings`` override ``UnlearnConfig`` (over the tuned file for this model).
    ``reference``: a model that never saw the corpus, with ``tok``'s vocabulary (forget only):
    the stop level (scored here), and the teacher of the default objective ``distill``."""
    if reference is not None and objective != "forget":
        raise InvalidRequest("a reference model sets where a forget run stops: leave it out")
    if reference is not None and settings.get("method") is None:
        settings = {**settings, "method": DISTILL}
    data = as_corpus(corpus)  # every line checked before anything is trained
    unseen = as_corpus(holdout) if holdout is not None else None
    retain = as_corpus(retain) if retain is not None else None
    config = resolve("unlearn", UnlearnConfig, model, **settings)
    config = _teach_form(config, objective, reference, retain, unseen)
    kept = _retain_set(tok, retain, config, objective)
    unset = objective == "forget" and retain is None and config.fact_retain is None
    config = for_objective(config, objective, retain=bool(kept))
    config, stop_kind = _stop_level(tok, objective, config, data, unseen, reference)
    return Plan(objective, data, unseen, retain, kept, config, stop_kind, reference,
                repair_facts=DAMAGED_FACTS if unset else 0)  # fmt: skip


def at_learned(plan: Plan, unseen: nn.Module, tok, entry_id: str, settings: dict[str, Any]
               ) -> Plan:  # fmt: skip
    """The plan of a forget run whose corpus the ledger entry ``entry_id`` learned, ``unseen``
    the model without that entry (every other entry applied). With no method chosen, a copy
    of ``unseen`` is the reference: ``distill`` aims every token of the corpus at the
    distribution of exactly this model without the corpus, as ``--reference`` does with a
    model loaded from elsewhere (NPO stopped at the mean left the forgotten bios' facts
    recalled: benchmarks/results/learn_bios_40.md). The copy costs a second model in memory
    for the run. With a method chosen, it stops at the corpus's NLL on ``unseen``."""
    if settings.get("method") is not None:
        return plan.at_learned_level(corpus_level(unseen, tok, plan), entry_id)
    reference = copy.deepcopy(unseen).requires_grad_(False)
    reference.edit_source = f"this model without entry {entry_id}"
    again = plan_corpus(unseen, tok, plan.objective, plan.data, plan.retain, plan.unseen,
                        settings=settings, reference=reference)  # fmt: skip
    return again.at_learned_level(again.config.stop_nll, entry_id)


def corpus_level(model: nn.Module, tok, plan: Plan) -> float:
    """The corpus's NLL on ``model`` (the never-seen level where ``model`` never saw it)."""
    return answer_nll(model, tok, plan.data, max_len=plan.config.max_len)


def train_plan(model: nn.Module, tok, plan: Plan, *, progress: bool = True) -> Trained:
    """Forget (or learn) the plan's corpus with a LoRA adapter on ``model`` (left unchanged)
    and describe the run for the ledger."""
    data, unseen, objective = plan.data, plan.unseen, plan.objective
    config, held = retain_hold(model, tok, plan.config, plan.kept, plan.reference)
    kept = plan.kept
    if held and held["to"] == "reference" and plan.repair_facts:
        config = dataclasses.replace(config, fact_retain=plan.repair_facts)
        kept = _retain_set(tok, None, config, objective)
        held["facts"] = plan.repair_facts
    teacher = plan.reference if _reads_reference(config, plan.reference) else None
    taught = None
    if teacher is not None and config.teach_form:
        teacher, taught = form_teacher(teacher, tok, plan, config, progress=progress)
    res = train_lora(model, tok, data, kept, config, objective=objective,
                     progress=progress, holdout=unseen, teacher=teacher)  # fmt: skip
    update = lora_update(res)
    if not update.is_finite():
        raise EditFailed(f"{objective} produced a non-finite adapter; nothing was recorded")
    prefix = arch_table.lookup(model).layers + "."
    layers = sorted({int(n[len(prefix) :].split(".")[0]) for n in res.target_modules})
    retain = plan.retain.source if plan.retain is not None else None
    info = {
        "corpus": data.source,
        "examples": len(data),
        "retain": retain or (_shipped(config) if kept else None),
        "retain_examples": len(kept),
        "holdout": unseen.source if unseen is not None else None,
        "reference": _model_name(plan.reference),
        "losses": res.losses,
        "seconds": res.seconds,
        "tokens": res.tokens,
        "tokens_per_second": res.tokens_per_second,
        "target_modules": res.target_modules,
        "lora_config": res.lora_config,
        "stop_source": plan.stop_kind,  # a key of STOP_MEANS, or None
        "learned_by": plan.learned_by,
        "retain_held_to": held,
        "form_taught": taught,
    }
    if objective == "learn":  # lets a later forget find the entry that learned its corpus
        info["example_hashes"] = [ex.fingerprint() for ex in data]
    method = config.method if objective == "forget" else "lora"
    return Trained(objective, method, config, update, layers, info, res)


# how the teacher learns the form of the corpus's kind: plain NLL, as the TOFU benchmark
# fine-tunes its target and reference (5 epochs at lr 1e-3, batches of 8), nothing held
FORM_LEARN = {"epochs": 5, "lr": 1e-3, "batch_size": 8, "augment": False, "kl_weight": 0.0,
              "fact_retain": 0, "text_retain": 0, "confine": False}  # fmt: skip


def form_teacher(reference: nn.Module, tok, plan: Plan, config: UnlearnConfig, *,
                 progress: bool = True) -> tuple[nn.Module, dict]:  # fmt: skip
    """(the teacher, what it learned) for a forget run toward ``reference`` with
    ``teach_form``: a copy of the reference that learned up to ``teach_form`` examples of the
    corpus's kind, spread over the retain set given, else over the holdout. A model that
    never saw the corpus may not know the form of its examples either (the base model a
    fine-tune started from never saw TOFU's answers), and a forget aimed at it takes the form
    away with the facts; the copy knows the form and none of the corpus (a plan has one of
    the sets: :func:`plan_corpus` checks)."""
    source, pool = ("retain", plan.retain) if plan.retain else ("holdout", plan.unseen)
    pool = list(pool or ())
    examples = pool[:: max(1, len(pool) // config.teach_form)][: config.teach_form]
    learn = for_objective(
        UnlearnConfig(**FORM_LEARN, lora_rank=config.lora_rank, max_len=config.max_len,
                      seed=config.seed),
        "learn", retain=False,
    )  # fmt: skip
    res = train_lora(reference, tok, examples, None, learn, objective="learn", progress=progress)
    taught = copy.deepcopy(reference)
    lora_update(res).apply(taught)
    taught.requires_grad_(False)
    name = _model_name(reference)
    taught.edit_source = f"{name} after learning {len(examples)} {source} examples"
    return taught, {"examples": len(examples), "from": source, "seconds": res.seconds,
                    "reference": name}  # fmt: skip


def _reads_reference(config: UnlearnConfig, reference) -> bool:
    """Whether a run with ``config`` reads ``reference``: one is given and the objective
    aims at it (``distill``'s teacher, ``match``'s per-example levels)."""
    return reference is not None and config.method in NEEDS_TEACHER | NEEDS_TARGETS


def _teach_form(config: UnlearnConfig, objective: str, reference, retain, unseen) -> UnlearnConfig:
    """``config`` with ``teach_form`` decided: left None, :data:`TEACH_RETAIN` where a forget
    toward ``reference`` reads it (distill, match) and a retain set is given (the examples a
    model trained without the corpus learned), else 0. A number given that nothing would
    take (no reference, an objective that reads none, no examples of the corpus's kind to
    teach) is refused in one line."""
    reads = objective == "forget" and _reads_reference(config, reference)
    if config.teach_form is None:
        return dataclasses.replace(config, teach_form=TEACH_RETAIN if reads and retain else 0)
    if not config.teach_form:
        return config
    if not reads:
        raise InvalidRequest("teach_form teaches the reference a forget run distills toward: "
                             "give --reference (with the method distill or match)")  # fmt: skip
    if not retain and not unseen:
        raise InvalidRequest("teach_form needs examples of the corpus's kind to teach the "
                             "reference: give --retain or --holdout")  # fmt: skip
    return config


def _shipped(config: UnlearnConfig) -> str:
    """How the entry names a shipped retain set."""
    facts = f" and {config.fact_retain} factual prompts" if config.fact_retain else ""
    return f"wikitext2{facts} (shipped)"


def _retain_set(tok, retain, config: UnlearnConfig, objective: str) -> list[Example]:
    """The examples to keep: ``retain`` as given; else ``text_retain`` shipped WikiText-2
    slices (and ``fact_retain`` shipped factual prompts)."""
    if retain is not None:
        return retain
    c = for_objective(config, objective)
    text = wikitext_retain(tok, c.text_retain) if c.text_retain else []
    # each fact as many times over as the text has 64 slices: a retain draw is generic text
    # as often as beside 64 slices, more slices make the text more varied, not more frequent
    return text + retain_facts(c.fact_retain) * max(1, round(len(text) / SLICES_PER_FACT_COPY))


def retain_hold(model: nn.Module, tok, config: UnlearnConfig, kept: list[Example],
                reference: nn.Module | None) -> tuple[UnlearnConfig, dict | None]:  # fmt: skip
    """``config`` with ``kl_to`` decided where it was left None, and what decided it. The
    retain set's KL keeps what the model knows outside the corpus, read on the model before
    the run; but where the model before reads the retain set at a perplexity over
    :data:`DAMAGED` times the reference's, the fine-tune broke it (20 bios learned at a high
    rate: WikiText-2 perplexity 69.7 against the base's 31.3), and held there the run would
    keep that damage: the KL then holds the retain set to the reference. None (nothing
    measured) without a reference the run reads (a distilling or per-example objective), a
    retain set or a KL term: held to the model before."""
    reads = _reads_reference(config, reference)
    if config.kl_to is not None or not (reads and kept and config.kl_weight):
        return dataclasses.replace(config, kl_to=config.kl_to or "before"), None
    before = answer_nll(model, tok, kept, max_len=config.max_len)
    ref = answer_nll(reference, tok, kept, max_len=config.max_len)
    to = "reference" if before - ref > math.log(DAMAGED) else "before"
    held = {"to": to, "perplexity_before": math.exp(before), "perplexity_reference": math.exp(ref)}
    return dataclasses.replace(config, kl_to=to), held


def learned_by(examples: Iterable[Example], entries: Sequence[Recorded]) -> Recorded | None:
    """The latest ``learn`` entry that learned every one of ``examples``, if any."""
    wanted = {ex.fingerprint() for ex in examples}
    for entry in reversed(entries):
        learned = set(entry.info.get("example_hashes") or ())
        if wanted and entry.kind == "learn" and wanted <= learned:
            return entry
    return None


def _stop_level(
    tok,
    objective: str,
    config: UnlearnConfig,
    data: list[Example],
    unseen: list[Example] | None,
    reference: nn.Module | None,
) -> tuple[UnlearnConfig, str | None]:
    """(``config``, with the stop level of a corpus the reference scores; what sets the stop
    level (a key of :data:`STOP_MEANS`), None: nothing yet). A holdout's level is the
    trainer's to measure; the level of a corpus an earlier entry learned is the caller's
    (:attr:`Plan.wants_learned_level`)."""
    if objective != "forget":  # a learn run scores its never-seen set; it does not stop on it
        return config, None
    if config.stop_nll is not None:
        return config, "stop_nll"
    if reference is not None:  # the corpus's level on a model that never saw it
        level = answer_nll(reference, tok, data, max_len=config.max_len)
        return dataclasses.replace(config, stop_nll=level), "reference"
    if unseen is not None:
        return config, "holdout"
    return config, None


def _model_name(model: nn.Module | None) -> str | None:
    """How the entry names a reference model: where it was loaded from, if known."""
    if model is None:
        return None
    return getattr(model, "edit_source", None) or getattr(model, "name_or_path", "(in memory)")
