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

import copy
import dataclasses
import hashlib
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edit.atomic import write_json
from edit.cache import cache_dir
from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.hooks import StopForward, Trace
from edit.lm import (
    cache_kwarg,
    device_of,
    eager_attention_on_cpu,
    empty_cache,
    encode,
    logits_at,
    pad_id,
    prefix_cache,
    right_pad,
    subject_last_index,
)
from edit.methods.contexts import Contexts, check_forms
from edit.update import Update

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
        write_json(path, templates)
    return templates


# --------------------------------------------------------------------------- keys and values


@dataclass
class _Batch:
    """Every row the value optimization runs, for all facts at once, split at each row's
    subject's last token (its lookup position, where δ is added).

    The tokens before the lookup never change with δ (the model is causal), so they run once,
    without gradients, into a key/value cache (``prefix_*``, left-padded so that every row's
    lookup is the first token of ``ids``); each optimization step runs only ``ids``, the
    tokens from the lookup on, and backpropagates through them alone.
    """

    ids: torch.Tensor  # (R, S) each row from its lookup token on, right-padded
    mask: torch.Tensor  # (R, P + S) attention mask over prefix and suffix
    pos: torch.Tensor  # (R, S) position ids of ``ids``
    prefix_ids: torch.Tensor | None  # (R, P) the tokens before the lookup, left-padded
    prefix_mask: torch.Tensor | None  # (R, P)
    prefix_pos: torch.Tensor | None  # (R, P)
    fact: torch.Tensor  # (R,) which fact a row belongs to
    rewrite: torch.Tensor  # (R,) bool: a rewriting row (else an essence/KL row)
    weight: torch.Tensor  # (R,) share of its fact's loss and key (0 for essence rows)
    tgt_row: torch.Tensor  # (T,) row of each supervised target position
    tgt_col: torch.Tensor  # (T,) column of ``ids`` whose next-token logits predict it
    tgt_tok: torch.Tensor  # (T,) the target token
    tgt_first: torch.Tensor  # (T,) bool: the first token of the target
    kl_row: torch.Tensor  # (F,) the essence row of each fact
    kl_col: torch.Tensor  # (F,)

    def prefix_cache(self, model: nn.Module):
        """The key/value cache of the prefixes (None when every lookup is at position 0)."""
        if self.prefix_ids is None:
            return None
        return prefix_cache(model, self.prefix_ids, self.prefix_mask, self.prefix_pos)

    def keep(self, facts: torch.Tensor, cache) -> tuple[_Batch, object]:
        """The rows of the facts flagged in ``facts`` (bool, one per fact of this batch),
        renumbered in order, and ``cache`` cut to those rows (no prefix is run again)."""
        rows = facts[self.fact]  # (R,) bool
        new_row = torch.cumsum(rows, 0) - 1  # row index in the kept batch
        new_fact = torch.cumsum(facts, 0) - 1
        tgt = rows[self.tgt_row]
        kept_rows = rows.nonzero()[:, 0]
        if cache is not None:
            cache.batch_select_indices(kept_rows)

        def sub(x):
            return None if x is None else x[kept_rows]

        batch = dataclasses.replace(
            self,
            ids=self.ids[kept_rows],
            mask=self.mask[kept_rows],
            pos=self.pos[kept_rows],
            prefix_ids=sub(self.prefix_ids),
            prefix_mask=sub(self.prefix_mask),
            prefix_pos=sub(self.prefix_pos),
            fact=new_fact[self.fact[kept_rows]],
            rewrite=self.rewrite[kept_rows],
            weight=self.weight[kept_rows],
            tgt_row=new_row[self.tgt_row[tgt]],
            tgt_col=self.tgt_col[tgt],
            tgt_tok=self.tgt_tok[tgt],
            tgt_first=self.tgt_first[tgt],
            kl_row=new_row[self.kl_row[facts]],
            kl_col=self.kl_col[facts],
        )
        return batch, cache


