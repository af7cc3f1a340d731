"""The unlearning objectives: pure functions of logits, labels and log-likelihoods, and the
table :data:`LOSSES` that names them.

Every objective is written in per-sequence log-likelihoods of an answer y after its prompt x,

    log π_θ(y|x) = Σ_t log π_θ(y_t | x, y_<t)        (answer tokens only; |y| of them)

with π_ref the model before unlearning (the same model with the adapter disabled: the
adapter starts at zero, so π_θ = π_ref at step 0). NLL(D) is the mean token NLL over every
answer token of a batch, as Hugging Face's ``labels`` loss computes it:

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
    distill     E_t[KL(π_T(·|x,y_<t) ‖ π_θ(·|x,y_<t))]
                distillation toward π_T, a model that never saw D_f (the base model a
                fine-tune started from): every answer token of D_f is aimed at the
                distribution a never-seen model gives it, instead of pushed down as far as it
                goes, so each example lands at its own never-seen level (knowledge
                distillation, Hinton et al. 2015, with the never-seen model as teacher).
    undial      E_t[KL(q_t ‖ π_θ(·|x,y_<t))],  q_t = softmax(z_ref,t − s·1[y_t])
                self-distillation with adjusted logits (UNDIAL, Dong et al. 2024): each answer
                token aimed at the model's own distribution before the run with that token's
                logit lowered by s (``penalty``). The rest of the distribution keeps its shape,
                so the model says something else as confidently as before instead of growing
                unsure at the forgotten tokens, and no token is pushed below a bounded target.
    match       E_f[(NLL(y|x) − t)²],   NLL(y|x) = −log π_θ(y|x) / |y|
                each example's mean token NLL aimed at its own target t, set once before
                training: the never-seen teacher's NLL of that example; without a teacher,
                the holdout's NLL at the example's rank (quantile matching: the forget set's
                NLLs take on the never-seen set's distribution, not only its mean).
                These two have no α·NLL(D_r) term: trained on a small retain set, it teaches
                that set (benchmarks/forget_bios.py: its NLL fell from 4.6 to 1.1 in 100
                steps) instead of keeping the model; the KL term keeps it.

plus, for any objective, ``kl_weight``·KL(π_ref ‖ π_θ) over the retain set's answer tokens
(:func:`token_kl`), and for a forget with a holdout ``entropy_weight``·:func:`quantile_match`
of the forget answer tokens' entropies and ``token_nll_weight``· that of their NLLs, each to
the holdout's before the run, which the trainer adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edit.corpus import IGNORE_INDEX

if TYPE_CHECKING:
    from edit.methods.unlearn.config import UnlearnConfig

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


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """() mean over rows of KL(π_ref ‖ π_θ) = Σ_v π_ref(v)·(log π_ref(v) − log π_θ(v)).

    Both (N, V): the next-token logits at the N label positions of a batch (ignored tokens
    already dropped), from the trained model and from the model it is held to (π_ref on the
    retain set; the never-seen teacher π_T on the forget set, for ``distill``).
    """
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = torch.log_softmax(ref_logits.float(), -1)
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(N,) entropy in nats of the next-token distribution at each of N positions."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def quantile_match(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """() the 1-Wasserstein distance between N per-token ``values`` (say the forget answer
    tokens' entropies or NLLs) and ``levels`` (the same measure on never-seen text, sorted):
    the values sorted, each aimed at the never-seen value at the same quantile, mean
    absolute gap. A never-seen model is confidently wrong at some tokens and unsure at
    others; forgetting moves every token it touches, and this pulls the spread back to the
    never-seen one, in both directions."""
    v = values.float().sort().values
    n, m = len(v), len(levels)
    at = (torch.arange(n, device=v.device, dtype=torch.float32) + 0.5) / n * (m - 1)
    lo = at.floor().long()
    frac = at - lo
    levels = levels.to(v.device, torch.float32)
    want = levels[lo] * (1 - frac) + levels[(lo + 1).clamp(max=m - 1)] * frac
    return (v - want).abs().mean()


def label_gap(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
              ) -> torch.Tensor:  # fmt: skip
    """() mean over N answer tokens of (log π_θ(y_t) − log π_T(y_t))²: each token's own
    log-probability aimed at the teacher's, from either side. Forward KL(π_T ‖ π_θ) weighs
    a token by π_T, so where the teacher finds the answer token unlikely the student may
    keep it likely at little cost; membership inference reads exactly those tokens."""
    return (token_nlls(teacher_logits, labels) - token_nlls(logits, labels)).square().mean()


def token_nlls(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) −log π(y_t) of each of N answer tokens from its next-token logits (N, V)."""
    return -torch.log_softmax(logits.float(), -1).gather(1, labels[:, None])[:, 0]


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
    logits: torch.Tensor | None = None  # (N, V) π_θ's logits at the forget answer positions
    teacher_logits: torch.Tensor | None = None  # (N, V) π_T's there; objectives that need it
    targets: torch.Tensor | None = None  # (B,) each forget example's target mean token NLL
    before_logits: torch.Tensor | None = None  # (N, V) π_ref's there (NEEDS_BEFORE_LOGITS)
    labels: torch.Tensor | None = None  # (N,) the answer token at each of those positions


LossFn = Callable[[LossInputs, "UnlearnConfig"], torch.Tensor]

LOSSES: dict[str, LossFn] = {}  # name -> loss(inputs, config): the forget objectives
NEEDS_REFERENCE: set[str] = set()  # objectives that read LossInputs.ref_logp
NEEDS_TEACHER: set[str] = set()  # objectives that read LossInputs.teacher_logits
# objectives that read teacher_logits from the model before the run on renamed examples
NEEDS_RENAMED: set[str] = set()
NEEDS_TARGETS: set[str] = set()  # objectives that read LossInputs.targets
NEEDS_BEFORE_LOGITS: set[str] = set()  # objectives that read before_logits and labels
USES_RETAIN: set[str] = set()  # objectives with an α·NLL(D_r) term


def register_loss(
    name: str,
    *,
    reference: bool = False,
    teacher: bool = False,
    targets: bool = False,
    before_logits: bool = False,
    renamed: bool = False,
    retain: bool = True,
):
    """Add a forget objective to :data:`LOSSES` under ``name``."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if reference:
            NEEDS_REFERENCE.add(name)
        if teacher:
            NEEDS_TEACHER.add(name)
        if targets:
            NEEDS_TARGETS.add(name)
        if before_logits:
            NEEDS_BEFORE_LOGITS.add(name)
        if renamed:
            NEEDS_RENAMED.add(name)
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


@register_loss("distill", teacher=True, retain=False)
def distill(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """mean over forget answer tokens of KL(π_T ‖ π_θ): each token aimed at the next-token
    distribution of a model that never saw the forget set."""
    if x.logits is None or x.teacher_logits is None:
        raise ValueError("distill needs the logits of the model and of the never-seen teacher")
    kl = token_kl(x.logits, x.teacher_logits)
    if not config.label_weight:
        return kl
    if x.labels is None:
        raise ValueError("distill with label_weight needs the answer tokens")
    return kl + config.label_weight * label_gap(x.logits, x.teacher_logits, x.labels)


@register_loss("rename", renamed=True, retain=False)
def rename(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """mean over forget answer tokens of KL(π_T ‖ π_θ), π_T the model before the run reading
    the example with its subject replaced by a never-seen one (``unlearn.rename``)."""
    if x.logits is None or x.teacher_logits is None:
        raise ValueError("rename needs the logits of the model and of the renamed examples")
    return token_kl(x.logits, x.teacher_logits)


@register_loss("undial", before_logits=True, retain=False)
def undial(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """mean over forget answer tokens of KL(q ‖ π_θ), q the distribution before the run with
    the answer token's logit lowered by ``config.penalty`` (UNDIAL, Dong et al. 2024)."""
    if x.logits is None or x.before_logits is None or x.labels is None:
        raise ValueError("undial needs the logits before the run and the answer tokens")
    lowered = torch.full_like(x.labels, -config.penalty, dtype=x.before_logits.dtype)
    adjusted = x.before_logits.scatter_add(1, x.labels[:, None], lowered[:, None])
    return token_kl(x.logits, adjusted)


@register_loss("match", targets=True, retain=False)
def match(x: LossInputs, config: UnlearnConfig) -> torch.Tensor:
    """mean_i (NLL_i − t_i)², NLL_i the mean token NLL of forget example i and t_i its
    never-seen target: no push past it, from either side."""
    if x.targets is None:
        raise ValueError("match needs each forget example's target NLL (LossInputs.targets)")
    nll = -x.logp / x.n_tokens.clamp(min=1)
    return (nll - x.targets.to(nll.dtype)).square().mean()


def quantile_targets(nll: torch.Tensor, never_seen: torch.Tensor) -> torch.Tensor:
    """(n,) targets for examples of NLLs ``nll`` (n,): the ``never_seen`` NLLs' empirical
    quantile at each example's rank (the lowest gets the lowest quantile, the highest the
    highest; ties broken by order), linearly interpolated."""
    n = len(nll)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(nll, stable=True)] = torch.arange(n, dtype=torch.float64)
    q = ranks / max(n - 1, 1) if n > 1 else torch.full((1,), 0.5, dtype=torch.float64)
    return torch.quantile(never_seen.double(), q).to(nll.dtype)
