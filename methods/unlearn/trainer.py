"""The trainer: :func:`train_lora` fits a LoRA adapter that forgets (or learns) a set of
examples, under accelerate (one process, DDP, FSDP or DeepSpeed), and stops at a level.

Each step takes ``batch_size`` examples of the forget set (shuffled each epoch) and, when the
objective has a retain term or the KL term is on, ``retain_batch_size`` retain examples
(shuffled, cycled). The objective is a key of :data:`~edit.methods.unlearn.losses.LOSSES`
(``learn``: plain NLL), plus ``kl_weight``·KL(π_ref ‖ π_θ) on the retain batch, π_ref the
model before the run (the adapter off) or, with ``kl_to="reference"``, the teacher. An
objective that distills (``distill``) also runs the never-seen teacher on each forget batch;
``rename`` runs the model before the run on the batch's renamed examples
(:mod:`~edit.methods.unlearn.rename`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from edit import arch as arch_table
from edit import distributed, lm
from edit.corpus import IGNORE_INDEX, Example, collate, encode_example
from edit.errors import EditFailed, InvalidRequest
from edit.methods.unlearn.augment import augment
from edit.methods.unlearn.config import OBJECTIVES, UnlearnConfig, for_objective
from edit.methods.unlearn.lora import (
    LoraResult,
    confine,
    json_safe,
    lora_wrapped,
    peft_config,
    rounded,
)
from edit.methods.unlearn.losses import (
    LOSSES,
    NEEDS_BEFORE_LOGITS,
    NEEDS_REFERENCE,
    NEEDS_RENAMED,
    NEEDS_TARGETS,
    NEEDS_TEACHER,
    USES_RETAIN,
    LossInputs,
    quantile_match,
    quantile_targets,
    token_entropy,
    token_kl,
    token_nll,
    token_nlls,
)
from edit.methods.unlearn.rename import Renamed, renamed, stand_ins, teacher_logits
from edit.methods.unlearn.samples import sampled_answers
from edit.methods.unlearn.scoring import Forward, batched_scores, forward_scores, score_summary

log = logging.getLogger(__name__)

Encoded = list[tuple[list[int], int]]  # examples as (token ids, leading tokens without loss)


def train_lora(
    model: nn.Module,
    tok,
    forget: list[Example],
    retain: list[Example] | None = None,
    config: UnlearnConfig | None = None,
    *,
    objective: str = "forget",
    progress: bool = True,
    holdout: list[Example] | None = None,
    teacher: nn.Module | None = None,
) -> LoraResult:
    """Train a LoRA adapter to forget ``forget`` (objective ``"forget"``, with
    ``config.method``) or to learn it (``"learn"``: NLL), and return it; ``model`` is left
    unchanged.

        result = train_lora(model, tok, forget, retain, UnlearnConfig(method="graddiff"))

    Each step takes ``batch_size`` examples of ``forget`` (shuffled each epoch) and, when the
    objective has a retain term, ``retain_batch_size`` (default ``batch_size``) retain examples
    (shuffled, cycled). NPO's
    reference log-likelihoods come from the same model with the adapter disabled, once,
    before training; the KL term's reference logits likewise, per step. Metrics are named
    ``<set>_<metric>_before`` / ``_after`` with set ``forget`` (or ``learn``), ``retain`` and
    ``holdout``.

    ``holdout``: examples of the same kind that the model never saw. They are scored before
    and after, and a forget run stops as soon as the forget set's NLL reaches theirs (the
    level a model trained without the forget set would show), instead of pushing the loss
    further at the cost of everything else; ``config.stop_nll`` sets that level directly.
    Whenever a step's batch (scored before its update) is at the level, the whole forget set
    is scored to decide; ``metrics["stopped_after"]`` is the number of steps taken then.

    ``teacher``: a model that never saw ``forget``, with the same vocabulary (the base model
    a fine-tune started from), for the objectives that distill toward it (``distill``: run
    without gradients on each forget batch) or take their targets from it (``match``:
    scored once); it is left unchanged. ``match`` without a teacher takes its targets from
    ``holdout``.
    """
    if objective not in OBJECTIVES:
        raise InvalidRequest(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    forget, retain = list(forget), list(retain or [])
    config = for_objective(config or UnlearnConfig(), objective, retain=bool(retain))
    method = config.method if objective == "forget" else "learn"
    _check_sets(objective, method, config, forget, retain, holdout or [])
    _check_teacher(model, method, teacher, bool(holdout))
    if config.confine and teacher is None:
        raise InvalidRequest("confine fixes the adapter to where the model differs from a "
                             "reference: give one (--reference BASE)")  # fmt: skip
    if config.kl_to == "reference" and teacher is None:
        raise InvalidRequest("kl_to=reference holds the retain set to a reference model: "
                             "give one (--reference BASE) and a method that reads it "
                             "(distill)")  # fmt: skip
    forget_enc = [encode_example(tok, ex, config.max_len) for ex in forget]
    extra = augment(tok, forget, seed=config.seed) if config.augment else []
    if config.samples:
        extra = sampled_answers(model, tok, forget, config.samples, seed=config.seed)
    extra_enc = [encode_example(tok, ex, config.max_len) for ex in extra]
    holdout_enc = [encode_example(tok, ex, config.max_len) for ex in holdout or []]
    retain_enc = [encode_example(tok, ex, config.max_len) for ex in retain]
    names = stand_ins(forget, holdout or []) if method in NEEDS_RENAMED else None
    renames = renamed(tok, forget + extra, names, config.max_len) if names else None
    lora_config, targets = peft_config(model, config)

    device = lm.device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # the LoRA initialization and the dropout draws
        run = _Run(model, tok, config, method, objective, progress, teacher)
        result = run.train(forget_enc, retain_enc, lora_config, holdout_enc, extra_enc, renames)
    result.target_modules = targets
    result.transposed = arch_table.lookup(model).transposed
    log.info(
        "%s (%s): NLL %.3f -> %.3f in %.1fs (%d tokens, %.0f tokens/s)",
        objective,
        method,
        result.metrics[f"{objective}_nll_before"],
        result.metrics[f"{objective}_nll_after"],
        result.seconds,
        result.tokens,
        result.tokens_per_second,
    )
    return result


def _check_sets(
    objective: str,
    method: str,
    config: UnlearnConfig,
    forget: list[Example],
    retain: list[Example],
    holdout: list[Example],
) -> None:
    """Refuse a run its sets cannot serve: none to train on, a retain term or KL term without
    a retain set, a stop level or an entropy match for learn, one without a holdout,
    or examples shared with the set to train on."""
    if not forget:
        raise InvalidRequest(f"no examples to {objective}")
    if method == "graddiff" and config.alpha > 0 and not retain:
        raise InvalidRequest("graddiff needs a retain set: give one, or use method gradascent")
    if config.kl_weight > 0 and not retain:
        raise InvalidRequest("kl_weight > 0 needs a retain set: give one, or set kl_weight 0")
    if objective == "forget" and config.augment:
        raise InvalidRequest("augment adds examples to learn: leave it unset (or false) to forget")
    if objective != "forget" and config.samples:
        raise InvalidRequest("samples adds the model's own wordings to forget: leave it 0 to learn")
    if objective != "forget" and config.stop_nll is not None:
        raise InvalidRequest("stop_nll stops a forget run: leave it unset for learn")
    if objective != "forget" and config.quant_bits:
        raise InvalidRequest("quant_bits is a forget setting: leave it out of learn")
    for name in ("entropy_weight", "token_nll_weight", "holdout_kl"):
        if objective != "forget" and getattr(config, name):
            raise InvalidRequest(f"{name} is a forget setting: leave it out of learn")
        if getattr(config, name) and not holdout:
            raise InvalidRequest(
                f"{name} reads never-seen examples of the corpus's kind: give them (--holdout)"
            )
    forget_set = set(forget)
    for name, other in (("retain", retain), ("holdout", holdout)):
        shared = [ex for ex in other if ex in forget_set]
        if shared:
            where = f" (first: {shared[0].where})" if shared[0].where else ""
            raise InvalidRequest(
                f"{len(shared)} of the {len(other)} {name} examples are also in the set to "
                f"{objective}{where}: give {name} examples that are not in it"
            )


def _check_teacher(model: nn.Module, method: str, teacher: nn.Module | None, holdout: bool) -> None:
    """Refuse a distilling objective without a teacher, a per-example target without a
    teacher or a holdout, and a teacher of another vocabulary."""
    if method in NEEDS_TEACHER and teacher is None:
        raise InvalidRequest(
            f"{method} distills toward a model that never saw the corpus: give one as the "
            "reference (--reference BASE), or choose another method"
        )
    if method in NEEDS_TARGETS and teacher is None and not holdout:
        raise InvalidRequest(
            f"{method} aims each example at a never-seen level: give a reference model "
            "(--reference BASE) or never-seen examples of the same kind (--holdout)"
        )
    if teacher is None:
        return
    if method not in NEEDS_TEACHER | NEEDS_TARGETS:
        raise InvalidRequest(f"{method} does not use a teacher model: leave it out")
    ours, theirs = (m.get_output_embeddings().weight.shape[0] for m in (model, teacher))
    if ours != theirs:
        raise InvalidRequest(
            f"the reference model's vocabulary ({theirs} tokens) is not this model's ({ours}): "
            "give the model this one was fine-tuned from"
        )


def _retain_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of retain indices: shuffled passes, cycled (none if ``n`` is 0)."""
    while n:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