def _build_batch(tok, facts: list[Fact], templates, device) -> _Batch:
    """The rows of ``templates`` (a :class:`Contexts`, or cloze templates alone) for every
    fact, then one essence (KL) row per fact."""
    contexts = Contexts.of(templates)
    seqs, fact_of, lookup, rewrite, weight = [], [], [], [], []
    t_row, t_col, t_tok, t_first = [], [], [], []
    for f, fact in enumerate(facts):
        for row in contexts.rows(tok, fact):
            r = len(seqs)
            seqs.append(row.ids + row.target[:-1])
            fact_of.append(f)
            lookup.append(row.lookup)
            rewrite.append(True)
            weight.append(row.weight)
            for j, t in enumerate(row.target):
                t_row.append(r)
                t_col.append(len(row.ids) - 1 + j - row.lookup)
                t_tok.append(t)
                t_first.append(j == 0)
    kl_row, kl_col = [], []
    for f, fact in enumerate(facts):
        text, idx = subject_last_index(tok, ESSENCE_PROMPT, fact.subject)
        ids = encode(tok, text)
        kl_row.append(len(seqs))
        kl_col.append(len(ids) - 1 - idx)
        seqs.append(ids)
        fact_of.append(f)
        lookup.append(idx)
        rewrite.append(False)
        weight.append(0.0)

    pad, width = pad_id(tok), max(lookup)
    prefix = [[pad] * (width - i) + seq[:i] for seq, i in zip(seqs, lookup, strict=True)]
    p_mask = [[0] * (width - i) + [1] * i for i in lookup]
    p_pos = [[0] * (width - i) + list(range(i)) for i in lookup]
    ids, s_mask = right_pad([seq[i:] for seq, i in zip(seqs, lookup, strict=True)], pad, device)
    steps = torch.arange(ids.shape[1], device=device)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    with_prefix = width > 0
    return _Batch(
        ids=ids,
        mask=torch.cat([t(p_mask), s_mask], 1) if with_prefix else s_mask,
        pos=t(lookup)[:, None] + steps,
        prefix_ids=t(prefix) if with_prefix else None,
        prefix_mask=t(p_mask) if with_prefix else None,
        prefix_pos=t(p_pos) if with_prefix else None,
        fact=t(fact_of),
        rewrite=t(rewrite, torch.bool),
        weight=t(weight, torch.float32),
        tgt_row=t(t_row),
        tgt_col=t(t_col),
        tgt_tok=t(t_tok),
        tgt_first=t(t_first, torch.bool),
        kl_row=t(kl_row),
        kl_col=t(kl_col),
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
    stop_most_probable: bool = False
    value_dtype: str = "auto"

    @classmethod
    def of(cls, config) -> ValueSettings:
        """The value-optimization fields of a method config (same names)."""
        return cls(*(getattr(config, f.name) for f in dataclasses.fields(cls)))


def check_value_config(config) -> None:
    """One-line errors for the fields every locate-then-edit config shares (ROME, MEMIT,
    AlphaEdit): the value optimization's settings, the statistics size, the context
    templates, the retry rounds."""
    for name in ("steps", "stats_tokens"):
        if getattr(config, name) < 1:
            raise InvalidRequest(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.retry_rounds < 0:
        raise InvalidRequest(f"retry_rounds must be >= 0, got {config.retry_rounds}")
    for name in ("lr", "clamp_norm", "nll_stop"):
        if not getattr(config, name) > 0:
            raise InvalidRequest(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("kl_factor", "weight_decay"):
        if getattr(config, name) < 0:
            raise InvalidRequest(f"{name} must be >= 0, got {getattr(config, name)}")
    if not isinstance(config.stop_most_probable, bool):
        raise InvalidRequest(
            f"stop_most_probable must be true or false, got {config.stop_most_probable!r}"
        )
    if config.value_dtype not in VALUE_DTYPES:
        raise InvalidRequest(
            f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {config.value_dtype!r}"
        )
    check_forms(config)
    if config.erase_ratio <= 1:
        raise InvalidRequest(f"erase_ratio must be > 1, got {config.erase_ratio}")
    if any(len(s) != 2 or s[0] < 1 or s[1] < 0 for s in config.context_templates):
        raise InvalidRequest(
            f"context_templates must be (length, count) pairs, got {config.context_templates}"
        )


MAX_ROWS = 256  # prompt rows per forward/backward pass: bounds memory for large batches
VALUE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX): there
    a bfloat16 matrix product runs several times faster than a float32 one."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)()) for f in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))  # fmt: skip


def value_autocast(model: nn.Module, value_dtype: str):
    """The autocast context the value optimization runs in: ``bfloat16`` runs the model's
    matrix products in bfloat16 (δ, the loss and Adam stay float32); ``auto`` does so for a
    float32 model on a CPU with native bfloat16 products, else runs the model as it is."""
    device = device_of(model)
    if value_dtype == "float32" or next(model.parameters()).dtype != torch.float32:
        return nullcontext()
    if value_dtype == "auto" and not (device.type == "cpu" and native_bf16_cpu()):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def solve_values(
    model: nn.Module,
    tok,
    module: str,
    facts: list[Fact],
    templates: list[str],
    settings: ValueSettings,
    objective: str = "insert",
    progress: bool = True,
    max_rows: int = MAX_ROWS,
) -> ValueSolution:
    """Keys k* and output changes δ for a batch of facts at the output of ``module``.

    Facts are independent (each has its own δ and its own loss terms), so a large batch is
    solved in chunks of about ``max_rows`` prompt rows, each chunk in one forward/backward
    per step and stopped as soon as all of its facts are done. Facts of similar length share
    a chunk (less padding); the results are in the order of ``facts``.
    """
    if objective not in ("insert", "erase"):
        raise ValueError(f"objective must be 'insert' or 'erase', not {objective!r}")
    precision = value_autocast(model, settings.value_dtype)
    with precision:
        sol = _solve_values(model, tok, module, facts, templates, settings, objective, progress,
                            max_rows)  # fmt: skip
    if isinstance(precision, nullcontext):
        return sol
    # the keys and v0 that the update is built from come from the model at its own precision
    keys, values = keys_and_hidden(model, tok, facts, templates, module, module, max_rows)
    return dataclasses.replace(sol, keys=keys, values=values)


def _solve_values(model, tok, module, facts, templates, settings, objective, progress, max_rows):
    rows_per_fact = len(Contexts.of(templates).rows(tok, facts[0])) + 1  # + the essence row
    per_chunk = max(1, max_rows // rows_per_fact)
    with _frozen(model), eager_attention_on_cpu(model):
        if len(facts) <= per_chunk:
            return _solve_chunk(model, tok, module, facts, templates, settings, objective, progress)
        order = sorted(range(len(facts)), key=lambda i: len(tok(facts[i].statement).input_ids))
        parts = []
        bar = tqdm(
            total=len(facts),
            desc="optimizing values",
            unit="fact",
            disable=None if progress else True,
        )
        for start in range(0, len(facts), per_chunk):
            chunk = [facts[i] for i in order[start : start + per_chunk]]
            parts.append(
                _solve_chunk(model, tok, module, chunk, templates, settings, objective, False)
            )
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{parts[-1].loss_end:.3f}", steps=parts[-1].steps)
        bar.close()
    back = torch.argsort(torch.tensor(order))  # position in the sorted order of each fact

    def gather(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])[back.to(parts[0].keys.device)]

    weights = [len(p.target_prob) / len(facts) for p in parts]
    probs = [x for p in parts for x in p.target_prob]
    return ValueSolution(
        keys=gather("keys"),
        values=gather("values"),
        deltas=gather("deltas"),
        steps=max(p.steps for p in parts),
        loss_start=sum(w * p.loss_start for w, p in zip(weights, parts, strict=True)),
        loss_end=sum(w * p.loss_end for w, p in zip(weights, parts, strict=True)),
        target_prob=[probs[int(i)] for i in back],
    )


@contextmanager
def _frozen(model: nn.Module):
    """No gradients for the model's parameters while inside: only δ is optimized, and the
    forward pass records nothing before the edited layer."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _solve_chunk(
    model: nn.Module,
    tok,
    module: str,
    facts: list[Fact],
    templates: list[str],
    settings: ValueSettings,
    objective: str,
    progress: bool,
) -> ValueSolution:
    """Keys k* and output changes δ for a batch of facts at the output of ``module``.

    ``objective="insert"`` makes ``fact.target`` likely after the prompts (mean token NLL).
    ``objective="erase"`` makes ``fact.target`` unlikely without naming a replacement: the
    next-token distribution at the end of each prompt is pulled toward the unedited one
    conditioned on *not* starting the object, q(x) ∝ p₀(x)·[x ≠ object], by KL(q ‖ p), plus
    the unlikelihood term −log(1 − p(object)) (Welleck et al. 2020) that drives its
    probability down. Both objectives share the essence KL and the norm bound.
    """
    device = device_of(model)
    b = _build_batch(tok, facts, templates, device)
    n_facts = len(facts)
    first_rows = b.tgt_row[b.tgt_first]
    n_tgt = len(b.tgt_row)

    # δ starts at zero, so step 0's forward pass is the unedited one: it also yields the keys,
    # the outputs v0 and the reference distributions (no separate unedited pass).
    delta: torch.Tensor | None = None  # (F, d_out), created at step 0 from the output width
    opt = None
    final_loss = torch.zeros(n_facts, device=device)
    final_measure = torch.zeros(n_facts, device=device)
    # Each fact stops as ROME's single edit does, once its own target is reached; the facts
    # still running are re-batched without the finished ones' rows.
    act = torch.arange(n_facts, device=device)  # facts still being optimized, increasing
    cb, c_q = b, None
    prefix = cb.prefix_cache(model)

    losses = []
    bar = tqdm(
        range(settings.steps),
        desc="optimizing value",
        leave=False,
        disable=None if progress else True,
    )
    for step in bar:
        n_act, n_t = len(act), len(cb.tgt_row)
        c_flat = torch.arange(len(cb.ids), device=device) * cb.ids.shape[1]  # lookups: column 0
        row_fact = act[cb.fact]

        def inject(out: torch.Tensor, row_fact=row_fact, c_flat=c_flat) -> torch.Tensor:
            nonlocal delta
            if delta is None:  # on the input's device; the layer may live on another one
                delta = torch.zeros((n_facts, out.shape[-1]), device=device)
                delta.requires_grad_(True)
            add = delta[row_fact].to(device=out.device, dtype=out.dtype)
            at = (c_flat.to(out.device),)
            edited = torch.index_put(out.flatten(0, -2), at, add, accumulate=True)
            return edited.view(out.shape)

        first = step == 0
        with Trace(
            model, module, edit_output=inject, retain_input=first, retain_output=first
        ) as tr:
            logits = logits_at(
                model,
                cb.ids,
                cb.mask,
                torch.cat([cb.tgt_row, cb.kl_row]),
                torch.cat([cb.tgt_col, cb.kl_col]),
                position_ids=cb.pos,
                cache=None if prefix is None else copy.deepcopy(prefix),
            )
        logp = torch.log_softmax(logits, -1)
        if first:  # δ = 0 here: what this pass saw is the unedited model
            flat = torch.arange(len(b.ids), device=device) * b.ids.shape[1]
            # (R, d_in), (R, d_out); OPT blocks flatten; from the layer's device
            k_rows = tr.input.flatten(0, -2)[flat.to(tr.input.device)].float().to(device)
            v_rows = tr.output.flatten(0, -2)[flat.to(tr.output.device)].float().to(device)
            keys = _weighted_by_fact(k_rows, b.weight, b.fact, n_facts)
            values = _weighted_by_fact(v_rows, b.weight, b.fact, n_facts)
            v_norm = values.norm(dim=-1)  # (F,)
            kl_ref = logp[n_tgt:].detach()  # (F, V)
            opt = torch.optim.Adam([delta], lr=settings.lr)
            if objective == "erase":
                first_tokens = b.tgt_tok[b.tgt_first]
                p0 = logp[:n_tgt][b.tgt_first].detach().exp()
                p0_obj = p0.gather(1, first_tokens[:, None])[:, 0]
                q = p0.scatter(1, first_tokens[:, None], 0.0)
                q = q / q.sum(-1, keepdim=True)  # the unedited distribution given "not object"
                c_q = q
                fact_of_first = b.fact[first_rows]
                # done once each fact's mean P(object) fell by erase_ratio
                stop_at = (
                    _mean_by_fact(p0_obj[:, None], fact_of_first, n_facts)[:, 0]
                    / settings.erase_ratio
                )
        if objective == "insert":
            # mean token NLL per row, then the rows' weighted mean per fact (ROME's loss when
            # every row weighs the same)
            tok_lp = logp[:n_t].gather(1, cb.tgt_tok[:, None])[:, 0]  # (P,)
            row_nll = _mean_by_group(-tok_lp, cb.tgt_row, len(cb.ids))
            fact_loss = _weighted_by_fact(row_nll[:, None], cb.weight, cb.fact, n_act)[:, 0]
            measure = torch.exp(-fact_loss.detach())
            done = fact_loss.detach() < settings.nll_stop
            if settings.stop_most_probable:
                # most-probable early stop (Gupta et al. 2025, "Lifelong Sequential Knowledge
                # Editing without Model Degradation", MPES): done once every target token is
                # the top prediction after every rewriting prompt; pushing further only
                # grows the update
                top = logp[:n_t].detach().argmax(-1) == cb.tgt_tok  # (P,)
                row_top = _mean_by_group(top.float(), cb.tgt_row, len(cb.ids)) == 1
                fact_top = _mean_by_fact(row_top[cb.rewrite].float()[:, None],
                                         cb.fact[cb.rewrite], n_act)[:, 0] == 1  # fmt: skip
                done = done | fact_top
        else:
            lp_first = logp[:n_t][cb.tgt_first]  # (Rw, V)
            first_of = cb.fact[cb.tgt_row[cb.tgt_first]]
            p_obj = lp_first.gather(1, cb.tgt_tok[cb.tgt_first][:, None])[:, 0].exp()
            kl_q = (c_q * (c_q.clamp_min(1e-30).log() - lp_first)).sum(-1)
            unlikely = -torch.log1p(-p_obj.clamp(max=1 - 1e-6))
            first_w = cb.weight[cb.tgt_row[cb.tgt_first]]
            fact_loss = _weighted_by_fact((kl_q + unlikely)[:, None], first_w, first_of, n_act)
            fact_loss = fact_loss[:, 0]
            measure = _mean_by_fact(p_obj[:, None].detach(), first_of, n_act)[:, 0]
            done = measure <= stop_at[act]
        final_loss[act] = fact_loss.detach()
        final_measure[act] = measure
        losses.append(float(final_loss.mean()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", running=int((~done).sum()))
        if bool(done.all()):
            break
        kl = F.kl_div(logp[n_t:], kl_ref[act], log_target=True, reduction="none").sum(-1)
        decay = (delta[act].norm(dim=-1) / v_norm[act]) ** 2
        fact_total = fact_loss + settings.kl_factor * kl + settings.weight_decay * decay
        loss = fact_total[~done].sum()
        # gradient for δ only: the model's parameters get no .grad, whatever their flags
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        running = torch.zeros(n_facts, dtype=torch.bool, device=device)
        running[act[~done]] = True
        before = delta.detach().clone()
        opt.step()
        with torch.no_grad():  # keep ‖δ‖ ≤ clamp · ‖v0‖ (ROME's norm constraint)
            limit = settings.clamp_norm * v_norm
            scale = (limit / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
            delta[~running] = before[~running]  # finished facts keep their δ (Adam's momentum)
        if bool(done.any()):
            act = act[~done]
            cb, prefix = cb.keep(~done, prefix)
            if objective == "erase":
                c_q = q[torch.isin(fact_of_first, act)]
    bar.close()
    return ValueSolution(
        keys=keys,
        values=values,
        deltas=delta.detach(),
        steps=len(losses),
        loss_start=losses[0],
        loss_end=float(final_loss.mean()),
        target_prob=[float(x) for x in final_measure],
    )


def _mean_by_group(x: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of a 1-D ``x`` per group index (groups with no members give 0)."""
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, group, torch.ones_like(x))
    return total / count.clamp_min(1)


def _weighted_by_fact(x: torch.Tensor, w: torch.Tensor, fact: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the rows of ``x`` (R, d) weighted by ``w`` (R,) per fact → (n, d): a weighted
    mean where each fact's weights sum to 1."""
    total = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device)
    return total.index_add(0, fact, x * w.to(x.dtype)[:, None])


def _mean_by_fact(x: torch.Tensor, fact: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (R, d) per fact → (n, d)."""
    total = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device).index_add(0, fact, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(
        0, fact, torch.ones(len(fact), dtype=x.dtype, device=x.device)
    )
    return total / count.clamp_min(1)[:, None]


# --------------------------------------------------------------------------- weight algebra


def rank_one_direction(second_moment: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The row b (d,) of a rank-one update δbᵀ that maps each key exactly: bᵀk_j = 1 for
    every row k_j of ``keys`` (n, d), with the least bᵀCb (the smallest change on generic
    keys) among those that do. One key gives ROME's b = C⁻¹k/(kᵀC⁻¹k); keys that are
    almost parallel are met in the least-squares sense (a pseudo-inverse of their
    C⁻¹-Gram matrix), so a second key adds nothing where it adds no direction."""
    c = second_moment.to(device=keys.device, dtype=torch.float64)
    k = keys.double().T  # (d, n)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    ci_k = torch.linalg.solve(c + 1e-6 * c.diagonal().mean() * eye, k)
    gram = k.T @ ci_k
    ones = torch.ones(k.shape[1], dtype=c.dtype, device=c.device)
    return (ci_k @ (torch.linalg.pinv(gram, rtol=1e-6, hermitian=True) @ ones)).float()


def _shared_length(rows: list[list[int]]) -> int:
    """Length of the longest token prefix common to all rows, leaving each row ≥ 1 token."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


@torch.no_grad()
def keys_and_hidden(
    model: nn.Module,
    tok,
    facts: list[Fact],
    templates,
    module: str,
    block: str,
    max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact, the weighted mean over its rewriting rows (``templates``: a
    :class:`Contexts`, or cloze templates alone) of (the input of ``module``, the output of
    the transformer block ``block``) at the subject's last token: (F, d_in), (F, d).

    The rows are run group by group (one context template, or one asked form): the tokens
    that all rows of a group share (the start token and the sampled prefix text, or the chat
    template's opening) run once into a key/value cache, and each row continues it only up to
    its lookup token and only up to ``block`` (``module`` must lie in or before it;
    ``block == module`` gives the keys and the module's own output): nothing later can
    change either. No gradients."""
    device = device_of(model)
    pad = pad_id(tok)
    contexts = Contexts.of(templates)
    groups: dict[tuple, list] = {}  # group -> [(fact, row up to its lookup, weight)]
    for f, fact in enumerate(facts):
        for row in contexts.rows(tok, fact):
            groups.setdefault(row.group, []).append((f, row.ids[: row.lookup + 1], row.weight))
    keys = hidden = None
    captured: dict[str, torch.Tensor] = {}

    def grab(_m, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise StopForward  # the rest of the model cannot change k or h

    # the key hook first: on the same module it must see the input before the stop
    tr = Trace(model, module, retain_input=True)
    handle = model.get_submodule(block).register_forward_hook(grab)
    try:
        for members in groups.values():
            rows = [m[1] for m in members]
            fact_of = torch.tensor([m[0] for m in members], device=device)
            weight = torch.tensor([m[2] for m in members], device=device)
            shared = _shared_length(rows)
            head = None
            if shared:  # the shared tokens, run once up to ``block`` into a cache
                head = empty_cache(model)
                _run_to_lookup(model, [rows[0][:shared]], 0, head, pad, device)
            for start in range(0, len(rows), max_rows):
                chunk = rows[start : start + max_rows]
                cache = None
                if head is not None:  # one copy of the shared tokens' cache per row
                    cache = copy.deepcopy(head)
                    cache.batch_repeat_interleave(len(chunk))
                captured.clear()
                at = _run_to_lookup(model, chunk, shared, cache, pad, device)
                if "h" not in captured:
                    raise RuntimeError(f"{block} did not run in the forward pass")
                x, y = tr.input, captured["h"]  # on the devices their layers live on
                k = x.reshape(-1, x.shape[-1])[at.to(x.device)].float().to(device)
                h = y.reshape(-1, y.shape[-1])[at.to(y.device)].float().to(device)
                if keys is None:
                    keys = torch.zeros((len(facts), k.shape[1]), device=device)
                    hidden = torch.zeros((len(facts), h.shape[1]), device=device)
                w = weight[start : start + len(chunk), None]
                keys.index_add_(0, fact_of[start : start + len(chunk)], k * w)
                hidden.index_add_(0, fact_of[start : start + len(chunk)], h * w)
    finally:
        handle.remove()
        tr.close()
    return keys, hidden


def _run_to_lookup(model, rows, shared, cache, pad, device) -> torch.Tensor:
    """Run rows on from their first ``shared`` tokens, which ``cache`` holds (one row each),
    right-padded (the real tokens stay next to the cache, as sliding-window attention needs),
    until the stop hook; the rows' own tokens are added to ``cache`` (None: no cache).
    Returns the flat index of each row's last token, its lookup."""
    ids, own = right_pad([r[shared:] for r in rows], pad, device)
    pos = shared + torch.arange(ids.shape[1], device=device).expand_as(ids)
    mask = torch.cat([torch.ones((len(rows), shared), dtype=own.dtype, device=device), own], 1)
    extra = {"use_cache": False} if cache is None else {cache_kwarg(model): cache,
                                                         "use_cache": True}  # fmt: skip
    try:
        model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
    except StopForward:
        pass
    return torch.arange(len(rows), device=device) * ids.shape[1] + own.sum(1) - 1


def spread_over_layers(
    model: nn.Module,
    tok,
    facts: list[Fact],
    templates: list[str],
    modules: list[str],
    last_block: str,
    deltas: torch.Tensor,
    solve_layer,
) -> tuple[Update, list[dict]]:
    """MEMIT's update of several layers (Meng et al. 2023, "Mass-Editing Memory in a
    Transformer", Alg. 1).

    The target of fact i is z_i = h_i + δ_i, with h_i the output of ``last_block`` (the
    residual stream after the last edited layer) before the edit. Layer by layer, from the
    first: read the keys K (F, d_in) at the layer and the residual stream h' as the model is
    now (earlier layers already changed), take the residual R = (z − h') / (layers left),
    and write ΔW = A B = ``solve_layer(module, K, R)`` into the layer. Each layer so takes an
    equal share of what is still missing. The model is unchanged at the end.
    """
    keys, h0 = keys_and_hidden(model, tok, facts, templates, modules[0], last_block)
    target = h0 + deltas.float()
    update = Update()
    steps: list[dict] = []
    applied = []
    try:
        for i, module in enumerate(modules):
            if i == 0:  # nothing changed yet: the first layer's keys and h0 from above
                h = h0
            else:
                keys, h = keys_and_hidden(model, tok, facts, templates, module, last_block)
            missing = target - h
            resid = missing / (len(modules) - i)
            a, b = solve_layer(module, keys, resid)
            part = Update({module: (a, b)}, {module: keys})
            applied.append(part.apply(model))
            update.factors[module] = (a, b)
            update.keys[module] = keys
            steps.append(
                {
                    "module": module,
                    "missing_norm": float(missing.norm(dim=-1).mean()),
                    "update_norm": float(part.delta(module).norm()),
                }
            )
    finally:
        for handle in reversed(applied):
            handle.undo()
    return update, steps


def memit_factors(
    second_moment: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, cov_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's least-squares update ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (Meng et al. 2023, eq. 14) as
    factors A = R (d_out, n), B = ((λC + KᵀK)⁻¹ K)ᵀ (n, d_in), solved in float64.

    ``keys`` (n, d_in), ``resid`` (n, d_out); C the keys' second moment over generic text
    and λ (``cov_weight``) how many generic keys' worth of preservation it stands for.
    """
    k = keys.to(torch.float64)
    c = second_moment.to(device=k.device, dtype=torch.float64)
    m = cov_weight * c + k.T @ k
    b = torch.linalg.solve(m, k.T).T  # m is symmetric
    return resid.T.float().clone(memory_format=torch.contiguous_format), b.float().contiguous()


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors of C whose eigenvalues are below ``threshold`` times
    their mean: keys that generic text uses (C's large directions) are mapped to ~0
    (AlphaEdit, Fang et al. 2025, eq. 7), in float32 on C's device.

    The paper's threshold is absolute (2e-2); relative to the mean eigenvalue it carries
    over between models whose keys differ in scale by orders of magnitude.
    """
    c = second_moment.to(torch.float64)
    values, vectors = torch.linalg.eigh(c)
    u = vectors[:, values < threshold * values.mean()]
    return (u @ u.T).float()


def alphaedit_factors(
    projector: torch.Tensor,
    keys: torch.Tensor,
    resid: torch.Tensor,
    previous: torch.Tensor | None,
    l2: float,
    second_moment: torch.Tensor | None = None,
    cov_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update (Fang et al. 2025, eq. 16): ΔWᵀ = (P(K_p K_pᵀ + K Kᵀ) + αI)⁻¹ P K Rᵀ,
    with P the null-space projector, K_p the keys of earlier edits (``previous``, (m, d_in),
    or None) and α = ``l2``. Returned as factors A = R (d_out, n), B (n, d_in), solved in
    float64. For any key k0 with P k0 = 0 (the preserved knowledge), ΔW k0 = 0.

    With ``cov_weight`` λ > 0 the generic keys' second moment C joins the earlier edits' keys,
    (P(K_p K_pᵀ + K Kᵀ + λC) + αI)⁻¹: it penalizes λ‖ΔP k0‖² for the generic keys that P
    lets through (where C has no exact null space, P keeps directions generic text uses).
    λ = 0 is the paper's update.
    """
    k = keys.to(torch.float64)
    p = projector.to(device=k.device, dtype=torch.float64)
    gram = k.T @ k
    if previous is not None and len(previous):
        kp = previous.to(device=k.device, dtype=torch.float64)
        gram = gram + kp.T @ kp
    if cov_weight > 0:
        if second_moment is None:
            raise ValueError("cov_weight > 0 needs the keys' second moment")
        gram = gram + cov_weight * second_moment.to(device=k.device, dtype=torch.float64)
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=k.device)
    x = torch.linalg.solve(p @ gram + l2 * eye, p @ k.T)  # (d_in, n)
    return resid.T.float().clone(memory_format=torch.contiguous_format), x.T.float().contiguous()
