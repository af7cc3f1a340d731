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
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edit import lm
from edit import methods as method_registry
from edit.config import resolve
from edit.errors import EditFailed, InvalidRequest
from edit.facts import Fact, parse_statement
from edit.update import Applied, Update

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
    """The object the model asserts now: ``target_true`` if given, else the first word of
    its greedy completion of the prompt."""
    if fact.target_true:
        return fact.target_true
    words = lm.greedy(model, tok, [fact.text], max_new_tokens=6)[0].split()
    return words[0].strip(".,;:!?\"'()") if words else ""


def apply(
    model: nn.Module,
    tok,
    request: str | Fact | dict,
    *,
    method: str = "rome",
    erase: bool = False,
    subject: str | None = None,
    target: str | None = None,
    describe: bool = True,
    progress: bool = True,
    **settings,
) -> EditResult:
    """Edit ``model`` in place so that it asserts ``request`` (or stops asserting it).

    ``request`` is a statement ("Paris is capital of Italy"), a :class:`Fact` or a dict with
    ``prompt``/``subject``/``target``. ``settings`` override the method's config (e.g.
    ``layer=6``). With ``describe``, greedy completions before and after are measured too.
    """
    fact = as_fact(request, subject, target)
    spec = method_registry.get(method)
    config = resolve(spec.name, spec.config_class, model, **settings)
    kind = "erase" if erase else "insert"

    # For an erasure the fact's target *is* the object to remove.
    old = fact.target if erase else old_object(model, tok, fact)
    if not erase and old.strip().lower() == fact.target.strip().lower():
        old = ""  # the model already says the target: there is no old object to compare
    new = None if erase else fact.target
    before = _probe(model, tok, fact, new, old, describe)

    t0 = time.perf_counter()
    out = spec.compute(model, tok, [fact], config, objective=kind, progress=progress)
    seconds = time.perf_counter() - t0
    if not out.update.is_finite():
        raise EditFailed(
            f"{spec.name} produced a non-finite update for {fact.statement!r}; "
            f"nothing was changed (try another --layer)"
        )

    handle = out.update.apply(model)
    after = _probe(model, tok, fact, new, old, describe)
    metrics = {"seconds": round(seconds, 2), "old_target": old}
    for k, v in before.items():
        metrics[f"{k}_before"] = v
    for k, v in after.items():
        metrics[f"{k}_after"] = v
    problem = _did_not_take(kind, metrics)
    if problem:
        handle.undo()
        raise EditFailed(
            f"the edit did not take ({problem}); the model is unchanged "
            f"(try another --layer or more steps)"
        )
    return EditResult(
        kind, spec.name, [fact], out.update, out.layers, config, metrics, out.info, handle
    )


def _probe(model, tok, fact: Fact, new: str | None, old: str, describe: bool) -> dict:
    targets = [t for t in (new, old) if t]
    lps = lm.continuation_logprobs(model, tok, [fact.text] * len(targets), targets)
    res: dict[str, Any] = {}
    if new:
        res["p_new"] = lm.sequence_prob(lps[0])
    if old:
        res["p_old"] = lm.sequence_prob(lps[-1])
        top = lm.top_next(model, tok, fact.text, k=1)[0][0]
        first = lm.encode_continuation(tok, old)[0]
        res["old_is_top"] = tok.decode([first]) == top
    if describe:
        res["completion"] = lm.greedy(model, tok, [fact.text])[0]
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
