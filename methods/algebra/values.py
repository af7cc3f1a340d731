"""The value optimization: per fact, the key k* and the change δ of a module's output at the
subject's last token that makes the model say the new target (or stop saying the old one).

δ is found by gradient descent on the output (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", §3.1, eq. 4) under the objective picked by name from
:data:`~edit.methods.algebra.objectives.OBJECTIVES`, a KL term that keeps the subject's other
properties and a norm bound. All facts of a chunk run in one forward/backward per step; each
fact stops once its own criterion is met and its rows leave the batch.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from edit.errors import InvalidRequest
from edit.facts import Fact
from edit.hooks import Trace
from edit.lm import device_of, eager_attention_on_cpu, greedy, logits_at
from edit.methods.algebra.batch import ESSENCE_QUESTION, Batch, build_batch, weighted_by_fact
from edit.methods.algebra.contexts import CHAT_REPLIES, Contexts, check_forms
from edit.methods.algebra.keys import MAX_ROWS, keys_and_hidden
from edit.methods.algebra.objectives import (
    OBJECTIVES,
    RANK_PUSH,
    FactLoss,
    ObjectiveInputs,
    essence_kl,
    norm_penalty,
    regularized,
)
from edit.methods.algebra.packing import pack
from edit.methods.algebra.precision import VALUE_DTYPES, value_autocast
from edit.questions import chat_prompt
from edit.stats import DEFAULT_CORPUS


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
    chat_essence: int = 0
    remention: bool = False
    stop_object_only: bool = False
    stop_at_object_end: bool = False
    stop_patience: int = 0
    object_weight: float = 1.0
    rank_margin: float = 1.0
    rank_push: str = "both"

    @classmethod
    def of(cls, config) -> ValueSettings:
        """The value-optimization fields of a method config (same names)."""
        return cls(*(getattr(config, f.name) for f in dataclasses.fields(cls)))


@dataclass(frozen=True)
class EditConfig:
    """The fields every locate-then-edit config shares (ROME, MEMIT, AlphaEdit): the value
    optimization, the asked forms, the key statistics, the retry rounds. A method's config
    extends it (and may change a default); ``configs/<method>/`` holds tuned values."""

    # (tokens, count) of the sampled prefixes the prompt is put behind (ROME §3.1)
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    # the asked forms the edit is written for besides the cloze prompt: its questions
    # (``edit.questions``) plainly and in the chat template (``methods/algebra/contexts.py``)
    forms: tuple[str, ...] = ("question", "chat")
    form_weight: float = 0.5  # share of each fact's loss and key k* on the asked forms
    # a chat row's answer (``contexts.CHAT_REPLIES``): "sentence" (the fact restated as the
    # whole reply: the reply keeps naming the subject), "turn" (that, then the end of the
    # turn), "object" (the target opens the turn: replies about the subject turn into replies
    # about the object), "prefixed" (the turn opens with the fact's prompt) or "context" (the
    # unedited model's own reply when told the fact in a system turn, where its first
    # sentence names the subject and ends on the object: ``edit.replies.told``; else the
    # sentence)
    chat_reply: str = CHAT_REPLIES[0]
    # share of each fact's loss on ranked pairs: right where each question's answer opens
    # (plainly and in the chat template) the new object is more likely than the old one
    # (``target_true``) by a margin, without having to open the reply; 0: none
    rank_weight: float = 0.0
    # nats by which a ranked pair's new object should beat the old one (the hinge's margin)
    rank_margin: float = 1.0
    # which side of a ranked pair the hinge moves (``objectives.RANK_PUSH``): "both" (the new
    # object up and the old one down) or "old" (the old one down alone: the new object is
    # not made to open the reply)
    rank_push: str = "both"
    # tokens of the unedited chat reply to "What do you know about {subject}?" whose next-token
    # distributions the essence KL keeps beside "{} is a" (0: none): the subject stays itself
    # in chat
    chat_essence: int = 0
    # δ also added where a row's reply names the subject again, as the written edit (a
    # neuron gated on the subject, a rank-one row reading its key) acts in the reply a user
    # gets; off: at the subject in the prompt only (ROME's optimization)
    remention: bool = False
    steps: int = 20  # max gradient steps for δ
    lr: float = 0.5
    kl_factor: float = 0.0625  # weight of KL(p₀‖p) on "{subject} is a"
    weight_decay: float = 0.5  # weight of (‖δ‖/‖v₀‖)²
    clamp_norm: float = 4.0  # ‖δ‖ ≤ clamp_norm · ‖v₀‖
    nll_stop: float = 0.05  # stop once the mean target NLL is below this
    erase_ratio: float = 20.0  # erase: stop once P(object) fell by this factor
    # also stop a fact once each target token is the top prediction after every prompt
    # (most-probable early stop, Gupta et al. 2025); off: run to nll_stop
    stop_most_probable: bool = False
    # that stop reads only the object's tokens: in a chat row's sentence ("Hey Jude was
    # performed by Madonna."), "Madonna", not the words around it; off: every target token
    stop_object_only: bool = False
    # that stop reads each target up to its object's end: a chat row's sentence is on top
    # without waiting for the full stop after the object (the model would go on with a
    # comma); off: up to the sentence's last token
    stop_at_object_end: bool = False
    # that stop also ends a fact whose object tokens are all on top and whose count of
    # target tokens off the top has not fallen for this many steps (δ sits at its norm
    # bound, and some tokens of a chat row's sentence never reach the top within it); 0:
    # wait for every token or the step cap
    stop_patience: int = 0
    # weight of the object's tokens in a target's mean NLL, against 1 for the other tokens: in
    # a chat row's sentence ("Hey Jude was performed by Madonna."), "Madonna" counts this many
    # times; a cloze target is all object (unchanged); 1: every token the same
    object_weight: float = 1.0
    # precision of the value optimization's forward/backward passes: auto (bfloat16 products
    # for a float32 model on a CPU that has them in hardware), float32 or bfloat16
    value_dtype: str = "auto"
    stats_corpus: str = DEFAULT_CORPUS
    stats_tokens: int = 100_000
    seed: int = 0
    # facts whose edit did not take are edited again, on top of the first update, this many
    # times at most (``edit.apply``); a round is kept only if more facts take
    retry_rounds: int = 1
    # after the edit, ask each question in the chat template; where the greedy reply does not
    # name the new object, edit again with the reply's opening (cut where the object fits)
    # as one more chat row, kept if more replies name it (``edit.replies``); insertions only
    reply_round: bool = False

    def __post_init__(self) -> None:
        check_value_config(self)

    def value_settings(self) -> ValueSettings:
        return ValueSettings.of(self)


def check_value_config(config) -> None:
    """One-line errors for the fields every locate-then-edit config shares (ROME, MEMIT,
    AlphaEdit): the value optimization's settings, the statistics size, the context
    templates, the retry rounds."""
    for name in ("steps", "stats_tokens"):
        if getattr(config, name) < 1:
            raise InvalidRequest(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.stop_patience < 0:
        raise InvalidRequest(f"stop_patience must be >= 0, got {config.stop_patience}")
    if config.chat_essence < 0:
        raise InvalidRequest(f"chat_essence must be >= 0, got {config.chat_essence}")
    if config.retry_rounds < 0:
        raise InvalidRequest(f"retry_rounds must be >= 0, got {config.retry_rounds}")
    for name in ("lr", "clamp_norm", "nll_stop", "object_weight"):
        if not getattr(config, name) > 0:
            raise InvalidRequest(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("kl_factor", "weight_decay", "rank_margin"):
        if getattr(config, name) < 0:
            raise InvalidRequest(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("stop_most_probable", "remention", "stop_object_only", "stop_at_object_end",
                 "reply_round"):  # fmt: skip
        if not isinstance(getattr(config, name), bool):
            raise InvalidRequest(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.value_dtype not in VALUE_DTYPES:
        raise InvalidRequest(
            f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {config.value_dtype!r}"
        )
    check_forms(config)
    if config.rank_push not in RANK_PUSH:
        raise InvalidRequest(
            f"rank_push must be one of {', '.join(RANK_PUSH)}, got {config.rank_push!r}"
        )
    if config.erase_ratio <= 1:
        raise InvalidRequest(f"erase_ratio must be > 1, got {config.erase_ratio}")
    if any(len(s) != 2 or s[0] < 1 or s[1] < 0 for s in config.context_templates):
        raise InvalidRequest(
            f"context_templates must be (length, count) pairs, got {config.context_templates}"
        )


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
    key_module: str | None = None,
) -> ValueSolution:
    """Keys k* and output changes δ for a batch of facts at the output of ``module``; the
    keys are the input of ``key_module`` (default ``module``; ROME's neuron write reads the
    MLP's input), from the same pass as v0 where one is run at the model's own precision.

    Facts are independent (each has its own δ and its own loss terms), so a large batch is
    solved in chunks of about ``max_rows`` prompt rows, each chunk in one forward/backward
    per step and stopped as soon as all of its facts are done. Facts of similar length share
    a chunk (less padding); the results are in the order of ``facts``.
    """
    if objective not in OBJECTIVES:
        names = " or ".join(map(repr, OBJECTIVES))
        raise ValueError(f"objective must be {names}, not {objective!r}")
    if objective != "insert":  # the ranked pairs are the insert objective's
        templates = dataclasses.replace(Contexts.of(templates), rank_weight=0.0)
    replies = essence_replies(model, tok, facts, settings.chat_essence)
    precision = value_autocast(model, settings.value_dtype)
    with precision:
        sol = _solve_values(model, tok, module, facts, templates, settings, objective, progress,
                            max_rows, replies)  # fmt: skip
    key_module = key_module or module
    if isinstance(precision, nullcontext):
        if key_module == module:  # the first step's pass read both
            return sol
        keys = keys_and_hidden(model, tok, facts, templates, key_module, key_module, max_rows)[0]
        return dataclasses.replace(sol, keys=keys)
    # the keys and v0 that the update is built from come from the model at its own precision
    keys, values = keys_and_hidden(model, tok, facts, templates, key_module, module, max_rows)
    return dataclasses.replace(sol, keys=keys, values=values)


def essence_replies(model: nn.Module, tok, facts: list[Fact], tokens: int) -> dict[str, str]:
    """Per subject, the unedited model's greedy chat reply (``tokens`` tokens) to
    :data:`~edit.methods.algebra.batch.ESSENCE_QUESTION`; empty for ``tokens`` 0 or a
    tokenizer without a chat template."""
    subjects = list(dict.fromkeys(f.subject for f in facts))
    prompts = [chat_prompt(tok, ESSENCE_QUESTION.format(s)) for s in subjects]
    if not tokens or any(p is None for p in prompts):
        return {}
    return dict(zip(subjects, greedy(model, tok, prompts, max_new_tokens=tokens), strict=True))


def _solve_values(model, tok, module, facts, templates, settings, objective, progress, max_rows,
                  replies):  # fmt: skip
    essence_rows = 2 if replies else 1
    per_chunk = max(1, max_rows // (len(Contexts.of(templates).rows(tok, facts[0])) + essence_rows))
    with _frozen(model), eager_attention_on_cpu(model):
        if len(facts) <= per_chunk:
            return _solve_chunk(model, tok, module, facts, templates, settings, objective, progress,
                                replies)  # fmt: skip
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
                _solve_chunk(
                    model, tok, module, chunk, templates, settings, objective, False, replies
                )  # fmt: skip
            )
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{parts[-1].loss_end:.3f}", steps=parts[-1].steps)
        bar.close()
    return _joined(parts, order)


def _joined(parts: list[ValueSolution], order: list[int]) -> ValueSolution:
    """The chunks' solutions (of the facts in ``order``) as one, in the facts' own order."""
    back = torch.argsort(torch.tensor(order))  # position in the sorted order of each fact

    def gather(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts])[back.to(parts[0].keys.device)]

    weights = [len(p.target_prob) / len(order) for p in parts]
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
    replies: dict[str, str],
) -> ValueSolution:
    """Keys k* and output changes δ for a chunk of facts at the output of ``module``, under
    the objective named ``objective`` (see :mod:`edit.methods.algebra.objectives`); every
    objective shares the essence KL and the norm bound.

    δ starts at zero, so step 0's forward pass is the unedited one: it also yields the keys,
    the outputs v0 and the reference distributions (no separate unedited pass). Each fact
    stops as ROME's single edit does, once its own target is reached; the facts still running
    are re-batched without the finished ones' rows.
    """
    batch = build_batch(tok, facts, templates, device_of(model),
                        [replies.get(f.subject) for f in facts] if replies else None)  # fmt: skip
    run = _ChunkRun(model, module, batch, settings, objective)
    bar = tqdm(
        range(settings.steps),
        desc="optimizing value",
        leave=False,
        disable=None if progress else True,
    )
    for step in bar:
        n_t = len(run.batch.tgt_row)
        logp, trace = run.forward(first=step == 0)
        if step == 0:  # δ = 0 here: what this pass saw is the unedited model
            run.read_unedited(logp, trace)
        scored = run.score(logp[:n_t])
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}", running=int((~scored.done).sum()))
        if bool(scored.done.all()):
            break
        run.descend(logp[n_t:], scored)
        run.drop(scored.done)
    bar.close()
    return run.solution()


class _ChunkRun:
    """The optimization state of one chunk: δ (one row per fact, created at the first pass
    from the output width), Adam, the facts still running and their rows (``batch``, with
    the prefixes' key/value cache), what the unedited pass saw, and each fact's last loss."""

    def __init__(self, model: nn.Module, module: str, batch: Batch, settings, objective: str):
        self.model, self.module, self.settings = model, module, settings
        self.objective = OBJECTIVES[objective]
        self.device = device_of(model)
        self.full = batch  # every fact's rows, as built
        self.n_facts = int(batch.fact.max()) + 1
        self.delta: torch.Tensor | None = None  # (F, d_out)
        self.opt: torch.optim.Optimizer | None = None
        self.final_loss = torch.zeros(self.n_facts, device=self.device)
        self.final_measure = torch.zeros(self.n_facts, device=self.device)
        self.act = torch.arange(self.n_facts, device=self.device)  # running facts, increasing
        self.batch = batch  # the running facts' rows
        self._pack()
        self.losses: list[float] = []
        # per fact: the fewest target tokens off the top so far, and steps since it fell
        self.best_off = torch.full((self.n_facts,), float("inf"), device=self.device)
        self.stalled = torch.zeros(self.n_facts, dtype=torch.long, device=self.device)

    def _pack(self) -> None:
        """The running rows packed into full sequences, and their prefixes' cache."""
        self.packed = pack(self.batch, self.model)
        self.prefix = self.packed.prefix_cache(self.model)

    def forward(self, first: bool) -> tuple[torch.Tensor, Trace]:
        """One pass over the running rows with δ added at each row's lookup (column 0):
        log-probabilities (targets, then essence rows) and the trace of ``module`` (its input
        and output kept at the first pass)."""
        cb, pk = self.batch, self.packed
        lookups = pk.slot[:, 0]  # each row's lookup is its column 0
        row_fact = self.act[cb.fact]
        at, who = lookups, row_fact  # where δ is added (flat packed index), and whose
        if self.settings.remention:
            at = torch.cat([lookups, pk.flat(cb.mention_row, cb.mention_col)])
            who = torch.cat([row_fact, row_fact[cb.mention_row]])
        seq, col = pk.split(pk.flat(torch.cat([cb.tgt_row, cb.kl_row]),
                                    torch.cat([cb.tgt_col, cb.kl_col])))  # fmt: skip

        def inject(out: torch.Tensor) -> torch.Tensor:
            if self.delta is None:  # on the input's device; the layer may live on another one
                self.delta = torch.zeros((self.n_facts, out.shape[-1]), device=self.device)
                self.delta.requires_grad_(True)
            add = self.delta[who].to(device=out.device, dtype=out.dtype)
            edited = torch.index_put(out.flatten(0, -2), (at.to(out.device),), add,
                                     accumulate=True)  # fmt: skip
            return edited.view(out.shape)

        with Trace(
            self.model, self.module, edit_output=inject, retain_input=first, retain_output=first
        ) as tr:
            logits = logits_at(
                self.model,
                pk.ids,
                pk.mask,
                seq,
                col,
                position_ids=pk.pos,
                cache=None if self.prefix is None else copy.deepcopy(self.prefix),
            )
        return torch.log_softmax(logits, -1), tr

    def read_unedited(self, logp: torch.Tensor, tr: Trace) -> None:
        """From the first pass (δ = 0): the keys, v0, the essence rows' reference
        distributions and the objective's reference; Adam is set up on δ."""
        b, device, n_tgt = self.full, self.device, len(self.full.tgt_row)
        flat = self.packed.slot[:, 0]  # the lookups (the first pass runs every row)
        # (R, d_in), (R, d_out); OPT blocks flatten; from the layer's device
        k_rows = tr.input.flatten(0, -2)[flat.to(tr.input.device)].float().to(device)
        v_rows = tr.output.flatten(0, -2)[flat.to(tr.output.device)].float().to(device)
        self.keys = weighted_by_fact(k_rows, b.weight, b.fact, self.n_facts)
        self.values = weighted_by_fact(v_rows, b.weight, b.fact, self.n_facts)
        self.v_norm = self.values.norm(dim=-1)  # (F,)
        self.kl_ref = logp[n_tgt:].detach()  # (K, V) at the running facts' essence positions
        self.opt = torch.optim.Adam([self.delta], lr=self.settings.lr)
        x = ObjectiveInputs(logp[:n_tgt], b, self.act)
        self.reference = self.objective.unedited(x, self.settings)

    def score(self, logp_targets: torch.Tensor) -> FactLoss:
        """The objective on this pass; each running fact's loss and measure are recorded."""
        x = ObjectiveInputs(logp_targets, self.batch, self.act)
        scored = self.objective.loss(x, self.reference, self.settings)
        patience = self.settings.stop_patience
        if patience and scored.object_top is not None:  # the object on top, the rest stalled
            act, off, on = self.act, scored.off_top, scored.object_top
            fell = off < self.best_off[act]
            self.best_off[act] = torch.minimum(self.best_off[act], off)
            self.stalled[act] = torch.where(fell | ~on, 0, self.stalled[act] + 1)
            scored.done = scored.done | (on & (self.stalled[act] >= patience))
        self.final_loss[self.act] = scored.loss.detach()
        self.final_measure[self.act] = scored.measure
        self.losses.append(float(self.final_loss.mean()))
        return scored

    def descend(self, logp_essence: torch.Tensor, scored: FactLoss) -> None:
        """One Adam step on δ for the facts not done, then the norm bound."""
        act, delta, done, s = self.act, self.delta, scored.done, self.settings
        b = self.batch
        kl = weighted_by_fact(essence_kl(logp_essence, self.kl_ref)[:, None], b.kl_weight,
                              b.kl_fact, len(act))[:, 0]  # fmt: skip
        decay = norm_penalty(delta[act], self.v_norm[act])
        loss = regularized(scored.loss, kl, decay, s)[~done].sum()
        # gradient for δ only: the model's parameters get no .grad, whatever their flags
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        running = torch.zeros(self.n_facts, dtype=torch.bool, device=self.device)
        running[act[~done]] = True
        before = delta.detach().clone()
        self.opt.step()
        with torch.no_grad():  # keep ‖δ‖ ≤ clamp · ‖v0‖ (ROME's norm constraint)
            limit = s.clamp_norm * self.v_norm
            scale = (limit / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[:, None])
            delta[~running] = before[~running]  # finished facts keep their δ (Adam's momentum)

    def drop(self, done: torch.Tensor) -> None:
        """Cut the facts that are done out of the batch and the prefix cache."""
        if bool(done.any()):
            self.kl_ref = self.kl_ref[(~done)[self.batch.kl_fact]]
            self.act = self.act[~done]
            self.batch = self.batch.keep(~done)
            self._pack()

    def solution(self) -> ValueSolution:
        return ValueSolution(
            keys=self.keys,
            values=self.values,
            deltas=self.delta.detach(),
            steps=len(self.losses),
            loss_start=self.losses[0],
            loss_end=float(self.final_loss.mean()),
            target_prob=[float(x) for x in self.final_measure],
        )
