"""The shared algebra of locate-then-edit methods (ROME, MEMIT, AlphaEdit).

The MLP output projection W (out × in) is read as a linear key-value memory: the key k is
its input at the subject's last token, the value v = W k its output (Meng et al. 2022,
"Locating and Editing Factual Associations in GPT", §3). An edit needs, per fact,

* ``k*``: the key, averaged over the fact's prompt behind several short random prefixes so
  that it does not depend on the exact wording before the subject (ROME §3.1, eq. 3);
* ``δ``: the change of the layer output at that position that makes the model say the new
  target, found by gradient descent on the output (ROME §3.1, eq. 4), under a KL term that
  keeps the subject's other properties and a norm bound;

and then a weight update that maps k* to v + δ. This file computes k* and δ for a batch of
facts at once (one forward/backward per step for all facts); the method files only differ
in how they turn (k*, δ) into weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edit.facts import Fact
from edit.hooks import Trace
from edit.lm import (
    device_of,
    encode,
    encode_continuation,
    logits_at,
    pad_id,
    right_pad,
    subject_last_index,
)
from edit.models import cache_dir

log = logging.getLogger(__name__)

ESSENCE_PROMPT = "{} is a"  # ROME's KL prompt: what the subject is, kept while editing
_PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


# --------------------------------------------------------------------------- prefixes


def context_templates(
    model: nn.Module, tok, spec: tuple[tuple[int, int], ...], seed: int = 0
) -> list[str]:
    """``["{}"]`` plus sampled short texts ``"<text>. {}"`` to put before a prompt.

    ``spec`` holds (length in tokens, count) pairs; ROME uses ((5, 10), (10, 10)). The texts
    are sampled from the model itself (top-5, fixed seed) and cached on disk per model.
    """
    key = json.dumps([getattr(model, "edit_hash", None), [list(s) for s in spec], seed])
    path = cache_dir() / "prefixes" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if getattr(model, "edit_hash", None) and path.is_file():
        return json.loads(path.read_text())
    device = device_of(model)
    templates = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length, count in spec:
            for i in range(count):
                ids = torch.tensor(
                    [encode(tok, _PREFIX_SEEDS[i % len(_PREFIX_SEEDS)])], device=device
                )
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=length,
                    do_sample=True,
                    top_k=5,
                    pad_token_id=pad_id(tok),
                )
                text = tok.decode(out[0], skip_special_tokens=True)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                templates.append(f"{text}. {{}}")
    if getattr(model, "edit_hash", None):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(templates, f)
        os.replace(tmp, path)
    return templates


# --------------------------------------------------------------------------- keys and values


@dataclass
class _Batch:
    """Every row the value optimization runs, for all facts at once."""

    ids: torch.Tensor  # (R, T)
    mask: torch.Tensor  # (R, T)
    fact: torch.Tensor  # (R,) which fact a row belongs to
    lookup: torch.Tensor  # (R,) position of the subject's last token
    rewrite: torch.Tensor  # (R,) bool: a rewriting row (else an essence/KL row)
    tgt_row: torch.Tensor  # (P,) row of each supervised target position
    tgt_col: torch.Tensor  # (P,) position whose next-token logits predict the target token
    tgt_tok: torch.Tensor  # (P,) the target token
    tgt_first: torch.Tensor  # (P,) bool: the first token of the target
    kl_row: torch.Tensor  # (F,) the essence row of each fact
    kl_col: torch.Tensor  # (F,)


def _build_batch(tok, facts: list[Fact], templates: list[str], device) -> _Batch:
    seqs, fact_of, lookup, rewrite = [], [], [], []
    t_row, t_col, t_tok, t_first = [], [], [], []
    for f, fact in enumerate(facts):
        target_ids = encode_continuation(tok, fact.target)
        for template in templates:
            text, idx = subject_last_index(tok, template.format(fact.prompt), fact.subject)
            prompt_ids = encode(tok, text)
            r = len(seqs)
            seqs.append(prompt_ids + target_ids[:-1])
            fact_of.append(f)
            lookup.append(idx)
            rewrite.append(True)
            for j, t in enumerate(target_ids):
                t_row.append(r)
                t_col.append(len(prompt_ids) - 1 + j)
                t_tok.append(t)
                t_first.append(j == 0)
    kl_row, kl_col = [], []
    for f, fact in enumerate(facts):
        text, idx = subject_last_index(tok, ESSENCE_PROMPT, fact.subject)
        ids = encode(tok, text)
        kl_row.append(len(seqs))
        kl_col.append(len(ids) - 1)
        seqs.append(ids)
        fact_of.append(f)
        lookup.append(idx)
        rewrite.append(False)
    ids, mask = right_pad(seqs, pad_id(tok), device)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return _Batch(
        ids,
        mask,
        t(fact_of),
        t(lookup),
        t(rewrite, torch.bool),
        t(t_row),
        t(t_col),
        t(t_tok),
        t(t_first, torch.bool),
        t(kl_row),
        t(kl_col),
    )


@dataclass
class ValueSolution:
    keys: torch.Tensor  # (F, d_in) k*: mean key over the rewriting prompts
    values: torch.Tensor  # (F, d_out) v0 = W k* (+ bias): the layer's output before the edit
    deltas: torch.Tensor  # (F, d_out) δ: the optimized change of the output
    steps: int
    loss_start: float
    loss_end: float
    target_prob: list[float]  # per fact, mean P(target) (insert) or P(object) (erase) at the end


@dataclass(frozen=True)
class ValueSettings:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm: float
    nll_stop: float
    erase_ratio: float


def solve_values(
    model: nn.Module,
    tok,
    module: str,
    facts: list[Fact],
    templates: list[str],
    settings: ValueSettings,
    objective: str = "insert",
    progress: bool = True,
) -> ValueSolution:
    """Keys k* and output changes δ for a batch of facts at the output of ``module``.

    ``objective="insert"`` makes ``fact.target`` likely after the prompts (mean token NLL).
    ``objective="erase"`` makes ``fact.target`` unlikely without naming a replacement: the
    next-token distribution at the end of each prompt is pulled toward the unedited one
    conditioned on *not* starting the object, q(x) ∝ p₀(x)·[x ≠ object], by KL(q ‖ p), plus
    the unlikelihood term −log(1 − p(object)) (Welleck et al. 2020) that drives its
    probability down. Both objectives share the essence KL and the norm bound.
    """
    if objective not in ("insert", "erase"):
        raise ValueError(f"objective must be 'insert' or 'erase', not {objective!r}")
    device = device_of(model)
    b = _build_batch(tok, facts, templates, device)
    n_facts = len(facts)
    first_rows = b.tgt_row[b.tgt_first]
    rows = torch.cat([b.tgt_row, b.kl_row])
    cols = torch.cat([b.tgt_col, b.kl_col])
    n_tgt = len(b.tgt_row)

    # Pass 0, unedited: the keys, the outputs v0, and the reference distributions.
    with torch.no_grad(), Trace(model, module, retain_input=True, retain_output=True) as tr:
        logits0 = logits_at(model, b.ids, b.mask, rows, cols)
    sel = torch.arange(len(b.ids), device=device)
    flat = sel * b.ids.shape[1] + b.lookup  # positions in (R·T): some blocks (OPT) flatten
    k_rows = tr.input.flatten(0, -2)[flat].float()  # (R, d_in)
    v_rows = tr.output.flatten(0, -2)[flat].float()  # (R, d_out)
    keys = _mean_by_fact(k_rows[b.rewrite], b.fact[b.rewrite], n_facts)
    values = _mean_by_fact(v_rows[b.rewrite], b.fact[b.rewrite], n_facts)
    kl_ref = torch.log_softmax(logits0[n_tgt:], -1)  # (F, V)
    first_tokens = b.tgt_tok[b.tgt_first]
    if objective == "erase":
        p0 = torch.softmax(logits0[:n_tgt][b.tgt_first], -1)
        p0_obj = p0.gather(1, first_tokens[:, None])[:, 0]
        q = p0.scatter(1, first_tokens[:, None], 0.0)
        q = q / q.sum(-1, keepdim=True)  # the unedited distribution, conditioned on "not object"
        fact_of_first = b.fact[first_rows]
        # done once each fact's mean P(object) fell by erase_ratio
        stop_at = (
            _mean_by_fact(p0_obj[:, None], fact_of_first, n_facts)[:, 0] / settings.erase_ratio
        )

    delta = torch.zeros_like(values, requires_grad=True)  # (F, d_out)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    v_norm = values.norm(dim=-1)  # (F,)
    row_fact = b.fact

    def inject(out: torch.Tensor) -> torch.Tensor:
        add = delta[row_fact].to(out.dtype)
        edited = torch.index_put(out.flatten(0, -2), (flat,), add, accumulate=True)
        return edited.view(out.shape)

    losses = []
    bar = tqdm(range(settings.steps), desc="optimizing value", leave=False, disable=not progress)
    for _ in bar:
        with Trace(model, module, edit_output=inject, detach=False):
            logits = logits_at(model, b.ids, b.mask, rows, cols)
        logp = torch.log_softmax(logits, -1)
        tok_lp = logp[:n_tgt].gather(1, b.tgt_tok[:, None])[:, 0]  # (P,)
        if objective == "insert":
            # mean token NLL per row, then mean of rows per fact (ROME's loss)
            row_nll = _mean_by_group(-tok_lp, b.tgt_row, len(b.ids))
            fact_loss = _mean_by_fact(row_nll[b.rewrite][:, None], b.fact[b.rewrite], n_facts)[:, 0]
            progress_measure = torch.exp(-fact_loss)
            done = bool((fact_loss < settings.nll_stop).all())
        else:
            lp_first = logp[:n_tgt][b.tgt_first]  # (Rw, V)
            p_obj = lp_first.gather(1, first_tokens[:, None])[:, 0].exp()
            kl_q = (q * (q.clamp_min(1e-30).log() - lp_first)).sum(-1)
            unlikely = -torch.log1p(-p_obj.clamp(max=1 - 1e-6))
            row_loss = kl_q + unlikely
            fact_loss = _mean_by_fact(row_loss[:, None], fact_of_first, n_facts)[:, 0]
            progress_measure = _mean_by_fact(p_obj[:, None].detach(), fact_of_first, n_facts)[:, 0]
            done = bool((progress_measure <= stop_at).all())
        kl = F.kl_div(logp[n_tgt:], kl_ref, log_target=True, reduction="none").sum(-1)  # (F,)
        decay = (delta.norm(dim=-1) / v_norm) ** 2
        loss = (fact_loss + settings.kl_factor * kl + settings.weight_decay * decay).sum()
        losses.append(float(fact_loss.detach().mean()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if done:
            break
        # gradient for δ only: the model's parameters get no .grad, whatever their flags
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
        with torch.no_grad():  # keep ‖δ‖ ≤ clamp · ‖v0‖ (ROME's norm constraint)
            limit = settings.clamp_norm * v_norm
            scale = (limit / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
    bar.close()
    return ValueSolution(
        keys=keys,
        values=values,
        deltas=delta.detach(),
        steps=len(losses),
        loss_start=losses[0],
        loss_end=losses[-1],
        target_prob=[float(x) for x in progress_measure.detach()],
    )


def _mean_by_group(x: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of a 1-D ``x`` per group index (groups with no members give 0)."""
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, torch.ones_like(x))
    return total / count.clamp_min(1)


def _mean_by_fact(x: torch.Tensor, fact: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (R, d) per fact → (n, d)."""
    total = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device).index_add(0, fact, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(
        0, fact, torch.ones(len(fact), dtype=x.dtype, device=x.device)
    )
    return total / count.clamp_min(1)[:, None]


# --------------------------------------------------------------------------- weight algebra


def whitened_direction(second_moment: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """C⁻¹ k in float64 on the key's device (C: (d, d) second moment, k: (d,)), with a tiny
    ridge for safety."""
    c = second_moment.to(device=key.device, dtype=torch.float64)
    ridge = 1e-6 * c.diagonal().mean()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve(c + ridge * eye, key.double())