@dataclass
class _StepLoss:
    loss: torch.Tensor
    train_nll: float  # mean token NLL of the step's forget (or learn) examples
    retain_nll: float | None
    tokens: int  # tokens through the forward passes (no padding)


@dataclass
class _Sets:
    """A run's example sets, tokenized."""

    forget: Encoded  # the set to forget (or learn)
    retain: Encoded
    holdout: Encoded
    eval_retain: Encoded  # the retain examples scored before and after
    train: Encoded  # what the steps train on: ``forget``, then its augmented or sampled ones
    renamed: Renamed | None = None  # ``train`` with never-seen subjects (NEEDS_RENAMED)


def _answer_labels(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the answer tokens of a batch's (B, T) labels, in the order of the logits
    :func:`forward_scores` gives (row by row, position by position)."""
    answer = labels[:, 1:]
    return answer[answer != IGNORE_INDEX]


@dataclass
class _Loop:
    """What the steps of a run share: set up once, counted by every step."""

    sets: _Sets
    # (n,) log π_ref(y|x) of each forget example, and, for an objective that reads it
    # (NEEDS_REFERENCE), of each extra example trained on too (all of ``sets.train``)
    ref_logp: torch.Tensor
    targets: torch.Tensor | None  # (n,) each such example's target NLL (NEEDS_TARGETS)
    stop_nll: float | None  # stop once the forget set's NLL reaches it; None: no stop
    # the holdout's answer tokens before the run, sorted: next-token entropies and NLLs, the
    # levels of entropy_weight and token_nll_weight; None: neither is on
    token_levels: tuple[torch.Tensor, torch.Tensor] | None
    use_retain_nll: bool  # the objective's α·NLL(D_r) term is on
    use_kl: bool  # the KL(π_ref ‖ π_θ) term is on
    gen: torch.Generator  # the batch order
    retain_batches: Iterator[list[int]]
    holdout_batches: Iterator[list[int]]  # for holdout_kl (none where it is off)
    steps: int  # steps per epoch
    bar: Any  # the tqdm progress bar
    taken: int = 0  # steps (batches; with gradient accumulation, several make one update)
    stopped: bool = False  # the forget set reached stop_nll after ``taken`` steps
    tokens: int = 0  # this process's tokens through the training passes
    losses: list[dict[str, float | None]] = field(default_factory=list)  # one per epoch


@dataclass
class _Run:
    """One training run of :func:`train_lora` (inputs already validated and tokenized)."""

    model: nn.Module
    tok: Any
    config: UnlearnConfig
    method: str  # a key of LOSSES, or "learn"
    objective: str
    progress: bool
    teacher: nn.Module | None = None  # the never-seen model a distilling objective aims at
    acc: Any = None  # the accelerate.Accelerator running the steps (set by train)
    forward: nn.Module | None = None  # Forward, prepared by acc
    peft_model: Any = None  # the model with the adapter injected (set by train)
    optimizer: Any = None  # AdamW on the adapter's factors, prepared by acc
    params: list[torch.Tensor] = field(default_factory=list)  # the adapter's factors

    def _score_batch(self, ids, mask, labels):
        return self.forward((ids, mask, labels))[0]

    def scores(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`batched_scores` of ``encoded`` through the prepared model; with several processes
        each scores a share (padded to equal counts: FSDP needs every process in every pass)
        and all get every score."""
        from accelerate.utils import gather_object

        pad, size = lm.pad_id(self.tok), max(self.config.batch_size, 16)
        if self.acc.num_processes == 1 or not encoded:
            return batched_scores(self.model, encoded, pad, size, self._score_batch)
        everything = list(range(len(encoded)))
        with self.acc.split_between_processes(everything, apply_padding=True) as mine:
            logp, n = batched_scores(self.model, [encoded[i] for i in mine], pad, size,
                              self._score_batch)  # fmt: skip
            rows = gather_object(list(zip(mine, logp.tolist(), n.tolist(), strict=True)))
        by_index = {i: (lp, k) for i, lp, k in rows}
        ordered = [by_index[i] for i in range(len(encoded))]
        return (torch.tensor([lp for lp, _ in ordered], dtype=logp.dtype),
                torch.tensor([k for _, k in ordered], dtype=n.dtype))  # fmt: skip

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (every process gets the same answer)."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device)) > 0)

    def batch(self, encoded: Encoded, idx: list[int]):
        ids, mask, labels = collate([encoded[i] for i in idx], lm.pad_id(self.tok))
        device = lm.device_of(self.model)
        return ids.to(device), mask.to(device), labels.to(device)

    @torch.no_grad()
    def token_levels(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) the next-token entropies (nats) and (N,) the NLLs at the answer tokens of
        ``encoded``, each sorted."""
        size, entropies, nlls = max(self.config.batch_size, 16), [], []
        for start in range(0, len(encoded), size):
            idx = list(range(start, min(start + size, len(encoded))))
            ids, mask, labels = self.batch(encoded, idx)
            *_, logits = self._score_batch(ids, mask, labels)
            entropies.append(token_entropy(logits).cpu())
            nlls.append(token_nlls(logits, _answer_labels(labels).to(logits.device)).cpu())
        return torch.cat(entropies).sort().values, torch.cat(nlls).sort().values

    def measure(self, when: str, sets: _Sets):
        """(metrics named ``*_{when}``, the training examples' log π(y|x) (n,))."""
        train = self.scores(sets.forget)
        summary = {
            **score_summary(self.objective, *train),
            **score_summary("retain", *self.scores(sets.eval_retain)),
        }
        if sets.holdout:
            summary.update(score_summary("holdout", *self.scores(sets.holdout)))
        return {f"{k}_{when}": v for k, v in summary.items()}, train[0]

    def reached(self, forget_enc: Encoded, level: float) -> bool:
        """Whether the whole forget set's NLL is at ``level`` or above (adapter on, no
        dropout)."""
        dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        try:
            nll = score_summary("forget", *self.scores(forget_enc))["forget_nll"]
        finally:
            for m in dropouts:
                m.train()
        return nll >= level

    def step_loss(self, loop: _Loop, idx: list[int], retain_idx: list[int]) -> _StepLoss:
        """The objective on one batch of forget (or learn) examples and one of retain."""
        c = self.config
        ids, mask, labels = self.batch(loop.sets.train, idx)
        batches = [(ids, mask, labels)]
        if retain_idx:
            batches.append(self.batch(loop.sets.retain, retain_idx))
        if c.holdout_kl:  # never-seen examples of the corpus's kind, kept where they were
            batches.append(self.batch(loop.sets.holdout, next(loop.holdout_batches)))
        scored = self.forward(*batches)  # one pass through the prepared model per step
        logp, n, _ = scored[0]
        tokens = int(mask.sum())
        ref = loop.ref_logp[idx].to(logp.device) if self.method in NEEDS_REFERENCE else None
        inputs = LossInputs(logp, n, ref)
        if loop.targets is not None:
            inputs.targets = loop.targets[idx].to(logp.device)
        if self.method in NEEDS_TEACHER:
            inputs.logits = scored[0][2]
            inputs.teacher_logits = self.teacher_logits(ids, mask, labels).to(logp.device)
            inputs.labels = _answer_labels(labels).to(logp.device)
        if self.method in NEEDS_RENAMED:
            inputs.logits = scored[0][2]
            inputs.teacher_logits = self.renamed_logits(loop.sets, idx, (ids, mask, labels))
        if self.method in NEEDS_BEFORE_LOGITS:
            inputs.logits = scored[0][2]
            with torch.no_grad(), self.peft_model.disable_adapter():
                *_, before = self._score_batch(ids, mask, labels)
            inputs.before_logits = before.to(logp.device)
            inputs.labels = _answer_labels(labels).to(logp.device)
        kl, retain_nll = None, None
        if retain_idx:
            r_ids, r_mask, r_labels = batches[1]
            r_logp, r_n, r_logits = scored[1]
            tokens += int(r_mask.sum())
            if loop.use_retain_nll:
                inputs.retain_nll = token_nll(r_logp, r_n)
            if c.kl_weight > 0 and c.kl_to == "reference":
                kl = token_kl(r_logits, self.teacher_logits(r_ids, r_mask, r_labels).to(r_logits))
            elif c.kl_weight > 0:
                with torch.no_grad(), self.peft_model.disable_adapter():
                    *_, ref_logits = self._score_batch(r_ids, r_mask, r_labels)
                kl = token_kl(r_logits, ref_logits)
            retain_nll = float(token_nll(r_logp.detach(), r_n))
        if self.objective == "forget":
            loss = LOSSES[self.method](inputs, c)
        else:
            loss = token_nll(logp, n)
        if kl is not None:
            loss = loss + c.kl_weight * kl
        if c.holdout_kl:
            h_ids, h_mask, h_labels = batches[-1]
            tokens += int(h_mask.sum())
            with torch.no_grad(), self.peft_model.disable_adapter():
                *_, before = self._score_batch(h_ids, h_mask, h_labels)
            loss = loss + c.holdout_kl * token_kl(scored[-1][2], before)
        if loop.token_levels is not None:  # the answer tokens aimed at the holdout's spread
            logits, (h_levels, nll_levels) = scored[0][2], loop.token_levels
            if c.entropy_weight:
                loss = loss + c.entropy_weight * quantile_match(token_entropy(logits), h_levels)
            if c.token_nll_weight:
                nlls = token_nlls(logits, _answer_labels(labels).to(logits.device))
                loss = loss + c.token_nll_weight * quantile_match(nlls, nll_levels)
        return _StepLoss(loss, float(token_nll(logp.detach(), n)), retain_nll, tokens)

    @torch.no_grad()
    def teacher_logits(self, ids, mask, labels) -> torch.Tensor:
        """(N, V) the teacher's next-token logits at the batch's label positions."""
        device = lm.device_of(self.teacher)
        *_, logits = forward_scores(self.teacher, ids.to(device), mask.to(device),
                                     labels.to(device))  # fmt: skip
        return logits

    @torch.no_grad()
    def renamed_logits(self, sets: _Sets, idx: list[int], batch) -> torch.Tensor:
        """(N, V) the rename objective's targets at the batch's answer tokens: the model
        before the run on the renamed examples, where a token has a counterpart there, else
        on the examples themselves (:func:`~edit.methods.unlearn.rename.teacher_logits`)."""
        r = sets.renamed
        with self.peft_model.disable_adapter():
            *_, own = self._score_batch(*batch)
            *_, theirs = self._score_batch(*self.batch(r.encoded, idx))

        def counts(enc: Encoded) -> list[int]:
            return [len(enc[i][0]) - enc[i][1] for i in idx]

        index = [r.index[i] for i in idx]
        labels = _answer_labels(batch[2])
        return teacher_logits(own, theirs, index, counts(sets.train), counts(r.encoded), labels,
                              self.config.penalty)  # fmt: skip

    def train(self, forget_enc, retain_enc, lora_config, holdout_enc, extra_enc,
              renames=None) -> LoraResult:  # fmt: skip
        c, model = self.config, self.model
        sets = _Sets(forget_enc, retain_enc, holdout_enc, retain_enc[: c.eval_retain],
                     forget_enc + extra_enc, renames)  # fmt: skip
        with lora_wrapped(model, lora_config) as peft_model:
            peft_model.eval()  # no dropout in the base model: at step 0, π_θ is exactly π_ref
            self.peft_model = peft_model
            if c.confine:
                confine(model, self.teacher, arch_table.lookup(model).transposed)
            self.params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
            self._prepare(optimizer)
            try:
                result = self._steps(sets)
            finally:
                self.forward = self.optimizer = self.peft_model = self.schedule = None
                self.acc.free_memory()  # drop accelerate's references to the wrapped model
        return result

    def _prepare(self, optimizer) -> None:
        """Set up the accelerator and wrap the forward passes and ``optimizer`` in it."""
        c = self.config
        # the launch configuration decides how the steps run: one process, DDP, FSDP or
        # DeepSpeed; mixed precision and gradient accumulation (edit.distributed)
        acc = self.acc = distributed.accelerator()
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
            # DeepSpeed reads it from a prepared dataloader; this loop batches itself
            per_process = math.ceil(c.batch_size / acc.num_processes)
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process
        if c.quant_bits and acc.distributed_type in ("FSDP", "DEEPSPEED"):
            raise InvalidRequest(
                "quant_bits rounds whole weights, which a sharded run (FSDP, DeepSpeed) does not "
                "hold: run it in one process or with DDP, or leave quant_bits 0"
            )
        self.forward, self.optimizer = acc.prepare(Forward(self.model), optimizer)

    def _steps(self, sets: _Sets) -> LoraResult:
        """Measure, train epoch by epoch until the stop level or the last epoch, measure."""
        from peft.tuners.lora import LoraLayer

        c, acc = self.config, self.acc
        metrics, ref_logp, stop_nll, token_levels = self._before(sets)
        targets = self.targets(sets) if self.method in NEEDS_TARGETS else None
        lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        for layer in lora_layers:
            layer.lora_dropout.train()  # dropout on the adapter's input only
        gen = torch.Generator().manual_seed(c.seed)
        retain_size = c.retain_batch_size or c.batch_size
        steps = math.ceil(len(sets.train) / c.batch_size)
        bar = tqdm(
            total=c.epochs * steps,
            desc=f"{self.objective} ({self.method}, LoRA r={c.lora_rank})",
            unit="step",
            disable=True if not self.progress or not acc.is_main_process else None,
        )
        use_retain_nll = self.method in USES_RETAIN and c.alpha > 0 and bool(sets.retain)
        if self.method in NEEDS_TEACHER | NEEDS_TARGETS | NEEDS_RENAMED:
            stop_nll = None  # the objective holds each example at its own level: no stop
        holdout_n = len(sets.holdout) if c.holdout_kl else 0
        # transformers' schedules by name (UnlearnConfig.lr_schedule), over the planned updates
        self.schedule = get_scheduler(
            c.lr_schedule,
            self.optimizer,
            num_warmup_steps=0,
            num_training_steps=c.epochs * math.ceil(steps / acc.gradient_accumulation_steps),
        )
        loop = _Loop(sets, ref_logp, targets, stop_nll, token_levels,
                     use_retain_nll, c.kl_weight > 0, gen,
                     _retain_stream(len(sets.retain), retain_size, gen),
                     _retain_stream(holdout_n, retain_size, gen), steps, bar)  # fmt: skip
        t0 = time.perf_counter()
        for epoch in range(c.epochs):
            if not self._epoch(loop, epoch):
                break
        if lm.device_of(self.model).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if acc.num_processes > 1:  # every process's tokens
            loop.tokens = int(acc.reduce(torch.tensor([float(loop.tokens)], device=acc.device)))
        bar.close()

        for layer in lora_layers:
            layer.lora_dropout.eval()
        return self._result(loop, metrics, seconds)

    def _before(self, sets: _Sets):
        """The "before" metrics, π_ref's log π(y|x) of the forget set, the stop level
        (``stop_nll``, else for forget the holdout's NLL; a set already there is refused) and
        the holdout's sorted token entropies and NLLs for ``entropy_weight`` and
        ``token_nll_weight`` (else None)."""
        c = self.config
        with self.peft_model.disable_adapter():  # π_ref; also the "before" metrics
            metrics, ref_logp = self.measure("before", sets)
            extra = len(sets.train) > len(sets.forget)
            if extra and self.method in NEEDS_REFERENCE:  # the extra examples' π_ref
                extra_logp, _ = self.scores(sets.train[len(sets.forget) :])
                ref_logp = torch.cat([ref_logp, extra_logp.to(ref_logp.dtype)])
            levels = None
            if c.entropy_weight or c.token_nll_weight:  # never-seen levels (_check_sets)
                levels = self.token_levels(sets.holdout)
                metrics["entropy_level"] = float(levels[0].mean())
        stop_nll = c.stop_nll
        if stop_nll is None and sets.holdout and self.objective == "forget":
            stop_nll = metrics["holdout_nll_before"]
        metrics["stop_nll"] = stop_nll
        if stop_nll is not None and metrics["forget_nll_before"] >= stop_nll:
            raise InvalidRequest(
                f"the corpus's NLL {metrics['forget_nll_before']:.3f} is already at the "
                f"stop level {stop_nll:.3f} (never-seen text): nothing to forget"
            )
        return metrics, ref_logp, stop_nll, levels

    def targets(self, sets: _Sets) -> torch.Tensor:
        """(n,) each trained example's target mean token NLL: the teacher's NLL of it, else
        the holdout's NLL at the example's rank among the trained set's (both before
        training)."""
        if self.teacher is not None:
            pad, size = lm.pad_id(self.tok), max(self.config.batch_size, 16)
            logp, n = batched_scores(self.teacher, sets.train, pad, size)
            return -logp / n.clamp(min=1)
        with self.peft_model.disable_adapter():
            (f_logp, f_n), (h_logp, h_n) = self.scores(sets.train), self.scores(sets.holdout)
        return quantile_targets(-f_logp / f_n.clamp(min=1), -h_logp / h_n.clamp(min=1))

    def _epoch(self, loop: _Loop, epoch: int) -> bool:
        """One pass over the forget set in a new order, its mean losses appended to
        ``loop.losses``; False: the run ends here (the stop level was reached)."""
        c = self.config
        order = torch.randperm(len(loop.sets.train), generator=loop.gen).tolist()
        sums = {"loss": 0.0, "train_nll": 0.0, "retain_nll": 0.0}
        retain_nll = None
        done = 0  # steps taken this epoch
        for step in range(loop.steps):
            whole = order[step * c.batch_size : (step + 1) * c.batch_size]
            retain_whole = next(loop.retain_batches) if loop.use_retain_nll or loop.use_kl else []
            part, share = self._step(loop, whole, retain_whole, epoch, step)
            if part is None:  # the forget set reached the stop level before this step
                break
            loop.bar.update()
            done += 1
            loop.taken += 1
            if share == 0:
                continue
            loop.tokens += part.tokens
            retain_nll = part.retain_nll
            sums["loss"] += float(part.loss.detach())
            sums["train_nll"] += part.train_nll
            sums["retain_nll"] += retain_nll or 0.0
            postfix = {self.objective: f"{part.train_nll:.3f}"}
            if retain_nll is not None:
                postfix["retain"] = f"{retain_nll:.3f}"
            loop.bar.set_postfix(postfix, refresh=False)
        if done == 0:  # stopped before the epoch's first step
            return False
        loop.losses.append(
            {
                "epoch": epoch + 1,
                "loss": sums["loss"] / done,
                f"{self.objective}_nll": sums["train_nll"] / done,
                "retain_nll": sums["retain_nll"] / done if retain_nll is not None else None,
            }
        )
        return not loop.stopped

    def _step(
        self, loop: _Loop, whole: list[int], retain_whole: list[int], epoch: int, step: int
    ) -> tuple[_StepLoss | None, float]:
        """One step on this process's share of the batch ``whole`` (and ``retain_whole``):
        (its loss, the share), or (None, share) where the whole forget set is found at the
        stop level before the update (``loop.stopped``; nothing is updated then)."""
        c, acc = self.config, self.acc
        # this process's share of the step's examples (all of them in one process)
        with acc.split_between_processes(whole) as idx:
            idx = list(idx)
        with acc.split_between_processes(retain_whole) as retain_idx:
            retain_idx = list(retain_idx)
        # The loss is weighted by this process's share of the examples, so that the
        # mean over processes that DDP takes of the gradients is the gradient of the
        # whole batch. A process left no example (a short last batch) still runs a
        # pass, on a stand-in example with weight 0: every process takes the step.
        share = len(idx) / len(whole) * acc.num_processes
        idx = idx or whole[:1]
        retain_idx = retain_idx or retain_whole[:1]
        with acc.accumulate(self.forward):
            part = self.step_loss(loop, idx, retain_idx)
            if loop.stop_nll is not None:
                # a batch at the level (scored before this step's update) triggers a
                # scoring of the whole forget set; every process decides alike
                if self.any_process(share > 0 and part.train_nll >= loop.stop_nll):
                    loop.stopped = self.reached(loop.sets.forget, loop.stop_nll)
                    if loop.stopped:
                        return None, share
            bad = not bool(torch.isfinite(part.loss))
            if self.any_process(bad):
                value = float(part.loss.detach()) if bad else float("nan")
                raise EditFailed(
                    f"training diverged at epoch {epoch + 1}, step {step + 1} (loss "
                    f"{value}): lower lr; the model was not changed"
                )
            acc.backward(part.loss * share)
            if c.sam_rho > 0 and acc.sync_gradients:
                part.tokens += self.sharpness_aware(loop, idx, retain_idx, share)
            if c.quant_bits:
                part.tokens += self.rounded_pass(loop, idx, retain_idx, share)
            if c.max_grad_norm is not None and acc.sync_gradients:
                acc.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.schedule.step()
        return part, share

    def sharpness_aware(self, loop: _Loop, idx, retain_idx, share: float) -> int:
        """Replace the step's gradient by the gradient at the worst nearby adapter (SAM, Foret
        et al. 2021): move the factors by ``sam_rho`` along the gradient, take the gradient
        there, move back. Fan et al. 2025 show that unlearning in such a flat minimum resists
        relearning. Costs a second forward and backward pass per step; returns its tokens."""
        grads = [p.grad for p in self.params]
        norm = math.sqrt(sum(float(g.float().square().sum()) for g in grads if g is not None))
        scale = self.config.sam_rho / (norm + 1e-12)
        moves = []
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                move = g * scale if g is not None else None
                if move is not None:
                    p.add_(move)
                moves.append(move)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            again = self.step_loss(loop, idx, retain_idx)
            self.acc.backward(again.loss * share)
            return again.tokens
        finally:
            with torch.no_grad():
                for p, move in zip(self.params, moves, strict=True):
                    if move is not None:
                        p.sub_(move)

    def rounded_pass(self, loop: _Loop, idx, retain_idx, share: float) -> int:
        """Add the gradient of the step's loss on the model with its adapted weights rounded
        to ``quant_bits`` (:func:`~edit.methods.unlearn.lora.rounded`): an unlearning run moves
        the weights so little that rounding can undo it (Zhang et al. 2024, "Does your LLM
        truly unlearn?"); trained on both, the forgetting holds in the rounded copy too. One
        more forward and backward pass per step; returns its tokens."""
        with rounded(self.peft_model, self.config.quant_bits):
            again = self.step_loss(loop, idx, retain_idx)
            self.acc.backward(again.loss * share)
        return again.tokens

    def _result(self, loop: _Loop, metrics: dict[str, Any], seconds: float) -> LoraResult:
        """The "after" metrics, the stop step, and the trained adapter (CPU float32)."""
        c = self.config
        metrics.update(self.measure("after", loop.sets)[0])
        stopped = loop.stopped
        if loop.stop_nll is not None and not stopped:  # reached by the very last step?
            stopped = metrics["forget_nll_after"] >= loop.stop_nll
        metrics["stopped_after"] = loop.taken if stopped else None  # steps
        adapter = {
            k: v.detach().to("cpu", torch.float32).clone().contiguous()
            for k, v in self.adapter_state(self.peft_model).items()
        }
        peft_dict = json_safe(self.peft_model.peft_config["default"].to_dict())
        return LoraResult(
            objective=self.objective,
            config=c,
            adapter=adapter,
            lora_config=peft_dict,
            target_modules=[],
            transposed=False,
            losses=loop.losses,
            seconds=seconds,
            tokens=loop.tokens,
            tokens_per_second=loop.tokens / max(seconds, 1e-9),
            metrics=metrics,
        )

    def adapter_state(self, peft_model) -> dict[str, torch.Tensor]:
        """The trained adapter (peft's state-dict names). Where the model is sharded (FSDP,
        DeepSpeed ZeRO-3) accelerate gathers it on the main process, which sends it to all."""
        from accelerate.utils import DistributedType, broadcast_object_list
        from peft import get_peft_model_state_dict

        if self.acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return get_peft_model_state_dict(peft_model)
        full = self.acc.get_state_dict(self.forward)  # Forward's names: "lm.<module>..."
        state = None
        if self.acc.is_main_process:
            renamed = {f"base_model.model.{k.removeprefix('lm.')}": v for k, v in full.items()}
            state = get_peft_model_state_dict(peft_model, state_dict=renamed)
            state = {k: v.detach().cpu() for k, v in state.items()}
        return broadcast_object_list([state])[0]
