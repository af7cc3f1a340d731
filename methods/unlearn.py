"""Unlearning (and learning) a corpus with LoRA: pure loss functions and one trainer.

    from edit.corpus import wikitext_retain
    from edit.methods.unlearn import UnlearnConfig, lora_update, train_lora
    from edit.readers.corpus import read_corpus

    forget = read_corpus("private.jsonl")
    result = train_lora(model, tok, forget, wikitext_retain(tok), UnlearnConfig(method="npo"))
    result.metrics["forget_nll_before"], result.metrics["forget_nll_after"]
    applied = lora_update(result).apply(model)   # the adapter as exact weight deltas
    applied.undo()                               # bit-for-bit the base again

The goal, for a forget set D_f of the training data, is a model that behaves as if it had
never seen D_f, while it keeps what it knows elsewhere (a retain set D_r). Every objective
below is written in per-sequence log-likelihoods of an answer y after its prompt x,

    log π_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t)        (answer tokens only; |y| of them)

with π_ref the model before unlearning (the same model with the adapter disabled: the
adapter starts at zero, so π_θ = π_ref at step 0). NLL(D) is the mean token NLL over every
answer token of a batch, as Hugging Face's ``labels`` loss computes it. Table :data:`LOSSES`:

    gradascent  −NLL(D_f)                                  gradient ascent (Jang et al. 2023;
                                                           TOFU, Maini et al. 2024)
    graddiff    −NLL(D_f) + α·NLL(D_r)                     gradient difference (Liu et al. 2022)
    npo         −(2/β)·E_f[log σ(−β·(log π_θ(y|x) − log π_ref(y|x)))] + α·NLL(D_r)
                = (2/β)·E_f[log(1 + (π_θ/π_ref)^β)] + α·NLL(D_r)
                Negative Preference Optimization (Zhang et al. 2024), with its retain term
                (NPO+RT). As β → 0 its gradient becomes gradient ascent on the sequence
                log-likelihood; at θ = ref it equals it for every β.
    simnpo      −(2/β)·E_f[log σ(−(β/|y|)·log π_θ(y|x) − γ)] + α·NLL(D_r)
                SimNPO (Fan et al. 2024): NPO without a reference, length-normalized, with a
                reward margin γ.

plus, for any objective, ``kl_weight``·KL(π_ref ‖ π_θ) over the retain set's answer tokens
(the next-token distributions, averaged over label tokens). ``learn`` trains NLL(examples)
(plus the same optional KL term) to teach a corpus instead.

Defaults: β = 0.1 (NPO's TOFU setting), α = 1 (retain term at full weight; 0 turns it off),
γ = 0 (SimNPO's margin, which the paper tunes per task from 0 upward).

Invariant: the model is unchanged at the end. Training runs a peft LoRA adapter injected into
the model; the adapter is then unloaded without merging, every original module is back in
place with its weights untouched, and the adapter is returned (:class:`LoraResult`).
:func:`lora_delta` / :func:`lora_update` turn it into exact weight deltas for the ledger.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edit import arch as arch_table
from edit import distributed, lm
from edit.corpus import IGNORE_INDEX, Example, collate, encode_example
from edit.errors import EditFailed, InvalidRequest
from edit.update import Update

log = logging.getLogger(__name__)

OBJECTIVES = ("forget", "learn")

# --------------------------------------------------------------------------------------------
# Pure functions of logits and labels
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log-probability of each label token, 0 where the label is ignored.

    ``logits`` (B, T, V) at every position, ``labels`` (B, T) in the Hugging Face convention:
    the logits at t-1 predict ``labels[:, t]``; :data:`IGNORE_INDEX` marks no loss.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return picked * keep


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) log π(y|x): the summed log-probabilities of each sequence's label tokens."""
    return token_logprobs(logits, labels).sum(-1)


