"""Applying an edit to a model in memory, as one transaction.

    result = edit.apply(model, tok, "Paris is capital of Italy")
    result.metrics["p_new_after"]       # P(" Italy" | "Paris is capital of")
    result.undo()                       # the exact previous weights

The method computes its update without touching the model. The update is applied only if it
is finite, and kept only if it took: for an insertion the new target must end up more likely
than the old object; for an erasure the object must lose its top rank and at least 10x of
its probability. Otherwise the weights are restored bit for bit and :class:`EditFailed` is
raised.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edit import lm, replies
from edit import methods as method_registry
from edit.config import resolve
from edit.errors import EditFailed, InvalidRequest
from edit.facts import Fact, parse_statement
from edit.methods import MethodOutput
from edit.methods.algebra.precision import value_autocast
from edit.methods.algebra.solves import neuron_facts
from edit.questions import chat_prompt
from edit.update import Applied, Update, with_keys

log = logging.getLogger(__name__)

ERASE_MIN_DROP = 10.0  # an erasure must cut the object's probability at least this much


@dataclass
class EditResult:
    """What an edit did: the request, the update, what it measured, and how to undo it."""

    kind: str  # "insert" or "erase"
    method: str
    facts: list[Fact]
    update: Update
    layers: list[int]
    config: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    handle: Applied | None = None

    def undo(self) -> None:
        """Restore the exact weights the model had before this edit."""
        if self.handle is not None:
            self.handle.undo()

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)


def as_fact(
    request: str | Fact | dict, subject: str | None = None, target: str | None = None
) -> Fact:
    if isinstance(request, Fact):
        return request
    if isinstance(request, dict):
        return Fact.from_dict(request)
    if isinstance(request, str):
        return parse_statement(request, subject=subject, target=target)
    raise InvalidRequest(f"cannot read a request of type {type(request).__name__}")


def old_object(model: nn.Module, tok, fact: Fact) -> str:
    """The object the model asserts now: ``target_true`` if given, else the opening phrase
    of its greedy completion of the prompt (see :func:`opening_phrase`)."""
    if fact.target_true:
        return fact.target_true
    return opening_phrase(lm.greedy(model, tok, [fact.text], max_new_tokens=8)[0])


def opening_phrase(completion: str, max_words: int = 5) -> str:
    """The phrase a completion opens with: up to the first clause break (``.,;:!?``, a line
    end) and at most ``max_words`` words, an article kept ("the United States", not "the":
    a lone article is what a model says before most answers, the edited one included)."""
    clause = re.split(r"[.,;:!?\n]", completion.strip(), maxsplit=1)[0]
    return " ".join(clause.split()[:max_words]).strip("\"'()[]")


def ask(model: nn.Module, tok, text: str, *, chat: bool = False, max_new_tokens: int = 32) -> str:
    """The model's greedy answer: the continuation of ``text``, or with ``chat`` the reply to
    ``text`` as a user turn of the model's own chat template (what ``apply_chat_template``
    with ``add_generation_prompt=True`` and ``generate`` give)."""
    return lm.greedy(model, tok, [ask_prompt(tok, text, chat)], max_new_tokens=max_new_tokens)[0]


def ask_prompt(tok, text: str, chat: bool) -> str:
    """The text the model is run on for :func:`ask`."""
    if not text.strip():
        raise InvalidRequest("the prompt is empty: give the text or question for the model")
    if not chat:
        return text
    prompt = chat_prompt(tok, text)
    if prompt is None:
        raise InvalidRequest("this model's tokenizer has no chat template: ask without --chat")
    return prompt


def apply(
    model: nn.Module,
    tok,
    request: str | Fact | dict | list,
    *,
    method: str = "rome",
    erase: bool = False,
    subject: str | None = None,
    target: str | None = None,
    describe: bool = True,
    progress: bool = True,
    history: dict | None = None,
    **settings,
) -> EditResult:
    """Edit ``model`` in place so that it asserts ``request`` (or stops asserting it).

    ``request`` is a statement ("Paris is capital of Italy"), a :class:`Fact`, a dict with
    ``prompt``/``subject``/``target``, or a list of these for a batch method (MEMIT,
    AlphaEdit, ROME's neuron write): one update for all. ``settings`` override the method's
    config (e.g. ``layer=6``); ``history`` passes the keys of earlier edits (see
    ``Workspace.history``). With ``describe``, greedy completions before and after are
    measured too (single facts).

    Facts that do not take are edited again on top, ``retry_rounds`` times at most (the
    method's config; ``metrics["retried"]``). A single edit that still does not take is undone
    and raises :class:`EditFailed`. A batch is kept when at least one of its facts took;
    ``metrics["not_taken"]`` names the others.
    """
    batch = isinstance(request, list | tuple)
    facts = [as_fact(r) for r in request] if batch else [as_fact(request, subject, target)]
    spec = _method_for(method, facts)
    config = resolve(spec.name, spec.config_class, model, **settings)
    check_batch(spec, config, len(facts))
    kind = "erase" if erase else "insert"
    olds = [_old_of(model, tok, fact, erase) for fact in facts]
    news = [None if erase else f.target for f in facts]
    if kind == "insert" and getattr(config, "chat_reply", None) == "context":
        heard = replies.told(model, tok, _with_old(facts, olds, kind))  # the old one read
        facts = [dataclasses.replace(f, told=h.told) for f, h in zip(facts, heard, strict=True)]
    probe = _Probe(model, tok, facts, news, olds, describe and not batch)
    before = probe()

    t0 = time.perf_counter()
    out = spec.compute(
        model, tok, _with_old(facts, olds, kind), config, objective=kind, progress=progress,
        history=history,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    _check_finite(spec.name, out.update, facts)
    edit = _Applied(out, out.update.apply(model), probe(), seconds,
                    owners=_owners(out.update, list(range(len(facts)))))  # fmt: skip
    edit.problems = _verdicts(kind, before, edit.after)
    rounds = getattr(config, "retry_rounds", 0)
    while rounds and any(edit.problems):
        rounds -= 1
        if not _retry(edit, spec, config, kind, before, probe, history, progress):
            break
    round_args = (spec, config, before, probe, history, progress)
    if getattr(config, "reply_round", False) and kind == "insert":
        _timed(edit, _reply_round, *round_args)
    if getattr(config, "layer_round", False) and kind == "insert":
        config = _timed(edit, _layer_round, *round_args)
    metrics = _outcome(facts, olds, before, edit, batch)
    out = edit.out
    return EditResult(
        kind, spec.name, facts, out.update, out.layers, config, metrics, out.info, edit.handle
    )


def _method_for(method: str, facts: list[Fact]) -> method_registry.Method:
    """The registered method; an empty list of facts is refused."""
    if not facts:
        raise InvalidRequest("no facts to edit: the list is empty")
    return method_registry.get(method)


def check_batch(spec: method_registry.Method, config, n_facts: int) -> None:
    """Refuse ``n_facts`` > 1 for a method that edits one fact at a time with ``config``
    (ROME's rank-one write; its neuron write takes a batch: one neuron per fact)."""
    if n_facts <= 1 or spec.batch or getattr(config, "takes_batches", False):
        return
    batch_methods = ", ".join(n for n in method_registry.names() if method_registry.get(n).batch)
    raise InvalidRequest(
        f"{spec.name} edits one fact at a time, got {n_facts}: use a batch method "
        f"({batch_methods})" + (" or write=neuron" if hasattr(config, "write") else "")
    )


def _old_of(model, tok, fact: Fact, erase: bool) -> str:
    """The object the edit compares against ("" when the model already says the target)."""
    if erase:  # for an erasure the fact's target *is* the object to remove
        return fact.target
    old = old_object(model, tok, fact)
    return "" if old.strip().lower() == fact.target.strip().lower() else old


def _with_old(facts: list[Fact], olds: list[str], kind: str) -> list[Fact]:
    """The facts as the method gets them: for an insertion, each with the object the model
    asserts now as ``target_true`` where the request names none, a leading article dropped
    (the ranked pairs of the asked forms read it); the request itself is recorded as given."""
    if kind != "insert":
        return facts
    return [_given_old(f, re.sub(r"^(the|a|an)\s+", "", old, flags=re.IGNORECASE))
            for f, old in zip(facts, olds, strict=True)]  # fmt: skip


def _given_old(fact: Fact, old: str) -> Fact:
    """``fact`` with ``old`` as its ``target_true`` where it names none and ``old`` is one
    (a completion that is no object, control characters and all, is left out)."""
    if fact.target_true or not old:
        return fact
    try:
        return dataclasses.replace(fact, target_true=old)
    except InvalidRequest:
        return fact


@dataclass
class _Applied:
    """The update on the model now, what the probe measured after it, and why facts missed."""

    out: MethodOutput
    handle: Applied
    after: list[dict]
    seconds: float
    problems: list[str | None] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)
    replied: dict | None = None  # the reply round's counts (reply_round)
    relayered: dict | None = None  # the layer round's counts (layer_round)
    owners: dict = field(default_factory=dict)  # module -> the fact of each part (_owners)


def _retry(edit: _Applied, spec, config, kind, before, probe, history, progress) -> bool:
    """Edit again, on top, the facts that did not take, with the keys of those that took as
    history (AlphaEdit keeps them); keep the round only if more facts take. Whether to go on."""
    facts = _with_old(probe.facts, probe.olds, kind)
    redo = [i for i, p in enumerate(edit.problems) if p]
    took = [i for i, p in enumerate(edit.problems) if not p]
    first_keys = edit.out.update.keys  # one row per fact
    written = Update(keys={m: k[took] for m, k in first_keys.items()})
    t1 = time.perf_counter()
    more = spec.compute(
        probe.model,
        probe.tok,
        [facts[i] for i in redo],
        config,
        objective=kind,
        progress=progress,
        history=with_keys(history, written),
    )
    edit.seconds += time.perf_counter() - t1
    if not more.update.is_finite():
        return False
    edit.handle.undo()
    merged = _Part(edit.out.update, edit.owners).merged(
        _Part(more.update, _owners(more.update, redo))
    )
    edit.handle = merged.update.apply(probe.model)
    again = probe()
    still = _verdicts(kind, before, again)
    better = sum(map(bool, still)) < sum(map(bool, edit.problems))
    edit.retried.append(
        {"facts": len(redo), "took": sum(1 for i in redo if not still[i]), "kept": better}
    )
    if not better:
        edit.handle.undo()  # back to the batch's own update
        edit.handle = edit.out.update.apply(probe.model)
        return False
    edit.out = MethodOutput(merged.update, edit.out.layers,
                            {**edit.out.info, "retry_info": more.info})  # fmt: skip
    edit.owners = merged.owners
    edit.after, edit.problems = again, still
    return True


def _timed(edit: _Applied, round_, *args):
    """Run one of an insertion's rounds on ``edit``; its time counts in the edit's."""
    t0 = time.perf_counter()
    try:
        return round_(edit, *args)
    finally:
        edit.seconds += time.perf_counter() - t0


def _reply_round(edit: _Applied, spec, config, before, probe, history, progress) -> None:
    """Ask the edited model each fact's questions in chat; where a reply does not name the
    new object, make the edit again with the reply's opening as one more chat row
    (``edit.replies``). Kept when more replies name the object and no more facts miss."""
    model, tok = probe.model, probe.tok
    facts = _with_old(probe.facts, probe.olds, "insert")
    asked = replies.ask(model, tok, facts)
    found = replies.openings(model, tok, facts, asked)
    record = {"replies": sum(map(len, asked)), "named": replies.named(asked, facts),
              "openings": sum(map(len, found)), "kept": False}  # fmt: skip
    edit.replied = record
    if not record["openings"]:
        return
    redo = [dataclasses.replace(f, openings=o) for f, o in zip(facts, found, strict=True)]
    second = _remade(edit, spec, probe, before, redo, config, history, progress)
    if second is None:
        return
    record["named_after"] = named = replies.named(replies.ask(model, tok, facts), facts)
    no_more_miss = sum(map(bool, second.problems)) <= sum(map(bool, edit.problems))
    record["kept"] = named > record["named"] and no_more_miss
    _settle(edit, second, record["kept"], model)


def _remade(
    edit: _Applied, spec, probe, before, facts, config, history, progress,
    which: list[int] | None = None, beside: _Part | None = None,
) -> _Applied | None:  # fmt: skip
    """The edit of ``facts`` (the request's facts ``which``, all by default) made again from
    the model as it was before the edit (``config`` as given), applied in place of the first,
    beside ``beside`` (the first edit's part that stays, if any), and probed; None, the first
    edit back in place, where the new update is not finite."""
    model = probe.model
    edit.handle.undo()
    more = spec.compute(model, probe.tok, facts, config, objective="insert", progress=progress,
                        history=history)  # fmt: skip
    if not more.update.is_finite():
        edit.handle = edit.out.update.apply(model)
        return None
    part = _Part(more.update, _owners(more.update, which or list(range(len(facts)))))
    if beside is not None and beside.owners:
        part = beside.merged(part)
        layers = sorted({*edit.out.layers, *more.layers})
        more = MethodOutput(part.update, layers, {**edit.out.info, "remade": more.info})
    handle = part.update.apply(model)
    again = probe()
    return _Applied(
        more, handle, again, 0.0, _verdicts("insert", before, again), owners=part.owners
    )


def _settle(edit: _Applied, second: _Applied, keep: bool, model) -> None:
    """Keep the remade edit ``second`` in place of the first, or undo it and put the first
    edit back."""
    if keep:
        edit.out, edit.handle, edit.after = second.out, second.handle, second.after
        edit.problems, edit.owners = second.problems, second.owners
        return
    second.handle.undo()
    edit.handle = edit.out.update.apply(model)


def _asking(model: nn.Module, config):
    """The precision the layer round asks the edited model in: the value optimization's
    (``value_dtype``; by default bfloat16 products for a float32 model on a CPU that has
    them in hardware). Greedy decoding of a small batch is bound by reading the weights, and
    bfloat16 halves them: 2.5x faster replies on this CPU; of 48 replies to MQuAKE questions
    after an edit, 45 judged the same as at float32, 39 and 40 stating the edit (docs/methods.md,
    "The layer round's replies in bfloat16"). What a user asks (``edit ask``) runs as the
    model is."""
    return value_autocast(model, config.value_dtype)


def _layer_round(edit: _Applied, spec, config, before, probe, history, progress):
    """Ask the edited model each fact's questions in chat (``replies.stating``); make the
    facts whose replies do not all state the edit again from the start at the config's
    retry block(s) (``config.retry_config()``; the other facts' update kept in place), and
    keep, fact by fact, the remade edit where more of its replies state it and the fact
    still takes (an update splits by fact: each fact owns its added neurons, or its column
    of each layer's factors). The config of the edit kept: the retry one where every fact
    moved."""
    model, tok = probe.model, probe.tok
    facts = _with_old(probe.facts, probe.olds, "insert")
    with _asking(model, config):
        said = replies.stating(model, tok, facts)
    redo = [i for i, (k, n) in enumerate(said) if k < n]
    other = config.retry_config()
    record = edit.relayered = {
        "replies": sum(n for _, n in said), "stating": sum(k for k, _ in said),
        "layer": _blocks(edit.out.layers), "retry_layer": _blocks(other.blocks()),
        "facts": len(facts), "remade": 0, "kept": 0,
    }  # fmt: skip
    if not redo or other.blocks() == edit.out.layers:
        return config
    record["remade"] = len(redo)
    everyone = set(range(len(facts)))
    first = _Part(edit.out.update, edit.owners)
    second = _remade(edit, spec, probe, before, [facts[i] for i in redo], other, history,
                     progress, which=redo, beside=first.only(everyone - set(redo)))  # fmt: skip
    if second is None:
        return config
    with _asking(model, config):
        again = replies.stating(model, tok, [facts[i] for i in redo])
    gained = [k - said[i][0] for i, (k, _) in zip(redo, again, strict=True)]
    record["stating_after"] = record["stating"] + sum(gained)
    back = [i for i, g in zip(redo, gained, strict=True) if g <= 0 or second.problems[i]]
    record["kept"] = len(redo) - len(back)
    # the replies that state the edit with the kept remakes in place
    record["stating_kept"] = record["stating"] + sum(
        g for i, g in zip(redo, gained, strict=True) if i not in back
    )
    if len(back) == len(redo):
        _settle(edit, second, False, model)
        return config
    if back:  # those facts' first edit put back beside the others' remade one, and probed
        second.handle.undo()
        part = _Part(second.out.update, second.owners).only(everyone - set(back))
        part = part.merged(first.only(set(back)))
        second.handle = part.update.apply(model)
        second.after = probe()
        second.problems = _verdicts("insert", before, second.after)
        layers = sorted({*edit.out.layers, *second.out.layers})
        second.out = MethodOutput(part.update, layers, second.out.info)
        second.owners = part.owners
    _settle(edit, second, True, model)
    return other if len(redo) == len(facts) and not back else config


def _blocks(layers) -> int | list[int]:
    """A block, or the blocks, as the layer round's record names them."""
    layers = list(layers)
    return layers[0] if len(layers) == 1 else layers


@dataclass
class _Part:
    """An update and, per module it changes, the fact (index in the request) each part of
    it writes: each added neuron, or each column of a layer's factors."""

    update: Update
    owners: dict[str, torch.Tensor]

    def only(self, facts: set[int]) -> _Part:
        """The part that writes ``facts``."""
        chosen = torch.tensor(sorted(facts), dtype=torch.long)
        keep = {n: torch.isin(o, chosen) for n, o in self.owners.items()}
        owners = {n: o[keep[n]] for n, o in self.owners.items() if bool(keep[n].any())}
        return _Part(self.update.select(keep), owners)

    def merged(self, other: _Part) -> _Part:
        """Both parts as one update (``Update.merged``: this one's parts first)."""
        owners = dict(self.owners)
        for n, o in other.owners.items():
            owners[n] = torch.cat([owners[n], o]) if n in owners else o
        return _Part(self.update.merged(other.update), owners)


def _owners(update: Update, facts: list[int]) -> dict[str, torch.Tensor]:
    """Per module ``update`` changes, the fact (its index in the request) each part writes,
    for an update made for ``facts``: added neurons in ``neuron_write``'s order, factor
    columns one per fact in order (MEMIT's, AlphaEdit's; ROME's one)."""
    index = torch.tensor(facts, dtype=torch.long)
    owners = {}
    for name, (a, _) in update.factors.items():
        if a.shape[1] != len(facts):
            raise EditFailed(f"{name}: {a.shape[1]} factor columns for {len(facts)} facts")
        owners[name] = index
    for name, parts in update.neurons.items():
        owners[name] = index[neuron_facts(parts[0].shape[0], len(facts))]
    return owners


def _outcome(facts, olds, before, edit: _Applied, batch: bool) -> dict:
    """The edit's metrics; a single edit that did not take, or a batch of which none took,
    is undone and raises :class:`EditFailed`."""
    problems = edit.problems
    per_fact = [
        {"old_target": old, **b2, **a2}
        for old, (b2, a2) in zip(olds, _pairs(before, edit.after), strict=True)
    ]
    seconds = round(edit.seconds, 2)
    if not batch:
        if problems[0]:
            edit.handle.undo()
            raise EditFailed(
                f"the edit did not take ({problems[0]}); the model is unchanged "
                f"(try another --layer or more steps)"
            )
        return {"seconds": seconds, "retried": edit.retried, "reply_round": edit.replied,
                "layer_round": edit.relayered, **per_fact[0]}  # fmt: skip
    failed = [(f, p) for f, p in zip(facts, problems, strict=True) if p]
    if len(failed) == len(facts):
        edit.handle.undo()
        raise EditFailed(
            f"none of the {len(facts)} edits took (first: {facts[0].statement!r}: "
            f"{problems[0]}); the model is unchanged (try other layers or more steps)"
        )
    return {
        "seconds": seconds,
        "facts": len(facts),
        "took": len(facts) - len(failed),
        "not_taken": [f"{f.statement}: {p}" for f, p in failed],
        "retried": edit.retried,
        "reply_round": edit.replied,
        "layer_round": edit.relayered,
        "per_fact": per_fact,
    }


def _check_finite(method: str, update: Update, facts: list[Fact]) -> None:
    if not update.is_finite():
        raise EditFailed(
            f"{method} produced a non-finite update for {facts[0].statement!r}"
            f"{f' and {len(facts) - 1} more' if len(facts) > 1 else ''}; "
            f"nothing was changed (try other layers)"
        )


def _pairs(before: list[dict], after: list[dict]) -> list[tuple[dict, dict]]:
    """Per fact, the probe's numbers before and after, named ``<key>_before``/``_after``."""
    return [
        ({f"{k}_before": v for k, v in b.items()}, {f"{k}_after": v for k, v in a.items()})
        for b, a in zip(before, after, strict=True)
    ]


def _verdicts(kind: str, before: list[dict], after: list[dict]) -> list[str | None]:
    """Per fact, why its edit did not take (None: it took)."""
    return [_did_not_take(kind, {**b, **a}) for b, a in _pairs(before, after)]


@dataclass
class _Probe:
    """Per fact: P(new), P(old) and whether the old object is the top next token (with
    ``describe``, the greedy completion too), on the model as it is when called."""

    model: nn.Module
    tok: Any
    facts: list[Fact]
    news: list[str | None]
    olds: list[str]
    describe: bool

    def __call__(self) -> list[dict]:
        facts = self.facts
        pairs = [
            (i, name, target)
            for i in range(len(facts))
            for name, target in (("p_new", self.news[i]), ("p_old", self.olds[i]))
            if target
        ]
        scores = lm.continuation_scores(
            self.model, self.tok, [facts[i].text for i, *_ in pairs], [t for *_, t in pairs]
        )
        res: list[dict[str, Any]] = [{} for _ in facts]
        for (i, name, _), sc in zip(pairs, scores, strict=True):
            res[i][name] = lm.sequence_prob(sc.logprobs)
            if name == "p_old":  # the top next token, from the same teacher-forced pass
                res[i]["old_is_top"] = int(sc.top1[0]) == int(sc.targets[0])
        if self.describe:
            for i, text in enumerate(lm.greedy(self.model, self.tok, [f.text for f in facts])):
                res[i]["completion"] = text
        return res


def _did_not_take(kind: str, m: dict) -> str | None:
    if kind == "insert":
        if m.get("p_old_after") is not None and m["p_new_after"] <= m["p_old_after"]:
            return f"P(new)={m['p_new_after']:.3g} is not above P(old)={m['p_old_after']:.3g}"
        if m["p_new_after"] <= m["p_new_before"]:
            return "P(new) did not increase"
        return None
    if m["old_is_top_after"]:
        return "the object is still the top prediction"
    if m["p_old_after"] * ERASE_MIN_DROP > m["p_old_before"]:
        return (
            f"P(object) fell only from {m['p_old_before']:.3g} to {m['p_old_after']:.3g}, "
            f"less than {ERASE_MIN_DROP:g}x"
        )
    return None
