"""How a workspace forgets or learns a corpus: read the sets (corpus, retain, holdout), choose
where a forget run stops, train, and describe the run for the ledger (:func:`train_corpus`).

A forget run aims at the level a model that never saw the corpus gives it, the first of:
``stop_nll`` when given; else, with a reference (a model that never saw the corpus, such as
the base model a fine-tune started from), the reference's NLL on the corpus; else, with a
holdout (never-seen examples of the same kind), the holdout's NLL; else, when an earlier
``learn`` entry learned every example of the corpus (``stop_at_learned``), the corpus's NLL
without that entry. Objectives that push the likelihood down stop there; those that hold
each example at its own level (``distill``, ``match``) run every epoch and report it.
Without any level, every epoch runs.

With a reference and no method chosen, the objective is ``distill``: every token of the
corpus is aimed at the reference's next-token distribution, so each example, not only the
mean, lands where a never-seen model puts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from edit import arch as arch_table
from edit.config import resolve
from edit.corpus import Example, wikitext_retain
from edit.errors import EditFailed, InvalidRequest
from edit.methods.unlearn.config import UnlearnConfig, for_objective
from edit.methods.unlearn.lora import LoraResult, lora_update
from edit.methods.unlearn.losses import NEEDS_TARGETS, NEEDS_TEACHER
from edit.methods.unlearn.scoring import answer_nll
from edit.methods.unlearn.trainer import train_lora
from edit.readers.corpus import as_corpus
from edit.update import Update

DISTILL = "distill"  # the objective of a forget run given a reference and no method
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


def train_corpus(
    model: nn.Module,
    tok,
    objective: str,
    corpus,
    retain=None,
    holdout=None,
    *,
    settings: dict[str, Any],
    progress: bool = True,
    entries: Sequence[Recorded] = (),
    without: Callable[[str], AbstractContextManager] | None = None,
    reference: nn.Module | None = None,
) -> Trained:
    """Forget (or learn) ``corpus`` with a LoRA adapter on ``model`` (left unchanged).

    ``corpus``/``retain``/``holdout``: a JSON Lines path, an ``edit.corpus.Corpus`` (read
    once by the caller) or a list of ``Example``; without ``retain``, a forget run retains
    slices of the shipped WikiText-2 text. ``settings``
    override ``UnlearnConfig`` (over the tuned file for this model). ``entries``: the ledger's
    active entries in order, and ``without(id)``: the model without one of them (a context
    manager), for the stop level of a corpus that an earlier ``learn`` entry learned.
    ``reference``: a model that never saw the corpus, with ``tok``'s vocabulary (forget only):
    the stop level, and the teacher of the default objective ``distill``.
    """
    if reference is not None and objective != "forget":
        raise InvalidRequest("a reference model sets where a forget run stops: leave it out")
    if reference is not None and settings.get("method") is None:
        settings = {**settings, "method": DISTILL}
    data = as_corpus(corpus)  # every line checked before anything is trained
    unseen = as_corpus(holdout) if holdout is not None else None
    retain = as_corpus(retain) if retain is not None else None
    config = resolve("unlearn", UnlearnConfig, model, **settings)
    kept = _retain_set(tok, retain, config)
    config = for_objective(config, objective, retain=bool(kept))
    config, stop_kind, learner = _stop_level(model, tok, objective, config, data, unseen,
                                             entries, without, reference)  # fmt: skip
    teacher = reference if config.method in NEEDS_TEACHER | NEEDS_TARGETS else None
    res = train_lora(model, tok, data, kept, config, objective=objective,
                     progress=progress, holdout=unseen, teacher=teacher)  # fmt: skip
    update = lora_update(res)
    if not update.is_finite():
        raise EditFailed(f"{objective} produced a non-finite adapter; nothing was recorded")
    prefix = arch_table.lookup(model).layers + "."
    layers = sorted({int(n[len(prefix) :].split(".")[0]) for n in res.target_modules})
    info = {
        "corpus": data.source,
        "examples": len(data),
        "retain": retain.source if retain is not None else "wikitext2 (shipped)" if kept else None,
        "retain_examples": len(kept),
        "holdout": unseen.source if unseen is not None else None,
        "reference": _model_name(reference),
        "losses": res.losses,
        "seconds": res.seconds,
        "tokens": res.tokens,
        "tokens_per_second": res.tokens_per_second,
        "target_modules": res.target_modules,
        "lora_config": res.lora_config,
        "stop_source": stop_kind,  # a key of STOP_MEANS, or None
        "learned_by": learner.id if learner is not None else None,
    }
    if objective == "learn":  # lets a later forget find the entry that learned its corpus
        info["example_hashes"] = [ex.fingerprint() for ex in data]
    method = config.method if objective == "forget" else "lora"
    return Trained(objective, method, config, update, layers, info, res)


def _retain_set(tok, retain, config: UnlearnConfig) -> list[Example]:
    """The examples to keep: ``retain`` as given; else the shipped WikiText-2 slices, except
    for an objective that distills toward a model without the corpus when no KL weight is set.
    That model reads generic text as the target should; holding generic text to the model
    before the run keeps exactly what learning the corpus did to it (benchmarks/forget_bios.py:
    loss AUC 0.547 with it, 0.517 without, against the base's 0.573)."""
    if retain is not None:
        return retain
    if config.method in NEEDS_TEACHER and config.kl_weight is None:
        return []
    return wikitext_retain(tok)


def learned_by(examples: Iterable[Example], entries: Sequence[Recorded]) -> Recorded | None:
    """The latest ``learn`` entry that learned every one of ``examples``, if any."""
    wanted = {ex.fingerprint() for ex in examples}
    for entry in reversed(entries):
        learned = set(entry.info.get("example_hashes") or ())
        if wanted and entry.kind == "learn" and wanted <= learned:
            return entry
    return None


def _stop_level(
    model: nn.Module,
    tok,
    objective: str,
    config: UnlearnConfig,
    data: list[Example],
    unseen: list[Example] | None,
    entries: Sequence[Recorded],
    without: Callable[[str], AbstractContextManager] | None,
    reference: nn.Module | None,
) -> tuple[UnlearnConfig, str | None, Recorded | None]:
    """(``config``, with the stop level of a corpus the reference scores or an earlier entry
    learned; what sets the stop level (a key of :data:`STOP_MEANS`), None: nothing; the entry
    that learned the corpus, if that is it). A holdout's level is the trainer's to measure."""
    if objective != "forget":  # a learn run scores its never-seen set; it does not stop on it
        return config, None, None
    if config.stop_nll is not None:
        return config, "stop_nll", None
    if reference is not None:  # the corpus's level on a model that never saw it
        level = answer_nll(reference, tok, data, max_len=config.max_len)
        return dataclasses.replace(config, stop_nll=level), "reference", None
    if unseen is not None:
        return config, "holdout", None
    learner = learned_by(data, entries) if config.stop_at_learned else None
    if learner is None:
        return config, None, None
    with without(learner.id):  # the corpus's level as text this model never saw
        level = answer_nll(model, tok, data, max_len=config.max_len)
    return dataclasses.replace(config, stop_nll=level), "learned", learner


def _model_name(model: nn.Module | None) -> str | None:
    """How the entry names a reference model: where it was loaded from, if known."""
    if model is None:
        return None
    return getattr(model, "edit_source", None) or getattr(model, "name_or_path", "(in memory)")
