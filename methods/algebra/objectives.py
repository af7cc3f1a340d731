"""The value objectives: what δ is optimized for, one table of pure functions by name.

An objective reads the log-probabilities at the supervised target positions of the running
rows and returns, per running fact, its loss, the probability it reports, and whether the fact
is done (:class:`FactLoss`). An objective that compares with the unedited model also has a
``reference``, computed once from the first pass (δ = 0). Every objective shares the essence
KL and the norm penalty (:func:`regularized`).

* ``insert`` makes ``fact.target`` likely after the prompts (mean token NLL) and, with
  ranked pairs (``rank_weight``), more likely than the old object where an asked form's
  answer opens: max(0, NLL(new) − NLL(old) + margin) per pair;
* ``erase`` makes ``fact.target`` unlikely without naming a replacement: the next-token
  distribution at the end of each prompt is pulled toward the unedited one conditioned on
  *not* starting the object, q(x) ∝ p₀(x)·[x ≠ object], by KL(q ‖ p), plus the unlikelihood
  term −log(1 − p(object)) (Welleck et al. 2020) that drives its probability down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edit.methods.algebra.batch import Batch, mean_by_fact, mean_by_group, weighted_by_fact

if TYPE_CHECKING:
    from edit.methods.algebra.values import ValueSettings


@dataclass
class ObjectiveInputs:
    """What one optimization step gives an objective."""

    logp: torch.Tensor  # (T, V) log-probabilities predicting each target token of ``batch``
    batch: Batch  # the running facts' rows
    act: torch.Tensor  # (F,) the running facts, as indices into the chunk's facts


@dataclass
class FactLoss:
    """An objective's answer, one entry per running fact."""

    loss: torch.Tensor  # (F,) the objective's own loss (with gradient)
    measure: torch.Tensor  # (F,) P(target) (insert) or P(object) (erase), reported
    done: torch.Tensor  # (F,) bool: the fact reached its stop criterion
    # (F,) target tokens of its rewriting rows not yet the top prediction (the most-probable
    # stop's), and (F,) bool: every object token is (for ``stop_patience``); None where off
    off_top: torch.Tensor | None = None
    object_top: torch.Tensor | None = None


Reference = dict[str, torch.Tensor]
LossFn = Callable[[ObjectiveInputs, Reference, "ValueSettings"], FactLoss]
ReferenceFn = Callable[[ObjectiveInputs, "ValueSettings"], Reference]


@dataclass(frozen=True)
class Objective:
    loss: LossFn
    reference: ReferenceFn | None = None  # from the unedited pass; None: needs none

    def unedited(self, x: ObjectiveInputs, settings: ValueSettings) -> Reference:
        """The reference from the unedited pass (empty for an objective that needs none)."""
        return {} if self.reference is None else self.reference(x, settings)


OBJECTIVES: dict[str, Objective] = {}  # name -> objective


def register_objective(name: str, *, reference: ReferenceFn | None = None):
    """Add a value objective to :data:`OBJECTIVES` under ``name``."""

    def wrap(fn: LossFn) -> LossFn:
        OBJECTIVES[name] = Objective(fn, reference)
        return fn

    return wrap


# --------------------------------------------------------------------------- insert


def _off_top(x: ObjectiveInputs, n_act: int, object_only: bool,
             to_object_end: bool = False) -> torch.Tensor:  # fmt: skip
    """(F,) how many target tokens of each fact's rewriting rows are not the top prediction
    (``object_only``: of its object tokens; ``to_object_end``: of the tokens up to the
    object's end)."""
    b = x.batch
    off = x.logp.detach().argmax(-1) != b.tgt_tok  # (P,)
    if object_only:
        off = off & b.tgt_object
    if to_object_end:
        off = off & ~b.tgt_after_object
    off = off & b.rewrite[b.tgt_row]
    count = torch.zeros(n_act, device=off.device)
    return count.index_add(0, b.fact[b.tgt_row], off.float())


# which side of a ranked pair the hinge moves: both objects, or the old one alone
RANK_PUSH = ("both", "old")


