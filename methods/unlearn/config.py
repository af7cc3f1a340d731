"""The hyper-parameters of a LoRA unlearning / learning run (:class:`UnlearnConfig`) and what
a field left None means for each objective (:data:`OBJECTIVE_DEFAULTS`).

Defaults: β = 0.1 (NPO's TOFU setting), α = 1 (retain term at full weight; 0 turns it off),
γ = 0 (SimNPO's margin, which the paper tunes per task from 0 upward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edit.errors import InvalidRequest
from edit.methods.unlearn.losses import LOSSES

OBJECTIVES = ("forget", "learn")
LR_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class UnlearnConfig:
    """LoRA unlearning / learning hyper-parameters.

    ``target_modules``: names (or name suffixes, as peft matches them, e.g. ``"q_proj"``) of
    the Linear / Conv1D modules to adapt; None adapts every projection inside the attention
    and MLP of every block, as found from the architecture table (:mod:`edit.arch`).
    """

    method: str = "npo"  # a key of LOSSES (objective "forget" only)
    epochs: int | None = None  # passes over the forget (or learn) set; None: OBJECTIVE_DEFAULTS
    lr: float | None = None  # AdamW learning rate; None: OBJECTIVE_DEFAULTS
    lora_rank: int = 8
    lora_alpha: float = 16.0  # LoRA scaling is lora_alpha / lora_rank
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    batch_size: int = 4  # forget examples per step
    retain_batch_size: int | None = None  # retain examples per step; None: batch_size
    max_len: int = 256  # tokens per example, start token included; longer ones are cut
    beta: float = 0.1  # NPO / SimNPO inverse temperature β
    alpha: float = 1.0  # weight of NLL(D_r) in graddiff, npo, simnpo
    gamma: float = 0.0  # SimNPO reward margin γ
    # undial: logit taken off each forget token in the target (UNDIAL: 3-30); rename: off each
    # token of a subject's first mention
    penalty: float = 10.0
    kl_weight: float | None = None  # weight of KL(π_ref ‖ π_θ) on the retain set; None: as above
    # π_ref of that KL: "before", the model before the run (the adapter off); "reference", the
    # forget run's reference model (a model that never saw the corpus), so that the retain set
    # reads as it does there; None: "reference" where the model before reads the retain set
    # at a perplexity over DAMAGED times the reference's (a fine-tune that broke it), else
    # "before" (policy.retain_hold)
    kl_to: str | None = None
    # forget with a holdout: weight of the distance between the forget answer tokens' next-token
    # entropies and the holdout's before the run (losses.entropy_match: a never-seen model is
    # confidently wrong at some tokens, unsure at others; Min-K%++ reads the spread); 0: off
    entropy_weight: float = 0.0
    # the same for the answer tokens' NLLs (losses.quantile_match: the hardest tokens no further
    # below the never-seen level than never-seen text's are; Min-K% reads them); 0: off
    token_nll_weight: float = 0.0
    # forget with a holdout: weight of KL(π_before ‖ π_θ) on a batch of the holdout's
    # examples at each step, so that never-seen text of the corpus's kind keeps its level
    # and the forget stays specific to the corpus (its stop level is read there); 0: off
    holdout_kl: float = 0.0
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA factors
    # the learning rate over the run: "constant" (lr at every step), or "linear" (from lr
    # down to 0 at the last planned step, as transformers' Trainer does by default)
    lr_schedule: str = "constant"
    max_grad_norm: float | None = 1.0  # gradient clipping; None: off
    # sharpness-aware steps (SAM): each step takes the gradient at the adapter moved this far
    # (L2, over all factors) along its own gradient; 0: plain steps. Twice the cost per step.
    sam_rho: float = 0.0
    # forget: each step also takes the step's loss on the model with its adapted weights
    # (W + ΔW) RTN-rounded to this many bits (groups of 128; lora.rounded), straight through
    # the rounding, so that the forgetting holds in a quantized copy; 0: off. One more
    # forward and backward pass per step.
    quant_bits: int = 0
    # with a reference: fix each adapter's input factor A to the r directions in which the
    # adapted weight differs most from the reference's (top right singular vectors of
    # W - W_ref) and train B alone, so that the run changes the model only where the
    # fine-tune did (lora.confine); False: peft's random A, trained; None: METHOD_DEFAULTS
    # (on for distill, off otherwise)
    confine: bool | None = None
    eval_retain: int = 128  # retain examples scored before/after (the first ones)
    # forget: stop once the forget set's mean token NLL reaches this level (None: with a
    # holdout set, its NLL before training, i.e. the level of never-seen text; else no stop)
    stop_nll: float | None = None
    # forget in a workspace, with neither a holdout nor stop_nll: when an earlier ``learn``
    # entry learned every example of the corpus, stop at the corpus's NLL without that entry
    # (the level of the same text never seen); False: no such stop
    stop_at_learned: bool = True
    # learn: also train on restatements of each plain-text document that name its subject,
    # and on questions about its facts, plain and in the chat template (augment.py); None:
    # OBJECTIVE_DEFAULTS. Forget runs train on the corpus as given.
    augment: bool | None = None
    # forget: also forget this many replies the model itself gives, sampled, to each
    # question/answer example's prompt (samples.py): the facts in its own wordings; 0: off
    samples: int = 0
    # without a retain set given: hold this many slices of the shipped WikiText-2 text (about
    # 64 tokens each, from its start) to the model before the run; None: OBJECTIVE_DEFAULTS
    text_retain: int | None = None
    # without a retain set given: also hold this many shipped factual prompts to the model
    # before the run (edit.corpus.retain_facts: CounterFact facts the default model answers,
    # none of them the general-knowledge probe's), beside the WikiText-2 slices; 0: off;
    # None: OBJECTIVE_DEFAULTS
    fact_retain: int | None = None
    # forget toward a reference (distill, match): the reference first learns up to this many
    # examples of the corpus's kind (the retain set given, else the holdout; spread over it),
    # so that the teacher reads such examples as a model that learned their form and not the
    # corpus (policy.form_teacher); 0: the reference as given; None: TEACH_RETAIN examples of
    # a retain set given (what a model trained without the corpus learned), else 0 (a
    # holdout is never-seen text: the reference should not learn it)
    teach_form: int | None = None
    # distill: weight of the mean squared gap between each forget answer token's
    # log-probability and the teacher's (losses.label_gap), beside the KL: the KL weighs each
    # token by the teacher's probability, so the tokens the teacher finds least likely (what
    # Min-K % reads) are the last to reach it; 0: off
    label_weight: float = 0.0
    seed: int = 0  # LoRA initialization, batch order, dropout, augmentation order

    def __post_init__(self) -> None:
        if self.method not in LOSSES:
            known = ", ".join(sorted(LOSSES))
            raise InvalidRequest(f"unknown unlearning method {self.method!r}: choose {known}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidRequest(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.kl_to not in (None, "before", "reference"):
            raise InvalidRequest(f"kl_to must be 'before' or 'reference', got {self.kl_to!r}")
        for name in ("fact_retain", "text_retain", "teach_form"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidRequest(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("epochs", "lora_rank", "batch_size", "max_len"):
            value = getattr(self, name)
            if name == "epochs" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be an integer >= 1, got {value!r}")
        if self.retain_batch_size is not None and (
            not isinstance(self.retain_batch_size, int) or self.retain_batch_size < 1
        ):
            raise InvalidRequest(
                f"retain_batch_size must be an integer >= 1 or None, got {self.retain_batch_size!r}"
            )
        if self.stop_nll is not None and not self.stop_nll > 0:
            raise InvalidRequest(f"stop_nll must be > 0 or None, got {self.stop_nll}")
        if self.confine is not None and not isinstance(self.confine, bool):
            raise InvalidRequest(f"confine must be true or false, got {self.confine!r}")
        if not isinstance(self.samples, int) or self.samples < 0:
            raise InvalidRequest(f"samples must be an integer >= 0, got {self.samples!r}")
        if self.quant_bits != 0 and (
            not isinstance(self.quant_bits, int) or not 2 <= self.quant_bits <= 8
        ):
            raise InvalidRequest(f"quant_bits must be 0 (off) or 2 to 8, got {self.quant_bits!r}")
        if self.eval_retain < 0:
            raise InvalidRequest(f"eval_retain must be >= 0, got {self.eval_retain}")
        for name in ("lr", "lora_alpha", "beta", "penalty"):
            if name == "lr" and self.lr is None:
                continue
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "alpha",
            "gamma",
            "kl_weight",
            "weight_decay",
            "sam_rho",
            "entropy_weight",
            "token_nll_weight",
            "holdout_kl",
            "label_weight",
        ):
            if name == "kl_weight" and self.kl_weight is None:
                continue
            if not getattr(self, name) >= 0:
                raise InvalidRequest(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidRequest(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidRequest(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.target_modules is not None:
            names = (
                (self.target_modules,)
                if isinstance(self.target_modules, str)
                else tuple(self.target_modules)
            )
            if not names or not all(isinstance(n, str) and n for n in names):
                raise InvalidRequest(
                    f"target_modules must be module names, got {self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", names)  # YAML gives lists


# What a field left None means, per objective, on the default model. Learning (measured by
# benchmarks/learn_bios.py, docs/unlearning.md): restatements and questions make the facts
# recallable; KL to the model before the run on (shipped WikiText-2) retain text keeps
# perplexity within a few percent, and on 256 shipped factual prompts the facts it knew
# (10 bios: known facts -2.0 points against -9.0 without). KL 2 over 6 epochs against KL 1
# over 5, 40 bios: recall 90.0 / 85.4 % against 82.5 / 84.6 %, perplexity +5.0 % against
# +5.7 %, known facts +1.0 against +0.5 points (benchmarks/results/learn_bios_40_kl2e6.md).
# 512 WikiText-2 slices instead of 64 (drawn as often in all, the facts as often): the KL held
# the 64 slices themselves (their NLL +0.05 %) while other text drifted; 40 bios: perplexity
# +1.2 % against +5.0 %, recall 90.0 / 85.4 / 85.8 % against 90.0 / 85.4 / 85.0 %, known facts
# -1.0 against +1.0 points (benchmarks/results/learn_bios_40_text512.md).
# Forgetting takes smaller steps, and more of them, so that a stop level (a holdout, or the
# level before a learn entry) is met by a step that does not overshoot; the KL to the
# reference on the retain set keeps perplexity near the base's on the way to that level.
# With a stop level, epochs is a cap.
# teach_form left None, with a retain set given to a forget toward a reference by distill or
# match: the teacher first learns this many of its examples. TOFU forget01 toward the default
# model after 40 of the 360 kept QA: forget quality 0.579 against 0.266 with the reference as
# given (bar 0.5), forget05 0.394 against 0.088 (bar 0.1), utility 112.5 % of the
# reference's against 48.3 % (benchmarks/results/tofu_unlearn_distill_form.md,
# tofu_unlearn_forget05_distill_form.md); 10 never-seen holdout bios taught instead moved the
# forgotten bios 38 % below the base's NLL (forget_bios_40_learned_teach_form.md).
TEACH_RETAIN = 40

OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "forget": {"lr": 2e-4, "epochs": 20, "kl_weight": 5.0, "augment": False, "fact_retain": 0,
               "text_retain": 64, "confine": False},
    "learn": {"lr": 3e-4, "epochs": 6, "kl_weight": 2.0, "augment": True, "fact_retain": 256,
              "text_retain": 512, "confine": False},
}  # fmt: skip
# ... and where a forget method differs. distill and match hold each example at a level, so a
# large step does not overshoot: lr 3e-3 nears the level within the 20 epochs; distill reaches
# its reference's NLL on the corpus in 2 epochs and runs 6 (on 40 learned bios, against 20:
# 3.7x less time, loss AUC 0.554 against 0.565, perplexity -0.2 % against -0.8 %). distill's
# adapter reads only where the fine-tune wrote (confine), and a light KL (0.3) holds the
# retain set (the shipped WikiText-2 slices unless one is given) to the model before (to the
# reference where the model before reads it far worse: policy.retain_hold): on 40
# bios learned by `edit learn`, confined alone perplexity +3.5 %, with KL 0.3 -0.8 % and known
# facts +0.3 point, with KL 1 -1.7 % and -1.3 points (benchmarks/forget_bios.py,
# docs/unlearning.md).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "distill": {"lr": 3e-3, "epochs": 6, "kl_weight": 0.3, "confine": True},
    "rename": {"lr": 3e-3, "kl_weight": 1.0},
    "match": {"lr": 3e-3, "kl_weight": 1.0},
}


def for_objective(config: UnlearnConfig, objective: str, *, retain: bool = True) -> UnlearnConfig:
    """``config`` with the fields left None set to the objective's defaults, and for forget the
    method's (no KL term without a retain set to take it on)."""
    defaults = dict(OBJECTIVE_DEFAULTS[objective])
    if objective == "forget":
        defaults.update(METHOD_DEFAULTS.get(config.method, {}))
    unset = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    if not retain and "kl_weight" in unset:
        unset["kl_weight"] = 0.0
    return dataclasses.replace(config, **unset) if unset else config