def sequence_nll(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """(B,) NLL of each sequence's label tokens: their ``"sum"``, or their ``"mean"``."""
    total = -sequence_logprob(logits, labels)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def token_nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """() mean token NLL of a batch from per-sequence sums: −Σ_i log π(y_i|x_i) / Σ_i |y_i|
    (what ``model(..., labels=...).loss`` computes)."""
    return -logp.sum() / n_tokens.sum().clamp(min=1)


def retain_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """() mean over rows of KL(π_ref ‖ π_θ) = Σ_v π_ref(v)·(log π_ref(v) − log π_θ(v)).

    Both (N, V): the next-token logits at the N label positions of a batch (ignored tokens
    already dropped), from the trained model and from the reference.
    """
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------------------------
# The objectives: one table
# --------------------------------------------------------------------------------------------


@dataclass
class LossInputs:
    """The per-batch quantities every objective is written in."""

    logp: torch.Tensor  # (B,) log π_θ(y|x) of each forget sequence (summed over answer tokens)
    n_tokens: torch.Tensor  # (B,) |y|, answer tokens per sequence
    ref_logp: torch.Tensor | None = None  # (B,) log π_ref(y|x); objectives that need it
    retain_nll: torch.Tensor | None = None  # () NLL(D_r) of the retain batch; None: no term


LossFn = Callable[[LossInputs, "UnlearnConfig"], torch.Tensor]

LOSSES: dict[str, LossFn] = {}  # name -> loss(inputs, config): the forget objectives
NEEDS_REFERENCE: set[str] = set()  # objectives that read LossInputs.ref_logp
USES_RETAIN: set[str] = set()  # objectives with an α·NLL(D_r) term


def register_loss(name: str, *, reference: bool = False, retain: bool = True):
    """Add a forget objective to :data:`LOSSES` under ``name``."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if reference:
            NEEDS_REFERENCE.add(name)
        if retain:
            USES_RETAIN.add(name)
        return fn

    return wrap


def _retain_term(x: LossInputs, config: UnlearnConfig) -> torch.Tensor | float:
    if x.retain_nll is None or config.alpha == 0:
        return 0.0
    return config.alpha * x.retain_nll


@register_loss("gradascent", retain=False)
def gradient_ascent(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """−NLL(D_f): push the forget answers' likelihood down without bound (no retain term)."""
    return -token_nll(x.logp, x.n_tokens)


@register_loss("graddiff")
def gradient_difference(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """−NLL(D_f) + α·NLL(D_r) (Liu et al. 2022; TOFU's "Grad. Diff.")."""
    return -token_nll(x.logp, x.n_tokens) + _retain_term(x, config)


@register_loss("npo", reference=True)
def npo(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """−(2/β)·mean_i log σ(−β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))) + α·NLL(D_r)
    (Zhang et al. 2024, with the retain loss of their NPO+RT)."""
    if x.ref_logp is None:
        raise ValueError("npo needs the reference log-likelihoods (LossInputs.ref_logp)")
    log_ratio = x.logp - x.ref_logp  # (B,) log(π_θ/π_ref)
    forget = -(2.0 / config.beta) * F.logsigmoid(-config.beta * log_ratio).mean()
    return forget + _retain_term(x, config)


@register_loss("simnpo")
def simnpo(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """−(2/β)·mean_i log σ(−(β/|y_i|)·log π_θ(y_i|x_i) − γ) + α·NLL(D_r)
    (Fan et al. 2024: NPO with the reference replaced by length normalization)."""
    reward = config.beta / x.n_tokens.clamp(min=1) * x.logp  # (B,)
    forget = -(2.0 / config.beta) * F.logsigmoid(-reward - config.gamma).mean()
    return forget + _retain_term(x, config)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


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
    kl_weight: float | None = None  # weight of KL(π_ref ‖ π_θ) on the retain set; None: as above
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA factors
    max_grad_norm: float | None = 1.0  # gradient clipping; None: off
    eval_retain: int = 128  # retain examples scored before/after (the first ones)
    # forget: stop once the forget set's mean token NLL reaches this level (None: with a
    # holdout set, its NLL before training, i.e. the level of never-seen text; else no stop)
    stop_nll: float | None = None
    # forget in a workspace, with neither a holdout nor stop_nll: when an earlier ``learn``
    # entry learned every example of the corpus, stop at the corpus's NLL without that entry
    # (the level of the same text never seen); False: no such stop
    stop_at_learned: bool = True
    seed: int = 0  # LoRA initialization, batch order, dropout

    def __post_init__(self) -> None:
        if self.method not in LOSSES:
            known = ", ".join(sorted(LOSSES))
            raise InvalidRequest(f"unknown unlearning method {self.method!r}: choose {known}")
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
        if self.eval_retain < 0:
            raise InvalidRequest(f"eval_retain must be >= 0, got {self.eval_retain}")
        for name in ("lr", "lora_alpha", "beta"):
            if name == "lr" and self.lr is None:
                continue
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("alpha", "gamma", "kl_weight", "weight_decay"):
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


# --------------------------------------------------------------------------------------------
# Which modules get an adapter
# --------------------------------------------------------------------------------------------


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def target_module_names(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[str]:
    """Full names of the modules to adapt, in model order.

    None: every Linear (GPT-2: Conv1D) inside the attention and the MLP of every block.
    Otherwise each pattern is a full module name or a suffix after a dot (peft's rule), and
    must match at least one Linear / Conv1D module.
    """
    arch = arch_table.lookup(model)
    if patterns is None:
        names: list[str] = []
        for i in range(arch_table.num_layers(model)):
            for prefix in dict.fromkeys((arch.attn_name(i), arch.mlp_name(i))):
                for sub, module in model.get_submodule(prefix).named_modules():
                    if _adaptable(module):
                        names.append(f"{prefix}.{sub}" if sub else prefix)
        if not names:
            raise InvalidRequest("found no Linear projections in the attention or MLP blocks")
        return list(dict.fromkeys(names))
    candidates = [n for n, m in model.named_modules() if n and _adaptable(m)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if n == pattern or n.endswith("." + pattern)]
        if not hits:
            raise InvalidRequest(
                f"target module {pattern!r} matches no Linear layer of this model "
                f"(for example: {', '.join(candidates[:4])})"
            )
        chosen += hits
    chosen_set = set(chosen)
    return [n for n in candidates if n in chosen_set]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _forward_scores(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(y|x) (B,), |y| (B,), next-token logits at the label positions (N, V)).

    The unembedding runs only at the N label positions (:func:`edit.lm.unembed`).
    """
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # predicting t = col+1
    out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state  # (B, T, d)
    logits = lm.unembed(model, hidden[rows.to(hidden.device), cols.to(hidden.device)])  # (N, V)
    targets = labels[rows, cols + 1].to(logits.device)  # (the head may sit on another GPU)
    tok_logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0].to(ids.device)
    batch = ids.shape[0]
    logp = torch.zeros(batch, device=ids.device, dtype=tok_logp.dtype).index_add(0, rows, tok_logp)
    n_tokens = torch.bincount(rows, minlength=batch)
    return logp, n_tokens, logits


class _Forward(nn.Module):
    """Every forward pass of a training run as one module, so that accelerate can wrap it
    (DDP, FSDP, DeepSpeed) and each pass goes through the wrapper: a call scores a list of
    (ids, mask, labels) batches with :func:`_forward_scores`. A step is one call, so that DDP
    sees one forward pass per backward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model  # the model with the adapter injected (peft works in place)

    def forward(self, *batches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        return [_forward_scores(self.lm, *batch) for batch in batches]


@torch.no_grad()
def _scores(
    model: nn.Module,
    encoded: list[tuple[list[int], int]],
    pad: int,
    batch_size: int,
    forward: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x) (n,), |y| (n,)) on the CPU, in batches; ``forward(ids, mask, labels)``
    gives (log π(y|x), |y|, logits) of a batch (default: :func:`_forward_scores`)."""
    device = lm.device_of(model)
    forward = forward or (lambda *batch: _forward_scores(model, *batch))
    logps, counts = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad)
        logp, n, _ = forward(*(t.to(device) for t in batch))
        logps.append(logp.cpu())
        counts.append(n.cpu())
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(counts)


def answer_scores(
    model: nn.Module, tok, examples: list[Example], *, batch_size: int = 16, max_len: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y|x) (n,), |y| (n,)) of each example's answer (or text), batched, no grad."""
    encoded = [encode_example(tok, ex, max_len) for ex in examples]
    return _scores(model, encoded, lm.pad_id(tok), batch_size)


def answer_nll(
    model: nn.Module, tok, examples: list[Example], *, batch_size: int = 16, max_len: int = 256
) -> float:
    """Mean over examples of each answer's mean token NLL (the loss the trainer sees)."""
    logp, n = answer_scores(model, tok, examples, batch_size=batch_size, max_len=max_len)
    return float((-logp / n.clamp(min=1)).mean())


def _summary(prefix: str, logp: torch.Tensor, n: torch.Tensor) -> dict[str, float | None]:
    if len(logp) == 0:
        return {f"{prefix}_nll": None}
    nll = -logp / n.clamp(min=1)
    out: dict[str, float | None] = {f"{prefix}_nll": float(nll.mean())}
    if prefix != "retain":
        out[f"{prefix}_prob"] = float(logp.exp().mean())  # P(y|x), whole answer
        out[f"{prefix}_token_prob"] = float((-nll).exp().mean())  # P(y|x)^(1/|y|), as TOFU
    return out


# --------------------------------------------------------------------------------------------
# The adapter: attach, train, detach
# --------------------------------------------------------------------------------------------


@dataclass
class LoraResult:
    """What a LoRA run produced. The model it ran on is unchanged; ``adapter`` (peft's
    state-dict names, CPU float32) with ``lora_config`` (peft's LoraConfig as a JSON-safe
    dict) is the change, and :func:`lora_delta` gives it as dense weight deltas."""

    objective: str  # "forget" or "learn"
    config: UnlearnConfig
    adapter: dict[str, torch.Tensor]
    lora_config: dict[str, Any]
    target_modules: list[str]
    transposed: bool  # the targeted weights are stored (in, out) (GPT-2 Conv1D)
    losses: list[dict[str, float | None]] = field(default_factory=list)  # one per epoch
    seconds: float = 0.0  # wall time of the training steps
    tokens: int = 0  # tokens through training forward passes (forget + retain, no padding)
    tokens_per_second: float = 0.0
    metrics: dict[str, float | None] = field(default_factory=dict)  # *_before / *_after

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def _json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@contextmanager
def _lora_wrapped(model: nn.Module, lora_config) -> Iterator[nn.Module]:
    """The model with a peft LoRA adapter injected (``get_peft_model``); on exit the adapter
    is unloaded without merging and every module's train/eval mode and every parameter's
    ``requires_grad`` are restored, so the model is exactly what it was."""
    from peft import get_peft_model

    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # peft asks transformers deprecated questions
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora_config)
    try:
        yield peft_model
    finally:
        base = peft_model.unload()  # puts the original modules back; no merge
        if base is not model:  # peft promises the same object; anything else is a bug
            raise RuntimeError("peft unload returned a different model object")
        for name, m in model.named_modules():
            m.training = modes[name]
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


def _peft_config(model: nn.Module, config: UnlearnConfig):
    from peft import LoraConfig

    targets = target_module_names(model, config.target_modules)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=arch_table.lookup(model).transposed,
        bias="none",
    ), targets


@contextmanager
def adapter_attached(model: nn.Module, result: LoraResult) -> Iterator[nn.Module]:
    """``model`` running ``result``'s adapter as peft runs it (unmerged), for the duration of
    the block; the model is exactly restored at exit.

        with adapter_attached(model, result):
            lm.top_next(model, tok, "The capital of France is")
    """
    from peft import LoraConfig, set_peft_model_state_dict

    init = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    lora_config = LoraConfig(**{k: v for k, v in result.lora_config.items() if k in init})
    with _lora_wrapped(model, lora_config) as peft_model:
        set_peft_model_state_dict(peft_model, result.adapter)
        peft_model.eval()
        yield peft_model


def _retain_stream(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of retain indices: shuffled passes, cycled (none if ``n`` is 0)."""
    while n:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


# What a field left None means, per objective. Measured on a 40-QA private corpus on the
# default model (README, "Forgetting to the never-seen level"): learning at lr 1e-4 moves
# the corpus NLL 2.96 -> 2.28, at 3e-4 to 1.42 (WikiText-2 perplexity +14%), at 1e-3 to
# 0.10 (+109%). Forgetting takes smaller steps, and more of them, so that a stop level (a
# holdout, or the level before a learn entry) is met by a step that does not overshoot; the
# KL to the reference on the retain set kept perplexity within 1% where without it it rose
# 15-23% on the way to the same level. With a stop level, epochs is a cap: the QA corpus
# reached its level after 98 steps (9.8 epochs), the same as plain text after 135 (13.5).
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "forget": {"lr": 2e-4, "epochs": 20, "kl_weight": 5.0},
    "learn": {"lr": 3e-4, "epochs": 5, "kl_weight": 0.0},
}


def for_objective(config: UnlearnConfig, objective: str, *, retain: bool = True) -> UnlearnConfig:
    """``config`` with the fields left None set to the objective's defaults (no KL term
    without a retain set to take it on)."""
    unset = {k: v for k, v in OBJECTIVE_DEFAULTS[objective].items() if getattr(config, k) is None}
    if not retain and "kl_weight" in unset:
        unset["kl_weight"] = 0.0
    return dataclasses.replace(config, **unset) if unset else config


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
    """
    if objective not in OBJECTIVES:
        raise InvalidRequest(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    forget, retain = list(forget), list(retain or [])
    config = for_objective(config or UnlearnConfig(), objective, retain=bool(retain))
    if not forget:
        raise InvalidRequest(f"no examples to {objective}")
    method = config.method if objective == "forget" else "learn"
    if method == "graddiff" and config.alpha > 0 and not retain:
        raise InvalidRequest("graddiff needs a retain set: give one, or use method gradascent")
    if config.kl_weight > 0 and not retain:
        raise InvalidRequest("kl_weight > 0 needs a retain set: give one, or set kl_weight 0")
    if objective != "forget" and config.stop_nll is not None:
        raise InvalidRequest("stop_nll stops a forget run: leave it unset for learn")
    forget_set = set(forget)
    for name, other in (("retain", retain), ("holdout", holdout or [])):
        shared = [ex for ex in other if ex in forget_set]
        if shared:
            where = f" (first: {shared[0].where})" if shared[0].where else ""
            raise InvalidRequest(
                f"{len(shared)} of the {len(other)} {name} examples are also in the set to "
                f"{objective}{where}: give {name} examples that are not in it"
            )
    forget_enc = [encode_example(tok, ex, config.max_len) for ex in forget]
    holdout_enc = [encode_example(tok, ex, config.max_len) for ex in holdout or []]
    retain_enc = [encode_example(tok, ex, config.max_len) for ex in retain]
    lora_config, targets = _peft_config(model, config)

    device = lm.device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # the LoRA initialization and the dropout draws
        run = _Run(model, tok, config, method, objective, progress)
        result = run.train(forget_enc, retain_enc, lora_config, holdout_enc)
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


@dataclass
class _StepLoss:
    loss: torch.Tensor
    train_nll: float  # mean token NLL of the step's forget (or learn) examples
    retain_nll: float | None
    tokens: int  # tokens through the forward passes (no padding)


@dataclass
class _Run:
    """One training run of :func:`train_lora` (inputs already validated and tokenized)."""

    model: nn.Module
    tok: Any
    config: UnlearnConfig
    method: str  # a key of LOSSES, or "learn"
    objective: str
    progress: bool
    acc: Any = None  # the accelerate.Accelerator running the steps (set by train)
    forward: nn.Module | None = None  # _Forward, prepared by acc

    def _score_batch(self, ids, mask, labels):
        return self.forward((ids, mask, labels))[0]

    def scores(self, encoded: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_scores` of ``encoded`` through the prepared model; with several processes
        each scores a share (padded to equal counts: FSDP needs every process in every pass)
        and all get every score."""
        from accelerate.utils import gather_object

        pad, size = lm.pad_id(self.tok), max(self.config.batch_size, 16)
        if self.acc.num_processes == 1 or not encoded:
            return _scores(self.model, encoded, pad, size, self._score_batch)
        everything = list(range(len(encoded)))
        with self.acc.split_between_processes(everything, apply_padding=True) as mine:
            logp, n = _scores(self.model, [encoded[i] for i in mine], pad, size,
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

    def batch(self, encoded: list[tuple[list[int], int]], idx: list[int]):
        ids, mask, labels = collate([encoded[i] for i in idx], lm.pad_id(self.tok))
        device = lm.device_of(self.model)
        return ids.to(device), mask.to(device), labels.to(device)

    def measure(self, when: str, train_enc, eval_retain_enc, holdout_enc):
        """(metrics named ``*_{when}``, the training examples' log π(y|x) (n,))."""
        train = self.scores(train_enc)
        summary = {
            **_summary(self.objective, *train),
            **_summary("retain", *self.scores(eval_retain_enc)),
        }
        if holdout_enc:
            summary.update(_summary("holdout", *self.scores(holdout_enc)))
        return {f"{k}_{when}": v for k, v in summary.items()}, train[0]

    def reached(self, forget_enc, level: float) -> bool:
        """Whether the whole forget set's NLL is at ``level`` or above (adapter on, no
        dropout)."""
        dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        try:
            nll = _summary("forget", *self.scores(forget_enc))["forget_nll"]
        finally:
            for m in dropouts:
                m.train()
        return nll >= level

    def step_loss(
        self, peft_model, forget_enc, retain_enc, idx, retain_idx, ref_logp, use_retain_nll
    ) -> _StepLoss:
        """The objective on one batch of forget (or learn) examples and one of retain."""
        c = self.config
        ids, mask, labels = self.batch(forget_enc, idx)
        batches = [(ids, mask, labels)]
        if retain_idx:
            batches.append(self.batch(retain_enc, retain_idx))
        scored = self.forward(*batches)  # one pass through the prepared model per step
        logp, n, _ = scored[0]
        tokens = int(mask.sum())
        ref = ref_logp[idx].to(logp.device) if self.method in NEEDS_REFERENCE else None
        inputs = LossInputs(logp, n, ref)
        kl, retain_nll = None, None
        if retain_idx:
            r_ids, r_mask, r_labels = batches[1]
            r_logp, r_n, r_logits = scored[1]
            tokens += int(r_mask.sum())
            if use_retain_nll:
                inputs.retain_nll = token_nll(r_logp, r_n)
            if c.kl_weight > 0:
                with torch.no_grad(), peft_model.disable_adapter():
                    *_, ref_logits = self._score_batch(r_ids, r_mask, r_labels)
                kl = retain_kl(r_logits, ref_logits)
            retain_nll = float(token_nll(r_logp.detach(), r_n))
        if self.objective == "forget":
            loss = LOSSES[self.method](inputs, c)
        else:
            loss = token_nll(logp, n)
        if kl is not None:
            loss = loss + c.kl_weight * kl
        return _StepLoss(loss, float(token_nll(logp.detach(), n)), retain_nll, tokens)

    def train(self, forget_enc, retain_enc, lora_config, holdout_enc) -> LoraResult:
        from peft.tuners.lora import LoraLayer

        c, model = self.config, self.model
        use_retain_nll = self.method in USES_RETAIN and c.alpha > 0 and bool(retain_enc)
        use_kl = c.kl_weight > 0
        eval_retain_enc = retain_enc[: c.eval_retain]

        with _lora_wrapped(model, lora_config) as peft_model:
            peft_model.eval()  # no dropout in the base model: at step 0, π_θ is exactly π_ref
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
            # the launch configuration decides how the steps run: one process, DDP, FSDP or
            # DeepSpeed; mixed precision and gradient accumulation (edit.distributed)
            acc = self.acc = distributed.accelerator()
            plugin = getattr(acc.state, "deepspeed_plugin", None)
            if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
                # DeepSpeed reads it from a prepared dataloader; this loop batches itself
                per_process = math.ceil(c.batch_size / acc.num_processes)
                plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process
            self.forward, optimizer = acc.prepare(_Forward(model), optimizer)
            try:
                result = self._steps(peft_model, acc, optimizer, params, forget_enc,
                                     retain_enc, eval_retain_enc, holdout_enc, use_retain_nll,
                                     use_kl, LoraLayer)  # fmt: skip
            finally:
                self.forward = None
                acc.free_memory()  # drop accelerate's references to the wrapped model
        return result

    def _steps(self, peft_model, acc, optimizer, params, forget_enc, retain_enc,
               eval_retain_enc, holdout_enc, use_retain_nll, use_kl, lora_layer_type
               ) -> LoraResult:  # fmt: skip
        c, model = self.config, self.model
        with peft_model.disable_adapter():  # π_ref; also the "before" metrics
            metrics, ref_logp = self.measure("before", forget_enc, eval_retain_enc, holdout_enc)
        stop_nll = c.stop_nll
        if stop_nll is None and holdout_enc and self.objective == "forget":
            stop_nll = metrics["holdout_nll_before"]
        metrics["stop_nll"] = stop_nll
        if stop_nll is not None and metrics["forget_nll_before"] >= stop_nll:
            raise InvalidRequest(
                f"the corpus's NLL {metrics['forget_nll_before']:.3f} is already at the "
                f"stop level {stop_nll:.3f} (never-seen text): nothing to forget"
            )
        taken = 0  # steps (batches; with gradient accumulation, several make one update)
        stopped = False  # the forget set reached stop_nll after ``taken`` steps

        lora_layers = [m for m in model.modules() if isinstance(m, lora_layer_type)]
        for layer in lora_layers:
            layer.lora_dropout.train()  # dropout on the adapter's input only
        gen = torch.Generator().manual_seed(c.seed)
        retain_size = c.retain_batch_size or c.batch_size
        retain_batches = _retain_stream(len(retain_enc), retain_size, gen)
        steps = math.ceil(len(forget_enc) / c.batch_size)
        bar = tqdm(
            total=c.epochs * steps,
            desc=f"{self.objective} ({self.method}, LoRA r={c.lora_rank})",
            unit="step",
            disable=True if not self.progress or not acc.is_main_process else None,
        )
        losses: list[dict[str, float | None]] = []
        tokens = 0
        t0 = time.perf_counter()
        for epoch in range(c.epochs):
            order = torch.randperm(len(forget_enc), generator=gen).tolist()
            sums = {"loss": 0.0, "train_nll": 0.0, "retain_nll": 0.0}
            retain_nll = None
            done = 0  # steps taken this epoch
            for step in range(steps):
                whole = order[step * c.batch_size : (step + 1) * c.batch_size]
                retain_whole = next(retain_batches) if use_retain_nll or use_kl else []
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
                    part = self.step_loss(peft_model, forget_enc, retain_enc, idx, retain_idx,
                                          ref_logp, use_retain_nll)  # fmt: skip
                    if stop_nll is not None:
                        # a batch at the level (scored before this step's update) triggers a
                        # scoring of the whole forget set; every process decides alike
                        if self.any_process(share > 0 and part.train_nll >= stop_nll):
                            stopped = self.reached(forget_enc, stop_nll)
                            if stopped:
                                break
                    bad = not bool(torch.isfinite(part.loss))
                    if self.any_process(bad):
                        value = float(part.loss.detach()) if bad else float("nan")
                        raise EditFailed(
                            f"training diverged at epoch {epoch + 1}, step {step + 1} (loss "
                            f"{value}): lower lr; the model was not changed"
                        )
                    acc.backward(part.loss * share)
                    if c.max_grad_norm is not None and acc.sync_gradients:
                        acc.clip_grad_norm_(params, c.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                bar.update()
                done += 1
                taken += 1
                if share == 0:
                    continue
                tokens += part.tokens
                retain_nll = part.retain_nll
                sums["loss"] += float(part.loss.detach())
                sums["train_nll"] += part.train_nll
                sums["retain_nll"] += retain_nll or 0.0
                postfix = {self.objective: f"{part.train_nll:.3f}"}
                if retain_nll is not None:
                    postfix["retain"] = f"{retain_nll:.3f}"
                bar.set_postfix(postfix, refresh=False)
            if done == 0:  # stopped before the epoch's first step
                break
            losses.append(
                {
                    "epoch": epoch + 1,
                    "loss": sums["loss"] / done,
                    f"{self.objective}_nll": sums["train_nll"] / done,
                    "retain_nll": sums["retain_nll"] / done if retain_nll is not None else None,
                }
            )
            if stopped:
                break
        if lm.device_of(model).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if acc.num_processes > 1:  # every process's tokens
            tokens = int(acc.reduce(torch.tensor([float(tokens)], device=acc.device)))
        bar.close()

        for layer in lora_layers:
            layer.lora_dropout.eval()
        metrics.update(self.measure("after", forget_enc, eval_retain_enc, holdout_enc)[0])
        if stop_nll is not None and not stopped:  # reached by the very last step?
            stopped = metrics["forget_nll_after"] >= stop_nll
        metrics["stopped_after"] = taken if stopped else None  # steps
        adapter = {
            k: v.detach().to("cpu", torch.float32).clone().contiguous()
            for k, v in self.adapter_state(peft_model).items()
        }
        peft_dict = _json_safe(peft_model.peft_config["default"].to_dict())
        return LoraResult(
            objective=self.objective,
            config=c,
            adapter=adapter,
            lora_config=peft_dict,
            target_modules=[],
            transposed=False,
            losses=losses,
            seconds=seconds,
            tokens=tokens,
            tokens_per_second=tokens / max(seconds, 1e-9),
            metrics=metrics,
        )

    def adapter_state(self, peft_model) -> dict[str, torch.Tensor]:
        """The trained adapter (peft's state-dict names). Where the model is sharded (FSDP,
        DeepSpeed ZeRO-3) accelerate gathers it on the main process, which sends it to all."""
        from accelerate.utils import DistributedType, broadcast_object_list
        from peft import get_peft_model_state_dict

        if self.acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return get_peft_model_state_dict(peft_model)
        full = self.acc.get_state_dict(self.forward)  # _Forward's names: "lm.<module>..."
        state = None
        if self.acc.is_main_process:
            renamed = {f"base_model.model.{k.removeprefix('lm.')}": v for k, v in full.items()}
            state = get_peft_model_state_dict(peft_model, state_dict=renamed)
            state = {k: v.detach().cpu() for k, v in state.items()}
        return broadcast_object_list([state])[0]


# --------------------------------------------------------------------------------------------
# The adapter as weight deltas
# --------------------------------------------------------------------------------------------


def lora_factors(result: LoraResult) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per targeted module: (B (out, r), A (r, in), scaling), with ΔW = scaling · B @ A in
    (out, in) layout, whatever the storage convention (peft keeps A, B that way for Conv1D
    too and transposes only when it merges)."""
    cfg = result.lora_config
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise ValueError("per-module ranks, alphas and DoRA adapters are not supported")
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    out = {}
    for name in result.target_modules:
        key = f"base_model.model.{name}"
        out[name] = (
            result.adapter[f"{key}.lora_B.weight"],
            result.adapter[f"{key}.lora_A.weight"],
            scaling,
        )
    return out


def lora_delta(result: LoraResult) -> dict[str, torch.Tensor]:
    """Module name -> ΔW (out, in), float32: what the adapter adds to each targeted weight.
    For a transposed architecture (``result.transposed``, GPT-2) the stored weight takes ΔWᵀ."""
    return {name: scaling * (b @ a) for name, (b, a, scaling) in lora_factors(result).items()}


def lora_update(result: LoraResult) -> Update:
    """The adapter as a rank-r :class:`~edit.update.Update` (A = scaling·B_lora, B = A_lora):
    ``lora_update(result).apply(model)`` adds it, in the model's storage layout, and the
    handle's ``undo()`` restores the exact previous weights."""
    return Update(
        {name: (scaling * b, a) for name, (b, a, scaling) in lora_factors(result).items()}
    )