def _ranking(row_nll: torch.Tensor, b: Batch, n_act: int, margin: float,
             push: str = "both") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(F,) the ranked pairs' loss, max(0, NLL(new) − NLL(old) + margin) weighted per
    fact, and (F,) bool: every pair of the fact has the new object ahead (facts without
    pairs: 0 and True). ``push`` "old": the gradient reaches the old object's NLL alone
    (the new one's is held as a constant), so the pair is ranked by making the old object
    less likely where the answer opens, not the new one likelier."""
    new = row_nll[b.pair_new]
    gap = (new.detach() if push == "old" else new) - row_nll[b.pair_old]  # < 0: new ahead
    loss = weighted_by_fact(F.relu(gap + margin)[:, None], b.pair_weight, b.pair_fact,
                            n_act)[:, 0]  # fmt: skip
    behind = (gap.detach() >= 0).float()
    behind_per_fact = torch.zeros(n_act, device=gap.device).index_add(0, b.pair_fact, behind)
    return loss, behind_per_fact == 0


def _row_nll(tok_lp: torch.Tensor, b: Batch, object_weight: float) -> torch.Tensor:
    """(rows,) each row's mean target NLL, the object's tokens counting ``object_weight``
    times (``b.tgt_object``), the others once."""
    n = len(b.ids)
    if object_weight == 1.0:
        return mean_by_group(-tok_lp, b.tgt_row, n)
    w = 1.0 + (object_weight - 1.0) * b.tgt_object.to(tok_lp.dtype)
    total = torch.zeros(n, dtype=w.dtype, device=w.device).index_add(0, b.tgt_row, -tok_lp * w)
    weight = torch.zeros(n, dtype=w.dtype, device=w.device).index_add(0, b.tgt_row, w)
    return total / weight.clamp_min(1e-12)  # a row without targets: 0, as mean_by_group


@register_objective("insert")
def target_nll(x: ObjectiveInputs, ref: Reference, settings: ValueSettings) -> FactLoss:
    """Mean token NLL of the target per row, then the rows' weighted mean per fact (ROME's
    loss when every row weighs the same), plus the ranked pairs' term; done below
    ``nll_stop`` (with every pair ranked right)."""
    b, n_act = x.batch, len(x.act)
    tok_lp = x.logp.gather(1, b.tgt_tok[:, None])[:, 0]  # (P,)
    row_nll = _row_nll(tok_lp, b, settings.object_weight)
    fact_loss = weighted_by_fact(row_nll[:, None], b.weight, b.fact, n_act)[:, 0]
    measure = torch.exp(-fact_loss.detach())
    rank_loss, ranked = _ranking(row_nll, b, n_act, settings.rank_margin, settings.rank_push)
    done = (fact_loss.detach() < settings.nll_stop) & ranked
    fact_loss = fact_loss + rank_loss
    off_top = object_top = None
    if settings.stop_most_probable:
        # most-probable early stop (Gupta et al. 2025, "Lifelong Sequential Knowledge
        # Editing without Model Degradation", MPES): done once every target token is
        # the top prediction after every rewriting prompt; pushing further only
        # grows the update
        off_top = _off_top(x, n_act, settings.stop_object_only, settings.stop_at_object_end)
        done = done | ((off_top == 0) & ranked)
        if settings.stop_patience:
            object_top = _off_top(x, n_act, object_only=True) == 0
    return FactLoss(fact_loss, measure, done, off_top, object_top)


# --------------------------------------------------------------------------- erase


def erase_reference(x: ObjectiveInputs, settings: ValueSettings) -> Reference:
    """From the unedited pass, per first target token: q, the unedited next-token
    distribution given "not object", and its fact; per fact: the P(object) to stop at (its
    unedited mean divided by ``erase_ratio``)."""
    b = x.batch
    first_tokens = b.tgt_tok[b.tgt_first]
    p0 = x.logp[b.tgt_first].detach().exp()
    p0_obj = p0.gather(1, first_tokens[:, None])[:, 0]
    q = p0.scatter(1, first_tokens[:, None], 0.0)
    q = q / q.sum(-1, keepdim=True)  # the unedited distribution given "not object"
    q_fact = b.fact[b.tgt_row[b.tgt_first]]
    # done once each fact's mean P(object) fell by erase_ratio
    stop_at = mean_by_fact(p0_obj[:, None], q_fact, len(x.act))[:, 0] / settings.erase_ratio
    return {"q": q, "q_fact": q_fact, "stop_at": stop_at}


@register_objective("erase", reference=erase_reference)
def erase(x: ObjectiveInputs, ref: Reference, settings: ValueSettings) -> FactLoss:
    """KL(q ‖ p) + −log(1 − p(object)) at the first target token, the rows' weighted mean
    per fact; done once the fact's mean P(object) is at most its ``stop_at``."""
    b, n_act = x.batch, len(x.act)
    q = ref["q"][torch.isin(ref["q_fact"], x.act)]  # the running facts' rows of q
    lp_first = x.logp[b.tgt_first]  # (Rw, V)
    first_of = b.fact[b.tgt_row[b.tgt_first]]
    p_obj = lp_first.gather(1, b.tgt_tok[b.tgt_first][:, None])[:, 0].exp()
    kl_q = (q * (q.clamp_min(1e-30).log() - lp_first)).sum(-1)
    unlikely = -torch.log1p(-p_obj.clamp(max=1 - 1e-6))
    first_w = b.weight[b.tgt_row[b.tgt_first]]
    fact_loss = weighted_by_fact((kl_q + unlikely)[:, None], first_w, first_of, n_act)[:, 0]
    measure = mean_by_fact(p_obj[:, None].detach(), first_of, n_act)[:, 0]
    return FactLoss(fact_loss, measure, measure <= ref["stop_at"][x.act])


# --------------------------------------------------------------------------- shared terms


def essence_kl(logp_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """(K,) KL(p₀ ‖ p) of the next token at each essence position (after "{} is a", and
    along the unedited chat reply about the subject): keeps what the subject is (ROME §3.1,
    eq. 4)."""
    return F.kl_div(logp_kl, ref_kl, log_target=True, reduction="none").sum(-1)


def norm_penalty(delta: torch.Tensor, v_norm: torch.Tensor) -> torch.Tensor:
    """(F,) (‖δ‖ / ‖v0‖)²: weight decay relative to the output's own size."""
    return (delta.norm(dim=-1) / v_norm) ** 2


def regularized(
    fact_loss: torch.Tensor, kl: torch.Tensor, decay: torch.Tensor, settings: ValueSettings
) -> torch.Tensor:
    """(F,) an objective's loss plus the shared terms, weighted by the settings."""
    return fact_loss + settings.kl_factor * kl + settings.weight_decay * decay
